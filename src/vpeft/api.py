"""The public API: apply a method to a frozen backbone, report, save/load deltas, merge/unmerge.

The delta file format itself (header, digest, reading, atomic writing) is :mod:`vpeft.delta`; its names are
re-exported here for code written before the split.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ._modules import BATCH_NORMS, parent_of
from .arch import ArchSpec, get_spec
from .config import MethodConfig
from .delta import (
    DIGEST_KEY,
    FORMAT,
    FORMAT_VERSION,
    DeltaHeader,
    delta_digest,
    delta_task,
    read_delta,
    read_header,
    write_delta,
)
from .errors import CheckpointError, ConfigError, UnsupportedBackboneError, VpeftError
from .files import atomic_write
from .layers import FrozenStatsNorm, Wrapper
from .methods.base import Method
from .registry import get_method
from .state import (
    MergeRecord,
    ModelState,
    attach_state,
    delta_tensors,
    head_names,
    is_adapted,
    load_tensors,
    set_trainable,
    state_of,
    trainable_names,
    unwrap_all,
    wrappers,
)
from .tasks.base import TaskModel

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
    "read_delta",
    "read_header",
    "task_of",
    "input_size_of",
    # the delta file format (vpeft.delta), re-exported
    "DIGEST_KEY",
    "FORMAT",
    "FORMAT_VERSION",
    "DeltaHeader",
    "delta_digest",
    "delta_task",
]

log = logging.getLogger(__name__)
_CLASSIFICATION = {"kind": "classification"}


def _parts(model: nn.Module) -> tuple[nn.Module, str, nn.Module | None]:
    """``(backbone, prefix of its names in model, task decoder or None)``: a TaskModel or a plain backbone."""
    if isinstance(model, TaskModel):
        return model.backbone, "backbone.", model.decoder
    return model, "", None


def task_of(model: nn.Module) -> dict[str, Any]:
    """The task description a delta of ``model`` records (``{"kind": "classification"}`` for a plain backbone)."""
    return model.task.to_dict() if isinstance(model, TaskModel) else dict(_CLASSIFICATION)


# ---- report -----------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Report:
    """What :func:`apply` did: parameter counts and the adapted modules.

    ``head`` counts the backbone's classifier, ``decoder`` a task decoder outside the backbone
    (:class:`vpeft.tasks.TaskModel`); ``method_params`` is the rest of the trainable parameters.
    """

    method: str
    trainable: int
    total: int
    head: int
    adapted: tuple[str, ...]
    by_kind: Mapping[str, int]
    decoder: int = 0

    @property
    def method_params(self) -> int:
        """Trainable parameters excluding the classification head and the task decoder."""
        return self.trainable - self.head - self.decoder

    @property
    def percent(self) -> float:
        return 100.0 * self.trainable / max(self.total, 1)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.update(method_params=self.method_params, percent=self.percent, adapted=list(self.adapted))
        return d

    def __str__(self) -> str:
        kinds = ", ".join(f"{k}: {v:,}" for k, v in sorted(self.by_kind.items()))
        decoder = f" + decoder {self.decoder:,}" if self.decoder else ""
        return (
            f"{self.method}: trainable {self.trainable:,} / {self.total:,} ({self.percent:.3f}%), "
            f"method {self.method_params:,} + head {self.head:,}{decoder}; {len(self.adapted)} adapted modules; "
            f"by kind: {kinds}"
        )


def report(model: nn.Module) -> Report:
    """Count the trainable parameters of an adapted model, per owning module kind."""
    state = state_of(model)
    params = dict(model.named_parameters())
    modules = dict(model.named_modules())
    delta_kind = {
        f"{mn}.{pn}": type(m).__name__
        for mn, m in modules.items()
        if isinstance(m, Wrapper)
        for pn, _ in m.delta_parameters()
    }
    decoder = set(state.decoder)
    by_kind: dict[str, int] = {}
    for name, p in params.items():
        if p.requires_grad:
            kind = delta_kind.get(name) or type(modules[name.rpartition(".")[0]]).__name__
            kind += "(decoder)" if name in decoder else "(head)" if name in state.head else ""
            by_kind[kind] = by_kind.get(kind, 0) + p.numel()
    head = sum(params[n].numel() for n in state.head if n in params and n not in decoder)
    return Report(
        method=state.config.method,
        trainable=sum(p.numel() for p in params.values() if p.requires_grad),
        total=sum(p.numel() for p in params.values()),
        head=head,
        adapted=tuple(state.adapted),
        by_kind=by_kind,
        decoder=sum(params[n].numel() for n in decoder),
    )


# ---- identity of the frozen weights -------------------------------------------------------------------------
def backbone_name(model: nn.Module) -> str:
    """The backbone's name: vpeft's local name, else timm's architecture, else the class name."""
    backbone = _parts(model)[0]
    cfg = getattr(backbone, "pretrained_cfg", None) or {}
    return str(cfg.get("vpeft_backbone") or cfg.get("architecture") or type(backbone).__name__)


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


