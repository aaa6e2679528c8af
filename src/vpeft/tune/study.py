"""``vpeft tune``: a method's recipe chosen on val with Optuna, then retrained once and tested once.

Protocol (VPT's and the PETL_Vision study's, with vpeft's VTAB-1k splits):

1. every trial draws a recipe from the :class:`~vpeft.tune.space.SearchSpace` with TPE (Optuna's
   ``TPESampler``), trains on ``search_splits[0]`` (``train800``) and is scored by the task's primary metric on
   ``search_splits[1]`` (``val200``); with a pruner, the val metric after every epoch is reported to Optuna and a
   trial the pruner judges hopeless (median or successive halving) stops early and is marked pruned;
2. after ``trials`` finished trials (complete + pruned) the best complete trial's recipe is retrained on
   ``final_splits[0]`` (``train800val200``) and evaluated once on ``final_splits[1]`` (``test``): the test split
   is never opened before that step (a test proves it).

The study lives in an Optuna storage (default: SQLite ``OUT/study.db``), so a killed ``vpeft tune`` resumes with
the trials it has: a trial that was running in a process that is gone is marked failed and its recipe queued again,
and only the missing trials run. Several processes (or machines, with ``storage`` a server database URL such as
``postgresql://...``) sharing one storage and study name share the study. The study records its identity (backbone,
task folder, method and its fixed options, space, splits, image size, base training config, seed, direction); a
study continued under any other identity is refused with the differing fields named.

Output folder: ``study.db``, ``trials/NNNN/`` (each trial's finetune run: ``delta.safetensors``, ``metrics.json``,
``result.json``), ``final/`` (the retrained run), ``tune_result.json`` (chosen recipe, its val score, the test
result, trials by state, CPU time) and ``plots/`` (Optuna's optimisation history and parameter importances as
HTML).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import socket
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from ..config import MethodConfig
from ..errors import ConfigError
from ..files import atomic_write, folder_lock, pid_alive
from ..train import TrainConfig
from ..train.metrics import write_json_atomic
from .space import SearchSpace

__all__ = ["TuneConfig", "run_tune", "PRUNERS", "identity_diff", "final_table", "trial_line"]

log = logging.getLogger(__name__)

PRUNERS = ("median", "halving", "none")
RESULT_NAME = "tune_result.json"


@dataclasses.dataclass(frozen=True)
class TuneConfig:
    """How a study searches.

    Attributes:
        trials: Finished trials (complete + pruned) the study runs in all; a resumed study runs only the missing
            ones, and raising it on a later call extends the study.
        pruner: ``median`` (Optuna's MedianPruner: stop a trial whose val metric after an epoch is below the
            median of earlier trials at that epoch), ``halving`` (successive halving) or ``none``.
        startup_trials: Random trials before TPE models the space, and trials before the median pruner prunes.
        sampler_seed: Seed of the TPE sampler (a resumed study reseeds from it and the trial count).
        search_splits: ``(train, val)``: each trial trains on the first and is scored on the second.
        final_splits: ``(trainval, test)``: the chosen recipe retrains on the first, tested once on the second.
        final: Retrain and test the chosen recipe (otherwise stop after the search; the test split is never read).
    """

    trials: int = 20
    pruner: str = "median"
    startup_trials: int = 5
    sampler_seed: int = 0
    search_splits: tuple[str, str] = ("train800", "val200")
    final_splits: tuple[str, str] = ("train800val200", "test")
    final: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.trials, int) or isinstance(self.trials, bool) or not 1 <= self.trials <= 100_000:
            raise ConfigError(f"trials={self.trials!r} is invalid; expected an int in [1, 100000]")
        if not isinstance(self.startup_trials, int) or not 0 <= self.startup_trials <= 100_000:
            raise ConfigError(f"startup_trials={self.startup_trials!r} is invalid; expected an int in [0, 100000]")
        if self.pruner not in PRUNERS:
            raise ConfigError(f"pruner={self.pruner!r} is invalid; valid pruners: {', '.join(PRUNERS)}")
        for name in ("search_splits", "final_splits"):
            pair = getattr(self, name)
            if len(pair) != 2 or not all(isinstance(s, str) and s for s in pair) or pair[0] == pair[1]:
                raise ConfigError(f"{name}={pair!r} is invalid; expected two different split names (train, eval)")
        if self.final_splits[1] in self.search_splits:
            raise ConfigError(
                f"the test split {self.final_splits[1]!r} is one of the search splits {list(self.search_splits)}: "
                "a recipe chosen on the test split is not a test result"
            )


def identity_diff(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """The fields of two identities that differ, as ``"field: old -> new"``."""
    keys = sorted(set(old) | set(new))
    return [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in keys if old.get(k) != new.get(k)]


def _with_options(method: Mapping[str, Any], options: Mapping[str, Any]) -> dict[str, Any]:
    """``method`` (a config dict) with ``options`` set; ``NAME.KEY`` keys go into a composition's parts."""
    cfg = json.loads(json.dumps(dict(method)))
    for key, value in options.items():
        name, dot, opt = key.partition(".")
        if dot and cfg.get("method") == "compose":
            part = next((m for m in cfg["methods"] if m.get("method") == name), None)
            if part is None:
                raise ConfigError(f"--space {key!r}: {name!r} is not one of the composed methods")
            part[opt] = value
        else:
            cfg[key] = value
    return cfg


