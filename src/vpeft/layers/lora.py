"""Low-rank update of a linear layer (Hu et al., 2021), with per-slice adapters for fused layers.

The forward/backward pass of a LoRA linear over a frozen base is one custom autograd function
(:class:`FusedLoRAFunction`): the low-rank terms go into the base GEMMs (through a temporary merged
weight) or are accumulated in place into the output and the input gradient, the scale is folded into the
GEMMs' ``alpha`` and only the input is saved (``x A^T`` is recomputed in backward). This brings LoRA on wide
targets close to the cost of backpropagating through the frozen backbone; see ``benchmarks/bench_step.py``.

Shared inputs: the input of a wrapped layer is often the output of a frozen LayerNorm or GELU (timm's ``norm1``
before ``qkv``, ``norm2`` before ``fc1``, ``act`` before ``fc2``), whose own backward keeps *its* input. With
:func:`share_inputs` such producers tag their output with (producer, its input); the fused function then saves
the producer's input -- the storage the producer's backward keeps anyway -- and recomputes the producer's output
in backward (one elementwise pass), so LoRA adds no activation of its own. The recomputation runs the same op on
the same tensor, so outputs and gradients are bit-identical to saving the input.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.autograd.function import once_differentiable
from torch.nn import functional as F

from .._modules import tensor_versions
from .base import Wrapper

__all__ = ["LoRALinear", "FusedLoRAFunction", "fused_lora_linear", "share_inputs", "SOURCE_ATTR"]

SOURCE_ATTR = "vpeft_lora_source"
"""Attribute a tagged producer sets on its output: ``(producer, its input, the output's version)``."""
_PRODUCERS = (nn.LayerNorm, nn.GELU)  # deterministic ops whose backward keeps their input


def _tag_output(module: nn.Module, args: tuple, output) -> None:
    """Forward hook of a producer: tag ``output`` with the input its backward keeps anyway (see the module doc).

    Only when autograd keeps that input -- gradients on, the input requires grad, the producer is frozen -- so the
    tag's reference never keeps a tensor alive that would have been freed."""
    if not torch.is_grad_enabled() or len(args) != 1 or not isinstance(output, torch.Tensor):
        return
    (inp,) = args
    if not isinstance(inp, torch.Tensor) or not inp.requires_grad or inp.dtype != output.dtype:
        return
    if any(p.requires_grad for p in module.parameters()):
        return
    setattr(output, SOURCE_ATTR, (module, inp, tensor_versions([output])[0]))


def share_inputs(model: nn.Module) -> int:
    """Tag the outputs of ``model``'s LayerNorm and GELU modules (a forward hook; idempotent) so a fused LoRA
    layer reading them saves their input instead (no activation of its own); returns how many are tagged."""
    count = 0
    for module in model.modules():
        if isinstance(module, _PRODUCERS) and not isinstance(module, Wrapper):
            if not getattr(module, "vpeft_tags_output", False):
                module.register_forward_hook(_tag_output)
                module.vpeft_tags_output = True
            count += 1
    return count


def _source_of(x: torch.Tensor) -> tuple[nn.Module, torch.Tensor] | None:
    """``(producer, its input)`` when ``x`` is a tagged producer output not modified in place since, else None."""
    tag = getattr(x, SOURCE_ATTR, None)
    if tag is None or tag[2] != tensor_versions([x])[0]:
        return None
    return tag[0], tag[1]


def _gemm(a: torch.Tensor, b: torch.Tensor, scale: float) -> torch.Tensor:
    """``scale * a @ b`` with the scale folded into the GEMM (no extra pass when it is 1)."""
    if scale == 1.0:
        return torch.mm(a, b)
    return torch.addmm(a.new_empty(a.shape[0], b.shape[1]), a, b, beta=0.0, alpha=scale)


def _cat(lora_a) -> torch.Tensor:
    """``[A_1; ...; A_k]`` (no copy for one slice)."""
    return lora_a[0] if len(lora_a) == 1 else torch.cat(lora_a)


def _merged_weight(weight: torch.Tensor, lora_a, lora_b, slices, scale: float) -> torch.Tensor:
    """A temporary ``W + s * pad(B A)`` (the frozen ``weight`` is not modified)."""
    merged = weight.clone()
    for i, (start, stop) in enumerate(slices):
        merged[start:stop].addmm_(lora_b[i], lora_a[i], alpha=scale)
    return merged


class FusedLoRAFunction(torch.autograd.Function):
    """``y = x W^T + b + s * sum_i pad_i(B_i A_i h)`` for a frozen ``W``, ``b``; gradients for ``x``, ``h``, A, B.

    ``h`` is the input of the low-rank branch: ``None`` means ``x`` itself (no dropout), otherwise the
    dropped-out ``x`` (its gradient is returned separately so autograd applies the dropout mask). Slice
    ``i`` adds ``B_i A_i h`` to the output columns ``slices[i]``. ``W`` and ``b`` get no gradient: use
    the unfused path when they are trainable.

    The low-rank term never costs an output-sized temporary or an extra elementwise pass. Forward: when
    the batch has more rows than ``W`` has input features (training batches), the low-rank term is folded
    into a temporary merged weight ``W + s pad(B A)`` (``out x in``, smaller than one pass over the output)
    and ``y`` is one GEMM; otherwise ``y = x W^T + b`` and every slice adds ``s t_i B_i^T`` in place into
    its columns, ``t = h [A_1; ...; A_k]^T`` (one GEMM). Saved for backward, when an ``A`` or a ``B`` needs a
    gradient: ``h`` (or ``x``; or, given a ``source`` ``(producer, inp)`` with ``x = producer(inp)``, ``inp``,
    from which backward recomputes ``x``); ``t`` is recomputed in backward (one thin GEMM, the same as forward's).
    Backward: ``u_i = g[:, slice_i] B_i``; ``dx = g W + s u A`` -- one GEMM with the merged weight when
    the batch has more rows than ``W`` has outputs, else accumulated in place; ``dA = s u^T h``;
    ``dB_i = s g[:, slice_i]^T t_i``. The scale is the GEMMs' ``alpha`` (no multiply when it is 1), and
    each thin GEMM is written in the operand layout BLAS runs fastest (e.g. ``dB_i^T = t_i^T g_i``
    rather than ``g_i^T t_i``, several times slower on CPU).
    """

    @staticmethod
    def forward(ctx, x, h, weight, bias, scaling, slices, source, *lora):  # noqa: D102 (documented on the class)
        k = len(slices)
        lora_a, lora_b = lora[:k], lora[k:]
        need_a, need_b = any(ctx.needs_input_grad[7 : 7 + k]), any(ctx.needs_input_grad[7 + k :])
        in_features, out_features = weight.shape[1], weight.shape[0]
        x2 = x.reshape(-1, in_features)
        src = x2 if h is None else h.reshape(-1, in_features)
        fold = h is None and x2.shape[0] > in_features
        w = _merged_weight(weight, lora_a, lora_b, slices, scaling) if fold else weight
        y = torch.mm(x2, w.t()) if bias is None else torch.addmm(bias, x2, w.t())
        if not fold:
            t, r = torch.mm(src, _cat(lora_a).t()), lora_a[0].shape[0]
            for i, (start, stop) in enumerate(slices):
                y[:, start:stop].addmm_(t[:, i * r : (i + 1) * r], lora_b[i].t(), alpha=scaling)
        ctx.source = None if h is not None or source is None else source[0]
        keep = (src if ctx.source is None else source[1]) if need_a or need_b else None
        ctx.save_for_backward(keep, weight, *lora)
        ctx.scaling, ctx.slices, ctx.x_shape, ctx.has_h = scaling, slices, x.shape, h is not None
        return y.view(*x.shape[:-1], out_features)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y):  # noqa: D102
        src, weight, *lora = ctx.saved_tensors
        k, s, slices = len(ctx.slices), ctx.scaling, ctx.slices
        lora_a, lora_b = lora[:k], lora[k:]
        need_x, need_h = ctx.needs_input_grad[0], ctx.has_h and ctx.needs_input_grad[1]
        need_a = any(ctx.needs_input_grad[7 : 7 + k])
        r = lora_a[0].shape[0]
        g = grad_y.reshape(-1, weight.shape[0])
        fold = not ctx.has_h and g.shape[0] > weight.shape[0]
        a_cat = _cat(lora_a)
        if src is not None and ctx.source is not None:  # the producer's output, recomputed from its input
            with torch.no_grad():
                src = ctx.source(src)
        src = None if src is None else src.reshape(-1, weight.shape[1])
        t = torch.mm(src, a_cat.t()) if any(ctx.needs_input_grad[7 + k :]) else None  # as in forward
        u_t = None
        if need_a or need_h or (need_x and not fold):
            # u^T = [B_i^T g_i^T] (k r x N), written row block by row block: the fast layouts of BLAS
            u_t = g.new_empty(k * r, g.shape[0])
            for i, (a, b) in enumerate(slices):
                torch.mm(lora_b[i].t(), g[:, a:b].t(), out=u_t[i * r : (i + 1) * r])
        grad_x = grad_h = None
        if need_x:
            if fold:
                grad_x = torch.mm(g, _merged_weight(weight, lora_a, lora_b, slices, s))
            else:
                grad_x = torch.mm(g, weight)
                if not ctx.has_h:
                    grad_x.addmm_(u_t.t(), a_cat, alpha=s)
            grad_x = grad_x.view(ctx.x_shape)
        if need_h:
            grad_h = _gemm(u_t.t(), a_cat, s).view(ctx.x_shape)
        grads_a: list[torch.Tensor | None] = [None] * k
        grads_b: list[torch.Tensor | None] = [None] * k
        if need_a:
            grad_a_cat = _gemm(u_t, src, s)
            grads_a = [grad_a_cat[i * r : (i + 1) * r] for i in range(k)]
        for i, (a, b) in enumerate(slices):
            if ctx.needs_input_grad[7 + k + i]:  # dB_i^T = s t_i^T g_i: the fast layout, transposed back
                grads_b[i] = _gemm(t[:, i * r : (i + 1) * r].t(), g[:, a:b], s).t()
        return grad_x, grad_h, None, None, None, None, None, *grads_a, *grads_b


