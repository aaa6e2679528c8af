"""The contract every registered method passes, on every tiny backbone (DESIGN.md).

Parametrised over ``vpeft.list_methods()`` (plus a few extra option cases) x tiny backbones, so a
newly registered method is tested without writing a test.
"""

from __future__ import annotations

import copy

import pytest
import torch
from tiny import TINY_BACKBONES, batch, case_id, features_and_logits, forward, method_cases, method_of, supports

import vpeft
from vpeft.api import read_delta
from vpeft.layers import Wrapper
from vpeft.state import state_of

CASES = method_cases()
SUPPORT = {(i, bb): supports(*case, bb) for i, case in enumerate(CASES) for bb in TINY_BACKBONES}
MATRIX = [
    pytest.param(case, bb, id=f"{case_id(case)}@{bb}")
    for i, case in enumerate(CASES)
    for bb in TINY_BACKBONES
    if SUPPORT[i, bb]
]
UNSUPPORTED = [
    pytest.param(case, bb, id=f"{case_id(case)}@{bb}")
    for i, case in enumerate(CASES)
    for bb in TINY_BACKBONES
    if not SUPPORT[i, bb]
]

# Which methods (default options) refuse which tiny backbone; every other pair must apply and run the contract.
# A method that starts refusing a backbone fails here instead of silently leaving the matrix.
_TRANSFORMER_ONLY = {
    "adapter", "adaptformer", "attention_only", "compose", "difffit", "dora", "e2vpt", "fact_tk", "fact_tt", "glora",
    "ia3", "krona", "lora", "lst", "mona", "noah", "peft_tuner", "prefix", "repadapter", "vpt_deep", "vpt_shallow",
}  # fmt: skip
_PLAIN_VIT_ONLY = {
    "compose", "convpass", "e2vpt", "fact_tk", "fact_tt", "glora", "lst", "mona", "noah", "prefix", "vpt_deep",
    "vpt_shallow",
}  # fmt: skip
EXPECTED_REFUSALS = {
    "vit_cls": set(),
    "vit_reg_ls": set(),
    "vit_avg": set(),
    "cnn_effnet": _TRANSFORMER_ONLY,
    "cnn_convnext": _TRANSFORMER_ONLY,
    "swin": _PLAIN_VIT_ONLY,
    "hf_vit": set(),  # separate q/k/v projections: every method, token methods included
}


def _adapted(case, bb):
    name, kwargs = case
    factory, size = TINY_BACKBONES[bb]
    model = factory()
    rep = vpeft.apply(model, name, **kwargs)
    return model, rep, size


