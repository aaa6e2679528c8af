"""Extra learnable keys and values in a frozen attention layer (prefix tuning, E2VPT key-value prompts).

:class:`KVPromptAttention` wraps an attention layer and recomputes its forward from the frozen
sub-modules with ``L`` extra key and value vectors per head placed in front of the layer's own keys
and values. Queries are unchanged, so the output keeps the input's length. The extra tokens are
attention activations (after the key normalisation, when the backbone has one); only they are trained.

Which sub-modules to call is the backbone's business: the arch layer describes the layer with an
:class:`~vpeft.arch.AttentionLayout` (kind ``"fused"``: timm ``Attention`` with ``qkv``, ``q_norm``/``k_norm``,
``norm``, ``gate``, ``proj``; kind ``"separate"``: Hugging Face q/k/v/output projections, returning
``(output, weights)``). The projections are called through their current modules, so wrappers another
method put on them (LoRA on ``q_proj``, ...) keep acting.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from .base import Wrapper, input_of

__all__ = ["KVPromptAttention", "attention_with_kv"]


def _pad_mask(mask: torch.Tensor, extra: int) -> torch.Tensor:
    """Let every query attend to the ``extra`` keys placed in front (bool: True, additive: 0)."""
    shape = (*mask.shape[:-1], extra)
    if mask.dtype == torch.bool:
        pad = torch.ones(shape, dtype=torch.bool, device=mask.device)
    else:
        pad = torch.zeros(shape, dtype=mask.dtype, device=mask.device)
    return torch.cat([pad, mask], dim=-1)


def _prepend(t: torch.Tensor, extra: torch.Tensor) -> torch.Tensor:
    """``extra`` (``[H, L, hd]``) in front of ``t`` (``[B, H, N, hd]``) along the tokens."""
    return torch.cat([extra.unsqueeze(0).expand(t.shape[0], -1, -1, -1).to(t.dtype), t], dim=2)


def _attend(attn: nn.Module, layout, q, k, v, key, value, attn_mask) -> torch.Tensor:
    k, v = _prepend(k, key), _prepend(v, value)
    if attn_mask is not None:
        attn_mask = _pad_mask(attn_mask, key.shape[1])
    drop = layout.dropout if attn.training else 0.0
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=drop, scale=layout.scale)
    b, _, n, _ = out.shape
    return out.transpose(1, 2).reshape(b, n, layout.heads * layout.head_dim)


def _fused(attn: nn.Module, layout, x, key, value, attn_mask) -> torch.Tensor:
    """timm ``Attention.forward`` step by step: fused qkv, q/k norms, attention, norm, gate, proj, proj_drop."""
    b, n, _ = x.shape
    gate = attn.gate(x).sigmoid() if getattr(attn, "gate", None) is not None else None
    qkv = getattr(attn, layout.q)(x).reshape(b, n, 3, layout.heads, layout.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    out = _attend(attn, layout, q, k, v, key, value, attn_mask)
    norm = getattr(attn, "norm", None)
    if norm is not None:
        out = norm(out)
    if gate is not None:
        out = out * gate
    return attn.proj_drop(getattr(attn, layout.out)(out))


def _separate(attn: nn.Module, layout, x, key, value, attn_mask) -> torch.Tensor:
    """Hugging Face attention: separate q/k/v projections, scaled dot-product attention, output projection."""
    shape = (*x.shape[:-1], layout.heads, layout.head_dim)
    q, k, v = (getattr(attn, name)(x).view(shape).transpose(1, 2) for name in (layout.q, layout.k, layout.v))
    return getattr(attn, layout.out)(_attend(attn, layout, q, k, v, key, value, attn_mask))


def attention_with_kv(
    attn: nn.Module,
    layout,
    x: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    is_causal: bool = False,
) -> torch.Tensor:
    """The attention layer ``attn`` (described by ``layout``) on ``x`` (``[B, N, C]``) with ``key``/``value``
    (``[H, L, head_dim]``) prepended to its keys and values; returns ``[B, N, C]``.

    ``attn_mask`` (broadcastable to ``[B, H, N, N]``, bool or additive) is extended so that every query sees the
    extra keys; causal attention is not defined with a prefix and is refused.
    """
    if is_causal:
        raise ValueError("attention with learnable key/value prefixes does not support is_causal=True")
    if layout.kind == "fused":
        return _fused(attn, layout, x, key, value, attn_mask)
    if layout.kind == "separate":
        return _separate(attn, layout, x, key, value, attn_mask)
    raise ValueError(f"unknown attention layout kind {layout.kind!r}; expected 'fused' or 'separate'")


class KVPromptAttention(Wrapper):
    """A frozen attention layer with ``num_tokens`` learnable keys and values per head in front.

    Args:
        base_layer: the attention layer.
        layout: its :class:`~vpeft.arch.AttentionLayout` (from :func:`vpeft.arch.attention_layout`).
        num_tokens: extra keys/values per head (``L``).
        shared: one tensor serves as both keys and values (E2VPT's default); otherwise ``key`` and
            ``value`` are separate.
        dropout: dropout on the extra keys and values (training only).

    The parameters are ``key`` (and ``value``), shaped ``[heads, L, head_dim]`` and left
    uninitialised (zeros): the method initialises them as its paper does. Subclasses may produce
    the tensors differently by overriding :meth:`key_value`.
    """

    def __init__(
        self,
        base_layer: nn.Module,
        layout,
        num_tokens: int,
        *,
        shared: bool = False,
        dropout: float = 0.0,
        params: bool = True,
    ) -> None:
        super().__init__(base_layer)
        self.layout = layout
        heads, head_dim = layout.heads, layout.head_dim
        w = next(base_layer.parameters())
        self.num_tokens, self.shared = num_tokens, shared
        self.key: nn.Parameter | None = None
        self.value: nn.Parameter | None = None
        if params:
            self.key = nn.Parameter(torch.zeros(heads, num_tokens, head_dim, device=w.device, dtype=w.dtype))
            if not shared:
                self.value = nn.Parameter(torch.zeros(heads, num_tokens, head_dim, device=w.device, dtype=w.dtype))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    @property
    def head_shape(self) -> tuple[int, int]:
        """``(heads, head_dim)`` of the wrapped layer."""
        return self.layout.heads, self.layout.head_dim

    def key_value(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The extra keys and values, each ``[heads, L, head_dim]`` (before dropout)."""
        return self.key, self.key if self.value is None else self.value

    def forward(self, *args, **kwargs):
        """timm's ``(x, attn_mask=None, is_causal=False) -> x``; Hugging Face's ``(hidden_states,
        attention_mask=None, **kwargs) -> (output, None)`` (no attention weights are computed)."""
        key, value = self.key_value()
        key, value = self.dropout(key), self.dropout(value)
        x = input_of(self, args, kwargs)
        if self.layout.kind == "fused":
            mask = args[1] if len(args) > 1 else kwargs.get("attn_mask")
            return attention_with_kv(self.base_layer, self.layout, x, key, value, mask, kwargs.get("is_causal", False))
        mask = args[1] if len(args) > 1 else kwargs.get("attention_mask")
        return attention_with_kv(self.base_layer, self.layout, x, key, value, mask), None

    def extra_repr(self) -> str:
        return f"num_tokens={self.num_tokens}, shared={self.shared}"
