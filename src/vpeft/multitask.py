"""Many tasks on one frozen backbone: a mixed batch whose samples belong to different tasks.

:class:`MultiTaskModel` loads N task deltas (vpeft delta files, ``read_delta`` pairs or adapted models) onto
**one** frozen backbone. The backbone's weights are shared, never copied: every module that some task adapts
is wrapped once by a layer holding every task's (small) delta for it, and the classification head is replaced
by one head per task (heads may have different numbers of classes). ``model(x, task_ids)`` runs one forward
pass of the whole batch through the frozen weights; each sample gets its own task's low-rank update, adapter,
scale-shift and head, and a task whose delta does not touch a module adds nothing there.

Supported methods are found by a protocol, not a list: a method can be selected per sample when it trains nothing
of the backbone itself and every layer it injects implements :meth:`vpeft.layers.Wrapper.apply_delta` (its
function given its base layer's output, applied here to each task's rows), one layer per module. The built-in
ones: ``linear`` (head only), ``lora`` (any targets, q/k/v slices of a fused ``qkv`` included, any rank),
``adapter`` (sequential, Pfeiffer or Houlsby), ``adaptformer`` (parallel) and ``ssf`` (per-channel scale and
shift), in any mix of configurations, on timm / Hugging Face ViTs and timm Swin; a new layer class implementing
the protocol makes its method multi-task-capable without a change here. Methods that change the token sequence
(prompts, prefixes) or the weights themselves (BitFit, partial or full tuning) are refused with a
:class:`~vpeft.errors.ConfigError` naming the supported ones (:func:`supported_methods`).

Per-sample selection (``selection``):

* ``"grouped"`` (default): the batch is sorted by task once at the input (one copy of the images), so the rows
  of every task are one contiguous slice of every activation. A LoRA'd Linear computes each task group with
  more rows than the layer has inputs as one GEMM with a temporary merged weight ``W + s B A`` (built per call,
  one layer at a time, freed at once: the cost of a merged model, no persistent copy); other groups share GEMMs
  with the frozen weight and get their low-rank term as two thin GEMMs (the layer's ``merged_weight`` and
  ``apply_delta``). Adapters, SSF and heads run on each task's slice. The outputs are put back in batch order at
  the end.
* ``"gather"``: every layer stacks its tasks' deltas (zero-padded to the largest rank / width) and gathers one
  copy per sample (``stack[task_of_sample]``), then applies them with batched matrix products (``bmm``); the
  stacks come from the layer classes (:meth:`~vpeft.layers.Wrapper.stack_deltas`), and a class without one is
  applied task group by task group.

``benchmarks/bench_multitask.py`` times both (and grouping without the merged-weight GEMMs). Single layers of
ViT-S/16 block 0, one CPU core, 4 tasks x 8 images, time x the frozen layer: ``qkv`` with 4 LoRA tasks (r=8,
q and v) 1.05 grouped, 1.11 grouped without folding, 1.16 gathered (per-sample weight copies, q/v slices padded
to the full ``qkv`` width); ``qkv`` with 2 LoRA tasks 1.03 / 1.02 / 1.10; the MLP with an adapter, AdaptFormer
and an fc1 LoRA 1.02 / 1.02 / 1.09. Hence ``grouped``, with folding, is the default.

Samples are rows of the leading dimension; a layer that sees ``k * batch`` rows (Swin's windows) is read as
``k`` consecutive rows per sample. Outside :meth:`MultiTaskModel.forward` the wrapped backbone computes its
frozen function (no task applied). Inference only: the deltas are frozen and applied in place.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import os
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.nn import functional as F

from . import api
from ._modules import get_module, set_module
from .arch import ArchSpec, get_spec, logits_of
from .config import MethodConfig
from .delta import DeltaHeader, read_header
from .errors import CheckpointError, ConfigError, UnknownNameError, UnsupportedBackboneError, suggest
from .layers import Wrapper
from .layers.base import has_task_delta, input_of, map_output
from .registry import get_method, list_methods
from .state import (
    check_fit,
    delta_tensors,
    head_names,
    is_adapted,
    state_of,
    unwrap_all,
    wrapper_parameters,
    wrappers,
)

if TYPE_CHECKING:
    from .methods.base import Method

__all__ = ["MultiTaskModel", "MultiTaskOutput", "MultiTaskLayer", "supported_methods", "SELECTIONS"]

log = logging.getLogger(__name__)

#: ways of applying per-sample deltas (see the module docstring)
SELECTIONS = ("grouped", "gather")
_KINDS = ("vit", "swin")

#: a task delta: a delta file, ``(metadata, tensors)`` as returned by :func:`vpeft.api.read_delta`, or a model
#: adapted with :func:`vpeft.apply` (its current trainable tensors)
DeltaSource = str | os.PathLike | tuple[Mapping[str, str], Mapping[str, torch.Tensor]] | nn.Module


def _frozen(t: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(t.detach().clone(), requires_grad=False)


# ---- routing: which rows of the current batch belong to which task ------------------------------------------
class _Route:
    """The task layout of the batch being run: sorted by task, ``counts[t]`` samples of task ``t``."""

    def __init__(self, counts: list[int], sample_task: torch.Tensor) -> None:
        self.batch, self.counts, self.sample_task = int(sample_task.numel()), counts, sample_task
        self._ranges: dict[int, list[tuple[int, int, int]]] = {}
        self._row_task: dict[int, torch.Tensor] = {}

    def rows_per_sample(self, rows: int, where: str) -> int:
        if self.batch == 0:  # an empty batch: nothing to select
            return 1
        if rows % self.batch:
            raise UnsupportedBackboneError(
                f"{where} sees a leading dimension of {rows} for a batch of {self.batch}; per-sample deltas need "
                "every layer's rows to be whole samples (batch or batch x windows, sample-major)"
            )
        return rows // self.batch

    def ranges(self, rows: int, where: str) -> list[tuple[int, int, int]]:
        """``(task, start, stop)`` row ranges of the tasks present, for a layer seeing ``rows`` rows."""
        if rows not in self._ranges:
            k, start, out = self.rows_per_sample(rows, where), 0, []
            for t, n in enumerate(self.counts):
                if n:
                    out.append((t, start * k, (start + n) * k))
                start += n
            self._ranges[rows] = out
        return self._ranges[rows]

    def row_task(self, rows: int, where: str) -> torch.Tensor:
        """The task index of every row (``rows`` = k x batch)."""
        if rows not in self._row_task:
            k = self.rows_per_sample(rows, where)
            self._row_task[rows] = self.sample_task if k == 1 else self.sample_task.repeat_interleave(k)
        return self._row_task[rows]


class _Router:
    """Shared by the model and all its layers: the route of the forward pass in progress (None outside one)."""

    route: _Route | None = None


class MultiTaskLayer(Wrapper):
    """Wraps one frozen module and applies, to each sample, the delta of that sample's task for this module.

    Args:
        base_layer: the frozen module (shared, never copied).
        where: its qualified name (for error messages).
        parts: task index -> that task's layer here: a wrapper implementing the per-sample protocol
            (:meth:`~vpeft.layers.Wrapper.apply_delta`), its base layer released (tasks that do not adapt this
            module are absent).
        num_tasks: number of tasks of the model.
        router: the model's router (the task layout of the batch in flight).
        selection: ``"grouped"`` or ``"gather"`` (see the module docstring).

    ``fold`` (class attribute, read at construction): with ``"grouped"``, a task group of a Linear larger than
    its input width whose layer folds into a weight (:meth:`~vpeft.layers.Wrapper.merged_weight`, LoRA) is
    computed with that temporary merged weight (see :meth:`_grouped_linear`).
    """

    fold: bool = True

    def __init__(
        self,
        base_layer: nn.Module,
        where: str,
        parts: Mapping[int, Wrapper],
        num_tasks: int,
        router: _Router,
        selection: str = "grouped",
    ) -> None:
        super().__init__(base_layer)
        self.where, self.selection = where, selection
        self.parts = nn.ModuleDict({str(t): p for t, p in sorted(parts.items())})
        self.__dict__["_by_task"] = dict(parts)
        self.__dict__["_router"] = router
        self.needs_input = any(p.delta_reads_input for p in parts.values())
        self._fold = (
            selection == "grouped"
            and self.fold
            and type(base_layer) is nn.Linear
            and any(type(p).merged_weight is not Wrapper.merged_weight for p in parts.values())
        )
        # gather: one stack per layer class (its Wrapper.stack_deltas); classes without one go group by group
        self.stacks = nn.ModuleList()
        self.__dict__["_unstacked"] = {}
        if selection == "gather":
            by_class: dict[type, dict[int, Wrapper]] = {}
            for t, p in parts.items():
                by_class.setdefault(type(p), {})[t] = p
            for kind, group in by_class.items():
                stack = kind.stack_deltas(group, num_tasks)
                if stack is None:
                    self._unstacked.update(group)
                else:
                    self.stacks.append(stack)

    def forward(self, *args, **kwargs):
        route = self._router.route
        if route is not None and self._fold:
            x = input_of(self.base_layer, args, kwargs)
            if not torch.is_autocast_enabled(x.device.type) and x.dtype == self.base_layer.weight.dtype:
                return self._grouped_linear(route, x)
        out = self.base_layer(*args, **kwargs)
        if route is None:
            return out
        x = input_of(self.base_layer, args, kwargs) if self.needs_input else None
        apply = self._gather if self.selection == "gather" else self._grouped
        return map_output(out, lambda y: apply(route, x, y))

    def _grouped(
        self, route: _Route, x: torch.Tensor | None, y: torch.Tensor, parts: Mapping[int, Wrapper] | None = None
    ) -> torch.Tensor:
        parts = self._by_task if parts is None else parts
        for t, start, stop in route.ranges(y.shape[0], self.where):
            part = parts.get(t)
            if part is not None:
                part.apply_delta(None if x is None else x[start:stop], y[start:stop])
        return y

    def _grouped_linear(self, route: _Route, x: torch.Tensor) -> torch.Tensor:
        """A Linear, task group by task group: a group with more rows than the layer has inputs, whose layer
        folds into a weight (LoRA: ``W + s B A``), is one GEMM with that temporary merged weight (no pass over
        the activations for its delta, as a merged model); other groups share GEMMs with the frozen ``W`` and
        then get their deltas."""
        base, rows = self.base_layer, x.shape[0]
        weight, bias = base.weight, base.bias
        x2 = x.reshape(-1, weight.shape[1])
        y2 = x2.new_empty(x2.shape[0], weight.shape[0])
        k = x2.shape[0] // rows if rows else 1
        segments: list[list] = []  # [start, stop, merged weight or None], adjacent frozen-W groups joined
        folded = set()
        for t, start, stop in route.ranges(rows, self.where):
            part = self._by_task.get(t)
            merged = part.merged_weight(weight) if part is not None and (stop - start) * k > x2.shape[1] else None
            if merged is not None:
                folded.add(t)
            if merged is None and segments and segments[-1][2] is None and segments[-1][1] == start:
                segments[-1][1] = stop
            else:
                segments.append([start, stop, merged])
        for start, stop, merged in segments:
            w = weight if merged is None else merged
            out = y2[start * k : stop * k]
            if bias is None:
                torch.mm(x2[start * k : stop * k], w.t(), out=out)
            else:
                torch.addmm(bias, x2[start * k : stop * k], w.t(), out=out)
        y = y2.view(*x.shape[:-1], weight.shape[0])
        for t, start, stop in route.ranges(rows, self.where):
            part = self._by_task.get(t)
            if part is not None and t not in folded:
                part.apply_delta(x[start:stop], y[start:stop])
        return y

    def _gather(self, route: _Route, x: torch.Tensor | None, y: torch.Tensor) -> torch.Tensor:
        task = route.row_task(y.shape[0], self.where)
        for stack in self.stacks:
            stack(x, y, task)
        return self._grouped(route, x, y, self._unstacked) if self._unstacked else y

    def extra_repr(self) -> str:
        kinds = {t: type(p).__name__ for t, p in self._by_task.items()}
        return f"{self.where}: tasks {kinds}, selection={self.selection}"


class _Head(nn.Module):
    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.weight = _frozen(weight)
        self.bias = None if bias is None else _frozen(bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


# ---- reading deltas -------------------------------------------------------------------------------------------
@dataclasses.dataclass
class _TaskDelta:
    name: str
    config: MethodConfig
    parts: dict[str, Wrapper]
    head: nn.Module


def _read_source(task: str, source: DeltaSource) -> tuple[DeltaHeader, Mapping[str, torch.Tensor], str]:
    """``(header, tensors, description)`` of one task's delta."""
    if isinstance(source, (str, os.PathLike)):
        header, tensors = read_header(source)
        return header, tensors, repr(str(source))
    if isinstance(source, nn.Module):
        state = state_of(source)
        if state.merged is not None:
            raise CheckpointError(f"task {task!r}: the model is merged; unmerge it (or pass its delta file)")
        header = DeltaHeader(config=state.config, backbone=state.backbone, fingerprint=state.fingerprint,
                             task=state.task)  # fmt: skip
        return header, delta_tensors(source, state), f"task {task!r} (adapted {type(source).__name__})"
    if isinstance(source, tuple) and len(source) == 2 and isinstance(source[0], Mapping):
        meta, tensors = source
        missing = [k for k in ("config", "backbone", "fingerprint") if k not in meta]
        if missing:
            raise CheckpointError(f"task {task!r}: delta metadata lacks {missing}; use vpeft.api.read_delta output")
        return DeltaHeader.from_fields(meta, f"task {task!r}"), tensors, f"task {task!r}"
    raise ConfigError(
        f"task {task!r}: a delta must be a file path, a (metadata, tensors) pair from vpeft.api.read_delta or an "
        f"adapted model, got {type(source).__name__}"
    )


