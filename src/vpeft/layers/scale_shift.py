"""Per-channel scale and shift of a layer's output (SSF, Lian et al., NeurIPS 2022)."""

from __future__ import annotations

import torch
from torch import nn

from .base import Wrapper

__all__ = ["ScaleShift", "channel_dim_of"]

_CHANNEL_LAST = (nn.Linear, nn.LayerNorm)
_CHANNEL_FIRST = (nn.Conv2d,)


def _channel_first_norm(module: nn.Module) -> bool:
    try:  # timm's LayerNorm2d subclasses nn.LayerNorm but normalises the channels of an NCHW map
        from timm.layers import LayerNorm2d
    except ImportError:  # pragma: no cover - timm is a dependency
        return False
    return isinstance(module, LayerNorm2d)


def channel_dim_of(module: nn.Module) -> int | None:
    """Output channel dimension of a supported layer (-1: Linear/LayerNorm, 1: Conv2d/LayerNorm2d), else None."""
    if isinstance(module, _CHANNEL_FIRST) or _channel_first_norm(module):
        return 1
    if isinstance(module, _CHANNEL_LAST):
        return -1
    return None


def _num_channels(module: nn.Module) -> int:
    if isinstance(module, nn.Linear):
        return module.out_features
    if isinstance(module, nn.Conv2d):
        return module.out_channels
    return int(module.normalized_shape[-1])


_PLAIN = (nn.Linear, nn.Conv2d, nn.LayerNorm)  # their backward never reads their own output
_MIN_SCALE = 1e-3  # below this |gamma|, the input is saved instead of being recomputed from the output


class _ScaleShiftFn(torch.autograd.Function):
    """``out = y * gamma + beta`` that saves ``out`` (not ``y``) for backward and may run in place on ``y``.

    Used on token layers (channel-last) that no other wrapper wraps; the output must not be modified in
    place later (autograd would raise), which holds for the transformer blocks vpeft adapts. The gradient of
    ``gamma`` needs ``y``; autograd's ``y * gamma + beta`` saves it although the next layer already saves
    ``out`` (GELU, attention, the next SSF), so every SSF held a second copy of an activation. Here
    ``sum(g * y) = (sum(g * out) - beta * sum(g)) / gamma`` is computed from ``out``, whose storage the next
    layer's saved tensor shares. With ``inplace`` the output overwrites ``y`` (callers pass it only for the
    fresh output of a layer whose backward does not read its output). When some ``|gamma| < 1e-3`` the
    division would be ill-conditioned, and ``y`` is saved as autograd would.
    """

    @staticmethod
    def forward(ctx, y, scale, shift, channel_dim: int, inplace: bool):
        shape = [1] * y.ndim
        shape[channel_dim] = -1
        s, b = scale.view(shape), shift.view(shape)
        recompute = bool(scale.detach().abs().min() >= _MIN_SCALE)
        if recompute and inplace:
            ctx.mark_dirty(y)
            out = y.mul_(s).add_(b)
        else:
            out = torch.addcmul(b, y, s)
        ctx.save_for_backward(out if recompute else y, scale, shift)
        ctx.recompute, ctx.shape = recompute, shape
        ctx.dims = [d for d in range(y.ndim) if d != channel_dim % y.ndim]
        return out

    @staticmethod
    def backward(ctx, g):
        t, scale, shift = ctx.saved_tensors
        s = scale.view(ctx.shape)
        grad_y = g * s if ctx.needs_input_grad[0] else None
        grad_shift = g.sum(ctx.dims) if ctx.needs_input_grad[1] or ctx.needs_input_grad[2] else None
        grad_scale = None
        if ctx.needs_input_grad[1]:
            gt = (g * t).sum(ctx.dims)
            grad_scale = (gt - shift * grad_shift) / scale if ctx.recompute else gt
        return grad_y, grad_scale, grad_shift if ctx.needs_input_grad[2] else None, None, None