def _randomise_trainable(model, seed: int = 3) -> None:
    """Give every trainable tensor a non-trivial value (zero-initialised ones would hide bugs)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)


def _frozen_state(model):
    params = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    buffers = {n: b.detach().clone() for n, b in model.named_buffers()}
    return params, buffers


@pytest.mark.parametrize("case,bb", MATRIX)
def test_trainable_set(case, bb):
    model, rep, _ = _adapted(case, bb)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    state = state_of(model)
    assert trainable == set(state.trainable)
    assert trainable, "at least one trainable tensor"
    head = set(state.head)
    assert head <= trainable, "the head is always trained"
    if case[0] not in ("linear",):
        assert trainable - head, "the method trains something besides the head"
    wrapper_params = {
        f"{mn}.{pn}" for mn, m in model.named_modules() if isinstance(m, Wrapper) for pn, _ in m.delta_parameters()
    }
    assert wrapper_params <= trainable
    assert rep.trainable == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert rep.total == sum(p.numel() for p in model.parameters())
    assert rep.method_params + rep.head == rep.trainable


@pytest.mark.parametrize("case,bb", MATRIX)
def test_frozen_weights_untouched_by_a_step(case, bb):
    model, _, size = _adapted(case, bb)
    params, buffers = _frozen_state(model)
    trainable = [p for p in model.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in trainable]
    opt = torch.optim.AdamW(trainable, lr=1e-2, weight_decay=0.1)
    model.train()
    loss = forward(model, batch(size)).logsumexp(-1).mean()
    loss.backward()
    opt.step()
    for n, p in model.named_parameters():
        if not p.requires_grad:
            assert torch.equal(p, params[n]), f"frozen {n} changed"
            assert p.grad is None, f"frozen {n} holds a .grad"
    if method_of(*case).freeze_norm_stats:
        for n, b in model.named_buffers():
            assert torch.equal(b, buffers[n]), f"buffer {n} changed"
    assert any(not torch.equal(a, p) for a, p in zip(before, trainable)), "the step changed no trainable tensor"


@pytest.mark.parametrize("case,bb", MATRIX)
def test_identity_at_init(case, bb):
    name, kwargs = case
    factory, size = TINY_BACKBONES[bb]
    ref_model = factory()
    x = batch(size)
    with torch.no_grad():
        ref = forward(ref_model, x)
    model, _, _ = _adapted(case, bb)
    with torch.no_grad():
        out = forward(model.eval(), x)
    assert out.shape == ref.shape
    if method_of(*case).identity_at_init:
        torch.testing.assert_close(out, ref, rtol=0, atol=1e-6)
    else:
        assert not torch.allclose(out, ref), f"{name} claims not to be the identity at init but is"


@pytest.mark.parametrize("case,bb", MATRIX)
def test_every_trainable_tensor_gets_a_gradient(case, bb):
    model, _, size = _adapted(case, bb)
    _randomise_trainable(model)
    model.train()
    torch.manual_seed(0)
    x = batch(size, n=8)
    # every token's features (not only the pooled ones) so no branch is starved by the pooling
    feats, logits = features_and_logits(model, x)
    (logits.pow(2).mean() + feats.pow(2).mean()).backward()
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and torch.isfinite(p.grad).all(), n
            assert p.grad.abs().sum() > 0, f"{n} got a zero gradient"


@pytest.mark.parametrize("case,bb", MATRIX)
def test_delta_save_load_round_trip(case, bb, tmp_path):
    model, _, size = _adapted(case, bb)
    _randomise_trainable(model)
    x = batch(size)
    with torch.no_grad():
        expected = forward(model.eval(), x)
    path = vpeft.save(model, tmp_path / "delta.safetensors")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["delta.safetensors"], "no temp files left"
    meta, tensors = read_delta(path)
    state = state_of(model)
    stored = set(tensors)
    if method_of(*case).saves_buffers:
        stored -= {n for n, _ in model.named_buffers()}
    assert stored == set(state.trainable), "the file holds exactly the trainable tensors"
    fresh = TINY_BACKBONES[bb][0]()
    vpeft.load(fresh, path)
    with torch.no_grad():
        got = forward(fresh.eval(), x)
    assert torch.equal(got, expected)


@pytest.mark.parametrize("case,bb", MATRIX)
def test_merge_unmerge(case, bb):
    name, _ = case
    model, _, size = _adapted(case, bb)
    _randomise_trainable(model)
    x = batch(size)
    model.eval()
    with torch.no_grad():
        unmerged = forward(model, x)
    if not method_of(*case).mergeable:
        with pytest.raises(vpeft.ConfigError, match="not mergeable"):
            vpeft.merge(model)
        return
    module_types_before = [type(m) for m in TINY_BACKBONES[bb][0]().modules()]
    vpeft.merge(model)
    assert not any(isinstance(m, Wrapper) for m in model.modules()), "wrappers are gone after merge"
    assert [type(m) for m in model.modules()] == module_types_before, "merged model is a plain backbone"
    with torch.no_grad():
        merged = forward(model, x)
    torch.testing.assert_close(merged, unmerged, rtol=1e-4, atol=1e-5)
    vpeft.unmerge(model)
    with torch.no_grad():
        again = forward(model, x)
    assert torch.equal(again, unmerged), "unmerge restores the exact unmerged model"


@pytest.mark.parametrize("case", CASES, ids=[case_id(c) for c in CASES])
def test_config_json_round_trip(case):
    name, kwargs = case
    cfg = vpeft.get_method(name).config_cls.from_kwargs(kwargs)
    assert vpeft.MethodConfig.from_json(cfg.to_json()) == cfg
    assert vpeft.MethodConfig.from_dict(cfg.to_dict()) == cfg
    assert hash(cfg) == hash(copy.deepcopy(cfg))


@pytest.mark.parametrize("case,bb", UNSUPPORTED)
def test_unsupported_pair_raises(case, bb):
    name, kwargs = case
    model = TINY_BACKBONES[bb][0]()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(vpeft.UnsupportedBackboneError, match=name):
        vpeft.apply(model, name, **kwargs)
    assert not vpeft.is_adapted(model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.requires_grad for p in model.parameters()), "a refused apply leaves the model untouched"


def test_default_support_table():
    defaults = [i for i, (_, kwargs) in enumerate(CASES) if not kwargs]
    from vpeft.methods.towers import CLIP_METHODS  # they need a two-tower CLIP (tests/test_clip.py)

    # video-only methods (Method.inputs without "image") need a video task's backbone (tests/test_video.py)
    video_only = {n for n in vpeft.list_methods() if "image" not in vpeft.get_method(n).inputs}
    refused = {bb: {CASES[i][0] for i in defaults if not SUPPORT[i, bb]} for bb in TINY_BACKBONES}
    assert refused == {bb: names | set(CLIP_METHODS) | video_only for bb, names in EXPECTED_REFUSALS.items()}


def test_every_family_is_covered():
    from vpeft.methods.base import ADDITION, REPARAMETER, SPECIFICATION

    families = {vpeft.get_method(n).family for n in vpeft.list_methods()}
    assert {ADDITION, SPECIFICATION, REPARAMETER} <= families
