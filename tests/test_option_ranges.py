"""Every numeric option of every ``vpeft`` command is range-checked, and every option naming where a command writes
is checked writable, before any work: a one-line error naming the option, the bad value and what is valid, exit 2,
no output folder left.

The cases are read from the parser itself: a new numeric or writing option without a declared check fails
``test_every_numeric_option_declares_its_range`` / ``test_every_writing_option_declares_its_destination``.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import typing
from pathlib import Path

import pytest

import vpeft
from vpeft.cli import _parser, main
from vpeft.config import OPTION_CHECKS, Range
from vpeft.run import build_backbone
from vpeft.train import TrainConfig


def _commands() -> dict[str, argparse.ArgumentParser]:
    parser = _parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


COMMANDS = _commands()


def _numeric(action: argparse.Action) -> bool:
    return isinstance(action.type, Range) or action.type in (int, float)


def _declared(command: str) -> dict[str, tuple[str, typing.Any]]:
    return COMMANDS[command].get_default(OPTION_CHECKS) or {}


TRAIN_FIELDS = {f.name for f in dataclasses.fields(TrainConfig)}

# what the work of each command starts with: reaching one of these means the checks did not run first
WORK = [
    ("vpeft.run", "finetune"),
    ("vpeft.run", "evaluate_delta"),
    ("vpeft.run", "merge_delta"),
    ("vpeft.run", "demo"),
    ("vpeft.run", "evaluate_zero_shot"),
    ("vpeft.run", "export_peft_delta"),
    ("vpeft.run", "import_peft_delta"),
    ("vpeft.run", "build_backbone"),
    ("vpeft.tune", "run_tune"),
    ("vpeft.bench", "load_definition"),
    ("vpeft.bench", "run_bench"),
    ("vpeft.bench", "write_report"),
    ("vpeft.search.recipe", "run_search"),
]


class WorkStarted(AssertionError):
    pass


@pytest.fixture
def no_work(monkeypatch):
    """Each command's work replaced by a tripwire: a check that runs too late (or not at all) fails the test."""
    import importlib

    for module, name in WORK:

        def tripwire(*args, _name=name, **kwargs):
            raise WorkStarted(f"{_name} was called: the option was not checked before the work")

        monkeypatch.setattr(importlib.import_module(module), name, tripwire)


def _base(command: str, tmp: Path) -> list[str]:
    """A command line of ``command`` valid but for the option under test (appended after it: the last one wins)."""
    out = str(tmp / "out")
    return {
        "train": ["train", "--backbone", "test_vit", "--method", "lora", "--task", "digits", "--out", out, "--quiet"],
        "eval": ["eval", "--delta", str(tmp / "delta.safetensors")],
        "merge": ["merge", "--delta", str(tmp / "delta.safetensors"), "--out", str(tmp / "out" / "m.safetensors")],
        "demo": ["demo", "--out", out, "--quiet"],
        "tune": [
            "tune",
            "--backbone",
            "test_vit",
            "--method",
            "lora",
            "--task",
            "digits",
            "--space",
            "lr=1e-4:1e-2:log",
            "--out",
            out,
            "--quiet",
        ],  # fmt: skip
        "zeroshot": ["zeroshot", "--backbone", "test_vit", "--task", "digits", "--out", str(tmp / "out" / "z.json")],
        "export": ["export", str(tmp / "delta.safetensors"), "--format", "peft", "--out", out],
        "import": ["import", str(tmp / "adapter"), "--format", "peft", "--out", str(tmp / "out" / "d.safetensors")],
        "bench": ["bench", str(tmp / "def.yaml"), "--out", out, "--quiet"],
        "report": ["report", str(tmp / "results")],
        "search": ["search", "--backbone", "test_vit", "--task", "digits", "--budget", "1000", "--out", out, "--quiet"],
        "serve": ["serve", "--backbone", "test_vit", "--deltas", str(tmp)],
    }[command]


def _run(argv: list[str], capsys) -> tuple[int, str]:
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return code, err


