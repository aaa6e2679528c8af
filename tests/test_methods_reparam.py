"""Method-specific checks for the partial-based methods: DiffFit, attention-only, DoRA, IA3, FacT, KronA,
RepAdapter. The shared contract (tests/test_contract.py) covers their defaults; here the maths of each
method is checked against a direct formula, and non-default options run through the contract bodies."""

from __future__ import annotations

import pytest
import test_contract as contract
import timm
import torch
from tiny import NUM_CLASSES, TINY_BACKBONES, batch
from torch import nn

import vpeft
from vpeft.layers.dora import DoRALinear
from vpeft.layers.fact import FacTLinear, FacTTKLinear
from vpeft.layers.kron import KronALinear
from vpeft.layers.repadapter import LinearGroupAdapter, RepAdapterLinear
from vpeft.layers.scaling import InputScale, OutputScale


def vit(name: str = "vit_cls") -> nn.Module:
    return TINY_BACKBONES[name][0]()


def randomise(module: nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)


# ---- non-default options through the shared contract ---------------------------------------------------------
OPTION_CASES = [
    ("dora", {"r": 2, "targets": ["qkv", "proj", "fc1", "fc2"], "detach_norm": False}),
    ("ia3", {"targets": ["q", "v"]}),
    ("fact_tt", {"rank": 4, "scale": 10.0, "dropout": 0.0}),
    ("fact_tk", {"rank": 8, "scale": 0.1}),
    ("krona", {"a_shape": [8, 4], "targets": ["qkv", "fc1", "fc2"], "scale": 2.0}),
    ("repadapter", {"placement": "attn", "dim": 4, "groups": 4, "scale": 5.0, "dropout": 0.0}),
]
OPTION_MATRIX = [
    pytest.param(case, bb, id=f"{contract.case_id(case)}@{bb}")
    for case in OPTION_CASES
    for bb in ("vit_cls", "vit_reg_ls")
]
CONTRACT = (
    "test_trainable_set",
    "test_identity_at_init",
    "test_every_trainable_tensor_gets_a_gradient",
    "test_merge_unmerge",
)


@pytest.mark.parametrize("body", CONTRACT)
@pytest.mark.parametrize("case,bb", OPTION_MATRIX)
def test_option_cases_pass_the_contract(case, bb, body):
    getattr(contract, body)(case, bb)


@pytest.mark.parametrize("case", OPTION_CASES, ids=[contract.case_id(c) for c in OPTION_CASES])
def test_option_cases_round_trip(case, tmp_path):
    contract.test_config_json_round_trip(case)
    contract.test_delta_save_load_round_trip(case, "vit_reg_ls", tmp_path)


@pytest.mark.parametrize(
    "name,kwargs,pattern",
    [
        ("fact_tt", {"rank": 0}, r"fact_tt: rank=0 is invalid; expected an integer >= 1"),
        ("fact_tk", {"scale": 0}, r"fact_tk: scale=0 is invalid"),
        ("krona", {"a_shape": [5, 4]}, r"krona: a_shape=\[5, 4\] does not tile"),
        ("krona", {"a_shape": [4]}, r"krona: a_shape=\(4,\) is invalid; expected two integers"),
        ("repadapter", {"dim": 6, "groups": 4}, r"repadapter: groups=4 must divide dim=6"),
        ("repadapter", {"placement": "mlp"}, r"placement='mlp' is invalid; valid options: block, attn"),
        ("ia3", {"targets": ["k", "o"]}, r"ia3: targets=\['k', 'o'\] is invalid \(unknown 'o'\)"),
        ("dora", {"detach_norm": "yes"}, r"dora: detach_norm='yes' is invalid"),
    ],
)
def test_invalid_options(name, kwargs, pattern):
    with pytest.raises(vpeft.ConfigError, match=pattern):
        vpeft.apply(vit(), name, **kwargs)


