"""API behaviour beyond the contract: errors on bad input, placement details, reports."""

from __future__ import annotations

import pytest
import torch
from tiny import TINY_BACKBONES, batch

import vpeft
from vpeft.layers import LoRALinear, PromptedBlock


def vit():
    return TINY_BACKBONES["vit_reg_ls"][0]()


def test_unknown_method_suggests_close_matches():
    with pytest.raises(vpeft.UnknownNameError, match=r"unknown method 'lorra'.*Did you mean 'lora'.*Valid methods:"):
        vpeft.get_method("lorra")


@pytest.mark.parametrize(
    "name,kwargs,pattern",
    [
        ("lora", {"r": 0}, r"lora: r=0 is invalid; expected an integer >= 1"),
        ("lora", {"targets": ["q", "x"]}, r"unknown 'x'.*valid options: q, k, v, proj, fc1, fc2"),
        ("lora", {"targets": []}, r"empty"),
        ("lora", {"dropout": 1.5}, r"dropout=1.5"),
        ("vpt_deep", {"num_tokens": -1}, r"num_tokens=-1 is invalid"),
        ("adapter", {"placement": "middle"}, r"placement='middle' is invalid; valid options: pfeiffer, houlsby"),
        ("adaptformer", {"scale": 0}, r"scale=0"),
        ("partial", {"k": 0}, r"k=0"),
        ("lora", {"rank": 4}, r"unknown option\(s\) rank; valid options: r, alpha, dropout, targets"),
    ],
)
def test_invalid_hyper_parameters(name, kwargs, pattern):
    with pytest.raises(vpeft.ConfigError, match=pattern):
        vpeft.apply(vit(), name, **kwargs)


def test_partial_k_larger_than_depth():
    with pytest.raises(vpeft.ConfigError, match=r"k=7 exceeds the backbone's 3 blocks; use 1..3"):
        vpeft.apply(vit(), "partial", k=7)


def test_apply_twice_is_refused():
    model = vit()
    vpeft.apply(model, "lora")
    with pytest.raises(vpeft.ConfigError, match="already has method 'lora'"):
        vpeft.apply(model, "bitfit")


def test_model_without_head_has_nothing_to_train_for_linear_probe():
    model = vit()
    model.reset_classifier(0)
    with pytest.raises(vpeft.ConfigError, match="no classification head"):
        vpeft.apply(model, "linear")


def test_unsupported_backbone_class():
    with pytest.raises(vpeft.UnsupportedBackboneError, match="supported families: timm_vit, timm_efficientnet"):
        vpeft.apply(torch.nn.Sequential(torch.nn.Linear(2, 2)), "lora")


def test_config_object_dict_and_name_are_equivalent():
    a, b, c = vit(), vit(), vit()
    ra = vpeft.apply(a, vpeft.LoRAConfig(r=4))
    rb = vpeft.apply(b, {"method": "lora", "r": 4})
    rc = vpeft.apply(c, "lora", r=4)
    assert ra.trainable == rb.trainable == rc.trainable


def test_lora_on_fused_qkv_leaves_k_untouched():
    model = vit()
    vpeft.apply(model, "lora", targets=["q", "v"])
    layer = model.blocks[0].attn.qkv
    assert isinstance(layer, LoRALinear)
    d = layer.base_layer.out_features // 3
    with torch.no_grad():
        for b in layer.lora_B:
            b.normal_()
        x = torch.randn(2, 5, layer.base_layer.in_features)
        delta = layer(x) - layer.base_layer(x)
    assert delta[..., d : 2 * d].abs().max() == 0, "k slice unchanged"
    assert delta[..., :d].abs().max() > 0 and delta[..., 2 * d :].abs().max() > 0


def test_lora_qkv_shorthand_expands():
    assert vpeft.LoRAConfig(targets="qkv").targets == ("q", "k", "v")