# ---- numeric options ------------------------------------------------------------------------------------------
# TrainConfig's flags are checked by TrainConfig itself (its ranges, some relative to other fields: warm-up within
# the epochs, min_lr within lr); the CLI names the flag. Defaults: epochs 10, lr 1e-3.
TRAIN_BAD = {
    "epochs": [("0", "an int >= 1")],
    "lr": [
        ("0", "a number in (0.0, 1e+30]"),
        ("-1e-3", "a number in (0.0, 1e+30]"),
        ("2e30", "a number in (0.0, 1e+30]"),
    ],
    "weight_decay": [("-1", "a number >= 0.0")],
    "warmup_epochs": [("-1", "a number in [0.0, 10.0]"), ("11", "a number in [0.0, 10.0]")],
    "batch_size": [("0", "an int >= 1")],
    "label_smoothing": [("1", "a number in [0.0, 1.0)"), ("-0.1", "a number in [0.0, 1.0)")],
    "grad_accum": [("0", "an int >= 1")],
    "seed": [("-1", "an int in [0, 4294967295]"), ("4294967296", "an int in [0, 4294967295]")],
    "min_lr": [("-1", "a number in [0.0, 0.001]"), ("0.01", "a number in [0.0, 0.001]")],
    "max_grad_norm": [("0", "a number > 0.0"), ("-1", "a number > 0.0")],
    "log_every": [("-1", "an int >= 0")],
    "checkpoint_every": [("-1", "an int >= 0")],
}
# vpeft serve checks its own options (vpeft.serve.cli) before it builds anything
SERVE_BAD = {
    "port": [("-1", "an int in 0..65535"), ("65536", "an int in 0..65535")],
    "max_batch_size": [("0", "an int >= 1")],
    "max_wait_ms": [("-1", "a number >= 0")],
    "cache_size": [("0", "an int >= 1")],
    "cache_mb": [("0", "a number > 0")],
    "img_size": [("0", "an int >= 1")],
    "num_classes": [("-1", "an int >= 0")],
    "max_pixels": [("0", "an int >= 1")],
    "max_frames": [("0", "an int >= 1")],
    "shutdown_timeout": [("0", "a number > 0"), ("-1", "a number > 0"), ("inf", "a number > 0")],
}


def _outside(rng: Range) -> list[str]:
    values = [repr(v) for v in rng.outside()]
    return values + ([] if rng.integer else ["inf", "nan"])


def _numeric_cases():
    cases = []
    for command, p in COMMANDS.items():
        for action in p._actions:
            if not _numeric(action):
                continue
            flag = max(action.option_strings, key=len)
            if isinstance(action.type, Range):
                cases += [(command, flag, raw, str(action.type), "range") for raw in _outside(action.type)]
            elif command == "serve":
                cases += [(command, flag, raw, what, "serve") for raw, what in SERVE_BAD[action.dest]]
            else:
                cases += [(command, flag, raw, what, "train") for raw, what in TRAIN_BAD[action.dest]]
    return cases


NUMERIC = _numeric_cases()


def test_every_numeric_option_declares_its_range():
    """A numeric option is a declared Range (vpeft.config.ranged_option), a TrainConfig flag (TrainConfig checks
    it; every numeric field has cases here) or one of vpeft serve's (checked there; every one has cases)."""
    for command, p in COMMANDS.items():
        declared = _declared(command)
        for action in p._actions:
            if not _numeric(action):
                continue
            where = f"vpeft {command} {action.option_strings}"
            if isinstance(action.type, Range):
                assert action.dest in declared, f"{where}: a Range type but no declared check"
            elif command == "serve":
                assert action.dest in SERVE_BAD, f"{where}: no out-of-range case"
            else:
                assert action.dest in TRAIN_FIELDS, f"{where}: a plain type=int/float option; use ranged_option"
            if isinstance(action.type, Range) and action.default is not None:
                assert action.default in action.type, f"{where}: its default {action.default!r} is out of range"
    hints = typing.get_type_hints(TrainConfig)
    numeric = {n for n in TRAIN_FIELDS if {int, float} & ({hints[n]} | set(typing.get_args(hints[n])))}
    assert numeric == set(TRAIN_BAD), "every numeric TrainConfig field has out-of-range cases"
    assert len(NUMERIC) > 60, len(NUMERIC)


@pytest.mark.parametrize("command,flag,raw,valid,how", NUMERIC, ids=[f"{c}{f}={r}" for c, f, r, _, _ in NUMERIC])
def test_out_of_range_numeric_options_are_refused_before_any_work(
    command, flag, raw, valid, how, tmp_path, capsys, no_work
):
    code, err = _run([*_base(command, tmp_path), f"{flag}={raw}"], capsys)
    assert code == 2, err
    value = _parsed(command, flag, raw)
    if how == "range":  # "--workers -1 is invalid; expected an integer >= 0"
        assert f"vpeft {command}: error: {flag} {value!r} is invalid; expected {valid}" == err, err
    else:  # "--epochs must be an int >= 1, got 0" (TrainConfig), "--port must be an int in 0..65535, got -1" (serve)
        shown = repr(value) if how == "train" else str(value)
        assert f"{flag} must be {valid}" in err and err.endswith(f"got {shown}"), err
    assert not (tmp_path / "out").exists(), "nothing created for a refused command line"


