"""Convpass: convolutional bypasses parallel to attention and to the MLP.

Reference: Jie & Deng, "Convolutional Bypasses Are Better Vision Transformer Adapters", tech. report
2022 (arXiv 2207.07039); official code JieShibo/PETL-ViT, ``convpass/vtab/convpass.py``.

Placement (official ``forward_block``): ``x = x + attn(LN1(x)) + s * convpass(LN1(x))`` and
``x = x + mlp(LN2(x)) + s * convpass(LN2(x))`` -- each bypass reads the same normed input as its
sub-layer, so it wraps the ``attn`` and ``mlp`` modules (``placement="attn"`` is the official
``convpass_attn`` variant, attention only). The bypass: 1x1 down-projection d -> 8 (a linear layer),
QuickGELU, 3x3 convolution (8 -> 8, padding 1) over the patch tokens on their grid, QuickGELU,
dropout 0.1, 1x1 up-projection 8 -> d. Class/register tokens run through the 3x3 convolution as
separate 1x1 images (the official code does this with the class token), see
:mod:`vpeft.layers.token_grid`. The grid comes from ``patch_embed.grid_size`` at inject time (a square
grid is inferred from the token count when the input size differs).

Initialisation as the official code: down Xavier-uniform with zero bias; 3x3 conv zero except an
identity at the kernel centre (``xavier_init=False``, the function default) with zero bias; up and
its bias zero -- the adapted model is the frozen one at initialisation.

Scale s: the official code's default is ``s=1``; its per-task VTAB configs search
s in {0.01, 0.1, 1, 10, 100} (e.g. dtd 0.01, sun397 0.1, clevr_count 1, dmlab 10, dsprites_loc 100) and
switch ``xavier_init`` per task. vpeft defaults to s = 1.

CNN backbones (EfficientNet, ConvNeXt): the same bypass on feature maps, parallel to every block --
``y = block(x) + s * bypass(x)`` with 1x1 conv down (C_in -> 8), QuickGELU, 3x3 conv (8 -> 8, the block's
spatial stride, identity-centred), QuickGELU, dropout, 1x1 conv up (8 -> C_out, zero). This is the "residual
parallel" placement of Conv-Adapter (Chen et al., "Conv-Adapter: Exploring Parameter Efficient Transfer Learning
for ConvNets", 2022, arXiv 2208.07463) with Convpass's bottleneck; blocks that change the width or the
resolution get a bypass with the same output shape (channels and stride read from one probe forward pass at
inject time). Identity at initialisation as on ViTs.

Deviation: on LayerScale backbones (DINOv2) the bypass sits inside the sub-layer, so the block's
LayerScale also scales it (the paper's ViT-B has no LayerScale; there the placement is exact).

ViT-B/16, dim 8, attention + MLP: 12 * 2 * (768*8 + 8 + 8*8*3*3 + 8 + 8*768 + 768) = 327,552
parameters -- the paper's 0.33 M.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from .._modules import get_module, probe_shapes, set_module
from ..arch import ArchSpec, Target, patch_grid
from ..config import MethodConfig, check_choice, check_float, check_int
from ..errors import ConfigError, UnsupportedBackboneError
from ..layers.base import Wrapper, input_of, map_output
from ..layers.token_grid import Grid, map_on_grid
from ..registry import register_method
from .base import ADDITION, Method

__all__ = ["ConvpassConfig", "Convpass", "ConvBypass", "ConvpassBranch", "ConvpassBranch2d"]

PROBE_SIZE = 64  # input side of the shape probe on CNNs (every timm CNN downsamples by at most 32)


class QuickGELU(nn.Module):
    """``x * sigmoid(1.702 x)``, the activation of the official Convpass code."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


@torch.no_grad()
def _init_official(branch: nn.Module, xavier_init: bool) -> None:
    """Official Convpass init: Xavier down, identity-centred (or Xavier) 3x3 kernel, zero up; zero biases."""
    nn.init.xavier_uniform_(branch.down.weight)
    nn.init.zeros_(branch.down.bias)
    w = branch.conv.weight
    if xavier_init:
        nn.init.xavier_uniform_(w)
    else:
        nn.init.zeros_(w)
        w[:, :, 1, 1] += torch.eye(w.shape[0], device=w.device, dtype=w.dtype)
    nn.init.zeros_(branch.conv.bias)
    nn.init.zeros_(branch.up.weight)
    nn.init.zeros_(branch.up.bias)


