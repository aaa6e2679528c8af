"""Method-specific checks of the addition-based methods: Convpass, Mona, prefix, E2VPT, visual prompt, LST.

The shared contract (trainable set, save/load, merge refusal, ...) runs in test_contract.py; these
tests pin placement, initialisation and the behaviour each paper describes.
"""

from __future__ import annotations

import copy

import pytest
import torch
from tiny import TINY_BACKBONES, batch
from torch import nn

import vpeft
from vpeft.arch import attention_layout, get_spec
from vpeft.layers import PromptedBlock
from vpeft.layers.kv_prompt import KVPromptAttention, attention_with_kv
from vpeft.methods.convpass import ConvBypass
from vpeft.methods.lst import SideOutput, SideTap
from vpeft.methods.mona import MonaBlock, MonaNormTap
from vpeft.methods.prefix import PrefixAttention, fold
from vpeft.methods.visual_prompt import PaddingPrompt
from vpeft.state import state_of


def make(name: str) -> nn.Module:
    return TINY_BACKBONES[name][0]()


def size_of(name: str) -> int:
    return TINY_BACKBONES[name][1]


def _randomise(module: nn.Module, seed: int = 0, std: float = 0.5) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            if p.requires_grad:
                p.normal_(std=std, generator=g)


def _block_input(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(x))))


# ---- Convpass --------------------------------------------------------------------------------------------------
def test_convpass_wraps_attention_and_mlp_and_starts_as_official():
    model = make("vit_cls")
    vpeft.apply(model, "convpass")
    blk = model.blocks[0]
    assert isinstance(blk.attn, ConvBypass) and isinstance(blk.mlp, ConvBypass)
    branch = blk.attn.adapter
    centre = torch.zeros(8, 8, 3, 3)
    centre[:, :, 1, 1] = torch.eye(8)
    assert torch.equal(branch.conv.weight, centre), "3x3 kernel: identity at the centre, zero elsewhere"
    assert branch.up.weight.abs().sum() == 0 and branch.up.bias.abs().sum() == 0
    assert blk.attn.scale == 1.0

    attn_only = make("vit_cls")
    vpeft.apply(attn_only, "convpass", placement="attn", scale=10.0)
    assert isinstance(attn_only.blocks[0].attn, ConvBypass) and not isinstance(attn_only.blocks[0].mlp, ConvBypass)


def test_convpass_branch_is_a_3x3_conv_on_the_patch_grid():
    """Patch (r, c) sees only its 3x3 neighbourhood; the class/register tokens only themselves."""
    model = make("vit_cls")  # 1 class token, 4x4 grid
    vpeft.apply(model, "convpass", dropout=0.0)
    branch = model.blocks[0].mlp.adapter
    _randomise(branch)
    x = torch.randn(1, 1 + 16, 32)
    x2 = x.clone()
    x2[0, 1 + 0] += 1.0  # patch (0, 0)
    with torch.no_grad():
        diff = (branch(x2) - branch(x)).abs().sum(-1)[0]
    changed = {i for i in range(17) if diff[i] > 1e-6}
    # tokens: 0 = class; patch (r, c) = 1 + 4r + c. Neighbours of (0, 0): (0,0), (0,1), (1,0), (1,1).
    assert changed == {1, 2, 5, 6}


def test_convpass_output_is_sublayer_plus_scaled_branch():
    model = make("vit_cls")
    vpeft.apply(model, "convpass", scale=10.0, dropout=0.0)
    wrapper = model.blocks[1].attn
    _randomise(wrapper.adapter)
    x = torch.randn(2, 17, 32)
    with torch.no_grad():
        torch.testing.assert_close(wrapper(x), wrapper.base_layer(x) + 10.0 * wrapper.adapter(x))