class _NotPerSample(Exception):
    """A method's layers cannot be selected per sample (the message says why)."""


def _refusal(model: nn.Module, method: Method, spec: ArchSpec) -> str | None:
    """Why the method just injected into ``model`` cannot be selected per sample; ``None`` when it can: it trains
    nothing of the backbone's own and every layer it injected implements the per-sample protocol, one per module."""
    if method.select(model, spec):
        return "it trains parameters of the backbone itself"
    for name, m in model.named_modules():
        if isinstance(m, Wrapper) and not has_task_delta(m):
            return f"its {type(m).__name__} at {_strip(name)} has no per-sample form: no apply_delta"
        if isinstance(m, Wrapper) and isinstance(m.base_layer, Wrapper):
            return f"it stacks two layers on {_strip(name)}"
    return None


def _strip(name: str) -> str:
    return name.replace(".base_layer", "")


def _plain_shell(backbone: nn.Module) -> nn.Module:
    """A structural copy of ``backbone`` sharing its tensors, its multi-task layers (if a :class:`MultiTaskModel`
    holds it) replaced by their frozen modules; ``backbone`` itself is untouched."""
    shared = {id(t): t for t in [*backbone.parameters(), *backbone.buffers()]}
    shell = copy.deepcopy(backbone, memo=shared)
    for name, m in reversed(list(shell.named_modules())):  # innermost first
        if isinstance(m, MultiTaskLayer):
            set_module(shell, name, m.base_layer)
    return shell


