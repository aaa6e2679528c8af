"""Object detection: the COCO folder format, the torchvision detectors on vpeft features, COCO mAP, every method.

Fixtures are small COCO folders written here (24-48 px images); tiny random backbones from tests/tiny.py at 32 px;
the real chess data (../shared/data/det/chess) where present.
"""

from __future__ import annotations

import copy
import json
import logging
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from tiny import TINY_BACKBONES, case_id, method_cases, method_of

import vpeft
import vpeft.train.metrics
from vpeft.data.detection import (
    TARGET_FIELDS,
    DetectionDataset,
    DetectionFolder,
    detection_splits,
    is_detection_folder,
    read_detection_split,
)
from vpeft.errors import ConfigError, DataError
from vpeft.tasks import task_for_folder, task_from_dict
from vpeft.tasks.detection import (
    DETECTORS,
    EVAL_LOSS_DETECTORS,
    DetectionMeter,
    DetectionModel,
    Detections,
    DetectionTask,
    coco_metrics,
    default_detection_width,
)

# ------------------------------------------------------------------------------------------------ fixture folders
#: category ids as real exports have them: a supercategory 0 without boxes, gaps, a class never used (9)
CATEGORIES = [
    {"id": 0, "name": "things", "supercategory": "none"},
    {"id": 3, "name": "cat", "supercategory": "things"},
    {"id": 7, "name": "dog", "supercategory": "things"},
    {"id": 9, "name": "bird", "supercategory": "things"},
]
LABEL = {0: 0, 3: 1, 7: 2, 9: 3}


def _image(path: Path, w: int, h: int, boxes=()) -> None:
    """A black image with each ``[x, y, w, h]`` box painted white (so a flip can be checked from pixels)."""
    arr = np.zeros((h, w, 3), np.uint8)
    for x, y, bw, bh in boxes:
        arr[int(y) : int(y + bh), int(x) : int(x + bw)] = 255
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)


def _write_split(root: Path, split: str, images: list[dict], anns: list[dict], categories=CATEGORIES) -> None:
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    for i, a in enumerate(anns):
        a.setdefault("id", i + 1)
        a.setdefault("iscrowd", 0)
        a.setdefault("area", a["bbox"][2] * a["bbox"][3])
    doc = {"images": images, "annotations": anns, "categories": categories}
    (root / "annotations" / f"{split}.json").write_text(json.dumps(doc))


def make_det_folder(root: Path, w: int = 48, h: int = 32) -> Path:
    """train: image 1 with a cat and a dog; image 2 empty; image 3 with a crowd box, a zero-area box, a box outside
    the image and one partly outside. valid / test: one image each."""
    img = lambda i, split: {"id": i, "file_name": f"{i}.png", "width": w, "height": h}  # noqa: E731
    train_boxes = {1: [[4, 4, 12, 10], [24, 8, 16, 20]], 3: [[2, 2, 10, 10], [40, 20, 20, 30]]}
    for i in (1, 2, 3):
        _image(root / "images" / "train" / f"{i}.png", w, h, train_boxes.get(i, ()))
    _write_split(
        root,
        "train",
        [img(1, "train"), img(2, "train"), img(3, "train")],
        [
            {"image_id": 1, "category_id": 3, "bbox": [4, 4, 12, 10]},
            {"image_id": 1, "category_id": 7, "bbox": [24, 8, 16, 20]},
            {"image_id": 3, "category_id": 3, "bbox": [2, 2, 10, 10], "iscrowd": 1, "area": 77.0},
            {"image_id": 3, "category_id": 7, "bbox": [5, 5, 0, 8]},  # zero area
            {"image_id": 3, "category_id": 7, "bbox": [60, 40, 5, 5]},  # entirely outside the 48x32 image
            {"image_id": 3, "category_id": 7, "bbox": [40, 20, 20, 30]},  # partly outside: clipped to 8x12
        ],
    )
    for split in ("valid", "test"):
        _image(root / "images" / split / "5.png", w, h, [[8, 6, 20, 14]])
        _write_split(root, split, [img(5, split)], [{"image_id": 5, "category_id": 7, "bbox": [8, 6, 20, 14]}])
    return root


# ---------------------------------------------------------------------------------------------------- data folder
def test_a_coco_folder_is_a_detection_folder_with_its_categories_as_classes(tmp_path):
    root = make_det_folder(tmp_path / "toy")
    assert is_detection_folder(root) and detection_splits(root) == ["test", "train", "valid"]
    assert not is_detection_folder(tmp_path / "missing")
    folder = DetectionFolder.from_dir(root)
    assert folder.class_names == ("things", "cat", "dog", "bird") and folder.num_classes == 4
    task = task_for_folder(root)  # detected before classification's generic fallback
    assert task.kind == "detection" and task.class_names == folder.class_names
    assert task.primary_metric == "map"


def test_reading_a_split_maps_ids_drops_and_clips_boxes_with_a_logged_count(tmp_path, caplog):
    root = make_det_folder(tmp_path / "toy")
    with caplog.at_level(logging.WARNING, logger="vpeft.data.detection"):
        recs = read_detection_split(root, "train")
    assert (recs.dropped_zero_area, recs.dropped_outside, recs.clipped) == (1, 1, 1)
    msg = " ".join(r.getMessage() for r in caplog.records)
    assert "train.json: dropped 1 zero-area box(es) and 1 box(es) outside their image, clipped 1 box(es)" in msg
    one, empty, three = recs.images
    assert one.labels.tolist() == [LABEL[3], LABEL[7]]  # contiguous labels in category-id order
    np.testing.assert_allclose(one.boxes, [[4, 4, 16, 14], [24, 8, 40, 28]])
    assert len(empty.labels) == 0 and empty.boxes.shape == (0, 4)  # kept as a negative
    assert three.iscrowd.tolist() == [True, False] and three.area.tolist()[0] == 77.0  # the annotation's own area
    np.testing.assert_allclose(three.boxes[1], [40, 20, 48, 32])  # clipped to the image
    assert recs.num_boxes == 4
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="vpeft.data.detection"):
        read_detection_split(root, "valid")
    assert not caplog.records, "a clean split logs nothing"


