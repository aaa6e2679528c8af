"""ZeroI2V: the STDHA head shift (exact on a built tensor), the adapters the identity at initialisation (the
adapted model equals the frozen one with the bare shift), merging folds the adapters and keeps the shift and the
temporal embedding, delta save/load, and one-line refusals."""

from __future__ import annotations

import copy

import pytest
import torch
from tiny import TINY_BACKBONES

import vpeft
from vpeft.errors import ConfigError, UnsupportedBackboneError
from vpeft.layers import Wrapper
from vpeft.methods.zeroi2v import FrameEmbedding, TemporalHeadShift, shift_heads
from vpeft.tasks import VideoTask

K, T = 3, 4


def _video(bb: str = "vit_cls", frames: int = T):
    factory, size = TINY_BACKBONES[bb]
    backbone = factory()
    if hasattr(backbone, "reset_classifier"):
        backbone.reset_classifier(0)
    else:
        backbone.classifier = torch.nn.Identity()
    torch.manual_seed(0)
    return VideoTask(K, num_frames=frames).build(backbone), size


def _clips(size: int, frames: int = T, n: int = 2) -> torch.Tensor:
    return torch.randn(n, frames, 3, size, size, generator=torch.Generator().manual_seed(1))


def _randomise(model: torch.nn.Module) -> None:
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)


