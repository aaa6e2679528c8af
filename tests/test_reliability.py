"""Reliability (issue 12): bad inputs and faults end in a typed error (CLI: one line, exit status 2), never in a
traceback or a silently wrong result. Includes seeded fuzz tests of delta files and data folders that count their
cases (see the README's Reliability section)."""

from __future__ import annotations

import errno
import json
import math
import os
import random
import shutil
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

import vpeft
from vpeft.api import DIGEST_KEY, delta_digest, read_delta
from vpeft.bench import parse_definition, run_bench, write_report
from vpeft.bench.records import record_path, results_lock, write_record
from vpeft.cli import main
from vpeft.data import ImageFolderDataset, ImageListDataset, ensure_digits_task
from vpeft.data.images import to_rgb
from vpeft.errors import CheckpointError, ConfigError, DataError
from vpeft.run import build_backbone, open_task
from vpeft.train.metrics import write_json_atomic

ROOT = Path(__file__).resolve().parents[1]
EXTRA = {"task": "digits", "num_classes": 10, "img_size": 32, "backbone_arg": "test_vit", "pretrained": False}


@pytest.fixture(autouse=True)
def _one_torch_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    ensure_digits_task(root)
    return root


@pytest.fixture(scope="module")
def delta(tmp_path_factory) -> Path:
    """A real LoRA delta of the tiny random ``test_vit`` with a 10-class head, as ``vpeft train`` writes it."""
    model = build_backbone("test_vit", 10, 32, pretrained=False)
    vpeft.apply(model, "lora", r=2)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.1)
    path = tmp_path_factory.mktemp("delta") / "delta.safetensors"
    vpeft.save(model, path, extra=EXTRA)
    return path


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


def _rewrite(src: Path, dst: Path, meta_edit=None, tensor_edit=None, resign: bool = False) -> Path:
    """Copy a delta with its header / tensors edited (``resign``: recompute its content digest, as a forger would)."""
    meta, tensors = _raw(src)
    if meta_edit:
        meta = meta_edit(dict(meta))
    if tensor_edit:
        tensors = tensor_edit(dict(tensors))
    if resign:
        meta[DIGEST_KEY] = delta_digest(meta, tensors)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(dst), metadata=meta)
    return dst


def _raw(path: Path) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata())
    return meta, load_file(str(path))


# ---- 1. silent wrong results: images ----------------------------------------------------------------------------
def _task(root: Path, images: dict[str, Image.Image | bytes], name: str = "t") -> Path:
    """A VTAB-1k task folder whose train800 / test lists hold ``images`` (label alternating 0/1)."""
    task = root / name
    (task / "images").mkdir(parents=True, exist_ok=True)
    lines = []
    for i, (fname, img) in enumerate(images.items()):
        if isinstance(img, bytes):
            (task / "images" / fname).write_bytes(img)
        else:
            img.save(task / "images" / fname)
        lines.append(f"images/{fname} {i % 2}")
    for split in ("train800", "test"):
        (task / f"{split}.txt").write_text("\n".join(lines) + "\n")
    (task / "classes.txt").write_text("a\nb\n")
    return task


def test_16bit_png_is_scaled_not_clipped(tmp_path):
    levels = np.linspace(0, 65535, 64, dtype=np.uint16).reshape(8, 8)
    task = _task(tmp_path, {"a.png": Image.fromarray(levels), "b.png": Image.fromarray(levels)})
    assert Image.open(task / "images" / "a.png").mode == "I;16"
    img, _ = ImageListDataset(task, "train800")[0]
    got = np.asarray(img)
    assert img.mode == "RGB" and got.shape == (8, 8, 3)
    np.testing.assert_array_equal(got[..., 0], np.rint(levels / 257.0).astype(np.uint8))
    assert len(np.unique(got)) > 50, "a gradient stays a gradient (convert('RGB') gave only 0 and 255)"


def test_float_tiff_is_scaled_and_out_of_range_refused(tmp_path):
    unit = np.linspace(0, 1, 64, dtype=np.float32).reshape(8, 8)
    task = _task(tmp_path, {"a.tif": Image.fromarray(unit), "b.tif": Image.fromarray(unit * 255)})
    a, _ = ImageListDataset(task, "train800")[0]
    b, _ = ImageListDataset(task, "train800")[1]
    np.testing.assert_array_equal(np.asarray(a)[..., 0], np.rint(unit * 255).astype(np.uint8))
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), "[0, 1] floats and [0, 255] floats agree"
    with pytest.raises(DataError, match=r"float image \(mode F\) with values in \[-3, 7\]"):
        to_rgb(Image.fromarray(unit * 10 - 3), "x")
    with pytest.raises(DataError, match="NaN or infinite"):
        to_rgb(Image.fromarray(np.full((2, 2), np.nan, dtype=np.float32)), "x")
    with pytest.raises(DataError, match="mode I"):
        to_rgb(Image.fromarray(np.full((2, 2), 70000, dtype=np.int32)), "x")


def _mode_image(mode: str, rng: np.random.Generator) -> tuple[Image.Image, np.ndarray]:
    """An 8x8 image in ``mode`` and the 8-bit gray / RGB levels vpeft must read from it."""
    gray = rng.integers(0, 256, (8, 8)).astype(np.uint8)
    rgb = rng.integers(0, 256, (8, 8, 3)).astype(np.uint8)
    if mode == "I;16":
        v = (gray.astype(np.uint16) * 257).astype(np.uint16)
        return Image.fromarray(v), np.repeat(gray[..., None], 3, -1)
    if mode == "I":
        return Image.fromarray(gray.astype(np.int32) * 257, mode="I"), np.repeat(gray[..., None], 3, -1)
    if mode == "F":
        return Image.fromarray(gray.astype(np.float32) / 255), np.repeat(gray[..., None], 3, -1)
    if mode in ("1", "L", "LA", "P"):
        base = Image.fromarray(gray, "L")
        img = base.convert(mode)
        return img, np.asarray(img.convert("RGB"))
    img = Image.fromarray(rgb, "RGB").convert(mode)  # RGBA, CMYK
    return img, np.asarray(img.convert("RGB"))


