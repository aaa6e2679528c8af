"""Bottleneck adapters: down-projection, non-linearity, zero-initialised up-projection."""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from .base import Wrapper, input_of, map_output

__all__ = ["Bottleneck", "SequentialAdapter", "ParallelAdapter"]

ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU}


class Bottleneck(nn.Module):
    """``up(act(down(x)))`` with ``down`` Kaiming-uniform, ``up`` and both biases zero.

    Zero ``up`` makes the adapter output exactly zero at initialisation, so the adapted network
    starts as the pre-trained one (Houlsby et al. 2019 initialise near-identity; AdaptFormer's
    official code uses this exact zero-``up`` scheme).
    """

    #: hidden units in use (``None``: all); a supernet's adapter runs the first ``active`` ones
    active: int | None = None

    def __init__(self, dim: int, hidden: int, act: str = "gelu", *, device=None, dtype=None) -> None:
        super().__init__()
        kw = {"device": device, "dtype": dtype}
        self.down = nn.Linear(dim, hidden, **kw)
        self.act = ACTIVATIONS[act]()
        self.up = nn.Linear(hidden, dim, **kw)
        nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        k = self.active
        if k is None:
            return self.up(self.act(self.down(x)))
        h = self.act(F.linear(x, self.down.weight[:k], self.down.bias[:k]))
        return F.linear(h, self.up.weight[:, :k], self.up.bias)


def _like(module: nn.Module) -> dict:
    p = next(module.parameters())
    return {"device": p.device, "dtype": p.dtype}


class SequentialAdapter(Wrapper):
    """Adapter after a sub-layer: ``y = f(x); return y + s * adapter(y)`` (Houlsby / Pfeiffer)."""

    def __init__(self, base_layer: nn.Module, dim: int, hidden: int, act: str = "gelu", scale: float = 1.0) -> None:
        super().__init__(base_layer)
        self.adapter = Bottleneck(dim, hidden, act, **_like(base_layer))
        self.scale = scale

    def forward(self, *args, **kwargs) -> torch.Tensor:
        return map_output(self.base_layer(*args, **kwargs), lambda y: y + self.adapter(y) * self.scale)

    def apply_delta(self, x: torch.Tensor | None, y: torch.Tensor) -> torch.Tensor:
        return y.add_(self.adapter(y), alpha=self.scale)

    @classmethod
    def stack_deltas(cls, layers, num_tasks: int) -> nn.Module:
        return _BottleneckStack(layers, num_tasks, on_input=False)


class ParallelAdapter(Wrapper):
    """Adapter beside a sub-layer: ``return f(x) + s * adapter(x)`` (AdaptFormer's AdaptMLP)."""

    def __init__(self, base_layer: nn.Module, dim: int, hidden: int, act: str = "relu", scale: float = 0.1) -> None:
        super().__init__(base_layer)
        self.adapter = Bottleneck(dim, hidden, act, **_like(base_layer))
        self.scale = scale

    delta_reads_input = True

    def forward(self, *args, **kwargs) -> torch.Tensor:
        x = input_of(self.base_layer, args, kwargs)
        return map_output(self.base_layer(*args, **kwargs), lambda y: y + self.adapter(x) * self.scale)

    def apply_delta(self, x: torch.Tensor | None, y: torch.Tensor) -> torch.Tensor:
        return y.add_(self.adapter(x), alpha=self.scale)

    @classmethod
    def stack_deltas(cls, layers, num_tasks: int) -> nn.Module:
        return _BottleneckStack(layers, num_tasks, on_input=True)


class _BottleneckStack(nn.Module):
    """Every task's adapter of one module, stacked (zero-padded to the widest) for per-row gathering, one stack
    per activation function: ``y += s up[task](act(down[task](src)))`` with batched matrix products (``src``:
    the module's input for parallel adapters, its output for sequential ones). Non-persistent buffers."""

    def __init__(self, layers, num_tasks: int, on_input: bool) -> None:
        super().__init__()
        self.on_input = on_input
        by_act: dict[type, dict] = {}
        for t, layer in layers.items():
            by_act.setdefault(type(layer.adapter.act), {})[t] = layer
        self.acts = nn.ModuleList()
        for i, group in enumerate(by_act.values()):
            first = next(iter(group.values())).adapter
            hidden, dim = max(g.adapter.down.out_features for g in group.values()), first.down.in_features
            kw = {"device": first.down.weight.device, "dtype": first.down.weight.dtype}
            dw, db = torch.zeros(num_tasks, hidden, dim, **kw), torch.zeros(num_tasks, hidden, **kw)
            uwt, ub = torch.zeros(num_tasks, hidden, dim, **kw), torch.zeros(num_tasks, dim, **kw)
            with torch.no_grad():
                for t, layer in group.items():
                    ad, s, h = layer.adapter, layer.scale, layer.adapter.down.out_features
                    dw[t, :h], db[t, :h] = ad.down.weight, ad.down.bias
                    uwt[t, :h], ub[t] = ad.up.weight.t() * s, ad.up.bias * s
            for name, stack in (("dw", dw), ("db", db), ("uwt", uwt), ("ub", ub)):
                self.register_buffer(f"{name}{i}", stack, persistent=False)
            self.acts.append(first.act)

    def forward(self, x: torch.Tensor | None, y: torch.Tensor, task: torch.Tensor) -> torch.Tensor:
        rows = y.shape[0]
        src = (x if self.on_input else y).reshape(rows, -1, y.shape[-1])
        deltas = []
        for i, act in enumerate(self.acts):
            dw, db, uwt, ub = (self.get_buffer(f"{name}{i}") for name in ("dw", "db", "uwt", "ub"))
            h = act(torch.baddbmm(db[task].unsqueeze(1), src, dw[task].transpose(1, 2)))
            deltas.append(torch.baddbmm(ub[task].unsqueeze(1), h, uwt[task]))
        y3 = y.view(rows, -1, y.shape[-1])
        for d in deltas:  # computed first: a sequential adapter reads y
            y3.add_(d)
        return y
