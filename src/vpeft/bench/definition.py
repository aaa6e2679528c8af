"""Benchmark definitions as data: a YAML/JSON file -> validated, frozen dataclasses -> one :class:`RunSpec` per run.

A definition names the backbone, the tasks (with their VTAB group), the methods (with settings, a per-method
training recipe and an optional small hyper-parameter grid), the seeds and the shared training recipe::

    name: mini
    backbone: dinov2_vits14_imgfocus
    img_size: 56
    seeds: [0, 1]
    train: {epochs: 3, batch_size: 32, warmup_epochs: 1}
    tasks:
      - {name: cifar10, group: natural}                       # a folder under data_root
      - {name: dsprites_loc, group: structured, generate: dsprites_loc}
    methods:
      - {name: linear, train: {lr: 1.0e-2}}
      - {name: lora, settings: {r: 8}, grid: {lr: [1.0e-3, 3.0e-3]}}

Everything is checked when the file is loaded (unknown keys, methods, settings, recipe values, grid keys, groups,
duplicate names), and every error names the place in the file, the bad value and the valid options. Relative
paths are resolved against the definition file's folder.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vpeft.errors import ConfigError, VpeftError, suggest
from vpeft.tasks.protocols import PROTOCOLS, get_protocol, protocols_of

__all__ = [
    "GROUPS",
    "GENERATORS",
    "SplitNames",
    "TaskSpec",
    "MethodSpec",
    "LatencySpec",
    "BenchDefinition",
    "RunSpec",
    "check_run_timeout",
    "load_definition",
    "parse_definition",
]

GROUPS: tuple[str, ...] = ("natural", "specialized", "structured", "fgvc", "dense", "vision-language", "other")
"""Task groups: the three VTAB-1k groups, the FGVC suite, dense prediction, vision-language, and anything else."""

GENERATORS: tuple[str, ...] = ("digits", "dsprites_loc", "dsprites_ori", "moving_digits")
"""Tasks vpeft can produce offline (``generate:``), written under the definition's ``generated_root``."""


def _kind_taking(kind: str | None, takes, what: str, where: str) -> str:
    """The task kind of an entry that asks for ``what``: the given one if its task type takes it, else the one task
    type that does (a bad or ambiguous kind is an error naming ``where``)."""
    from vpeft.tasks.base import TASKS

    able = [name for name, cls in TASKS.items() if takes(cls)]
    if kind is None and len(able) == 1:
        return able[0]
    if kind not in able:
        raise _err(where, f"{what} needs a task of kind {' or '.join(able) or '(none)'}, got kind {kind!r}")
    return kind


"""How a task's runs are trained and tested (see :class:`TaskSpec`)."""


def _err(where: str, msg: str) -> ConfigError:
    return ConfigError(f"{where}: {msg}")


def _check_keys(data: Any, where: str, allowed: Sequence[str], required: Sequence[str] = ()) -> dict[str, Any]:
    if not isinstance(data, Mapping):
        raise _err(where, f"expected a mapping with keys {', '.join(allowed)}, got {type(data).__name__} {data!r}")
    for key in data:
        if key not in allowed:
            raise _err(where, suggest(str(key), allowed, "key"))
    missing = [k for k in required if k not in data]
    if missing:
        raise _err(where, f"missing required key(s) {', '.join(missing)}")
    return dict(data)


def _check_name(value: Any, where: str) -> str:
    if not isinstance(value, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.+-]*", value):
        raise _err(where, f"{value!r} is not a valid name (letters, digits, and _ . + - after the first character)")
    return value


def _check_mapping(value: Any, where: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping) or not all(isinstance(k, str) for k in value):
        raise _err(where, f"expected a mapping of option names to values, got {value!r}")
    return dict(value)