def supported_methods(backbone: nn.Module) -> list[str]:
    """The registered methods whose default configuration can be selected per sample on ``backbone``.

    Found by the protocol, not by a list: each method is injected (default config) into a structural copy of the
    backbone that shares its tensors (the backbone itself is not touched) and kept when :func:`_refusal` finds
    nothing. Any method whose injection fails there (e.g. a missing optional package) is left out. A backbone
    that a :class:`MultiTaskModel` holds is probed without its multi-task layers (the plain backbone's answer).
    """
    shell = _plain_shell(backbone)
    spec = get_spec(shell)
    found = []
    for name in list_methods():
        cls = get_method(name)
        if spec.kind not in cls.kinds:
            continue
        try:
            method = cls(cls.config_cls())
            method.check(shell, spec)
            method.inject(shell, spec)
            if _refusal(shell, method, spec) is None:
                found.append(name)
        except Exception:  # noqa: BLE001 - a probe: any failure means "not supported here"
            log.debug("method %s: not selectable per sample on this backbone", name, exc_info=True)
        finally:
            unwrap_all(shell)
    return found


def _harvest(
    backbone: nn.Module, spec: ArchSpec, cfg: MethodConfig, tensors: Mapping[str, torch.Tensor], where: str
) -> dict[str, Wrapper]:
    """Inject ``cfg``'s method into the clean ``backbone``, fill it from ``tensors`` and take its layers out
    again (the backbone ends as it started). Returns module name -> that layer, its base layer released."""
    method = get_method(cfg.method)(cfg)
    method.check(backbone, spec)
    try:
        method.inject(backbone, spec)
        reason = _refusal(backbone, method, spec)
        if reason is not None:
            raise _NotPerSample(reason)
        params = dict(backbone.named_parameters())
        expected = {n: params[n] for n in wrapper_parameters(backbone)}
        check_fit(expected, tensors, where)
        with torch.no_grad():
            for n, p in expected.items():
                p.copy_(tensors[n])
        layers = wrappers(backbone)
    finally:
        unwrap_all(backbone)
    parts = {}
    for n, w in layers:
        w.release_base()
        parts[_strip(n)] = w.requires_grad_(False)
    return parts