def _base_fingerprint(backbone: nn.Module, spec: ArchSpec) -> str:
    return fingerprint(backbone, exclude=tuple(head_names(backbone, spec)))


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
    names = [n for n, m in model.named_modules() if isinstance(m, BATCH_NORMS) and not (head and n.startswith(head))]
    for name in names:
        parent, attr = parent_of(model, name)
        setattr(parent, attr, FrozenStatsNorm(getattr(parent, attr)))


def _inject(model: nn.Module, method: Method, spec: ArchSpec) -> ModelState:
    backbone, prefix, decoder = _parts(model)
    model.requires_grad_(False)
    if method.freeze_norm_stats:
        _freeze_norm_stats(backbone, spec.head)
    adapted = [prefix + n for n in method.inject(backbone, spec)]
    decoder_params = [f"decoder.{n}" for n, _ in decoder.named_parameters()] if decoder is not None else []
    decoder_buffers = [f"decoder.{n}" for n, _ in decoder.named_buffers()] if decoder is not None else []
    trainable = [prefix + n for n in trainable_names(backbone, method, spec)] + decoder_params
    if not trainable:
        raise ConfigError(
            f"{method.name}: nothing to train -- the model has no classification head (create it with num_classes > 0)"
        )
    set_trainable(model, trainable)
    head = [prefix + n for n in head_names(backbone, spec)] + decoder_params
    return ModelState(
        config=method.config,
        method=method,
        spec=spec,
        backbone=backbone_name(model),
        fingerprint="",
        adapted=adapted,
        trainable=trainable,
        head=head,
        decoder=decoder_params,
        buffers=decoder_buffers,
        task=task_of(model),
        prefix=prefix,
    )


