"""The adapters a server answers with: a folder of delta files for one frozen backbone, loaded on first use.

:class:`AdapterStore` scans a folder ``DIR`` of ``*.safetensors`` deltas; each is an **adapter** named by its file
stem. Every header is read (and its digest checked) at scan time; a delta of another backbone, other weights
(fingerprint), another input size, an unknown task kind, or a file that is not an intact delta is **refused** with the
reason (logged, listed with the adapters); the others are served. Nothing else of a delta stays in memory until it is
used: an adapter is loaded on its first request (or by :meth:`AdapterStore.load`), kept in an LRU cache of
``capacity`` adapters and/or ``capacity_bytes`` bytes, and evicted least recently used first; pinned adapters are
never evicted.

Two ways to run an adapter:

* **shared**: classification deltas of a method :class:`vpeft.multitask.MultiTaskModel` selects per sample (LoRA,
  adapters, AdaptFormer, SSF, linear probes on ViT / Swin: :func:`vpeft.multitask.supported_methods`) are loaded
  together into one ``MultiTaskModel`` on the store's backbone, so a batch mixing them is **one** backbone forward.
  The model is rebuilt (from the deltas kept in memory) when the set of loaded shared adapters changes.
* **own**: every other adapter (segmentation, zero-shot, methods that change the token sequence or train backbone
  weights, any backbone a ``MultiTaskModel`` does not take) runs on its own model: a structural copy of the backbone
  that **shares its frozen tensors** (only the tensors the delta trains are the model's own), the task's model
  around it, and the delta loaded with :func:`vpeft.load`. These models are cached like the shared deltas.

**Rescanning** (:meth:`AdapterStore.rescan`, ``POST /v1/adapters/rescan``): the folder is read again; a new file
becomes an adapter (refused with the reason if it is not an intact delta for this backbone), a removed file's
adapter goes (evicted if loaded), a file whose inode, size or modification time changed is read again (its loaded
version evicted; a pin carries over to the new version when it is served). Unchanged files keep their state and
counters. A rescan waits for the batch that is running (:meth:`AdapterStore.exclusive`): the requests of that batch
finish with the adapters they were grouped with; queued requests for a removed adapter then fail with "unknown
adapter".

Cache sizes: a shared adapter counts twice its delta's bytes (the tensors kept for rebuilding and their copy in the
multi-task layers), an own model the bytes of the tensors it does not share with the backbone.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
import os
import re
import threading
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import api
from .._modules import get_module, set_module
from ..arch import get_spec, logits_of
from ..delta import DeltaHeader, read_delta, read_header
from ..errors import CheckpointError, ConfigError, UnknownNameError, VpeftError, suggest
from ..multitask import MultiTaskModel, supported_methods
from ..state import head_names
from ..tasks import task_from_dict

__all__ = [
    "AdapterInfo",
    "AdapterRefusedError",
    "AdapterStore",
    "CacheStats",
    "RescanReport",
    "check_adapter_id",
    "SHARED",
    "OWN",
]

log = logging.getLogger(__name__)

SHARED, OWN = "shared", "own"
_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_SHAREABLE_KINDS = ("vit", "swin")  # the backbone kinds MultiTaskModel takes


class AdapterRefusedError(CheckpointError):
    """An adapter exists in the folder but is not served (another backbone, a broken file ...): the reason."""


def check_adapter_id(name: Any) -> str:
    """``name`` if it can name an adapter: a file stem inside the folder, never a path (no ``/``, ``..``, absolute)."""
    if not isinstance(name, str) or not name:
        raise ConfigError(f"adapter id must be a non-empty string, got {name!r}")
    if "/" in name or "\\" in name or name.startswith(".") or ".." in name or os.path.isabs(name):
        raise ConfigError(f"adapter id {name!r} is a path; give the name of a delta in the folder (its file stem)")
    if not _ID.fullmatch(name):
        raise ConfigError(
            f"adapter id {name!r} has characters other than letters, digits, '.', '_' and '-' (at most 128)"
        )
    return name


@dataclasses.dataclass
class AdapterInfo:
    """One adapter of the folder (what ``GET /v1/adapters`` lists).

    Attributes:
        id: the file stem. path: the delta file.
        kind: the task kind (``classification``, ``segmentation``, ``zeroshot`` ...); ``None`` when refused unread.
        method: the method name. route: ``"shared"`` (one backbone forward with the other shared adapters) or
            ``"own"`` (its own model). classes: class names recorded in the delta (``None``: answered as indices).
        num_classes: outputs per sample (classes; the feature width for a classification delta without a head).
        parameters: the delta's tensor elements. delta_bytes: their bytes.
        refused: why it is not served (``None``: served). loaded, pinned: cache state.
        loaded_bytes: what it holds in the cache while loaded. hits, misses, loads, evictions: its cache counters.
        note: why an adapter that could have been shared runs on its own model.
    """

    id: str
    path: Path
    kind: str | None = None
    method: str | None = None
    route: str = OWN
    classes: list[str] | None = None
    num_classes: int | None = None
    parameters: int = 0
    delta_bytes: int = 0
    refused: str | None = None
    loaded: bool = False
    pinned: bool = False
    loaded_bytes: int = 0
    hits: int = 0
    misses: int = 0
    loads: int = 0
    evictions: int = 0
    note: str | None = None
    header: DeltaHeader | None = dataclasses.field(default=None, repr=False)
    stamp: tuple[int, int, int] | None = dataclasses.field(default=None, repr=False)  # inode, size, mtime (ns)

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "kind": self.kind,
            "method": self.method,
            "route": self.route,
            "classes": self.classes,
            "num_classes": self.num_classes,
            "parameters": self.parameters,
            "delta_bytes": self.delta_bytes,
            "loaded": self.loaded,
            "pinned": self.pinned,
            "refused": self.refused,
            "note": self.note,
            "hits": self.hits,
            "misses": self.misses,
            "loads": self.loads,
            "evictions": self.evictions,
        }


@dataclasses.dataclass(frozen=True)
class RescanReport:
    """What a rescan of the folder changed (what ``POST /v1/adapters/rescan`` answers).

    Attributes:
        added: ids of new files. removed: ids whose file is gone. changed: ids whose file was replaced or rewritten.
        refused: ``{id: reason}`` for the added or changed files that are not served.
        served: every served id after the rescan.
    """

    added: list[str]
    removed: list[str]
    changed: list[str]
    refused: dict[str, str]
    served: list[str]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _stamp(path: Path) -> tuple[int, int, int]:
    st = path.stat()
    return st.st_ino, st.st_size, st.st_mtime_ns


@dataclasses.dataclass(frozen=True)
class CacheStats:
    """Totals over every adapter (what ``/metrics`` exports)."""

    hits: int
    misses: int
    loads: int
    evictions: int
    loaded: int
    loaded_bytes: int
    pinned: int
    shared_rebuilds: int


def _class_names(header: DeltaHeader, count: int | None) -> list[str] | None:
    """Class names recorded by the delta's task (``class_names``) or its writer (``extra``), when they fit."""
    for source in (header.task, header.extra):
        for key in ("class_names", "classes"):
            names = source.get(key)
            if (
                isinstance(names, list)
                and names
                and all(isinstance(n, str) for n in names)
                and (count is None or len(names) == count)
            ):
                return list(names)
    return None


