"""vpeft bench / report on a video task: a tiny generated folder of frame-folder clips run through the protocol (a
grid chosen on val, retrained on trainval, test read once), its record (top-1, trainable parameters, peak memory,
clips/s, latency on clips), the leaderboard's units, a folder without a validation split (``val: null``: fixed
recipes only) and the shipped video definitions."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vpeft.bench import build_leaderboard, load_definition, parse_definition, render_markdown, run_bench
from vpeft.bench.records import load_records, read_record, record_path
from vpeft.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
SIZES = {"train": 8, "val": 4, "test": 8}
FRAMES = 4


def _write_tiny_video_task(root: Path, name: str = "vid") -> Path:
    """Two classes: a bright 4x4 square moving right (0) or left (1) on a dark 16x16 canvas, 4-frame PNG folders;
    clips in pairs (a clip, then its reversal)."""
    rng = np.random.default_rng(0)
    task = root / name
    for split, n in SIZES.items():
        lines = []
        for k in range(n // 2):
            y = int(rng.integers(0, 12))
            frames = np.full((FRAMES, 16, 16, 3), 20, dtype=np.uint8)
            for t in range(FRAMES):
                frames[t, y : y + 4, 2 + 3 * t : 6 + 3 * t] = 230
            for j, (clip, label) in enumerate(((frames, 0), (frames[::-1], 1))):
                folder = task / split / f"{2 * k + j:02d}"
                folder.mkdir(parents=True)
                for t, frame in enumerate(clip):
                    Image.fromarray(frame).save(folder / f"{t}.png")
                lines.append(f"{split}/{2 * k + j:02d} {label}")
        (task / f"{split}.txt").write_text("\n".join(lines) + "\n")
    (task / "classes.txt").write_text("right\nleft\n")
    return task


@pytest.fixture(autouse=True)
def _one_torch_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("bench-video")
    _write_tiny_video_task(root)
    return root


def _definition(data_root: Path, **overrides) -> dict:
    d = {
        "name": "tiny_video",
        "backbone": "test_vit",
        "img_size": 32,
        "pretrained": False,
        "seeds": [0],
        "data_root": str(data_root),
        "train": {"epochs": 1, "batch_size": 4, "warmup_epochs": 0, "lr": 1e-2},
        "latency": {"batch_size": 2, "warmup": 0, "repeats": 1},
        "tasks": [
            {
                "name": "vid",
                "group": "other",
                "kind": "video",
                "options": {"num_frames": FRAMES},
                "splits": {"train": "train", "val": "val", "trainval": "trainval", "test": "test"},
            }
        ],
        "methods": [
            {"name": "linear", "label": "linear_mean", "grid": {"lr": [1e-3, 1e-2]}},
            {"name": "lora", "label": "lora_temporal", "task_options": {"head": "temporal"}},
            {"name": "st_adapter", "settings": {"bottleneck": 4}},
        ],
    }
    d.update(overrides)
    return d


def test_a_video_bench_records_top1_params_memory_and_clips_per_second(tmp_path, data_root):
    out = tmp_path / "out"
    summary = run_bench(parse_definition(_definition(data_root)), out, workers=0, progress=False)
    assert (summary.ok, summary.failed) == (3, 0)
    for label in ("linear_mean", "lora_temporal", "st_adapter"):
        rec = read_record(record_path(out, label, "vid", 0))
        assert rec["status"] == "ok" and rec["task_kind"] == "video" and rec["primary_metric"] == "top1"
        assert 0 <= rec["top1"] <= 1 and rec["test_n"] == SIZES["test"]
        assert rec["trainable_params"] > 0 and rec["decoder_params"] > 0
        assert rec["peak_train_mem_bytes"] is not None and rec["train_images_per_s"] > 0
        assert rec["resolved"]["train_split"] == "trainval" and rec["resolved"]["eval_split"] == "test"
        lat = rec["latency"]
        assert lat["batch_of"] == "clips" and lat["unmerged_ms"] > 0
    sel = read_record(record_path(out, "linear_mean", "vid", 0))["selection"]
    assert sel["val_split"] == "val" and sel["candidates"] == 2 and sel["metric"] == "top1"
    lora = read_record(record_path(out, "lora_temporal", "vid", 0))
    assert lora["latency"]["mergeable"] and lora["latency"]["merge_max_abs_diff"] < 1e-4
    assert lora["resolved"]["method_config"]["method"] == "lora"
    # the temporal head's parameters count: more than the mean head's classifier
    assert lora["decoder_params"] > read_record(record_path(out, "linear_mean", "vid", 0))["decoder_params"]
    md = render_markdown(build_leaderboard(load_records(out)))
    assert "train clips/s" in md and "ms per batch of 2 clips" in md and "img/s" not in md


def test_a_folder_without_val_runs_fixed_recipes_and_refuses_a_grid(tmp_path, data_root):
    splits = {"train": "train", "val": None, "trainval": "train", "test": "test"}
    task = {**_definition(data_root)["tasks"][0], "splits": splits}
    with pytest.raises(ConfigError, match=r"methods.linear_mean: a grid chooses on the validation split, and "
                       r"task\(s\) vid have none \(splits.val: null\); give this method a fixed recipe"):  # fmt: skip
        parse_definition(_definition(data_root, tasks=[task]))
    with pytest.raises(ConfigError, match="a tune block chooses on the validation split"):
        parse_definition(_definition(data_root, tasks=[task], methods=[{"name": "lora", "tune": {"trials": 2,
                         "space": {"lr": "1e-4:1e-2:log"}}}]))  # fmt: skip
    d = parse_definition(_definition(data_root, tasks=[task], methods=["linear"]))
    assert run_bench(d, tmp_path / "out", workers=0, progress=False).ok == 1
    rec = read_record(record_path(tmp_path / "out", "linear", "vid", 0))
    assert rec["selection"] is None and rec["resolved"]["train_split"] == "train"
    bad = {**task, "splits": {**splits, "trainval": "test"}}
    with pytest.raises(ConfigError, match="train, trainval and test must differ"):
        parse_definition(_definition(data_root, tasks=[bad], methods=["linear"]))
    with pytest.raises(ConfigError, match=r"splits.train: expected a split name, got None"):
        parse_definition(_definition(data_root, tasks=[{**task, "splits": {**splits, "train": None}}]))


def test_shipped_video_definitions_validate():
    digits = load_definition(ROOT / "experiments" / "video_digits.yaml")
    (task,) = digits.tasks
    assert task.generate == "moving_digits" and task.kind == "video" and task.splits.val == "val"
    assert all(len(m.candidates()) >= 2 for m in digits.methods), "every method's lr is chosen on val"
    names = {m.name for m in digits.methods}
    assert {"linear", "aim", "st_adapter", "zeroi2v", "lora", "full"} <= names
    assert {m.name for m in load_definition(ROOT / "experiments" / "video_arrow.yaml").methods} >= names - {"full"}
    arrow = load_definition(ROOT / "experiments" / "video_arrow.yaml")
    (task,) = arrow.tasks
    assert task.splits.val is None and task.splits.trainval == "train" and task.options["num_frames"] == 16
    assert all(not m.grid and not m.tune for m in arrow.methods)
    assert Path(arrow.data_root).name == "video"