ODD_MODES = ("1", "L", "LA", "P", "I;16", "I", "F", "RGBA", "CMYK")


@pytest.mark.parametrize("mode", ODD_MODES)
def test_every_image_mode_reads_correctly(tmp_path, mode):
    img, want = _mode_image(mode, np.random.default_rng(ODD_MODES.index(mode)))
    ext = "tif" if mode in ("F", "I", "CMYK") else "png"
    task = _task(tmp_path, {f"a.{ext}": img, f"b.{ext}": img})
    got, _ = ImageListDataset(task, "train800")[0]
    assert got.mode == "RGB"
    np.testing.assert_array_equal(np.asarray(got), want)


def test_truncated_and_garbage_images_fail_up_front_naming_the_file(tmp_path, data_root, capsys):
    root = tmp_path / "data"
    shutil.copytree(data_root / "digits", root / "digits")
    first = (root / "digits" / "train800.txt").read_text().split()[0]
    raw = (root / "digits" / first).read_bytes()
    (root / "digits" / first).write_bytes(raw[: len(raw) // 2])
    with pytest.raises(DataError, match=r"1 unreadable image\(s\) in digits/train800: .*" + Path(first).name):
        ImageListDataset(root / "digits", "train800")
    argv = ["train", "--backbone", "test_vit", "--no-pretrained", "--method", "linear", "--task", "digits",
            "--train-split", "train800", "--data-root", str(root), "--img-size", "32", "--epochs", "1",
            "--out", str(tmp_path / "o"), "--quiet"]  # fmt: skip
    assert main(argv) == 2
    assert "unreadable image" in _one_line_error(capsys)
    assert not (tmp_path / "o" / "metrics.json").exists(), "refused before training started"


def test_bad_test_image_is_a_data_error_when_read(tmp_path):
    task = _task(tmp_path, {"a.png": Image.new("L", (4, 4)), "b.png": b"not an image at all"})
    ds = ImageListDataset(task, "test")  # the protocol reads test images once, at the end: checked as they are read
    ds[0]
    with pytest.raises(DataError, match=r"image .*b\.png cannot be read"):
        ds[1]
    with pytest.raises(DataError, match="b.png"):
        ImageListDataset(task, "train800")


def test_found_splits_lists_only_splits(tmp_path, data_root, capsys):
    (data_root / "digits" / "notes.txt").write_text("hello")
    try:
        argv = ["train", "--backbone", "test_vit", "--no-pretrained", "--method", "linear", "--task", "digits",
                "--data-root", str(data_root), "--eval-split", "tset", "--out", str(tmp_path / "o")]  # fmt: skip
        assert main(argv) == 2
        err = _one_line_error(capsys)
        assert "splits there: train800, val200, train800val200, test" in err, err
        assert "classes" not in err and "README" not in err and "notes" not in err and "images" not in err
    finally:
        (data_root / "digits" / "notes.txt").unlink()


@pytest.mark.parametrize("task", ["../digits", "/etc", "a/b", "..", "."])
def test_task_names_cannot_escape_the_data_root(data_root, task):
    with pytest.raises(DataError, match="must be one folder name under the data root"):
        open_task(data_root, task)


# ---- 1. silent wrong results: deltas ----------------------------------------------------------------------------
def test_eval_refuses_a_class_count_mismatch_both_ways(tmp_path, data_root, delta, capsys):
    two = tmp_path / "data"
    task = _task(two, {"a.png": Image.new("L", (4, 4)), "b.png": Image.new("L", (4, 4), 200)}, name="two")
    assert main(["eval", "--delta", str(delta), "--data-root", str(two), "--task", "two"]) == 2
    assert "has a 10-class head but task 'two' has 2 classes" in _one_line_error(capsys)
    model = build_backbone("test_vit", 2, 32, pretrained=False)
    vpeft.apply(model, "linear")
    small = vpeft.save(model, tmp_path / "two.safetensors", extra={**EXTRA, "task": "two", "num_classes": 2})
    assert main(["eval", "--delta", str(small), "--data-root", str(data_root), "--task", "digits"]) == 2
    assert "has a 2-class head but task 'digits' has 10 classes" in _one_line_error(capsys)
    assert task.is_dir()


def test_eval_refuses_a_header_task_outside_the_data_root(tmp_path, data_root, delta, capsys):
    bad = _rewrite(delta, tmp_path / "d.safetensors", lambda m: {**m, "extra": json.dumps({**EXTRA, "task": "../x"})},
                   resign=True)  # fmt: skip
    assert main(["eval", "--delta", str(bad), "--data-root", str(data_root)]) == 2
    assert "'../x' must be one folder name under the data root" in _one_line_error(capsys)


def test_non_finite_tensors_are_refused_naming_the_tensor(tmp_path, delta):
    def nan(t):
        name = sorted(t)[0]
        t[name] = t[name].clone()
        t[name].view(-1)[0] = float("nan")
        return t

    bad = _rewrite(delta, tmp_path / "nan.safetensors", tensor_edit=nan, resign=True)
    with pytest.raises(CheckpointError, match=rf"tensor '{sorted(load_file(delta))[0]}' holds 1 non-finite"):
        read_delta(bad)


@pytest.mark.parametrize(
    "edit,message",
    [
        (lambda m: {**m, "format_version": "99"}, "format_version '99'; this vpeft .* reads format_version '1' only"),
        (lambda m: {k: v for k, v in m.items() if k != "format_version"}, "format_version None"),
        (lambda m: {k: v for k, v in m.items() if k != "config"}, "header lacks config"),
        (lambda m: {k: v for k, v in m.items() if k != "backbone"}, "header lacks backbone"),
        (lambda m: {k: v for k, v in m.items() if k != "fingerprint"}, "header lacks fingerprint"),
        (lambda m: {**m, "config": "{not json"}, "config is not a valid method config"),
        (lambda m: {**m, "config": '{"method": "lora", "r": "x"}'}, "config is not a valid method config"),
        (lambda m: {**m, "config": "[1, 2]"}, "config is not a valid method config"),
        (lambda m: {**m, "config": '{"method": "nope"}'}, "config is not a valid method config"),
        (lambda m: {**m, "extra": "{bad"}, "extra is not valid JSON"),
        (lambda m: {**m, "extra": "[1]"}, "extra must be a JSON object"),
        (lambda m: {**m, "format": "other"}, "is not a vpeft delta"),
        (lambda m: {**m, "extra": json.dumps({**EXTRA, "num_classes": "10"})}, "num_classes='10' is not int"),
        (lambda m: {**m, "extra": json.dumps({**EXTRA, "img_size": -3})}, "img_size=-3 is not >= 1"),
        (lambda m: {**m, "extra": json.dumps({**EXTRA, "pretrained": "no"})}, "pretrained='no' is not bool"),
        (lambda m: {**m, "extra": json.dumps({"task": "digits"})}, "lacks \\['num_classes', 'backbone_arg'\\]"),
        (lambda m: {**m, "fingerprint": "0" * 32}, "belongs to other weights"),
    ],
)
def test_tampered_headers_are_checkpoint_errors_in_the_cli_and_the_library(tmp_path, data_root, delta, capsys,
                                                                           edit, message):  # fmt: skip
    bad = _rewrite(delta, tmp_path / "bad.safetensors", edit, resign=True)
    assert main(["eval", "--delta", str(bad), "--data-root", str(data_root)]) == 2
    err = _one_line_error(capsys)
    assert __import__("re").search(message, err), err
    if "metadata" not in err:  # what vpeft train adds in extra matters to vpeft eval only
        with pytest.raises(CheckpointError):
            vpeft.load(build_backbone("test_vit", 10, 32, pretrained=False), bad)


def _unsigned(m):
    return {k: v for k, v in m.items() if k != DIGEST_KEY}


def _edit_first_tensor(t):
    name = sorted(t)[0]
    t[name] = t[name].clone()
    t[name].view(-1)[0] += 1.0
    return t


@pytest.mark.parametrize("tensor_edit", [None, _edit_first_tensor], ids=["digest removed", "digest removed + edit"])
def test_a_delta_without_its_digest_is_refused_unless_trusted(tmp_path, data_root, delta, capsys, tensor_edit):
    bad = _rewrite(delta, tmp_path / "unsigned.safetensors", _unsigned, tensor_edit)
    model = build_backbone("test_vit", 10, 32, pretrained=False)
    with pytest.raises(CheckpointError, match=f"has no {DIGEST_KEY}, so an edited tensor would go unnoticed"):
        vpeft.load(model, bad)
    assert main(["eval", "--delta", str(bad), "--data-root", str(data_root)]) == 2
    assert "--trust-unsigned" in _one_line_error(capsys)
    vpeft.load(model, bad, trust_unsigned=True)  # the caller vouches for the file: it loads, edit and all
    loaded = {n: p for n, p in model.named_parameters() if p.requires_grad}
    edited = load_file(bad)
    assert all(torch.equal(loaded[k], edited[k]) for k in edited)
    assert main(["eval", "--delta", str(bad), "--data-root", str(data_root), "--trust-unsigned"]) == 0


def test_checkpoint_paths(tmp_path, delta, capsys):
    assert main(["eval", "--delta", str(tmp_path), "--task", "digits"]) == 2
    assert "is a directory, not a delta file" in _one_line_error(capsys)
    assert main(["merge", "--delta", str(delta), "--out", str(tmp_path)]) == 2
    assert "is a folder; give the merged model's file name" in _one_line_error(capsys)
    with pytest.raises(CheckpointError, match="does not exist"):
        read_delta(tmp_path / "missing.safetensors")


def test_mismatch_says_what_differs(delta):
    with pytest.raises(CheckpointError, match="the delta's head has 10 classes, the model's 2"):
        vpeft.load(build_backbone("test_vit", 2, 32, pretrained=False), delta)
    with pytest.raises(CheckpointError, match="trained at 32x32 inputs; this 'test_vit' takes 64x64: build the "
                       "backbone with img_size=32"):  # fmt: skip
        vpeft.load(build_backbone("test_vit", 10, 64, pretrained=False), delta)
    old = _rewrite(
        delta,
        delta.parent / "old.safetensors",
        lambda m: {k: v for k, v in m.items() if k != "input_size"},
        resign=True,
    )  # fmt: skip  (written before the header recorded the input size)
    with pytest.raises(CheckpointError, match="the delta was trained at img_size 32, the model takes 64"):
        vpeft.load(build_backbone("test_vit", 10, 64, pretrained=False), old)


def test_json_outputs_are_strict_json(tmp_path):
    path = tmp_path / "m.json"
    write_json_atomic(
        path, {"a": float("nan"), "b": [float("inf"), 1.5], "c": np.float32("nan"), "d": torch.tensor(2.0)}
    )
    assert json.loads(path.read_text(), parse_constant=lambda c: pytest.fail(c)) == {
        "a": None, "b": [None, 1.5], "c": None, "d": 2.0}  # fmt: skip


def test_failed_json_write_keeps_the_old_file(tmp_path):
    path = tmp_path / "r.json"
    write_json_atomic(path, {"ok": 1})
    with pytest.raises(TypeError):
        write_json_atomic(path, {"bad": object()})
    assert json.loads(path.read_text()) == {"ok": 1} and [p.name for p in tmp_path.iterdir()] == ["r.json"]


@pytest.mark.parametrize("umask,mode", [(0o022, 0o644), (0o027, 0o640)])
def test_written_files_get_the_umask_mode_and_the_rename_is_fsynced(tmp_path, monkeypatch, umask, mode):
    """mkstemp creates 0600 files; every writer gives them the mode a plain open() would (0666 minus the umask)."""
    import stat

    from vpeft.bench.records import write_record, write_text_atomic
    from vpeft.data.fewshot import write_list
    from vpeft.data.segmentation import save_overlay
    from vpeft.files import atomic_write
    from vpeft.train.checkpoint import write_checkpoint

    synced_dirs = []
    real_fsync = os.fsync

    def fsync(fd):
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            synced_dirs.append(fd)
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    (tmp_path / "img.png").write_bytes(b"")
    model = build_backbone("test_vit", 10, 32, pretrained=False)
    vpeft.apply(model, "lora")
    old = os.umask(umask)
    try:
        written = [
            (write_json_atomic(tmp_path / "metrics.json", {"a": 1}), tmp_path / "metrics.json")[1],
            (write_checkpoint(tmp_path / "checkpoint.pt", {"epoch": 1}), tmp_path / "checkpoint.pt")[1],
            write_text_atomic(tmp_path / "leaderboard.md", "# x\n"),
            (write_record(tmp_path / "record.json", {"run_id": "x"}), tmp_path / "record.json")[1],
            write_list([(tmp_path / "img.png", 0)], tmp_path / "train16shot.txt", tmp_path),
            save_overlay(np.zeros((4, 4, 3), np.uint8), np.zeros((4, 4), np.int64), tmp_path / "mask.png"),
            atomic_write(tmp_path / "delta.bin", lambda tmp: tmp.write_bytes(b"x")),
            vpeft.save(model, tmp_path / "delta.safetensors"),
        ]
        vpeft.merge(model)
        written.append(vpeft.save_merged(model, tmp_path / "merged.safetensors"))
    finally:
        os.umask(old)
    modes = {p.name: oct(stat.S_IMODE(p.stat().st_mode)) for p in written}
    assert modes == {p.name: oct(mode) for p in written}
    assert len(synced_dirs) >= len(written), "the folder is fsynced after each rename"


# ---- 6. fuzz: delta files ---------------------------------------------------------------------------------------
def _outcome(path: Path, original: tuple[dict, dict]) -> str:
    """'error' (CheckpointError), 'same' (loads, and header and tensors equal the original's: the mutation changed
    nothing that matters, e.g. JSON whitespace), or raises: any other exception or a silent load of other content."""
    try:
        meta, tensors = read_delta(path)
        model = build_backbone("test_vit", 10, 32, pretrained=False)
        vpeft.load(model, path)
    except CheckpointError:
        return "error"
    same = meta == original[0] and tensors.keys() == original[1].keys()
    same = same and all(torch.equal(tensors[k], original[1][k]) for k in tensors)
    assert same, f"{path.name}: a changed delta loaded silently"
    return "same"


def _mutations(delta: Path, tmp: Path, rng: random.Random):
    raw = delta.read_bytes()
    header_len = struct.unpack("<Q", raw[:8])[0]
    for i in range(40):  # truncate at random offsets (header and data)
        yield f"truncate{i}", raw[: rng.randrange(0, len(raw))]
    for i in range(40):  # flip one byte: half in the header, half in the tensor data
        pos = rng.randrange(0, 8 + header_len) if i % 2 == 0 else rng.randrange(8 + header_len, len(raw))
        data = bytearray(raw)
        data[pos] ^= rng.randrange(1, 256)
        yield f"flip{i}@{pos}", bytes(data)
    yield "empty", b""
    yield "header_len_huge", struct.pack("<Q", 2**40) + raw[8:]
    yield "not_json_header", raw[:8] + b"\x00" * header_len + raw[8 + header_len :]
    yield "appended", raw + b"tail"
    meta, tensors = _raw(delta)
    names = sorted(tensors)
    two_d = [n for n in names if tensors[n].ndim == 2]
    edits = {
        "version99": (lambda m: {**m, "format_version": "99"}, None),
        "no_config": (lambda m: {k: v for k, v in m.items() if k != "config"}, None),
        "no_backbone": (lambda m: {k: v for k, v in m.items() if k != "backbone"}, None),
        "no_fingerprint": (lambda m: {k: v for k, v in m.items() if k != "fingerprint"}, None),
        "config_bad_json": (lambda m: {**m, "config": "{"}, None),
        "config_other_method": (lambda m: {**m, "config": '{"method": "ia3"}'}, None),
        "config_other_rank": (lambda m: {**m, "config": m["config"].replace('"r": 2', '"r": 4')}, None),
        "config_unknown_key": (lambda m: {**m, "config": '{"method": "lora", "rank": 2}'}, None),
        "config_wrong_type": (lambda m: {**m, "config": '{"method": "lora", "r": [2]}'}, None),
        "extra_bad_json": (lambda m: {**m, "extra": "{"}, None),
        "extra_list": (lambda m: {**m, "extra": "[]"}, None),
        "other_backbone": (lambda m: {**m, "backbone": "vit_huge"}, None),
        "other_fingerprint": (lambda m: {**m, "fingerprint": "f" * 32}, None),
        "format_other": (lambda m: {**m, "format": "pytorch"}, None),
        "meta_edit_unsigned": (lambda m: {**m, "vpeft_version": "0.0.0"}, None),
        "transpose": (None, lambda t: {**t, two_d[0]: t[two_d[0]].t()}),
        "reshape": (None, lambda t: {**t, names[0]: t[names[0]].reshape(-1)}),
        "grow": (None, lambda t: {**t, names[0]: torch.cat([t[names[0]].reshape(-1)] * 2)}),
        "swap_two": (None, lambda t: {**t, two_d[0]: t[two_d[-1]], two_d[-1]: t[two_d[0]]}),
        "drop": (None, lambda t: {k: v for k, v in t.items() if k != names[0]}),
        "rename": (None, lambda t: {("x" + k if k == names[0] else k): v for k, v in t.items()}),
        "extra_tensor": (None, lambda t: {**t, "blocks.0.evil": torch.zeros(3)}),
        "nan": (None, lambda t: {**t, names[0]: torch.full_like(t[names[0]], float("nan"))}),
        "inf": (None, lambda t: {**t, names[-1]: torch.full_like(t[names[-1]], float("-inf"))}),
        "scaled": (None, lambda t: {**t, names[0]: t[names[0]] * 2}),
    }
    for dtype in (torch.float16, torch.bfloat16, torch.float64, torch.int32, torch.int8, torch.bool):
        edits[f"dtype_{dtype}"] = (None, lambda t, d=dtype: {**t, names[0]: t[names[0]].to(d)})
    for name, (m_edit, t_edit) in edits.items():
        for resign in (False, True):
            path = tmp / f"{name}{'_resigned' if resign else ''}.safetensors"
            _rewrite(delta, path, m_edit, t_edit, resign=resign)
            yield path.stem, path.read_bytes()


def test_fuzz_delta_files(tmp_path, delta):
    """Every mutation of a real delta ends in CheckpointError, or (JSON whitespace, a re-signed header edit of an
    unchecked field) loads content identical to the original; never another exception, never other content."""
    original = read_delta(delta)
    counts = {"error": 0, "same": 0}
    edited_ok = []
    for name, data in _mutations(delta, tmp_path, random.Random(12)):
        path = tmp_path / f"case_{name}.safetensors"
        path.write_bytes(data)
        try:
            counts[_outcome(path, original)] += 1
        except AssertionError:
            # a re-signed edit of a field vpeft does not check (vpeft_version), or a re-signed in-range value change
            # ("scaled": a forger with write access can change anything); they are real, valid deltas
            assert name in ("meta_edit_unsigned_resigned", "scaled_resigned"), name
            edited_ok.append(name)
    total = counts["error"] + counts["same"] + len(edited_ok)
    print(f"delta fuzz: {total} cases, {counts['error']} CheckpointError, {counts['same']} identical content, "
          f"{len(edited_ok)} valid re-signed edits ({', '.join(edited_ok)})")  # fmt: skip
    assert total == 146 and counts["error"] >= 135


# ---- 6. fuzz: data folders --------------------------------------------------------------------------------------
def _corrupt_bytes(rng: random.Random, raw: bytes) -> bytes:
    kind = rng.randrange(4)
    if kind == 0:
        return raw[: rng.randrange(0, len(raw))]
    if kind == 1:
        return bytes(rng.randrange(256) for _ in range(rng.randrange(0, 64)))
    if kind == 2:
        return b""
    data = bytearray(raw)
    for _ in range(8):
        data[rng.randrange(8, len(data))] ^= rng.randrange(1, 256)  # after the signature
    return bytes(data)


def _bad_line(rng: random.Random, line: str) -> str:
    path, label = line.rsplit(" ", 1)
    return rng.choice([
        path, f"{path} x", f"{path} -1", f"{path} 99", f"{path} 1.5", f"missing/{path} {label}", " ", label,
        f"{path}\t{label} extra", f"{path} {label}{label}{label}",
    ])  # fmt: skip


def test_fuzz_data_folders(tmp_path, data_root):
    """Seeded mutations of a real task folder (list lines, image files) and odd image modes: each ends in a
    DataError or a correct load (every image decodes to RGB of the expected size); never another exception."""
    rng = random.Random(7)
    src = data_root / "digits"
    lines = (src / "train800.txt").read_text().splitlines()[:12]
    counts = {"DataError": 0, "loaded": 0}
    for case in range(60):
        task = tmp_path / f"c{case}" / "digits"
        (task / "images").mkdir(parents=True)
        for line in lines:
            shutil.copy(src / line.split()[0], task / line.split()[0])
        shutil.copy(src / "classes.txt", task / "classes.txt")
        mutated = list(lines)
        if case % 2 == 0:
            i = rng.randrange(len(mutated))
            mutated[i] = _bad_line(rng, mutated[i])
        else:
            victim = task / rng.choice(lines).split()[0]
            if rng.random() < 0.2:
                victim.unlink()
            else:
                victim.write_bytes(_corrupt_bytes(rng, victim.read_bytes()))
        (task / "train800.txt").write_text("\n".join(mutated) + "\n")
        try:
            ds = ImageListDataset(task, "train800")
            for k in range(len(ds)):
                img, label = ds[k]
                assert img.mode == "RGB" and img.size == (8, 8) and 0 <= label < 10
            counts["loaded"] += 1
        except DataError:
            counts["DataError"] += 1
    modes = 0
    for mode in ODD_MODES:  # odd modes in an image-folder split
        img, want = _mode_image(mode, np.random.default_rng(1))
        folder = tmp_path / f"m{modes}"
        (folder / "cls").mkdir(parents=True)
        img.save(folder / "cls" / ("x.tif" if mode in ("F", "I", "CMYK") else "x.png"))
        got, _ = ImageFolderDataset(folder)[0]
        np.testing.assert_array_equal(np.asarray(got), want)
        modes += 1
    counts["loaded"] += modes
    print(f"data fuzz: {60 + modes} cases, {counts['DataError']} DataError, {counts['loaded']} correct loads")
    assert counts["DataError"] >= 40 and sum(counts.values()) == 60 + len(ODD_MODES)


# ---- 3. output folders, 4. CLI errors -----------------------------------------------------------------------------
def _train(data_root, out, *extra):
    argv = ["train", "--backbone", "test_vit", "--no-pretrained", "--method", "linear", "--task", "digits",
            "--data-root", str(data_root), "--img-size", "32", "--epochs", "1", "--batch-size", "256",
            "--train-split", "val200", "--eval-split", "val200", "--out", str(out), "--quiet", *extra]  # fmt: skip
    return main(argv)


def test_out_folder_is_not_overwritten_silently_and_files_name_their_run(tmp_path, data_root, capsys):
    out = tmp_path / "run"
    assert _train(data_root, out) == 0
    metrics, result = (json.loads((out / n).read_text()) for n in ("metrics.json", "result.json"))
    assert metrics["run"] == result["run"] and metrics["run"]["method"] == "linear"
    assert metrics["run"]["task"] == "digits" and metrics["run"]["run_id"].startswith("linear-digits-")
    capsys.readouterr()
    assert _train(data_root, out) == 2
    err = _one_line_error(capsys)
    assert "is not empty (holds delta.safetensors, metrics.json, result.json); pass --overwrite" in err
    assert json.loads((out / "result.json").read_text())["run"] == result["run"], "untouched"
    assert _train(data_root, out, "--overwrite") == 0
    assert json.loads((out / "result.json").read_text())["run"]["run_id"] != result["run"]["run_id"]


# ---- disk errors: one line naming the file and the reason, the last good checkpoint kept, no temporary files --------
def _fail_checkpoint_at(epoch: int, code: int):
    real = torch.save

    def save(obj, f, *a, **k):
        if isinstance(obj, dict) and obj.get("epoch") == epoch:
            raise OSError(code, os.strerror(code))
        return real(obj, f, *a, **k)

    return save


def _fail_replace_of(name: str, code: int):
    real = os.replace

    def replace(src, dst, *a, **k):
        if Path(dst).name == name:
            raise OSError(code, os.strerror(code), str(src))
        return real(src, dst, *a, **k)

    return replace


def _delta_disk_full(*a, **k):
    from safetensors import SafetensorError

    raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")


@pytest.mark.parametrize(
    "target,patch,code,status",
    [
        ("checkpoint.pt", lambda mp: mp.setattr(torch, "save", _fail_checkpoint_at(2, errno.ENOSPC)), "ENOSPC", 3),
        ("metrics.json", lambda mp: mp.setattr(os, "replace", _fail_replace_of("metrics.json", errno.EDQUOT)),
         "EDQUOT", 2),
        ("delta.safetensors", lambda mp: mp.setattr("safetensors.torch.save_file", _delta_disk_full), "ENOSPC", 3),
        ("result.json", lambda mp: mp.setattr(os, "replace", _fail_replace_of("result.json", errno.EACCES)),
         "EACCES", 3),
    ],
)  # fmt: skip
def test_disk_errors_are_one_line_and_keep_the_last_checkpoint(tmp_path, data_root, capsys, monkeypatch, target,
                                                               patch, code, status):  # fmt: skip
    out = tmp_path / "run"
    with monkeypatch.context() as mp:
        patch(mp)
        assert _train(data_root, out, "--epochs", "3") == status
    err = _one_line_error(capsys)
    reason = os.strerror(getattr(errno, code))
    assert f"vpeft train: error: cannot write '{out / target}': {reason}" in err, err
    if status == 2:  # failed before a checkpoint existed: nothing to resume, and the empty --out it made is removed
        assert not out.exists()
        return
    assert not [p.name for p in out.iterdir() if p.name.endswith(".tmp")], "no temporary file is left"
    assert not (out / "result.json").exists()
    assert "--resume" in err
    kept = torch.load(out / "checkpoint.pt", weights_only=True)
    assert kept["epoch"] == (1 if target == "checkpoint.pt" else 3)  # the last good checkpoint
    assert _train(data_root, out, "--epochs", "3", "--resume") == 0  # and the run completes from it
    assert (out / "result.json").is_file() and not (out / "checkpoint.pt").exists()


@pytest.mark.parametrize(
    "args,message",
    [
        (["--img-size", "0"], "--img-size 0 is invalid; expected an integer >= 1"),
        (["--img-size", "8"], "img_size 8 does not fit the backbone's 16-pixel patches: use a multiple of 16"),
        (["--device", "tpu9"], "--device 'tpu9' is not a device; valid: cpu, cuda, cuda:N, mps"),
        (["--lr", "-1e-3"], "--lr must be a number in (0.0, 1e+30], got -0.001"),
        (["--lr", "1e38"], "--lr must be a number in (0.0, 1e+30], got 1e+38"),
        (["--lr", "-.5"], "got -0.5"),
        (["--out", "{file}"], "is a file, not a folder"),
        (["--out", "{file}/run"], "/f', which cannot hold a folder"),
    ],
)
def test_cli_one_line_errors(tmp_path, data_root, capsys, args, message):
    (tmp_path / "f").write_text("x")
    args = [a.format(file=tmp_path / "f") for a in args]
    assert _train(data_root, tmp_path / "o", *args) == 2
    assert message in _one_line_error(capsys)


def test_img_size_off_the_patch_grid_is_refused_on_a_fixed_size_vit(tmp_path, data_root, capsys):
    """timm's fixed-size ViT would silently drop the last 8 rows and columns of a 40-pixel input (2x2 patches)."""
    argv = ["train", "--backbone", "vit_tiny_patch16_224", "--no-pretrained", "--method", "linear", "--task",
            "digits", "--data-root", str(data_root), "--img-size", "40", "--epochs", "1", "--train-split", "val200",
            "--eval-split", "val200", "--out", str(tmp_path / "o"), "--quiet"]  # fmt: skip
    assert main(argv) == 2
    err = _one_line_error(capsys)
    assert "img_size 40 does not fit the backbone's 16-pixel patches: use a multiple of 16 (e.g. 32 or 48)" in err
    assert not (tmp_path / "o" / "metrics.json").exists()


def test_segmentation_folder_without_classes_txt_is_named(tmp_path, capsys):
    task = tmp_path / "data" / "seg"
    (task / "images").mkdir(parents=True)
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(task / "images" / "0.png")
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(task / "images" / "0_mask.png")
    for split in ("train", "val"):
        (task / f"{split}.txt").write_text("images/0.png images/0_mask.png\n")
    argv = ["train", "--backbone", "test_vit", "--no-pretrained", "--method", "linear", "--task", "seg",
            "--data-root", str(tmp_path / "data"), "--img-size", "32", "--train-split", "train", "--eval-split",
            "val", "--out", str(tmp_path / "o"), "--quiet"]  # fmt: skip
    assert main(argv) == 2
    err = _one_line_error(capsys)
    assert f"segmentation folder {task} (train.txt lists image/mask pairs) has no classes.txt" in err, err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_cuda_without_a_gpu_is_refused(tmp_path, data_root, capsys):
    assert _train(data_root, tmp_path / "o", "--device", "cuda") == 2
    assert "no cuda device is available on this machine" in _one_line_error(capsys)


def test_unwritable_out_is_refused_before_training(tmp_path, data_root, capsys, monkeypatch, refuse_write_probe):
    """Runs as root too (CI does): a folder root cannot write is simulated by refusing the write probe there; as
    another user, a real 0500 folder is checked as well."""
    locked = tmp_path / "ro"
    locked.mkdir()
    with monkeypatch.context() as mp:
        refuse_write_probe(mp, locked)
        assert _train(data_root, locked / "run") == 2
    assert "is not writable (Permission denied)" in _one_line_error(capsys)
    assert not (locked / "run" / "metrics.json").exists()  # refused before training
    if os.geteuid() != 0:
        locked.chmod(0o500)
        try:
            assert _train(data_root, locked / "run2") == 2
            assert "is not writable" in _one_line_error(capsys)
        finally:
            locked.chmod(0o700)


def test_nan_loss_is_a_clear_error_with_its_own_exit_status(tmp_path, data_root, capsys):
    out = tmp_path / "run"
    assert _train(data_root, out, "--lr", "1e30", "--epochs", "4", "--warmup-epochs", "0") == 3
    err = _one_line_error(capsys)
    assert "training diverged: training loss is nan at epoch 3" in err
    assert f"kept in {out}: checkpoint.pt, metrics.json" in err
    metrics = json.loads((out / "metrics.json").read_text(), parse_constant=lambda c: pytest.fail(c))
    assert metrics["run"]["method"] == "linear" and not metrics["complete"]
    last_good = torch.load(out / "checkpoint.pt", weights_only=True)  # the last good epoch's checkpoint is kept
    assert last_good["epoch"] == 2 and last_good["history"][-1]["train_loss"] < float("inf")


# ---- 2. benchmark state -------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory) -> Path:
    """A two-class task ``tiny`` with 6 images per VTAB-1k split list."""
    root = tmp_path_factory.mktemp("tiny")
    task = root / "tiny"
    (task / "images").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for split in ("train800", "val200", "train800val200", "test"):
        lines = []
        for k in range(6):
            Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(task / "images" / f"{split}{k}.png")
            lines.append(f"images/{split}{k}.png {k % 2}")
        (task / f"{split}.txt").write_text("\n".join(lines) + "\n")
    return root


def _bench_definition(data_root: Path, **overrides) -> dict:
    d = {
        "name": "tiny", "backbone": "test_vit", "img_size": 32, "pretrained": False, "seeds": [0],
        "data_root": str(data_root), "train": {"epochs": 1, "batch_size": 8, "warmup_epochs": 0, "lr": 1e-2},
        "latency": {"batch_size": 1, "warmup": 0, "repeats": 1},
        "tasks": [{"name": "tiny", "group": "natural"}],
        "methods": [{"name": "linear"}, {"name": "bitfit"}],
    }  # fmt: skip
    d.update(overrides)
    return d


def test_report_shows_only_records_of_the_current_definition(tmp_path, tiny_root):
    data_root = tiny_root
    out = tmp_path / "out"
    first = parse_definition(_bench_definition(data_root))
    assert run_bench(first, out, workers=0, progress=False).ok == 2
    # the recipe changes; only bitfit is re-run: linear's record is from the old recipe
    second = parse_definition(_bench_definition(data_root, train={**first.train, "lr": 5e-3}))
    assert run_bench(second, out, workers=0, progress=False, methods=["bitfit"]).ok == 1
    md = write_report(out)[0]
    assert "| BitFit |" in md and "| linear probe |" not in md, "the old recipe's record is not shown as current"
    assert "1 stale record(s) made by another definition of the benchmark skipped" in md
    (out / "definition.json").write_text("{truncated")
    with pytest.raises(DataError, match="definition.json is unreadable"):
        write_report(out)


def test_one_writer_per_results_folder(tmp_path, tiny_root, capsys):
    data_root = tiny_root
    out = tmp_path / "out"
    d = parse_definition(_bench_definition(data_root, methods=[{"name": "linear"}]))
    with results_lock(out):
        with pytest.raises(
            ConfigError, match=rf"results folder {out} is in use by another vpeft bench \(pid {os.getpid()}"
        ):
            run_bench(d, out, workers=0, progress=False)
        path = tmp_path / "d.json"
        path.write_text(json.dumps(_bench_definition(data_root, methods=[{"name": "linear"}])))
        assert main(["bench", str(path), "--out", str(out), "--workers", "0", "--quiet"]) == 2
        assert "is in use by another vpeft bench" in _one_line_error(capsys)
    # a lock left by a dead driver (its pid in the file, no flock held) does not block
    (out / ".vpeft-bench.lock").write_text(json.dumps({"pid": 2**22 + 1, "host": "x", "since": "then"}))
    write_record(record_path(out, "linear", "tiny", 0), {"run_id": "x", "status": "failed"})
    assert run_bench(d, out, workers=0, progress=False).ok == 1


LOCK_HOLDER = Path(__file__).with_name("lock_holder.py")


def _hold_lock(folder: Path, command: str, seconds: float = 600) -> subprocess.Popen:
    """A second real process holding ``folder``'s lock (see tests/lock_holder.py), once it says so."""
    proc = subprocess.Popen([sys.executable, str(LOCK_HOLDER), str(folder), command, str(seconds)],
                            stdout=subprocess.PIPE, text=True)  # fmt: skip
    assert proc.stdout.readline().strip() == "held"
    return proc


def _vpeft(*argv: str) -> subprocess.CompletedProcess:
    """``vpeft ARGV`` as a real process."""
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "vpeft.cli", *argv]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)