def _classifier(backbone: nn.Module) -> str:
    """Where the backbone's classifier is (or was: a timm model created with ``num_classes=0``); "" if none."""
    spec = get_spec(backbone)
    if spec.head:
        return spec.head
    name = (getattr(backbone, "pretrained_cfg", None) or {}).get("classifier")
    if not isinstance(name, str) or not name:
        return ""
    try:
        get_module(backbone, name)
    except AttributeError:
        return ""
    return name


def _memo(model: nn.Module, trained: Iterable[str]) -> dict[int, Any]:
    """A deepcopy memo sharing ``model``'s tensors, except those named in ``trained`` (which are copied)."""
    skip = set(trained)
    return {id(t): t for n, t in [*model.named_parameters(), *model.named_buffers()] if n not in skip}


def _per_sample(output: Any) -> list[Any]:
    """A model's batch output as one CPU output per sample: a detector's list of dicts of tensors, else logits."""
    if isinstance(output, (list, tuple)) and all(isinstance(o, Mapping) for o in output):
        return [{k: v.detach().to("cpu") for k, v in o.items()} for o in output]
    return [o.detach().to("cpu") for o in logits_of(output)]


def _tensor_bytes(tensors: Iterable[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


class AdapterStore:
    """The adapters of folder ``folder`` on the frozen ``backbone`` (see the module docstring).

    Args:
        backbone: the frozen backbone every delta was trained from, plain (no method applied); its head is not
            used (each adapter brings its own). Moved to ``device``; eval mode, no gradients.
        folder: the folder of ``*.safetensors`` deltas (not searched recursively).
        capacity: at most this many adapters loaded at once (``None``: no count limit).
        capacity_bytes: at most this many bytes loaded (``None``: no byte limit; see the module docstring).
        device: where the backbone and the adapters run (default: the backbone's device).
        trust_unsigned: serve deltas without a content digest (written by an older vpeft).
        share: run supported classification deltas in one shared forward (``False``: every adapter on its own
            model; for comparisons).

    Raises:
        ConfigError: ``folder`` is not a folder, or a capacity is not a positive int.
    """

    def __init__(
        self,
        backbone: nn.Module,
        folder: str | os.PathLike,
        *,
        capacity: int | None = 8,
        capacity_bytes: int | None = None,
        device: str | torch.device | None = None,
        trust_unsigned: bool = False,
        share: bool = True,
    ) -> None:
        for label, value in (("capacity", capacity), ("capacity_bytes", capacity_bytes)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ConfigError(f"{label}={value!r} must be a positive int (or None: no limit)")
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise ConfigError(f"adapter folder {str(self.folder)!r} is not a folder")
        self.capacity, self.capacity_bytes, self.trust_unsigned = capacity, capacity_bytes, trust_unsigned
        self.device = torch.device(device) if device is not None else next(backbone.parameters()).device
        self.backbone = backbone.to(self.device).eval().requires_grad_(False)
        spec = get_spec(backbone)
        self.backbone_name = api.backbone_name(backbone)
        self.fingerprint = api.fingerprint(backbone, exclude=tuple(head_names(backbone, spec)))
        self.input_size = api.input_size_of(backbone)
        self.head_name = _classifier(backbone)
        # a structural copy sharing every tensor, never run: own models are copied from it (the backbone itself
        # is wrapped by the MultiTaskModel while shared adapters are loaded)
        self._template = copy.deepcopy(backbone, memo=_memo(backbone, ()))
        self._shareable = set(supported_methods(backbone)) if share and spec.kind in _SHAREABLE_KINDS else set()
        self._lock = threading.RLock()  # held by a running batch (exclusive()), a rescan, a load or an unload
        self._cache_lock = threading.Lock()  # held only while the set of loaded adapters changes: stats() reads it
        self._infos: dict[str, AdapterInfo] = {}
        self._lru: OrderedDict[str, Any] = OrderedDict()  # id -> (metadata, tensors) (shared) or the model (own)
        self._mtm: MultiTaskModel | None = None
        self._mtm_tasks: tuple[str, ...] = ()
        self.shared_rebuilds = 0
        self.scan()

    # ---- the folder ---------------------------------------------------------------------------------------------
    def scan(self) -> list[AdapterInfo]:
        """(Re)read the folder (see :meth:`rescan`); returns every adapter, refused ones included."""
        self.rescan()
        return self.adapters()

    def rescan(self) -> RescanReport:
        """Read the folder again: new files become adapters, removed ones go (evicted if loaded), changed ones are
        read again (their loaded version evicted, a pin kept when the new version is served). Waits for the batch
        that is running. Never raises for a bad file: it is refused with the reason (``refused`` of the report)."""
        with self._lock:
            old_infos, found, changed, pins = self._infos, {}, [], []
            for path in sorted(self.folder.glob("*.safetensors")):
                try:
                    if not path.is_file():
                        continue
                    stamp = _stamp(path)
                except OSError:  # removed while the folder was listed
                    continue
                old = old_infos.get(path.stem)
                if old is not None and old.stamp == stamp:
                    found[path.stem] = old
                    continue
                info = self._read(path, stamp)
                if old is not None:
                    changed.append(path.stem)
                    for counter in ("hits", "misses", "loads", "evictions"):  # one series per id in /metrics
                        setattr(info, counter, getattr(old, counter))
                    if old.pinned:
                        pins.append(path.stem)
                    if path.stem in self._lru:
                        self._evict(path.stem, count=False)
                found[path.stem] = info
            removed = [n for n in old_infos if n not in found]
            for name in removed:
                if name in self._lru:
                    self._evict(name, count=False)
            self._infos = found
            self._sync_shared()
            for name in pins:
                if found[name].refused is None:
                    try:
                        self.load(name, pin=True)
                    except VpeftError as exc:
                        log.warning("adapter %s changed and could not be pinned again: %s", name, exc)
            added = [n for n in found if n not in old_infos]
            refused = {n: found[n].refused for n in [*added, *changed] if found[n].refused is not None}
            report = RescanReport(added, removed, changed, refused, self.ids)  # type: ignore[arg-type]
            log.info("adapters in %s: %d served, %d refused (added %s, removed %s, changed %s)", self.folder,
                     len(report.served), len(found) - len(report.served), added, removed, changed)  # fmt: skip
            return report

    @contextlib.contextmanager
    def exclusive(self) -> Iterator[AdapterStore]:
        """Hold the store for a batch: no rescan, load or unload runs until the block ends (a re-entrant lock)."""
        with self._lock:
            yield self

    def _read(self, path: Path, stamp: tuple[int, int, int] | None = None) -> AdapterInfo:
        info = AdapterInfo(id=path.stem, path=path, stamp=stamp)
        try:
            check_adapter_id(path.stem)
            header, tensors = read_header(path, trust_unsigned=self.trust_unsigned)
            info.header, info.kind, info.method = header, header.kind, header.config.method
            info.parameters = sum(t.numel() for t in tensors.values())
            info.delta_bytes = _tensor_bytes(tensors.values())
            header.check_fits(
                backbone=self.backbone_name, fingerprint=self.fingerprint, where=path.name, input_size=self.input_size
            )
            task = task_from_dict(header.task)
            if task.backbone_kwargs():
                raise ConfigError(
                    f"its task needs a backbone created with {task.backbone_kwargs()} (e.g. a non-square input), "
                    "not the one this server holds"
                )
            if info.kind == "classification":
                head = tensors.get(f"{self.head_name}.weight") if self.head_name else None
                info.num_classes = int(head.shape[0]) if head is not None and head.ndim == 2 else None
            else:
                count = header.task.get("num_classes")
                info.num_classes = count if isinstance(count, int) and not isinstance(count, bool) else None
            info.classes = _class_names(header, info.num_classes)
            info.route = SHARED if info.kind == "classification" and info.method in self._shareable else OWN
        except (VpeftError, OSError) as exc:
            info.refused = " ".join(str(exc).split())
            log.warning("adapter %s refused: %s", path.stem, info.refused)
        return info

    # ---- looking adapters up ------------------------------------------------------------------------------------
    @property
    def ids(self) -> list[str]:
        """The served adapters (refused ones excluded)."""
        return [n for n, i in self._infos.items() if i.refused is None]

    def adapters(self) -> list[AdapterInfo]:
        """Every adapter of the folder, refused ones included (with the reason).

        Reads without the lock (so the HTTP handlers never wait for a running batch): a rescan replaces the
        mapping of adapters as a whole, it never changes it in place."""
        return [dataclasses.replace(i) for i in self._infos.values()]

    def info(self, name: str) -> AdapterInfo:
        """The adapter ``name``; raises UnknownNameError (with the served ids) or AdapterRefusedError (the reason)."""
        check_adapter_id(name)
        infos = self._infos  # one snapshot (see adapters())
        info = infos.get(name)
        if info is None:
            ids = [n for n, i in infos.items() if i.refused is None]
            raise UnknownNameError(suggest(name, ids, "adapter") if ids else f"unknown adapter {name!r}; "
                                   f"no adapter is served from {str(self.folder)!r}")  # fmt: skip
        if info.refused is not None:
            raise AdapterRefusedError(f"adapter {name!r} is not served: {info.refused}")
        return dataclasses.replace(info)

    def group_of(self, name: str) -> str:
        """The forward an adapter runs in: ``"shared"`` for every shared adapter, else its own id."""
        info = self.info(name)
        return SHARED if info.route == SHARED else f"{OWN}:{name}"

    def stats(self) -> CacheStats:
        """The cache's totals. Never waits for a running batch (which holds the store's lock for its forwards), so
        ``/health`` and ``/metrics`` answer while one runs: the adapters are one snapshot (see :meth:`adapters`), the
        loaded ones are read under a lock that only a change of the loaded set takes, for as long as the change."""
        infos = self._infos
        with self._cache_lock:
            loaded = list(self._lru)
        return CacheStats(
            hits=sum(i.hits for i in infos.values()),
            misses=sum(i.misses for i in infos.values()),
            loads=sum(i.loads for i in infos.values()),
            evictions=sum(i.evictions for i in infos.values()),
            loaded=len(loaded),
            loaded_bytes=sum(infos[n].loaded_bytes for n in loaded if n in infos),
            pinned=sum(i.pinned for i in infos.values()),
            shared_rebuilds=self.shared_rebuilds,
        )

    # ---- the cache ----------------------------------------------------------------------------------------------
    def load(self, name: str, *, pin: bool = False) -> AdapterInfo:
        """Load ``name`` now (a no-op when loaded; it becomes the most recently used); ``pin`` keeps it loaded.

        Raises:
            ConfigError: pinning it would leave no room: pinned adapters fill ``capacity``.
        """
        with self._lock:
            info = self.info(name)
            if pin and not info.pinned and self.capacity is not None:
                pinned = sum(i.pinned for i in self._infos.values())
                if pinned >= self.capacity:
                    raise ConfigError(
                        f"cannot pin {name!r}: {pinned} pinned adapters fill the cache capacity of {self.capacity}; "
                        "unload one or raise the capacity (--cache-size)"
                    )
            self.acquire([name], count=False)
            if pin:
                self._infos[name].pinned = True
            return dataclasses.replace(self._infos[name])

    def unload(self, name: str) -> AdapterInfo:
        """Drop ``name`` from the cache now (and its pin); a no-op when it is not loaded."""
        with self._lock:
            self.info(name)
            self._infos[name].pinned = False
            if name in self._lru:
                self._evict(name, count=False)
                self._sync_shared()
            return dataclasses.replace(self._infos[name])

    def acquire(self, names: Sequence[str], *, count: bool = True) -> None:
        """Make every adapter of ``names`` loaded (the batch about to run), most recently used; one ``hit`` or
        ``miss`` per entry of ``names`` when ``count``. Adapters the batch needs are never evicted for each other:
        a batch needing more than the capacity holds them all until the next trim.

        Deltas are loaded outside inference mode (also when called from :meth:`run`): a delta's tensors must stay
        ordinary tensors (a zero-shot model's text cache reads their version counters)."""
        with self._lock, torch.inference_mode(False):
            needed = list(dict.fromkeys(names))
            for name in needed:  # validate all before loading any
                self.info(name)
            before = {n for n in needed if n in self._lru}
            for name in needed:
                if name in self._lru:
                    with self._cache_lock:
                        self._lru.move_to_end(name)
                else:
                    self._load(name)
            if count:
                for name in names:
                    if name in before:
                        self._infos[name].hits += 1
                    else:
                        self._infos[name].misses += 1
                        before.add(name)  # later entries of the same batch find it loaded
            self._trim(protect=set(needed))
            self._sync_shared()

    def _over(self) -> bool:
        if self.capacity is not None and len(self._lru) > self.capacity:
            return True
        return self.capacity_bytes is not None and sum(self._infos[n].loaded_bytes for n in self._lru) > (
            self.capacity_bytes
        )

    def _trim(self, protect: set[str] = frozenset()) -> None:
        while self._over():
            victim = next((n for n in self._lru if not self._infos[n].pinned and n not in protect), None)
            if victim is None:
                log.debug("cache over capacity: every loaded adapter is pinned or in the running batch")
                return
            self._evict(victim)

    def _evict(self, name: str, count: bool = True) -> None:
        with self._cache_lock:
            self._lru.pop(name)
        info = self._infos.get(name)
        if info is not None:
            info.loaded, info.loaded_bytes = False, 0
            if count:
                info.evictions += 1
                log.info("adapter %s evicted (least recently used)", name)

    def _load(self, name: str) -> None:
        info = self._infos[name]
        try:
            if info.route == SHARED:
                meta, tensors = read_delta(info.path, trust_unsigned=self.trust_unsigned)
                header = DeltaHeader.from_metadata(meta, info.path.name)
                header.check_fits(backbone=self.backbone_name, fingerprint=self.fingerprint, where=info.path.name,
                                  input_size=self.input_size)  # fmt: skip  # the file may have changed since the scan
                entry: Any = (meta, {k: v.to(self.device) for k, v in tensors.items()})
                with self._cache_lock:
                    self._lru[name] = entry
                info.loaded_bytes = 2 * _tensor_bytes(tensors.values())
            else:
                model = self._own_model(info)
                shared = {id(t) for t in self._frozen_tensors()}
                mine = {id(t): t for t in [*model.parameters(), *model.buffers()] if id(t) not in shared}
                with self._cache_lock:
                    self._lru[name] = model
                info.loaded_bytes = _tensor_bytes(mine.values())
        except VpeftError as exc:
            info.refused = " ".join(str(exc).split())
            log.warning("adapter %s refused when loading: %s", name, info.refused)
            raise AdapterRefusedError(f"adapter {name!r} could not be loaded: {info.refused}") from None
        info.loaded = True
        info.loads += 1
        log.info("adapter %s loaded (%s, %s)", name, info.method, info.route)

    # ---- models -------------------------------------------------------------------------------------------------
    def _frozen_tensors(self) -> list[torch.Tensor]:
        return [*self._template.parameters(), *self._template.buffers()]

    def _own_model(self, info: AdapterInfo) -> nn.Module:
        """A copy of the backbone sharing its frozen tensors, the task's model around it, the delta loaded."""
        from ..api import load

        header, tensors = read_header(info.path, trust_unsigned=self.trust_unsigned)
        trained = set()
        for name in tensors:
            plain = name.replace(".base_layer", "")
            trained.update({plain, plain.removeprefix("backbone.")})
        backbone = copy.deepcopy(self._template, memo=_memo(self._template, trained))
        task = task_from_dict(header.task)
        if self.head_name:  # the delta's own head (classification), or none (a task with a decoder)
            weight = tensors.get(f"{self.head_name}.weight")
            if info.kind == "classification":
                head = (
                    nn.Linear(weight.shape[1], weight.shape[0], bias=f"{self.head_name}.bias" in tensors)
                    if weight is not None and weight.ndim == 2
                    else nn.Identity()
                )
            elif task.backbone_classes() == 0:
                head = nn.Identity()
            else:
                head = get_module(backbone, self.head_name)
            set_module(backbone, self.head_name, head.to(self.device))
        model = task.build(backbone).to(self.device)
        load(model, info.path, trust_unsigned=self.trust_unsigned)
        return model.eval().requires_grad_(False)

    def _sync_shared(self) -> None:
        """(Re)build the MultiTaskModel over the loaded shared adapters when that set changed."""
        tasks = tuple(n for n in self._lru if self._infos[n].route == SHARED)
        if tuple(sorted(tasks)) == tuple(sorted(self._mtm_tasks)):
            return
        if self._mtm is not None:
            self._mtm.unload()
            self._mtm, self._mtm_tasks = None, ()
        if not tasks:
            return
        try:
            self._mtm = MultiTaskModel.from_deltas(self.backbone, {n: self._lru[n] for n in tasks})
        except VpeftError:
            self._isolate(tasks)  # find the adapters that cannot be shared, move them to own models, retry
            return self._sync_shared()
        self._mtm_tasks = tasks
        self.shared_rebuilds += 1
        log.info("shared model rebuilt over %d adapters", len(tasks))

    def _isolate(self, tasks: Sequence[str]) -> None:
        moved = 0
        for name in tasks:
            try:
                MultiTaskModel.from_deltas(self.backbone, {name: self._lru[name]}).unload()
            except VpeftError as exc:
                info, reason = self._infos[name], " ".join(str(exc).split())
                self._evict(name, count=False)
                moved += 1
                if isinstance(exc, ConfigError):  # not selectable per sample: it gets its own model
                    info.route, info.note = OWN, reason
                    log.warning("adapter %s runs on its own model: %s", name, reason)
                else:
                    info.refused = reason
                    log.warning("adapter %s refused when loading: %s", name, reason)
        if not moved:  # pragma: no cover - each delta alone builds, together they do not: never seen
            raise CheckpointError(f"the shared adapters {list(tasks)} cannot be loaded together")

    # ---- running ------------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def run(self, names: Sequence[str], x: torch.Tensor) -> list[torch.Tensor]:
        """Outputs of the batch ``x`` (one sample per entry of ``names``, all of one group: :meth:`group_of`),
        one per sample, on the CPU: classification, zero-shot and video logits ``(K,)``, segmentation logits
        ``(K, h, w)``, detections ``{"boxes" (n, 4) xyxy input pixels, "scores" (n,), "labels" (n,)}``.

        Shared adapters run as one forward of the MultiTaskModel; an own adapter as one forward of its model. In a
        shared batch, an adapter that cannot be loaded (its file gone, a delta refused when loading) or is no longer
        served gets its exception in its samples' places; the other adapters' samples run.
        """
        with self._lock:
            groups = {self.group_of(n) for n in names}
            if len(groups) != 1:
                raise ConfigError(f"run() takes the samples of one group; got adapters of {sorted(groups)}")
            if groups == {SHARED} and len(set(names)) > 1:
                failed = self._acquire_each(names)
                if failed:
                    return self._run_without(names, x, failed)
            else:
                self.acquire(names)
            x = x.to(self.device)
            if groups == {SHARED}:
                # an adapter just moved to an own model (not selectable per sample) runs on it instead
                if any(self._infos[n].route != SHARED for n in names):
                    return self._run_split(names, x)
                out = self._mtm(x, list(names)).per_sample()
                return [o.detach().to("cpu") for o in out]
            model = self._lru[names[0]]
            return _per_sample(model(x))

    def _acquire_each(self, names: Sequence[str]) -> dict[str, Exception]:
        """Load a shared batch's adapters; when that fails, each alone: ``{adapter: its error}`` of those that fail."""
        try:
            self.acquire(names)
            return {}
        except VpeftError:
            failed: dict[str, Exception] = {}
            for name in dict.fromkeys(names):
                try:
                    self.acquire([name], count=False)
                except VpeftError as exc:
                    failed[name] = exc
            return failed

    def _run_without(self, names: Sequence[str], x: torch.Tensor, failed: Mapping[str, Exception]) -> list[Any]:
        out: list[Any] = [failed.get(n) for n in names]
        rows = [i for i, n in enumerate(names) if n not in failed]
        if rows:
            for i, o in zip(rows, self.run([names[i] for i in rows], x[rows])):
                out[i] = o
        return out

    def _run_split(self, names: Sequence[str], x: torch.Tensor) -> list[torch.Tensor]:
        out: list[torch.Tensor | None] = [None] * len(names)
        by_group: dict[str, list[int]] = {}
        for i, n in enumerate(names):
            by_group.setdefault(self.group_of(n), []).append(i)
        for rows in by_group.values():
            for i, o in zip(rows, self.run([names[i] for i in rows], x[rows])):
                out[i] = o
        return out  # type: ignore[return-value]

    def model_of(self, name: str) -> nn.Module:
        """The model that runs ``name`` (loading it): the shared MultiTaskModel or its own model."""
        with self._lock:
            self.acquire([name], count=False)
            return self._mtm if self._infos[name].route == SHARED else self._lru[name]

    def input_size_for(self, name: str) -> tuple[int, int]:
        """The ``(H, W)`` an adapter's inputs are resized to: its task's ``size``, else the backbone's."""
        info = self.info(name)
        size = info.header.task.get("size") if info.header is not None else None
        if isinstance(size, list) and len(size) == 2:
            return int(size[0]), int(size[1])
        if self.input_size is None:
            raise ConfigError("the backbone records no input size; build it with an img_size")
        return self.input_size

    def describe(self) -> Mapping[str, Any]:
        return {
            "backbone": self.backbone_name,
            "fingerprint": self.fingerprint,
            "input_size": list(self.input_size) if self.input_size else None,
            "device": str(self.device),
            "capacity": self.capacity,
            "capacity_bytes": self.capacity_bytes,
        }
