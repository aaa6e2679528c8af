"""Tests of vpeft.data: VTAB-1k folders, image folders, transforms, loaders and the digits export."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vpeft.data import (
    DIGITS_SPLIT_SIZES,
    SPLITS,
    ImageFolderDataset,
    ImageListDataset,
    VTABTask,
    build_dataloader,
    build_transform,
    default_data_root,
    ensure_digits_task,
    list_tasks,
    load_split,
)
from vpeft.errors import ConfigError, DataError

SHARED_VTAB = Path(__file__).resolve().parents[2] / "shared" / "data" / "vtab1k"
SHARED_TASKS = {"cifar10": 10, "dtd10": 10, "pneumoniamnist": 2}


def _write_image(path: Path, value: int, mode: str = "RGB") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    color = value if mode == "L" else (value, 255 - value, value // 2)
    Image.new(mode, (16, 16), color).save(path)


def _make_task(root: Path, name: str = "toy", n_classes: int = 3, classes_txt: bool = True) -> Path:
    """A tiny VTAB-format task: 6 train, 3 val, 3 test images, labels cycling through the classes."""
    task = root / name
    sizes = {"train800": 6, "val200": 3, "test": 3}
    lines: dict[str, list[str]] = {}
    for split, n in sizes.items():
        lines[split] = []
        for i in range(n):
            rel = f"images/{split}_{i}.png"
            _write_image(task / rel, 40 * i, mode="L" if i % 2 else "RGB")
            lines[split].append(f"{rel} {i % n_classes}")
    lines["train800val200"] = lines["train800"] + lines["val200"]
    for split, rows in lines.items():
        (task / f"{split}.txt").write_text("\n".join(rows) + "\n")
    if classes_txt:
        (task / "classes.txt").write_text("\n".join(f"class{c}" for c in range(n_classes)) + "\n")
    return task


@pytest.fixture
def toy(tmp_path: Path) -> Path:
    return _make_task(tmp_path)


# --------------------------------------------------------------------------- VTAB-1k folders


def test_task_description(toy: Path) -> None:
    task = VTABTask.from_dir(toy)
    assert task.num_classes == 3
    assert task.class_names == ("class0", "class1", "class2")
    assert task.splits() == list(SPLITS)
    assert task.name == "toy"


def test_num_classes_without_classes_txt(tmp_path: Path) -> None:
    task = VTABTask.from_dir(_make_task(tmp_path, n_classes=2, classes_txt=False))
    assert task.num_classes == 2
    assert task.class_names == ("0", "1")


def test_dataset_items_are_rgb(toy: Path) -> None:
    ds = ImageListDataset(toy, "train800")
    assert len(ds) == 6
    image, label = ds[1]  # stored as grayscale
    assert image.mode == "RGB" and image.size == (16, 16)
    assert label == 1
    assert ds.targets == [0, 1, 2, 0, 1, 2]
    assert len(ImageListDataset(toy, "train800val200")) == 9


def test_load_split_with_transform(toy: Path) -> None:
    ds = load_split(toy.parent, "toy", "test", transform=build_transform({"mean": (0.5,) * 3, "std": (0.5,) * 3}, 8))
    image, label = ds[0]
    assert image.shape == (3, 8, 8) and image.dtype == torch.float32
    assert label == 0


def test_missing_task_lists_present_tasks(toy: Path) -> None:
    with pytest.raises(DataError, match="toyy") as err:
        load_split(toy.parent, "toyy", "test")
    assert "Valid tasks: toy" in str(err.value)
    assert list_tasks(toy.parent) == ["toy"]


def test_missing_task_in_empty_root(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="holds no task folders"):
        load_split(tmp_path, "cifar10", "test")


def test_unknown_split(toy: Path) -> None:
    with pytest.raises(DataError, match="'train'") as err:
        ImageListDataset(toy, "train")
    assert "train800" in str(err.value) and "val200" in str(err.value)


def test_missing_list_file(toy: Path) -> None:
    (toy / "val200.txt").unlink()
    with pytest.raises(DataError, match="val200.txt does not exist"):
        ImageListDataset(toy, "val200")


def test_malformed_line(toy: Path) -> None:
    with (toy / "test.txt").open("a") as f:
        f.write("images/test_0.png\n")
    with pytest.raises(DataError, match=r"test.txt:4.*images/test_0.png"):
        ImageListDataset(toy, "test")


def test_non_integer_label(toy: Path) -> None:
    (toy / "test.txt").write_text("images/test_0.png cat\n")
    with pytest.raises(DataError, match=r"test.txt:1.*'cat'"):
        ImageListDataset(toy, "test")


def test_label_out_of_range(toy: Path) -> None:
    rows = (toy / "test.txt").read_text().splitlines()
    rows[1] = "images/test_1.png 12"
    (toy / "test.txt").write_text("\n".join(rows) + "\n")
    with pytest.raises(DataError, match=r"label 12 at test.txt:2 is outside \[0, 3\)"):
        ImageListDataset(toy, "test")


def test_negative_label(toy: Path) -> None:
    (toy / "test.txt").write_text("images/test_0.png -1\n")
    with pytest.raises(DataError, match=r"label -1 at test.txt:1"):
        ImageListDataset(toy, "test")


def test_missing_image(toy: Path) -> None:
    (toy / "images" / "test_2.png").unlink()
    with pytest.raises(DataError, match=r"test_2.png listed at test.txt:3 does not exist"):
        ImageListDataset(toy, "test")


def test_explicit_num_classes_bounds_labels(toy: Path) -> None:
    with pytest.raises(DataError, match=r"label 2 at train800.txt:3 is outside \[0, 2\)"):
        ImageListDataset(toy, "train800", num_classes=2)


def test_missing_task_folder(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="nowhere"):
        ImageListDataset(tmp_path / "nowhere", "test")


# --------------------------------------------------------------------------- image folders


def test_image_folder(tmp_path: Path) -> None:
    for cls, n in (("dog", 2), ("cat", 3)):
        for i in range(n):
            _write_image(tmp_path / cls / f"{i}.png", 10 * i)
    ds = ImageFolderDataset(tmp_path, transform=build_transform({}, 8))
    assert ds.classes == ["cat", "dog"] and ds.num_classes == 2
    assert ds.targets == [0, 0, 0, 1, 1]
    image, label = ds[4]
    assert image.shape == (3, 8, 8) and label == 1


def test_image_folder_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        ImageFolderDataset(tmp_path / "missing")
    with pytest.raises(DataError, match="no class sub-folders"):
        ImageFolderDataset(tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="empty holds no images"):
        ImageFolderDataset(tmp_path)


# --------------------------------------------------------------------------- transforms and loaders


def test_transform_from_timm_cfg() -> None:
    timm = pytest.importorskip("timm")
    model = timm.create_model("resnet18", pretrained=False, num_classes=2)
    tf = build_transform(model, input_size=32)
    x = tf(Image.new("L", (50, 20), 255))  # grayscale, non-square
    assert x.shape == (3, 32, 32)
    mean, std = model.pretrained_cfg["mean"], model.pretrained_cfg["std"]
    expected = torch.tensor([(1.0 - m) / s for m, s in zip(mean, std)])
    torch.testing.assert_close(x[:, 0, 0], expected)
    assert "Crop" not in repr(tf)  # VTAB protocol: resize, no crop
    assert build_transform(model)(Image.new("RGB", (10, 10))).shape == (3, 224, 224)


def test_transform_uses_vit_img_size() -> None:
    timm = pytest.importorskip("timm")
    model = timm.create_model(
        "vit_tiny_patch16_224", img_size=32, patch_size=8, depth=1, embed_dim=32, num_heads=2, pretrained=False
    )
    assert build_transform(model)(Image.new("RGB", (64, 64))).shape == (3, 32, 32)


def test_transform_augment_only_for_training() -> None:
    cfg = {"input_size": (3, 16, 16), "mean": (0.5,) * 3, "std": (0.5,) * 3}
    assert "RandomResizedCrop" not in repr(build_transform(cfg, train=True))
    assert "RandomResizedCrop" not in repr(build_transform(cfg, train=False, augment=True))
    tf = build_transform(cfg, train=True, augment=True)
    assert "RandomResizedCrop" in repr(tf) and "RandomHorizontalFlip" in repr(tf)
    assert tf(Image.new("RGB", (40, 30))).shape == (3, 16, 16)


def test_transform_bad_inputs() -> None:
    with pytest.raises(ConfigError, match="input_size"):
        build_transform({}, input_size=0)
    with pytest.raises(ConfigError, match="mean"):
        build_transform({"mean": (0.5, 0.5)})
    with pytest.raises(ConfigError, match="str"):
        build_transform("vit")  # type: ignore[arg-type]


def test_seeded_dataloader_is_reproducible(toy: Path) -> None:
    ds = load_split(toy.parent, "toy", "train800val200", transform=build_transform({}, 4))

    def order(seed: int) -> list[int]:
        return [int(y) for _, ys in build_dataloader(ds, 2, shuffle=True, seed=seed) for y in ys]

    assert order(3) == order(3)
    assert sorted(order(3)) == sorted(ds.targets)
    with pytest.raises(ConfigError, match="batch_size"):
        build_dataloader(ds, 0, shuffle=False)


def test_default_data_root(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("VPEFT_DATA", str(tmp_path / "d"))
    assert default_data_root() == tmp_path / "d"
    monkeypatch.delenv("VPEFT_DATA")
    assert isinstance(default_data_root(), Path)


# --------------------------------------------------------------------------- digits export


def test_digits_export(tmp_path: Path) -> None:
    pytest.importorskip("sklearn")
    task_dir = ensure_digits_task(tmp_path)
    assert task_dir == tmp_path / "digits"
    assert [p.name for p in tmp_path.iterdir()] == ["digits"]  # no leftover temp folder
    for split, size in DIGITS_SPLIT_SIZES.items():
        ds = ImageListDataset(task_dir, split)
        assert len(ds) == size
        assert all(0 <= y < 10 for y in ds.targets)
    train = {line.split()[0] for line in (task_dir / "train800.txt").read_text().splitlines()}
    val = {line.split()[0] for line in (task_dir / "val200.txt").read_text().splitlines()}
    test = {line.split()[0] for line in (task_dir / "test.txt").read_text().splitlines()}
    assert not (train & val) and not (train & test) and not (val & test)
    assert len(train | val | test) == 1797
    assert set(ImageListDataset(task_dir, "val200").targets) == set(range(10))  # stratified
    assert "load_digits" in (task_dir / "README.md").read_text()
    image, _ = ImageListDataset(task_dir, "test")[0]
    assert image.size == (8, 8) and image.mode == "RGB"

    stamp = (task_dir / "test.txt").stat().st_mtime_ns
    assert ensure_digits_task(tmp_path) == task_dir  # idempotent: nothing rewritten
    assert (task_dir / "test.txt").stat().st_mtime_ns == stamp
    assert [p.name for p in tmp_path.iterdir()] == ["digits"]


def test_digits_incomplete_folder_is_reported(tmp_path: Path) -> None:
    (tmp_path / "digits").mkdir()
    with pytest.raises(DataError, match="not a complete digits export"):
        ensure_digits_task(tmp_path)


def test_digits_split_is_deterministic() -> None:
    datasets = pytest.importorskip("sklearn.datasets")
    from vpeft.data.digits import DIGITS_SEED, _split_indices

    labels = datasets.load_digits().target
    a, b = _split_indices(labels, DIGITS_SEED), _split_indices(labels, DIGITS_SEED)
    assert all(np.array_equal(a[s], b[s]) for s in SPLITS)
    assert {s: len(v) for s, v in a.items()} == DIGITS_SPLIT_SIZES


# --------------------------------------------------------------------------- real shared tasks


@pytest.mark.skipif(not SHARED_VTAB.is_dir(), reason=f"shared VTAB-1k data not found at {SHARED_VTAB}")
@pytest.mark.parametrize("name,n_classes", sorted(SHARED_TASKS.items()))
def test_shared_tasks(name: str, n_classes: int) -> None:
    if not (SHARED_VTAB / name).is_dir():
        pytest.skip(f"shared task {name} not present under {SHARED_VTAB}")
    task = VTABTask.from_dir(SHARED_VTAB / name)
    assert task.num_classes == n_classes and task.splits() == list(SPLITS)
    tf = build_transform({"mean": (0.5,) * 3, "std": (0.5,) * 3}, 32)
    train = task.dataset("train800", tf)
    trainval = task.dataset("train800val200", tf)
    val = task.dataset("val200", tf)
    assert len(trainval) == len(train) + len(val)
    assert len(task.dataset("test")) > 0
    image, label = train[0]
    assert image.shape == (3, 32, 32) and 0 <= label < n_classes
    assert -1.0 <= float(image.min()) and float(image.max()) <= 1.0