def test_the_shift_moves_keys_and_values_of_the_shifted_heads_from_the_neighbouring_frames():
    width, head_dim, t = 8, 2, 3  # 4 heads of 2 channels; heads=1: head 0 from t-1, head 1 from t+1
    # value = frame * 100 + channel, so every entry names where it came from
    frames = torch.arange(t).repeat(2)  # two clips
    qkv = (frames[:, None, None] * 100 + torch.arange(3 * width)[None, None]).float().expand(2 * t, 5, -1)
    out = shift_heads(qkv, t, width, head_dim, heads=1)
    src = (out // 100).long()  # the frame each entry now comes from
    for i in range(2 * t):
        f = i % t
        assert torch.equal(out[i, :, :width], qkv[i, :, :width]), "queries never move"
        for start in (width, 2 * width):  # keys, values
            assert (src[i, :, start : start + 2] == max(f - 1, 0)).all()  # head 0: the previous frame (or own)
            assert (src[i, :, start + 2 : start + 4] == min(f + 1, t - 1)).all()  # head 1: the next (or own)
            assert (src[i, :, start + 4 : start + width] == f).all()  # heads 2, 3: their own frame
    assert torch.equal(out % 100, qkv % 100), "channels stay in place"
    assert shift_heads(qkv, 1, width, head_dim, 1) is qkv  # one frame: nothing to shift


def test_adapters_are_the_identity_at_init_only_the_shift_changes_the_frozen_model():
    model, size = _video()
    frozen = copy.deepcopy(model).eval()
    vpeft.apply(model, "zeroi2v")
    bare = copy.deepcopy(frozen)  # the frozen model with the bare head shift around each qkv
    for block in bare.backbone.blocks:
        shift = TemporalHeadShift(block.attn.qkv, 32, 16, 1)
        shift.num_frames = T
        block.attn.qkv = shift
    x = _clips(size)
    with torch.no_grad():
        got = model.eval()(x)
        torch.testing.assert_close(got, bare(x), rtol=0, atol=1e-6)
        assert (got - frozen(x)).abs().max() > 1e-4, "the shift changes the frozen model's function"
    one, _ = _video(frames=1)  # a 1-frame clip has no neighbour: identical to the frozen model
    plain = copy.deepcopy(one).eval()
    vpeft.apply(one, "zeroi2v")
    with torch.no_grad():
        torch.testing.assert_close(one.eval()(x[:, :1]), plain(x[:, :1]), rtol=0, atol=1e-6)


def test_merge_folds_the_adapters_and_keeps_the_shift_and_the_embedding():
    model, size = _video()
    rep = vpeft.apply(model, "zeroi2v")
    _randomise(model)
    x = _clips(size)
    model.eval()
    with torch.no_grad():
        expected = model(x)
    vpeft.merge(model)
    bb = model.backbone
    assert not any(isinstance(m, Wrapper) for m in bb.modules())
    shifts = [m for m in bb.modules() if isinstance(m, TemporalHeadShift)]
    assert len(shifts) == len(bb.blocks) and all(type(s.layer) is torch.nn.Linear for s in shifts)
    assert isinstance(bb.norm_pre, FrameEmbedding)
    plain = sum(p.numel() for p in _video()[0].backbone.parameters())
    assert sum(p.numel() for p in bb.parameters()) == plain + T * 32, "merged: the frozen ViT + the embedding"
    assert rep.method_params == 2 * 4 * (32 * 8 + 8 + 8 * 32 + 32) + T * 32
    with torch.no_grad():
        merged = model(x)
        torch.testing.assert_close(merged, expected, rtol=1e-5, atol=1e-5)
        without = copy.deepcopy(model)  # the same merged weights with the shift taken out: another function
        for block in without.backbone.blocks:
            block.attn.qkv = block.attn.qkv.layer
        assert (without(x) - merged).abs().max() > 1e-4
    vpeft.unmerge(model)
    with torch.no_grad():
        assert torch.equal(model(x), expected)


def test_delta_round_trip_is_exact(tmp_path):
    from vpeft.api import read_delta

    model, size = _video()
    vpeft.apply(model, "zeroi2v", heads=1, bottleneck=4)
    _randomise(model)
    x = _clips(size)
    with torch.no_grad():
        expected = model.eval()(x)
    path = vpeft.save(model, tmp_path / "z.safetensors")
    _, tensors = read_delta(path)
    assert "backbone.norm_pre.embedding" in tensors
    assert not any(n.endswith(("base_layer.weight", "layer.weight")) for n in tensors), "no frozen weights"
    fresh, _ = _video()
    torch.manual_seed(9)
    vpeft.load(fresh, path)
    with torch.no_grad():
        assert torch.equal(fresh.eval()(x), expected)


def test_refusals_are_one_line():
    model, _ = _video()
    with pytest.raises(ConfigError, match=r"heads=2 shifts 4 heads .*has 2; use heads <= 1"):
        vpeft.apply(model, "zeroi2v", heads=2)
    assert not vpeft.is_adapted(model)
    with pytest.raises(UnsupportedBackboneError, match="separate q/k/v projections"):
        vpeft.apply(_video("hf_vit")[0], "zeroi2v")
    with pytest.raises(ConfigError, match="temporal_embedding='yes' must be true or false"):
        vpeft.apply(_video()[0], "zeroi2v", temporal_embedding="yes")
    no_embedding, _ = _video()
    rep = vpeft.apply(no_embedding, "zeroi2v", temporal_embedding=False)
    assert not any(isinstance(m, FrameEmbedding) for m in no_embedding.modules())
    assert rep.method_params == 2 * 4 * (32 * 8 + 8 + 8 * 32 + 32)


def test_save_merged_names_the_modules_a_plain_vit_cannot_load(tmp_path, caplog):
    """ZeroI2V's merged model keeps the shift and the embedding: save_merged says so (a warning and the file's
    metadata), and a plain backbone refuses the weights; a LoRA merge is the plain backbone and says nothing."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    model, _ = _video()
    vpeft.apply(model, "zeroi2v")
    vpeft.merge(model)
    with caplog.at_level("WARNING", logger="vpeft.api"):
        path = vpeft.save_merged(model, tmp_path / "z.safetensors")
    warned = [r.getMessage() for r in caplog.records if "merged model" in r.getMessage()]
    assert len(warned) == 1 and "FrameEmbedding,TemporalHeadShift" in warned[0] and "'zeroi2v'" in warned[0]
    with safe_open(str(path), "pt") as f:
        assert f.metadata()["method_modules"] == "FrameEmbedding,TemporalHeadShift"
    plain, _ = _video()
    with pytest.raises(RuntimeError, match="Missing key"):
        plain.load_state_dict(load_file(path))

    caplog.clear()
    lora, _ = _video()
    vpeft.apply(lora, "lora")
    vpeft.merge(lora)
    with caplog.at_level("WARNING", logger="vpeft.api"):
        path = vpeft.save_merged(lora, tmp_path / "l.safetensors")
    assert not [r for r in caplog.records if "merged model" in r.getMessage()]
    with safe_open(str(path), "pt") as f:
        assert "method_modules" not in f.metadata()
    plain.load_state_dict(load_file(path))  # strict: the plain video model takes a LoRA merge