# ---- DoRA ---------------------------------------------------------------------------------------------------
def test_dora_matches_the_direct_formula_and_leaves_k_alone():
    torch.manual_seed(0)
    base = nn.Linear(16, 48)
    layer = DoRALinear(base, r=4, alpha=8.0, slices=[(0, 16), (32, 48)])
    for (start, stop), m in zip(layer.slices, layer.magnitude):
        torch.testing.assert_close(m, base.weight[start:stop].norm(dim=1), rtol=0, atol=0)  # m = ||W0||_c
    randomise(layer)
    x = torch.randn(3, 5, 16)
    w = base.weight.detach().clone()
    for (start, stop), a, b, m in zip(layer.slices, layer.lora_A, layer.lora_B, layer.magnitude):
        v = w[start:stop] + (b @ a) * 2.0  # W0 + (alpha / r) B A
        w[start:stop] = m.unsqueeze(1) * v / v.norm(dim=1, keepdim=True)  # column-wise norm: per output row
    with torch.no_grad():
        torch.testing.assert_close(layer(x), nn.functional.linear(x, w, base.bias), rtol=1e-5, atol=1e-6)
        assert torch.equal(layer(x)[..., 16:32], base(x)[..., 16:32]), "k slice is the frozen layer's"
        layer.merge_into_base()
    torch.testing.assert_close(base.weight, w, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("detach", [True, False])
def test_dora_norm_is_detached_from_the_graph_when_asked(detach):
    torch.manual_seed(0)
    layer = DoRALinear(nn.Linear(8, 8).requires_grad_(False), r=2, alpha=2.0, detach_norm=detach)
    randomise(layer)
    x = torch.randn(4, 8)
    layer(x).pow(2).sum().backward()
    got = [p.grad.clone() for p in (layer.lora_A[0], layer.lora_B[0], layer.magnitude[0])]
    layer.zero_grad()
    a, b, m, w0 = layer.lora_A[0], layer.lora_B[0], layer.magnitude[0], layer.base_layer.weight
    v = w0 + b @ a
    n = v.norm(dim=1, keepdim=True)
    w = m.unsqueeze(1) * v / (n.detach() if detach else n)
    nn.functional.linear(x, w, layer.base_layer.bias).pow(2).sum().backward()
    for g, p in zip(got, (a, b, m)):
        torch.testing.assert_close(g, p.grad, rtol=1e-4, atol=1e-6)


def test_dora_magnitude_covers_q_and_v_rows_only():
    model = vit()
    rep = vpeft.apply(model, "dora")
    layer = model.blocks[0].attn.qkv
    d = layer.base_layer.in_features
    assert [tuple(m.shape) for m in layer.magnitude] == [(d,), (d,)]
    assert rep.method_params == 2 * len(model.blocks) * (2 * 8 * d + d)


# ---- IA3 ----------------------------------------------------------------------------------------------------
def test_ia3_scales_k_and_v_slices_and_the_ffn_hidden_only():
    model = vit()
    vpeft.apply(model, "ia3")
    qkv, fc2 = model.blocks[0].attn.qkv, model.blocks[0].mlp.fc2
    assert isinstance(qkv, OutputScale) and isinstance(fc2, InputScale)
    randomise(model)
    d = qkv.base_layer.in_features
    x = torch.randn(2, 5, d)
    with torch.no_grad():
        y, ref = qkv(x), qkv.base_layer(x)
        torch.testing.assert_close(y[..., :d], ref[..., :d], rtol=0, atol=0)
        torch.testing.assert_close(y[..., d : 2 * d], ref[..., d : 2 * d] * qkv.scales[0])
        torch.testing.assert_close(y[..., 2 * d :], ref[..., 2 * d :] * qkv.scales[1])
        h = torch.randn(2, 5, fc2.base_layer.in_features)
        torch.testing.assert_close(fc2(h), fc2.base_layer(h * fc2.scale))
    assert not any(isinstance(m, (OutputScale, InputScale)) for m in model.blocks[0].mlp.fc1.modules())


# ---- DiffFit ------------------------------------------------------------------------------------------------
def test_difffit_gammas_scale_the_residual_branches():
    model = vit("vit_reg_ls")
    vpeft.apply(model, "difffit")
    x = model.patch_embed(batch(28, n=2))
    x = model._pos_embed(x)
    with torch.no_grad():
        for blk in model.blocks:
            for layer in (blk.attn.proj, blk.mlp.fc2):
                layer.scales[0].zero_()
        assert torch.equal(model.blocks(x), x), "gamma = 0 switches every residual branch off"
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "blocks.0.norm1.weight" in trainable and "blocks.0.attn.qkv.bias" in trainable
    assert "blocks.0.attn.proj.base_layer.bias" in trainable and "blocks.0.attn.qkv.weight" not in trainable
    assert "blocks.0.ls1.gamma" not in trainable, "LayerScale is not a bias or a norm"


# ---- attention-only -----------------------------------------------------------------------------------------
def test_attention_only_trains_qkv_and_proj():
    model = vit()
    vpeft.apply(model, "attention_only")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad} - {"head.weight", "head.bias"}
    expected = {
        f"blocks.{i}.attn.{m}.{p}"
        for i in range(len(model.blocks))
        for m in ("qkv", "proj")
        for p in ("weight", "bias")
    }
    assert trainable == expected


