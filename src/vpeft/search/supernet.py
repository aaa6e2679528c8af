"""Weight-sharing supernets for the structure searches of NOAH and GLoRA.

A supernet is a frozen backbone whose modules are wrapped by *super layers*: each holds the largest tensors of
its search space and runs whichever size the current subnet asks for, reading a slice of those tensors. They are
the real layers (subclasses of :class:`~vpeft.layers.LoRALinear`, :class:`~vpeft.layers.SequentialAdapter` and
:class:`~vpeft.layers.PromptedBlock`) with an active size, so the math lives there once (a LoRA
of rank k uses the first k rows of ``A`` and the first k columns of ``B``; an adapter of width k the first k
hidden units; k prompts the first k prompt tokens; GLoRA's forms read the shared factors, see
:class:`~vpeft.layers.glora.GLoRASuperLinear`). :class:`Supernet` injects them, freezes everything but the
super layers and the head, and -- while the model is in training mode -- activates a uniformly sampled subnet
before every forward pass (one subnet per batch, as NOAH's and GLoRA's supernet training), so the ordinary
:func:`vpeft.train.train` loop trains it. :func:`transfer_weights` copies a subnet's slice into a model adapted
with the exported config (the weight-sharing identity the tests check).
"""

from __future__ import annotations

import random
from typing import Any

import torch
from torch import nn

from ..arch import get_spec
from ..errors import ConfigError
from ..layers import LoRALinear, PromptedBlock, SequentialAdapter, Wrapper
from ..layers.glora import GLoRALinear, GLoRASuperLinear
from ..state import is_adapted
from .space import SearchSpace

__all__ = ["SuperLoRA", "SuperAdapter", "SuperPromptedBlock", "Supernet", "transfer_weights", "SUPER_LAYERS"]


class SuperLoRA(LoRALinear):
    """LoRA of rank ``active`` <= ``max_r`` on a frozen Linear: ``y = W x + b + B[:, :k] A[:k] x`` (scale 1).

    A :class:`~vpeft.layers.LoRALinear` of rank ``max_r`` (one slice, ``alpha = max_r``) whose forward pass
    reads the first ``active`` rows of ``A`` and columns of ``B`` (:meth:`factors`); initialised as that layer
    (``A`` Kaiming-uniform: its bound depends only on the input width, so every slice is initialised as a LoRA
    of that rank would be; ``B`` zero).
    """

    def __init__(self, base_layer: nn.Linear, max_r: int) -> None:
        super().__init__(base_layer, max_r, float(max_r))
        self.max_r, self.active = max_r, max_r

    def factors(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        k = self.active
        return [self.lora_A[0][:k]], [self.lora_B[0][:, :k]]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) if self.active else self.base_layer(x)

    @torch.no_grad()
    def export_to(self, sub: LoRALinear) -> None:
        if len(sub.slices) != 1 or sub.scaling != 1.0:
            raise ValueError("SuperLoRA exports to a single-slice LoRALinear with scale 1 (alpha = r)")
        k = sub.r
        sub.lora_A[0].copy_(self.lora_A[0][:k])
        sub.lora_B[0].copy_(self.lora_B[0][:, :k])

    def extra_repr(self) -> str:
        return f"max_r={self.max_r}, active={self.active}"


class SuperAdapter(SequentialAdapter):
    """Sequential adapter of width ``active`` <= ``max_dim`` after a sub-layer: ``y + up(gelu(down(y)))``.

    A :class:`~vpeft.layers.SequentialAdapter` of the largest width (scale 1) whose
    :class:`~vpeft.layers.Bottleneck` runs its first ``active`` hidden units (``Bottleneck.active``); 0: no adapter.
    """

    def __init__(self, base_layer: nn.Module, dim: int, max_dim: int, act: str = "gelu") -> None:
        super().__init__(base_layer, dim, max_dim, act, scale=1.0)
        self.max_dim = max_dim

    @property
    def active(self) -> int:
        return self.max_dim if self.adapter.active is None else self.adapter.active

    @active.setter
    def active(self, k: int) -> None:
        self.adapter.active = k

    def forward(self, *args, **kwargs) -> torch.Tensor:
        return super().forward(*args, **kwargs) if self.active else self.base_layer(*args, **kwargs)

    @torch.no_grad()
    def export_to(self, sub: SequentialAdapter) -> None:
        k, a, b = sub.adapter.down.out_features, self.adapter, sub.adapter
        b.down.weight.copy_(a.down.weight[:k])
        b.down.bias.copy_(a.down.bias[:k])
        b.up.weight.copy_(a.up.weight[:, :k])
        b.up.bias.copy_(a.up.bias)

    def extra_repr(self) -> str:
        return f"max_dim={self.max_dim}, active={self.active}"


