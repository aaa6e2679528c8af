"""The public API: apply a method to a frozen backbone, report, save/load deltas, merge/unmerge."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import __version__
from ._modules import parent_of
from .arch import ArchSpec, get_spec
from .config import MethodConfig
from .errors import CheckpointError, ConfigError, UnsupportedBackboneError, VpeftError
from .layers import FrozenStatsNorm, Wrapper
from .methods.base import Method
from .registry import get_method

__all__ = [
    "Report",
    "apply",
    "report",
    "save",
    "load",
    "merge",
    "unmerge",
    "save_merged",
    "backbone_name",
    "fingerprint",
    "is_adapted",
]

log = logging.getLogger(__name__)
_STATE = "_vpeft_state"
FORMAT = "vpeft-delta"
FORMAT_VERSION = "1"


# ---- state kept on the model (a plain attribute: never a sub-module, never in state_dict) -------------------
@dataclasses.dataclass
class _Merged:
    name: str
    wrapper: Wrapper
    snapshot: dict[str, torch.Tensor] | None
    params_before: tuple[str, ...]


@dataclasses.dataclass
class _State:
    config: MethodConfig
    method: Method
    spec: ArchSpec
    backbone: str
    fingerprint: str
    adapted: list[str]
    trainable: list[str]
    head: list[str]
    merged: list[_Merged] | None = None
    keep_original: bool = True


def _state(model: nn.Module) -> _State:
    state = model.__dict__.get(_STATE)
    if state is None:
        raise ConfigError(f"{type(model).__name__} has no vpeft method applied; call vpeft.apply(model, config) first")
    return state


def is_adapted(model: nn.Module) -> bool:
    """True when :func:`apply` has been called on ``model``."""
    return _STATE in model.__dict__


# ---- report -----------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Report:
    """What :func:`apply` did: parameter counts and the adapted modules."""

    method: str
    trainable: int
    total: int
    head: int
    adapted: tuple[str, ...]
    by_kind: Mapping[str, int]

    @property
    def method_params(self) -> int:
        """Trainable parameters excluding the classification head."""
        return self.trainable - self.head

    @property
    def percent(self) -> float:
        return 100.0 * self.trainable / max(self.total, 1)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.update(method_params=self.method_params, percent=self.percent, adapted=list(self.adapted))
        return d

    def __str__(self) -> str:
        kinds = ", ".join(f"{k}: {v:,}" for k, v in sorted(self.by_kind.items()))
        return (
            f"{self.method}: trainable {self.trainable:,} / {self.total:,} ({self.percent:.3f}%), "
            f"method {self.method_params:,} + head {self.head:,}; {len(self.adapted)} adapted modules; by kind: {kinds}"
        )


def report(model: nn.Module) -> Report:
    """Count the trainable parameters of an adapted model, per owning module kind."""
    state = _state(model)
    params = dict(model.named_parameters())
    modules = dict(model.named_modules())
    delta_kind = {
        f"{mn}.{pn}": type(m).__name__
        for mn, m in modules.items()
        if isinstance(m, Wrapper)
        for pn, _ in m.delta_parameters()
    }
    by_kind: dict[str, int] = {}
    for name, p in params.items():
        if p.requires_grad:
            kind = delta_kind.get(name) or type(modules[name.rpartition(".")[0]]).__name__
            kind += "(head)" if name in state.head else ""
            by_kind[kind] = by_kind.get(kind, 0) + p.numel()
    head = sum(params[n].numel() for n in state.head if n in params)
    return Report(
        method=state.config.method,
        trainable=sum(p.numel() for p in params.values() if p.requires_grad),
        total=sum(p.numel() for p in params.values()),
        head=head,
        adapted=tuple(state.adapted),
        by_kind=by_kind,
    )


# ---- identity of the frozen weights -------------------------------------------------------------------------
def backbone_name(model: nn.Module) -> str:
    """The backbone's name: vpeft's local name, else timm's architecture, else the class name."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    return str(cfg.get("vpeft_backbone") or cfg.get("architecture") or type(model).__name__)


def _head_names(model: nn.Module, spec: ArchSpec) -> list[str]:
    if not spec.head:
        return []
    return [f"{spec.head}.{n}" for n, _ in model.get_submodule(spec.head).named_parameters()]


