"""Time on a frame-wise backbone: the one protocol that tells adapted layers how many frames a clip has.

A video model (:class:`vpeft.tasks.video.VideoModel`) runs an *image* backbone on ``B * T`` frames at once (time
folded into the batch). Most methods never need to know: they act on each frame. Temporal methods (AIM's temporal
adapter, ST-Adapter's depthwise 3-D convolution, ZeroI2V's temporal head shift) must unfold the batch back into
``(B, T, ...)``; they are :class:`TemporalModule` s, and the video model calls :func:`set_num_frames` on its backbone
before every frame-wise forward. That call also marks the backbone itself (``vpeft_num_frames``), which is how a
method that needs time recognises, before injecting anything, a backbone built for a video task
(:func:`num_frames_of` is ``None`` on an image backbone).
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import ConfigError

__all__ = ["FRAMES_ATTR", "TemporalModule", "num_frames_of", "set_num_frames", "fold_time", "unfold_time"]

#: the attribute a video model sets on its backbone (a plain int, so it survives deepcopy and pickling)
FRAMES_ATTR = "vpeft_num_frames"


class TemporalModule(nn.Module):
    """Mixin for a module that needs ``T``: :func:`set_num_frames` sets :attr:`num_frames` before each forward."""

    num_frames: int | None = None

    def frames(self, batch: int) -> int:
        """``T`` for a frame-wise batch of ``batch`` items (``B * T``); refuses a batch that is not a whole clip."""
        t = self.num_frames
        if t is None:
            raise ConfigError(
                f"{type(self).__name__} needs the number of frames: run it inside a video model "
                "(vpeft.tasks.VideoTask(...).build(backbone)), which sets it before the frame-wise forward"
            )
        if batch % t:
            raise ConfigError(
                f"{type(self).__name__}: a frame-wise batch of {batch} is not a whole number of {t}-frame clips"
            )
        return t


def set_num_frames(backbone: nn.Module, num_frames: int) -> None:
    """Mark ``backbone`` as running ``num_frames``-frame clips frame-wise and tell every temporal module in it."""
    if isinstance(num_frames, bool) or not isinstance(num_frames, int) or num_frames < 1:
        raise ConfigError(f"num_frames must be a positive int, got {num_frames!r}")
    setattr(backbone, FRAMES_ATTR, num_frames)
    for module in backbone.modules():
        if isinstance(module, TemporalModule):
            module.num_frames = num_frames


def num_frames_of(backbone: nn.Module) -> int | None:
    """The clip length a video model set on ``backbone``; ``None``: an image backbone (no time axis)."""
    value = getattr(backbone, FRAMES_ATTR, None)
    return value if isinstance(value, int) else None


def unfold_time(x: torch.Tensor, t: int) -> torch.Tensor:
    """``(B * T, ...)`` -> ``(B, T, ...)``."""
    return x.reshape(x.shape[0] // t, t, *x.shape[1:])


def fold_time(x: torch.Tensor) -> torch.Tensor:
    """``(B, T, ...)`` -> ``(B * T, ...)``."""
    return x.reshape(x.shape[0] * x.shape[1], *x.shape[2:])