def test_one_writer_per_output_folder(tmp_path, data_root, capsys):
    out = tmp_path / "run"
    holder = _hold_lock(out, "vpeft train")  # another process owns the empty --out
    try:
        assert _train(data_root, out) == 2  # refused at the lock, before the emptiness check would pass
        err = _one_line_error(capsys)
        assert f"--out {out} is in use by another vpeft train (pid {holder.pid} on " in err, err
        assert [p.name for p in out.iterdir()] == [".vpeft.lock"]  # nothing of a run was written
    finally:
        holder.kill()
        holder.wait()
    assert _train(data_root, out) == 0  # the kernel freed the killed holder's lock; its stale file is no content
    finished = sorted(p.name for p in out.iterdir())
    assert finished == ["delta.safetensors", "metrics.json", "result.json"]  # released: no lock file left
    result = (out / "result.json").read_bytes()
    from vpeft.files import folder_lock

    with folder_lock(out, "vpeft train", what="--out"):  # this process writes it: a real `vpeft train` is refused
        proc = _vpeft(
            "train", "--backbone", "test_vit", "--no-pretrained", "--method", "linear", "--task", "digits",
            "--data-root", str(data_root), "--img-size", "32", "--out", str(out), "--overwrite", "--quiet",
        )  # fmt: skip
    err = proc.stderr.strip()
    assert proc.returncode == 2 and len(err.splitlines()) == 1, err
    assert f"is in use by another vpeft train (pid {os.getpid()} on " in err, err  # not "not empty": lock first
    assert (out / "result.json").read_bytes() == result, "--overwrite did not touch a folder another process holds"