# ---- the model ------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class MultiTaskOutput:
    """Logits of a mixed batch, grouped by task.

    Attributes:
        logits: task -> ``(n_task, num_classes_task)`` logits of that task's samples, in batch order; every
            task of the model is present (``(0, C)`` when the batch has no sample of it).
        index: task -> ``(n_task,)`` LongTensor: the batch positions of those rows.
        batch_size: number of samples in the batch.
    """

    logits: dict[str, torch.Tensor]
    index: dict[str, torch.Tensor]
    batch_size: int

    def per_sample(self) -> list[torch.Tensor]:
        """One 1-D logits tensor per sample, in batch order (lengths differ when the tasks' classes do)."""
        out: list[torch.Tensor | None] = [None] * self.batch_size
        for task, rows in self.logits.items():
            for i, row in zip(self.index[task].tolist(), rows):
                out[i] = row
        return out  # type: ignore[return-value]


class MultiTaskModel(nn.Module):
    """N task deltas on one shared frozen backbone; ``forward(x, task_ids)`` runs a mixed batch.

    Build it with :meth:`from_deltas`. The backbone is modified in place (wrapped layers, per-task heads
    instead of its own head); :meth:`unload` gives it back unchanged.

    Attributes:
        tasks: task names; a task's id is its position here.
        num_classes: task -> number of logits (the feature width for a delta without a head).
        selection: ``"grouped"`` or ``"gather"``.
        backbone: the shared backbone.
        heads: one head per task (``nn.Identity`` for a delta trained without one).
    """

    def __init__(self, backbone: nn.Module, deltas: Sequence[_TaskDelta], selection: str, spec: ArchSpec) -> None:
        super().__init__()
        self.tasks = tuple(d.name for d in deltas)
        self.selection = selection
        self._index = {name: i for i, name in enumerate(self.tasks)}
        self.__dict__["_router"] = _Router()
        self.backbone = backbone
        by_module: dict[str, dict[int, nn.Module]] = {}
        for t, d in enumerate(deltas):
            for name, part in d.parts.items():
                by_module.setdefault(name, {})[t] = part
        # innermost first: a name then always resolves through unwrapped parents (mlp.fc1 before mlp)
        for name in sorted(by_module, key=lambda n: -n.count(".")):
            layer = MultiTaskLayer(
                get_module(backbone, name), name, by_module[name], len(deltas), self._router, selection
            )
            set_module(backbone, name, layer)
        # the backbone's own head is set aside (kept for unload, not a sub-module): the backbone yields features
        self.__dict__["_head"] = (spec.head, get_module(backbone, spec.head) if spec.head else None)
        if spec.head:
            set_module(backbone, spec.head, nn.Identity())
        self.heads = nn.ModuleList(d.head for d in deltas)
        self.num_classes = {
            d.name: int(d.head.weight.shape[0]) if isinstance(d.head, _Head) else spec.embed_dim for d in deltas
        }
        self.requires_grad_(False)
        self.eval()

    @classmethod
    def from_deltas(
        cls, backbone: nn.Module, deltas: Mapping[str, DeltaSource], *, selection: str = "grouped"
    ) -> MultiTaskModel:
        """Load task deltas onto one frozen backbone without copying its weights.

        Args:
            backbone: the frozen backbone every delta was trained from (plain, no method applied); its head
                (any number of classes, or none: ``num_classes=0``) is set aside: each task brings its own.
            deltas: task name -> a delta file path, a ``(metadata, tensors)`` pair from
                :func:`vpeft.api.read_delta`, or a model adapted with :func:`vpeft.apply`. Any method whose
                layers implement the per-sample protocol (:func:`supported_methods`), any configurations (ranks,
                targets, bottlenecks) mixed.
            selection: how per-sample deltas are applied: ``"grouped"`` (default, fastest on CPU) or
                ``"gather"``; see the module docstring.

        Returns:
            The model, in eval mode, every parameter frozen.

        Raises:
            ConfigError: no deltas, an unsupported method, an unknown ``selection``, or an adapted backbone.
            CheckpointError: a delta of another backbone (name or fingerprint), or tensors that do not fit.
            UnsupportedBackboneError: a backbone kind other than ViT / Swin.
        """
        if selection not in SELECTIONS:
            raise ConfigError(f"selection={selection!r} is invalid; valid options: {', '.join(SELECTIONS)}")
        if not deltas:
            raise ConfigError("deltas is empty; pass {task name: delta file (or delta)} for at least one task")
        spec = _check_plain_backbone(backbone)
        fit = _Fit.of(backbone, spec)  # the fingerprint once, not per task
        loaded = [_load_task(backbone, spec, fit, task, source) for task, source in deltas.items()]
        return cls(backbone, loaded, selection, spec)

    def task_index(self, task_ids: torch.Tensor | Sequence[str | int], batch: int) -> torch.Tensor:
        """The task id of every sample as a CPU LongTensor; validates names, range and length."""
        if isinstance(task_ids, torch.Tensor):
            if task_ids.dtype.is_floating_point or task_ids.dtype == torch.bool or task_ids.ndim != 1:
                raise ConfigError(
                    f"task_ids must be a 1-D integer tensor, got {task_ids.dtype} {tuple(task_ids.shape)}"
                )
            ids = task_ids.to("cpu", torch.long)
        else:
            values = []
            for t in task_ids:
                if isinstance(t, str):
                    if t not in self._index:
                        raise UnknownNameError(suggest(t, self.tasks, "task"))
                    values.append(self._index[t])
                else:
                    values.append(int(t))
            ids = torch.tensor(values, dtype=torch.long)
        if ids.numel() != batch:
            raise ConfigError(f"task_ids has {ids.numel()} entries for a batch of {batch}; give one per sample")
        bad = ids[(ids < 0) | (ids >= len(self.tasks))]
        if bad.numel():
            valid = ", ".join(f"{i}={n}" for i, n in enumerate(self.tasks))
            raise ConfigError(f"task id {int(bad[0])} is out of range; valid ids: {valid}")
        return ids

    def forward(self, x: torch.Tensor, task_ids: torch.Tensor | Sequence[str | int]) -> MultiTaskOutput:
        """Run a mixed batch: sample ``i`` gets the delta and head of task ``task_ids[i]``.

        Args:
            x: the input batch (what the backbone takes).
            task_ids: one task per sample: a LongTensor of task ids, or a list of task names (or ids).

        Returns:
            A :class:`MultiTaskOutput`: logits per task (with the batch positions they belong to);
            ``.per_sample()`` gives one logits vector per sample in batch order.
        """
        if "_unloaded" in self.__dict__:
            raise ConfigError("this MultiTaskModel was unloaded; build a new one with MultiTaskModel.from_deltas")
        batch = x.shape[0]
        ids = self.task_index(task_ids, batch)
        order = torch.argsort(ids, stable=True)
        counts = torch.bincount(ids, minlength=len(self.tasks)).tolist()
        in_order = bool(torch.equal(order, torch.arange(batch)))
        xs = x if in_order else x.index_select(0, order.to(x.device))
        self._router.route = _Route(counts, ids[order].to(x.device))
        try:
            feats = logits_of(self.backbone(xs))
        finally:
            self._router.route = None
        logits, index, start = {}, {}, 0
        for t, (task, n) in enumerate(zip(self.tasks, counts)):
            logits[task] = self.heads[t](feats[start : start + n])
            index[task] = order[start : start + n]
            start += n
        return MultiTaskOutput(logits, index, batch)

    def unload(self) -> nn.Module:
        """Take every multi-task layer out and put the original head back; returns the plain backbone."""
        for name, m in reversed(list(self.backbone.named_modules())):
            if isinstance(m, MultiTaskLayer):
                set_module(self.backbone, name, m.base_layer)
        head_name, head = self._head
        if head_name:
            set_module(self.backbone, head_name, head)
        self.__dict__["_unloaded"] = True
        return self.backbone

    def delta_parameters(self) -> list[nn.Parameter]:
        """The tasks' own tensors (per-module deltas and heads), not the shared backbone's."""
        return [p for m in self.modules() if isinstance(m, MultiTaskLayer) for p in m.parts.parameters()] + list(
            self.heads.parameters()
        )

    def extra_repr(self) -> str:
        return f"tasks={list(self.tasks)}, selection={self.selection}"


