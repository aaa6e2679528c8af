"""The delta file: one safetensors file holding a task's trained tensors and a header saying what they fit.

Everything about the file format lives here: the header (:class:`DeltaHeader`), its validation, the content digest,
reading and writing (through :func:`vpeft.files.atomic_write`). :func:`vpeft.save` / :func:`vpeft.load`, multi-task
loading, ``vpeft eval`` /
``merge`` and the server all read deltas through :func:`read_delta` / :func:`read_header` and check them against a
model with :meth:`DeltaHeader.check_fits`.

Header fields (safetensors metadata, all strings):

==================  ==============================================================================================
``format``          ``vpeft-delta``; ``format_version`` ``1``; ``vpeft_version`` the writer's version
``config``          the method config as JSON (:meth:`vpeft.MethodConfig.to_json`)
``backbone``        the backbone's name; ``fingerprint``: a digest of its frozen weights
``task``            the task set-up as JSON (kind, classes, decoder ...)
``input_size``      ``[H, W]`` the backbone was built for (``null`` when it takes any size); since 0.1.0
``extra``           a JSON object of the writer's own (``vpeft train``: backbone argument, image size, task name)
``content_sha256``  SHA-256 over every other field and every tensor's name, dtype, shape and bytes (mandatory)
==================  ==============================================================================================

A delta without ``content_sha256`` (written before vpeft recorded it, or with the field removed) is refused unless
the caller passes ``trust_unsigned=True`` (CLI: ``--trust-unsigned``), since nothing else would notice an edited
tensor. Nothing in a file is ever executed: safetensors and JSON only.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from .config import MethodConfig
from .errors import CheckpointError, VpeftError
from .files import atomic_write
from .version import __version__

__all__ = [
    "DIGEST_KEY",
    "FORMAT",
    "FORMAT_VERSION",
    "DeltaHeader",
    "check_train_extra",
    "delta_digest",
    "delta_task",
    "read_delta",
    "read_header",
    "write_delta",
]

FORMAT = "vpeft-delta"
FORMAT_VERSION = "1"
DIGEST_KEY = "content_sha256"
"""Header field of a SHA-256 over the other header fields and every tensor (name, dtype, shape, bytes)."""

_CLASSIFICATION = {"kind": "classification"}
_REQUIRED = ("backbone", "fingerprint", "config")


@dataclasses.dataclass(frozen=True)
class DeltaHeader:
    """A delta's header, validated (see the module docstring for the fields)."""

    config: MethodConfig
    backbone: str
    fingerprint: str
    task: Mapping[str, Any] = dataclasses.field(default_factory=lambda: dict(_CLASSIFICATION))
    extra: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    input_size: tuple[int, int] | None = None
    vpeft_version: str = __version__
    signed: bool = True

    @property
    def kind(self) -> str:
        return str(self.task.get("kind"))

    def to_metadata(self) -> dict[str, str]:
        """The safetensors metadata (without the digest, which :func:`write_delta` adds over the tensors)."""
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "vpeft_version": self.vpeft_version,
            "config": self.config.to_json(),
            "backbone": self.backbone,
            "fingerprint": self.fingerprint,
            "task": json.dumps(dict(self.task), sort_keys=True),
            "input_size": json.dumps(list(self.input_size) if self.input_size else None),
            "extra": json.dumps(dict(self.extra), sort_keys=True),
        }

    @classmethod
    def from_metadata(cls, meta: Mapping[str, Any], where: str) -> DeltaHeader:
        """Validate a header (a foreign, tampered or future one raises :class:`CheckpointError` naming ``where``)."""
        if meta.get("format") != FORMAT:
            raise CheckpointError(f"checkpoint {where!r} is not a vpeft delta (format={meta.get('format')!r})")
        version = meta.get("format_version")
        if version != FORMAT_VERSION:
            raise CheckpointError(
                f"checkpoint {where!r} has format_version {version!r}; this vpeft ({__version__}) reads "
                f"format_version {FORMAT_VERSION!r} only"
            )
        return cls.from_fields(meta, where)

    @classmethod
    def from_fields(cls, meta: Mapping[str, Any], where: str) -> DeltaHeader:
        """The header of ``meta`` without the file-format fields (an in-memory ``(metadata, tensors)`` pair)."""
        missing = [k for k in _REQUIRED if not isinstance(meta.get(k), str) or not meta.get(k)]
        if missing:
            raise CheckpointError(f"checkpoint {where!r}: header lacks {', '.join(missing)} (or they are empty)")
        try:
            config = MethodConfig.from_json(meta["config"])
        except (VpeftError, ValueError, TypeError, KeyError, AttributeError, RecursionError) as exc:
            raise CheckpointError(
                f"checkpoint {where!r}: header field config is not a valid method config ({exc})"
            ) from None
        return cls(
            config=config,
            backbone=meta["backbone"],
            fingerprint=meta["fingerprint"],
            task=delta_task(meta, where),
            extra=_json_object(meta.get("extra", "{}"), "extra", where),
            input_size=_input_size(meta.get("input_size"), where),
            vpeft_version=str(meta.get("vpeft_version", "")),
            signed=DIGEST_KEY in meta,
        )

    def check_fits(
        self,
        *,
        backbone: str,
        fingerprint: str,
        where: str,
        kind: str | None = None,
        input_size: tuple[int, int] | None = None,
        hint: Callable[[], str] | None = None,
    ) -> None:
        """Refuse a model of another backbone, input size, weights or task kind (``None``: not checked here),
        naming what differs (``hint()``: what else visibly differs, said when the weights do)."""
        if self.backbone != backbone:
            raise CheckpointError(f"checkpoint {where!r} was trained on backbone {self.backbone!r}, not {backbone!r}")
        if self.input_size and input_size and tuple(self.input_size) != tuple(input_size):
            (h, w), (mh, mw) = self.input_size, input_size
            raise CheckpointError(
                f"checkpoint {where!r} was trained at {h}x{w} inputs; this {backbone!r} takes {mh}x{mw}: build the "
                f"backbone with img_size={h if h == w else (h, w)}"
            )
        if kind is not None and self.kind != kind:
            raise CheckpointError(
                f"checkpoint {where!r} was trained for a {self.kind!r} task; this model is a {kind!r} model "
                "(build it with that task)"
            )
        if self.fingerprint != fingerprint:
            extra = hint() if hint is not None else ""
            raise CheckpointError(
                f"checkpoint {where!r} belongs to other weights of {backbone!r} (fingerprint {self.fingerprint}, "
                f"model {fingerprint}){f' -- {extra}' if extra else ''}; load it onto the backbone it was trained from"
            )


