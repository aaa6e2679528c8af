"""``vpeft methods --counts``: progress on stderr while it counts (one line per method, the same count the table
shows), and no open_clip warning about the random weights it asked for."""

from __future__ import annotations

import json
import re

import timm

import vpeft
from vpeft.backbones import clip as clip_backbones
from vpeft.cli import main
from vpeft.methods.towers import CLIP_METHODS


def _fast_models(monkeypatch):
    """A tiny ViT and a tiny CLIP in place of the ViT-B/16s (the real count takes ~40 s on 2 cores)."""
    real_create = timm.create_model

    def tiny_vit(name, **kwargs):
        assert name == "vit_base_patch16_224"
        return real_create("vit_tiny_patch16_224", img_size=32, depth=2, embed_dim=48, num_heads=3, **kwargs)

    monkeypatch.setattr(timm, "create_model", tiny_vit)
    monkeypatch.setattr(clip_backbones, "create", lambda name, **_: clip_backbones.tiny_open_clip())


def test_counts_show_progress_on_stderr(monkeypatch, capsys):
    _fast_models(monkeypatch)
    assert main(["methods", "--counts"]) == 0
    captured = capsys.readouterr()
    names = vpeft.list_methods()
    lines = captured.err.strip().splitlines()
    assert lines[0].startswith(f"counting the parameters of {len(names)} methods on a random ViT-B/16")
    progress = [re.fullmatch(r"\[(\d+)/(\d+)\] (\w+): (.+)", line) for line in lines[1:]]
    assert all(progress) and len(progress) == len(names), lines
    assert [(int(m[1]), int(m[2]), m[3]) for m in progress] == [(i, len(names), n) for i, n in enumerate(names, 1)]
    table = {row.split(" | ")[0].strip("| "): row.split(" | ")[5] for row in captured.out.splitlines()[2:]}
    assert {m[3]: m[4] for m in progress} == table, "each progress line shows the count the table prints"
    assert any(m[4].endswith("(CLIP)") for m in progress if m[3] in CLIP_METHODS)


def test_without_counts_nothing_on_stderr(capsys):
    assert main(["methods", "--json"]) == 0
    captured = capsys.readouterr()
    assert captured.err == "" and {r["name"] for r in json.loads(captured.out)} == set(vpeft.list_methods())


_SCRIPT = """
import json, logging, sys
import open_clip
from vpeft.backbones.clip import create
open_clip.add_model_config(sys.argv[1])
model = create("open_clip:vpeft-test-tiny")
root = logging.getLogger()
print(json.dumps({"handlers": len(root.handlers), "filters": len(root.filters), "source": model.source}))
logging.getLogger("vpeft.test").warning("another warning")
"""


def test_random_open_clip_does_not_warn_nor_change_logging(tmp_path):
    """open_clip warns "No pretrained weights loaded" with ``logging.warning``, which also configures a root handler;
    vpeft asked for random weights, so neither happens (in a fresh process: pytest's own handlers sit on the root
    logger here). Other warnings still reach stderr as before."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    config = {
        "embed_dim": 16,
        "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 16},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 16, "heads": 2, "layers": 1},
    }
    path = tmp_path / "vpeft-test-tiny.json"
    path.write_text(json.dumps(config))
    src = str(Path(vpeft.__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": src + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([sys.executable, "-c", _SCRIPT, str(path)], capture_output=True, text=True, env=env,
                          timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout) == {"handlers": 0, "filters": 0, "source": "open_clip"}
    assert "No pretrained weights loaded" not in proc.stderr, proc.stderr
    assert proc.stderr.strip().endswith("another warning"), proc.stderr