def _parsed(command: str, flag: str, raw: str):
    """The option's value as argparse converts it (an int option's "-1" is -1, a float option's "0" is 0.0)."""
    action = next(a for a in COMMANDS[command]._actions if flag in a.option_strings)
    return action.type(raw)


def test_the_negative_max_masks_is_refused_not_used_as_a_slice(tmp_path, capsys, no_work):
    """``--max-masks -1`` was ``indices[:-1]``: every image but the last. It is refused before the delta is read."""
    code, err = _run(["eval", "--delta", str(tmp_path / "d.safetensors"), "--save-masks", str(tmp_path / "m"),
                      "--max-masks", "-1"], capsys)  # fmt: skip
    assert code == 2 and err == "vpeft eval: error: --max-masks -1 is invalid; expected an integer >= 0", err
    assert not (tmp_path / "m").exists()


@pytest.mark.parametrize(
    "argv,message",
    [
        (["bench", "{tmp}/def.yaml", "--out", "{tmp}/out", "--seeds", "1,-2"],
         "--seeds: seed=-2 is invalid; expected an integer in [0, 4294967295]"),
        (["bench", "{tmp}/def.yaml", "--out", "{tmp}/out", "--seeds", "4294967296"],
         "--seeds: seed=4294967296 is invalid; expected an integer in [0, 4294967295]"),
        (["search", "--backbone", "test_vit", "--task", "digits", "--budget", "9", "--out", "{tmp}/out", "--sizes",
          "1,0"], "--sizes: size=0 is invalid; expected an integer >= 1"),
    ],
)  # fmt: skip
def test_list_options_check_every_value(argv, message, tmp_path, capsys, no_work):
    code, err = _run([a.format(tmp=tmp_path) for a in argv], capsys)
    assert code == 2 and message in err, err
    assert not (tmp_path / "out").exists()


def _method_cases():
    cases = []
    for name in vpeft.list_methods():
        cls = vpeft.get_method(name).config_cls
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            kinds = {hints[f.name]} | set(typing.get_args(hints[f.name]))
            if typing.get_origin(hints[f.name]) is tuple or not {int, float} & kinds:
                continue
            extra = ["--opt", "class_specific=true"] if (name, f.name) == ("coop", "num_classes") else []
            cases.append((name, f.name, "-1" if int in kinds and float not in kinds else "-1e7", extra))
    return cases


METHOD_OPTIONS = _method_cases()


@pytest.mark.parametrize("method,key,raw,extra", METHOD_OPTIONS, ids=[f"{m}.{k}" for m, k, _, _ in METHOD_OPTIONS])
def test_out_of_range_method_options_are_refused_before_any_work(method, key, raw, extra, tmp_path, capsys, no_work):
    """``--opt KEY=VALUE``: the method's config checks its own ranges (vpeft.config.check_int / check_float, one
    Range each); a negative count or a hugely negative scale is never valid."""
    code, err = _run([*_base("train", tmp_path), "--method", method, "--opt", f"{key}={raw}", *extra], capsys)
    assert code == 2, err
    value = int(raw) if raw == "-1" else float(raw)
    assert f"{key}={value!r} is invalid" in err and re.search(r"expected (null or )?(an integer|a number)", err), err
    assert not (tmp_path / "out").exists()
    assert len(METHOD_OPTIONS) > 50


def test_optional_numeric_method_options_are_typed():
    """``int | None`` fields (visual_prompt's pad_size) were passed on as strings, so ``pad_size=4`` was refused."""
    from vpeft.cli import parse_method_options

    assert parse_method_options("visual_prompt", ["pad_size=4", "image_size=null"]) == {
        "pad_size": 4,
        "image_size": None,
    }
    with pytest.raises(vpeft.ConfigError, match="option pad_size='four' is not a valid int"):
        parse_method_options("visual_prompt", ["pad_size=four"])


# ---- task options: the task types check their own, named, with the valid range ------------------------------
def _seg_folder(root: Path) -> Path:
    import numpy as np
    from PIL import Image

    root.mkdir(parents=True)
    (root / "classes.txt").write_text("a\nb\n")
    for split in ("train", "test"):
        (root / "images").mkdir(exist_ok=True)
        (root / "masks").mkdir(exist_ok=True)
        Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(root / "images" / f"{split}.png")
        Image.fromarray(np.eye(16, dtype=np.uint8)).save(root / "masks" / f"{split}.png")
        (root / f"{split}.txt").write_text(f"images/{split}.png masks/{split}.png\n")
    return root


