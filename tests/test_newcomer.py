"""The newcomer path (issue 22): what the README's first steps rely on works as written."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"


def _fresh_python(code: str) -> subprocess.CompletedProcess:
    env = {"PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)


def test_subpackages_are_attributes_after_a_plain_import():
    # a fresh interpreter: nothing but `import vpeft` has run, as in the README's Quick start
    code = """
import sys, torch, timm, vpeft
assert "vpeft.train" not in sys.modules          # imported on first access, not by `import vpeft`
model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, embed_dim=32,
                          depth=1, num_heads=2, num_classes=3)
vpeft.apply(model, vpeft.LoRAConfig(r=2, targets=("q", "v")))
loader = [(torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 0]))]
result = vpeft.train.train(model, loader, vpeft.train.TrainConfig(epochs=1, lr=1e-3, batch_size=4), progress=False)
assert len(result.history) == 1
for name in ("data", "backbones", "interop", "run", "tune"):
    assert getattr(vpeft, name).__name__ == "vpeft." + name
assert "train" in dir(vpeft)
try:
    vpeft.no_such_thing
except AttributeError as e:
    assert "no_such_thing" in str(e)
else:
    raise SystemExit("no AttributeError")
print("ok")
"""
    proc = _fresh_python(code)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().endswith("ok")