def fingerprint(model: nn.Module, exclude: tuple[str, ...] = (), samples: int = 1024) -> str:
    """SHA-256 over names, shapes, dtypes and an evenly strided sample of every tensor in ``state_dict``.

    Cheap (a few thousand values per tensor) yet any re-initialised or different checkpoint changes it.
    """
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        if name in exclude:
            continue
        flat = t.detach().reshape(-1)
        step = max(1, flat.numel() // samples)
        h.update(f"{name}|{tuple(t.shape)}|{t.dtype}|".encode())
        h.update(flat[::step].to("cpu", torch.float64).numpy().tobytes())
    return h.hexdigest()[:32]


# ---- apply ------------------------------------------------------------------------------------------------
def _as_config(config: MethodConfig | Mapping[str, Any] | str, overrides: Mapping[str, Any]) -> MethodConfig:
    if isinstance(config, MethodConfig):
        return dataclasses.replace(config, **overrides) if overrides else config
    if isinstance(config, str):
        return get_method(config).config_cls.from_kwargs(dict(overrides))
    if isinstance(config, Mapping):
        return MethodConfig.from_dict({**config, **overrides})
    raise ConfigError(f"config must be a MethodConfig, a dict or a method name, got {type(config).__name__}")


def _freeze_norm_stats(model: nn.Module, head: str) -> None:
    names = [
        n
        for n, m in model.named_modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and not (head and n.startswith(head))
    ]
    for name in names:
        parent, attr = parent_of(model, name)
        setattr(parent, attr, FrozenStatsNorm(getattr(parent, attr)))


def _wrapper_parameters(model: nn.Module) -> list[str]:
    return [
        f"{mod_name}.{n}"
        for mod_name, module in model.named_modules()
        if isinstance(module, Wrapper)
        for n, _ in module.delta_parameters()
    ]


def _inject(model: nn.Module, method: Method, spec: ArchSpec) -> tuple[list[str], list[str]]:
    model.requires_grad_(False)
    if method.freeze_norm_stats:
        _freeze_norm_stats(model, spec.head)
    adapted = method.inject(model, spec)
    head = _head_names(model, spec)
    trainable = list(dict.fromkeys(_wrapper_parameters(model) + method.select(model, spec) + head))
    params = dict(model.named_parameters())
    for name in trainable:
        params[name].requires_grad_(True)
    if not trainable:
        raise ConfigError(
            f"{method.name}: nothing to train -- the model has no classification head (create it with num_classes > 0)"
        )
    return adapted, trainable


def _unwrap_all(model: nn.Module) -> None:
    """Replace every wrapper by its base layer (innermost first); base weights are untouched by injection."""
    for name, wrapper in _wrappers(model):
        parent, attr = parent_of(model, name)
        setattr(parent, attr, wrapper.base_layer)


def apply(model: nn.Module, config: MethodConfig | Mapping[str, Any] | str, **overrides: Any) -> Report:
    """Adapt ``model`` in place with a PEFT method and freeze everything else.

    Args:
        model: an unmodified backbone (timm VisionTransformer or EfficientNet), with its head.
        config: a :class:`MethodConfig`, a dict with a ``"method"`` key, or a method name.
        **overrides: hyper-parameters overriding those in ``config``.

    Returns:
        A :class:`Report` of trainable / total parameters and adapted modules.

    Raises:
        UnknownNameError: unknown method name.
        ConfigError: invalid hyper-parameters, or the model is already adapted.
        UnsupportedBackboneError: the method cannot adapt this backbone.
    """
    if is_adapted(model):
        raise ConfigError(
            f"model already has method {_state(model).config.method!r} applied; start from a fresh backbone"
        )
    cfg = _as_config(config, overrides)
    spec = get_spec(model)
    method = get_method(cfg.method)(cfg)
    method.check(model, spec)
    head = _head_names(model, spec)
    base_print = fingerprint(model, exclude=tuple(head))
    requires_grad = {n: p.requires_grad for n, p in model.named_parameters()}
    try:
        adapted, trainable = _inject(model, method, spec)
    except BaseException:  # leave a refused model exactly as it was
        _unwrap_all(model)
        for n, p in model.named_parameters():
            p.requires_grad_(requires_grad[n])
        raise
    head = _head_names(model, spec)
    model.__dict__[_STATE] = _State(cfg, method, spec, backbone_name(model), base_print, adapted, trainable, head)
    rep = report(model)
    log.info("%s", rep)
    return rep


# ---- save / load --------------------------------------------------------------------------------------------
def _atomic_write(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _delta_tensors(model: nn.Module, state: _State) -> dict[str, torch.Tensor]:
    params = dict(model.named_parameters())
    tensors = {n: params[n].detach() for n in state.trainable}
    if state.method.saves_buffers:
        tensors.update({n: b.detach() for n, b in model.named_buffers()})
    return {n: t.to("cpu").contiguous().clone() for n, t in tensors.items()}


def save(model: nn.Module, path: str | os.PathLike, *, extra: Mapping[str, Any] | None = None) -> Path:
    """Write the trainable delta (+ head) of an adapted model to one safetensors file, atomically.

    The header metadata holds the method config, the backbone name and the fingerprint of the frozen
    weights, so the delta is never loaded onto the wrong backbone.
    """
    from safetensors.torch import save_file

    state = _state(model)
    if state.merged is not None:
        raise CheckpointError(
            "model is merged; call vpeft.unmerge(model) before saving the delta (or vpeft.save_merged)"
        )
    path = Path(path)
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "vpeft_version": __version__,
        "config": state.config.to_json(),
        "backbone": state.backbone,
        "fingerprint": state.fingerprint,
        "extra": json.dumps(dict(extra or {}), sort_keys=True),
    }
    tensors = _delta_tensors(model, state)
    meta[DIGEST_KEY] = delta_digest(meta, tensors)
    _atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))
    log.info("saved %d tensors (%s) to %s", len(tensors), state.config.method, path)
    return path


