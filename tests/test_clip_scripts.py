"""benchmarks/bench_clip.py and benchmarks/clip_pipeline.py run (``--quick``: a tiny CLIP) and print their tables."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("open_clip")

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}


def _run(args: list[str]) -> str:
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, env=ENV, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc.stdout


def test_bench_clip_quick(tmp_path):
    out = _run(["benchmarks/bench_clip.py", "--quick", "--json", str(tmp_path / "r.json")])
    for needle in ("| zero-shot forward |", "| limit |", "| coop step |", "| cocoop step |", "CoCoOp step / CoOp step"):
        assert needle in out
    rows = json.loads((tmp_path / "r.json").read_text())["rows"]
    assert {r["name"] for r in rows} >= {"zero-shot forward", "coop step", "cocoop step", "maple step"}


def test_clip_pipeline_quick(tmp_path):
    from test_clip_fewshot import make_task

    make_task(tmp_path / "data", "toy")
    make_task(tmp_path / "data", "toy2")
    out = _run([
        "benchmarks/clip_pipeline.py", "--quick", "--data-root", str(tmp_path / "data"), "--tasks", "toy,toy2",
        "--methods", "zeroshot,coop", "--shots", "1,2", "--out", str(tmp_path / "out"),
    ])  # fmt: skip
    assert "RANDOM WEIGHTS" in out and "| toy | coop | 2 | 1 |" in out and "| toy -> toy2 | coop | 1 |" in out
    result = json.loads((tmp_path / "out" / "results.json").read_text())
    b2n = [r for r in result["rows"] if r["protocol"] == "base-to-novel"]
    assert len(b2n) == 2 * 2 * 2 and all(0 <= r["hm"] <= 1 for r in b2n)
    assert (tmp_path / "out" / "lists" / "toy_base_shots2_seed1.txt").is_file()


@pytest.mark.slow
def test_cli_trains_coop_on_a_random_open_clip_vit_b16_and_refuses_hub_weights_offline(tmp_path, capsys):
    """``vpeft train --backbone open_clip:ViT-B-16 --method coop`` works like the image-only path (random weights:
    the accuracy measures only the plumbing); asking for the pretrained weights offline is a one-line error."""
    from vpeft.cli import main
    from vpeft.data import ensure_digits_task

    ensure_digits_task(tmp_path / "data")
    argv = ["train", "--backbone", "open_clip:ViT-B-16", "--method", "coop", "--opt", "num_tokens=4",
            "--task", "digits", "--data-root", str(tmp_path / "data"), "--img-size", "32", "--epochs", "1",
            "--batch-size", "50", "--train-split", "val200", "--eval-split", "val200", "--quiet"]  # fmt: skip
    assert main([*argv, "--no-pretrained", "--out", str(tmp_path / "run")]) == 0
    result = json.loads((tmp_path / "run" / "result.json").read_text())
    assert result["task_spec"]["kind"] == "zeroshot" and result["method_params"] == 4 * 512
    capsys.readouterr()
    assert os.environ["HF_HUB_OFFLINE"] == "1"  # tests/conftest.py: the hub is never reached
    assert main([*argv, "--out", str(tmp_path / "hub")]) == 2
    err = capsys.readouterr().err
    assert "not in the local Hugging Face cache" in err and "--no-pretrained" in err and len(err.splitlines()) == 1