class _Search:
    """One study's objective: builds each trial's recipe, trains it with :func:`vpeft.run.finetune`."""

    def __init__(self, run: dict[str, Any], space: SearchSpace, cfg: TuneConfig, out: Path, metric: str) -> None:
        from ..run import RunRequest

        self.run, self.space, self.cfg, self.out, self.metric = run, space, cfg, out, metric
        self.request = RunRequest(**run)  # every trial and the final run are this request with their own recipe

    def recipe(self, values: Mapping[str, Any]) -> tuple[dict[str, Any], TrainConfig]:
        """The method config dict and training config of one assignment of the space (validated)."""
        train_over, method_over = self.space.split(values)
        method = _with_options(self.run["method"], method_over)
        MethodConfig.from_dict(method)  # a bad value is an error naming the field, before any training
        base: TrainConfig = self.run["train_cfg"]
        return method, TrainConfig.from_dict({**base.to_dict(), **train_over})

    def check_corners(self) -> None:
        """Validate every bound / choice of the space against the configs up front (one parameter at a time)."""
        for p in self.space.params:
            values = list(p.choices) if p.kind == "categorical" else [p.low, p.high]
            for v in values:
                v = int(v) if p.kind == "int" else v
                try:
                    self.recipe({p.name: v})
                except ConfigError as exc:
                    raise ConfigError(f"--space {p.name}={p.describe()}: the value {v!r} is invalid: {exc}") from None

    def finetune(self, method: Mapping[str, Any], train_cfg: TrainConfig, splits: tuple[str, str], out: Path,
                 val_each_epoch: bool = False, callbacks: list[Callable] | None = None):  # fmt: skip
        from ..run import finetune

        request = self.request.replace(
            method=dict(method),
            train_cfg=train_cfg,
            train_split=splits[0],
            eval_split=splits[1],
            val_split=splits[1] if val_each_epoch else None,
            out_dir=out,
            progress=False,
        )
        return finetune(request, callbacks=callbacks)

    def __call__(self, trial: Any) -> float:
        import optuna

        values = self.space.suggest(trial)
        method, train_cfg = self.recipe(values)
        trial.set_user_attr("pid", os.getpid())
        trial.set_user_attr("host", socket.gethostname())
        pruned: list[int] = []
        key = f"val_{self.metric}"

        def report(record: Mapping[str, Any]) -> bool:
            value = record.get(key)
            if value is None:
                return False
            trial.report(float(value), int(record["epoch"]))
            if trial.should_prune():
                pruned.append(int(record["epoch"]))
                return True
            return False

        folder = self.out / "trials" / f"{trial.number:04d}"
        if folder.exists():  # a retried trial's leftovers: trials never resume, they run again
            _clear_run(folder)
        cpu0, wall0 = time.process_time(), time.perf_counter()
        use_pruner = self.cfg.pruner != "none"
        callbacks = [report] if use_pruner else None
        rec = self.finetune(method, train_cfg, self.cfg.search_splits, folder, use_pruner, callbacks)
        cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
        run_identity = json.loads((folder / "result.json").read_text(encoding="utf-8")).get("run")
        attrs = {"cpu_s": cpu, "wall_s": wall, "run": run_identity, "method_config": method,
                 "train": train_cfg.to_dict(), "trainable_params": rec.trainable_params,
                 "method_params": rec.method_params, "val": rec.score, "epochs_run": len(_history(folder))}  # fmt: skip
        for k, v in attrs.items():
            trial.set_user_attr(k, v)
        if pruned:
            trial.set_user_attr("pruned_at_epoch", pruned[0])
            raise optuna.TrialPruned(f"pruned after epoch {pruned[0]} ({key} below the pruner's bar)")
        return rec.score