def read_delta(path: str | os.PathLike) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """Read a delta file: ``(metadata, tensors)``; anything but a complete vpeft delta raises CheckpointError.

    Checked before anything is used: the file is a readable safetensors file; its header says ``format`` vpeft-delta
    and a supported ``format_version``; ``config`` is a valid method config, ``extra`` a JSON object, ``backbone`` and
    ``fingerprint`` non-empty strings; every tensor is a real (not complex or bool) tensor with only finite values;
    the header's ``content_sha256`` (deltas written by this vpeft) matches the header and tensors, so a flipped
    byte is caught. Nothing in the file is executed (safetensors and JSON only).
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file, safe_open

    path = Path(path)
    where = str(path)
    if path.is_dir():
        raise CheckpointError(f"checkpoint {where!r} is a directory, not a delta file (give the .safetensors file)")
    if not path.is_file():
        raise CheckpointError(f"checkpoint {where!r} does not exist")
    try:
        with safe_open(where, framework="pt") as f:
            meta = f.metadata() or {}
        tensors = load_file(where)
    except (SafetensorError, OSError, ValueError, RuntimeError, TypeError, OverflowError, MemoryError) as exc:
        raise CheckpointError(f"checkpoint {where!r} is truncated or not a safetensors file ({exc})") from None
    _check_header(meta, where)
    _check_tensors(tensors, where)
    digest = meta.get(DIGEST_KEY)
    if digest is not None and digest != delta_digest(meta, tensors):
        raise CheckpointError(
            f"checkpoint {where!r} is corrupt: its contents do not match the {DIGEST_KEY} written with them "
            "(the file was changed after it was saved)"
        )
    return meta, tensors


DIGEST_KEY = "content_sha256"
"""Header field of a SHA-256 over the other header fields and every tensor (name, dtype, shape, bytes)."""


def delta_digest(meta: Mapping[str, str], tensors: Mapping[str, torch.Tensor]) -> str:
    """The :data:`DIGEST_KEY` of a delta: any change to a header value or to a tensor's bytes changes it."""
    h = hashlib.sha256(json.dumps({k: v for k, v in meta.items() if k != DIGEST_KEY}, sort_keys=True).encode())
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu").contiguous()
        h.update(f"|{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


_HEADER_STRINGS = ("backbone", "fingerprint", "config")


def _check_header(meta: Mapping[str, Any], where: str) -> None:
    """Refuse a foreign, tampered or future delta header (see :func:`read_delta`)."""
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint {where!r} is not a vpeft delta (format={meta.get('format')!r})")
    version = meta.get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointError(
            f"checkpoint {where!r} has format_version {version!r}; this vpeft ({__version__}) reads format_version "
            f"{FORMAT_VERSION!r} only"
        )
    missing = [k for k in _HEADER_STRINGS if not isinstance(meta.get(k), str) or not meta.get(k)]
    if missing:
        raise CheckpointError(f"checkpoint {where!r}: header lacks {', '.join(missing)} (or they are empty)")
    try:
        MethodConfig.from_json(meta["config"])
    except (VpeftError, ValueError, TypeError, KeyError, AttributeError, RecursionError) as exc:
        raise CheckpointError(
            f"checkpoint {where!r}: header field config is not a valid method config ({exc})"
        ) from None
    extra = meta.get("extra", "{}")
    try:
        parsed = json.loads(extra) if isinstance(extra, str) else None
    except (ValueError, RecursionError) as exc:
        raise CheckpointError(f"checkpoint {where!r}: header field extra is not valid JSON ({exc})") from None
    if not isinstance(parsed, dict):
        raise CheckpointError(f"checkpoint {where!r}: header field extra must be a JSON object, got {extra!r:.80}")


def _check_tensors(tensors: Mapping[str, torch.Tensor], where: str) -> None:
    """Refuse complex/bool tensors and any NaN or infinite value, naming the tensor."""
    for name, t in tensors.items():
        if t.is_complex() or t.dtype == torch.bool:
            raise CheckpointError(f"checkpoint {where!r}: tensor {name!r} has unsupported dtype {t.dtype}")
        if t.is_floating_point() and t.numel() and not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t)).sum())
            raise CheckpointError(
                f"checkpoint {where!r}: tensor {name!r} holds {bad} non-finite value(s) (NaN/inf); the training "
                "that wrote it diverged"
            )