def _json_object(raw: Any, field: str, where: str) -> dict[str, Any]:
    try:
        parsed = json.loads(raw) if isinstance(raw, str) else None
    except (ValueError, RecursionError) as exc:
        raise CheckpointError(f"checkpoint {where!r}: header field {field} is not valid JSON ({exc})") from None
    if not isinstance(parsed, dict):
        raise CheckpointError(f"checkpoint {where!r}: header field {field} must be a JSON object, got {raw!r:.80}")
    return parsed


def _input_size(raw: Any, where: str) -> tuple[int, int] | None:
    if raw is None:  # deltas written before the field existed
        return None
    try:
        value = json.loads(raw) if isinstance(raw, str) else raw
    except (ValueError, RecursionError):
        value = raw
    if value is None:
        return None
    if (
        not isinstance(value, list)
        or len(value) != 2
        or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value)
    ):
        raise CheckpointError(f"checkpoint {where!r}: header field input_size must be [H, W] or null, got {raw!r:.40}")
    return int(value[0]), int(value[1])


def delta_task(meta: Mapping[str, Any], where: str = "delta") -> dict[str, Any]:
    """The task a delta was trained for (deltas written before tasks were recorded are classification)."""
    raw = meta.get("task")
    if raw is None:
        return dict(_CLASSIFICATION)
    try:
        task = json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise CheckpointError(f"checkpoint {where!r}: header field task is not valid JSON ({exc})") from None
    if not isinstance(task, dict) or not isinstance(task.get("kind"), str):
        raise CheckpointError(
            f"checkpoint {where!r}: header field task must be a JSON object with a 'kind', got {raw!r:.80}"
        )
    return task