def _headless_classifier(backbone: nn.Module) -> str:
    """Where a timm backbone created with ``num_classes=0`` had its head (deltas name their head tensors so)."""
    name = (getattr(backbone, "pretrained_cfg", None) or {}).get("classifier")
    if not isinstance(name, str) or not name:
        return ""
    try:
        backbone.get_submodule(name)
    except AttributeError:
        return ""
    return name


def _make_head(head: Mapping[str, torch.Tensor], feature_dim: int | None, where: str, like: torch.Tensor) -> nn.Module:
    """A task's head from its delta's head tensors (``nn.Identity`` when the delta has none)."""
    if not head:
        return nn.Identity()
    if set(head) - {"weight", "bias"} or "weight" not in head or head["weight"].ndim != 2:
        raise UnsupportedBackboneError(
            f"delta {where}: the head holds {sorted(head)}; per-task heads must be Linear (weight, bias)"
        )
    weight, bias = head["weight"], head.get("bias")
    if feature_dim is not None and weight.shape[1] != feature_dim:
        raise CheckpointError(
            f"delta {where}: its head reads {weight.shape[1]} features, the backbone gives {feature_dim}"
        )
    weight = weight.to(device=like.device, dtype=like.dtype)
    return _Head(weight, None if bias is None else bias.to(device=like.device, dtype=like.dtype))


