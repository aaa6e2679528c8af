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
