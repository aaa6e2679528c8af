"""Segmentation decoders: light heads on the multi-level maps of :class:`vpeft.tasks.dense.DenseFeatures`.

Every decoder is an ``nn.Module`` taking the list of maps (shallow to deep, each ``(B, C_i, h_i, w_i)``) and
returning class logits ``(B, K, h, w)`` at its finest working resolution; the task model upsamples them to the
input size. Widths come from the :class:`~vpeft.tasks.dense.Level` descriptions (the shape probe), never from
constants. One file per decoder, registered by name with :func:`~vpeft.tasks.decoders.base.register_decoder`
(it owns its default levels and its options); :func:`build_decoder` picks one by name.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from ..dense import Level
from .base import (
    DECODERS,
    decoder_names,
    decoder_options,
    decoders_help,
    evenly_spaced,
    get_decoder,
    register_decoder,
)
from .fpn import FPNDecoder
from .linear import LinearDecoder

__all__ = [
    "DECODERS",
    "FPNDecoder",
    "LinearDecoder",
    "build_decoder",
    "decoder_names",
    "decoder_options",
    "decoders_help",
    "default_levels",
    "evenly_spaced",
    "get_decoder",
    "register_decoder",
]


def default_levels(kind: str, num_candidates: int, decoder: str) -> tuple[int, ...]:
    """The levels decoder ``decoder`` reads by default (indices into the candidates, see
    :class:`~vpeft.tasks.dense.DenseFeatures`): e.g. ``linear`` the last one, ``fpn`` four evenly spaced ViT blocks."""
    return tuple(get_decoder(decoder).default_levels(kind, num_candidates))


def build_decoder(name: str, levels: Sequence[Level], num_classes: int, kind: str, **options) -> nn.Module:
    """The decoder ``name`` for feature maps described by ``levels`` of a ``kind`` ("vit"/"swin"/"cnn") backbone.

    Raises:
        UnknownNameError: unknown decoder name (the message lists the valid ones); ConfigError: an invalid option.
    """
    return get_decoder(name).from_levels(levels, num_classes, kind, **options)