def _check_plain_backbone(backbone: nn.Module):
    """The spec of ``backbone``; refused when it holds vpeft wrappers or is of a kind without per-sample rows."""
    if is_adapted(backbone) or any(isinstance(m, Wrapper) for m in backbone.modules()):
        raise ConfigError(
            "the backbone already holds vpeft wrappers (a method applied, or another MultiTaskModel); "
            "pass the plain frozen backbone"
        )
    spec = get_spec(backbone)
    if spec.kind not in _KINDS:
        raise UnsupportedBackboneError(
            f"MultiTaskModel supports {'/'.join(_KINDS)} backbones, not {spec.family} ({spec.kind}): per-sample "
            "deltas need layers whose rows are samples (tokens), and CNN LoRA is convolutional"
        )
    return spec


@dataclasses.dataclass(frozen=True)
class _Fit:
    """What every task delta is checked against: the backbone's name and fingerprint, its head's name and width."""

    name: str
    fingerprint: str
    head_name: str | None
    feature_dim: int | None

    @classmethod
    def of(cls, backbone: nn.Module, spec) -> _Fit:
        head_module = get_module(backbone, spec.head) if spec.head else None
        return cls(
            api.backbone_name(backbone),
            api.fingerprint(backbone, exclude=tuple(head_names(backbone, spec))),
            spec.head or _headless_classifier(backbone),
            head_module.in_features if isinstance(head_module, nn.Linear) else None,
        )