def test_items_keep_the_aspect_ratio_on_a_padded_canvas(tmp_path):
    root = make_det_folder(tmp_path / "toy")
    ds = DetectionDataset(root, "train", 24, mean=(0, 0, 0), std=(1, 1, 1))
    assert len(ds) == 3 and ds.max_boxes == 2 and not ds.random_augmentation
    x, t = ds[0]
    assert x.shape == (3, 24, 24) and t.shape == (2, len(TARGET_FIELDS)) and t.dtype == torch.float32
    assert ds.scaled_size(ds.records.images[0]) == (24, 16)  # 48x32 -> 24x16: aspect kept
    assert x[:, 16:].abs().max() == 0, "padding below the image is zero (the normalised mean colour)"
    torch.testing.assert_close(t[:, 1:5], torch.tensor([[2.0, 2.0, 8.0, 7.0], [12.0, 4.0, 20.0, 14.0]]))
    assert t[:, 0].tolist() == [1.0, 2.0] and t[:, 7].tolist() == [0.5, 0.5] and t[:, 8].tolist() == [0.5, 0.5]
    assert t[:, 6].tolist() == [120.0, 320.0], "areas stay in stored pixels (COCO's size ranges)"
    # the painted box is where the target says
    assert x[0, 3:6, 3:7].min() == 1.0 and x[0, 9, 9] == 0.0
    _, empty = ds[1]
    assert empty[:, 0].tolist() == [-1.0, -1.0] and empty[0, 7] == 0.5  # padding rows still carry the scale
    _, crowd = ds[2]
    assert crowd[:, 5].tolist() == [1.0, 0.0]


def test_flip_moves_boxes_with_the_image_only_with_augment(tmp_path):
    root = make_det_folder(tmp_path / "toy")
    plain = DetectionDataset(root, "train", 24, mean=(0, 0, 0), std=(1, 1, 1))
    aug = DetectionDataset(root, "train", 24, mean=(0, 0, 0), std=(1, 1, 1), augment=True)
    assert aug.random_augmentation
    ref_x, ref_t = plain[0]
    seen = set()
    for seed in range(12):
        torch.manual_seed(seed)
        x, t = aug[0]
        flipped = not torch.equal(x, ref_x)
        seen.add(flipped)
        for x1, y1, x2, y2 in t[:, 1:5].round().long().tolist():  # every box sits on its white patch
            assert x[0, y1 + 1 : y2 - 1, x1 + 1 : x2 - 1].min() == 1.0  # (bilinear edges aside)
            assert x[0, y1:y2, x1:x2].mean() > 0.8
            assert x2 <= 24 and x1 >= 0
        if flipped:
            assert x[:, 16:].abs().max() == 0 and torch.equal(x[:, :16].flip(-1), ref_x[:, :16])
            torch.testing.assert_close(t[:, [1, 3]], 24 - ref_t[:, [3, 1]])
    assert seen == {True, False}
    torch.manual_seed(0)
    for _ in range(5):
        assert torch.equal(plain[0][0], ref_x), "no flip without augment"


def test_joined_splits(tmp_path):
    root = make_det_folder(tmp_path / "toy")
    assert len(read_detection_split(root, "trainval").images) == 4  # train + valid
    assert len(read_detection_split(root, "valid+test").images) == 2


def _broken(root: Path, change) -> Path:
    path = root / "annotations" / "train.json"
    doc = json.loads(path.read_text())
    change(doc)
    path.write_text(json.dumps(doc))
    return path


BAD = [  # (list, index, change, the expected message)
    ("images", 1, {"file_name": "nope.png"}, r"train.json: image 'nope.png' \(id 2\) does not exist"),
    ("annotations", 0, {"bbox": [4, 4, -3, 10]}, r"annotation 1 has a box of negative size \(bbox \[4, 4, -3, 10\]\)"),
    ("annotations", 1, {"category_id": 5}, r"annotation 2 has category_id 5, not among the categories \[0, 3, 7, 9\]"),
    ("annotations", 1, {"image_id": 42}, r"train.json: annotation 2 names image_id 42"),
    ("annotations", 1, {"bbox": [1, 2, 3]}, r"train.json: annotation 2 has bbox \[1, 2, 3\], expected four"),
    ("images", 0, {"width": 50}, r"train.json: image '1.png' is 48x32 but the file records width=50"),
]


@pytest.mark.parametrize("key,index,change,match", BAD, ids=[f"{c[0]}{c[1]}-{next(iter(c[2]))}" for c in BAD])
def test_bad_annotations_are_one_line_data_errors_naming_file_and_value(tmp_path, key, index, change, match):
    root = make_det_folder(tmp_path / "toy")
    _broken(root, lambda doc: doc[key][index].update(change))
    with pytest.raises(DataError, match=match) as err:
        DetectionDataset(root, "train", 24)  # checked up front, before any item is read
    assert "\n" not in str(err.value)


def test_folder_level_errors(tmp_path):
    root = make_det_folder(tmp_path / "toy")
    with pytest.raises(DataError, match=r"split 'tset'.*Did you mean 'test'"):
        read_detection_split(root, "tset")
    other = [*CATEGORIES[:3], {"id": 9, "name": "fish"}]
    _write_split(root, "test", [], [], categories=other)
    with pytest.raises(DataError, match=r"test.json: categories .* differ from the class-defining split"):
        read_detection_split(root, "test")
    (root / "annotations" / "valid.json").write_text("{not json")
    with pytest.raises(DataError, match="valid.json cannot be read as JSON"):
        read_detection_split(root, "valid")
    _write_split(root, "valid", [], [])
    with pytest.raises(DataError, match="split 'valid' of .* lists no images"):
        read_detection_split(root, "valid")
    with pytest.raises(ConfigError, match="size=0"):
        DetectionDataset(root, "train", 0)


# ------------------------------------------------------------------------------------------------ real chess data
def _chess() -> Path:
    root = Path(__file__).resolve().parents[1]
    env = os.environ.get("VPEFT_DET_DATA")
    candidates = [Path(env) if env else None, root.parent / "shared/data/det", Path.cwd().parent / "shared/data/det"]
    for base in candidates:
        if base is not None and (base / "chess" / "annotations" / "train.json").is_file():
            return base / "chess"
    pytest.skip("chess detection data not found (../shared/data/det/chess or $VPEFT_DET_DATA/chess)")


def test_real_chess_splits_validate_with_their_sparse_categories():
    chess = _chess()
    folder = DetectionFolder.from_dir(chess)
    assert folder.num_classes == 14 and folder.class_names[:2] == ("pieces", "bishop")
    assert folder.class_names[-1] == "white-rook"
    counts = {}
    for split, (n_img, n_box) in {"train": (202, 2108), "valid": (58, 386), "test": (29, 376)}.items():
        recs = read_detection_split(chess, split, folder)  # every image's header read and checked
        assert len(recs.images) == n_img and recs.num_boxes == n_box
        assert {(r.width, r.height) for r in recs.images} == {(640, 428)}
        counts[split] = np.bincount(np.concatenate([r.labels for r in recs.images]), minlength=14)
    assert counts["train"][0] == 0 and counts["train"][1] == 1  # the supercategory and the one-box class
    ds = DetectionDataset(chess, "test", 64, folder=folder)
    x, t = ds[0]
    assert x.shape == (3, 64, 64) and ds.scaled_size(ds.records.images[0]) == (64, 43)
    assert t[:, 7].unique().tolist() == [pytest.approx(0.1)]


