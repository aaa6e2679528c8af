"""The benchmark scripts run (``--quick``: a tiny ViT) and print their tables; no timing is asserted."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

SCRIPTS = {
    "bench_step.py": [
        "| forward |",
        "| limit |",
        "| lora_wide |",
        "## Targets (not judged: --quick",
        "| limit_half |",
        "| ssf_recompute |",
        "## Step cost per task kind",
        *(f"### {kind}" for kind in ("classification", "segmentation", "zero-shot CLIP", "video", "detection")),
    ],
    "bench_merge.py": ["| plain backbone |", "| lora |", "| vpt_deep |", "mergeable methods within 1 %"],
    "bench_options.py": ["| vit | lora | baseline |", "| cnn | bitfit | channels_last |", "| checkpointing |"],
    "bench_cache.py": ["| linear probe | pre_logits |", "| partial-1 | 1 |", "cheaper with the cache"],
    "bench_multitask.py": ["| multi-task, grouped |", "| N separate models |", "| mixed |", "vs 4 separate models"],
    "bench_det.py": [
        "| frozen | frozen backbone + detector |",
        "| lora | vpeft lora + detector |",
        "| limit |",
        "x frozen",
        "detector (fcos):",
    ],
    "bench_serve.py": [
        "| mixed batches |",
        "| per-adapter batches |",
        "| no batching |",
        "| swap per adapter |",
        "merged models on disk (vpeft-merged files",
        "answers agree across configurations: True",
    ],
    "bench_seg.py": ["| frozen | frozen backbone + decoder |", "| lora | vpeft lora + decoder |", "| limit |"],
    "bench_video.py": ["| forward |", "| limit |", "| aim |", "| st_adapter |", "| zeroi2v |", "x limit"],
    "bench_train_cache.py": [
        "one forward pass over the training set",
        "train, cached:",
        "identical test metrics: True",
    ],
}

# bench_step.py --quick also runs its memory modes and the per-task-kind tables (the other benches, tiny: ~1 min)
EXTRA_ARGS = {"bench_step.py": ["--tasks", "--memory", "recompute,half"]}


def _serve_swap_is_merged(results: dict) -> None:
    """bench_serve's swap configuration serves merged models: every adapter's file is a ``vpeft-merged`` state dict,
    the resident model that answered every request of that configuration holds no vpeft module (no LoRA wrapper,
    no adapter), and it was swapped at least once per adapter."""
    swap = results["swap"]
    assert set(swap["merged"].values()) == {"vpeft-merged"} and len(swap["merged"]) == 3, swap
    assert swap["resident_vpeft_modules"] == 0, f"the resident model holds vpeft modules: not merged weights ({swap})"
    assert swap["served"] == swap["requests"] > 0, f"requests not answered by the resident merged model: {swap}"
    assert len(swap["merged"]) <= swap["swaps"] <= swap["requests"], swap
    assert results["agree"] and results["score_diff"] <= 1e-4, results["score_diff"]


CHECKS = {"bench_serve.py": _serve_swap_is_merged}


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_benchmark_runs_quick(script, tmp_path):
    out = tmp_path / "results.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / script), "--quick", "--json", str(out), *EXTRA_ARGS.get(script, [])],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    for needle in SCRIPTS[script]:
        assert needle in proc.stdout, f"{needle!r} missing from the output of {script}:\n{proc.stdout}"
    results = json.loads(out.read_text())
    rows = results["rows"]
    assert rows and all(isinstance(r, dict) for r in rows)
    CHECKS.get(script, lambda _: None)(results)
    assert "BROKEN" not in proc.stdout, proc.stdout  # an option that loses a trainable tensor's gradient