def _load_task(backbone: nn.Module, spec, fit: _Fit, task: object, source: DeltaSource) -> _TaskDelta:
    """Read one task's delta, check that it fits ``backbone``, split it into per-sample parts and its head."""
    if not isinstance(task, str) or not task:
        raise ConfigError(f"task names must be non-empty strings, got {task!r}")
    header, tensors, where = _read_source(task, source)
    header.check_fits(backbone=fit.name, fingerprint=fit.fingerprint, where=where.strip("'"))
    if header.kind != "classification":
        raise ConfigError(
            f"task {task!r}: its delta is for a {header.kind!r} task (with its own decoder); MultiTaskModel runs "
            "classification deltas (the backbone's features and a Linear head)"
        )
    cfg = header.config
    prefix = fit.head_name + "." if fit.head_name else None
    head = {k[len(prefix) :]: v for k, v in tensors.items() if prefix and k.startswith(prefix)}
    body = {k: v for k, v in tensors.items() if not (prefix and k.startswith(prefix))}
    label = str(source) if isinstance(source, (str, os.PathLike)) else where  # check_fit quotes it
    try:
        parts = _harvest(backbone, spec, cfg, body, label)
    except _NotPerSample as e:
        raise ConfigError(
            f"task {task!r}: method {cfg.method!r} cannot be selected per sample ({e}); supported methods: "
            f"{', '.join(supported_methods(backbone))}"
        ) from None
    log.info("task %s: %s on %d modules", task, cfg.method, len(parts))
    return _TaskDelta(task, cfg, parts, _make_head(head, fit.feature_dim, where, next(backbone.parameters())))