# ---------------------------------------------------------------------------------------------- model and detectors
NAMES = ("a", "b", "c")


def _headless(bb: str) -> tuple[torch.nn.Module, int]:
    factory, size = TINY_BACKBONES[bb]
    model = factory()
    model.reset_classifier(0)
    return model, size


def _targets(size: int, n: int = 2, seed: int = 0) -> torch.Tensor:
    """Padded (n, 4, 9) targets: 1-3 random boxes per image (labels 0..2), one crowd box, one padding row."""
    g = torch.Generator().manual_seed(seed)
    t = torch.zeros(n, 4, len(TARGET_FIELDS))
    t[:, :, 0] = -1
    t[:, :, 7:] = 1.0
    for i in range(n):
        for j in range(1 + i % 3):
            xy = torch.rand(2, generator=g) * size * 0.5
            wh = 4 + torch.rand(2, generator=g) * size * 0.4
            t[i, j, :7] = torch.tensor([j % 3, *xy, *(xy + wh), 0, float(wh.prod())])
    t[0, 3, :7] = torch.tensor([1, 0, 0, size / 2, size / 2, 1, size * size / 4])  # a crowd box
    return t


def _images(size: int, n: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


LOSSES = {
    "fcos": {"classification", "bbox_regression", "bbox_ctrness"},
    "retinanet": {"classification", "bbox_regression"},
    "faster_rcnn": {"loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg"},
}


@pytest.mark.parametrize("detector", sorted(DETECTORS))
@pytest.mark.parametrize("bb", ["vit_cls", "cnn_effnet", "swin"])
def test_torchvision_detectors_on_tiny_backbones(detector, bb):
    model, size = _headless(bb)
    for p in model.parameters():
        p.requires_grad_(False)
    task = DetectionTask(NAMES, detector=detector, width=32)
    det = task.build(model)
    size = max(size, det.min_canvas)  # FCOS on the CNN: 64 px, so its coarsest level (stride 32) is 2x2
    assert isinstance(det, DetectionModel) and det.backbone is model and det.task is task
    assert {n.split(".")[0] for n in det.state_dict()} == {"backbone", "decoder"}
    assert not any(n.startswith("decoder.backbone.features") for n in det.state_dict())
    det.train()
    x, t = _images(size), _targets(size)
    losses = task.forward(det, x, t)
    assert set(losses) == LOSSES[detector]
    loss = task.loss(losses, t)
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    for name, p in det.decoder.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    det.eval()
    with torch.no_grad():
        out = task.forward(det, x, t)
    assert len(out) == 2 and torch.isnan(task.loss(out, t)) == (detector not in EVAL_LOSS_DETECTORS)
    for d in out:
        assert d["boxes"].shape[1] == 4 and len(d["boxes"]) == len(d["scores"]) == len(d["labels"]) <= 100
        if len(d["boxes"]):  # (a random RetinaNet may score everything below the threshold)
            assert d["boxes"].min() >= 0 and d["boxes"].max() <= size
            assert d["labels"].min() >= 0 and d["labels"].max() < len(NAMES)  # Faster R-CNN's background removed


def test_the_neck_builds_vitdet_strides_from_the_patch_and_cnn_stages_as_they_are():
    import timm

    torch.manual_seed(0)
    vit16 = timm.create_model("vit_tiny_patch16_224", img_size=64, embed_dim=32, depth=2, num_heads=2, num_classes=0)
    det = DetectionTask(NAMES, width=32).build(vit16)
    assert det.neck.strides == (8.0, 16.0, 32.0) and det.neck.out_channels == 32  # ViTDet's 8 / 16 / 32
    maps = det.neck(_images(64))
    assert list(maps) == ["0", "1", "2"] and [tuple(m.shape) for m in maps.values()] == [
        (2, 32, 8, 8),
        (2, 32, 4, 4),
        (2, 32, 2, 2),
    ]
    model, size = _headless("cnn_effnet")
    cnn = DetectionTask(NAMES, width=32).build(model)
    maps = cnn.neck(_images(size))
    assert [m.shape[-1] * s for m, s in zip(maps.values(), cnn.neck.strides)] == [size] * 3
    assert cnn.neck.strides == tuple(sorted(cnn.neck.strides)) and len(set(cnn.neck.strides)) == 3
    assert default_detection_width([384]) == 192 and default_detection_width([768]) == 256
    assert default_detection_width([32]) == 32


@pytest.mark.parametrize("detector", EVAL_LOSS_DETECTORS)
def test_the_evaluation_loss_is_torchvisions_training_loss_on_the_same_batch(detector):
    """No dropout / drop-path / BatchNorm in the tiny ViT or the heads: the training forward's loss dict and the
    evaluation forward's losses (torchvision's compute_loss on its own head outputs and anchors) agree."""
    model, size = _headless("vit_cls")
    task = DetectionTask(NAMES, detector=detector, width=32)
    det = task.build(model)
    stochastic = (torch.nn.Dropout, torch.nn.BatchNorm2d)
    assert not any(isinstance(m, stochastic) and getattr(m, "p", 1) > 0 for m in det.modules())
    assert all(type(getattr(b, "drop_path1", torch.nn.Identity())) is torch.nn.Identity for b in model.blocks)
    _randomise(det)  # a detector that predicts something: every loss term non-zero
    x, t = _images(size), _targets(size)
    with torch.no_grad():
        train = task.forward(det.train(), x, t)
        out = task.forward(det.eval(), x, t)
        plain = det(x)  # no targets: the detections alone, as before
    assert isinstance(out, Detections) and set(out.losses) == set(train) == LOSSES[detector]
    for name, value in train.items():
        assert value > 0 and abs(float(out.losses[name]) - float(value)) <= 1e-5, name
    assert abs(float(task.loss(out, t)) - float(task.loss(train, t))) <= 1e-5
    assert plain.losses == {} and torch.isnan(task.loss(plain, t)) and len(plain) == len(out) == 2
    for a, b in zip(plain, out):  # the evaluation forward itself is unchanged by the loss
        assert all(torch.equal(a[k], b[k]) for k in ("boxes", "scores", "labels"))
    faster = DetectionTask(NAMES, detector="faster_rcnn", width=32).build(_headless("vit_cls")[0]).eval()
    with torch.no_grad():
        assert torch.isnan(faster.task.loss(faster.task.forward(faster, x, t), t))  # its losses sample at random


@pytest.mark.parametrize("patch", [16, 8])
def test_fcos_refuses_a_canvas_its_coarsest_level_is_under_2x2_for(patch, tmp_path):
    """The reported failure: a single 32 px image through FCOS on a patch-16 ViT -- the pyramid's coarsest level
    (stride 32) is 1x1 and torchvision's GroupNorm head raised 'Expected more than 1 value per channel'. Now a
    one-line ConfigError before any work, in training and evaluation; patch 8 (coarsest stride 16, 2x2) runs."""
    import timm

    from vpeft.data.detection import load_detection_split

    vit = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=patch, embed_dim=32, depth=2,
                            num_heads=2, num_classes=0)  # fmt: skip
    root = make_det_folder(tmp_path / "toy")
    names = DetectionFolder.from_dir(root).class_names
    det = DetectionTask(names, detector="fcos", width=32).build(vit)
    assert det.min_canvas == 4 * patch
    x, t = _images(32, n=1), _targets(32, n=1)
    message = (
        r"^detection: a 32 px canvas makes fcos's coarsest pyramid level \(stride 32\) 1x1, and its GroupNorm head "
        r"needs every level at least 2x2; use size >= 64 \(twice the coarsest stride\), or detector=retinanet / "
        r"faster_rcnn$"
    )
    for mode in (True, False):
        det.train(mode)
        if patch == 16:
            with pytest.raises(ConfigError, match=message):
                det.task.forward(det, x, t)
        else:
            out = det.task.forward(det, x, t)
            assert torch.isfinite(det.task.loss(out, t))
    if patch == 16:  # the CLI's path: refused when the split is read, before training
        with pytest.raises(ConfigError, match=message):
            det.task.dataset(root, "train", det, input_size=32)
        assert len(det.task.dataset(root, "train", det, input_size=64)) > 0
        retina = DetectionTask(names, detector="retinanet", width=32).build(vit).eval()
        assert retina.min_canvas == 1 and len(retina(x)) == 1  # no normalisation in its head: a 1x1 level is fine
    else:
        assert len(load_detection_split(root, "train", det, size=32)) > 0


