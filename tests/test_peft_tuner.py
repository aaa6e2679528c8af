"""The peft_tuner bridge: PEFT's tuners through vpeft's trainable set, checkpoints and merge."""

from __future__ import annotations

import sys

import pytest
import torch
from tiny import TINY_BACKBONES, batch, forward
from torch import nn

import vpeft
from vpeft.api import read_delta
from vpeft.layers import Wrapper
from vpeft.methods.peft_tuner import PeftTunerConfig, PeftTunerLayer

peft = pytest.importorskip("peft")

TUNERS = [
    ({"peft_type": "LOHA", "r": 4, "alpha": 4}, ["qkv", "fc1"]),
    ({"peft_type": "LOKR", "r": 4, "alpha": 4}, ["qkv", "proj"]),
    ({"peft_type": "OFT", "r": 0, "oft_block_size": 8}, ["qkv", "fc2"]),
    ({"peft_type": "VERA", "r": 8}, ["fc1"]),  # shared random projections (PEFT's "shared state")
    ({"peft_type": "IA3", "feedforward_modules": []}, ["qkv"]),
    ({"peft_type": "LORA", "r": 4, "lora_alpha": 8}, ["qkv", "proj", "fc1", "fc2"]),
]


def fresh(bb: str = "vit_cls") -> nn.Module:
    return TINY_BACKBONES[bb][0]()


@pytest.mark.parametrize("peft_config,targets", TUNERS, ids=[t[0]["peft_type"] for t in TUNERS])
def test_tuner_through_vpeft(peft_config, targets, tmp_path):
    from peft.tuners.tuners_utils import BaseTunerLayer

    model, x = fresh(), batch(32)
    with torch.no_grad():
        ref = forward(model, x)
    rep = vpeft.apply(model, "peft_tuner", peft_config=peft_config, targets=targets)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, PeftTunerLayer)}
    assert layers and all(isinstance(m.tuner, BaseTunerLayer) for m in layers.values())
    expected = {f"{n}.{pn}" for n, m in layers.items() for pn, _ in m.delta_parameters()} | {"head.weight", "head.bias"}
    assert {n for n, p in model.named_parameters() if p.requires_grad} == expected, "PEFT's adapter tensors + head"
    assert rep.method_params == sum(p.numel() for n, p in model.named_parameters() if n in expected) - rep.head
    with torch.no_grad():
        torch.testing.assert_close(forward(model, x), ref, rtol=0, atol=1e-6)  # PEFT's identity init
        g = torch.Generator().manual_seed(0)
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
        out = forward(model.eval(), x)
    assert not torch.allclose(out, ref)
    path = vpeft.save(model, tmp_path / "delta.safetensors")
    assert set(read_delta(path)[1]) == expected
    back = fresh()
    vpeft.load(back, path)
    with torch.no_grad():
        assert torch.equal(forward(back.eval(), x), out)
    vpeft.merge(model)
    assert [type(m) for m in model.modules()] == [type(m) for m in fresh().modules()], "a plain timm model"
    with torch.no_grad():
        torch.testing.assert_close(forward(model, x), out, rtol=1e-4, atol=1e-5)
    vpeft.unmerge(model)
    with torch.no_grad():
        assert torch.equal(forward(model, x), out)


def test_config_is_peft_json_and_round_trips():
    cfg = PeftTunerConfig(peft_config={"r": 4, "peft_type": "LOKR"}, targets=["qkv"])
    assert cfg.to_dict() == {"method": "peft_tuner", "peft_config": {"peft_type": "LOKR", "r": 4}, "targets": ["qkv"]}
    assert vpeft.MethodConfig.from_json(cfg.to_json()) == cfg
    with pytest.raises(vpeft.ConfigError, match="peft_type"):
        PeftTunerConfig(peft_config={"r": 4})
    with pytest.raises(vpeft.ConfigError, match="targets"):
        PeftTunerConfig(targets=["mlp"])


def test_roles_resolve_to_exact_modules_on_every_kind():
    model = fresh()
    vpeft.apply(model, "peft_tuner", targets=["proj"])
    assert not isinstance(model.patch_embed.proj, Wrapper), "PEFT's suffix match would also hit patch_embed.proj"
    assert isinstance(model.blocks[0].attn.proj, PeftTunerLayer)
    hf = fresh("hf_vit")
    vpeft.apply(hf, "peft_tuner")  # qkv -> the separate q, k, v projections
    attn = hf.vit.layers[0].attention
    assert all(isinstance(getattr(attn, n), PeftTunerLayer) for n in ("q_proj", "k_proj", "v_proj"))
    with pytest.raises(vpeft.UnsupportedBackboneError, match=r"no 'q' layers.*use 'qkv'"):
        vpeft.apply(fresh(), "peft_tuner", targets=["q"])
    with pytest.raises(vpeft.UnsupportedBackboneError, match=r"peft_tuner: timm_efficientnet has no 'qkv'"):
        vpeft.apply(fresh("cnn_effnet"), "peft_tuner")
    cnn = fresh("cnn_effnet")
    rep = vpeft.apply(cnn, "peft_tuner", peft_config={"peft_type": "LOHA", "r": 2}, targets=["pw"])
    assert rep.adapted and all(isinstance(cnn.get_submodule(n), PeftTunerLayer) for n in rep.adapted)


def test_bad_tuner_configs_fail_clearly():
    with pytest.raises(vpeft.ConfigError, match="PEFT rejects"):
        vpeft.apply(fresh(), "peft_tuner", peft_config={"peft_type": "LOHA", "rank": 4})
    with pytest.raises(vpeft.ConfigError, match="prompt-learning"):
        vpeft.apply(fresh(), "peft_tuner", peft_config={"peft_type": "PROMPT_TUNING", "num_virtual_tokens": 4})


def test_without_peft_the_method_imports_and_apply_explains(monkeypatch):
    monkeypatch.setitem(sys.modules, "peft", None)  # `import peft` now raises ImportError
    cfg = PeftTunerConfig()
    model = fresh()
    with pytest.raises(vpeft.ConfigError, match=r"needs Hugging Face PEFT: pip install 'vpeft\[interop\]'"):
        vpeft.apply(model, cfg)
    assert not vpeft.is_adapted(model)
