"""Delta folders for the server tests: timm's tiny ``test_vit`` (random, seeded) at 32 px, random non-zero deltas."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

import vpeft
from vpeft.run import build_backbone
from vpeft.tasks import SegmentationTask

SIZE = 32
BASE_CLASSES = 5  # the class count every backbone is built with (a random timm model's weights depend on it)

# id: (method, options, classes of its head)
SHARED = {
    "lora_qv": ("lora", {"r": 4, "targets": ["q", "v"]}, 3),
    "lora_fc": ("lora", {"r": 2, "targets": ["fc1", "fc2"]}, 7),
    "adapter": ("adapter", {"bottleneck": 4}, 5),
    "ssf": ("ssf", {}, 4),
    "linear": ("linear", {}, 2),
}
OWN = {"vpt": ("vpt_deep", {"num_tokens": 2}, 3), "bitfit": ("bitfit", {}, 4)}


def backbone() -> nn.Module:
    return build_backbone("test_vit", BASE_CLASSES, SIZE, pretrained=False).eval()


def classification_model(classes: int) -> nn.Module:
    model = backbone()
    if classes != BASE_CLASSES:
        model.reset_classifier(classes)
    return model.eval()


def _perturb(model: nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)


def write_classification(path: Path, method: str, options: dict, classes: int, seed: int, **extra) -> Path:
    model = classification_model(classes)
    vpeft.apply(model, method, **options)
    _perturb(model, seed)
    return vpeft.save(model, path, extra=extra)


def segmentation_task() -> SegmentationTask:
    return SegmentationTask(3, decoder="linear")


def segmentation_model() -> nn.Module:
    model = backbone()
    model.reset_classifier(0)
    return segmentation_task().build(model).eval()


def write_segmentation(path: Path, seed: int = 7, **extra) -> Path:
    model = segmentation_model()
    vpeft.apply(model, "lora", r=2, targets=["q", "v"])
    _perturb(model, seed)
    return vpeft.save(model, path, extra=extra)


def make_folder(folder: Path, tasks: dict | None = None, segmentation: bool = True) -> Path:
    """A delta folder: the shared and own-model classification deltas (and a segmentation one)."""
    folder.mkdir(parents=True, exist_ok=True)
    for seed, (name, (method, options, classes)) in enumerate((tasks or {**SHARED, **OWN}).items()):
        write_classification(folder / f"{name}.safetensors", method, options, classes, seed)
    if segmentation:
        write_segmentation(folder / "seg.safetensors", class_names=["sky", "road", "car"])
    return folder


def reference(folder: Path, name: str) -> nn.Module:
    """The adapter's own model: vpeft.load onto a fresh backbone."""
    if name == "seg":
        model = segmentation_model()
    else:
        model = classification_model({**SHARED, **OWN}[name][2])
    vpeft.load(model, folder / f"{name}.safetensors")
    return model.eval()


def images(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serving(app) -> Iterator[str]:
    """Run ``app`` with uvicorn on a free loopback port in a thread; yields its base URL, stops it after."""
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 60
        while not server.started:
            assert time.monotonic() < deadline and thread.is_alive(), "the server did not start"
            time.sleep(0.05)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(30)


def png_bytes(width: int = 40, height: int = 30, seed: int = 0) -> bytes:
    import io

    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def perturb(model: nn.Module, seed: int) -> None:
    """Random non-zero values in every trainable tensor (a delta that changes the outputs)."""
    _perturb(model, seed)