@dataclass(frozen=True)
class SplitNames:
    """The four protocol splits of a task, by their names in the task folder (VTAB-1k names by default).

    ``train`` + ``val`` choose hyper-parameters; ``trainval`` trains the final model; ``test`` is read once.
    For FGVC folders these are typically ``train``, ``val``, ``trainval`` and ``test`` image folders or lists.
    A folder without a validation split says ``val: null``: nothing can be chosen on it, so its methods run a
    fixed recipe (a grid or ``tune:`` block is refused when the definition is loaded), and ``trainval`` may then
    be the ``train`` split itself.
    """

    train: str = "train800"
    val: str | None = "val200"
    trainval: str = "train800val200"
    test: str = "test"

    @classmethod
    def parse(cls, data: Any, where: str) -> SplitNames:
        if data is None:
            return cls()
        names = [f.name for f in dataclasses.fields(cls)]
        data = _check_keys(data, where, names)
        for key, value in data.items():
            if (not isinstance(value, str) or not value) and not (key == "val" and value is None):
                raise _err(f"{where}.{key}", f"expected a split name, got {value!r}")
        out = cls(**data)
        if out.val is None:
            distinct = out.test not in (out.train, out.trainval)
        else:
            distinct = len({out.train, out.val, out.trainval, out.test}) == 4
        if not distinct:
            what = "train, trainval and test must differ" if out.val is None else "the four splits must be distinct"
            raise _err(where, f"{what}, got {dataclasses.asdict(out)}")
        return out


@dataclass(frozen=True)
class TaskSpec:
    """One task: a folder ``root/name`` in VTAB-1k format (or one image folder per split), or a generated one.

    Attributes:
        name: Folder name (and the task's name in results).
        group: One of :data:`GROUPS`; the leaderboard averages per group.
        root: Folder holding the task folder; ``None`` uses the definition's ``data_root``.
        generate: One of :data:`GENERATORS` to produce the task offline under ``generated_root``.
        splits: The protocol split names in this folder.
        kind: The task type (``vpeft.tasks.task_kinds()``); ``None``: detected from the folder's files.
        options: Task options (e.g. ``{decoder: fpn}`` for segmentation, ``{shots: 16}`` for a few-shot
            zero-shot task); a method entry's ``task_options`` override them.
        protocol: ``"standard"`` (train on trainval, test once) or ``"base-to-novel"`` (CoCoOp's: a zero-shot task
            trained on the base classes -- the first ceil(n/2) labels -- and tested on the base and on the novel
            classes; the score is the harmonic mean HM = 2BN/(B+N)).
        transfer_to: cross-dataset transfer (zero-shot tasks): after training, the delta is also evaluated
            zero-shot on these task folders (under the same root), each with its own class names.
    """

    name: str
    group: str
    root: str | None = None
    generate: str | None = None
    splits: SplitNames = field(default_factory=SplitNames)
    kind: str | None = None
    options: dict[str, Any] = field(default_factory=dict)
    protocol: str = "standard"
    transfer_to: tuple[str, ...] = ()

    @classmethod
    def parse(cls, data: Any, where: str, base: Path) -> TaskSpec:
        keys = ("name", "group", "root", "generate", "splits", "kind", "options", "protocol", "transfer_to")
        data = _check_keys(data, where, keys, ("name", "group"))
        name = _check_name(data["name"], f"{where}.name")
        group = data["group"]
        if group not in GROUPS:
            raise _err(f"{where}.group", suggest(str(group), GROUPS, "group"))
        gen = data.get("generate")
        if gen is not None and gen not in GENERATORS:
            raise _err(f"{where}.generate", suggest(str(gen), GENERATORS, "generator"))
        root = data.get("root")
        if root is not None and gen is not None:
            raise _err(where, "give either root (an existing data folder) or generate, not both")
        if root is not None:
            if not isinstance(root, str) or not root:
                raise _err(f"{where}.root", f"expected a folder path, got {root!r}")
            root = str((base / os.path.expanduser(root)).resolve())
        kind = data.get("kind")
        if kind is not None:
            from vpeft.tasks import task_kinds

            if kind not in task_kinds():
                raise _err(f"{where}.kind", suggest(str(kind), task_kinds(), "task kind"))
        options = _check_mapping(data.get("options") or {}, f"{where}.options")
        splits = SplitNames.parse(data.get("splits"), f"{where}.splits")
        protocol = data.get("protocol", "standard")
        if protocol not in PROTOCOLS:
            raise _err(f"{where}.protocol", suggest(str(protocol), PROTOCOLS.names(), "protocol"))
        if protocol != "standard":  # the task types that declare it (vpeft.tasks.protocols)
            kind = _kind_taking(kind, lambda cls: protocol in protocols_of(cls), f"the {protocol} protocol",
                                f"{where}.kind")  # fmt: skip
            PROTOCOLS.get(protocol).train_options(options, where)  # a bad option names where it is
        transfer = data.get("transfer_to") or []
        if not isinstance(transfer, list) or not all(isinstance(t, str) and t for t in transfer):
            raise _err(f"{where}.transfer_to", f"expected a list of task folder names, got {transfer!r}")
        if transfer:
            kind = _kind_taking(kind, lambda cls: cls.transfers, "cross-dataset transfer", f"{where}.transfer_to")
        return cls(name, group, root, gen, splits, kind, options, protocol, tuple(transfer))