def apply(model: nn.Module, config: MethodConfig | Mapping[str, Any] | str, **overrides: Any) -> Report:
    """Adapt ``model`` in place with a PEFT method and freeze everything else.

    Args:
        model: an unmodified backbone (timm / Hugging Face ViT, Swin, EfficientNet, ConvNeXt) with its head, or a
            :class:`vpeft.tasks.TaskModel` (the method adapts its backbone; its decoder trains whole).
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
            f"model already has method {state_of(model).config.method!r} applied; start from a fresh backbone"
        )
    cfg = _as_config(config, overrides)
    backbone = _parts(model)[0]
    spec = get_spec(backbone)
    method = get_method(cfg.method)(cfg)
    method.check(backbone, spec)
    base_print = _base_fingerprint(backbone, spec)
    requires_grad = {n: p.requires_grad for n, p in model.named_parameters()}
    try:
        state = _inject(model, method, spec)
    except BaseException:  # leave a refused model exactly as it was
        unwrap_all(model)
        for n, p in model.named_parameters():
            p.requires_grad_(requires_grad[n])
        raise
    state.fingerprint = base_print
    attach_state(model, state)
    rep = report(model)
    log.info("%s", rep)
    return rep


# ---- save / load --------------------------------------------------------------------------------------------
def input_size_of(model: nn.Module) -> tuple[int, int] | None:
    """The input size the (task model's) backbone was built for, ``None`` when unknown or any size works."""
    backbone = _parts(model)[0]
    try:
        size = get_spec(backbone).image_size
    except VpeftError:
        return None
    return (int(size[0]), int(size[1])) if size and size[0] > 0 and get_spec(backbone).kind != "cnn" else None


def save(model: nn.Module, path: str | os.PathLike, *, extra: Mapping[str, Any] | None = None) -> Path:
    """Write the trainable delta (+ head or task decoder) of an adapted model to one safetensors file, atomically.

    The header (:class:`vpeft.delta.DeltaHeader`) holds the method config, the backbone name, the fingerprint of
    the frozen weights, the input size and the task (``task``: its ``to_dict()``), so the delta is never loaded
    onto the wrong backbone, size or task; a SHA-256 over header and tensors catches any later change.
    """
    state = state_of(model)
    if state.merged is not None:
        raise CheckpointError(
            "model is merged; call vpeft.unmerge(model) before saving the delta (or vpeft.save_merged)"
        )
    header = DeltaHeader(
        config=state.config,
        backbone=state.backbone,
        fingerprint=state.fingerprint,
        task=state.task,
        extra=dict(extra or {}),
        input_size=input_size_of(model),
    )
    tensors = delta_tensors(model, state)
    path = write_delta(path, header, tensors)
    log.info("saved %d tensors (%s) to %s", len(tensors), state.config.method, path)
    return path


def load(model: nn.Module, path: str | os.PathLike, *, trust_unsigned: bool = False) -> Report:
    """Apply the checkpoint's method to a fresh ``model`` and load the trained delta into it.

    ``model`` is built as the delta's was: the same backbone at the same input size, and for a task with a decoder
    the same :class:`vpeft.tasks.TaskModel` (e.g. ``task.build(backbone)``). ``trust_unsigned`` loads a delta that
    has no content digest (written by an older vpeft).

    Raises:
        CheckpointError: missing/truncated/changed file, another backbone, size or task, or tensors that do not fit.
    """
    where = str(path)
    header, tensors = read_header(path, trust_unsigned=trust_unsigned)
    if is_adapted(model):
        state = state_of(model)
        if state.config != header.config:
            raise CheckpointError(
                f"model has {state.config.to_json()} applied; the checkpoint needs {header.config.to_json()}"
            )
        got = state.fingerprint
    else:
        backbone = _parts(model)[0]
        got = _base_fingerprint(backbone, get_spec(backbone))
    header.check_fits(
        backbone=backbone_name(model),
        fingerprint=got,
        where=where,
        kind=task_of(model)["kind"],
        input_size=input_size_of(model),
        hint=lambda: _mismatch_hint(model, header, tensors),
    )
    if isinstance(model, TaskModel):  # the same task set-up: classes, decoder, levels ... (data options may differ)
        try:
            model.task.check_compatible(header.task, f"checkpoint {where!r}")
        except ConfigError as exc:
            raise CheckpointError(str(exc)) from None
    if not is_adapted(model):
        try:
            apply(model, header.config)
        except (ConfigError, UnsupportedBackboneError) as exc:
            raise CheckpointError(f"checkpoint {where!r}: its method config does not apply here ({exc})") from None
    load_tensors(model, tensors, where)
    return report(model)


def _mismatch_hint(model: nn.Module, header: DeltaHeader, tensors: Mapping[str, torch.Tensor]) -> str:
    """What visibly differs between a delta and a model whose fingerprints differ: classes, input size."""
    diffs = []
    backbone, prefix, _ = _parts(model)
    try:
        heads = [prefix + n for n in head_names(backbone, get_spec(backbone))]
    except VpeftError:
        heads = []
    params = dict(model.named_parameters())
    for n in heads:
        if n in tensors and n in params and tensors[n].ndim and tensors[n].shape[0] != params[n].shape[0]:
            diffs.append(f"the delta's head has {tensors[n].shape[0]} classes, the model's {params[n].shape[0]}")
            break
    size = input_size_of(model)
    trained = header.extra.get("img_size") if header.input_size is None else header.input_size[0]
    if trained is not None and size is not None and trained != size[0]:
        diffs.append(f"the delta was trained at img_size {trained}, the model takes {size[0]}")
    return "; ".join(diffs)


# ---- merge / unmerge ----------------------------------------------------------------------------------------
def merge(model: nn.Module, *, keep_original: bool = True) -> list[str]:
    """Fold every wrapper's delta into the base weights and remove the wrappers (zero inference overhead).

    Args:
        keep_original: snapshot the weights changed by merging so :func:`unmerge` restores them bit-exactly.
            ``False`` saves that memory (deployment); :func:`unmerge` is then unavailable.

    Returns:
        The qualified names of the merged modules.
    """
    state = state_of(model)
    if state.merged is not None:
        raise ConfigError("model is already merged; call vpeft.unmerge(model) first")
    if not state.method.mergeable:
        raise ConfigError(
            f"method {state.config.method!r} is not mergeable: it adds modules that cannot be folded into the weights"
        )
    records = []
    for name, wrapper in wrappers(model):
        base = wrapper.base_layer
        snap = {k: v.detach().clone() for k, v in base.state_dict().items()} if keep_original else None
        before = tuple(n for n, _ in base.named_parameters(recurse=False))
        wrapper.merge_into_base()
        parent, attr = parent_of(model, name)
        setattr(parent, attr, base)
        records.append(MergeRecord(name, wrapper, snap, before))
    state.merged, state.keep_original = records, keep_original
    return [r.name for r in records]


def unmerge(model: nn.Module) -> list[str]:
    """Undo :func:`merge`: restore the original base weights and put the wrappers back."""
    state = state_of(model)
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

    state = state_of(model)
    if state.merged is None:
        raise ConfigError("model is not merged; call vpeft.merge(model) first")
    path = Path(path)
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}
    meta = {"format": "vpeft-merged", "backbone": state.backbone, "config": state.config.to_json()}
    kept = method_modules(model)
    if kept:
        meta["method_modules"] = ",".join(sorted({type(m).__name__ for m in kept.values()}))
        log.warning(
            "%s: method %r leaves %d module(s) in the merged model (%s, e.g. %s): a plain %s cannot load these "
            "weights; rebuild with vpeft (apply, merge, load_state_dict) or use the delta file",
            path, state.config.method, len(kept), meta["method_modules"], next(iter(kept)), state.backbone,
        )  # fmt: skip
    return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))


def method_modules(model: nn.Module) -> dict[str, nn.Module]:
    """The modules a method put into ``model`` that are not wrappers ``vpeft.merge`` removes, by name: after a
    merge they stay (e.g. ZeroI2V's head shift and frame embedding), so the merged model is not the plain backbone
    (task heads and decoders of a task model are not counted: they are the task's, not the method's)."""
    return {
        name: m
        for name, m in model.named_modules()
        if type(m).__module__.startswith("vpeft.methods.") and not isinstance(m, Wrapper)
    }