def _history(folder: Path) -> list[Any]:
    try:
        return json.loads((folder / "metrics.json").read_text(encoding="utf-8")).get("history", [])
    except (OSError, ValueError):
        return []


def _clear_run(folder: Path) -> None:
    for p in folder.iterdir():
        if p.is_file():
            p.unlink()


def _pruner(cfg: TuneConfig):
    import optuna

    if cfg.pruner == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=cfg.startup_trials, n_warmup_steps=0)
    if cfg.pruner == "halving":
        return optuna.pruners.SuccessiveHalvingPruner()
    return optuna.pruners.NopPruner()


def _requeue_orphans(study: Any, storage: Any) -> int:
    """Trials left RUNNING by a process of this host that is gone: mark them failed, queue their recipe again."""
    import optuna
    from optuna.trial import TrialState

    host, n = socket.gethostname(), 0
    study_id = storage.get_study_id_from_name(study.study_name)
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        pid = t.user_attrs.get("pid")
        if t.user_attrs.get("host") != host or not isinstance(pid, int) or pid_alive(pid) and pid != os.getpid():
            continue
        trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, t.number)
        storage.set_trial_state_values(trial_id, TrialState.FAIL)
        study.enqueue_trial(dict(t.params), user_attrs={"retry_of": t.number}, skip_if_exists=False)
        n += 1
    if n:
        optuna.logging.get_logger("optuna")  # keep optuna's own logger configured
        log.info("requeued %d trial(s) left running by a stopped process", n)
    return n


def _open_study(identity: dict[str, Any], cfg: TuneConfig, out: Path, storage_url: str | None, name: str):
    import optuna

    url = storage_url or f"sqlite:///{(out / 'study.db').resolve()}"
    storage = optuna.storages.RDBStorage(url)
    sampler = optuna.samplers.TPESampler(n_startup_trials=cfg.startup_trials, seed=cfg.sampler_seed)
    study = optuna.create_study(study_name=name, storage=storage, sampler=sampler, pruner=_pruner(cfg),
                                direction="maximize", load_if_exists=True)  # fmt: skip
    recorded = study.user_attrs.get("vpeft_identity")
    if recorded is None:
        study.set_user_attr("vpeft_identity", identity)
    elif recorded != json.loads(json.dumps(identity)):
        diff = identity_diff(recorded, json.loads(json.dumps(identity)))
        raise ConfigError(
            f"study {name!r} in {url} was started with another set-up; it cannot continue under this one "
            f"({'; '.join(diff)}); use another --out / --study-name, or the original flags"
        )
    return study, storage


def _counts(study: Any) -> dict[str, int]:
    from optuna.trial import TrialState

    out = {s.name.lower(): 0 for s in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL, TrialState.RUNNING)}
    for t in study.get_trials(deepcopy=False):
        key = t.state.name.lower()
        out[key] = out.get(key, 0) + 1
    return out