class _NormScaleShiftFn(torch.autograd.Function):
    """``out = norm(x) * gamma + beta`` for a frozen token LayerNorm, saving only the norm's input ``x``.

    A LayerNorm's backward needs its input, so autograd keeps ``x`` anyway; the gradient of ``gamma`` needs the
    norm's output ``y``, which :class:`_ScaleShiftFn` keeps as ``out`` (nobody else does: the next Linear is
    frozen). Here backward recomputes ``y = norm(x)`` from ``x`` (one more elementwise pass over the tokens) and
    runs the norm's own backward on it, so one activation per norm is kept instead of two. The forward is the
    same ops as the norm followed by the scale-shift, so outputs are bit-identical; the gradient of ``gamma`` is
    ``sum(g * y)`` itself (no division by ``gamma``).
    """

    @staticmethod
    def forward(ctx, x, scale, shift, norm: nn.Module, inplace: bool):
        y = norm(x)
        out = y.mul_(scale).add_(shift) if inplace else torch.addcmul(shift, y, scale)
        ctx.save_for_backward(x, scale)
        ctx.norm = norm
        return out

    @staticmethod
    def backward(ctx, g):
        x, scale = ctx.saved_tensors
        dims = list(range(g.ndim - 1))
        with torch.enable_grad():
            xd = x.detach().requires_grad_(ctx.needs_input_grad[0])
            y = ctx.norm(xd)
        grad_x = torch.autograd.grad(y, xd, g * scale)[0] if ctx.needs_input_grad[0] else None
        grad_scale = (g * y.detach()).sum(dims) if ctx.needs_input_grad[1] else None
        grad_shift = g.sum(dims) if ctx.needs_input_grad[2] else None
        return grad_x, grad_scale, grad_shift, None, None


class _LinearScaleShiftFn(torch.autograd.Function):
    """``out = linear(x) * gamma + beta`` for a frozen ``nn.Linear``, saving only the linear's input ``x``.

    :class:`_ScaleShiftFn` keeps ``out`` for the gradient of ``gamma``; after a timm attention's output projection
    nobody else keeps it (a residual add follows), while ``x`` -- the fused attention's output -- is already kept by
    the attention's backward (``scaled_dot_product_attention`` saves its output; the head merge is a view of it).
    Here backward recomputes ``y = linear(x)`` (one GEMM the size of the projection's forward) and takes
    ``sum(g * y)`` directly, so the projection's scale-shift keeps no activation of its own. Chosen per module by
    the SSF method (:attr:`ScaleShift.recompute_base`), only where ``x`` is that shared tensor; with ``in ==
    out`` features saving ``x`` never costs more than saving ``out``. The forward is today's ops (the linear, then
    ``mul_``/``add_`` in place), so outputs are bit-identical.
    """

    @staticmethod
    def forward(ctx, x, scale, shift, linear: nn.Module):
        out = linear(x).mul_(scale).add_(shift)
        ctx.save_for_backward(x, scale)
        ctx.linear = linear
        return out

    @staticmethod
    def backward(ctx, g):
        x, scale = ctx.saved_tensors
        dims = list(range(g.ndim - 1))
        grad_x = torch.matmul(g * scale, ctx.linear.weight) if ctx.needs_input_grad[0] else None
        grad_scale = None
        if ctx.needs_input_grad[1]:
            with torch.no_grad():
                grad_scale = (g * ctx.linear(x)).sum(dims)
        grad_shift = g.sum(dims) if ctx.needs_input_grad[2] else None
        return grad_x, grad_scale, grad_shift, None