@pytest.mark.parametrize("backbone", ["cnn_effnet", "cnn_convnext"])
def test_convpass_on_cnns_bypasses_every_block_with_its_output_shape(backbone):
    model = make(backbone).train()
    stats = [b.clone() for b in model.buffers()]
    spec = get_spec(model)
    vpeft.apply(model, "convpass", scale=10.0, dropout=0.0)
    assert all(m.training for m in model.modules())  # the train/eval flags are restored after the shape probe
    after = list(model.buffers())  # the probe ran in eval mode: no normalisation statistics moved
    assert len(after) == len(stats) and all(torch.equal(a, b) for a, b in zip(after, stats))
    wrappers = [model.get_submodule(n) for n in spec.blocks]
    assert all(isinstance(w, ConvBypass) for w in wrappers)
    strides = {w.adapter.conv.stride[0] for w in wrappers}
    widths = {(w.adapter.down.in_channels, w.adapter.up.out_channels) for w in wrappers}
    if backbone == "cnn_effnet":  # EfficientNet blocks downsample and change the width
        assert strides == {1, 2} and any(a != b for a, b in widths)
    x = torch.randn(2, 3, size_of(backbone), size_of(backbone))
    model.eval()
    for w in wrappers:
        _randomise(w.adapter, 3)
    feats = {}

    def keep(name):
        def hook(_module, args, output):
            feats[name] = (args[0], output)

        return hook

    hooks = [w.register_forward_hook(keep(n)) for n, w in zip(spec.blocks, wrappers)]
    with torch.no_grad():
        model(x)
        for h in hooks:
            h.remove()
        for n, w in zip(spec.blocks, wrappers):
            inp, out = feats[n]
            torch.testing.assert_close(out, w.base_layer(inp) + 10.0 * w.adapter(inp))


# ---- Mona ------------------------------------------------------------------------------------------------------
def test_mona_sits_after_each_residual_of_a_layer_scale_block():
    model = make("vit_reg_ls")
    vpeft.apply(model, "mona")
    block = model.blocks[1]
    assert isinstance(block, MonaBlock) and isinstance(block.base_layer.norm2, MonaNormTap)
    mona1, mona2 = block.base_layer.norm2.adapter, block.adapter
    assert torch.equal(mona1.gamma, torch.full((32,), 1e-6)) and torch.equal(mona1.gammax, torch.ones(32))
    model.eval().double()  # new modules start in training mode (dropout); float64: the sums run in another order
    _randomise(mona1, 1)
    _randomise(mona2, 2)
    raw = block.base_layer
    x = torch.randn(2, 5 + 4, 32, dtype=torch.float64)
    with torch.no_grad():
        h = x + raw.ls1(raw.attn(raw.norm1(x)))
        h = h + mona1(h)  # Mona(x) = x + update
        out = h + raw.ls2(raw.mlp(raw.norm2.base_layer(h)))
        out = out + mona2(out)
        torch.testing.assert_close(block(x), out)


def test_mona_multiscale_conv_sees_a_7x7_neighbourhood():
    model = make("vit_cls")
    vpeft.apply(model, "mona", dropout=0.0)
    adapter = model.blocks[0].adapter
    x = torch.randn(1, 17, 32)
    x2 = x.clone()
    x2[0, 1] += 1.0  # patch (0, 0) of the 4x4 grid
    with torch.no_grad():
        diff = (adapter(x2) - adapter(x)).abs().sum(-1)[0]
    assert diff[0] == 0, "the class token is a 1x1 image of its own"
    assert (diff[1:] > 0).all(), "a 7x7 kernel reaches the whole 4x4 grid"