def trial_line(trial: Any, metric: str, total: int) -> str:
    """One progress line: ``trial 3/20  complete  val top1 0.8125  lr=0.003 r=8  (cpu 12.1 s)``."""
    value = trial.value if trial.value is not None else trial.user_attrs.get("val")
    shown = f"{value:.4f}" if isinstance(value, (int, float)) else "-"
    state = trial.state.name.lower()
    if state == "pruned":
        state = f"pruned@{trial.user_attrs.get('pruned_at_epoch', '?')}"
    params = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in trial.params.items())
    return (f"trial {trial.number + 1}/{total}  {state:<10} val {metric} {shown}  {params}  "
            f"(cpu {trial.user_attrs.get('cpu_s', 0.0):.1f} s)")  # fmt: skip


def _final(search: _Search, best: Any, out: Path) -> dict[str, Any]:
    """Retrain the chosen recipe on the final train split and read the test split once.

    A ``final/`` run of the same recipe that already finished (a tune re-run after it) is reused, not repeated:
    the test split is read once per chosen recipe.
    """
    method, train_cfg = search.recipe(best.params)
    splits, folder = search.cfg.final_splits, out / "final"
    previous = _read_json(folder / "result.json")
    same = previous is not None and previous.get("train") == train_cfg.to_dict() and _same_method(previous, method)
    if same and previous.get("train_split") == splits[0] and previous.get("eval_split") == splits[1]:
        log.info("the chosen recipe's final run is already in %s: reused", folder)
        rec = previous
        cpu = float((_read_json(out / RESULT_NAME) or {}).get("final_cpu_s") or 0.0)
    else:
        if folder.exists():
            _clear_run(folder)
        cpu0 = time.process_time()
        rec = search.finetune(method, train_cfg, splits, folder).to_dict()
        cpu = time.process_time() - cpu0
    keys = ("method", "score", "trainable_params", "method_params", "primary_metric")
    metric = rec.get("primary_metric")
    test = {metric: rec.get(metric), "loss": rec.get("eval_loss"), "n": rec.get("eval_n")}
    return {"final_splits": list(splits), "final_cpu_s": cpu, "test": test, **{k: rec.get(k) for k in keys}}


