"""Extra learnable keys and values in a frozen attention layer (prefix tuning, E2VPT key-value prompts).

:class:`KVPromptAttention` wraps a timm ``Attention`` and recomputes its forward from the frozen
sub-modules (``qkv``, ``q_norm``/``k_norm``, ``norm``, ``proj``) with ``L`` extra key and value
vectors per head placed in front of the layer's own keys and values. Queries are unchanged, so the
output keeps the input's length. The extra tokens are attention activations (after the key
normalisation, when the backbone has one); only they are trained.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from ..errors import UnsupportedBackboneError
from .base import Wrapper

__all__ = ["KVPromptAttention", "attention_with_kv", "check_timm_attention"]


def check_timm_attention(module: nn.Module, name: str, method: str) -> None:
    """Raise UnsupportedBackboneError unless ``module`` is a timm ``Attention`` (fused ``qkv`` linear)."""
    from timm.models.vision_transformer import Attention

    if not isinstance(module, Attention) or not isinstance(getattr(module, "qkv", None), nn.Linear):
        raise UnsupportedBackboneError(
            f"method {method!r} recomputes attention with extra keys/values and supports timm "
            f"vision_transformer.Attention layers only; {name} is a {type(module).__name__}"
        )


def _heads(attn: nn.Module) -> tuple[int, int]:
    heads = int(attn.num_heads)
    return heads, attn.qkv.out_features // 3 // heads


def _pad_mask(mask: torch.Tensor, extra: int) -> torch.Tensor:
    """Let every query attend to the ``extra`` keys placed in front (bool: True, additive: 0)."""
    shape = (*mask.shape[:-1], extra)
    if mask.dtype == torch.bool:
        pad = torch.ones(shape, dtype=torch.bool, device=mask.device)
    else:
        pad = torch.zeros(shape, dtype=mask.dtype, device=mask.device)
    return torch.cat([pad, mask], dim=-1)


def attention_with_kv(
    attn: nn.Module,
    x: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    is_causal: bool = False,
) -> torch.Tensor:
    """timm ``Attention.forward`` on ``x`` (``[B, N, C]``) with ``key``/``value`` (``[H, L, head_dim]``) prepended.

    Follows timm's computation step by step: fused ``qkv``, ``q_norm``/``k_norm``, scaled dot-product
    attention with the layer's ``scale`` and attention dropout, optional output norm and gate,
    ``proj`` and ``proj_drop``. ``attn_mask`` (broadcastable to ``[B, H, N, N]``) is extended so that
    every query sees the extra keys; causal attention is not defined with a prefix and is refused.
    """
    if is_causal:
        raise ValueError("attention with learnable key/value prefixes does not support is_causal=True")
    b, n, _ = x.shape
    heads, head_dim = _heads(attn)
    gate = attn.gate(x).sigmoid() if getattr(attn, "gate", None) is not None else None
    q, k, v = attn.qkv(x).reshape(b, n, 3, heads, head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    k = torch.cat([key.unsqueeze(0).expand(b, -1, -1, -1).to(k.dtype), k], dim=2)
    v = torch.cat([value.unsqueeze(0).expand(b, -1, -1, -1).to(v.dtype), v], dim=2)
    if attn_mask is not None:
        attn_mask = _pad_mask(attn_mask, key.shape[1])
    drop = attn.attn_drop.p if attn.training else 0.0
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=drop, scale=attn.scale)
    out = out.transpose(1, 2).reshape(b, n, heads * head_dim)
    norm = getattr(attn, "norm", None)
    if norm is not None:
        out = norm(out)
    if gate is not None:
        out = out * gate
    return attn.proj_drop(attn.proj(out))


class KVPromptAttention(Wrapper):
    """A frozen timm ``Attention`` with ``num_tokens`` learnable keys and values per head in front.

    Args:
        base_layer: a timm ``vision_transformer.Attention``.
        num_tokens: extra keys/values per head (``L``).
        shared: one tensor serves as both keys and values (E2VPT's default); otherwise ``key`` and
            ``value`` are separate.
        dropout: dropout on the extra keys and values (training only).

    The parameters are ``key`` (and ``value``), shaped ``[heads, L, head_dim]`` and left
    uninitialised (zeros): the method initialises them as its paper does. Subclasses may produce
    the tensors differently by overriding :meth:`key_value`.
    """

    def __init__(
        self, base_layer: nn.Module, num_tokens: int, *, shared: bool = False, dropout: float = 0.0, params: bool = True
    ) -> None:
        super().__init__(base_layer)
        heads, head_dim = _heads(base_layer)
        w = base_layer.qkv.weight
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
        return _heads(self.base_layer)

    def key_value(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The extra keys and values, each ``[heads, L, head_dim]`` (before dropout)."""
        return self.key, self.key if self.value is None else self.value

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        key, value = self.key_value()
        return attention_with_kv(self.base_layer, x, self.dropout(key), self.dropout(value), attn_mask, is_causal)

    def extra_repr(self) -> str:
        return f"num_tokens={self.num_tokens}, shared={self.shared}"