def test_torchvision_targets_drop_crowd_and_padding_and_shift_faster_rcnn_labels():
    t = _targets(32)
    fcos = DetectionTask(NAMES).torchvision_targets(t)
    assert [len(d["boxes"]) for d in fcos] == [1, 2]  # image 0: one box + a crowd box (dropped) + padding
    assert fcos[1]["labels"].tolist() == [0, 1] and fcos[1]["labels"].dtype == torch.int64
    torch.testing.assert_close(fcos[0]["boxes"], t[0, :1, 1:5])
    assert DetectionTask(NAMES, detector="faster_rcnn").torchvision_targets(t)[1]["labels"].tolist() == [1, 2]


def test_training_mode_without_targets_is_refused():
    model, size = _headless("vit_cls")
    det = DetectionTask(NAMES, width=32).build(model).train()
    with pytest.raises(ConfigError, match="needs the targets"):
        det(_images(size))


def test_task_dict_round_trip_options_and_compatibility():
    task = DetectionTask(NAMES, detector="retinanet", width=48, size=64, augment=True)
    data = json.loads(json.dumps(task.to_dict()))
    assert data == {"kind": "detection", "num_classes": 3, "class_names": ["a", "b", "c"], "detector": "retinanet",
                    "width": 48, "size": 64, "augment": True}  # fmt: skip
    back = task_from_dict(data)
    assert isinstance(back, DetectionTask) and back.to_dict() == data and back.backbone_classes() == 0
    assert back.backbone_kwargs() == {"dynamic_img_size": True} and DetectionTask(NAMES).backbone_kwargs() == {}
    DetectionTask(NAMES, detector="retinanet", width=48).check_compatible(data, "d")  # data options may differ
    with pytest.raises(ConfigError, match=r"another detection set-up: detector='retinanet' \(this model: 'fcos'\)"):
        DetectionTask(NAMES, width=64).check_compatible({**data, "width": 64}, "d")
    with pytest.raises(ConfigError, match="class_names"):
        DetectionTask(("a", "b", "d"), detector="retinanet", width=48).check_compatible(data, "d")
    with pytest.raises(ConfigError, match="'segmentation' task"):
        task.check_compatible({"kind": "segmentation"}, "d")


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"detector": "yolo"}, "unknown detector 'yolo'; valid detectors: fcos, retinanet, faster_rcnn"),
        ({"width": 48}, "width=48 must be a multiple of 32 for fcos"),
        ({"width": 0, "detector": "retinanet"}, "width=0"),
        ({"size": -1}, "size=-1"),
    ],
)
def test_bad_task_settings(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        DetectionTask(NAMES, **kwargs)


def test_unknown_folder_options_are_refused(tmp_path):
    root = make_det_folder(tmp_path / "toy")
    with pytest.raises(ConfigError, match="unknown option.*'decoder'.*valid task options: detector, width"):
        task_for_folder(root, decoder="fpn")


# ------------------------------------------------------------------------------------------------------ COCO metrics
def _gt(*rows):
    """``[x, y, w, h, label, iscrowd]`` rows -> ground-truth rows with the box area."""
    return np.array([[*r, r[2] * r[3]] for r in rows], np.float32).reshape(-1, 7)


def _dt(*rows):
    return np.array(rows, np.float32).reshape(-1, 6)


def test_coco_map_of_perfect_predictions_is_one():
    gt = [_gt([10, 10, 50, 40, 0, 0], [70, 20, 40, 40, 1, 0]), _gt([5, 5, 120, 90, 1, 0])]
    dt = [_dt([10, 10, 50, 40, 0.9, 0], [70, 20, 40, 40, 0.8, 1]), _dt([5, 5, 120, 90, 0.7, 1])]
    out = coco_metrics(gt, dt, 3)
    for key in ("map", "ap50", "ap75", "ap_medium", "ap_large"):
        assert out[key] == pytest.approx(1.0), key
    assert np.isnan(out["ap_small"])  # no box below 32^2 px in the split
    assert out["ap"] == [pytest.approx(1.0), pytest.approx(1.0), None]  # class 2 has no box


def test_coco_map_of_one_of_two_boxes_is_51_of_101():
    """Two boxes of one class, one found exactly: precision 1 up to recall 0.5, then nothing; COCO interpolates
    precision at the 101 recall points 0, 0.01 ... 1, so AP = 51 / 101 at every IoU threshold."""
    gt = [_gt([10, 10, 50, 40, 0, 0], [70, 60, 40, 40, 0, 0])]
    out = coco_metrics(gt, [_dt([10, 10, 50, 40, 0.9, 0])], 1)
    assert out["map"] == pytest.approx(51 / 101) and out["ap50"] == pytest.approx(51 / 101)
    assert out["ap"] == [pytest.approx(51 / 101)]
    # a box at IoU 0.6 counts at thresholds .50 .. .60 only: 3 of 10 IoU thresholds
    shifted = coco_metrics([_gt([0, 0, 100, 100, 0, 0])], [_dt([0, 0, 100, 60, 0.9, 0])], 1)
    assert shifted["ap50"] == pytest.approx(1.0) and shifted["ap75"] == pytest.approx(0.0)
    assert shifted["map"] == pytest.approx(0.3)
    assert coco_metrics([_gt([0, 0, 100, 100, 0, 0])], [_dt()], 1)["map"] == 0.0  # no detection at all


def test_crowd_regions_and_size_ranges_follow_coco():
    """A detection inside a crowd region is neither a true nor a false positive; sizes come from the area field."""
    gt = [_gt([10, 10, 40, 40, 0, 0], [100, 0, 100, 100, 0, 1])]
    dt = [_dt([10, 10, 40, 40, 0.9, 0], [120, 20, 30, 30, 0.95, 0])]  # the higher-scored box lies in the crowd
    assert coco_metrics(gt, dt, 1)["map"] == pytest.approx(1.0)
    no_crowd = [_gt([10, 10, 40, 40, 0, 0])]  # without the crowd region it is a false positive ranked first
    assert coco_metrics(no_crowd, dt, 1)["map"] == pytest.approx(0.5, abs=0.01)
    sizes = [_gt([0, 0, 10, 10, 0, 0], [50, 50, 100, 100, 0, 0])]  # areas 100 (small) and 10000 (large)
    out = coco_metrics(sizes, [_dt([0, 0, 10, 10, 0.9, 0])], 1)
    assert out["ap_small"] == pytest.approx(1.0) and out["ap_large"] == 0.0 and np.isnan(out["ap_medium"])
    empty = coco_metrics([_gt()], [_dt([0, 0, 5, 5, 0.5, 0])], 2)
    assert np.isnan(empty["map"]) and empty["ap"] == [None, None]


def _det_batch(boxes, scores, labels):
    return {"boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4), "scores": torch.tensor(scores),
            "labels": torch.tensor(labels, dtype=torch.int64)}  # fmt: skip


def test_meter_maps_boxes_back_to_stored_pixels_and_gathers_like_ddp():
    """Targets at scale 0.5 (a 2x downscaled input): the meter compares in stored pixels with the stored areas, so
    a box of stored area 900 is 'small' even though it is 15x15 in the input."""
    t = torch.zeros(2, 2, len(TARGET_FIELDS))
    t[:, :, 0] = -1
    t[:, :, 7:] = 0.5
    t[0, 0, :7] = torch.tensor([0, 5, 5, 20, 20, 0, 900.0])  # stored box 10,10 .. 40,40
    t[1, 0, :7] = torch.tensor([1, 0, 0, 60, 40, 0, 9600.0])
    out = [_det_batch([[5, 5, 20, 20]], [0.9], [0]), _det_batch([[0, 0, 60, 40]], [0.8], [1])]
    meter = DetectionMeter(2)
    meter.update(torch.tensor(float("nan")), out, t)
    gt, dt = meter.records[0]
    np.testing.assert_allclose(gt[0], [10, 10, 30, 30, 0, 0, 900])
    np.testing.assert_allclose(dt[0], [10, 10, 30, 30, 0.9, 0])
    res = meter.compute()
    assert res["map"] == pytest.approx(1.0) and res["ap_small"] == pytest.approx(1.0) and res["n"] == 2
    assert np.isnan(res["loss"]), "evaluation has no loss"
    # two ranks' halves: sums add, payloads concatenate -> the whole split's result
    a, b, whole = DetectionMeter(2), DetectionMeter(2), DetectionMeter(2)
    miss = [_det_batch([], [], []), _det_batch([[0, 0, 60, 40]], [0.8], [1])]
    for m, (o, tt) in ((a, (out[:1], t[:1])), (b, (miss[1:], t[1:]))):
        m.update(torch.tensor(2.0), o, tt)
    for o, tt in ((out[:1], t[:1]), (miss[1:], t[1:])):
        whole.update(torch.tensor(2.0), o, tt)
    merged = DetectionMeter(2)
    merged.load_sums(a.sums() + b.sums())
    merged.load_payloads([a.payload(), b.payload()])
    safe = vpeft.train.metrics.json_safe
    assert safe(merged.compute()) == safe(whole.compute()) and merged.compute()["loss"] == 2.0
    assert whole.compute()["map"] == pytest.approx(1.0)
    json.dumps(safe(whole.compute()), allow_nan=False)
    # training batches (a loss dict) add to the loss only
    train = DetectionMeter(2)
    train.update(torch.tensor(1.5), {"classification": torch.tensor(1.0)}, t)
    assert train.records == [] and train.compute()["loss"] == 1.5 and np.isnan(train.compute()["map"])


# ------------------------------------------------------------------------------- every method on a detection model
DET_BB = ("vit_cls", "cnn_effnet")
#: every registered image method's defaults + the contract's extra option cases (video-only methods excluded)
DET_CASES = [c for c in method_cases() if "image" in vpeft.get_method(c[0]).inputs]
_SUPPORT: dict[tuple[str, str], bool] = {}


def _det_model(bb: str, detector: str = "fcos") -> tuple[DetectionModel, int]:
    """The detection model and its test canvas: the tiny backbone's side, or FCOS's smallest (the CNN: 64 px)."""
    model, size = _headless(bb)
    torch.manual_seed(5)
    det = DetectionTask(NAMES, detector=detector, width=32).build(model)
    return det, max(size, det.min_canvas)


def _det_supports(case, bb: str) -> bool:
    key = (case_id(case), bb)
    if key not in _SUPPORT:
        try:
            vpeft.apply(_det_model(bb)[0], case[0], **case[1])
            _SUPPORT[key] = True
        except vpeft.UnsupportedBackboneError:
            _SUPPORT[key] = False
    return _SUPPORT[key]


DET_MATRIX = [pytest.param(c, bb, id=f"{case_id(c)}@{bb}") for c in DET_CASES for bb in DET_BB if _det_supports(c, bb)]
DET_REFUSED = [
    pytest.param(c, bb, id=f"{case_id(c)}@{bb}") for c in DET_CASES for bb in DET_BB if not _det_supports(c, bb)
]


def _randomise(model: torch.nn.Module, seed: int = 3) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)