def _same_method(record: Mapping[str, Any], method: Mapping[str, Any]) -> bool:
    try:
        return MethodConfig.from_dict(record["config"]) == MethodConfig.from_dict(dict(method))
    except (KeyError, ConfigError, TypeError):
        return False


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def final_table(summary: Mapping[str, Any]) -> str:
    """The closing table of ``vpeft tune``: trials by state, the chosen recipe, its val and test scores."""
    metric = summary["metric"]
    t = summary["trials"]
    rows = [
        ("trials", f"{t.get('complete', 0)} complete, {t.get('pruned', 0)} pruned, {t.get('fail', 0)} failed"),
        ("best trial", f"{summary['best_trial'] + 1}"),
        ("recipe", " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                            for k, v in summary["best_params"].items())),
        (f"val {metric}", f"{100 * summary['best_val']:.2f}"),
    ]  # fmt: skip
    if "score" in summary:
        rows.append((f"test {metric}", f"{100 * summary['score']:.2f} ({summary['final_splits'][1]}, read once)"))
        rows.append(("cpu time", f"{summary['cpu_s']:.1f} s (search {summary['search_cpu_s']:.1f} s)"))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def _plots(study: Any, out: Path) -> list[str]:
    """Optuna's optimisation history and parameter importances as HTML (plotly.js written once beside them)."""
    written = []
    folder = out / "plots"
    try:
        import optuna.visualization as vis
    except ImportError:  # pragma: no cover - optuna ships it
        return written
    folder.mkdir(parents=True, exist_ok=True)
    for name, make in (("history", vis.plot_optimization_history), ("importances", vis.plot_param_importances)):
        try:
            with warnings.catch_warnings():  # optuna warns that importances of a handful of trials are equal
                warnings.simplefilter("ignore", UserWarning)
                fig = make(study)
        except (ImportError, ValueError, RuntimeError) as exc:  # plotly missing, or too few complete trials
            log.info("no %s plot: %s", name, exc)
            continue
        path = folder / f"{name}.html"
        atomic_write(path, lambda tmp, fig=fig: fig.write_html(str(tmp), include_plotlyjs="directory"))
        written.append(str(path.relative_to(out)))
    return written


def run_tune(
    *,
    backbone: str,
    method: MethodConfig | Mapping[str, Any] | str,
    task: str,
    space: SearchSpace,
    out_dir: str | os.PathLike,
    tune: TuneConfig | None = None,
    train_cfg: TrainConfig | None = None,
    data_root: str | os.PathLike | None = None,
    img_size: int | None = None,
    pretrained: bool = True,
    task_kind: str | None = None,
    task_options: Mapping[str, Any] | None = None,
    device: str = "cpu",
    num_workers: int = 0,
    storage: str | None = None,
    study_name: str | None = None,
    on_trial: Callable[[str], None] | None = None,
    enqueue: Sequence[Mapping[str, Any]] = (),
) -> dict[str, Any]:
    """Tune ``method``'s recipe for ``task`` over ``space`` on val, then retrain and test the best once.

    Args:
        method: the method and its fixed options (a name, a config dict or a :class:`MethodConfig`); the space
            overrides the options it tunes.
        space: what is tuned (:func:`vpeft.tune.parse_space`).
        tune: trials, pruner, splits (:class:`TuneConfig`).
        train_cfg: the base training recipe; the space overrides the fields it tunes.
        storage: an Optuna storage URL (default: SQLite in ``out_dir``); study_name: default ``METHOD-TASK``.
        on_trial: called with a progress line after every trial of this process.
        enqueue: recipes tried first (e.g. the method's fixed recipe, so the study can only improve on it), each
            an assignment of some of the space's keys (TPE draws the others); queued when the study is created.

    Returns:
        The summary written to ``out_dir/tune_result.json``.
    """
    import optuna

    cfg = tune or TuneConfig()
    base = train_cfg or TrainConfig()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    run = {"backbone": backbone, "method": _method_dict(method, space), "task": task, "data_root": data_root,
           "img_size": img_size, "pretrained": pretrained, "task_kind": task_kind,
           "task_options": dict(task_options or {}) or None, "device": device, "num_workers": num_workers,
           "train_cfg": base}  # fmt: skip
    search, identity = _new_search(run, space, cfg, out)
    name = study_name or f"{run['method']['method']}-{task}"
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    with folder_lock(out, "vpeft tune", what="--out", wait=True):  # two processes creating one SQLite study race
        study, store = _open_study(identity, cfg, out, storage, name)
    _enqueue(study, search, space, enqueue)
    _requeue_orphans(study, store)
    _optimize(study, search, cfg, search.metric, on_trial)
    return _finish(study, search, identity, name, storage, cfg, out)


def _method_dict(method: MethodConfig | Mapping[str, Any] | str, space: SearchSpace) -> dict[str, Any]:
    """``method`` as a validated config dict of the method ``space`` was built for."""
    if isinstance(method, str):
        method = {"method": method}
    method_dict = method.to_dict() if isinstance(method, MethodConfig) else dict(method)
    MethodConfig.from_dict(method_dict)
    if method_dict.get("method") not in (space.method, "compose"):
        raise ConfigError(f"the space was built for {space.method!r}, the method is {method_dict.get('method')!r}")
    return method_dict


def _new_search(run: dict[str, Any], space: SearchSpace, cfg: TuneConfig, out: Path) -> tuple[_Search, dict[str, Any]]:
    """The trials' runner (its corners checked) and the study's identity (what a resumed study must match)."""
    from ..run import open_task, task_kind_for

    folder = open_task(run["data_root"], run["task"])
    kind = task_kind_for(run["backbone"], run["task_kind"])
    metric = folder.task(kind, **dict(run["task_options"] or {})).primary_metric
    run = {**run, "data_root": folder.root, "task_kind": kind}
    search = _Search(run, space, cfg, out, metric)
    search.check_corners()
    identity = {
        "backbone": run["backbone"], "pretrained": run["pretrained"], "img_size": run["img_size"],
        "task": run["task"], "task_folder": str(folder.path.resolve()), "task_kind": kind,
        "task_options": run["task_options"], "method": run["method"], "space": space.to_dict(),
        "search_splits": list(cfg.search_splits), "metric": metric, "train": run["train_cfg"].to_dict(),
        "pruner": cfg.pruner, "sampler_seed": cfg.sampler_seed,
    }  # fmt: skip
    return search, identity


def _finish(study: Any, search: _Search, identity: dict[str, Any], name: str, storage: str | None,
            cfg: TuneConfig, out: Path) -> dict[str, Any]:  # fmt: skip
    """Choose the best complete trial, retrain it and test once (``cfg.final``), plot, write the summary."""
    from optuna.trial import TrialState

    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not complete:
        raise ConfigError(f"no trial of study {name!r} completed (all pruned or failed): nothing to choose from")
    summary = _summary(study, identity, name, storage, search.metric, cfg)
    best = study.best_trial
    # the trials are shared between processes; the final run, the plots and the summary have one writer: a second
    # process waits here, then reuses the first one's final run
    with folder_lock(out, "vpeft tune", what="--out", wait=True):
        if cfg.final:
            summary.update(_final(search, best, out))
            summary["cpu_s"] = summary["search_cpu_s"] + summary["final_cpu_s"]
        summary["plots"] = _plots(study, out)
        write_json_atomic(out / RESULT_NAME, summary)
    return summary


def _enqueue(study: Any, search: _Search, space: SearchSpace, enqueue: Sequence[Mapping[str, Any]]) -> None:
    """Queue the given recipes first (validated like every drawn recipe), once, when the study is new."""
    if not enqueue or study.trials:
        return
    names = {p.name for p in space.params}
    for values in enqueue:
        unknown = sorted(set(values) - names)
        if unknown:
            raise ConfigError(f"enqueued recipe {dict(values)} sets {unknown}, which the space does not tune")
        search.recipe(values)
        study.enqueue_trial(dict(values))


def _optimize(study: Any, search: _Search, cfg: TuneConfig, metric: str, on_trial) -> None:
    """Run the trials the budget still allows (shared studies count every process's finished trials)."""
    from optuna.study import MaxTrialsCallback
    from optuna.trial import TrialState

    finished = (TrialState.COMPLETE, TrialState.PRUNED)
    done = len(study.get_trials(deepcopy=False, states=finished))

    def progress(study_: Any, trial: Any) -> None:
        line = trial_line(trial, metric, cfg.trials)
        log.info("%s", line)
        if on_trial is not None:
            on_trial(line)

    if done < cfg.trials:
        study.optimize(search, n_trials=cfg.trials - done, catch=(),
                       callbacks=[MaxTrialsCallback(cfg.trials, states=finished), progress])  # fmt: skip


def _summary(study: Any, identity: dict[str, Any], name: str, storage: str | None, metric: str,
             cfg: TuneConfig) -> dict[str, Any]:  # fmt: skip
    """What tune_result.json says of the search: the study, the budget, the best trial, every trial's history."""
    best, trials = study.best_trial, study.get_trials(deepcopy=False)
    return {
        "identity": identity,
        "study": name,
        "storage": storage or "sqlite:///study.db",
        "metric": metric,
        "trials": _counts(study),
        "budget": cfg.trials,
        "search_cpu_s": sum(float(t.user_attrs.get("cpu_s", 0.0)) for t in trials),
        "best_trial": best.number,
        "best_params": dict(best.params),
        "best_val": best.value,
        "best_method_config": best.user_attrs.get("method_config"),
        "best_train": best.user_attrs.get("train"),
        "history": [
            {
                "number": t.number,
                "state": t.state.name.lower(),
                "value": t.value,
                "params": dict(t.params),
                "cpu_s": t.user_attrs.get("cpu_s"),
                "pruned_at_epoch": t.user_attrs.get("pruned_at_epoch"),
            }
            for t in trials
        ],
    }