class SuperPromptedBlock(PromptedBlock):
    """A block with up to ``max_prompts`` VPT-Deep prompts; the controller sets, per subnet, how many prompts come
    in (``in_prompts``), how many new ones replace them (``new_prompts``, 0: keep) and whether to ``strip`` them
    after the block. A :class:`~vpeft.layers.PromptedBlock` of ``max_prompts`` tokens that puts in the first
    ``new_prompts`` of them (:meth:`active_prompt`)."""

    def __init__(
        self, base_layer: nn.Module, num_prefix_tokens: int, dim: int, max_prompts: int, bound: float, dropout: float
    ) -> None:
        super().__init__(base_layer, num_prefix_tokens, 0, max_prompts, dim, bound, strip=False, dropout=dropout)
        self.max_prompts, self.new_prompts = max_prompts, 0

    def active_prompt(self) -> torch.Tensor | None:
        return self.prompt[: self.new_prompts] if self.new_prompts else None

    @torch.no_grad()
    def export_to(self, sub: PromptedBlock) -> None:
        if sub.prompt is not None:
            sub.prompt.copy_(self.prompt[: sub.prompt.shape[0]])

    def extra_repr(self) -> str:
        return f"max_prompts={self.max_prompts}, in={self.in_prompts}, new={self.new_prompts}, strip={self.strip}"


#: super layer class -> the subnet wrapper class it exports to
SUPER_LAYERS: dict[type[Wrapper], type[Wrapper]] = {
    SuperLoRA: LoRALinear,
    SuperAdapter: SequentialAdapter,
    SuperPromptedBlock: PromptedBlock,
    GLoRASuperLinear: GLoRALinear,
}


def _strip(name: str) -> str:
    return name.replace(".base_layer", "")


class Supernet:
    """A backbone turned into a weight-sharing supernet of ``space``.

    Everything but the super layers and the classification head is frozen. While ``sampling`` is on and the model
    is in training mode, a forward pre-hook activates ``space.random(rng)`` before every forward pass; call
    :meth:`activate` to run one subnet (e.g. for evaluation in the search).
    """

    def __init__(self, model: nn.Module, space: SearchSpace, seed: int = 0) -> None:
        if is_adapted(model):
            raise ConfigError("the supernet needs a fresh backbone; this one already has a vpeft method applied")
        spec = get_spec(model)
        if spec.kind != "vit":
            raise ConfigError(f"the {space.name} search needs a ViT backbone, got a {spec.family} ({spec.kind})")
        self.model, self.space, self.spec = model, space, spec
        model.requires_grad_(False)
        self.layers = space.inject_supernet(model, spec)
        for module in model.modules():
            if isinstance(module, Wrapper):
                for _, p in module.delta_parameters():
                    p.requires_grad_(True)
        if not spec.head:
            raise ConfigError("the supernet needs a classification head (create the backbone with num_classes > 0)")
        model.get_submodule(spec.head).requires_grad_(True)
        self.rng = random.Random(seed)
        self.sampling = True
        self.current: Any = None
        self._hook = model.register_forward_pre_hook(self._sample)

    def _sample(self, module: nn.Module, args: Any) -> None:
        if module.training and self.sampling:
            self.activate(self.space.random(self.rng))

    def activate(self, cand: Any) -> None:
        """Run the subnet ``cand`` from now on."""
        self.space.activate(self.layers, cand)
        self.current = cand

    def trainable(self) -> int:
        return sum(p.numel() for p in self.model.parameters() if p.requires_grad)

    def close(self) -> None:
        """Remove the sampling hook."""
        self._hook.remove()


@torch.no_grad()
def transfer_weights(supernet_model: nn.Module, subnet_model: nn.Module) -> list[str]:
    """Copy the supernet's shared weights into a model adapted with an exported subnet config (and the head).

    Every wrapper of ``subnet_model`` is matched to the super layer wrapping the same module; returns the names.
    """
    supers = {_strip(n): m for n, m in supernet_model.named_modules() if type(m) in SUPER_LAYERS}
    done = []
    for name, module in subnet_model.named_modules():
        if not isinstance(module, Wrapper) or type(module) not in SUPER_LAYERS.values():
            continue
        sup = supers.get(_strip(name))
        if sup is None or SUPER_LAYERS[type(sup)] is not type(module):
            raise ConfigError(f"no super layer of the supernet matches {type(module).__name__} at {_strip(name)}")
        sup.export_to(module)
        done.append(_strip(name))
    head = get_spec(subnet_model).head
    if head:
        subnet_model.get_submodule(head).load_state_dict(supernet_model.get_submodule(head).state_dict())
    return done
