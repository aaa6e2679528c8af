"""DiffFit: biases, normalisation layers and a learned scale on every residual branch.

Reference: Xie et al., "DiffFit: Unlocking Transferability of Large Diffusion Models via Simple
Parameter-Efficient Fine-Tuning", ICCV 2023. DiffFit extends BitFit: it trains every bias term,
the normalisation layers' affine parameters, and inserts a learnable scale gamma, initialised to 1,
on both residual branches of the transformer blocks: ``x = x + gamma_1 * attn(norm1(x))``,
``x = x + gamma_2 * mlp(norm2(x))``. vpeft uses one per-channel vector (``torch.ones(d)``) per branch
in every block, as the PETL_Vision benchmark (OSU-MLB/PETL_Vision, ``model/block.py``) applies
DiffFit to ViT classification; the paper also ablates inserting gamma in a subset of DiT's blocks.
The paper's "class embedding" is DiT's label embedding; its classification analogue is the head,
which vpeft always trains.

Placement in vpeft: gamma_1 scales the output of the attention's output projection ``proj`` and
gamma_2 the output of ``fc2``. Both are the last Linear of their branch (only dropout, and in
LayerScale models a per-channel ``ls`` that commutes with gamma, follow), so this is exactly the
paper's scaling of the residual branch, and it folds into ``proj`` / ``fc2``'s weight rows and bias.
Identity at initialisation (gamma = 1, biases and norms unchanged).
ViT-B/16: biases 102,912 (= BitFit) + LayerNorm weights 25 * 768 = 19,200 + gammas 12 * 2 * 768 =
18,432 -> 140,544 parameters.
"""

from __future__ import annotations

import dataclasses

from torch import nn

from .._modules import BATCH_NORMS
from ..arch import ArchSpec, Target
from ..config import MethodConfig
from ..layers.scaling import OutputScale
from ..registry import register_method
from .base import SPECIFICATION, Method

NORM_TYPES = (nn.LayerNorm, nn.GroupNorm, *BATCH_NORMS)


@dataclasses.dataclass(frozen=True)
class DiffFitConfig(MethodConfig):
    """DiffFit: no options."""

    method = "difffit"


@register_method
class DiffFit(Method):
    config_cls = DiffFitConfig
    family = SPECIFICATION
    paper = "Xie et al., DiffFit: Unlocking Transferability of Large Diffusion Models, ICCV 2023"
    mergeable = True
    kinds = ("vit", "swin")

    roles = ("proj", "fc2")  # the last Linear of each residual branch

    def create(self, model: nn.Module, spec: ArchSpec, target: Target) -> nn.Module:
        return OutputScale(target.module)

    def select(self, model: nn.Module, spec: ArchSpec) -> list[str]:
        names = []
        for mod_name, module in model.named_modules():
            prefix = f"{mod_name}." if mod_name else ""
            own = dict(module.named_parameters(recurse=False))
            if isinstance(own.get("bias"), nn.Parameter):
                names.append(prefix + "bias")
            if isinstance(module, NORM_TYPES) and isinstance(own.get("weight"), nn.Parameter):
                names.append(prefix + "weight")
        return names