@dataclass(frozen=True)
class MethodSpec:
    """One method entry.

    Attributes:
        name: A registered method (``vpeft methods``).
        label: Its name in results and the leaderboard (unique; default ``name``), e.g. ``lora_r4``.
        settings: Keyword arguments of the method's config (e.g. ``{r: 8, targets: [q, v]}``).
        train: Overrides of the definition's training recipe for this method (e.g. ``{lr: 1.0e-3}``).
        grid: Candidate values per key, chosen on the validation split; a key is a training-recipe field or a
            method setting (prefix ``train.`` / ``method.`` when a name is both). Empty: no selection.
        task_options: Task options for this method's runs, over the task's (e.g. ``{decoder: fpn}``).
        tune: Choose the recipe with Optuna instead of a grid (``vpeft tune``'s search on the train / val splits):
            ``{trials: 8, space: {lr: "1e-4:1e-2:log", r: [4, 8, 16]}, pruner: median, startup_trials: 3}``
            (``space`` in ``--space`` syntax, a list being a choice). Excludes ``grid``.
    """

    name: str
    label: str
    settings: dict[str, Any] = field(default_factory=dict)
    train: dict[str, Any] = field(default_factory=dict)
    grid: dict[str, tuple[Any, ...]] = field(default_factory=dict)
    task_options: dict[str, Any] = field(default_factory=dict)
    tune: dict[str, Any] = field(default_factory=dict)

    def candidates(self) -> list[dict[str, dict[str, Any]]]:
        """The grid's settings in order: ``[{"train": {...}, "method": {...}}, ...]`` (``[]`` without a grid)."""
        if not self.grid:
            return []
        keys = list(self.grid)
        out = []
        for values in itertools.product(*(self.grid[k] for k in keys)):
            cand: dict[str, dict[str, Any]] = {"train": {}, "method": {}}
            for key, value in zip(keys, values):
                part, _, name = key.partition(".")
                cand[part][name] = value
            out.append(cand)
        return out


@dataclass(frozen=True)
class LatencySpec:
    """How inference latency is measured: ``repeats`` timed forward passes of a random batch, after ``warmup``."""

    batch_size: int = 8
    warmup: int = 2
    repeats: int = 5

    @classmethod
    def parse(cls, data: Any, where: str) -> LatencySpec:
        if data is None:
            return cls()
        data = _check_keys(data, where, [f.name for f in dataclasses.fields(cls)])
        for key, value in data.items():
            low = 0 if key == "warmup" else 1
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise _err(f"{where}.{key}", f"expected an int >= {low}, got {value!r}")
        return cls(**data)