# ---- FacT ---------------------------------------------------------------------------------------------------
def _tiny_vit(depth: int) -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model(
        "vit_tiny_patch16_224",
        pretrained=False,
        img_size=32,
        patch_size=8,
        embed_dim=32,
        depth=depth,
        num_heads=2,
        mlp_ratio=2,
        num_classes=NUM_CLASSES,
    )


@pytest.mark.parametrize("name,rank", [("fact_tt", 4), ("fact_tk", 8)])
def test_fact_factors_are_one_shared_set(name, rank, tmp_path):
    counts = {}
    for depth in (2, 4):
        model = _tiny_vit(depth)
        counts[depth] = vpeft.apply(model, name, rank=rank).method_params
        layers = [m for m in model.modules() if isinstance(m, FacTLinear)]
        assert len(layers) == 4 * depth
        assert all(m.factors is layers[0].factors for m in layers), "one factors module, referenced everywhere"
        assert [m.owns_factors for m in layers].count(True) == 1
    # slices per block: q, k, v, o + 2 of fc1 + 2 of fc2 (mlp_ratio 2) = 8; U and V (2 * 32 r) are paid once
    per_block = 8 * rank * rank if name == "fact_tt" else 8 * rank  # TT: one r x r core per slice; TK: one row of P
    shared = 2 * 32 * rank + (rank**3 if name == "fact_tk" else 0)
    assert counts[2] == shared + 2 * per_block and counts[4] == shared + 4 * per_block
    path = vpeft.save(model, tmp_path / "d.safetensors")
    _, tensors = vpeft.api.read_delta(path)
    assert sum(k.endswith("factors.u") for k in tensors) == 1, "the shared tensor is stored once"
    assert sum(t.numel() for k, t in tensors.items() if not k.startswith("head.")) == counts[4]


def test_fact_tk_increments_are_the_tucker_slices():
    model = vit()
    vpeft.apply(model, "fact_tk", rank=4, scale=3.0)
    randomise(model)
    layers = [m for m in model.modules() if isinstance(m, FacTTKLinear)]
    f = layers[0].factors
    d = f.dim
    with torch.no_grad():
        # the 12L-style tensor: every d x d slice of every adapted weight, in P's row order
        slices = torch.cat(
            [
                m.delta_weight().reshape(m.out_blocks, d, m.in_blocks, d).permute(0, 2, 1, 3).reshape(-1, d, d)
                for m in layers
            ]
        )
        tucker = torch.einsum("or,rsk,mk,se->moe", f.v, f.core, f.p, f.u) * 3.0  # C x1 V x2 U^T x3 P
    assert slices.shape[0] == f.p.shape[0]
    torch.testing.assert_close(slices, tucker, rtol=1e-4, atol=1e-6)


def test_fact_forward_equals_dense_increment():
    model = vit()
    vpeft.apply(model, "fact_tt", dropout=0.0)
    randomise(model)
    fc2 = model.blocks[1].mlp.fc2
    x = torch.randn(3, fc2.base_layer.in_features)
    with torch.no_grad():
        torch.testing.assert_close(fc2(x), fc2.base_layer(x) + x @ fc2.delta_weight().T, rtol=1e-5, atol=1e-6)


# ---- KronA --------------------------------------------------------------------------------------------------
def test_krona_update_is_a_kronecker_product_on_q_and_v():
    model = vit()
    vpeft.apply(model, "krona", a_shape=[4, 8])
    layer = model.blocks[0].attn.qkv
    assert isinstance(layer, KronALinear) and layer.slices == [(0, 32), (64, 96)]
    assert [tuple(b.shape) for b in layer.kron_B] == [(8, 4), (8, 4)]
    randomise(model)
    x = torch.randn(5, 32)
    with torch.no_grad():
        delta = layer(x) - layer.base_layer(x)
        torch.testing.assert_close(delta[:, :32], x @ torch.kron(layer.kron_A[0], layer.kron_B[0]).T)
        torch.testing.assert_close(delta[:, 64:], x @ torch.kron(layer.kron_A[1], layer.kron_B[1]).T)
        assert delta[:, 32:64].abs().max() == 0


