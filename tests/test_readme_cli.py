"""Every `vpeft ...` command line of README.md parses with today's CLI: a renamed flag, a removed subcommand, an
unknown method or a bench definition that no longer loads fails here.

The lines are parsed and their names resolved (subcommand and flags by the real parser; methods, method options
and task options by the same functions the commands use; bench definitions loaded), not executed: most of them
train real backbones for minutes. ``tests/test_readme.py`` runs the README's Python blocks for real.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def _command_lines() -> list[str]:
    text = README.read_text(encoding="utf-8")
    lines = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            for part in re.split(r"&&|;", line):
                part = part.split("  #")[0].strip()
                if re.match(r"^(\.venv/bin/)?vpeft\b", part):
                    lines.append(part)
    return lines


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


#: what makes the Quick start (CLI) block run in seconds: a tiny random ViT on the offline digits task, one epoch
REDUCED = [
    ("--backbone dinov2_vits14_imgfocus", "--backbone test_vit --no-pretrained"),
    ("--img-size 112", "--img-size 32"),
    ("--task cifar10", "--task digits"),
    ("--epochs 10", "--epochs 1"),
]


def _quick_start_block() -> list[str]:
    text = README.read_text(encoding="utf-8")
    block = re.search(r"## Quick start \(CLI\)\n+```bash\n(.*?)```", text, flags=re.S)
    assert block, "README has a Quick start (CLI) bash block"
    lines = [line.split("  #")[0].strip() for line in block.group(1).replace("\\\n", " ").splitlines()]
    return [line for line in lines if line.startswith("vpeft ")]


def test_the_quick_start_cli_block_runs_as_written_with_reduced_settings(tmp_path, monkeypatch, capsys):
    """The block's lines run in order (train, eval, merge, PEFT export and import), each exit 0, with only the
    backbone, size, task and epochs swapped for small ones and the data root pointed at an offline folder."""
    from vpeft.cli import main
    from vpeft.data import ensure_digits_task

    ensure_digits_task(tmp_path / "data")
    monkeypatch.chdir(tmp_path)
    ran = []
    for line in _quick_start_block():
        if " ... " in line:  # the elided --resume example
            continue
        for old, new in REDUCED:
            line = line.replace(old, new)
        line = line.replace("~/data/vtab1k", str(tmp_path / "data"))
        argv = shlex.split(line)[1:]
        assert main(argv) == 0, f"{line}\n{capsys.readouterr().err}"
        ran.append(argv[0])
    assert ran == ["methods", "backbones", "train", "eval", "merge", "export", "import"]
    assert (tmp_path / "runs/cifar10-lora/delta.safetensors").is_file() and (
        tmp_path / "cifar10-lora.safetensors"
    ).is_file()
