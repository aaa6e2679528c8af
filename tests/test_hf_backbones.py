"""Hugging Face transformers ViT / CLIP vision and timm Swin: specs, placements, and CLIP's method sweep.

HF ViT and timm Swin run the whole contract matrix (tests/tiny.py). CLIP's image classifier mean-pools the
patch tokens without its ``post_layernorm`` (dead weights there, which methods training every norm would
train without a gradient), so it gets this lighter sweep over every method instead: apply or a clear
UnsupportedBackboneError, identity at init, delta round trip, merge equivalence.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from tiny import NUM_CLASSES, TINY_BACKBONES, batch, case_id, forward, method_cases, method_of
from torch import nn

import vpeft
from vpeft.api import read_delta
from vpeft.arch import get_spec, logits_of
from vpeft.layers import LoRALinear, Wrapper
from vpeft.state import state_of

transformers = pytest.importorskip("transformers")


def tiny_clip(head: bool = True) -> nn.Module:
    torch.manual_seed(0)
    vision = transformers.CLIPVisionConfig(
        image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64
    )
    if not head:
        return transformers.CLIPVisionModel(vision).eval()
    cfg = transformers.CLIPConfig(vision_config=vision.to_dict(), num_labels=NUM_CLASSES)
    return transformers.CLIPForImageClassification(cfg).eval()


def test_hf_vit_spec_names_the_separate_projections():
    model = TINY_BACKBONES["hf_vit"][0]()
    spec = get_spec(model)
    assert (spec.family, spec.kind, spec.head, spec.num_prefix_tokens) == ("hf_vit", "vit", "classifier", 1)
    p = spec.parts[0]
    assert (p.qkv, p.q, p.v, p.proj) == ("", "vit.layers.0.attention.q_proj", "vit.layers.0.attention.v_proj", p.proj)
    assert p.proj.endswith("attention.o_proj") and p.fc1.endswith("mlp.fc1") and p.norm1.endswith("layernorm_before")
    assert spec.post_blocks == ("vit.layernorm",) and spec.stem == ("vit.embeddings",)
    assert spec.image_size == (32, 32) and spec.patch_size == (8, 8)


def test_clip_spec_with_and_without_head():
    spec = get_spec(tiny_clip())
    assert spec.family == "hf_clip_vision" and spec.head == "classifier"
    assert spec.post_blocks == (), "CLIPForImageClassification never reads post_layernorm"
    assert spec.stem == ("vision_model.embeddings", "vision_model.pre_layrnorm")
    assert spec.parts[1].k == "vision_model.encoder.layers.1.self_attn.k_proj"
    bare = get_spec(tiny_clip(head=False))
    assert bare.head == "" and bare.post_blocks == ("post_layernorm",)


def test_swin_spec_runs_across_stages_with_their_own_widths():
    model = TINY_BACKBONES["swin"][0]()
    spec = get_spec(model)
    assert spec.kind == "swin" and spec.blocks == ("layers.0.blocks.0", "layers.0.blocks.1", "layers.1.blocks.0")
    widths = [model.get_submodule(p.fc2).out_features for p in spec.parts]
    assert widths == [32, 32, 64] and spec.embed_dim == 64
    vpeft.apply(model, "adapter", placement="houlsby")
    assert model.layers[1].blocks[0].mlp.adapter.down.in_features == 64
    assert model.layers[0].blocks[0].attn.adapter.down.in_features == 32


def test_lora_qv_maps_onto_hf_q_and_v_and_exports_without_padding(tmp_path):
    peft = pytest.importorskip("peft")
    from vpeft.interop import export_peft, import_peft

    model = TINY_BACKBONES["hf_vit"][0]()
    vpeft.apply(model, "lora", r=4)
    attn = model.vit.layers[0].attention
    assert isinstance(attn.q_proj, LoRALinear) and isinstance(attn.v_proj, LoRALinear)
    assert not isinstance(attn.k_proj, Wrapper) and attn.q_proj.slices == [(0, 32)]
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
    x = batch(32)
    with torch.no_grad():
        expected = forward(model.eval(), x)
    out = export_peft(model, tmp_path / "adapter")  # q/v-only is a plain PEFT LoRA here: no pad_fused needed
    loaded = peft.PeftModel.from_pretrained(TINY_BACKBONES["hf_vit"][0](), str(out)).eval()
    with torch.no_grad():
        torch.testing.assert_close(forward(loaded, x), expected, rtol=0, atol=1e-5)
    back = TINY_BACKBONES["hf_vit"][0]()
    import_peft(back, out)
    with torch.no_grad():
        assert torch.equal(forward(back.eval(), x), expected)


def test_logits_of_needs_logits():
    assert logits_of(torch.ones(2)).shape == (2,)
    with torch.no_grad():
        out = tiny_clip(head=False)(batch(32))
    with pytest.raises(vpeft.ConfigError, match="without logits"):
        logits_of(out)


CASES = method_cases()


@pytest.mark.parametrize("case", CASES, ids=[case_id(c) for c in CASES])
def test_every_method_on_clip_works_or_says_why_not(case, tmp_path):
    name, kwargs = case
    model, x = tiny_clip(), batch(32)
    with torch.no_grad():
        ref = forward(model, x)
    before = copy.deepcopy(model.state_dict())
    try:
        vpeft.apply(model, name, **kwargs)
    except vpeft.UnsupportedBackboneError as exc:
        assert name in str(exc)
        assert not vpeft.is_adapted(model) and all(torch.equal(before[k], v) for k, v in model.state_dict().items())
        return
    method = method_of(name, kwargs)
    with torch.no_grad():
        out = forward(model.eval(), x)
        if method.identity_at_init:
            torch.testing.assert_close(out, ref, rtol=0, atol=1e-6)
        g = torch.Generator().manual_seed(1)
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
        out = forward(model, x)
    path = vpeft.save(model, tmp_path / "delta.safetensors")
    assert set(read_delta(path)[1]) >= set(state_of(model).trainable)
    fresh = tiny_clip()
    vpeft.load(fresh, path)
    with torch.no_grad():
        assert torch.equal(forward(fresh.eval(), x), out)
    if method.mergeable:
        vpeft.merge(model)
        assert not any(isinstance(m, Wrapper) for m in model.modules())
        with torch.no_grad():
            torch.testing.assert_close(forward(model, x), out, rtol=1e-4, atol=1e-5)


def test_vpeft_trainer_trains_a_transformers_model():
    from torch.utils.data import DataLoader, TensorDataset

    from vpeft.train import TrainConfig, train

    model = TINY_BACKBONES["hf_vit"][0]()
    vpeft.apply(model, "lora", r=4)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    g = torch.Generator().manual_seed(0)
    ds = TensorDataset(torch.randn(16, 3, 32, 32, generator=g), torch.arange(16) % NUM_CLASSES)
    loader = DataLoader(ds, batch_size=8)
    result = train(model, loader, TrainConfig(epochs=1, lr=1e-2, batch_size=8), val_loader=loader, progress=False)
    assert result.steps == 2 and math.isfinite(result.final["val_loss"])
    assert any(not torch.equal(p, before[n]) for n, p in model.named_parameters() if n in before)


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_unfused_low_rank_paths_train_on_a_frozen_first_projection(method, monkeypatch):
    # the q_proj of the first HF layer sees an input without grad: its output is an autograd leaf
    monkeypatch.setattr(LoRALinear, "fused", False)
    model = TINY_BACKBONES["hf_vit"][0]()
    vpeft.apply(model, method, targets=["qkv"])
    forward(model.train(), batch(32)).pow(2).mean().backward()
    assert model.vit.layers[0].attention.q_proj.lora_A[0].grad is not None
