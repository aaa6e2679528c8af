"""CNN specifics: ConvNeXt spec, LoRA on convolutions, SSF with frozen BatchNorm."""

from __future__ import annotations

import pytest
import torch
from tiny import TINY_BACKBONES, batch
from torch import nn

import vpeft
from vpeft.arch import get_spec
from vpeft.layers import FrozenStatsNorm, ScaleShift
from vpeft.layers.lora_conv import LoRAConv2d


def fresh(bb: str):
    return TINY_BACKBONES[bb][0]()


def test_convnext_spec_spans_all_stages():
    model = fresh("cnn_convnext")
    spec = get_spec(model)
    assert spec.family == "timm_convnext" and spec.kind == "cnn"
    assert spec.blocks == ("stages.0.blocks.0", "stages.1.blocks.0", "stages.2.blocks.0", "stages.3.blocks.0")
    assert spec.head == "head.fc" and spec.post_blocks == ("head.norm",) and spec.stem == ("stem",)
    assert spec.embed_dim == model.num_features


@pytest.mark.parametrize("bb", ["cnn_effnet", "cnn_convnext"])
def test_conv_lora_skips_grouped_convs_and_adapts_the_rest(bb):
    model = fresh(bb)
    convs = {n: m for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    rep = vpeft.apply(model, "lora", targets=["pw", "kxk"], r=2)
    modules = dict(model.named_modules())
    for name, conv in convs.items():
        wrapped = isinstance(modules[name], LoRAConv2d)
        assert wrapped == (conv.groups == 1), name
    assert any(c.groups > 1 for c in convs.values()), "the tiny backbone has depthwise convs to skip"
    assert rep.adapted and not any(n.startswith(get_spec(fresh(bb)).head) for n in rep.adapted)


def test_conv_lora_merges_strided_kxk_convs_exactly():
    torch.manual_seed(0)
    conv = nn.Conv2d(6, 8, kernel_size=3, stride=2, padding=1, dilation=1)
    layer = LoRAConv2d(conv, r=3, alpha=6.0)
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(2, 6, 9, 9)
    with torch.no_grad():
        y = layer(x)
        layer.merge_into_base()
        torch.testing.assert_close(conv(x), y, rtol=1e-5, atol=1e-5)
    with pytest.raises(TypeError, match="groups=1"):
        LoRAConv2d(nn.Conv2d(4, 4, 3, groups=4), r=2, alpha=2.0)


def test_lora_targets_must_fit_the_backbone_kind():
    with pytest.raises(vpeft.UnsupportedBackboneError, match=r"lora: targets \['q', 'v'\].*\['pw', 'kxk'\]"):
        vpeft.apply(fresh("cnn_effnet"), "lora")
    with pytest.raises(vpeft.UnsupportedBackboneError, match=r"lora: targets \['pw'\] do not exist on timm_vit"):
        vpeft.apply(fresh("vit_cls"), "lora", targets=["pw"])
    with pytest.raises(vpeft.ConfigError, match="dora: targets"):
        vpeft.apply(fresh("vit_cls"), "dora", targets=["pw"])


def test_ssf_on_efficientnet_leaves_frozen_batchnorm_alone_and_merges_into_convs():
    model = fresh("cnn_effnet")
    vpeft.apply(model, "ssf")
    modules = dict(model.named_modules())
    norms = [n for n, m in modules.items() if isinstance(m, FrozenStatsNorm)]
    assert norms and all(not isinstance(modules[n].base_layer, ScaleShift) for n in norms)
    wrapped = [m for m in modules.values() if isinstance(m, ScaleShift)]
    assert wrapped and all(isinstance(m.base_layer, nn.Conv2d) for m in wrapped)
    x = batch(32)
    with torch.no_grad():
        y = model.eval()(x)
    vpeft.merge(model)
    with torch.no_grad():
        torch.testing.assert_close(model(x), y, rtol=1e-4, atol=1e-5)


def test_ssf_on_convnext_scales_layernorm2d_per_channel():
    model = fresh("cnn_convnext")
    vpeft.apply(model, "ssf")
    stem_norm = model.stem[1]
    assert isinstance(stem_norm, ScaleShift) and stem_norm.channel_dim == 1
    assert isinstance(model.stages[0].blocks[0].norm, ScaleShift) and model.stages[0].blocks[0].norm.channel_dim == -1