def fused_lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_a: list[torch.Tensor],
    lora_b: list[torch.Tensor],
    scaling: float,
    slices: list[tuple[int, int]],
    h: torch.Tensor | None = None,
    source: tuple[nn.Module, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Functional form of :class:`FusedLoRAFunction` (``h``: dropped-out input of the branch, default ``x``;
    ``source``: ``(producer, inp)`` with ``x == producer(inp)`` bit for bit, saved instead of ``x``)."""
    return FusedLoRAFunction.apply(x, h, weight, bias, float(scaling), tuple(slices), source, *lora_a, *lora_b)


class LoRALinear(Wrapper):
    """``y = W x + b + (alpha / r) * B A x`` on chosen output slices of a frozen ``nn.Linear``.

    ``slices`` lists ``(start, stop)`` ranges of output features, each with its own ``A`` (r x in)
    and ``B`` (width x r) pair. A fused timm ``qkv`` projection adapted on q and v only uses the
    slices ``[(0, d), (2d, 3d)]``: the k rows receive no update, exactly as separate q and v
    projections would. ``A`` is Kaiming-uniform and ``B`` zero (the paper's initialisation), so the
    layer is the identity map of its base at initialisation.

    The forward pass uses :class:`FusedLoRAFunction` whenever it applies (a plain frozen ``nn.Linear``
    base, no autocast, one dtype); otherwise, or with ``fused = False`` (class or instance attribute),
    the reference :meth:`forward_unfused`. Both compute the same function.
    """

    mergeable = True
    fused: bool = True

    def __init__(
        self,
        base_layer: nn.Linear,
        r: int,
        alpha: float,
        dropout: float = 0.0,
        slices: list[tuple[int, int]] | None = None,
    ) -> None:
        super().__init__(base_layer)
        self.r, self.scaling = r, alpha / r
        self.slices = [tuple(s) for s in (slices or [(0, base_layer.out_features)])]
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        w = base_layer.weight
        self.lora_A = nn.ParameterList(
            nn.Parameter(torch.empty(r, base_layer.in_features, device=w.device, dtype=w.dtype)) for _ in self.slices
        )
        self.lora_B = nn.ParameterList(
            nn.Parameter(torch.zeros(stop - start, r, device=w.device, dtype=w.dtype)) for start, stop in self.slices
        )
        for a in self.lora_A:
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))

    def _fusable(self, x: torch.Tensor) -> bool:
        base = self.base_layer
        if not self.fused or type(base) is not nn.Linear or base.weight.requires_grad:
            return False
        if base.bias is not None and base.bias.requires_grad:
            return False
        if torch.is_autocast_enabled(x.device.type):
            return False
        dtype = base.weight.dtype
        return x.dtype == dtype and all(p.dtype == dtype for p in (*self.lora_A, *self.lora_B))

    def factors(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """The ``A`` and ``B`` of every slice that the forward pass uses (a supernet's LoRA returns slices of
        them: :class:`vpeft.search.supernet.SuperLoRA`)."""
        return list(self.lora_A), list(self.lora_B)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self._fusable(x):
            return self.forward_unfused(x)
        h = self.dropout(x)
        base = self.base_layer
        lora_a, lora_b = self.factors()
        h = None if h is x else h
        source = _source_of(x)  # ignored with dropout: the branch reads h, not x
        return fused_lora_linear(x, base.weight, base.bias, lora_a, lora_b, self.scaling, self.slices, h, source)

    def forward_unfused(self, x: torch.Tensor) -> torch.Tensor:
        """The reference implementation: base output plus each slice's scaled low-rank term (plain autograd)."""
        y = self.base_layer(x)
        h = self.dropout(x)
        for (start, stop), a, b in zip(self.slices, *self.factors()):
            # add_ on the slice: `y[...] += ...` writes back via __setitem__, which fails when y is an autograd
            # leaf (a frozen first layer such as a Hugging Face q_proj) and the slice spans all of y
            y[..., start:stop].add_(F.linear(F.linear(h, a), b) * self.scaling)
        return y

    @torch.no_grad()
    def merge_into_base(self) -> None:
        w = self.base_layer.weight
        for (start, stop), a, b in zip(self.slices, *self.factors()):
            w[start:stop] += (b @ a) * self.scaling

    # ---- the per-sample protocol (Wrapper.apply_delta)
    delta_reads_input = True

    def apply_delta(self, x: torch.Tensor | None, y: torch.Tensor) -> torch.Tensor:
        """``y[:, slice_i] += s (x A_i^T) B_i^T`` in place: one GEMM for ``x [A_1; ...; A_k]^T``, one per slice."""
        lora_a, lora_b = self.factors()
        h = self.dropout(x)
        t = torch.mm(h.reshape(-1, h.shape[-1]), (lora_a[0] if len(lora_a) == 1 else torch.cat(lora_a)).t())
        y2, r = y.view(-1, y.shape[-1]), lora_a[0].shape[0]
        for i, ((start, stop), b) in enumerate(zip(self.slices, lora_b)):
            y2[:, start:stop].addmm_(t[:, i * r : (i + 1) * r], b.t(), alpha=self.scaling)
        return y

    def merged_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """A temporary ``W + s pad(B A)``, written in one pass over ``weight`` (which is not modified)."""
        lora_a, lora_b = self.factors()
        if len(self.slices) > 1 and any(a[1] > b[0] for a, b in zip(sorted(self.slices), sorted(self.slices)[1:])):
            return _merged_weight(weight, lora_a, lora_b, self.slices, self.scaling)  # overlapping slices
        w, done = torch.empty_like(weight), 0
        for (start, stop), a, b in sorted(zip(self.slices, lora_a, lora_b), key=lambda item: item[0]):
            w[done:start].copy_(weight[done:start])
            torch.addmm(weight[start:stop], b, a, alpha=self.scaling, out=w[start:stop])
            done = stop
        w[done:].copy_(weight[done:])
        return w

    @classmethod
    def stack_deltas(cls, layers, num_tasks: int) -> nn.Module:
        return _LoRAStack(layers, num_tasks)

    def extra_repr(self) -> str:
        return f"r={self.r}, scaling={self.scaling:g}, slices={self.slices}"


class _LoRAStack(nn.Module):
    """Every task's LoRA of one Linear, stacked (zero-padded to the largest ``k r``) for per-row gathering:
    ``y += (x A[task]^T) BT[task]`` with batched matrix products, ``BT`` the scaled ``B^T`` of every slice placed
    in its output columns. The stacks are non-persistent buffers (``.to()`` moves them)."""

    def __init__(self, layers, num_tasks: int) -> None:
        super().__init__()
        first = next(iter(layers.values()))
        a0 = first.factors()[0][0]
        out = max(stop for layer in layers.values() for _, stop in layer.slices)
        width = max(len(layer.slices) * layer.factors()[0][0].shape[0] for layer in layers.values())
        kw = {"device": a0.device, "dtype": a0.dtype}
        a_stack = torch.zeros(num_tasks, width, a0.shape[1], **kw)
        bt_stack = torch.zeros(num_tasks, width, out, **kw)
        with torch.no_grad():
            for t, layer in layers.items():
                lora_a, lora_b = layer.factors()
                r = lora_a[0].shape[0]
                for i, ((start, stop), a, b) in enumerate(zip(layer.slices, lora_a, lora_b)):
                    a_stack[t, i * r : (i + 1) * r] = a
                    bt_stack[t, i * r : (i + 1) * r, start:stop] = b.t() * layer.scaling
        self.register_buffer("a", a_stack, persistent=False)
        self.register_buffer("bt", bt_stack, persistent=False)

    def forward(self, x: torch.Tensor, y: torch.Tensor, task: torch.Tensor) -> torch.Tensor:
        rows = y.shape[0]
        t = torch.bmm(x.reshape(rows, -1, x.shape[-1]), self.a[task].transpose(1, 2))
        y.view(rows, -1, y.shape[-1])[..., : self.bt.shape[-1]].baddbmm_(t, self.bt[task])
        return y
