"""Segmentation decoders: light heads on the multi-level maps of :class:`vpeft.tasks.dense.DenseFeatures`.

Every decoder is an ``nn.Module`` taking the list of maps (shallow to deep, each ``(B, C_i, h_i, w_i)``) and
returning class logits ``(B, K, h, w)`` at its finest working resolution; the task model upsamples them to the
input size. Widths come from the :class:`~vpeft.tasks.dense.Level` descriptions (the shape probe), never from
constants. One file per decoder; :func:`build_decoder` picks one by name.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence

from torch import nn

from ...errors import ConfigError, suggest
from ..dense import Level
from .fpn import FPNDecoder
from .linear import LinearDecoder

__all__ = ["DECODERS", "FPNDecoder", "LinearDecoder", "build_decoder", "decoder_names", "decoder_options"]

DECODERS: dict[str, Callable[..., nn.Module]] = {
    "linear": LinearDecoder.from_levels,
    "fpn": FPNDecoder.from_levels,
}


def decoder_names() -> list[str]:
    """The decoder names :func:`build_decoder` knows."""
    return sorted(DECODERS)


def decoder_options(name: str) -> list[str]:
    """The keyword options of decoder ``name`` (e.g. ``["dropout", "width"]`` for ``fpn``)."""
    params = list(inspect.signature(DECODERS[name]).parameters)[3:]  # after levels, num_classes, kind
    return params


def build_decoder(name: str, levels: Sequence[Level], num_classes: int, kind: str, **options) -> nn.Module:
    """The decoder ``name`` for feature maps described by ``levels`` of a ``kind`` ("vit"/"swin"/"cnn") backbone.

    Raises:
        ConfigError: unknown decoder name (the message lists the valid ones) or an invalid option.
    """
    if name not in DECODERS:
        raise ConfigError(suggest(str(name), decoder_names(), "decoder"))
    return DECODERS[name](levels, num_classes, kind, **options)