def test_vpt_deep_token_layout():
    model = vit()  # 1 class + 4 register tokens
    vpeft.apply(model, "vpt_deep", num_tokens=3, dropout=0.0)
    seen = []
    for blk in model.blocks:
        assert isinstance(blk, PromptedBlock)
        blk.base_layer.register_forward_hook(lambda m, i, o: seen.append(i[0]))
    feats = model.forward_features(batch(28, n=2))
    n_patches = (28 // 14) ** 2
    assert feats.shape[1] == 5 + n_patches, "prompts are stripped after the last block"
    for i, (x, blk) in enumerate(zip(seen, model.blocks)):
        assert x.shape[1] == 5 + 3 + n_patches
        torch.testing.assert_close(x[0, 5:8], blk.prompt, msg=f"block {i} sees its own prompts after the prefix tokens")


def test_vpt_shallow_inserts_once():
    model = vit()
    vpeft.apply(model, "vpt_shallow", num_tokens=2)
    prompted = [b for b in model.blocks if isinstance(b, PromptedBlock)]
    assert prompted[0].prompt is not None and prompted[-1].prompt is None and prompted[-1].strip
    assert sum(p.numel() for b in prompted for _, p in b.delta_parameters()) == 2 * 32


def test_report_counts_and_string():
    rep = vpeft.apply(vit(), "lora")
    assert rep.by_kind["LoRALinear"] == rep.method_params
    assert "lora: trainable" in str(rep) and rep.percent > 0
    assert rep.to_dict()["method_params"] == rep.method_params


def test_merge_twice_and_unmerge_without_merge():
    model = vit()
    vpeft.apply(model, "lora")
    with pytest.raises(vpeft.ConfigError, match="not merged"):
        vpeft.unmerge(model)
    vpeft.merge(model)
    with pytest.raises(vpeft.ConfigError, match="already merged"):
        vpeft.merge(model)


def test_merge_without_keeping_originals_cannot_unmerge():
    model = vit()
    vpeft.apply(model, "ssf")
    vpeft.merge(model, keep_original=False)
    with pytest.raises(vpeft.ConfigError, match="keep_original=False"):
        vpeft.unmerge(model)


def test_save_refuses_merged_and_save_merged_writes_plain_state(tmp_path):
    from safetensors.torch import load_file

    model = vit()
    vpeft.apply(model, "lora")
    vpeft.merge(model)
    with pytest.raises(vpeft.CheckpointError, match="unmerge"):
        vpeft.save(model, tmp_path / "d.safetensors")
    path = vpeft.save_merged(model, tmp_path / "merged.safetensors")
    plain = vit()
    plain.load_state_dict(load_file(path))
    x = batch(28)
    with torch.no_grad():
        torch.testing.assert_close(plain(x), model(x))


# ---- checkpoints -----------------------------------------------------------------------------------------
def _saved(tmp_path, name="lora"):
    model = vit()
    vpeft.apply(model, name)
    return vpeft.save(model, tmp_path / "delta.safetensors")


def test_load_onto_other_backbone_fails(tmp_path):
    path = _saved(tmp_path)
    other = TINY_BACKBONES["vit_cls"][0]()
    with pytest.raises(
        vpeft.CheckpointError, match=r"trained on backbone 'vit_small_patch14_reg4_dinov2', not 'vit_tiny"
    ):
        vpeft.load(other, path)


def test_load_onto_other_weights_of_same_architecture_fails(tmp_path):
    path = _saved(tmp_path)
    other = vit()
    with torch.no_grad():
        other.blocks[0].attn.qkv.weight.add_(1.0)
    with pytest.raises(vpeft.CheckpointError, match="belongs to other weights"):
        vpeft.load(other, path)
    assert not vpeft.is_adapted(other), "a refused load leaves the model untouched"


def test_load_with_other_head_size_fails(tmp_path):
    path = _saved(tmp_path)
    other = vit()
    other.reset_classifier(7)
    with pytest.raises(vpeft.CheckpointError, match="another number of classes"):
        vpeft.load(other, path)


def test_truncated_checkpoint(tmp_path):
    path = _saved(tmp_path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(vpeft.CheckpointError, match="truncated or not a safetensors file"):
        vpeft.load(vit(), path)


def test_missing_and_foreign_checkpoints(tmp_path):
    with pytest.raises(vpeft.CheckpointError, match="does not exist"):
        vpeft.load(vit(), tmp_path / "nope.safetensors")
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(1)}, tmp_path / "other.safetensors")
    with pytest.raises(vpeft.CheckpointError, match="not a vpeft delta"):
        vpeft.load(vit(), tmp_path / "other.safetensors")


def test_failed_save_leaves_no_partial_file(tmp_path, monkeypatch):
    import safetensors.torch

    model = vit()
    vpeft.apply(model, "lora")

    def boom(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        vpeft.save(model, tmp_path / "delta.safetensors")
    assert list(tmp_path.iterdir()) == []


# ---- composition -------------------------------------------------------------------------------------------
def test_compose_conflict_is_refused_and_model_untouched():
    model = vit()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(vpeft.ConfigError, match=r"'adaptformer' and 'adapter' both wrap blocks.0.mlp"):
        vpeft.apply(model, "compose", methods=["adapter", "adaptformer"])
    assert not vpeft.is_adapted(model)
    assert [n for n, _ in model.named_parameters()] == list(before), "no wrapper left behind"
    assert all(p.requires_grad for p in model.parameters())


def test_compose_parts_see_each_other_through_wrappers():
    model = vit()
    vpeft.apply(model, "compose", methods=["vpt_deep", {"method": "lora", "targets": ["q", "v", "fc1"]}, "adapter"])
    blk = model.blocks[0]
    assert isinstance(blk, PromptedBlock)
    assert isinstance(blk.base_layer.attn.qkv, LoRALinear)
    assert isinstance(blk.base_layer.mlp.base_layer.fc1, LoRALinear), "LoRA inside the adapter-wrapped MLP"


@pytest.mark.parametrize(
    "methods,pattern",
    [([], r"methods=\[\] is invalid"), (["compose"], "may not contain another"), (["lora", "full"], "'full'")],
)
def test_compose_bad_config(methods, pattern):
    with pytest.raises(vpeft.ConfigError, match=pattern):
        vpeft.apply(vit(), "compose", methods=methods)
