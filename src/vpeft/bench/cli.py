"""The ``vpeft bench`` and ``vpeft report`` subcommands (registered by :mod:`vpeft.cli`)."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from vpeft.config import Range, declare_option_check, ranged_option
from vpeft.errors import ConfigError
from vpeft.files import destination_option

__all__ = ["add_bench_commands"]


def _csv(value: str | None) -> list[str] | None:
    return None if value is None else [v for v in value.split(",") if v]


SEED = Range.int(0, 2**32 - 1)


def _seeds(value: str | None) -> list[int] | None:
    if value is None:
        return None
    try:
        seeds = [int(v) for v in value.split(",") if v]
    except ValueError:
        raise ConfigError(f"--seeds must be comma-separated integers, got {value!r}") from None
    for seed in seeds:
        SEED.check("--seeds: seed", seed)
    return seeds


def _cmd_bench(args: argparse.Namespace) -> int:
    from vpeft.bench import load_definition, run_bench, write_report
    from vpeft.bench.definition import check_run_timeout

    run_timeout_s = check_run_timeout(args.run_timeout, "--run-timeout")
    definition = load_definition(args.definition)
    if args.device:
        from vpeft.devices import check_device

        check_device(args.device)
        import dataclasses

        definition = dataclasses.replace(definition, device=args.device)
    summary = run_bench(
        definition,
        args.out,
        methods=_csv(args.only),
        tasks=_csv(args.tasks),
        seeds=_seeds(args.seeds),
        workers=args.workers,
        threads=args.threads,
        data_root=args.data_root,
        backend="ray" if args.ray is not None else "local",
        ray_address=args.ray or None,
        progress=not args.quiet,
        verbose=args.verbose,
        run_timeout_s=run_timeout_s,
    )
    print(
        f"vpeft bench {definition.name}: {summary.ok} ok, {summary.failed} failed, {summary.skipped} already done "
        f"(of {summary.total}) in {summary.elapsed_s:.0f} s; results in {summary.out_dir}"
    )
    for line in summary.failures:
        print(f"  failed: {line}", file=sys.stderr)
    if summary.ok or summary.skipped:
        _, md_path, html_path = write_report(args.out)
        print(f"leaderboard: {md_path} and {html_path}")
    return 1 if summary.failed else 0


def _cmd_report(args: argparse.Namespace) -> int:
    from vpeft.bench import write_report

    md, md_path, html_path = write_report(args.results, html_path=args.html, md_path=args.md)
    print(md)
    print(f"written: {md_path}, {html_path}", file=sys.stderr)
    return 0


def add_bench_commands(sub: Any) -> None:  # argparse subparsers (their class is private)
    """Add ``bench`` and ``report`` to the ``vpeft`` subcommands."""
    p = sub.add_parser(
        "bench",
        help="run a benchmark definition (YAML/JSON): select on val, retrain on train+val, test once; resumable "
        "(exit status 1 if a run failed)",
    )
    p.add_argument("definition", help="bench definition file, e.g. experiments/mini.yaml")
    destination_option(p, "--out", folder=True, required=True, help="results folder (finished runs there are skipped)")
    ranged_option(
        p,
        "--workers",
        range=Range.int(0),
        default=None,
        help="concurrent runs (default: cores/4, min 1; 0: in-process)",
    )
    ranged_option(
        p, "--threads", range=Range.int(1), default=None, help="torch threads per worker (default: cores/workers)"
    )
    p.add_argument("--only", default=None, metavar="LABEL,...", help="run only these method labels")
    p.add_argument("--tasks", default=None, metavar="TASK,...", help="run only these tasks")
    declare_option_check(
        p,
        p.add_argument("--seeds", default=None, metavar="SEED,...", help="run only these seeds"),
        lambda flag, value: _seeds(value),
    )
    p.add_argument("--data-root", default=None, help="folder of task folders (overrides the definition's)")
    p.add_argument("--device", default=None, help="override the definition's device (cpu, cuda, cuda:1)")
    p.add_argument(
        "--run-timeout",
        default=None,
        metavar="SECONDS",
        help="wall-clock limit per run: a run past it is killed (with its child processes) and recorded as failed; "
        "overrides the definition's run_timeout_s (default: no limit; needs --workers >= 1 or --ray)",
    )
    p.add_argument(
        "--ray",
        nargs="?",
        const="",
        default=None,
        metavar="ADDRESS",
        help="run each (method, task, seed) as a Ray task on the cluster at ADDRESS (e.g. auto, ray://head:10001); "
        "without ADDRESS a local Ray is started (pip install ray)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    p.set_defaults(fn=_cmd_bench)

    p = sub.add_parser("report", help="leaderboard of a bench results folder: Markdown + self-contained HTML")
    p.add_argument("results", help="the --out folder of vpeft bench")
    destination_option(p, "--html", folder=False, default=None, help="HTML output (default: RESULTS/leaderboard.html)")
    destination_option(p, "--md", folder=False, default=None, help="Markdown output (default: RESULTS/leaderboard.md)")
    p.set_defaults(fn=_cmd_report)