def delta_digest(meta: Mapping[str, str], tensors: Mapping[str, torch.Tensor]) -> str:
    """The :data:`DIGEST_KEY` of a delta: any change to a header value or to a tensor's bytes changes it."""
    h = hashlib.sha256(json.dumps({k: v for k, v in meta.items() if k != DIGEST_KEY}, sort_keys=True).encode())
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu").contiguous()
        h.update(f"|{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


# ---- reading ----------------------------------------------------------------------------------------------------
def read_delta(
    path: str | os.PathLike, *, trust_unsigned: bool = False
) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """Read a delta file: ``(metadata, tensors)``; anything but a complete, intact vpeft delta raises CheckpointError.

    Checked before anything is used: the file is a readable safetensors file; its header is valid
    (:meth:`DeltaHeader.from_metadata`); every tensor is a real (not complex or bool) tensor with only finite values;
    the ``content_sha256`` matches the header and tensors, so a flipped byte is caught. A file without the digest is
    refused unless ``trust_unsigned``.
    """
    meta, tensors, _ = _read(path, trust_unsigned)
    return meta, tensors


def read_header(
    path: str | os.PathLike, *, trust_unsigned: bool = False
) -> tuple[DeltaHeader, dict[str, torch.Tensor]]:
    """:func:`read_delta` with the header parsed: ``(DeltaHeader, tensors)``."""
    _, tensors, header = _read(path, trust_unsigned)
    return header, tensors


def _read(path: str | os.PathLike, trust_unsigned: bool) -> tuple[dict[str, str], dict[str, torch.Tensor], DeltaHeader]:
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
            meta = dict(f.metadata() or {})
        tensors = load_file(where)
    except (SafetensorError, OSError, ValueError, RuntimeError, TypeError, OverflowError, MemoryError) as exc:
        raise CheckpointError(f"checkpoint {where!r} is truncated or not a safetensors file ({exc})") from None
    header = DeltaHeader.from_metadata(meta, where)
    _check_tensors(tensors, where)
    digest = meta.get(DIGEST_KEY)
    if digest is None and not trust_unsigned:
        raise CheckpointError(
            f"checkpoint {where!r} has no {DIGEST_KEY}, so an edited tensor would go unnoticed (written by an older "
            "vpeft, or the field was removed); re-save it, or pass trust_unsigned=True (CLI: --trust-unsigned) if "
            "you trust where it came from"
        )
    if digest is not None and digest != delta_digest(meta, tensors):
        raise CheckpointError(
            f"checkpoint {where!r} is corrupt: its contents do not match the {DIGEST_KEY} written with them "
            "(the file was changed after it was saved)"
        )
    return meta, tensors, header


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


# ---- the header vpeft train writes in ``extra`` ----------------------------------------------------------------
_EXTRA_TYPES: dict[str, tuple[type, ...]] = {
    "num_classes": (int,),
    "backbone_arg": (str,),
    "img_size": (int, type(None)),
    "pretrained": (bool,),
    "task": (str,),
}


def check_train_extra(extra: Mapping[str, Any], where: str) -> None:
    """The ``extra`` header of a ``vpeft train`` delta: required keys present, every known key of the right type."""
    missing = [k for k in ("num_classes", "backbone_arg") if k not in extra]
    if missing:
        raise CheckpointError(f"delta {where!r} lacks {missing} in its metadata; it was not written by vpeft train")
    for key, types in _EXTRA_TYPES.items():
        value = extra.get(key)
        if key in extra and (not isinstance(value, types) or (isinstance(value, bool) and bool not in types)):
            names = " or ".join("null" if t is type(None) else t.__name__ for t in types)
            raise CheckpointError(f"delta {where!r}: metadata {key}={value!r} is not {names}")
    for key in ("num_classes", "img_size"):
        if isinstance(extra.get(key), int) and extra[key] < 1:
            raise CheckpointError(f"delta {where!r}: metadata {key}={extra[key]!r} is not >= 1")


# ---- writing ----------------------------------------------------------------------------------------------------
def write_delta(path: str | os.PathLike, header: DeltaHeader, tensors: Mapping[str, torch.Tensor]) -> Path:
    """Write ``tensors`` with ``header`` (and its digest) to ``path`` atomically (:func:`vpeft.files.atomic_write`:
    the umask's mode, fsynced; an I/O failure is one :class:`~vpeft.files.WriteError` line naming the file)."""
    from safetensors.torch import save_file

    meta = header.to_metadata()
    meta[DIGEST_KEY] = delta_digest(meta, tensors)
    return atomic_write(path, lambda tmp: save_file(dict(tensors), tmp, metadata=meta))