@pytest.mark.parametrize(
    "option,message",
    [
        ("size=-8,16", "size=[-8, 16] must be an (height, width) pair of positive ints"),
        ("levels=3,99", "feature level 99 is invalid: this vit backbone has"),
        ("levels=99", "feature level 99 is invalid: this vit backbone has"),
        ("width=-1", "width=-1 must be a positive int"),
        ("dropout=1.5", "dropout=1.5 must be in [0, 1)"),
    ],
)
def test_out_of_range_task_options_are_one_line_errors_without_an_out_folder(option, message, tmp_path, capsys):
    root = tmp_path / "data"
    _seg_folder(root / "seg")
    out = tmp_path / "out"
    argv = ["train", "--backbone", "test_vit", "--no-pretrained", "--method", "lora", "--task", "seg", "--data-root",
            str(root), "--img-size", "16", "--train-split", "train", "--eval-split", "test", "--decoder", "fpn",
            "--task-opt", option, "--out", str(out), "--quiet"]  # fmt: skip
    code, err = _run(argv, capsys)
    assert code == 2 and message in err, err
    assert not out.exists()


@pytest.mark.parametrize(
    "build,message",
    [
        (lambda t: t.VideoTask(3, num_frames=-1), "video: num_frames=-1 must be a positive int"),
        (lambda t: t.VideoTask(3, views=0), "video: views=0 must be a positive int"),
        (lambda t: t.VideoTask(3, stride=0), "video: stride=0 must be a positive int or None"),
        (lambda t: t.VideoTask(3, size=-1), "video: size=-1 must be a positive int or None"),
        (lambda t: t.DetectionTask(["a"], width=0), "detection: width=0 must be a positive int"),
        (lambda t: t.DetectionTask(["a"], size=-3), "detection: size=-3 must be a positive int"),
        (lambda t: t.ZeroShotTask(("a", "b"), shots=-1), "shots=-1 is invalid; expected an integer >= 1 or None"),
        (lambda t: t.ZeroShotTask(("a", "b"), context_length=0), "expected an integer in [1, 77]"),
    ],
)
def test_task_types_refuse_out_of_range_options(build, message):
    import vpeft.tasks as tasks

    with pytest.raises(vpeft.ConfigError) as info:
        build(tasks)
    assert message in str(info.value)


# ---- destinations --------------------------------------------------------------------------------------------
WRITES = re.compile(r"--(out|save-\w+|html|md|report|plot\w*)$")


def _writing_cases():
    cases = []
    for command, p in COMMANDS.items():
        for action in p._actions:
            if any(WRITES.match(o) for o in action.option_strings):
                cases.append((command, max(action.option_strings, key=len), action.dest))
    return cases


WRITING = _writing_cases()
FILE_OPTIONS = {("merge", "--out"), ("zeroshot", "--out"), ("import", "--out"), ("report", "--html"),
                ("report", "--md")}  # fmt: skip


def test_every_writing_option_declares_its_destination():
    assert {(c, f) for c, f, _ in WRITING} >= {("train", "--out"), ("eval", "--save-masks"), ("merge", "--out"),
                                             ("report", "--html"), ("bench", "--out"), ("search", "--out")}  # fmt: skip
    for command, flag, dest in WRITING:
        assert dest in _declared(command), f"vpeft {command} {flag} writes but declares no destination check"


def _dest(flag: str, command: str, place: Path) -> str:
    return str(place / ("x.json" if (command, flag) in FILE_OPTIONS else "dir"))


@pytest.mark.parametrize("command,flag,dest", WRITING, ids=[f"{c}{f}" for c, f, _ in WRITING])
def test_a_destination_under_a_regular_file_is_refused_before_any_work(command, flag, dest, tmp_path, capsys, no_work):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    code, err = _run([*_base(command, tmp_path), flag, _dest(flag, command, blocker)], capsys)
    assert code == 2, err
    assert f"is under the file {str(blocker)!r}, which cannot hold a folder" in err and flag in err, err
    assert blocker.read_text() == "x" and not (tmp_path / "out").exists()


@pytest.mark.parametrize("command,flag,dest", WRITING, ids=[f"{c}{f}" for c, f, _ in WRITING])
def test_an_unwritable_destination_is_refused_before_any_work(command, flag, dest, tmp_path, capsys, no_work,
                                                              monkeypatch, refuse_write_probe):  # fmt: skip
    """Runs as root too (CI does): a folder root cannot write is simulated by refusing the write probe there."""
    locked = tmp_path / "ro"
    locked.mkdir()
    refuse_write_probe(monkeypatch, locked)
    code, err = _run([*_base(command, tmp_path), flag, _dest(flag, command, locked / "sub")], capsys)
    assert code == 2, err
    assert f"vpeft {command}: error: {flag}" in err and "is not writable (Permission denied)" in err, err
    assert os.listdir(locked) == [] and not (tmp_path / "out").exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes a 0500 folder; the probe test above covers root")
