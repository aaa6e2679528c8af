"""Prefix tuning: learnable key/value prefixes in every attention layer.

References: Li & Liang, "Prefix-Tuning: Optimizing Continuous Prompts for Generation", ACL 2021
(official code XiangLi1999/PrefixTuning); on vision transformers: Yu et al., "Towards a Unified View
on Visual Parameter-Efficient Transfer Learning" (V-PETL), 2022.

Placement: in every block's attention, ``l`` learnable key vectors and ``l`` value vectors per head
are placed in front of the layer's own keys and values (the attention is recomputed from its frozen
sub-modules -- timm's ``qkv``/``q_norm``/``k_norm``/``proj``, or Hugging Face's q/k/v/output projections, as
the ArchSpec describes them -- by :class:`~vpeft.layers.kv_prompt.KVPromptAttention`); the
queries, and so the token sequence, are unchanged. The prefixes are attention activations: they
enter after the key normalisation of qk-norm backbones.

Parameterisation: ``reparam=False`` (default) trains the prefixes ``P_k, P_v`` (``l x d`` per layer)
directly, initialised N(0, 0.02^2) (timm's init for learnable tokens; Li & Liang only train through
the MLP). ``reparam=True`` is Li & Liang's reparameterisation (their ``control_trans``): one
embedding ``P'`` (``l x d``, N(0, 1) like ``nn.Embedding``) and one MLP shared by all layers,
``Linear(d, 512) -> tanh -> Linear(512, L * 2 * d)``, whose output is split into each layer's keys and
values. After training, :func:`fold` replaces the MLP by the prefixes it produces (the paper keeps
only the prefix), leaving a ``reparam=False`` model whose delta checkpoint loads anywhere. Prefixes
change every attention distribution, so the method is not the identity at initialisation, and they
add tokens rather than weights, so nothing merges into the backbone.

Default length 10 (Li & Liang's table-to-text setting and the short end of the usual vision range
10-50). ViT-B/16, l = 10: 12 * 2 * 10 * 768 = 184,320 parameters (the stored delta, with or without
reparameterisation after :func:`fold`; training with ``reparam=True`` holds 10*768 + 768*512 + 512 +
512*18,432 + 18,432 = 9,857,024 instead). V-PETL reports no ViT-B/16 count for plain prefix tuning.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn
from torch.nn import functional as F

from ..arch import ArchSpec, Target, attention_layout
from ..config import MethodConfig, check_float, check_int
from ..errors import ConfigError
from ..layers.kv_prompt import KVPromptAttention
from ..registry import register_method
from ..state import state_of, wrapper_parameters
from .base import ADDITION, Method

__all__ = ["PrefixConfig", "Prefix", "PrefixAttention", "PrefixEncoder", "fold"]


@dataclasses.dataclass(frozen=True)
class PrefixConfig(MethodConfig):
    """Prefix tuning.

    Attributes:
        num_tokens: prefix length l (>= 1).
        reparam: train the prefixes through Li & Liang's MLP (fold it away with :func:`fold`).
        reparam_dim: hidden width of that MLP (>= 1); 512 in Li & Liang's code.
        dropout: dropout on the prefixes, in [0, 1).
    """

    method = "prefix"
    num_tokens: int = 10
    reparam: bool = False
    reparam_dim: int = 512
    dropout: float = 0.0

    def validate(self) -> None:
        check_int(self, "num_tokens", 1)
        if not isinstance(self.reparam, bool):
            raise ConfigError(f"prefix: reparam={self.reparam!r} is invalid; expected true or false")
        check_int(self, "reparam_dim", 1)
        check_float(self, "dropout", 0.0, 0.999)


class PrefixEncoder(nn.Module):
    """Li & Liang's reparameterisation, shared by all layers: ``MLP(P')`` split per layer into keys and values."""

    def __init__(self, num_tokens: int, dim: int, hidden: int, depth: int, *, device=None, dtype=None) -> None:
        super().__init__()
        kw = {"device": device, "dtype": dtype}
        self.dim = dim
        self.embedding = nn.Parameter(torch.randn(num_tokens, dim, **kw))
        self.down = nn.Linear(dim, hidden, **kw)
        self.up = nn.Linear(hidden, depth * 2 * dim, **kw)

    def layer(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer ``index``'s keys and values, each ``[l, d]`` (only that layer's rows of the output layer run)."""
        rows = slice(index * 2 * self.dim, (index + 1) * 2 * self.dim)
        kv = F.linear(torch.tanh(self.down(self.embedding)), self.up.weight[rows], self.up.bias[rows])
        return kv[:, : self.dim], kv[:, self.dim :]


