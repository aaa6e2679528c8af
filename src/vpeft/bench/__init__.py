"""``vpeft bench``: benchmark grids defined as data, run under the VTAB-1k protocol, reported as leaderboards.

Typical use::

    from vpeft.bench import load_definition, run_bench, write_report

    definition = load_definition("experiments/mini.yaml")
    run_bench(definition, "runs/bench-mini", workers=1)       # resumable: finished runs are skipped
    markdown, md_path, html_path = write_report("runs/bench-mini")

Modules: :mod:`~vpeft.bench.definition` (the file format and its validation), :mod:`~vpeft.bench.protocol`
(one run: select on val, retrain on train+val, test once; measurements), :mod:`~vpeft.bench.runner` (resume,
process pool, progress), :mod:`~vpeft.bench.records` (atomic JSON records), :mod:`~vpeft.bench.report`
(Markdown/HTML leaderboard with plots).
"""

from __future__ import annotations

from vpeft.bench.definition import (
    GENERATORS,
    GROUPS,
    BenchDefinition,
    MethodSpec,
    RunSpec,
    SplitNames,
    TaskSpec,
    load_definition,
    parse_definition,
)
from vpeft.bench.records import load_records
from vpeft.bench.report import build_leaderboard, render_html, render_markdown, write_report
from vpeft.bench.runner import BenchSummary, default_parallelism, run_bench

__all__ = [
    "GENERATORS",
    "GROUPS",
    "BenchDefinition",
    "BenchSummary",
    "MethodSpec",
    "RunSpec",
    "SplitNames",
    "TaskSpec",
    "build_leaderboard",
    "default_parallelism",
    "load_definition",
    "load_records",
    "parse_definition",
    "render_html",
    "render_markdown",
    "run_bench",
    "write_report",
]