def load(model: nn.Module, path: str | os.PathLike) -> Report:
    """Apply the checkpoint's method to a fresh ``model`` and load the trained delta into it.

    Raises:
        CheckpointError: missing/truncated file, another backbone, or tensors that do not fit.
    """
    meta, tensors = read_delta(path)
    cfg = MethodConfig.from_json(meta["config"])
    name = backbone_name(model)
    if meta["backbone"] != name:
        raise CheckpointError(f"checkpoint {str(path)!r} was trained on backbone {meta['backbone']!r}, not {name!r}")
    if is_adapted(model):
        state = _state(model)
        if state.config != cfg:
            raise CheckpointError(f"model has {state.config.to_json()} applied; the checkpoint needs {cfg.to_json()}")
        got = state.fingerprint
    else:
        got = fingerprint(model, exclude=tuple(_head_names(model, get_spec(model))))
    if got != meta["fingerprint"]:
        raise CheckpointError(
            f"checkpoint {str(path)!r} belongs to other weights of {name!r} (fingerprint {meta['fingerprint']}, "
            f"model {got}){_mismatch_hint(model, meta, tensors)}; load it onto the backbone it was trained from"
        )
    if not is_adapted(model):
        try:
            apply(model, cfg)
        except (ConfigError, UnsupportedBackboneError) as exc:
            raise CheckpointError(f"checkpoint {str(path)!r}: its method config does not apply here ({exc})") from None
    _load_tensors(model, tensors, str(path))
    return report(model)


def _mismatch_hint(model: nn.Module, meta: Mapping[str, str], tensors: Mapping[str, torch.Tensor]) -> str:
    """What visibly differs between a delta and a model whose fingerprints differ: classes, input size."""
    diffs = []
    try:
        heads = _head_names(model, get_spec(model))
    except VpeftError:
        heads = []
    params = dict(model.named_parameters())
    for n in heads:
        if n in tensors and n in params and tensors[n].ndim and tensors[n].shape[0] != params[n].shape[0]:
            diffs.append(f"the delta's head has {tensors[n].shape[0]} classes, the model's {params[n].shape[0]}")
            break
    extra = json.loads(meta.get("extra") or "{}")
    size = getattr(getattr(model, "patch_embed", None), "img_size", None)
    size = int(size[0]) if isinstance(size, (tuple, list)) and size else size
    if extra.get("img_size") is not None and size is not None and extra["img_size"] != size:
        diffs.append(f"the delta was trained at img_size {extra['img_size']}, the model takes {size}")
    return f" -- {'; '.join(diffs)}" if diffs else ""


