"""Video task type: folder format, TSN / strided sampling, bad inputs, the frame-wise model and its heads, every
image method frame-wise (the contract on tiny backbones), deltas, the real arrow-of-time check and the CLI.

Clips are generated here with PyAV (a few 8-frame 32x32 clips); the real arrow check reads ../shared/data/video.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from tiny import TINY_BACKBONES, case_id, method_cases, method_of

import vpeft
from vpeft.data.video import (
    count_frames,
    is_video_folder,
    read_frames,
    sample_indices,
    write_clip,
)
from vpeft.errors import CheckpointError, ConfigError, DataError
from vpeft.tasks import VideoModel, VideoTask, task_for_folder, task_from_dict

K = 3
T = 2


def _headless(bb: str) -> tuple[torch.nn.Module, int]:
    factory, size = TINY_BACKBONES[bb]
    model = factory()
    if hasattr(model, "reset_classifier"):
        model.reset_classifier(0)
    else:  # Hugging Face
        model.classifier = torch.nn.Identity()
    return model, size


def _clips(size: int, n: int = 2, t: int = T, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, t, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _make_folder(root: Path, n: int = 6, frames: int = 8, size: int = 32, classes: int = K) -> Path:
    """``n`` H.264 clips of ``frames`` random 32x32 frames, labels cycling over the classes, train/val/test."""
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    (root / "classes.txt").write_text("".join(f"class{i}\n" for i in range(classes)))
    lines = []
    for i in range(n):
        write_clip(root / "clips" / f"c{i}.mp4", rng.integers(0, 255, (frames, size, size, 3), dtype=np.uint8))
        lines.append(f"clips/c{i}.mp4 {i % classes}")
    (root / "train.txt").write_text("\n".join(lines[: n - 2]) + "\n")
    (root / "val.txt").write_text(lines[n - 2] + "\n")
    (root / "test.txt").write_text(lines[n - 1] + "\n")
    return root


# ------------------------------------------------------------------------------------------------------ sampling
def test_tsn_sampling_centred_for_eval_random_in_each_segment_for_training():
    assert sample_indices(16, 4).tolist() == [2, 6, 10, 14]
    assert sample_indices(10, 4).tolist() == [1, 3, 6, 8]  # segments of 2.5 frames: centres 1.25, 3.75, ...
    rng = np.random.default_rng(0)
    draws = np.stack([sample_indices(16, 4, train=True, rng=rng) for _ in range(200)])
    for k in range(4):  # one frame per segment, every offset of the segment drawn
        assert set(draws[:, k].tolist()) == set(range(4 * k, 4 * k + 4))
    assert sample_indices(16, 16, train=True, rng=rng).tolist() == list(range(16))  # T = n: every frame, in order
    # multi-view: V evenly spaced offsets inside the segments
    assert sample_indices(16, 4, views=2).tolist() == [1, 5, 9, 13, 3, 7, 11, 15]


def test_strided_window_sampling():
    assert sample_indices(20, 4, stride=3).tolist() == [5, 8, 11, 14]  # a 10-frame window, centred
    rng = np.random.default_rng(0)
    starts = {int(sample_indices(20, 4, stride=3, train=True, rng=rng)[0]) for _ in range(300)}
    assert starts == set(range(11))
    assert sample_indices(20, 4, stride=3, views=3).tolist() == [0, 3, 6, 9, 5, 8, 11, 14, 10, 13, 16, 19]
    with pytest.raises(DataError, match="clip of 9 frames is shorter than the 10 frames sampled"):
        sample_indices(9, 4, stride=3)
    with pytest.raises(ConfigError, match="multi-view sampling is for evaluation"):
        sample_indices(20, 4, train=True, views=2)
    with pytest.raises(ConfigError, match="stride must be a positive int or None, got 0"):
        sample_indices(20, 4, stride=0)


# --------------------------------------------------------------------------------------------------- folders
def test_folder_is_detected_as_video_and_items_are_clips(tmp_path):
    folder = _make_folder(tmp_path / "toy")
    assert is_video_folder(folder)
    task = task_for_folder(folder, num_frames=4)
    assert isinstance(task, VideoTask) and task.num_classes == K and task.num_frames == 4
    model = task.build(_headless("vit_cls")[0])
    train = task.dataset(folder, "train", model, train=True)
    assert len(train) == 4 and train.lengths == [8] * 4 and train.random_augmentation
    x, y = train[1]
    assert x.shape == (4, 3, 32, 32) and x.dtype == torch.float32 and y == 1
    assert len(task.dataset(folder, "trainval", model)) == 5 and len(task.dataset(folder, "train+test", model)) == 5
    ev = task.dataset(folder, "test", model)
    assert not ev.random_augmentation and torch.equal(ev[0][0], ev[0][0])  # centred: deterministic
    with pytest.raises(DataError, match="split 'tset'.*Did you mean 'test'"):
        task.dataset(folder, "tset", model)
    # a classification (VTAB) folder's "<image> <label>" lines are not clips
    vtab = tmp_path / "vtab"
    (vtab / "images").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(vtab / "images" / "a.png")
    (vtab / "classes.txt").write_text("a\n")
    (vtab / "test.txt").write_text("images/a.png 0\n")
    assert not is_video_folder(vtab) and type(task_for_folder(vtab)).__name__ == "ClassificationTask"


def test_frame_folders_read_frames_sorted_by_name(tmp_path):
    root = tmp_path / "frames"
    clip = root / "rawframes" / "clip0"
    clip.mkdir(parents=True)
    values = [200, 10, 90, 150]  # written in this order; names sort as img_01, img_02, img_10, img_11
    for name, v in zip(["img_10.png", "img_02.png", "img_01.png", "img_11.png"], values):
        Image.fromarray(np.full((8, 8, 3), v, dtype=np.uint8)).save(clip / name)
    (clip / "notes.txt").write_text("not a frame")
    (root / "classes.txt").write_text("a\nb\n")
    (root / "train.txt").write_text("rawframes/clip0 1\n")
    assert is_video_folder(root) and count_frames(clip) == 4
    frames = read_frames(clip, [0, 1, 2, 3, 0])
    assert [f.getpixel((0, 0))[0] for f in frames] == [90, 10, 200, 150, 90]
    task = task_for_folder(root, num_frames=4)
    ds = task.dataset(root, "train", task.build(_headless("vit_cls")[0]))
    assert ds[0][0].shape == (4, 3, 32, 32) and ds[0][1] == 1


def test_video_files_decode_to_the_frames_written(tmp_path):
    frames = np.zeros((6, 32, 32, 3), dtype=np.uint8)
    for i in range(6):
        frames[i] = 40 * i  # flat grey levels compress almost losslessly
    path = write_clip(tmp_path / "grey.mp4", frames)
    assert count_frames(path) == 6
    got = [np.asarray(f) for f in read_frames(path, [5, 0, 3])]
    assert [int(round(g.mean())) for g in got] == pytest.approx([200, 0, 120], abs=2)


def test_bad_inputs_are_one_line_data_errors_naming_the_file(tmp_path):
    folder = _make_folder(tmp_path / "toy", n=4)
    model = VideoTask(K).build(_headless("vit_cls")[0])

    def fails(line: str, match: str, frames: int = 4, split: str = "train") -> None:
        (folder / f"{split}.txt").write_text(line + "\n")
        with pytest.raises(DataError, match=match) as info:
            VideoTask(K, num_frames=frames).dataset(folder, split, model)
        assert "\n" not in str(info.value)

    (folder / "clips" / "junk.mp4").write_bytes(b"this is no video at all" * 10)
    fails("clips/junk.mp4 0", r"clip .*junk\.mp4 cannot be read as a video")
    (folder / "clips" / "empty.mp4").write_bytes(b"")
    fails("clips/empty.mp4 0", r"clip .*empty\.mp4 cannot be read as a video")
    fails("clips/c0.mp4 0", r"clip .*c0\.mp4 has 8 frames, fewer than the 9 needed for 9 frames", frames=9)
    (folder / "clips" / "nothing").mkdir()
    fails("clips/nothing 0", r"clip .*nothing holds no frames")
    fails("clips/c0.mp4 3", r"clip .*c0\.mp4 has label 3, not a class index 0..2 \(.*classes\.txt lists 3 classes\)")
    fails("clips/c9.mp4 0", r"clip .*c9\.mp4 listed at .*train\.txt:1 does not exist")
    fails("clips/c0.mp4", r"malformed line .*train\.txt:1: 'clips/c0.mp4'; expected '<clip path> <label index>'")
    (folder / "classes.txt").unlink()
    with pytest.raises(DataError, match=r"classes\.txt does not exist"):
        VideoTask.from_folder(folder)


def test_task_options_dict_round_trip_and_compatibility():
    task = VideoTask(4, num_frames=16, head="temporal", temporal_pos=True, stride=2, views=3, size=32)
    data = json.loads(json.dumps(task.to_dict()))
    back = task_from_dict(data)
    assert isinstance(back, VideoTask) and back.to_dict() == task.to_dict()
    assert task.backbone_classes() == 0 and task.primary_metric == "top1"
    VideoTask(4, num_frames=16, head="temporal", temporal_pos=True).check_compatible(data, "d")  # sampling may differ
    with pytest.raises(ConfigError, match="num_frames=16 .this model: 8"):
        VideoTask(4, head="temporal", temporal_pos=True).check_compatible(data, "d")
    with pytest.raises(ConfigError, match="head='temporal' .this model: 'mean'"):
        VideoTask(4, num_frames=16, temporal_pos=True).check_compatible(data, "d")
    with pytest.raises(ConfigError, match="head='lstm' is not a video head; valid heads: mean, temporal"):
        VideoTask(4, head="lstm")
    with pytest.raises(ConfigError, match="unknown task option.*'frames'; valid: num_frames"):
        VideoTask.from_folder(Path("."), frames=8)
    with pytest.raises(ConfigError, match="num_frames=0"):
        VideoTask(4, num_frames=0)


# ------------------------------------------------------------------------------------------------ model and heads
def _video_model(bb: str = "vit_cls", **options) -> tuple[VideoModel, int]:
    backbone, size = _headless(bb)
    torch.manual_seed(5)
    return VideoTask(K, num_frames=options.pop("num_frames", T), **options).build(backbone), size


def test_the_backbone_runs_frame_wise_and_the_mean_head_is_tsn():
    model, size = _video_model(num_frames=3)
    model.eval()
    x = _clips(size, n=2, t=3)
    with torch.no_grad():
        logits = model(x)
        per_frame = model.backbone(x.reshape(6, 3, size, size)).reshape(2, 3, -1)  # the image model on each frame
        tsn = model.decoder.fc(per_frame).mean(dim=1)  # the mean of the per-frame class scores
    assert logits.shape == (2, K)
    torch.testing.assert_close(logits, tsn, rtol=1e-5, atol=1e-6)
    assert vpeft.layers.temporal.num_frames_of(model.backbone) == 3
    with pytest.raises(ConfigError, match=r"takes \(B, T, 3, H, W\) clips, got a \(2, 3, 32, 32\) tensor"):
        model(x[:, 0])
    with pytest.raises(ConfigError, match="clips of 4 frames are not whole views of the task's 3 frames"):
        model(_clips(size, n=1, t=4))


@pytest.mark.parametrize("temporal_pos", [False, True])
def test_mean_pooling_is_order_free_and_the_temporal_head_sees_order(temporal_pos):
    x = _clips(32, n=2, t=4)
    reverse = x.flip(1)
    mean, _ = _video_model(num_frames=4, temporal_pos=temporal_pos)
    temporal, _ = _video_model(num_frames=4, head="temporal", temporal_pos=temporal_pos)
    with torch.no_grad():
        a, b = mean.eval()(x), mean(reverse)
        if temporal_pos:  # a position embedding alone breaks the symmetry of a mean head only through its mean
            assert not torch.allclose(mean.decoder.pos, torch.zeros_like(mean.decoder.pos))
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        c, d = temporal.eval()(x), temporal(reverse)
    assert (c - d).abs().max() > 1e-3, "the temporal head must tell a clip from its reversal"


def test_multi_view_items_average_the_views_logits(tmp_path):
    folder = _make_folder(tmp_path / "toy", n=3)
    model, _ = _video_model(num_frames=2)
    one = VideoTask(K, num_frames=2).dataset(folder, "train", model)
    three = VideoTask(K, num_frames=2, views=3).dataset(folder, "train", model)
    assert one[0][0].shape == (2, 3, 32, 32) and three[0][0].shape == (6, 3, 32, 32)
    assert three.indices(0).tolist() == sample_indices(8, 2, views=3).tolist() == [0, 4, 2, 6, 3, 7]
    x = three[0][0][None]
    model.eval()
    with torch.no_grad():
        views = torch.cat([model(x[:, 2 * v : 2 * v + 2]) for v in range(3)])
        torch.testing.assert_close(model(x)[0], views.mean(0), rtol=1e-5, atol=1e-6)
    train = VideoTask(K, num_frames=2, views=3).dataset(folder, "train", model, train=True)
    assert train[0][0].shape == (2, 3, 32, 32)  # training takes one view


def test_cache_split_equals_the_forward():
    model, size = _video_model(num_frames=2, head="temporal")
    prefix, suffix = model.cache_split()
    x = _clips(size, n=2, t=4)  # two views
    with torch.no_grad():
        torch.testing.assert_close(suffix(prefix(x)), model.eval()(x), rtol=0, atol=0)


# ------------------------------------------------------------------------------- every image method, frame-wise
VIDEO_BB = ("vit_cls", "cnn_effnet")
_SUPPORT: dict[tuple[str, str], bool] = {}


def _video_supports(case: tuple[str, dict], bb: str) -> bool:
    key = (case_id(case), bb)
    if key not in _SUPPORT:
        try:
            vpeft.apply(_video_model(bb)[0], case[0], **case[1])
            _SUPPORT[key] = True
        except vpeft.UnsupportedBackboneError:
            _SUPPORT[key] = False
    return _SUPPORT[key]


VIDEO_CASES = method_cases()
VIDEO_MATRIX = [
    pytest.param(c, bb, id=f"{case_id(c)}@{bb}") for c in VIDEO_CASES for bb in VIDEO_BB if _video_supports(c, bb)
]
VIDEO_REFUSED = [
    pytest.param(c, bb, id=f"{case_id(c)}@{bb}") for c in VIDEO_CASES for bb in VIDEO_BB if not _video_supports(c, bb)
]


def _randomise(model: torch.nn.Module, seed: int = 3) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)


def test_the_video_matrix_covers_every_image_method_and_the_video_methods():
    from vpeft.methods.towers import CLIP_METHODS  # two-tower CLIP methods: tests/test_clip.py

    video_only = {n for n in vpeft.list_methods() if "image" not in vpeft.get_method(n).inputs}
    assert (
        video_only == {"aim", "st_adapter", "zeroi2v"} & set(vpeft.list_methods())
        and {"aim", "st_adapter"} <= video_only
    )
    methods = set(vpeft.list_methods()) - set(CLIP_METHODS)
    assert {p.values[0][0] for p in VIDEO_MATRIX} == methods, "every image method works frame-wise"
    assert {p.values[1] for p in VIDEO_MATRIX} == set(VIDEO_BB)


@pytest.mark.parametrize("case,bb", [p for p in VIDEO_MATRIX if method_of(*p.values[0]).identity_at_init])
def test_identity_at_init_on_a_video_model(case, bb):
    model, size = _video_model(bb, head="temporal", num_frames=4)
    plain = copy.deepcopy(model).eval()
    vpeft.apply(model, case[0], **case[1])
    x = _clips(size, t=4)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), plain(x), rtol=1e-5, atol=1e-6)


def _unreachable_by_design(case: tuple[str, dict], model: VideoModel) -> set[str]:
    """Trainable tensors that cannot reach the output: ST-Adapter's pre-MLP adapter in the last block updates the
    patch tokens after the last attention, so a backbone pooled from its class token never sees it (the official
    SSv2 model, which reads the class token, has the same 12th pre-MLP adapter)."""
    name, options = case
    pooled_by_token = getattr(model.backbone, "global_pool", None) == "token"
    if name != "st_adapter" or "mlp" not in options.get("placement", "attn") or not pooled_by_token:
        return set()
    last = f"backbone.blocks.{len(model.backbone.blocks) - 1}.mlp_adapter."
    return {n for n, _ in model.named_parameters() if n.startswith(last)}


@pytest.mark.parametrize("case,bb", VIDEO_MATRIX)
def test_method_on_a_video_model_trains_its_tensors_and_the_head(case, bb):
    name = case[0]
    model, size = _video_model(bb, head="temporal", temporal_pos=True)
    rep = vpeft.apply(model, name, **case[1])
    head = {f"decoder.{n}" for n, _ in model.decoder.named_parameters()}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert head <= trainable and rep.decoder == sum(p.numel() for p in model.decoder.parameters())
    if name != "linear":
        assert trainable - head, f"{name} trains nothing in the backbone"
    _randomise(model)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    buffers = {n: b.detach().clone() for n, b in model.named_buffers() if not n.startswith("decoder.")}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    model.train()
    out = model(_clips(size, n=3))
    assert out.shape == (3, K)
    model.task.loss(out, torch.tensor([0, 2, 1])).backward()
    dead = _unreachable_by_design(case, model)
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and torch.isfinite(p.grad).all(), n
            if n in dead:
                assert torch.equal(p.grad, torch.zeros_like(p.grad)), f"{n} reaches the class token"
            else:
                assert p.grad.abs().sum() > 0, f"{n} got a zero gradient"
        else:
            assert p.grad is None, f"frozen {n} holds a .grad"
    opt.step()
    for n, p in model.named_parameters():
        if not p.requires_grad:
            assert torch.equal(p, frozen[n]), f"frozen {n} changed"
    if method_of(*case).freeze_norm_stats:
        for n, b in model.named_buffers():
            if not n.startswith("decoder."):
                assert torch.equal(b, buffers[n]), f"backbone buffer {n} changed"


@pytest.mark.parametrize("case,bb", VIDEO_MATRIX)
def test_video_delta_round_trip_and_merge(case, bb, tmp_path):
    from vpeft.api import read_delta

    model, size = _video_model(bb, head="temporal")
    vpeft.apply(model, case[0], **case[1])
    _randomise(model)
    model.eval()
    x = _clips(size)
    with torch.no_grad():
        expected = model(x)
    path = vpeft.save(model, tmp_path / "delta.safetensors")
    meta, tensors = read_delta(path)
    assert json.loads(meta["task"]) == model.task.to_dict()
    assert {f"decoder.{n}" for n in model.decoder.state_dict()} <= set(tensors)
    assert all(n.startswith(("backbone.", "decoder.")) for n in tensors)
    torch.manual_seed(123)  # another head initialisation: the delta must overwrite it
    fresh = VideoTask(K, num_frames=T, head="temporal").build(_headless(bb)[0])
    vpeft.load(fresh, path)
    with torch.no_grad():
        assert torch.equal(fresh.eval()(x), expected)
    if not method_of(*case).mergeable:
        with pytest.raises(ConfigError, match="not mergeable"):
            vpeft.merge(model)
        return
    vpeft.merge(model)
    assert not any(isinstance(m, vpeft.layers.Wrapper) for m in model.backbone.modules())
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, rtol=1e-4, atol=1e-5)
    vpeft.unmerge(model)
    with torch.no_grad():
        assert torch.equal(model(x), expected)


@pytest.mark.parametrize("case,bb", VIDEO_REFUSED)
def test_methods_that_cannot_adapt_the_backbone_refuse(case, bb):
    model, _ = _video_model(bb)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(vpeft.UnsupportedBackboneError, match=case[0]):
        vpeft.apply(model, case[0], **case[1])
    assert not vpeft.is_adapted(model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("bb", ["swin", "hf_vit", "vit_reg_ls"])
def test_other_backbones_run_frame_wise(bb):
    model, size = _video_model(bb, head="temporal")
    vpeft.apply(model, "lora" if bb != "swin" else "bitfit")
    out = model(_clips(size))
    assert out.shape == (2, K)
    model.task.loss(out, torch.tensor([0, 1])).backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_a_video_delta_loads_only_onto_a_video_model(tmp_path):
    from vpeft.tasks import ClassificationTask, SegmentationTask

    model, _ = _video_model()
    vpeft.apply(model, "lora")
    path = vpeft.save(model, tmp_path / "video.safetensors")
    with pytest.raises(CheckpointError, match="'video' task; this model is a 'classification'"):
        vpeft.load(TINY_BACKBONES["vit_cls"][0](), path)
    with pytest.raises(CheckpointError, match="'video' task; this model is a 'segmentation'"):
        vpeft.load(SegmentationTask(K).build(_headless("vit_cls")[0]), path)
    with pytest.raises(CheckpointError, match="another video set-up: head='mean' .this model: 'temporal'"):
        vpeft.load(VideoTask(K, num_frames=T, head="temporal").build(_headless("vit_cls")[0]), path)
    vpeft.load(VideoTask(K, num_frames=T, views=4, stride=2).build(_headless("vit_cls")[0]), path)  # sampling differs
    clf = TINY_BACKBONES["vit_cls"][0]()
    vpeft.apply(clf, "lora")
    clf_path = vpeft.save(clf, tmp_path / "clf.safetensors")
    with pytest.raises(CheckpointError, match="'classification' task; this model is a 'video'"):
        vpeft.load(_video_model()[0], clf_path)
    assert ClassificationTask(K).kind == "classification"


# ------------------------------------------------------------------------------------------- real arrow of time
def _arrow() -> Path:
    root = Path(__file__).resolve().parents[1]
    for base in (root.parent / "shared" / "data" / "video", Path.cwd().parent / "shared" / "data" / "video"):
        if (base / "arrow" / "test.txt").is_file():
            return base / "arrow"
    pytest.skip("the arrow-of-time clips are not here (../shared/data/video/arrow, see ../shared/ASSETS.md)")


def test_mean_pooling_scores_exactly_half_on_the_real_arrow_of_time_and_the_temporal_head_sees_the_reversal():
    """Every real test window appears forward and reversed, with the two labels: a frame-wise model with order-free
    pooling gives both the same prediction, so exactly one of each pair is right -- top-1 is exactly 0.5. (H.264
    makes a window's decoded frames differ slightly from its reversal's, up to 42/255 per pixel; at this size the
    logits of a pair still differ far less than the margin between the classes.)"""
    from vpeft.data import build_dataloader
    from vpeft.train import evaluate

    folder = _arrow()
    torch.manual_seed(0)
    task = VideoTask.from_folder(folder, num_frames=16)
    backbone, _ = _headless("vit_cls")
    model = task.build(backbone).eval()
    ds = task.dataset(folder, "test", model)
    assert len(ds) == 128 and task.num_classes == 2 and not ds.random_augmentation
    loader = build_dataloader(ds, batch_size=32, shuffle=False)
    metrics = evaluate(model, loader)
    assert metrics["top1"] == 0.5 and metrics["n"] == 128
    # the temporal head on the same frames reversed in time gives other logits
    temporal = VideoTask(2, num_frames=16, head="temporal").build(_headless("vit_cls")[0]).eval()
    x = torch.stack([ds[i][0] for i in range(4)])
    with torch.no_grad():
        assert (temporal(x) - temporal(x.flip(1))).abs().max() > 1e-3
        torch.testing.assert_close(model(x), model(x.flip(1)), rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------------------------------------- CLI
def test_cli_trains_and_evaluates_a_video_folder(tmp_path, capsys):
    from vpeft.cli import main

    root = tmp_path / "data"
    _make_folder(root / "toyvid", n=6)
    out = tmp_path / "run"
    argv = ["train", "--backbone", "test_vit", "--no-pretrained", "--method", "lora", "--task", "toyvid",
            "--data-root", str(root), "--img-size", "32", "--epochs", "1", "--batch-size", "2",
            "--train-split", "train", "--eval-split", "test", "--out", str(out), "--quiet",
            "--task-opt", "num_frames=4", "--task-opt", "head=temporal", "--task-opt", "views=2"]  # fmt: skip
    assert main(argv) == 0
    capsys.readouterr()
    result = json.loads((out / "result.json").read_text())
    assert result["task_spec"]["kind"] == "video" and result["task_spec"]["head"] == "temporal"
    assert result["task_spec"]["num_frames"] == 4 and result["metrics"]["n"] == 1 and result["decoder_params"] > 0
    sheets = tmp_path / "sheets"
    assert main(["eval", "--delta", str(out / "delta.safetensors"), "--data-root", str(root), "--split", "val",
                 "--save-masks", str(sheets)]) == 0  # fmt: skip
    res = json.loads(capsys.readouterr().out)
    assert res["primary_metric"] == "top1" and res["n"] == 1
    assert sorted(p.name for p in sheets.iterdir()) == ["c4.png"]  # the val clip's contact sheet
    assert Image.open(sheets / "c4.png").size == (4 * 112 + 3 * 2, 112 + 16)  # 4 frames of 32x32 at 112 px
    bad = argv[:-6] + ["--task-opt", "head=lstm"]
    bad[bad.index("--out") + 1] = str(tmp_path / "bad")
    assert main(bad) == 2
    assert "head='lstm' is not a video head; valid heads: mean, temporal" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ temporal methods
TEMPORAL = [m for m in ("aim", "st_adapter", "zeroi2v") if m in vpeft.list_methods()]


# AIM without its temporal embedding: the temporal attention alone, which mixes frames but knows no order
NO_EMBEDDING = ("aim", {"temporal_embedding": False})
MIX_CASES = [(n, {}) for n in TEMPORAL] + [NO_EMBEDDING]


@pytest.mark.parametrize("name,kwargs", MIX_CASES, ids=[case_id(c) for c in MIX_CASES])
def test_temporal_methods_mix_information_across_frames(name, kwargs):
    """Changing frame 0 changes the other frames' features only through a temporal path inside the backbone."""
    model, size = _video_model(num_frames=4)
    vpeft.apply(model, name, **kwargs)
    _randomise(model, seed=7)
    x = _clips(size, n=1, t=4)
    y = x.clone()
    y[:, 0] = torch.randn(3, size, size, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        a, b = model.eval().frame_features(x), model.frame_features(y)
    assert (a[:, 1:] - b[:, 1:]).abs().max() > 1e-6, f"{name}: the other frames ignore frame 0"
    frame_wise, _ = _video_model(num_frames=4)
    vpeft.apply(frame_wise, "lora")
    _randomise(frame_wise, seed=7)
    with torch.no_grad():
        assert torch.equal(frame_wise.eval().frame_features(x)[:, 1:], frame_wise.frame_features(y)[:, 1:])


@pytest.mark.parametrize("name", TEMPORAL)
def test_temporal_methods_make_a_mean_pooled_model_see_the_order_of_frames(name):
    """With order-free pooling, only an order-aware path inside the backbone tells a clip from its reversal."""
    model, size = _video_model(num_frames=4)
    vpeft.apply(model, name)
    _randomise(model, seed=7)
    x = _clips(size, t=4)
    with torch.no_grad():
        assert (model.eval()(x) - model(x.flip(1))).abs().max() > 1e-4
    # AIM's temporal attention is permutation-equivariant over the frames: without the temporal embedding, the
    # order never reaches a mean-pooled output (so the embedding is what lets AIM tell time's arrow)
    plain, _ = _video_model(num_frames=4)
    vpeft.apply(plain, NO_EMBEDDING[0], **NO_EMBEDDING[1])
    _randomise(plain, seed=7)
    with torch.no_grad():
        torch.testing.assert_close(plain.eval()(x), plain(x.flip(1)), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", TEMPORAL)
def test_temporal_methods_refuse_image_tasks(name):
    from vpeft.tasks import SegmentationTask

    pattern = f"method '{name}' models time across the frames of a clip and adapts video backbones only"
    with pytest.raises(vpeft.UnsupportedBackboneError, match=pattern):
        vpeft.apply(TINY_BACKBONES["vit_cls"][0](), name)
    with pytest.raises(vpeft.UnsupportedBackboneError, match=pattern):
        vpeft.apply(SegmentationTask(K).build(_headless("vit_cls")[0]), name)


def test_temporal_methods_follow_the_clip_length_of_each_forward():
    model, size = _video_model(num_frames=4)
    vpeft.apply(model, "st_adapter")
    blocks = [m for m in model.modules() if isinstance(m, vpeft.layers.temporal.TemporalModule)]
    assert blocks and all(b.num_frames == 4 for b in blocks)
    assert model(_clips(size, n=1, t=8)).shape == (1, K)  # two views of 4 frames: unfolded as 4-frame clips
    with pytest.raises(ConfigError, match="frame-wise batch of 6 is not a whole number of 4-frame clips"):
        blocks[0](torch.randn(6, 17, 32))


# ----------------------------------------------------------------------------------------------- contact sheets
class _FixedLogits(torch.nn.Module):
    """Every clip predicted as class 0 (score softmax([4, 0, 0])[0])."""

    def forward(self, clips: torch.Tensor) -> torch.Tensor:
        return torch.tensor([[4.0, 0.0, 0.0]]).expand(clips.shape[0], 3)


def test_contact_sheets_show_the_frames_the_model_saw_and_the_predicted_class(tmp_path):
    from torchvision.transforms.functional import to_tensor

    from vpeft.data.video import VideoDataset, read_clip_list
    from vpeft.tasks.video import save_clip_sheets

    root = tmp_path / "toy"
    (root / "classes.txt").parent.mkdir(parents=True)
    (root / "classes.txt").write_text("zero\none\ntwo\n")
    colours = [(30 * j, 255 - 30 * j, (70 * j) % 256) for j in range(8)]
    for c in ("a", "b"):
        for j, colour in enumerate(colours):  # frame folders: 8 solid 32x24 frames, frame j in colour j
            (root / c).mkdir(exist_ok=True)
            Image.new("RGB", (32, 24), colour).save(root / c / f"{j:03d}.png")
    (root / "test.txt").write_text("a 0\nb 1\n")
    ds = VideoDataset(read_clip_list(root, "test"), 3, to_tensor, num_frames=4, classes_file=root / "classes.txt")
    written = save_clip_sheets(_FixedLogits(), ds, tmp_path / "sheets", max_frames=3)
    assert [p.name for p in written] == ["a.png", "b.png"]
    for path, truth_is_zero in zip(written, (True, False)):
        sheet = np.asarray(Image.open(path).convert("RGB")).astype(int)
        tile_w = round(32 * 112 / 24)  # aspect kept at 112 px high
        assert sheet.shape == (112 + 16, 3 * tile_w + 2 * 2, 3)
        seen = ds.indices(0)  # TSN centres of 4 segments of 8 frames; 3 of them evenly spaced: first, middle, last
        shown = [int(seen[k]) for k in (0, 2, 3)]  # linspace(0, 3, 3) rounded
        for t, j in enumerate(shown):
            assert tuple(sheet[16 + 56, t * (tile_w + 2) + tile_w // 2]) == colours[j], (path.name, t, j)
        text = sheet[:16][sheet[:16].sum(axis=-1) > 200]  # the caption's lit pixels
        assert len(text) > 50
        r, g, b = text.mean(axis=0)
        assert (g > r and g > b) if truth_is_zero else (r > g and r > b), (path.name, r, g, b)  # green right, red wrong
    with pytest.raises(ConfigError, match="save_clip_sheets: limit=-1 is invalid"):
        save_clip_sheets(_FixedLogits(), ds, tmp_path / "s2", limit=-1)
    assert [p.name for p in save_clip_sheets(_FixedLogits(), ds, tmp_path / "s3", limit=1)] == ["a.png"]
    twice = VideoDataset(read_clip_list(root, "test+test"), 3, to_tensor, num_frames=4)  # a joined split repeats
    assert [p.name for p in save_clip_sheets(_FixedLogits(), twice, tmp_path / "s4")] == [
        "a.png", "b.png", "a-2.png", "b-2.png"
    ]  # fmt: skip


# ------------------------------------------------------------------------------------ ST-Adapter's placements
def _reference_st_block(block, pre_attn, pre_mlp, x: torch.Tensor, t: int, prefix: int) -> torch.Tensor:
    """The official ``ResidualAttentionBlock.forward`` written out on a timm block (no LayerScale / drop-path in
    the tiny ViT): ``x = A1(x); x = x + attn(LN1(x)); x = A2(x); x = x + mlp(LN2(x))``, each adapter adding
    ``fc2(conv3d(fc1(patches)))`` to the patch tokens only."""

    def adapt(adapter, x):
        if adapter is None:
            return x
        bt, n, d = x.shape
        side = int(round((n - prefix) ** 0.5))
        h = adapter.fc1(x[:, prefix:]).reshape(bt // t, t, side, side, -1).permute(0, 4, 1, 2, 3)
        h = adapter.conv(h).permute(0, 2, 3, 4, 1).reshape(bt, n - prefix, -1)
        return torch.cat([x[:, :prefix], x[:, prefix:] + adapter.fc2(h)], dim=1)

    x = adapt(pre_attn, x)
    x = x + block.attn(block.norm1(x))
    x = adapt(pre_mlp, x)
    return x + block.mlp(block.norm2(x))


@pytest.mark.parametrize("placement", ["attn", "mlp", "attn_mlp"])
def test_st_adapter_placements_match_the_official_block(placement):
    from vpeft.methods.st_adapter import STAdapterBlock

    model, size = _video_model(num_frames=4)
    rep = vpeft.apply(model, "st_adapter", placement=placement, bottleneck=8)
    blocks = [m for m in model.modules() if isinstance(m, STAdapterBlock)]
    per_adapter = sum(p.numel() for p in (blocks[0].adapter or blocks[0].mlp_adapter).parameters())
    assert rep.method_params == len(blocks) * per_adapter * (2 if placement == "attn_mlp" else 1)
    assert [(b.adapter is not None, b.mlp_adapter is not None) for b in blocks] == [
        ("attn" in placement, "mlp" in placement)
    ] * len(blocks)
    _randomise(model, seed=11)  # the convolutions leave zero, so every adapter changes the stream
    x = torch.randn(2 * 4, 17, 32)  # two 4-frame clips of the tiny ViT's tokens: a class token + a 4x4 grid
    prefix = blocks[0].prefix
    with torch.no_grad():
        for b in blocks:
            expected = _reference_st_block(b.base_layer, b.adapter, b.mlp_adapter, x, 4, prefix)
            torch.testing.assert_close(b.eval()(x), expected, rtol=1e-5, atol=1e-6)
            assert (expected - b.base_layer(x)).abs().max() > 1e-4  # the adapters do change the block


def test_st_adapter_placement_is_validated_and_pre_mlp_needs_timm_blocks():
    message = r"^st_adapter: placement='mhsa' is invalid; valid options: attn, mlp, attn_mlp$"
    with pytest.raises(ConfigError, match=message):
        vpeft.apply(_video_model()[0], "st_adapter", placement="mhsa")
    hf, size = _video_model("hf_vit")
    with pytest.raises(vpeft.UnsupportedBackboneError, match="placement='attn_mlp' re-runs timm ViT blocks"):
        vpeft.apply(hf, "st_adapter", placement="attn_mlp")
    assert not vpeft.is_adapted(hf)
    vpeft.apply(hf, "st_adapter")  # before attention: a wrapper of any block
    assert hf(_clips(size)).shape == (2, K)