# ---- key/value prompts (prefix, E2VPT) ---------------------------------------------------------------------------
@pytest.mark.parametrize("bb", ["vit_cls", "vit_reg_ls", "vit_avg"])
def test_attention_recomputation_matches_timm(bb):
    model = make(bb)
    spec = get_spec(model)
    attn, layout = model.blocks[0].attn, attention_layout(model, spec, spec.parts[0])
    x = torch.randn(2, 7, 32)
    empty = torch.zeros(attn.num_heads, 0, 32 // attn.num_heads)
    with torch.no_grad():
        torch.testing.assert_close(attention_with_kv(attn, layout, x, empty, empty), attn(x), rtol=1e-6, atol=1e-6)


def test_prefix_attention_matches_a_softmax_over_prefix_and_tokens():
    model = make("vit_cls")
    vpeft.apply(model, "prefix", num_tokens=3)
    layer = model.blocks[0].attn
    assert isinstance(layer, PrefixAttention) and layer.key.shape == (2, 3, 16)
    attn, x = layer.base_layer, torch.randn(2, 17, 32)
    q, k, v = attn.qkv(x).reshape(2, 17, 3, 2, 16).permute(2, 0, 3, 1, 4)
    k = torch.cat([layer.key.expand(2, -1, -1, -1), k], 2)
    v = torch.cat([layer.value.expand(2, -1, -1, -1), v], 2)
    ref = attn.proj(((q @ k.transpose(-2, -1)) * attn.scale).softmax(-1).matmul(v).transpose(1, 2).reshape(2, 17, 32))
    with torch.no_grad():
        torch.testing.assert_close(layer(x), ref, rtol=1e-5, atol=1e-5)
        full = torch.ones(17, 17, dtype=torch.bool)
        torch.testing.assert_close(layer(x, attn_mask=full), layer(x), rtol=1e-6, atol=1e-6)
        with pytest.raises(ValueError, match="is_causal"):
            layer(x, is_causal=True)


def test_prefix_reparam_folds_into_plain_prefixes(tmp_path):
    model = make("vit_reg_ls")
    rep = vpeft.apply(model, "prefix", num_tokens=4, reparam=True, reparam_dim=16)
    model.eval()
    assert rep.method_params == 4 * 32 + (32 * 16 + 16) + (16 * 3 * 2 * 32 + 3 * 2 * 32)
    _randomise(model.blocks[0].attn.encoder)
    x = batch(28)
    with torch.no_grad():
        before = model(x)
    assert fold(model) == ["blocks.0.attn", "blocks.1.attn", "blocks.2.attn"]
    with torch.no_grad():
        torch.testing.assert_close(model(x), before, rtol=0, atol=0)
    rep = vpeft.report(model)
    assert rep.method_params == 3 * 2 * 4 * 32, "only the prefixes remain"
    assert not any(n.endswith("encoder") for n, _ in model.named_modules())
    path = vpeft.save(model, tmp_path / "prefix.safetensors")
    fresh = make("vit_reg_ls").eval()
    vpeft.load(fresh, path)
    assert state_of(fresh).config == vpeft.get_method("prefix").config_cls(num_tokens=4, reparam_dim=16)
    with torch.no_grad():
        assert torch.equal(fresh(x), before)
    with pytest.raises(vpeft.ConfigError, match="reparam=True"):
        fold(fresh)


def test_kv_prompt_methods_refuse_other_attention_layers():
    model = make("vit_cls")

    class OtherAttention(nn.Module):
        def forward(self, x, attn_mask=None, is_causal=False):
            return x

    model.blocks[1].attn = OtherAttention()
    for name in ("prefix", "e2vpt"):
        with pytest.raises(vpeft.UnsupportedBackboneError, match=r"blocks\.1\.attn is a OtherAttention"):
            vpeft.apply(copy.deepcopy(model), name)


def test_e2vpt_shares_key_value_prompts_and_adds_deep_visual_prompts():
    model = make("vit_reg_ls")
    vpeft.apply(model, "e2vpt")
    block = model.blocks[0]
    assert isinstance(block, PromptedBlock) and block.prompt.shape == (5, 32)
    kv = block.base_layer.attn
    assert isinstance(kv, KVPromptAttention) and kv.value is None and kv.key.shape == (2, 5, 16)
    bound = (6 / (5 * 16)) ** 0.5
    assert kv.key.abs().max() <= bound and kv.key.abs().max() > bound / 2, "Kaiming-uniform over fan-in tokens*head_dim"
    key, value = kv.key_value()
    assert value is key

    separate = make("vit_reg_ls")
    vpeft.apply(separate, "e2vpt", share_kv=False, prompt_tokens=0)
    assert not isinstance(separate.blocks[0], PromptedBlock)
    assert separate.blocks[0].attn.value is not None


# ---- visual prompt ---------------------------------------------------------------------------------------------
def test_visual_prompt_is_a_frame_added_to_the_image():
    model = make("vit_cls")  # 32 px -> pad round(30 * 32 / 224) = 4
    vpeft.apply(model, "visual_prompt")
    stem = model.patch_embed
    assert isinstance(stem, PaddingPrompt) and stem.pad == 4 and stem.size == (32, 32)
    assert stem.img_size == (32, 32) and stem.grid_size == (4, 4), "stem attributes stay readable"
    prompt = stem.prompt()
    assert prompt.shape == (3, 32, 32)
    assert prompt[:, 4:-4, 4:-4].abs().sum() == 0 and (prompt[:, :4] != 0).all() and (prompt[:, :, -4:] != 0).all()
    seen = []
    stem.base_layer.register_forward_hook(lambda m, i, o: seen.append(i[0]))
    x = batch(32)
    model(x)
    torch.testing.assert_close(seen[0], x + prompt)


def test_visual_prompt_paper_size_and_bad_pad():
    model = make("vit_cls")
    rep = vpeft.apply(model, "visual_prompt", pad_size=30, image_size=224)
    assert rep.method_params == 69_840, "the paper's 69,840 at 224 px, pad 30"
    small = make("vit_cls")
    with pytest.raises(
        vpeft.ConfigError, match=r"pad_size=16 is invalid for 32x32 images; expected 1 <= pad_size < 16"
    ):
        vpeft.apply(small, "visual_prompt", pad_size=16)
    assert not vpeft.is_adapted(small) and all(p.requires_grad for p in small.parameters())


def test_visual_prompt_on_a_cnn_resamples_to_the_input_size():
    model = make("cnn_effnet")  # built for 160 px -> pad 21; the test images are 32 px
    vpeft.apply(model, "visual_prompt")
    stem = model.conv_stem
    assert isinstance(stem, PaddingPrompt) and stem.size == (160, 160) and stem.pad == 21
    out = model(batch(32))
    out.sum().backward()
    assert stem.pad_up.grad is not None and stem.pad_up.grad.abs().sum() > 0


# ---- LST -------------------------------------------------------------------------------------------------------
def test_lst_side_network_follows_the_ladder():
    model, plain = make("vit_cls"), make("vit_cls")
    vpeft.apply(model, "lst")
    model.eval()
    assert all(isinstance(b, SideTap) for b in model.blocks) and isinstance(model.norm, SideOutput)
    side = model.norm.side
    assert side.first_downsample.out_features == 32 // 8 and len(side.blocks) == 2
    _randomise(side)
    x = batch(32)
    with torch.no_grad():
        emb = _block_input(plain, x)
        h1 = plain.blocks[0](emb)
        h2 = plain.blocks[1](h1)
        g = torch.sigmoid(side.gates / 0.1)
        s = side.first_downsample(emb)
        s = side.blocks[0](g[0] * s + (1 - g[0]) * side.downsamples[0](h1))
        s = side.blocks[1](g[1] * s + (1 - g[1]) * side.downsamples[1](h2))
        torch.testing.assert_close(model.forward_features(x), side.upsample(side.norm(s)))


def _saved_activations(model: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """The tensors autograd saves for backward during a training forward, parameters excluded."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.untyped_storage().data_ptr() not in params:
            saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x).logsumexp(-1).mean()
    return saved


def _nbytes(tensors: list[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def test_lst_keeps_no_backbone_activation_for_backward():
    import timm

    def vit():
        torch.manual_seed(0)
        kw = {"img_size": 32, "patch_size": 4, "embed_dim": 64, "depth": 4, "num_heads": 4, "num_classes": 5}
        return timm.create_model("vit_tiny_patch16_224", **kw).train()

    x = batch(32, n=4)
    models = {name: vit() for name in ("lst", "lora", "full")}
    for name, model in models.items():
        vpeft.apply(model, name)
    lst = models["lst"]

    # every op of the frozen backbone runs without autograd: it builds no graph and saves nothing
    backbone = [m for n, m in lst.named_modules() if ".base_layer." in n and not list(m.children())]
    grad_modes = []
    handles = [m.register_forward_hook(lambda m, i, o: grad_modes.append(torch.is_grad_enabled())) for m in backbone]
    out = lst(x)
    for h in handles:
        h.remove()
    assert grad_modes and not any(grad_modes), "backbone blocks ran with autograd enabled"
    out.sum().backward()
    assert all(p.grad is None for p in lst.parameters() if not p.requires_grad)

    # the only backbone-width token tensors kept are the features the ladder projections read: embeddings + 4 blocks
    saved = {name: _saved_activations(model, x) for name, model in models.items()}
    tokens = 4 * (8 * 8 + 1)
    assert sum(t.numel() == tokens * 64 for t in saved["lst"]) == 1 + 4
    # LST reports ~69% less training memory than full fine-tuning on T5
    assert _nbytes(saved["lst"]) < 0.3 * _nbytes(saved["full"])
    assert _nbytes(saved["lst"]) < 0.4 * _nbytes(saved["lora"])