def test_eval_and_merge_take_the_lock_of_what_they_write(tmp_path, delta, data_root, capsys):
    from vpeft.files import folder_lock

    masks = tmp_path / "masks"
    with folder_lock(masks, "vpeft eval"):
        argv = ["eval", "--delta", str(delta), "--data-root", str(data_root), "--save-masks", str(masks)]
        assert main(argv) == 2
    assert f"--save-masks {masks} is in use by another vpeft eval (pid {os.getpid()}" in _one_line_error(capsys)
    merged = tmp_path / "merged.safetensors"
    with folder_lock(tmp_path, "vpeft merge", name=".vpeft.merged.safetensors.lock"):
        assert main(["merge", "--delta", str(delta), "--out", str(merged)]) == 2
    assert f"is in use by another vpeft merge (pid {os.getpid()}" in _one_line_error(capsys)
    assert not merged.exists()
    assert main(["merge", "--delta", str(delta), "--out", str(merged)]) == 0 and merged.is_file()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".vpeft")) == []


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_workers_die_with_a_killed_driver(tmp_path, tiny_root):
    data_root = tiny_root
    """kill -9 of the driver: its worker (which leads its own process group) and the worker's child end too."""
    spec = json.dumps(_bench_definition(data_root, methods=[{"name": "linear"}]))
    script = f"""
import io, json, sys
from vpeft.bench import parse_definition
from vpeft.bench.runner import Progress, _run_pool
from bench_worker import sleep_with_child
d = parse_definition(json.loads({spec!r}))
_run_pool(d.runs(), {str(tmp_path / "out")!r}, 1, 1, Progress(1, 1, io.StringIO()), False, target=sleep_with_child)
"""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT / "tests")])}
    driver = subprocess.Popen([sys.executable, "-c", script], env=env)
    pids = tmp_path / "out" / "runs" / "linear" / "tiny" / "seed0" / "pids.json"
    deadline = time.monotonic() + 60
    while not pids.is_file() and time.monotonic() < deadline and driver.poll() is None:
        time.sleep(0.1)
    assert pids.is_file(), "the worker started"
    worker, child = json.loads(pids.read_text())
    driver.kill()
    driver.wait()
    deadline = time.monotonic() + 10
    while (_alive(worker) or _alive(child)) and time.monotonic() < deadline:
        time.sleep(0.1)
    alive = [_alive(worker), _alive(child)]
    for pid, a in zip((worker, child), alive):
        if a:
            os.kill(pid, signal.SIGKILL)
    assert alive == [False, False], "the worker and its child die with the driver"


def test_yaml_definitions_are_read_with_a_safe_loader(tmp_path):
    path = tmp_path / "evil.yaml"
    path.write_text("name: !!python/object/apply:os.system ['echo pwned > " + str(tmp_path / "pwned") + "']\n")
    from vpeft.bench import load_definition

    with pytest.raises(ConfigError, match="not valid YAML"):
        load_definition(path)
    assert not (tmp_path / "pwned").exists()
    assert math.isfinite(1.0)


def test_bench_device_is_checked(tmp_path, tiny_root, capsys):
    path = tmp_path / "d.json"
    path.write_text(json.dumps(_bench_definition(tiny_root)))
    assert main(["bench", str(path), "--out", str(tmp_path / "o"), "--device", "tpu9", "--quiet"]) == 2
    assert "--device 'tpu9' is not a device" in _one_line_error(capsys)
