"""Few-shot, base-to-novel and cross-dataset protocols (vpeft.data.fewshot) and their plumbing with a tiny CLIP."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytest.importorskip("open_clip")

import vpeft  # noqa: E402
from vpeft.backbones.clip import tiny_open_clip  # noqa: E402
from vpeft.data.fewshot import (  # noqa: E402
    SampleList,
    base_novel_split,
    few_shot_split,
    harmonic_mean,
    read_list,
    restrict,
    sample_few_shot,
)
from vpeft.tasks.zeroshot import ZeroShotTask  # noqa: E402

CLASSES = ("banded", "blotchy", "crystalline_rock", "golden_retriever", "sea_turtle")


def make_task(root: Path, name: str = "toy", per_class: int = 6) -> Path:
    task = root / name
    (task / "images").mkdir(parents=True)
    (task / "classes.txt").write_text("\n".join(CLASSES) + "\n")
    rng = np.random.default_rng(0)
    lines = {"train800val200": [], "test": []}
    for split, n in (("train800val200", per_class), ("test", 2)):
        for c in range(len(CLASSES)):
            for i in range(n):
                rel = f"images/{split}_{c}_{i}.png"
                Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(task / rel)
                lines[split].append(f"{rel} {c}")
    for split, rows in lines.items():
        (task / f"{split}.txt").write_text("\n".join(rows) + "\n")
    return task


def test_few_shot_sampling_is_seeded_and_written(tmp_path):
    task = make_task(tmp_path)
    drawn, path = few_shot_split(task, 2, seed=1, out_dir=tmp_path / "lists")
    assert path.name == "toy_shots2_seed1.txt" and path.is_file()
    assert sorted(y for _, y in drawn) == sorted(list(range(len(CLASSES))) * 2)
    assert read_list(path, task) == drawn, "the written list reproduces the draw"
    again, _ = few_shot_split(task, 2, seed=1, out_dir=tmp_path / "again")
    other, _ = few_shot_split(task, 2, seed=2, out_dir=tmp_path / "other")
    assert again == drawn and other != drawn
    from vpeft.data.vtab import read_split_list

    pool = read_split_list(task, "train800val200")
    for k in (1, 2, 4):
        assert len(sample_few_shot(pool, k, 0)) == k * len(CLASSES)
    with pytest.raises(vpeft.DataError, match="fewer than shots=16"):
        few_shot_split(task, 16, seed=1, out_dir=tmp_path / "lists")
    with pytest.raises(vpeft.DataError, match="shots=0 is invalid"):
        sample_few_shot(drawn, 0, 0)


def test_base_to_novel_split_and_hm():
    assert base_novel_split(5) == ([0, 1, 2], [3, 4])  # ceil(5 / 2) = 3 base classes
    assert base_novel_split(10) == ([0, 1, 2, 3, 4], [5, 6, 7, 8, 9])
    samples = [(Path(f"{i}.png"), i % 5) for i in range(10)]
    assert [y for _, y in restrict(samples, [3, 4])] == [0, 1, 0, 1]
    assert harmonic_mean(0.8, 0.6) == pytest.approx(2 * 0.8 * 0.6 / 1.4)
    assert harmonic_mean(0.0, 0.0) == 0.0
    with pytest.raises(vpeft.DataError, match="at least 2 classes"):
        base_novel_split(1)


def _accuracy(model, loader) -> float:
    correct = n = 0
    with torch.no_grad():
        for x, y in loader:
            correct += int((model(x).argmax(-1) == y).sum())
            n += len(y)
    return correct / n


def test_base_to_novel_and_cross_dataset_plumbing(tmp_path):
    """CoOp on 2-shot base classes of a toy task; evaluated on base, on novel and on another task (zero-shot)."""
    import torchvision.transforms as T

    task_dir = make_task(tmp_path)
    full = ZeroShotTask.from_folder(task_dir)
    assert full.class_names[2] == "crystalline rock"
    base, novel = base_novel_split(len(full.class_names))
    drawn, _ = few_shot_split(task_dir, 2, seed=0, out_dir=tmp_path / "lists", classes=base, tag="base")
    transform = T.Compose([T.ToTensor()])
    train = torch.utils.data.DataLoader(SampleList(drawn, transform), batch_size=4, shuffle=True)
    clip = tiny_open_clip()
    vpeft.apply(clip, "coop", num_tokens=4, init="a photo of a")
    model = full.subset(base).build(clip)
    opt = torch.optim.SGD([p for p in clip.parameters() if p.requires_grad], lr=0.5)
    ctx0 = clip.prompt.ctx.detach().clone()
    for x, y in train:
        loss = model.task.loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert not torch.equal(clip.prompt.ctx, ctx0)
    from vpeft.data.vtab import read_split_list

    test = read_split_list(task_dir, "test")
    accs = {}
    for name, classes in (("base", base), ("novel", novel)):
        loader = torch.utils.data.DataLoader(SampleList(restrict(test, classes), transform), batch_size=8)
        accs[name] = _accuracy(full.subset(classes).build(clip).eval(), loader)
    hm = harmonic_mean(accs["base"], accs["novel"])
    assert 0.0 <= hm <= 1.0
    # cross-dataset: the same learned context on another task's class names, zero-shot
    other_dir = make_task(tmp_path, "other")
    other = ZeroShotTask(("zebra", "airplane", "tulip"), ("a photo of a {}.",))
    loader = torch.utils.data.DataLoader(SampleList(restrict(read_split_list(other_dir, "test"), [0, 1, 2]), transform))
    assert 0.0 <= _accuracy(other.build(clip).eval(), loader) <= 1.0
