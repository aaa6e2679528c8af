"""Training checkpoints for resuming a killed run: everything the loop needs to continue as if never stopped.

A checkpoint holds the tensors that change during training (trainable parameters and every buffer), the optimizer's
and scheduler's state, the RNG states (python, numpy, torch, the training loader's generator), the optimizer step,
the epoch history and the elapsed time, the training config it was written under, and the run's identity (what
:func:`vpeft.run.finetune` records: backbone, a fingerprint of its frozen weights, task folder and a digest of the
list files training reads, splits, image size, task and method options); resuming another run is refused. It is
written atomically after every ``TrainConfig.checkpoint_every`` epochs (a temporary file, then ``os.replace``): a
crash at any moment, mid-write included, leaves the previous complete checkpoint. Resumed training takes the same
optimizer steps on the same batches in the same order with the same random numbers, so on CPU with a fixed seed a
resumed run ends bit-identical to an uninterrupted one (``tests/test_resume.py`` kills real processes).

The file is read with ``torch.load(weights_only=True)``: tensors and plain containers only, never code.
"""

from __future__ import annotations

import logging
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from vpeft.errors import CheckpointError, ConfigError
from vpeft.files import atomic_write

__all__ = [
    "CHECKPOINT_NAME",
    "FORMAT_VERSION",
    "ResumeMismatchError",
    "capture_rng",
    "check_same_run",
    "read_checkpoint",
    "restore_rng",
    "write_checkpoint",
]

logger = logging.getLogger(__name__)

CHECKPOINT_NAME = "checkpoint.pt"
FORMAT_VERSION = 2
"""2: the run's identity is stored (``identity``) and checked on resume; 1 had the training config only."""


def capture_rng(generator: torch.Generator | None) -> dict[str, Any]:
    """The python, numpy and torch RNG states (and ``generator``'s), as tensors and plain values."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "gauss": float(gauss)},
        "torch": torch.get_rng_state(),
        "loader": generator.get_state() if generator is not None else None,
    }  # fmt: skip
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any], generator: torch.Generator | None) -> None:
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(state["torch"])
    if generator is not None and state.get("loader") is not None:
        generator.set_state(state["loader"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def model_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The tensors of ``model`` that training changes: trainable parameters and all buffers (CPU copies)."""
    tensors = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    tensors.update({n: b.detach() for n, b in model.named_buffers()})
    return {n: t.to("cpu").clone() for n, t in tensors.items()}


def write_checkpoint(path: Path, payload: dict[str, Any]) -> None:
    """Write ``payload`` to ``path`` atomically (:func:`vpeft.files.atomic_write`: temporary file in the same
    folder, fsync, ``os.replace``); a failed write (disk full ...) is a :class:`~vpeft.files.WriteError` and leaves
    the previous checkpoint as it was."""
    data = {"format_version": FORMAT_VERSION, **payload}
    atomic_write(path, lambda tmp: _save(data, tmp))


class _Recorded:
    """A file torch.save writes through, keeping the ``OSError`` a write raised (torch turns it into a
    ``RuntimeError`` that no longer says what failed)."""

    def __init__(self, f: Any) -> None:
        self.f, self.error = f, None

    def write(self, data: Any) -> int:
        try:
            return self.f.write(data)
        except OSError as exc:
            self.error = exc
            raise

    def flush(self) -> None:
        try:
            self.f.flush()
        except OSError as exc:
            self.error = exc
            raise


def _save(obj: dict[str, Any], tmp: Path) -> None:
    with open(tmp, "wb") as raw:
        f = _Recorded(raw)
        try:
            torch.save(obj, f)
            f.flush()
        except Exception:
            if f.error is not None:
                raise f.error from None
            raise


class ResumeMismatchError(ConfigError):
    """``resume`` was asked for a run that is not the checkpointed one (the message names every differing field)."""


def read_checkpoint(path: Path, config: dict[str, Any], identity: dict[str, Any] | None = None) -> dict[str, Any]:
    """Read a checkpoint written under the training config ``config`` and the run ``identity``.

    A resumed run must be the checkpointed one: the training config (``epochs`` included: the warm-up + cosine
    schedule is planned for the run's epochs, so a changed count is refused rather than silently re-planned) and,
    when given, the identity (backbone, weights, task folder and its list files, splits, image size, task and
    method options ...) must equal the checkpoint's.

    Raises:
        CheckpointError: an unreadable, truncated or foreign file.
        ResumeMismatchError: the checkpoint belongs to another run (every differing field named, both values).
    """
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a damaged zip / pickle stream
        raise CheckpointError(f"checkpoint {str(path)!r} cannot be read ({type(exc).__name__}: {exc})") from None
    if not isinstance(payload, dict) or payload.get("format_version") != FORMAT_VERSION:
        found = payload.get("format_version") if isinstance(payload, dict) else None
        raise CheckpointError(
            f"checkpoint {str(path)!r} is not a vpeft training checkpoint of format {FORMAT_VERSION} "
            f"(format {found!r}); start the run again (vpeft train --overwrite)"
        )
    check_same_run(path, payload, config, identity)
    return payload


def check_same_run(
    path: Path, payload: dict[str, Any], config: dict[str, Any], identity: dict[str, Any] | None
) -> None:
    """Refuse resuming ``payload`` under another training config or run identity (see :func:`read_checkpoint`)."""
    where = f"cannot resume {str(path)!r}"
    saved_epochs, done, epochs = payload["config"].get("epochs"), int(payload["epoch"]), config.get("epochs")
    if epochs is not None and epochs < done:
        raise ResumeMismatchError(
            f"{where}: it has already trained {done} epochs, more than --epochs {epochs}; resume with "
            f"--epochs {saved_epochs}, or start again with --overwrite"
        )
    if epochs != saved_epochs:
        raise ResumeMismatchError(
            f"{where}: its learning-rate schedule (warm-up + cosine) was planned for {saved_epochs} epochs and "
            f"--epochs {epochs} would re-plan it mid-run, which vpeft refuses; resume with --epochs {saved_epochs}, "
            "or start again with --overwrite"
        )
    saved = flatten({"train": payload["config"], **({"run": payload.get("identity") or {}} if identity else {})})
    now = flatten({"train": config, **({"run": identity} if identity else {})})
    diff = sorted(k for k in set(saved) | set(now) if saved.get(k, _MISSING) != now.get(k, _MISSING))
    if diff:
        pairs = "; ".join(f"{k}: checkpoint {saved.get(k, _MISSING)!r}, now {now.get(k, _MISSING)!r}" for k in diff)
        raise ResumeMismatchError(
            f"{where}: the run differs from the checkpointed one ({pairs}); resume with the flags it was started "
            "with, or start again with --overwrite"
        )


class _Missing:
    def __repr__(self) -> str:
        return "<absent>"


_MISSING = _Missing()


def flatten(obj: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}`` (lists and tuples are values; tuples compare as lists)."""
    out: dict[str, Any] = {}
    for key, value in obj.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = _plain(value)
    return out


def _plain(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def clean_stale(folder: Path) -> None:
    """Remove temporary files left by a process killed while writing a checkpoint."""
    for tmp in folder.glob(f".{CHECKPOINT_NAME}.*.tmp"):
        tmp.unlink(missing_ok=True)