class _EncoderRef:
    """A plain reference to the shared :class:`PrefixEncoder` (registered as a sub-module of layer 0 only)."""

    def __init__(self, encoder: PrefixEncoder | None) -> None:
        self.encoder = encoder


class PrefixAttention(KVPromptAttention):
    """Prefix keys/values in one attention layer: own tensors, or produced by the shared :class:`PrefixEncoder`."""

    def __init__(
        self,
        base_layer: nn.Module,
        layout,
        num_tokens: int,
        index: int,
        *,
        encoder: PrefixEncoder | None = None,
        owns_encoder: bool = False,
        dropout: float = 0.0,
    ) -> None:
        super().__init__(base_layer, layout, num_tokens, dropout=dropout, params=encoder is None)
        self.index = index
        self.source = _EncoderRef(encoder)
        if owns_encoder:
            self.encoder = encoder

    def _to_heads(self, t: torch.Tensor) -> torch.Tensor:
        heads, head_dim = self.head_shape
        return t.reshape(t.shape[0], heads, head_dim).transpose(0, 1)

    def key_value(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.source.encoder is None:
            return super().key_value()
        key, value = self.source.encoder.layer(self.index)
        return self._to_heads(key), self._to_heads(value)

    def set_prefixes(self, key: torch.Tensor, value: torch.Tensor) -> None:
        """Keep ``key``/``value`` (``[heads, l, head_dim]``) as this layer's own parameters; forget the encoder."""
        self.key = nn.Parameter(key.detach().clone().contiguous())
        self.value = nn.Parameter(value.detach().clone().contiguous())
        self.source = _EncoderRef(None)
        if "encoder" in dict(self.named_children()):
            delattr(self, "encoder")


@register_method
class Prefix(Method):
    config_cls = PrefixConfig
    family = ADDITION
    paper = "Li & Liang, Prefix-Tuning, ACL 2021; Yu et al., V-PETL, 2022"
    identity_at_init = False
    kinds = ("vit",)

    roles = ("attn",)

    def check_target(self, model: nn.Module, spec: ArchSpec, target: Target) -> None:
        attention_layout(model, spec, spec.parts[target.index])  # how to recompute it (or why vpeft cannot)

    def prepare(self, model: nn.Module, spec: ArchSpec, targets: list[Target]) -> None:
        cfg, like = self.config, next(model.parameters())
        self._encoder = None
        if cfg.reparam:
            self._encoder = PrefixEncoder(
                cfg.num_tokens, spec.embed_dim, cfg.reparam_dim, spec.depth, device=like.device, dtype=like.dtype
            )

    def create(self, model: nn.Module, spec: ArchSpec, target: Target) -> nn.Module:
        cfg, i = self.config, target.index
        wrapper = PrefixAttention(
            target.module,
            attention_layout(model, spec, spec.parts[i]),
            cfg.num_tokens,
            i,
            encoder=self._encoder,
            owns_encoder=i == 0,
            dropout=cfg.dropout,
        )
        if self._encoder is None:
            with torch.no_grad():
                nn.init.normal_(wrapper.key, std=0.02)
                nn.init.normal_(wrapper.value, std=0.02)
        return wrapper


def fold(model: nn.Module) -> list[str]:
    """Fold Li & Liang's MLP away after training: each layer keeps only the prefixes it produces.

    The model's method config becomes ``reparam=False`` and its trainable set the plain prefixes (+ head),
    so :func:`vpeft.save` writes the small delta and :func:`vpeft.load` restores it onto a fresh backbone.
    Outputs are unchanged (the stored prefixes are the MLP's outputs).

    Returns:
        The names of the folded attention layers.

    Raises:
        ConfigError: the model is not adapted with ``prefix`` and ``reparam=True``.
    """
    state = state_of(model)
    cfg = state.config
    if not isinstance(cfg, PrefixConfig) or not cfg.reparam:
        raise ConfigError(f"fold needs a model adapted with prefix(reparam=True); this one has {cfg.to_json()}")
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, PrefixAttention)]
    with torch.no_grad():  # every layer's prefixes first: layer 0 owns the shared encoder
        prefixes = [layer.key_value() for _, layer in layers]
    for (_, layer), (key, value) in zip(layers, prefixes):
        layer.set_prefixes(key, value)
    new = dataclasses.replace(cfg, reparam=False)
    trainable = list(dict.fromkeys(wrapper_parameters(model) + state.head))
    params = dict(model.named_parameters())
    for name in trainable:
        params[name].requires_grad_(True)
    state.config, state.method, state.trainable = new, Prefix(new), trainable
    return [n for n, _ in layers]