@dataclass(frozen=True)
class BenchDefinition:
    """A validated benchmark definition (see the module docstring for the file format)."""

    name: str
    backbone: str
    tasks: tuple[TaskSpec, ...]
    methods: tuple[MethodSpec, ...]
    seeds: tuple[int, ...] = (0,)
    img_size: int | None = None
    pretrained: bool = True
    train: dict[str, Any] = field(default_factory=dict)
    data_root: str | None = None
    generated_root: str | None = None
    device: str = "cpu"
    latency: LatencySpec = field(default_factory=LatencySpec)
    run_timeout_s: float | None = None
    description: str = ""
    source: str | None = None

    def runs(
        self,
        methods: Sequence[str] | None = None,
        tasks: Sequence[str] | None = None,
        seeds: Sequence[int] | None = None,
    ) -> list[RunSpec]:
        """One :class:`RunSpec` per (method, task, seed), optionally restricted; unknown names raise ConfigError."""
        ms = _select(self.methods, methods, lambda m: m.label, "method label")
        ts = _select(self.tasks, tasks, lambda t: t.name, "task")
        ss = list(self.seeds) if seeds is None else list(seeds)
        bad = [s for s in ss if s not in self.seeds]
        if bad:
            raise ConfigError(f"seed {bad[0]} is not in the definition's seeds {list(self.seeds)}")
        return [RunSpec.build(self, m, t, s) for m in ms for t in ts for s in ss]

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        for m in out["methods"]:
            m["grid"] = {k: list(v) for k, v in m["grid"].items()}
        out["seeds"] = list(self.seeds)
        return out


def _select(items, names, key, what):
    if names is None:
        return list(items)
    known = [key(i) for i in items]
    for n in names:
        if n not in known:
            raise ConfigError(suggest(n, known, what))
    return [i for i in items if key(i) in names]