def test_a_real_read_only_folder_is_refused(tmp_path, capsys, no_work):
    locked = tmp_path / "ro"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        code, err = _run(["eval", "--delta", str(tmp_path / "d"), "--save-masks", str(locked / "m")], capsys)
    finally:
        locked.chmod(0o700)
    assert code == 2 and "is not writable" in err, err


@pytest.mark.parametrize("command,flag", sorted(FILE_OPTIONS))
def test_a_folder_where_a_file_is_written_is_refused(command, flag, tmp_path, capsys, no_work):
    (tmp_path / "dir").mkdir()
    code, err = _run([*_base(command, tmp_path), flag, str(tmp_path / "dir")], capsys)
    assert code == 2 and f"{flag} {str(tmp_path / 'dir')!r} is a folder; give" in err, err


def test_save_boxes_is_save_masks_and_its_help_says_what_each_task_draws():
    args = _parser().parse_args(["eval", "--delta", "d", "--save-boxes", "boxes"])
    assert args.save_masks == "boxes"
    action = next(a for a in COMMANDS["eval"]._actions if "--save-masks" in a.option_strings)
    assert action.option_strings == ["--save-masks", "--save-boxes"]
    assert re.search(r"segmentation: the predicted masks.*detection: the predicted boxes", action.help), action.help


def test_saving_pictures_of_a_classification_delta_is_refused_before_evaluating(tmp_path, capsys, no_work):
    model = build_backbone("test_vit", 10, 32, pretrained=False)  # imported before the tripwires are set
    vpeft.apply(model, "linear")
    delta = vpeft.save(model, tmp_path / "delta.safetensors")
    code, err = _run(["eval", "--delta", str(delta), "--save-boxes", str(tmp_path / "boxes")], capsys)
    assert code == 2, err
    assert "is a classification delta, and classification tasks have no prediction pictures" in err, err


# ---- the last gaps: tune's storage URL, a library call's picture limit, the few-shot draw's seed ---------------------
@pytest.mark.parametrize(
    "url,message",
    [
        ("study.db", "--storage 'study.db' is not a storage URL; expected e.g. sqlite:///study.db"),
        ("sqlite:///{blocker}/study.db", "is under the file"),
        ("sqlite:///{dir}", "is a folder; give a database file name"),
    ],
)
def test_tune_storage_is_a_url_and_an_sqlite_file_is_a_writable_destination(url, message, tmp_path, capsys, no_work):
    (tmp_path / "blocker").write_text("x")
    (tmp_path / "dir").mkdir()
    url = url.format(blocker=tmp_path / "blocker", dir=tmp_path / "dir")
    code, err = _run([*_base("tune", tmp_path), "--storage", url], capsys)
    assert code == 2 and message in err, err
    assert not (tmp_path / "out").exists()


def test_tune_storage_on_a_server_is_not_probed_as_a_file(tmp_path, capsys, no_work):
    """A server URL passes the option check (the tripwire then stops the work it would start)."""
    with pytest.raises(WorkStarted):
        main([*_base("tune", tmp_path), "--storage", "postgresql://user@db.example/optuna"])


@pytest.mark.parametrize("limit", [-1, 1.5, True])
def test_a_picture_limit_is_checked_when_called_from_python(limit, tmp_path):
    """``limit=-1`` as a slice would draw every item but the last: the library functions refuse it."""
    from vpeft.tasks.predict import first_items

    with pytest.raises(
        vpeft.ConfigError, match=rf"save_prediction_overlays: limit={limit!r} is invalid; expected an integer >= 0"
    ):
        first_items([0, 1, 2], limit, "save_prediction_overlays")
    assert first_items([0, 1, 2], 0, "x") == [] and first_items([0, 1, 2], None, "x") == [0, 1, 2]


def test_a_negative_few_shot_seed_is_refused():
    """``random.Random(-3)`` draws what ``random.Random(3)`` draws: two seeds would name the same draw."""
    import vpeft.tasks as tasks

    with pytest.raises(
        vpeft.ConfigError, match=r"zeroshot: shot_seed=-3 is invalid; expected an integer in \[0, 4294967295\]"
    ):
        tasks.ZeroShotTask(("a", "b"), shots=1, shot_seed=-3)
    assert tasks.ZeroShotTask(("a", "b"), shots=1, shot_seed=3).shot_seed == 3
