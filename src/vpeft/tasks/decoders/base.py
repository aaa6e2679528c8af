"""The decoder registry: a dense-prediction head registers once and is found by name everywhere.

A decoder is an ``nn.Module`` class decorated ``@register_decoder("name")`` with:

* ``from_levels(levels, num_classes, kind, **options)``: build it for the :class:`~vpeft.tasks.dense.Level` s of a
  ``kind`` ("vit" / "swin" / "cnn") backbone; its keyword options are the decoder's task options
  (``--task-opt width=128``), read from this signature;
* ``default_levels(kind, num_candidates)``: the feature levels it reads when the task names none;
* ``summary``: one line for ``--decoder`` help and error messages.

``--decoder NAME``, bench definitions (``task_options: {decoder: NAME}``) and ``SegmentationTask`` look decoders
up here; ``tests/test_segmentation.py`` registers one from outside the package and trains with it.
"""

from __future__ import annotations

import inspect

from torch import nn

from ...errors import ConfigError
from ...registry import Registry

__all__ = [
    "DECODERS",
    "decoder_names",
    "decoder_options",
    "decoders_help",
    "evenly_spaced",
    "get_decoder",
    "register_decoder",
]

DECODERS: Registry[type[nn.Module]] = Registry("decoder")


def register_decoder(name: str):
    """Class decorator registering a decoder under ``name`` (see the module docstring for what it must define)."""

    def add(cls: type[nn.Module]) -> type[nn.Module]:
        missing = [a for a in ("from_levels", "default_levels", "summary") if not hasattr(cls, a)]
        if missing:
            raise ConfigError(f"decoder {name!r} ({cls.__name__}) lacks {', '.join(missing)}")
        return DECODERS.register(name, cls)

    return add


def get_decoder(name: str) -> type[nn.Module]:
    """The decoder class registered as ``name``; an unknown name lists the valid ones."""
    return DECODERS.get(name)


def decoder_names() -> list[str]:
    return DECODERS.names()


def decoder_options(name: str) -> list[str]:
    """The keyword options of decoder ``name`` (e.g. ``["width", "dropout"]`` for ``fpn``)."""
    return list(inspect.signature(get_decoder(name).from_levels).parameters)[3:]  # after levels, num_classes, kind


def decoders_help() -> str:
    """``"linear (...), fpn (...)"``: every registered decoder with its summary."""
    return ", ".join(f"{n} ({get_decoder(n).summary})" for n in decoder_names())


def evenly_spaced(kind: str, num_candidates: int, count: int) -> tuple[int, ...]:
    """``count`` levels: on a ViT evenly spaced blocks (e.g. 3/6/9/12 of 12, duplicates removed on shallow models),
    on Swin / CNNs the last ``count`` stages."""
    if kind == "vit":
        return tuple(sorted({max(0, round((i + 1) * num_candidates / count) - 1) for i in range(count)}))
    return tuple(range(max(0, num_candidates - count), num_candidates))