class ScaleShift(Wrapper):
    """``y = f(x) * gamma + beta`` per output channel.

    Initialisation follows the official SSF code: ``gamma ~ N(1, 0.02)``, ``beta ~ N(0, 0.02)``
    (so SSF is *not* the identity at initialisation). Being linear in the output, it folds into the
    preceding Linear / Conv2d / LayerNorm: ``W' = diag(gamma) W``, ``b' = gamma * b + beta``.
    """

    mergeable = True
    stackable = True
    #: recompute a frozen Linear base's output in backward from its input instead of keeping the output
    #: (:class:`_LinearScaleShiftFn`); set by the SSF method where another op keeps that input anyway
    recompute_base: bool = False

    def __init__(self, base_layer: nn.Module, init_std: float = 0.02) -> None:
        super().__init__(base_layer)
        dim = channel_dim_of(base_layer)
        if dim is None:
            raise TypeError(f"ScaleShift cannot wrap {type(base_layer).__name__}")
        self.channel_dim = dim
        p = next(base_layer.parameters())
        c = _num_channels(base_layer)
        self.scale = nn.Parameter(torch.empty(c, device=p.device, dtype=p.dtype))
        self.shift = nn.Parameter(torch.empty(c, device=p.device, dtype=p.dtype))
        nn.init.normal_(self.scale, mean=1.0, std=init_std)
        nn.init.normal_(self.shift, mean=0.0, std=init_std)

    def _view(self, t: torch.Tensor, ndim: int) -> torch.Tensor:
        if self.channel_dim == -1:
            return t
        shape = [1] * ndim
        shape[self.channel_dim] = -1
        return t.view(shape)

    def _recomputes_norm(self, x: torch.Tensor) -> bool:
        """Whether the norm's output is recomputed in backward (:class:`_NormScaleShiftFn`): a frozen token
        LayerNorm no other wrapper wraps, outside autocast (backward would recompute in another dtype)."""
        base = self.base_layer
        return (
            self.channel_dim == -1
            and not self.wrapped
            and isinstance(base, nn.LayerNorm)
            and torch.is_grad_enabled()
            and (self.scale.requires_grad or self.shift.requires_grad)
            and not any(p.requires_grad for p in base.parameters())
            and not torch.is_autocast_enabled(x.device.type)
        )

    def _recomputes_linear(self, x: torch.Tensor) -> bool:
        """Whether :class:`_LinearScaleShiftFn` applies: :attr:`recompute_base` on a frozen plain Linear no other
        wrapper wraps, gradients on, outside autocast."""
        base = self.base_layer
        return (
            self.recompute_base
            and not self.wrapped
            and type(base) is nn.Linear
            and torch.is_grad_enabled()
            and (self.scale.requires_grad or self.shift.requires_grad)
            and not any(p.requires_grad for p in base.parameters())
            and not torch.is_autocast_enabled(x.device.type)
            and x.dtype == base.weight.dtype
        )

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if not args and not kwargs and self._recomputes_linear(x):
            return _LinearScaleShiftFn.apply(x, self.scale, self.shift, self.base_layer)
        if not args and not kwargs and self._recomputes_norm(x):
            inplace = type(self.base_layer) in _PLAIN
            return _NormScaleShiftFn.apply(x, self.scale, self.shift, self.base_layer, inplace)
        y = self.base_layer(x, *args, **kwargs)
        inplace = type(self.base_layer) in _PLAIN  # a fresh output its own backward does not read
        if (self.channel_dim != -1 or self.wrapped) and torch.is_grad_enabled():
            # feature maps: CNNs modify outputs in place downstream (SiLU(inplace=True), BatchNormAct), and an
            # outer wrapper (fused LoRA) adds into this output in place, so the output cannot be what backward
            # reads; plain autograd saves the input
            s, b = self._view(self.scale, y.ndim), self._view(self.shift, y.ndim)
            return y * s + b
        if torch.is_grad_enabled() and (self.scale.requires_grad or self.shift.requires_grad):
            return _ScaleShiftFn.apply(y, self.scale, self.shift, self.channel_dim, inplace)
        s, b = self._view(self.scale, y.ndim), self._view(self.shift, y.ndim)
        return y.mul_(s).add_(b) if inplace and not y.requires_grad else torch.addcmul(b, y, s)

    def apply_delta(self, x: torch.Tensor | None, y: torch.Tensor) -> torch.Tensor:
        return y.mul_(self._view(self.scale, y.ndim)).add_(self._view(self.shift, y.ndim))

    @classmethod
    def stack_deltas(cls, layers, num_tasks: int) -> nn.Module:
        return _ScaleShiftStack(layers, num_tasks)

    @torch.no_grad()
    def merge_into_base(self) -> None:
        base = self.base_layer
        if isinstance(base, nn.LayerNorm) and base.weight is None:
            raise TypeError("ScaleShift cannot merge into a LayerNorm without elementwise affine parameters")
        w = base.weight
        w.mul_(self.scale.view([-1] + [1] * (w.ndim - 1)))
        if base.bias is None:
            base.bias = nn.Parameter(torch.zeros_like(self.shift), requires_grad=False)
        base.bias.mul_(self.scale).add_(self.shift)


class _ScaleShiftStack(nn.Module):
    """Every task's SSF of one layer, stacked (scale 1 and shift 0 for tasks without one): ``y = y * g[task] + b[task]``
    row by row. Non-persistent buffers."""

    def __init__(self, layers, num_tasks: int) -> None:
        super().__init__()
        first = next(iter(layers.values()))
        self.channel_dim = first.channel_dim
        scale = torch.ones(num_tasks, first.scale.shape[0], device=first.scale.device, dtype=first.scale.dtype)
        shift = torch.zeros_like(scale)
        with torch.no_grad():
            for t, layer in layers.items():
                scale[t], shift[t] = layer.scale, layer.shift
        self.register_buffer("scale", scale, persistent=False)
        self.register_buffer("shift", shift, persistent=False)

    def _rows(self, t: torch.Tensor, ndim: int) -> torch.Tensor:
        if self.channel_dim == 1:
            return t.view(t.shape[0], t.shape[1], *[1] * (ndim - 2))
        return t.view(t.shape[0], *[1] * (ndim - 2), t.shape[1])

    def forward(self, x: torch.Tensor | None, y: torch.Tensor, task: torch.Tensor) -> torch.Tensor:
        return y.mul_(self._rows(self.scale[task], y.ndim)).add_(self._rows(self.shift[task], y.ndim))
