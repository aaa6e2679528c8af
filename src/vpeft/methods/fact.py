"""FacT: factor-tuning, in its tensor-train (``fact_tt``) and Tucker (``fact_tk``) formats.

Reference: Jie & Deng, "FacT: Factor-Tuning for Lightweight Adaptation on Vision Transformer",
AAAI 2023; official code JieShibo/PETL-ViT (``FacT/fact_tt.py``, ``FacT/fact_tk.py``).

Placement (official code): the increments of every block's q, k, v (slices of the fused qkv),
attention output projection and both MLP projections (fc1 as 4 and fc2 as 4 ``d x d`` slices) --
``12 L`` slices of ``d x d`` -- are one tensor, factorised with ``U`` (``r x d``) and ``V``
(``d x r``) shared by all slices of all blocks:

* TT: ``dW_m = s * V S_m U``, one ``r x r`` core per slice (the official per-module ``*_FacTs``);
* TK: ``dW_m = s * V (C x_3 p_m) U``, one ``r x r x r`` core ``C`` and a ``12L x r`` factor ``P``.

Initialisation (official code): ``U`` as ``nn.Linear(d, r)`` (Kaiming-uniform), ``V`` zero -- so
every increment is zero and the model is the frozen backbone at init --, TT cores as
``nn.Linear`` defaults, ``C`` and ``P`` Xavier-uniform; dropout 0.1 after the core.
The official TK forward reshapes its ``(r, r, 4)`` core into fc1's ``(r, 4r)`` matrix with a
row-major ``reshape`` that interleaves the four slices; vpeft uses the paper's formula (slice m of
fc1 gets ``C x_3 p_m``). The parameter count is the same.

Defaults: the official VTAB-1k configs choose rank and scale per task (``configs/{tt,tk}/*.yaml``;
s searched in {0.01, 0.1, 1, 10, 100}). vpeft uses the most frequent choices there: TT rank 8 with
s = 1 (rank 8 in 9/19 tasks, 16 in 9, 4 in 1; s = 1 in 7/19), TK rank 32 with s = 10 (rank 32 in
13/19, 16 in 6; s = 10 in 9/19). Set ``rank``/``scale`` per task to reproduce the paper's tables.

ViT-B/16 (L = 12, 144 slices): TT rank r has ``2 * 768 r + 144 r^2`` parameters: 21,504 at r = 8
(8,448 at r = 4 is the paper's "8K" tiny version; 61,440 at r = 16); the paper's 0.040M for
FacT-TT<=16 is the mean over its per-task ranks (39,734). TK rank r has ``2 * 768 r + 144 r + r^3``:
86,528 at r = 32 (30,976 at r = 16); the paper's 0.069M for FacT-TK<=32 is that per-task mean (68,985).

Separate q, k, v projections (Hugging Face): they are the three ``d x d`` slices of the virtual fused qkv, one
layer each (the arch layer resolves role ``qkv`` to them); the slice count, parameter count and function are
those of the fused layout.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from torch import nn

from ..arch import ArchSpec, Target
from ..config import MethodConfig, check_float, check_int
from ..errors import UnsupportedBackboneError
from ..layers.fact import FacTFactors, FacTLinear, FacTTKLinear, FacTTTLinear
from ..registry import register_method
from .base import REPARAMETER, Method


@dataclasses.dataclass(frozen=True)
class FacTTTConfig(MethodConfig):
    """FacT-TT.

    Attributes:
        rank: rank r of the shared factors and the per-slice cores (>= 1).
        scale: multiplier s of every increment (> 0).
        dropout: dropout after the core, in [0, 1) (official code: 0.1).
    """

    method = "fact_tt"
    rank: int = 8
    scale: float = 1.0
    dropout: float = 0.1

    def validate(self) -> None:
        check_int(self, "rank", 1)
        check_float(self, "scale", 0.0, low_open=True)
        check_float(self, "dropout", 0.0, 0.999)


@dataclasses.dataclass(frozen=True)
class FacTTKConfig(FacTTTConfig):
    """FacT-TK: the same options; default rank 32 and scale 10."""

    method = "fact_tk"
    rank: int = 32
    scale: float = 10.0


class _FacT(Method):
    family = REPARAMETER
    paper = "Jie & Deng, FacT: Factor-Tuning for Lightweight Adaptation on Vision Transformer, AAAI 2023"
    mergeable = True
    kinds = ("vit",)
    tucker: ClassVar[bool] = False

    # on separate q/k/v projections (Hugging Face) the role qkv yields the three d x d slices as three layers
    roles = ("qkv", "proj", "fc1", "fc2")

    def check_target(self, model: nn.Module, spec: ArchSpec, target: Target) -> None:
        base, d = target.module, spec.embed_dim
        if base.in_features % d or base.out_features % d:
            raise UnsupportedBackboneError(
                f"{self.name}: {target.name} is {base.out_features} x {base.in_features}, not a grid of "
                f"{d} x {d} slices; FacT needs every adapted weight to tile into width-{d} slices"
            )

    def prepare(self, model: nn.Module, spec: ArchSpec, targets: list[Target]) -> None:
        cfg, d = self.config, spec.embed_dim
        slices = sum((t.module.out_features // d) * (t.module.in_features // d) for t in targets)
        w = targets[0].module.weight
        self._factors = FacTFactors(d, cfg.rank, slices if self.tucker else 0, device=w.device, dtype=w.dtype)
        self._offset = 0

    def create(self, model: nn.Module, spec: ArchSpec, target: Target) -> nn.Module:
        cfg, factors = self.config, self._factors
        if not self.tucker:
            return FacTTTLinear(target.module, factors, cfg.scale, cfg.dropout)
        layer = FacTTKLinear(target.module, factors, self._offset, cfg.scale, cfg.dropout)
        self._offset += layer.num_slices
        return layer

    def finish(self, model: nn.Module, spec: ArchSpec, adapted: list[str]) -> list[str]:
        # the shared factors are reported (trained, saved) by the layer under which model.parameters() finds them
        first = next(m for m in model.modules() if isinstance(m, FacTLinear) and m.factors is self._factors)
        first.owns_factors = True
        return adapted


@register_method
class FacTTT(_FacT):
    config_cls = FacTTTConfig


@register_method
class FacTTK(_FacT):
    config_cls = FacTTKConfig
    tucker = True
