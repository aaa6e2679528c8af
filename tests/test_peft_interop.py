"""vpeft LoRA/DoRA deltas <-> Hugging Face PEFT adapter directories, checked against ``peft`` itself."""

from __future__ import annotations

import json

import pytest
import torch
from tiny import TINY_BACKBONES, batch

import vpeft
from vpeft.interop import export_peft, import_peft
from vpeft.interop.peft import CONFIG_NAME, PREFIX, WEIGHTS_NAME, read_peft
from vpeft.state import state_of

peft = pytest.importorskip("peft")

ALL = ["qkv", "proj", "fc1", "fc2"]
# PEFT matches target names by suffix: "proj" alone would also hit timm's patch_embed.proj (a Conv2d)
PEFT_TARGETS = r"blocks\.\d+\.(attn\.(qkv|proj)|mlp\.(fc1|fc2))"


def fresh(bb: str = "vit_cls"):
    return TINY_BACKBONES[bb][0]()


def randomise(model, seed: int = 3, std: float = 0.1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * std)


def outputs(model, bb: str = "vit_cls") -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(batch(TINY_BACKBONES[bb][1]))


def vpeft_model(method: str, bb: str = "vit_cls", **kwargs):
    model = fresh(bb)
    vpeft.apply(model, method, **kwargs)
    randomise(model)
    return model


def peft_load(directory, bb: str = "vit_cls"):
    return peft.PeftModel.from_pretrained(fresh(bb), str(directory))


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_export_loads_in_peft_with_the_same_outputs(method, tmp_path):
    model = vpeft_model(method, r=2, alpha=4.0, targets=ALL)
    expected = outputs(model)
    out = export_peft(model, tmp_path / "adapter")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"], "no temporary directory left behind"
    assert sorted(p.name for p in out.iterdir()) == [CONFIG_NAME, WEIGHTS_NAME]
    cfg = json.loads((out / CONFIG_NAME).read_text())
    assert cfg["peft_type"] == "LORA" and cfg["use_dora"] == (method == "dora") and cfg["modules_to_save"] == ["head"]
    assert cfg["r"] == 2 and cfg["lora_alpha"] == 4  # proj/fc1/fc2; the fused q,k,v: rank 6, alpha 12
    assert set(cfg["rank_pattern"].values()) == {6} and set(cfg["alpha_pattern"].values()) == {12}
    _, tensors, _ = read_peft(out)
    assert f"{PREFIX}blocks.0.attn.qkv.lora_A.weight" in tensors and f"{PREFIX}head.weight" in tensors
    got = outputs(peft_load(out))
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    assert not torch.allclose(expected, outputs(fresh())), "the delta changes the outputs"


def test_qv_only_on_fused_qkv_has_no_peft_equivalent(tmp_path):
    model = vpeft_model("lora")  # paper default: q and v slices of timm's fused qkv
    with pytest.raises(vpeft.ConfigError, match=r"no PEFT equivalent.*targets \['qkv'\].*pad_fused=True"):
        export_peft(model, tmp_path / "adapter")
    assert not (tmp_path / "adapter").exists()


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_padded_qv_export_matches_peft_and_round_trips(method, tmp_path):
    model = vpeft_model(method, targets=["q", "v"])
    expected = outputs(model)
    out = export_peft(model, tmp_path / "adapter", pad_fused=True)
    torch.testing.assert_close(outputs(peft_load(out)), expected, rtol=0, atol=1e-5)
    back = fresh()
    import_peft(back, out)  # the vpeft metadata restores the q/v-only config
    assert state_of(back).config == state_of(model).config
    assert torch.equal(outputs(back), expected)


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_export_import_round_trip_is_exact(method, tmp_path):
    model = vpeft_model(method, r=2, alpha=4.0, targets=ALL)
    out = export_peft(model, tmp_path / "adapter")
    back = fresh()
    rep = import_peft(back, out)
    assert rep.trainable == vpeft.report(model).trainable
    assert torch.equal(outputs(back), outputs(model))
    export_peft(model, out)  # replaces the files of an existing adapter directory
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]


@pytest.mark.parametrize("use_dora", [False, True])
def test_a_peft_trained_adapter_imports_with_the_same_outputs(use_dora, tmp_path):
    cfg = peft.LoraConfig(
        r=4,
        lora_alpha=6,
        target_modules=PEFT_TARGETS,
        modules_to_save=["head"],
        use_dora=use_dora,
        use_rslora=True,
        alpha_pattern={"fc2": 3},
    )
    pm = peft.get_peft_model(fresh(), cfg)
    randomise(pm)  # PEFT marks exactly its adapter weights and the head copy trainable
    expected = outputs(pm)
    pm.save_pretrained(str(tmp_path / "adapter"))
    model = fresh()
    rep = import_peft(model, tmp_path / "adapter")
    state = state_of(model)
    assert state.config.method == ("dora" if use_dora else "lora")
    assert state.config.targets == ("q", "k", "v", "proj", "fc1", "fc2") and state.config.r == 4
    assert rep.trainable > 0
    torch.testing.assert_close(outputs(model), expected, rtol=0, atol=1e-5)


def test_import_refuses_what_vpeft_cannot_express(tmp_path):
    pm = peft.get_peft_model(fresh(), peft.LoraConfig(r=2, target_modules=[r"blocks.0.attn.qkv"]))
    pm.save_pretrained(str(tmp_path / "one_block"))
    with pytest.raises(vpeft.ConfigError, match=r"adapts 1 of the 2 'qkv' layers"):
        import_peft(fresh(), tmp_path / "one_block")
    pm = peft.get_peft_model(fresh(), peft.LoHaConfig(r=2, target_modules=["qkv"]))
    pm.save_pretrained(str(tmp_path / "loha"))
    model = fresh()
    with pytest.raises(vpeft.ConfigError, match=r"LOHA adapter.*'peft_tuner'"):
        import_peft(model, tmp_path / "loha")
    assert not vpeft.is_adapted(model)
    with pytest.raises(vpeft.CheckpointError, match="not a PEFT adapter directory"):
        import_peft(fresh(), tmp_path)


def test_import_refuses_another_backbones_export(tmp_path):
    model = vpeft_model("lora", targets=ALL)
    out = export_peft(model, tmp_path / "adapter")
    other = fresh()
    with torch.no_grad():
        other.blocks[0].mlp.fc1.weight.mul_(2)
    with pytest.raises(vpeft.CheckpointError, match="other weights"):
        import_peft(other, out)
    assert not vpeft.is_adapted(other)


def test_export_refuses_other_methods(tmp_path):
    model = fresh()
    vpeft.apply(model, "bitfit")
    with pytest.raises(vpeft.ConfigError, match="lora and dora.*'peft_tuner'"):
        export_peft(model, tmp_path / "adapter")


@pytest.mark.parametrize("bb", ["cnn_effnet", "cnn_convnext"])
def test_conv_lora_exports_to_peft_and_back(bb, tmp_path):
    model = vpeft_model("lora", bb, r=2, targets=["pw", "kxk"])
    expected = outputs(model, bb)
    out = export_peft(model, tmp_path / "adapter")
    _, tensors, _ = read_peft(out)
    assert any(t.ndim == 4 for t in tensors.values()), "conv LoRA pairs are stored as conv kernels"
    torch.testing.assert_close(outputs(peft_load(out, bb), bb), expected, rtol=0, atol=1e-5)
    back = fresh(bb)
    import_peft(back, out)
    assert torch.equal(outputs(back, bb), expected)