def test_the_matrix_covers_every_image_method_and_both_backbones():
    from vpeft.methods.towers import CLIP_METHODS  # two-tower CLIP methods: tests/test_clip.py

    assert {p.values[1] for p in DET_MATRIX} == set(DET_BB)
    image_methods = {n for n in vpeft.list_methods() if "image" in vpeft.get_method(n).inputs} - set(CLIP_METHODS)
    assert {p.values[0][0] for p in DET_MATRIX} == image_methods, "every image method adapts some backbone"
    video_only = {n for n in vpeft.list_methods() if "image" not in vpeft.get_method(n).inputs}
    assert video_only and not video_only & {c[0] for c in DET_CASES}


@pytest.mark.parametrize("case,bb", DET_MATRIX)
def test_method_on_a_detection_model_trains_its_tensors_and_the_detector(case, bb):
    det, size = _det_model(bb)
    rep = vpeft.apply(det, case[0], **case[1])
    decoder = {f"decoder.{n}" for n, _ in det.decoder.named_parameters()}
    trainable = {n for n, p in det.named_parameters() if p.requires_grad}
    assert decoder <= trainable and rep.decoder == sum(p.numel() for p in det.decoder.parameters())
    assert rep.method_params + rep.head + rep.decoder == rep.trainable  # method and detector counted apart
    if case[0] != "linear":
        assert trainable - decoder, f"{case[0]} trains nothing in the backbone"
    _randomise(det)
    frozen = {n: p.detach().clone() for n, p in det.named_parameters() if not p.requires_grad}
    buffers = {n: b.detach().clone() for n, b in det.named_buffers() if not n.startswith("decoder.")}
    opt = torch.optim.AdamW([p for p in det.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    det.train()
    t = _targets(size)
    loss = det.task.loss(det.task.forward(det, _images(size), t), t)
    assert torch.isfinite(loss)
    loss.backward()
    for n, p in det.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and torch.isfinite(p.grad).all(), n
            # (FCOS regresses through a ReLU: its last conv may get an exact zero on a random batch)
            assert n.startswith("decoder.") or p.grad.abs().sum() > 0, f"{n} got a zero gradient"
        else:
            assert p.grad is None, f"frozen {n} holds a .grad"
    assert sum(float(p.grad.abs().sum()) for p in det.decoder.parameters()) > 0
    opt.step()
    for n, p in det.named_parameters():
        if not p.requires_grad:
            assert torch.equal(p, frozen[n]), f"frozen {n} changed"
    if method_of(*case).freeze_norm_stats:
        for n, b in det.named_buffers():
            if not n.startswith("decoder."):
                assert torch.equal(b, buffers[n]), f"backbone buffer {n} changed"


def _same_detections(a, b) -> bool:
    return all(torch.equal(x[k], y[k]) for x, y in zip(a, b) for k in ("boxes", "scores", "labels"))


@pytest.mark.parametrize("case,bb", DET_MATRIX)
def test_detection_delta_round_trip_and_merge(case, bb, tmp_path):
    from vpeft.api import read_delta

    det, size = _det_model(bb)
    vpeft.apply(det, case[0], **case[1])
    _randomise(det)
    det.train()
    t = _targets(size)
    det.task.forward(det, _images(size, n=2, seed=4), t)  # BatchNorm statistics (where a method trains them) move
    det.eval()
    x = _images(size)
    with torch.no_grad():
        expected, maps = det(x), det.neck(x)
    assert sum(len(d["boxes"]) for d in expected) > 0, "the check needs detections to compare"
    path = vpeft.save(det, tmp_path / "delta.safetensors")
    meta, tensors = read_delta(path)
    assert json.loads(meta["task"]) == det.task.to_dict()
    assert {f"decoder.{n}" for n in det.decoder.state_dict()} <= set(tensors), "the detector's tensors are saved"
    assert all(n.startswith(("backbone.", "decoder.")) for n in tensors)
    model, _ = _headless(bb)
    torch.manual_seed(123)  # another detector initialisation: the delta must overwrite it
    fresh = DetectionTask(NAMES, detector="fcos", width=32).build(model)
    vpeft.load(fresh, path)
    with torch.no_grad():
        assert _same_detections(fresh.eval()(x), expected)
    if not method_of(*case).mergeable:
        with pytest.raises(ConfigError, match="not mergeable"):
            vpeft.merge(det)
        return
    vpeft.merge(det)
    assert not any(isinstance(m, vpeft.layers.Wrapper) for m in det.backbone.modules())
    with torch.no_grad():
        merged = det.neck(x)
    for key in maps:  # the detector reads these maps (boxes after NMS are a discontinuous function of them)
        torch.testing.assert_close(merged[key], maps[key], rtol=1e-4, atol=1e-5)
    vpeft.unmerge(det)
    with torch.no_grad():
        assert _same_detections(det(x), expected)


@pytest.mark.parametrize("case,bb", DET_REFUSED)
def test_methods_that_cannot_adapt_the_backbone_refuse(case, bb):
    det, _ = _det_model(bb)
    before = copy.deepcopy(det.state_dict())
    with pytest.raises(vpeft.UnsupportedBackboneError, match=case[0]):
        vpeft.apply(det, case[0], **case[1])
    assert not vpeft.is_adapted(det)
    assert all(torch.equal(before[k], v) for k, v in det.state_dict().items())


@pytest.mark.parametrize("detector", ["retinanet", "faster_rcnn"])
@pytest.mark.parametrize("name,bb", [("lora", "vit_cls"), ("ssf", "swin"), ("bitfit", "cnn_effnet")])
def test_other_detectors_with_methods_round_trip(name, bb, detector, tmp_path):
    det, size = _det_model(bb, detector)
    vpeft.apply(det, name)
    _randomise(det)
    det.train()
    t = _targets(size)
    det.task.loss(det.task.forward(det, _images(size), t), t).backward()
    assert all(p.grad is not None for p in det.parameters() if p.requires_grad)
    det.eval()
    x = _images(size)
    with torch.no_grad():
        expected = det(x)
    path = vpeft.save(det, tmp_path / "d.safetensors")
    fresh = _det_model(bb, detector)[0]
    torch.manual_seed(9)
    fresh = DetectionTask(NAMES, detector=detector, width=32).build(fresh.backbone)
    vpeft.load(fresh, path)
    with torch.no_grad():
        assert _same_detections(fresh.eval()(x), expected)


def test_a_delta_loads_only_onto_the_same_detection_setup(tmp_path):
    from vpeft.errors import CheckpointError

    det, _ = _det_model("vit_cls")
    vpeft.apply(det, "lora")
    path = vpeft.save(det, tmp_path / "d.safetensors")
    with pytest.raises(CheckpointError, match=r"another detection set-up: detector='fcos' \(this model: 'retinanet'\)"):
        vpeft.load(_det_model("vit_cls", "retinanet")[0], path)
    model, _ = _headless("vit_cls")
    with pytest.raises(CheckpointError, match="width=32 .this model: 64"):
        vpeft.load(DetectionTask(NAMES, width=64).build(model), path)
    model, _ = _headless("vit_cls")
    vpeft.load(DetectionTask(NAMES, width=32, augment=True).build(model), path)  # data options may differ


# --------------------------------------------------------------------------------- a real run: finetune and eval
def _chess_subset(root: Path, sizes: dict[str, int]) -> Path:
    """A task folder whose splits are the first images of the real chess splits (file names absolute)."""
    chess = _chess()
    for split, n in sizes.items():
        doc = json.loads((chess / "annotations" / f"{split}.json").read_text())
        images = [{**i, "file_name": str(chess / i["file_name"])} for i in doc["images"][:n]]
        ids = {i["id"] for i in images}
        anns = [a for a in doc["annotations"] if a["image_id"] in ids]
        _write_split(root, split, images, anns, categories=doc["categories"])
    return root


def test_finetune_on_real_chess_images_computes_coco_metrics_and_the_delta_round_trips(tmp_path, capsys):
    from vpeft.cli import main
    from vpeft.run import evaluate_delta, finetune
    from vpeft.train import TrainConfig

    data = tmp_path / "data"
    _chess_subset(data / "chess8", {"train": 8, "test": 4})
    run = finetune(
        backbone="vit_tiny_patch16_224", method="lora", task="chess8", data_root=data,
        train_cfg=TrainConfig(epochs=1, batch_size=4, lr=1e-3, warmup_epochs=0.0), img_size=64,
        train_split="train", eval_split="test", out_dir=tmp_path / "run", pretrained=False, progress=False,
        task_options={"detector": "fcos", "width": 32},
    )  # fmt: skip
    assert run.primary_metric == "map" and run.task_spec["kind"] == "detection" and run.num_classes == 14
    assert run.task_spec["class_names"][0] == "pieces" and run.decoder_params > 0 and run.method_params > 0
    m = run.metrics
    assert m["n"] == 4 and np.isfinite(m["loss"]) and m["loss"] > 0  # FCOS's losses on the eval split
    for key in ("map", "ap50", "ap75"):
        assert 0.0 <= m[key] <= 1.0, key
    assert len(m["ap"]) == 14 and m["ap"][0] is None and set(m["ap_per_class"]) == set(run.task_spec["class_names"])
    assert np.isfinite(run.final_train["train_loss"])
    again = evaluate_delta(tmp_path / "run" / "delta.safetensors", data_root=data, split="test")
    assert again["map"] == pytest.approx(m["map"]) and again["primary_metric"] == "map"
    capsys.readouterr()
    assert main(["eval", "--delta", str(tmp_path / "run" / "delta.safetensors"), "--data-root", str(data)]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["map"] == pytest.approx(m["map"]) and res["ap_per_class"]["pieces"] is None


# ------------------------------------------------------------------------------------------ vpeft bench / report
BENCH_SPLITS = {"train": "train", "val": "valid", "trainval": "trainval", "test": "test"}


def _bench_definition(data_root: Path, methods: list) -> dict:
    return {
        "name": "det", "backbone": "test_vit", "img_size": 64, "pretrained": False, "seeds": [0],
        "data_root": str(data_root), "train": {"epochs": 1, "batch_size": 2, "lr": 1e-2, "warmup_epochs": 0},
        "latency": {"batch_size": 1, "warmup": 0, "repeats": 1},
        "tasks": [{"name": "toy", "group": "dense", "kind": "detection", "options": {"detector": "fcos", "width": 32},
                   "splits": BENCH_SPLITS}],
        "methods": methods,
    }  # fmt: skip


def test_bench_runs_a_detection_task_and_the_report_ranks_by_map_with_ap50(tmp_path, capsys):
    """A 1-epoch bench on the tiny COCO folder through the protocol (select on valid, train on train+valid, test
    once): the record names mAP as its metric, the detector, method and detector parameters apart; `vpeft report`
    ranks by mAP and prints AP50 beside it."""
    from vpeft.bench import build_leaderboard, render_markdown
    from vpeft.bench.records import read_record, record_path
    from vpeft.cli import main

    torch.set_num_threads(1)
    make_det_folder(tmp_path / "data" / "toy")
    methods = [{"name": "linear"}, {"name": "lora", "settings": {"r": 2}}]
    path = tmp_path / "det.json"
    path.write_text(json.dumps(_bench_definition(tmp_path / "data", methods)))
    out = tmp_path / "out"
    assert main(["bench", str(path), "--out", str(out), "--workers", "0", "--quiet"]) == 0
    assert "2 ok, 0 failed" in capsys.readouterr().out
    recs = {m: read_record(record_path(out, m, "toy", 0)) for m in ("linear", "lora")}
    for rec in recs.values():
        assert rec["status"] == "ok" and rec["task_kind"] == "detection" and rec["primary_metric"] == "map"
        assert rec["score"] == rec["top1"] == rec["test_metrics"]["map"] and rec["detector"] == "fcos"
        assert {"ap50", "ap75", "ap_small", "ap"} <= set(rec["test_metrics"]) and rec["test_n"] == 1
        assert rec["class_names"] == ["things", "cat", "dog", "bird"]
        assert rec["trainable_params"] == rec["method_params"] + rec["decoder_params"]
    lin, lora = recs["linear"], recs["lora"]
    import timm

    vit = timm.create_model("test_vit", pretrained=False, num_classes=0, img_size=64)
    detector = DetectionTask(("things", "cat", "dog", "bird"), width=32).build(vit).decoder
    assert lin["method_params"] == 0 and lora["method_params"] > 0
    assert lin["decoder_params"] == lora["decoder_params"] == sum(p.numel() for p in detector.parameters())
    assert lora["latency"]["mergeable"] and lora["latency"]["merge_max_abs_diff"] < 1e-4, "merge keeps the pyramid"
    assert lin["resolved"]["train_split"] == "trainval" and lin["selection"] is None

    assert main(["report", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "test mAP (%)" in printed and "detector params" in printed and "detector `fcos`" in printed
    assert "## Box AP (%) on toy" in printed and "| method | mAP | AP50 | AP75 |" in printed
    assert "## Per-class AP (%) on toy" in printed and "| method | things | cat | dog | bird |" in printed
    titles = {"linear": "frozen backbone", "lora": "LoRA (r=2)"}

    def order(text: str) -> list[str]:
        first_table = text.split("## Cost")[0]
        return [line.split("|")[1].strip() for line in first_table.splitlines() if line.startswith("| ")][1:]

    assert order(printed) == [titles[m] for m in sorted(recs, key=lambda m: -recs[m]["score"])], "ranked by mAP"
    # the same records with the mAPs set apart both ways: the order follows the mAP, whatever the definition order
    for high in ("linear", "lora"):
        changed = copy.deepcopy(recs)
        for m, rec in changed.items():
            rec["score"] = rec["top1"] = rec["test_metrics"]["map"] = 0.5 if m == high else 0.1
        low = next(m for m in recs if m != high)
        assert order(render_markdown(build_leaderboard(list(changed.values())))) == [titles[high], titles[low]]
    box = printed.split("## Box AP (%) on toy")[1].split("##")[0]
    ap50 = {titles[m]: f"{100 * r['test_metrics']['ap50']:.1f}" for m, r in recs.items()}
    for title, value in ap50.items():
        assert any(line.startswith(f"| {title} |") and f"| {value} |" in line for line in box.splitlines()), title


def test_det_chess_experiment_parses():
    from vpeft.bench import load_definition

    d = load_definition(Path(__file__).resolve().parents[1] / "experiments" / "det_chess.yaml")
    runs = {r.method_label: r for r in d.runs()}
    root = Path(__file__).resolve().parents[1]
    assert d.backbone == "dinov2_vits14_imgfocus" and d.img_size % 14 == 0 and d.img_size <= 224
    assert Path(d.data_root) == (root / ".." / "shared" / "data" / "det").resolve(), "the real chess folder's parent"
    assert set(runs) == {"frozen", "lora", "adaptformer", "ssf"}
    for run in runs.values():
        assert run.task == "chess" and run.task_kind == "detection" and run.task_options["detector"] == "fcos"
        assert run.task_options["size"] == d.img_size and run.splits["test"] == "test"


# ------------------------------------------------------------------------------------- vpeft eval --save-masks DIR
class _FixedDetections(torch.nn.Module):
    """A stand-in detector: on every image one confident dog at input [2, 2, 12, 12] and one unsure cat."""

    def forward(self, images):
        boxes = torch.tensor([[2.0, 2.0, 12.0, 12.0], [16.0, 2.0, 22.0, 10.0]])
        det = {"boxes": boxes, "scores": torch.tensor([0.9, 0.1]), "labels": torch.tensor([LABEL[7], LABEL[3]])}
        return [det for _ in images]


def test_predicted_boxes_are_drawn_on_the_stored_images_above_the_threshold(tmp_path):
    from vpeft.data.detection import TRUTH_COLOUR
    from vpeft.data.segmentation import default_palette
    from vpeft.tasks.detection import save_detection_images

    root = make_det_folder(tmp_path / "toy")
    task = DetectionTask(DetectionFolder.from_dir(root).class_names)
    ds = DetectionDataset(root, "train", 24, mean=(0, 0, 0), std=(1, 1, 1))  # 48x32 stored -> 24x16: scale 1/2
    model = _FixedDetections()
    with pytest.raises(vpeft.ConfigError, match="save_detection_images: limit=-1 is invalid"):  # not a slice
        task.save_predictions(model, ds, tmp_path / "boxes", limit=-1)
    written = task.save_predictions(model, torch.utils.data.Subset(ds, [1, 0, 2]), tmp_path / "boxes", limit=2)
    assert [p.name for p in written] == ["2.png", "1.png"] and sorted(os.listdir(tmp_path / "boxes")) == [
        "1.png", "2.png"
    ], "at most --max-masks images, in dataset order, nothing else left in the folder"  # fmt: skip
    assert len(save_detection_images(model, ds, tmp_path / "all")) == 3
    dog = default_palette(len(task.class_names))[LABEL[7]]
    empty = np.asarray(Image.open(written[0]))  # image 2: black, no true box: only the predictions show
    assert empty.shape == (32, 48, 3), "drawn at the stored image's size"
    # the confident box in stored pixels: input [2, 2, 12, 12] / (1/2) = [4, 4, 24, 24], its edges in the dog colour
    assert tuple(empty[21, 4]) == dog and tuple(empty[21, 24]) == dog and tuple(empty[24, 14]) == dog
    assert tuple(empty[21, 14]) == (0, 0, 0) and tuple(empty[21, 3]) == (0, 0, 0), "the box is an outline"
    label = empty[6:19, 4:]  # the label band at the box's top (the box touches the image's top: inside it)
    text = ((label != 0).any(-1) & (label != np.asarray(dog)).any(-1)).sum()
    assert text > 20, "its class name and score are written on the band"
    assert tuple(empty[20, 38]) == (0, 0, 0) and tuple(empty[19, 44]) == (0, 0, 0), "the 0.1 box [32, 4, 44, 20] is not"
    valid = DetectionDataset(root, "valid", 24, mean=(0, 0, 0), std=(1, 1, 1))
    truth = np.asarray(Image.open(save_detection_images(model, valid, tmp_path / "valid")[0]))
    assert tuple(truth[20, 26]) == TRUTH_COLOUR, "the true box [8, 6, 28, 20] is drawn too"
    with pytest.raises(ConfigError, match="needs a DetectionDataset"):
        save_detection_images(model, [(torch.zeros(3, 8, 8), torch.zeros(1, 9))], tmp_path / "bad")


def test_cli_eval_save_masks_draws_a_detection_deltas_boxes(tmp_path, capsys):
    from vpeft.cli import main
    from vpeft.run import finetune
    from vpeft.train import TrainConfig

    torch.set_num_threads(1)
    data = tmp_path / "data"
    make_det_folder(data / "toy")
    finetune(
        backbone="test_vit", method="lora", task="toy", data_root=data, img_size=64, pretrained=False,
        train_cfg=TrainConfig(epochs=1, batch_size=2, lr=1e-3, warmup_epochs=0.0), train_split="train",
        eval_split="valid", out_dir=tmp_path / "run", progress=False, task_options={"width": 32},
    )  # fmt: skip
    capsys.readouterr()
    masks = tmp_path / "boxes"
    argv = ["eval", "--delta", str(tmp_path / "run" / "delta.safetensors"), "--data-root", str(data), "--split",
            "train", "--save-masks", str(masks), "--max-masks", "2"]  # fmt: skip
    assert main(argv) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["primary_metric"] == "map" and res["predictions"] == {"folder": str(masks), "files": 2}
    assert sorted(p.name for p in masks.glob("*.png")) == ["1.png", "2.png"]
    assert Image.open(masks / "1.png").size == (48, 32)