def _load_tensors(model: nn.Module, tensors: Mapping[str, torch.Tensor], where: str) -> None:
    state = _state(model)
    targets = dict(model.named_parameters())
    expected = set(state.trainable)
    if state.method.saves_buffers:
        targets.update(dict(model.named_buffers()))
        expected |= {n for n, _ in model.named_buffers()}
    missing, unexpected = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
    if missing or unexpected:
        raise CheckpointError(f"checkpoint {where!r} does not fit: missing {missing[:3]}, unexpected {unexpected[:3]}")
    for n, t in tensors.items():
        if targets[n].shape != t.shape:
            hint = (
                " (the head has another number of classes: create the backbone with matching num_classes)"
                if (n in state.head)
                else ""
            )
            raise CheckpointError(
                f"checkpoint {where!r}: {n} has shape {tuple(t.shape)}, model {tuple(targets[n].shape)}{hint}"
            )
        if targets[n].dtype != t.dtype:
            raise CheckpointError(f"checkpoint {where!r}: {n} has dtype {t.dtype}, model {targets[n].dtype}")
    with torch.no_grad():
        for n, t in tensors.items():
            targets[n].copy_(t)


# ---- merge / unmerge ----------------------------------------------------------------------------------------
def _wrappers(model: nn.Module) -> list[tuple[str, Wrapper]]:
    found = [(n, m) for n, m in model.named_modules() if isinstance(m, Wrapper)]
    return found[::-1]  # innermost first


def merge(model: nn.Module, *, keep_original: bool = True) -> list[str]:
    """Fold every wrapper's delta into the base weights and remove the wrappers (zero inference overhead).

    Args:
        keep_original: snapshot the weights changed by merging so :func:`unmerge` restores them bit-exactly.
            ``False`` saves that memory (deployment); :func:`unmerge` is then unavailable.

    Returns:
        The qualified names of the merged modules.
    """
    state = _state(model)
    if state.merged is not None:
        raise ConfigError("model is already merged; call vpeft.unmerge(model) first")
    if not state.method.mergeable:
        raise ConfigError(
            f"method {state.config.method!r} is not mergeable: it adds modules that cannot be folded into the weights"
        )
    records = []
    for name, wrapper in _wrappers(model):
        base = wrapper.base_layer
        snap = {k: v.detach().clone() for k, v in base.state_dict().items()} if keep_original else None
        before = tuple(n for n, _ in base.named_parameters(recurse=False))
        wrapper.merge_into_base()
        parent, attr = parent_of(model, name)
        setattr(parent, attr, base)
        records.append(_Merged(name, wrapper, snap, before))
    state.merged, state.keep_original = records, keep_original
    return [r.name for r in records]


def unmerge(model: nn.Module) -> list[str]:
    """Undo :func:`merge`: restore the original base weights and put the wrappers back."""
    state = _state(model)
    if state.merged is None:
        raise ConfigError("model is not merged; nothing to unmerge")
    if not state.keep_original:
        raise ConfigError("model was merged with keep_original=False; its original weights are gone")
    records, state.merged = state.merged, None
    for rec in reversed(records):
        base = rec.wrapper.base_layer
        for n, _ in list(base.named_parameters(recurse=False)):
            if n not in rec.params_before:
                base.register_parameter(n, None)
        with torch.no_grad():
            for k, v in base.state_dict().items():
                v.copy_(rec.snapshot[k])
        parent, attr = parent_of(model, rec.name)
        setattr(parent, attr, rec.wrapper)
    return [r.name for r in records]


def save_merged(model: nn.Module, path: str | os.PathLike) -> Path:
    """Write the full state dict of a merged model (a plain backbone) to safetensors, atomically."""
    from safetensors.torch import save_file

    state = _state(model)
    if state.merged is None:
        raise ConfigError("model is not merged; call vpeft.merge(model) first")
    path = Path(path)
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}
    meta = {"format": "vpeft-merged", "backbone": state.backbone, "config": state.config.to_json()}
    _atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))
    return path
