"""Dense (per-location) multi-level feature maps from a backbone, adapted by any vpeft method or not.

Dense prediction heads read feature *maps*, not the pooled vector a classifier reads. This module turns the
backbone's intermediate outputs into ``(B, C, h, w)`` maps, the way ViTDet (Li et al., "Exploring Plain Vision
Transformer Backbones for Object Detection", ECCV 2022), BEiT/MAE's UperNet set-up and DINOv2's linear
segmentation evaluation (Oquab et al., "DINOv2: Learning Robust Visual Features without Supervision", 2023) read
them:

- **ViT** (``spec.kind == "vit"``): the candidates are the outputs of the blocks. A block's output is
  ``[prefix tokens (class, registers) | prompt tokens (VPT, E2VPT) | patch tokens]``; the patch tokens are always
  the LAST ``grid_h * grid_w`` tokens, so the map keeps exactly those, reshaped row-major to ``(B, C, gh, gw)``
  with the grid computed from the input size and the patch size. Prompts that methods insert (VPT-Shallow/Deep,
  E2VPT, NOAH) therefore never enter the map; prefix tuning adds its prefixes to the keys/values only, so the
  token sequence is untouched.
- **Swin** (``"swin"``): blocks read and write ``(B, H, W, C)`` maps; the candidates are the last block of each
  stage (found by a shape probe: where the spatial size changes next), permuted to ``(B, C, H, W)``.
- **CNN** (``"cnn"``): the output of the last block of each stage (again where the spatial size changes next).

The deepest candidate is not a hook on the last block but the backbone's own final features (its family's
``final_features``: ``forward_features`` for timm, ``last_hidden_state`` for Hugging Face): they include the
final norm (DINOv2's linear evaluation reads normalised tokens; EfficientNet's 1x1 head conv; a final norm the
head applies after pooling -- timm ViT ``fc_norm``, ConvNeXt ``head.norm`` -- is applied per location), the
removal of VPT prompts after the last block, and the output of side networks that replace the final features
(LST), so such methods feed the decoder too.
Earlier levels come from temporary forward hooks on the module *currently* at each block's qualified name,
looked up at every forward (``get_submodule``), so the hooks see the wrappers methods put there
(prompted blocks, adapters, side taps) and survive ``merge``.

Nothing here is an ``nn.Module``: :class:`DenseFeatures` holds names and shapes only and is given the backbone at
each call, so a task model's ``state_dict`` holds the backbone once.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Sequence

import torch
from torch import nn

from ..arch import get_family, get_spec
from ..errors import ConfigError

__all__ = ["DenseFeatures", "Level"]


@dataclasses.dataclass(frozen=True)
class Level:
    """One feature level.

    Attributes:
        source: qualified name of the hooked block, or ``""`` for the backbone's final features.
        channels: the map's width C.
        stride: input pixels per map cell, ``(h, w)`` (e.g. the patch size of a ViT; 4..32 for CNN stages).
    """

    source: str
    channels: int
    stride: tuple[float, float]


def _first_tensor(output):
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    hidden = getattr(output, "last_hidden_state", None)
    if isinstance(hidden, torch.Tensor):
        return hidden
    raise ConfigError(f"dense features: a block returned {type(output).__name__}, expected a tensor")


def _probe_size(backbone: nn.Module, spec) -> tuple[int, int]:
    if spec.image_size and spec.image_size[0] > 0:
        return int(spec.image_size[0]), int(spec.image_size[1])
    size = (getattr(backbone, "pretrained_cfg", None) or {}).get("input_size")
    return (int(size[-2]), int(size[-1])) if size else (224, 224)


class DenseFeatures:
    """Reads multi-level feature maps ``(B, C, h, w)`` from a backbone (see the module docstring).

    The candidates are: every block (ViT), or the last block of every stage (Swin, CNN), the deepest being the
    backbone's final features. Built once from the plain backbone (a shape probe on one zero image of the
    backbone's input size, in eval mode without gradients, finds the stages and the widths); afterwards the
    backbone may be adapted by any method, wrapped blocks included.

    Args:
        backbone: a timm ViT / Swin / EfficientNet / ConvNeXt or a Hugging Face ViT (any with an ArchSpec).
        levels: indices into the candidates (negative from the end), shallow to deep; ``None``: the last one.
        probe_size: ``(H, W)`` of the probe image (default: the backbone's input size).

    Attributes:
        kind: ``spec.kind`` of the backbone.
        candidates: the block names that can be read, shallow to deep (the last one read as final features).
        levels: the :class:`Level` of every map returned, in order.
    """

    def __init__(
        self,
        backbone: nn.Module,
        levels: Sequence[int] | None = None,
        probe_size: tuple[int, int] | None = None,
    ) -> None:
        spec = get_spec(backbone)
        self.family = get_family(backbone)
        self.kind = spec.kind
        self.patch_size = spec.patch_size
        self.num_prefix_tokens = spec.num_prefix_tokens
        size = probe_size or _probe_size(backbone, spec)
        norms = [n for n in spec.post_blocks if "norm" in type(backbone.get_submodule(n)).__name__.lower()]
        self.head_norms: tuple[str, ...] = ()
        shapes, final = self._probe(backbone, list(spec.blocks) + norms, size)
        # final norms the features skip because the head applies them after pooling (timm ViT ``fc_norm``,
        # ConvNeXt ``head.norm``): applied per location to the final features, as the final norm of the others
        self.head_norms = tuple(n for n in norms if n not in shapes)  # (norms keep the shape: no new probe)
        missing = [n for n in spec.blocks if n not in shapes]
        if missing:
            raise ConfigError(f"dense features: blocks {missing[:3]} did not run in the backbone's forward pass")
        if self.kind == "vit":
            candidates = list(spec.blocks)
        else:
            candidates = [
                name
                for i, name in enumerate(spec.blocks)
                if i + 1 == len(spec.blocks) or self._hw(shapes[spec.blocks[i + 1]]) != self._hw(shapes[name])
            ]
        self.candidates = tuple(candidates)
        self._probed = (shapes, final, size)
        self.levels = self._levels(levels)

    def with_levels(self, levels: Sequence[int] | None) -> DenseFeatures:
        """A copy reading other ``levels`` (no new probe)."""
        other = copy.copy(self)
        other.levels = other._levels(levels)
        return other

    def _levels(self, levels: Sequence[int] | None) -> tuple[Level, ...]:
        shapes, final, size = self._probed
        return tuple(self._level(c, shapes, final, size) for c in self._resolve(levels))

    # ----------------------------------------------------------------------------------------------- set-up
    def _hw(self, shape: torch.Size) -> tuple[int, int]:
        """Spatial size of a block output (tokens of a ViT have none: the grid comes from the input)."""
        if self.kind == "swin":
            return int(shape[1]), int(shape[2])
        if self.kind == "cnn":
            return int(shape[-2]), int(shape[-1])
        return (0, 0)

    def _channels(self, shape: torch.Size) -> int:
        return int(shape[1]) if self.kind == "cnn" else int(shape[-1])

    def _resolve(self, levels: Sequence[int] | None) -> list[str]:
        n = len(self.candidates)
        if levels is None:
            levels = (n - 1,)
        if isinstance(levels, (int, str)) or not levels:
            raise ConfigError(f"levels must be a non-empty sequence of ints, got {levels!r}")
        out = []
        for index in levels:
            if isinstance(index, bool) or not isinstance(index, int) or not -n <= index < n:
                raise ConfigError(
                    f"feature level {index!r} is invalid: this {self.kind} backbone has {n} levels "
                    f"(0..{n - 1}, or -{n}..-1 from the end)"
                )
            out.append(self.candidates[index % n])
        return out

    def _level(self, name: str, shapes: dict, final: torch.Size, size: tuple[int, int]) -> Level:
        last = name == self.candidates[-1]
        shape = final if last else shapes[name]
        if self.kind == "vit":
            stride = (float(self.patch_size[0]), float(self.patch_size[1]))
        else:
            h, w = self._hw(shape)
            stride = (size[0] / h, size[1] / w)
        return Level(source="" if last else name, channels=self._channels(shape), stride=stride)

    def _probe(
        self, backbone: nn.Module, names: list[str], size: tuple[int, int]
    ) -> tuple[dict[str, torch.Size], torch.Size]:
        """Output shapes of the named modules that ran (blocks must) and of the final features, one zero image."""
        shapes: dict[str, torch.Size] = {}
        param = next(backbone.parameters())
        modes = {m: m.training for m in backbone.modules()}
        try:
            backbone.eval()
            with torch.no_grad():
                x = torch.zeros(1, 3, *size, device=param.device, dtype=param.dtype)
                captured, final = self._run(backbone, x, names)
            shapes = {n: t.shape for n, t in captured.items()}
        finally:
            for m, training in modes.items():
                m.training = training
        return shapes, final.shape

    # ----------------------------------------------------------------------------------------------- forward
    def _run(
        self, backbone: nn.Module, x: torch.Tensor, names: Sequence[str]
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Run the backbone once with hooks on ``names``: their outputs and the final features."""
        captured: dict[str, torch.Tensor] = {}

        def hook(name: str):
            def record(_module: nn.Module, _args, output) -> None:
                captured[name] = _first_tensor(output)

            return record

        handles = [backbone.get_submodule(n).register_forward_hook(hook(n)) for n in dict.fromkeys(names)]
        try:
            final = self._final(backbone, x)
        finally:
            for h in handles:
                h.remove()
        return captured, final

    def _final(self, backbone: nn.Module, x: torch.Tensor) -> torch.Tensor:
        out = _first_tensor(self.family.final_features(backbone, x))
        for name in self.head_norms:
            out = backbone.get_submodule(name)(out)
        return out

    def grid(self, size: Sequence[int]) -> tuple[int, int]:
        """The ViT patch grid ``(gh, gw)`` of an input of ``size`` ``(H, W)``; both must be multiples of the patch."""
        (h, w), (ph, pw) = (int(size[0]), int(size[1])), self.patch_size
        if h % ph or w % pw:
            raise ConfigError(f"input size {h}x{w} is not a multiple of the ViT patch size {ph}x{pw}")
        return h // ph, w // pw

    def to_map(self, t: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """A block output as a ``(B, C, h, w)`` map (ViT: the last ``gh * gw`` tokens, row-major)."""
        if self.kind == "cnn":
            return t
        if self.kind == "swin":
            return t.permute(0, 3, 1, 2)
        gh, gw = grid
        b, n, c = t.shape
        if n < gh * gw:
            raise ConfigError(f"dense features: a block returned {n} tokens, fewer than the {gh}x{gw} patch grid")
        return t[:, n - gh * gw :].transpose(1, 2).reshape(b, c, gh, gw)

    def __call__(self, backbone: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
        """The maps of :attr:`levels` for images ``x`` ``(B, 3, H, W)``, one backbone pass."""
        grid = self.grid(x.shape[-2:]) if self.kind == "vit" else (0, 0)
        self.family.check_input_size(backbone, (int(x.shape[-2]), int(x.shape[-1])))
        hooked = [lv.source for lv in self.levels if lv.source]
        captured, final = self._run(backbone, x, hooked)
        return [self.to_map(captured[lv.source] if lv.source else final, grid) for lv in self.levels]

    def __repr__(self) -> str:
        return f"DenseFeatures(kind={self.kind!r}, levels={[lv.source or '<final>' for lv in self.levels]})"