# ---- runs ---------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RunSpec:
    """Everything one (method, task, seed) run needs, JSON-serialisable (it crosses process boundaries)."""

    definition: str
    backbone: str
    img_size: int | None
    pretrained: bool
    device: str
    method_label: str
    method_name: str
    settings: dict[str, Any]
    train: dict[str, Any]
    grid: dict[str, list[Any]]
    task: str
    group: str
    data_root: str | None
    generate: str | None
    splits: dict[str, str]
    seed: int
    latency: dict[str, int]
    task_kind: str | None = None
    task_options: dict[str, Any] = field(default_factory=dict)
    protocol: str = "standard"
    transfer_to: list[str] = field(default_factory=list)
    tune: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def build(cls, d: BenchDefinition, m: MethodSpec, t: TaskSpec, seed: int) -> RunSpec:
        train = {**d.train, **m.train, "seed": seed}
        root = t.root if t.root is not None else (d.generated_root if t.generate else d.data_root)
        return cls(
            definition=d.name,
            backbone=d.backbone,
            img_size=d.img_size,
            pretrained=d.pretrained,
            device=d.device,
            method_label=m.label,
            method_name=m.name,
            settings=dict(m.settings),
            train=train,
            grid={k: list(v) for k, v in m.grid.items()},
            task=t.name,
            group=t.group,
            data_root=root,
            generate=t.generate,
            splits=dataclasses.asdict(t.splits),
            seed=seed,
            latency=dataclasses.asdict(d.latency),
            task_kind=t.kind,
            task_options=get_protocol(t.protocol).train_options({**t.options, **m.task_options}, t.name),
            protocol=t.protocol,
            transfer_to=list(t.transfer_to),
            tune=dict(m.tune),
        )

    @property
    def run_id(self) -> str:
        return f"{self.method_label}/{self.task}/seed{self.seed}"

    def candidates(self) -> list[dict[str, dict[str, Any]]]:
        return MethodSpec(
            self.method_name, self.method_label, grid={k: tuple(v) for k, v in self.grid.items()}
        ).candidates()

    def fingerprint(self) -> str:
        """Hash of what determines the result (not where data lives nor the device): resume matches on it."""
        d = self.to_dict()
        for k in ("data_root", "device"):
            d.pop(k)
        for k in ("task_kind", "task_options"):  # absent when default, so classification fingerprints stay as they were
            if not d[k]:
                d.pop(k)
        if d["protocol"] == "standard":
            d.pop("protocol")
        if not d["transfer_to"]:
            d.pop("transfer_to")
        if not d["tune"]:  # absent without a tune block, so earlier fingerprints stay as they were
            d.pop("tune")
        return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def record_fields(self, fingerprint: str | None = None) -> dict[str, Any]:
        """What every record of this run starts with (success or failure, from any backend): its identity."""
        return {
            "run_id": self.run_id,
            "method": self.method_label,
            "method_name": self.method_name,
            "task": self.task,
            "group": self.group,
            "seed": self.seed,
            "definition": self.definition,
            "fingerprint": fingerprint or self.fingerprint(),
            "spec": self.to_dict(),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RunSpec:
        return cls(**data)


# ---- parsing ------------------------------------------------------------------------------------------------------
_TOP_KEYS = (
    "name", "description", "backbone", "img_size", "pretrained", "seeds", "train", "tasks", "methods",
    "data_root", "generated_root", "device", "latency", "run_timeout_s",
)  # fmt: skip


def _yaml_loader():
    """PyYAML's SafeLoader, plus YAML 1.2 floats: ``1e-3`` is a number (YAML 1.1 reads it as a string)."""
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    pattern = re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?(?:[eE][-+]?[0-9]+)$")
    Loader.add_implicit_resolver("tag:yaml.org,2002:float", pattern, list("-+0123456789"))
    return Loader


def load_definition(path: str | os.PathLike) -> BenchDefinition:
    """Read and validate a definition file (``.yaml``/``.yml`` or ``.json``).

    Raises:
        ConfigError: Unreadable file, bad syntax, or an invalid entry (the message names it).
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"bench definition {str(path)!r} does not exist")
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix.lower() in (".yaml", ".yml"):
            try:
                import yaml
            except ImportError:
                raise ConfigError("reading YAML definitions needs PyYAML: pip install 'vpeft[bench]'") from None
            data = yaml.load(text, Loader=_yaml_loader())  # noqa: S506 (a SafeLoader subclass)
        elif path.suffix.lower() == ".json":
            data = json.loads(text)
        else:
            raise ConfigError(f"bench definition {str(path)!r}: expected a .yaml, .yml or .json file")
    except ConfigError:
        raise
    except Exception as exc:  # yaml.YAMLError / json.JSONDecodeError
        raise ConfigError(f"bench definition {str(path)!r} is not valid {path.suffix[1:].upper()}: {exc}") from None
    return parse_definition(data, base=path.parent, where=path.name)


def parse_definition(data: Any, base: str | os.PathLike = ".", where: str = "definition") -> BenchDefinition:
    """Validate a definition given as a mapping; relative paths resolve against ``base``."""
    from vpeft.train import TrainConfig

    base = Path(base).resolve()
    data = _check_keys(data, where, _TOP_KEYS, ("name", "backbone", "tasks", "methods"))
    name = _check_name(data["name"], f"{where}.name")
    backbone = data["backbone"]
    if not isinstance(backbone, str) or not backbone:
        raise _err(f"{where}.backbone", f"expected a backbone name, got {backbone!r}")
    img_size = data.get("img_size")
    if img_size is not None and (isinstance(img_size, bool) or not isinstance(img_size, int) or img_size < 8):
        raise _err(f"{where}.img_size", f"expected an int >= 8 (pixels), got {img_size!r}")
    pretrained = data.get("pretrained", True)
    if not isinstance(pretrained, bool):
        raise _err(f"{where}.pretrained", f"expected true or false, got {pretrained!r}")
    seeds = _parse_seeds(data.get("seeds", [0]), f"{where}.seeds")
    train = _check_mapping(data.get("train"), f"{where}.train")
    _train_config(TrainConfig, train, f"{where}.train")
    tasks = _parse_list(data["tasks"], f"{where}.tasks", lambda x, w: TaskSpec.parse(x, w, base), lambda t: t.name)
    methods = _parse_list(
        data["methods"], f"{where}.methods", lambda x, w: _parse_method(x, w, train), lambda m: m.label
    )
    _check_selection_has_val(tasks, methods, f"{where}.methods")
    roots = {}
    for key in ("data_root", "generated_root"):
        value = data.get(key)
        if value is not None and (not isinstance(value, str) or not value):
            raise _err(f"{where}.{key}", f"expected a folder path, got {value!r}")
        roots[key] = str((base / os.path.expanduser(value)).resolve()) if value else None
    device = data.get("device", "cpu")
    if not isinstance(device, str) or not re.fullmatch(r"(cpu|cuda|mps)(:\d+)?", device):
        raise _err(f"{where}.device", f"expected cpu, cuda, cuda:N or mps, got {device!r}")
    description = data.get("description", "")
    if not isinstance(description, str):
        raise _err(f"{where}.description", f"expected text, got {description!r}")
    return BenchDefinition(
        name=name,
        backbone=backbone,
        tasks=tuple(tasks),
        methods=tuple(methods),
        seeds=seeds,
        img_size=img_size,
        pretrained=pretrained,
        train=train,
        device=device,
        latency=LatencySpec.parse(data.get("latency"), f"{where}.latency"),
        run_timeout_s=check_run_timeout(data.get("run_timeout_s"), f"{where}.run_timeout_s"),
        description=description.strip(),
        source=where,
        **roots,
    )


def _check_selection_has_val(tasks: Sequence[TaskSpec], methods: Sequence[MethodSpec], where: str) -> None:
    """A grid or a tune block chooses on the validation split: refused for a task that has none (``val: null``)."""
    no_val = [t.name for t in tasks if t.splits.val is None]
    for m in methods:
        if no_val and (len(m.candidates()) > 1 or m.tune):
            raise _err(
                f"{where}.{m.label}",
                f"a {'tune block' if m.tune else 'grid'} chooses on the validation split, and task(s) "
                f"{', '.join(no_val)} have none (splits.val: null); give this method a fixed recipe",
            )


def check_run_timeout(value: Any, where: str = "run_timeout_s") -> float | None:
    """A per-run wall-clock limit in seconds: ``None`` (no limit) or a finite number > 0.

    Args:
        value: The limit; a string (from the command line) is read as a number.
        where: Names the setting in the error message (``--run-timeout``, ``mini.yaml.run_timeout_s``).

    Raises:
        ConfigError: Not a number, not finite, or not positive.
    """
    if value is None:
        return None
    number = value
    if isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            number = None
    if isinstance(number, bool) or not isinstance(number, (int, float)) or not math.isfinite(number) or number <= 0:
        raise _err(where, f"expected a number of seconds > 0 (a per-run wall-clock limit), got {value!r}")
    return float(number)


def _parse_seeds(value: Any, where: str) -> tuple[int, ...]:
    if isinstance(value, int) and not isinstance(value, bool):
        value = [value]
    if not isinstance(value, list) or not value:
        raise _err(where, f"expected a non-empty list of seeds, got {value!r}")
    for s in value:
        if isinstance(s, bool) or not isinstance(s, int) or not 0 <= s < 2**32:
            raise _err(where, f"seed {s!r} is not an int in [0, 2**32)")
    if len(set(value)) != len(value):
        raise _err(where, f"seeds repeat: {value}")
    return tuple(value)


def _parse_list(value: Any, where: str, parse, key) -> list:
    if not isinstance(value, list) or not value:
        raise _err(where, f"expected a non-empty list, got {value!r}")
    items = [parse(x, f"{where}[{i}]") for i, x in enumerate(value)]
    seen: set[str] = set()
    for i, item in enumerate(items):
        if key(item) in seen:
            raise _err(f"{where}[{i}]", f"{key(item)!r} appears twice (give each entry a distinct name/label)")
        seen.add(key(item))
    return items


def _train_config(cls, values: Mapping[str, Any], where: str):
    valid = [f.name for f in dataclasses.fields(cls)]
    for k in values:
        if k not in valid:
            raise _err(where, suggest(k, valid, "training option"))
    try:
        return cls(**values)
    except VpeftError as exc:
        raise _err(where, str(exc)) from None


def _method_config(name: str, settings: Mapping[str, Any], where: str):
    from vpeft.config import MethodConfig

    try:
        return MethodConfig.from_dict({"method": name, **settings})
    except VpeftError as exc:
        raise _err(where, str(exc)) from None


def _parse_method(data: Any, where: str, base_train: Mapping[str, Any]) -> MethodSpec:
    from vpeft.registry import get_method
    from vpeft.train import TrainConfig

    if isinstance(data, str):
        data = {"name": data}
    data = _check_keys(data, where, ("name", "label", "settings", "train", "grid", "task_options", "tune"), ("name",))
    name = data["name"]
    if not isinstance(name, str):
        raise _err(f"{where}.name", f"expected a method name, got {name!r}")
    try:
        cfg_cls = get_method(name).config_cls
    except VpeftError as exc:
        raise _err(f"{where}.name", str(exc)) from None
    label = _check_name(data.get("label", name), f"{where}.label")
    settings = _check_mapping(data.get("settings"), f"{where}.settings")
    _method_config(name, settings, f"{where}.settings")
    train = _check_mapping(data.get("train"), f"{where}.train")
    _train_config(TrainConfig, {**base_train, **train}, f"{where}.train")
    grid = _parse_grid(data.get("grid"), f"{where}.grid", TrainConfig, cfg_cls)
    task_options = _check_mapping(data.get("task_options") or {}, f"{where}.task_options")
    tune = _parse_tune(data.get("tune"), f"{where}.tune", name, settings)
    if tune and grid:
        raise _err(where, "give either a grid or a tune block: both choose the recipe on the validation split")
    spec = MethodSpec(name, label, settings, train, grid, task_options, tune)
    for i, cand in enumerate(spec.candidates()):  # every grid point must be a valid configuration
        _train_config(TrainConfig, {**base_train, **train, **cand["train"]}, f"{where}.grid (setting {i}: {cand})")
        _method_config(name, {**settings, **cand["method"]}, f"{where}.grid (setting {i}: {cand})")
    return spec


_MAX_GRID = 64


def _parse_tune(value: Any, where: str, method: str, settings: Mapping[str, Any]) -> dict[str, Any]:
    """A method's ``tune:`` block, checked as ``vpeft tune`` checks its flags (space keys, bounds, budget)."""
    if value is None:
        return {}
    block = _check_keys(value, where, ("trials", "space", "pruner", "startup_trials", "sampler_seed"), ("space",))
    from vpeft.tune import TuneConfig, parse_space

    try:
        parse_space(method, _check_mapping(block["space"], f"{where}.space"))
        TuneConfig(**{k: v for k, v in block.items() if k != "space"})
    except VpeftError as exc:
        raise _err(where, str(exc)) from None
    return dict(block)


def _parse_grid(value: Any, where: str, train_cls, cfg_cls) -> dict[str, tuple[Any, ...]]:
    """Resolve grid keys to ``train.<field>`` / ``method.<field>``; values must be non-empty lists."""
    grid = _check_mapping(value, where)
    train_fields = [f.name for f in dataclasses.fields(train_cls) if f.name != "seed"]
    method_fields = [f.name for f in dataclasses.fields(cfg_cls)]
    out: dict[str, tuple[Any, ...]] = {}
    for key, values in grid.items():
        part, dot, fname = key.partition(".")
        if not dot:
            fname = key
            in_train, in_method = key in train_fields, key in method_fields
            if in_train and in_method:
                raise _err(f"{where}.{key}", f"{key!r} is both a training option and a method setting: "
                           f"write train.{key} or method.{key}")  # fmt: skip
            part = "train" if in_train else "method" if in_method else ""
        valid = {"train": train_fields, "method": method_fields}.get(part)
        if not valid or fname not in valid:
            options = [*train_fields, *method_fields]
            raise _err(f"{where}.{key}", suggest(fname, options, "grid key"))
        if not isinstance(values, list) or not values:
            raise _err(f"{where}.{key}", f"expected a non-empty list of candidate values, got {values!r}")
        out[f"{part}.{fname}"] = tuple(tuple(v) if isinstance(v, list) else v for v in values)
    size = 1
    for v in out.values():
        size *= len(v)
    if size > _MAX_GRID:
        raise _err(where, f"{size} settings; a grid is meant to be small (at most {_MAX_GRID})")
    return out