# ---- RepAdapter ---------------------------------------------------------------------------------------------
def test_repadapter_group_wise_up_projection_is_conv_b():
    torch.manual_seed(0)
    adapter = LinearGroupAdapter(16, 8, groups=2, scale=1.0)
    randomise(adapter)
    conv = nn.Conv1d(8, 16, 1, groups=2)
    with torch.no_grad():
        conv.weight.copy_(adapter.up_weight.unsqueeze(-1))
        conv.bias.copy_(adapter.up_bias)
        h = torch.randn(3, 7, 8)
        torch.testing.assert_close(adapter.up(h), conv(h.transpose(1, 2)).transpose(1, 2))
        dense = adapter.dense_up()
        assert dense[:8, 4:].abs().max() == 0 and dense[8:, :4].abs().max() == 0, "block diagonal"


def test_repadapter_merges_into_the_next_linear():
    model = vit()
    vpeft.apply(model, "repadapter", scale=10.0)
    blk = model.blocks[0]
    assert isinstance(blk.attn.qkv, RepAdapterLinear) and isinstance(blk.mlp.fc1, RepAdapterLinear)
    randomise(model)
    norm1_before = blk.norm1.weight.detach().clone()
    qkv_before = blk.attn.qkv.base_layer.weight.detach().clone()
    x = batch(32)
    with torch.no_grad():
        out = model.eval()(x)
        h = torch.randn(2, 5, 32)
        adapted = blk.attn.qkv(h)
        vpeft.merge(model)
        assert type(blk.attn.qkv) is nn.Linear and type(blk.mlp.fc1) is nn.Linear
        assert not torch.equal(blk.attn.qkv.weight, qkv_before), "the adapter went into qkv"
        assert torch.equal(blk.norm1.weight, norm1_before), "nothing else changed"
        torch.testing.assert_close(blk.attn.qkv(h), adapted, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(model(x), out, rtol=1e-4, atol=1e-5)


# ---- SSF's autograd function --------------------------------------------------------------------------------
@pytest.mark.parametrize("base", ["linear", "conv", "layernorm"])
@pytest.mark.parametrize("tiny_scale", [False, True])
def test_ssf_function_matches_autograd_of_the_formula(base, tiny_scale):
    """Same output and gradients as ``y * gamma + beta``; with a near-zero gamma it saves ``y`` instead."""
    from vpeft.layers import ScaleShift

    torch.manual_seed(0)
    layer, x = {
        "linear": (nn.Linear(6, 5), torch.randn(3, 4, 6)),
        "conv": (nn.Conv2d(3, 5, 3, padding=1), torch.randn(2, 3, 4, 4)),
        "layernorm": (nn.LayerNorm(5), torch.randn(3, 4, 5)),
    }[base]
    layer = layer.double().requires_grad_(False)
    wrapper = ScaleShift(layer).double()
    with torch.no_grad():
        wrapper.shift.normal_()
        if tiny_scale:
            wrapper.scale[0] = 1e-5
    x = x.double().requires_grad_(True)
    shape = [1, -1, 1, 1] if base == "conv" else [-1]
    ref = layer(x) * wrapper.scale.view(shape) + wrapper.shift.view(shape)
    out = wrapper(x)
    torch.testing.assert_close(out, ref)
    g = torch.randn_like(ref)
    want = torch.autograd.grad(ref, (x, wrapper.scale, wrapper.shift), g)
    got = torch.autograd.grad(out, (x, wrapper.scale, wrapper.shift), g)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)
    assert torch.autograd.gradcheck(lambda inp, s, b: wrapper.forward(inp), (x, wrapper.scale, wrapper.shift))


def test_ssf_saves_no_second_copy_of_the_activation():
    """After a Linear, SSF's saved tensor is its own output, which the next layer (GELU) saves too."""
    from vpeft.layers import ScaleShift

    model = nn.Sequential(ScaleShift(nn.Linear(8, 8).requires_grad_(False)), nn.GELU())
    x = torch.randn(4, 8)
    storages = []

    def pack(t):
        storages.append(t.untyped_storage().data_ptr())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    activations = [s for s in storages if s not in params]
    assert len(activations) >= 2 and len(set(activations)) == 1, "SSF and GELU share one saved activation"
