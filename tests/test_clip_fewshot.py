"""Few-shot, base-to-novel and cross-dataset protocols (vpeft.data.fewshot) and their plumbing with a tiny CLIP."""

from __future__ import annotations

import json
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


# ---- the protocols in vpeft bench ------------------------------------------------------------------------------
def test_zeroshot_task_class_subsets_and_k_shot_training_sets(tmp_path):
    from vpeft.data import ensure_digits_task
    from vpeft.tasks import ZeroShotTask, task_from_dict

    ensure_digits_task(tmp_path)
    folder = tmp_path / "digits"
    base = ZeroShotTask.from_folder(folder, classes="base", shots=2, shot_seed=3, lists_dir=str(tmp_path / "lists"))
    novel = ZeroShotTask.from_folder(folder, classes="novel")
    assert base.class_names == ("0", "1", "2", "3", "4") and novel.class_names == ("5", "6", "7", "8", "9")
    assert task_from_dict(base.to_dict()) == base
    model = torch.nn.Identity()
    model.pretrained_cfg = {"input_size": (3, 32, 32)}
    train = base.dataset(folder, "train800val200", model, input_size=32, train=True)
    assert len(train) == 10 and sorted(train.targets) == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
    listed = list((tmp_path / "lists").glob("digits_base_train800val200_shots2_seed3.txt"))
    assert listed and len(listed[0].read_text().split("\n")) == 11  # the drawn list is written out
    test = novel.dataset(folder, "test", model, input_size=32)
    assert set(test.targets) == {0, 1, 2, 3, 4} and len(test) < 797  # the novel labels, renumbered
    with pytest.raises(vpeft.ConfigError, match="classes='half' is invalid; valid: all, base, novel"):
        ZeroShotTask.from_folder(folder, classes="half")


@pytest.mark.slow
def test_bench_base_to_novel_records_base_novel_and_hm(tmp_path):
    """A base-to-novel definition on a random open_clip ViT-B-16 (plumbing only): the record holds base, novel and
    HM accuracies, the leaderboard ranks by HM and shows the base / novel / HM table."""
    from vpeft.bench import load_definition, parse_definition, run_bench
    from vpeft.bench.report import write_report
    from vpeft.data import ensure_digits_task
    from vpeft.data.fewshot import harmonic_mean

    shipped = load_definition(Path(__file__).resolve().parents[1] / "experiments" / "b2n.yaml")
    assert {r.protocol for r in shipped.runs()} == {"base-to-novel", "standard"}
    assert all(r.task_options["classes"] == "base" for r in shipped.runs() if r.protocol == "base-to-novel")
    assert {r.task_kind for r in shipped.runs()} == {"zeroshot"}
    ensure_digits_task(tmp_path / "data")
    definition = parse_definition(
        {
            "name": "b2n-tiny", "backbone": "open_clip:ViT-B-16", "img_size": 32, "pretrained": False, "seeds": [0],
            "data_root": str(tmp_path / "data"), "train": {"epochs": 1, "batch_size": 8, "lr": 2e-3},
            "latency": {"batch_size": 1, "warmup": 0, "repeats": 1},
            "tasks": [{"name": "digits", "group": "vision-language", "protocol": "base-to-novel",
                       "options": {"shots": 1, "lists_dir": str(tmp_path / "lists")}}],
            "methods": [{"name": "coop", "settings": {"num_tokens": 4}}],
        }
    )  # fmt: skip
    summary = run_bench(definition, tmp_path / "out", workers=0, progress=False)
    assert summary.ok == 1, summary.failures
    rec = json.loads((tmp_path / "out" / "runs" / "coop" / "digits" / "seed0" / "record.json").read_text())
    assert rec["protocol"] == "base-to-novel" and rec["primary_metric"] == "hm"
    assert rec["hm"] == pytest.approx(harmonic_mean(rec["base"], rec["novel"])) and rec["score"] == rec["hm"]
    assert rec["test_n"] + rec["novel_n"] == 797 and rec["method_params"] == 4 * 512
    assert list((tmp_path / "lists").glob("digits_base_*shots1_seed0.txt"))
    md = write_report(tmp_path / "out")[0]
    assert "## Base-to-novel accuracy (%)" in md and "digits base | digits novel | digits HM" in md


@pytest.mark.slow
def test_bench_cross_dataset_transfer_and_the_linear_probe(tmp_path):
    """Cross-dataset transfer in a definition (trained on one task, evaluated zero-shot on another with its own
    class names), and the linear-probe baseline (probe=True, method linear) on a random open_clip ViT-B-16."""
    import shutil

    from vpeft.bench import parse_definition, run_bench
    from vpeft.bench.report import write_report
    from vpeft.data import ensure_digits_task

    ensure_digits_task(tmp_path / "data")
    other = tmp_path / "data" / "digits_rev"
    shutil.copytree(tmp_path / "data" / "digits", other)
    names = (other / "classes.txt").read_text().split()
    (other / "classes.txt").write_text("\n".join(f"digit {n}" for n in names) + "\n")
    base = {
        "backbone": "open_clip:ViT-B-16", "img_size": 32, "pretrained": False, "seeds": [0],
        "data_root": str(tmp_path / "data"), "train": {"epochs": 1, "batch_size": 10, "lr": 2e-3},
        "latency": {"batch_size": 1, "warmup": 0, "repeats": 1},
    }  # fmt: skip
    transfer = parse_definition(
        {**base, "name": "xd",
         "tasks": [{"name": "digits", "group": "vision-language", "transfer_to": ["digits_rev"],
                    "options": {"shots": 1, "lists_dir": str(tmp_path / "lists")}}],
         "methods": [{"name": "coop", "settings": {"num_tokens": 4}}]}
    )  # fmt: skip
    assert run_bench(transfer, tmp_path / "xd", workers=0, progress=False).ok == 1
    rec = json.loads((tmp_path / "xd" / "runs" / "coop" / "digits" / "seed0" / "record.json").read_text())
    assert set(rec["transfer"]) == {"digits_rev"} and rec["transfer"]["digits_rev"]["n"] == 797
    md = write_report(tmp_path / "xd")[0]
    assert "## Cross-dataset transfer" in md and "digits -> digits_rev" in md
    probe = parse_definition(
        {**base, "name": "lp",
         "tasks": [{"name": "digits", "group": "vision-language", "kind": "zeroshot",
                    "options": {"probe": True, "shots": 1, "lists_dir": str(tmp_path / "lists")}}],
         "methods": [{"name": "linear", "label": "linear_probe", "train": {"lr": 1e-3}}]}
    )  # fmt: skip
    assert run_bench(probe, tmp_path / "lp", workers=0, progress=False).ok == 1
    rec = json.loads((tmp_path / "lp" / "runs" / "linear_probe" / "digits" / "seed0" / "record.json").read_text())
    assert rec["decoder_params"] == rec["trainable_params"] == 512 * 10 + 10 and rec["method_params"] == 0