class ConvpassBranch(nn.Module):
    """down (d -> dim) -> QuickGELU -> 3x3 conv on the patch grid -> QuickGELU -> dropout -> up (dim -> d)."""

    def __init__(
        self,
        dim: int,
        hidden: int,
        num_prefix: int,
        grid: Grid | None,
        *,
        xavier_init: bool = False,
        dropout: float = 0.1,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        kw = {"device": device, "dtype": dtype}
        self.num_prefix, self.grid = num_prefix, grid
        self.down = nn.Linear(dim, hidden, **kw)
        self.conv = nn.Conv2d(hidden, hidden, 3, 1, 1, **kw)
        self.up = nn.Linear(hidden, dim, **kw)
        self.act = QuickGELU()
        self.dropout = nn.Dropout(dropout)
        _init_official(self, xavier_init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(self.down(x))
        h = map_on_grid(self.conv, h, self.num_prefix, self.grid)
        return self.up(self.dropout(self.act(h)))


class ConvpassBranch2d(nn.Module):
    """The Convpass bottleneck on a feature map: 1x1 down -> QuickGELU -> 3x3 (stride) -> QuickGELU -> 1x1 up."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        hidden: int,
        stride: int,
        *,
        xavier_init: bool = False,
        dropout: float = 0.1,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        kw = {"device": device, "dtype": dtype}
        self.down = nn.Conv2d(in_channels, hidden, 1, **kw)
        self.conv = nn.Conv2d(hidden, hidden, 3, stride, 1, **kw)
        self.up = nn.Conv2d(hidden, out_channels, 1, **kw)
        self.act = QuickGELU()
        self.dropout = nn.Dropout(dropout)
        _init_official(self, xavier_init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.dropout(self.act(self.conv(self.act(self.down(x))))))


class ConvBypass(Wrapper):
    """``f(x) + s * convpass(x)``: a Convpass branch beside a frozen sub-layer (attention or MLP)."""

    def __init__(self, base_layer: nn.Module, branch: ConvpassBranch, scale: float) -> None:
        super().__init__(base_layer)
        self.adapter = branch
        self.scale = scale

    def forward(self, *args, **kwargs) -> torch.Tensor:
        x = input_of(self.base_layer, args, kwargs)
        return map_output(self.base_layer(*args, **kwargs), lambda y: y + self.adapter(x) * self.scale)

    def extra_repr(self) -> str:
        return f"scale={self.scale:g}"


@dataclasses.dataclass(frozen=True)
class ConvpassConfig(MethodConfig):
    """Convpass.

    Attributes:
        dim: channels of the bypass (>= 1); 8 in the paper.
        scale: multiplier s of the bypass output (> 0).
        placement: ``both`` (attention and MLP, "Convpass") or ``attn`` ("Convpass-attn").
        xavier_init: Xavier-uniform 3x3 kernel instead of the identity-centred one.
        dropout: dropout before the up-projection, in [0, 1).
    """

    method = "convpass"
    dim: int = 8
    scale: float = 1.0
    placement: str = "both"
    xavier_init: bool = False
    dropout: float = 0.1

    def validate(self) -> None:
        check_int(self, "dim", 1)
        check_float(self, "scale", 0.0, low_open=True)
        check_choice(self, "placement", ("both", "attn"))
        if not isinstance(self.xavier_init, bool):
            raise ConfigError(f"convpass: xavier_init={self.xavier_init!r} is invalid; expected true or false")
        check_float(self, "dropout", 0.0, 0.999)


@register_method
class Convpass(Method):
    config_cls = ConvpassConfig
    family = ADDITION
    paper = "Jie & Deng, Convolutional Bypasses Are Better Vision Transformer Adapters, 2022"
    kinds = ("vit", "cnn")

    def target_roles(self, spec: ArchSpec) -> tuple[str, ...]:
        if spec.kind == "cnn":
            return ()  # CNN blocks are probed, see _inject_cnn
        # the sub-layers to bypass, and their output projections (their own widths)
        return ("attn", "proj", "mlp", "fc2") if self.config.placement == "both" else ("attn", "proj")

    def inject(self, model: nn.Module, spec: ArchSpec) -> list[str]:
        if spec.kind == "cnn":
            return self._inject_cnn(model, spec)
        return super().inject(model, spec)

    def create(self, model: nn.Module, spec: ArchSpec, target: Target) -> nn.Module | None:
        if target.role not in ("attn", "mlp"):
            return None
        cfg, parts, w = self.config, spec.parts[target.index], next(target.module.parameters())
        branch = ConvpassBranch(
            model.get_submodule(parts.proj if target.role == "attn" else parts.fc2).out_features,
            cfg.dim,
            spec.num_prefix_tokens,
            patch_grid(spec),
            xavier_init=cfg.xavier_init,
            dropout=cfg.dropout,
            device=w.device,
            dtype=w.dtype,
        )
        return ConvBypass(target.module, branch, cfg.scale)

    def _inject_cnn(self, model: nn.Module, spec: ArchSpec) -> list[str]:
        cfg, names = self.config, list(spec.blocks)
        size = tuple(min(v, PROBE_SIZE) if v else PROBE_SIZE for v in spec.image_size)
        shapes = probe_shapes(model, names, size)
        w = next(model.parameters())
        for name in names:
            (_, c_in, h_in, w_in), (_, c_out, h_out, w_out) = shapes[name]
            stride = h_in // h_out if h_out else 0
            if stride < 1 or (h_in + stride - 1) // stride != h_out or (w_in + stride - 1) // stride != w_out:
                raise UnsupportedBackboneError(
                    f"convpass: block {name} maps a {h_in}x{w_in} feature map to {h_out}x{w_out}, which no strided "
                    "3x3 bypass reproduces"
                )
            branch = ConvpassBranch2d(
                c_in,
                c_out,
                cfg.dim,
                stride,
                xavier_init=cfg.xavier_init,
                dropout=cfg.dropout,
                device=w.device,
                dtype=w.dtype,
            )
            set_module(model, name, ConvBypass(get_module(model, name), branch, cfg.scale))
        return names
