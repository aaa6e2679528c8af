"""Roles -> targets in the arch layer, the Method template loop, and the token methods on Hugging Face ViT."""

from __future__ import annotations

import ast
import copy
import pathlib

import pytest
import torch
from tiny import TINY_BACKBONES, batch, features_and_logits, forward, method_of
from torch import nn

import vpeft
from vpeft.arch import (
    QKV,
    ROLES,
    Target,
    attention_layout,
    final_norm,
    get_spec,
    input_size,
    patch_grid,
    resolve,
    role_modules,
    target_names,
)
from vpeft.layers import Wrapper
from vpeft.layers.kv_prompt import attention_with_kv
from vpeft.methods.base import REPARAMETER, Method

SRC = pathlib.Path(vpeft.__file__).parent
TOKEN_METHODS = [
    "vpt_shallow",
    "vpt_deep",
    "prefix",
    "e2vpt",
    "lst",
    "fact_tt",
    "fact_tk",
    "repadapter",
    "glora",
    "noah",
]


def make(bb: str) -> nn.Module:
    return TINY_BACKBONES[bb][0]()


# ---- resolution ----------------------------------------------------------------------------------------------------
def test_timm_vit_q_k_v_are_slices_of_the_fused_qkv():
    model = make("vit_cls")
    spec = get_spec(model)
    qv = resolve(model, spec, ("q", "v"))
    assert [t.name for t in qv] == ["blocks.0.attn.qkv", "blocks.1.attn.qkv"], "one target per fused qkv"
    assert (
        qv[0].slices == ((0, 32), (64, 96)) and qv[0].parts == ("q", "v") and qv[0].module is model.blocks[0].attn.qkv
    )
    assert qv[0].block == "blocks.0" and qv[1].index == 1 and qv[0].slice_list == [(0, 32), (64, 96)]
    (k, *_) = resolve(model, spec, "k")
    assert (k.role, k.slices) == ("k", ((32, 64),))
    assert resolve(model, spec, QKV)[0].slices == ((0, 32), (32, 64), (64, 96)), "q, k, v: a slice each"
    whole = resolve(model, spec, ("qkv",))[0]
    assert whole.slices == () and whole.parts == QKV and whole.fused and whole.slice_list is None
    names = [t.name for t in resolve(model, spec, ("qkv", "proj", "fc1", "fc2", "norm1", "attn", "mlp", "block"))]
    assert names[:8] == [
        "blocks.0.attn.qkv",
        "blocks.0.attn.proj",
        "blocks.0.mlp.fc1",
        "blocks.0.mlp.fc2",
        "blocks.0.norm1",
        "blocks.0.attn",
        "blocks.0.mlp",
        "blocks.0",
    ], "canonical order: linears, then sub-modules, the block last"


def test_hf_vit_q_k_v_are_the_separate_projections():
    model = make("hf_vit")
    spec = get_spec(model)
    attn = model.vit.layers[0].attention
    q, v = resolve(model, spec, ("q", "v"))[:2]
    assert (q.name, q.module, q.slices, q.parts) == ("vit.layers.0.attention.q_proj", attn.q_proj, (), ("q",))
    assert v.module is attn.v_proj and not q.fused
    qkv = resolve(model, spec, "qkv")[:3]
    assert [(t.role, t.module, t.parts) for t in qkv] == [
        ("qkv", attn.q_proj, ("q",)),
        ("qkv", attn.k_proj, ("k",)),
        ("qkv", attn.v_proj, ("v",)),
    ]
    assert target_names(spec, ("qkv", "fc2"))[:4] == [
        (t.role, t.name) for t in resolve(model, spec, ("qkv", "fc2"))[:4]
    ]


def test_swin_slices_follow_each_stage_width():
    model = make("swin")
    spec = get_spec(model)
    widths = [t.slices[0][1] for t in resolve(model, spec, "q")]
    assert widths == [32, 32, 64]
    assert [t.slices for t in resolve(model, spec, "v")][-1] == ((128, 192),)


@pytest.mark.parametrize("bb", ["cnn_effnet", "cnn_convnext"])
def test_cnn_roles_name_pointwise_and_kxk_layers(bb):
    model = make(bb)
    spec = get_spec(model)
    pw, kxk = resolve(model, spec, "pw"), resolve(model, spec, "kxk")
    assert pw and all(t.block == "" and t.index == -1 and t.role == "pw" for t in pw)
    assert all(isinstance(t.module, nn.Linear) or tuple(t.module.kernel_size) == (1, 1) for t in pw)
    assert all(isinstance(t.module, nn.Conv2d) and t.module.kernel_size[0] > 1 and t.module.groups == 1 for t in kxk)
    assert not any(t.name.startswith(spec.head) for t in pw + kxk), "the head is never a target"
    with pytest.raises(vpeft.UnsupportedBackboneError, match=r"targets \['q'\] do not exist on timm_"):
        resolve(model, spec, "q")


def test_unknown_role_names_the_valid_roles():
    model = make("vit_cls")
    with pytest.raises(vpeft.ConfigError, match=r"unknown role\(s\) \['query'\]; valid roles: qkv, q, k"):
        resolve(model, get_spec(model), ("q", "query"))
    assert {"q", "k", "v", "qkv", "proj", "fc1", "fc2", "pw", "kxk", "norm1", "block"} <= set(ROLES)
    with pytest.raises(vpeft.UnsupportedBackboneError, match=r"targets \['pw'\] do not exist on timm_vit"):
        resolve(model, get_spec(model), "pw")


def test_missing_role_names_the_role_the_block_and_the_backbone():
    model = make("vit_cls")
    model.blocks[1].attn.qkv = nn.Identity()
    with pytest.raises(vpeft.UnsupportedBackboneError, match=r"lora: block blocks\.1 of this timm_vit .*role 'q'"):
        vpeft.apply(model, "lora")
    with pytest.raises(vpeft.UnsupportedBackboneError, match=r"fact_tt: block blocks\.1 .*role 'qkv'"):
        vpeft.apply(model, "fact_tt")
    assert not vpeft.is_adapted(model)


def test_role_modules_give_whole_modules_for_name_based_tools():
    timm_roles = role_modules(make("vit_cls"), get_spec(make("vit_cls")))
    assert timm_roles["qkv"] == ["blocks.0.attn.qkv", "blocks.1.attn.qkv"] and "q" not in timm_roles
    hf = make("hf_vit")
    hf_roles = role_modules(hf, get_spec(hf))
    assert hf_roles["q"] == ["vit.layers.0.attention.q_proj", "vit.layers.1.attention.q_proj"]
    assert hf_roles["qkv"][:3] == [f"vit.layers.0.attention.{t}_proj" for t in QKV]
    cnn = make("cnn_effnet")
    assert set(role_modules(cnn, get_spec(cnn))) == {"pw", "kxk"}


def test_roles_resolve_through_wrappers_of_an_earlier_method():
    model = make("hf_vit")
    vpeft.apply(model, "lora")
    spec = get_spec(model)
    (q,) = resolve(model, spec, "q")[:1]
    assert q.name == "vit.layers.0.attention.q_proj.base_layer" and isinstance(q.module, nn.Linear)


# ---- model-level facts ----------------------------------------------------------------------------------------------
def test_spec_arch_and_the_family_alias():
    spec = get_spec(make("vit_cls"))
    assert spec.arch == spec.family == "timm_vit"
    assert get_spec(make("hf_vit")).arch == "hf_vit" and get_spec(make("swin")).family == "timm_swin"


@pytest.mark.parametrize(
    "bb,size,grid,norm,attention",
    [
        ("vit_cls", (32, 32), (4, 4), "norm", "fused"),
        ("vit_reg_ls", (28, 28), (2, 2), "norm", "fused"),
        ("vit_avg", (32, 32), (4, 4), "norm", "fused"),
        ("hf_vit", (32, 32), (4, 4), "vit.layernorm", "separate"),
        ("swin", (32, 32), (8, 8), "", ""),
        ("cnn_effnet", (160, 160), None, "", ""),
    ],
)
def test_input_size_patch_grid_final_norm_attention_kind(bb, size, grid, norm, attention):
    model = make(bb)
    spec = get_spec(model)
    assert input_size(model) == size and input_size(model, 48) == (48, 48)
    assert patch_grid(spec) == grid and final_norm(spec) == norm and spec.attention == attention


def test_input_size_is_the_one_used_by_transforms_and_visual_prompt():
    from vpeft.data import resolve_input_size
    from vpeft.methods.visual_prompt import PaddingPrompt

    model = make("hf_vit")
    assert resolve_input_size(model) == input_size(model) == (32, 32)
    vpeft.apply(model, "visual_prompt")
    assert isinstance(model.vit.embeddings, PaddingPrompt) and model.vit.embeddings.size == (32, 32)
    cnn = make("cnn_effnet")
    assert resolve_input_size(cnn) == input_size(cnn) == tuple(cnn.pretrained_cfg["input_size"][1:])


def test_attention_layouts_and_hf_recomputation_matches_the_layer():
    model = make("hf_vit")
    spec = get_spec(model)
    layout = attention_layout(model, spec, spec.parts[0])
    assert (layout.kind, layout.heads, layout.head_dim, layout.q, layout.out) == ("separate", 2, 16, "q_proj", "o_proj")
    attn = model.vit.layers[0].attention
    x = torch.randn(2, 17, 32)
    empty = torch.zeros(2, 0, 16)
    with torch.no_grad():
        torch.testing.assert_close(attention_with_kv(attn, layout, x, empty, empty), attn(x)[0], rtol=1e-6, atol=1e-6)
    swin = make("swin")
    sspec = get_spec(swin)
    with pytest.raises(vpeft.UnsupportedBackboneError, match=r"layers\.0\.blocks\.0\.attn is a WindowAttention"):
        attention_layout(swin, sspec, sspec.parts[0])


# ---- one decision, one vocabulary --------------------------------------------------------------------------------
def _imports(path: pathlib.Path) -> set[str]:
    tree = ast.parse(path.read_text())
    return {f"{'.' * n.level}{n.module or ''}" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)} | {
        a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names
    }


def test_role_vocabulary_and_q_k_v_decision_live_in_the_arch_layer():
    defs = [p for p in SRC.rglob("*.py") if "\nQKV = " in p.read_text()]
    assert [p.relative_to(SRC).as_posix() for p in defs] == ["arch/targets.py"]
    assert ".lora" not in _imports(SRC / "methods" / "peft_tuner.py"), "peft_tuner takes role names from the arch layer"
    assert not any("timm" in m for m in _imports(SRC / "layers" / "kv_prompt.py")), "no backbone classes in layers"
    assert "patch_embed" not in (SRC / "layers" / "token_grid.py").read_text()
    assert "model.norm" not in (SRC / "methods" / "lst.py").read_text()
    assert "_input_size" not in (SRC / "search" / "recipe.py").read_text()


# ---- the template loop -------------------------------------------------------------------------------------------
class _Tag(Wrapper):
    def __init__(self, base_layer: nn.Module, target: Target) -> None:
        super().__init__(base_layer)
        self.target = target
        self.gain = nn.Parameter(torch.ones(()))

    def forward(self, x):
        return self.base_layer(x) * self.gain


def test_the_template_loop_calls_create_per_target_and_replaces_the_modules():
    seen: list[Target] = []

    class Probe(Method):
        config_cls = vpeft.get_method("bitfit").config_cls
        family = REPARAMETER
        paper = "test"
        roles = ("v", "fc2")

        def create(self, model, spec, target):
            seen.append(target)
            return None if target.role == "fc2" else _Tag(target.module, target)

    for bb, expect in (("vit_cls", "blocks.0.attn.qkv"), ("hf_vit", "vit.layers.0.attention.v_proj")):
        model = make(bb)
        seen.clear()
        method = Probe(Probe.config_cls())
        spec = get_spec(model)
        method.check(model, spec)
        adapted = method.inject(model, spec)
        assert adapted[0] == expect and len(adapted) == spec.depth, "create returning None leaves the module alone"
        assert [t.role for t in seen] == ["v", "fc2"] * spec.depth
        assert isinstance(model.get_submodule(expect), _Tag)
    swin_like = make("vit_cls")
    swin_like.blocks[0].mlp.fc2 = nn.Identity()
    with pytest.raises(vpeft.UnsupportedBackboneError, match=r"bitfit: block blocks\.0 of this timm_vit .*'fc2'"):
        Probe(Probe.config_cls()).check(swin_like, get_spec(swin_like))


# ---- token methods on Hugging Face ViT -----------------------------------------------------------------------------
@pytest.mark.parametrize("name", TOKEN_METHODS)
def test_token_method_runs_on_hf_vit(name):
    ref_model, size = TINY_BACKBONES["hf_vit"]
    x = batch(size)
    with torch.no_grad():
        ref = forward(ref_model(), x)
    model = ref_model()
    rep = vpeft.apply(model, name)
    assert rep.method_params > 0
    method = method_of(name, {})
    with torch.no_grad():
        out = forward(model.eval(), x)
    if method.identity_at_init:
        torch.testing.assert_close(out, ref, rtol=0, atol=1e-6)
    else:
        assert not torch.allclose(out, ref)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
    model.train()
    feats, logits = features_and_logits(model, batch(size, n=8))
    (logits.pow(2).mean() + feats.pow(2).mean()).backward()
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and p.grad.abs().sum() > 0, f"{name}: {n} got no gradient"
        else:
            assert p.grad is None, f"{name}: frozen {n} holds a gradient"


def test_repadapter_on_separate_projections_shares_one_adapter_per_block():
    model = make("hf_vit")
    rep = vpeft.apply(model, "repadapter")
    attn = model.vit.layers[0].attention
    assert attn.q_proj.adapter is attn.k_proj.adapter is attn.v_proj.adapter
    assert [attn.q_proj.owns_adapter, attn.k_proj.owns_adapter, attn.v_proj.owns_adapter] == [True, False, False]
    timm = vpeft.apply(make("vit_cls"), "repadapter")
    assert rep.method_params == timm.method_params, "two adapters per block either way (same widths here)"
    x = batch(32)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
        before = forward(model.eval(), x)
        vpeft.merge(model)
        torch.testing.assert_close(forward(model, x), before, rtol=1e-4, atol=1e-5)


def test_fact_counts_the_same_slices_on_fused_and_separate_projections():
    for name in ("fact_tt", "fact_tk"):
        hf = vpeft.apply(make("hf_vit"), name)
        timm = vpeft.apply(make("vit_cls"), name)
        assert hf.method_params == timm.method_params, name


def test_noah_on_separate_projections_is_lora_on_a_virtual_fused_qkv():
    from vpeft.layers.shared_lora import SharedALoRALinear

    hf, timm = make("hf_vit"), make("vit_cls")
    cfg = {"lora": [3], "adapter": [0], "prompts": [0]}
    assert vpeft.apply(hf, "noah", **cfg).method_params == vpeft.apply(timm, "noah", **cfg).method_params == 2 * 3 * 128
    attn = hf.vit.layers[0].attention
    assert all(isinstance(getattr(attn, f"{t}_proj"), SharedALoRALinear) for t in QKV)
    assert attn.q_proj.down is attn.k_proj.down is attn.v_proj.down
    assert [getattr(attn, f"{t}_proj").owns_down for t in QKV] == [True, False, False]
    x = batch(32)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in hf.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
        before = forward(hf.eval(), x)
        vpeft.merge(hf)
        torch.testing.assert_close(forward(hf, x), before, rtol=1e-4, atol=1e-5)


def test_kv_prompts_on_hf_keep_lora_on_the_projections_acting():
    model = make("hf_vit")
    vpeft.apply(model, "compose", methods=[{"method": "lora", "targets": ["q", "v"]}, "prefix"])
    attn = model.vit.layers[0].attention
    assert isinstance(attn.q_proj, Wrapper)
    x = batch(32)
    with torch.no_grad():
        a = forward(model.eval(), x)
        for p in attn.q_proj.parameters():
            if p.requires_grad:
                p.add_(1.0)
        b = forward(model, x)
    assert not torch.allclose(a, b), "the recomputed attention calls the (wrapped) q projection"


def test_glora_codes_per_target_broadcast_over_separate_projections():
    model = make("hf_vit")
    vpeft.apply(model, "glora", targets=["qkv", "fc2"], layers=["LNNNN", "NNNNV"])
    layer = model.vit.layers[1]
    assert [layer.attention.q_proj.code, layer.attention.v_proj.code, layer.mlp.fc2.code] == ["LNNNN"] * 2 + ["NNNNV"]
    with pytest.raises(
        vpeft.ConfigError, match=r"layers has 3 codes; this backbone needs 1, 2 \(one per target\) or 8"
    ):
        vpeft.apply(make("hf_vit"), "glora", targets=["qkv", "fc2"], layers=["LNNNN"] * 3)


def test_every_method_supports_hf_vit():
    from tiny import supports

    from vpeft.methods.towers import CLIP_METHODS  # two-tower CLIP methods: tests/test_clip.py

    image = [n for n in vpeft.list_methods() if n not in CLIP_METHODS and "image" in vpeft.get_method(n).inputs]
    refused = [n for n in image if not supports(n, {}, "hf_vit")]
    assert refused == []


def test_lst_uses_the_final_norm_of_the_spec():
    from vpeft.methods.lst import SideOutput

    model = make("hf_vit")
    vpeft.apply(model, "lst")
    assert isinstance(model.vit.layernorm, SideOutput)
    transformers = pytest.importorskip("transformers")
    vision = transformers.CLIPVisionConfig(
        image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64
    )
    clip = transformers.CLIPVisionModel(vision).eval()  # post_layernorm acts on the pooled class token only
    assert final_norm(get_spec(clip)) == ""
    with pytest.raises(vpeft.UnsupportedBackboneError, match=r"lst.*final norm acts on the whole token sequence"):
        vpeft.apply(copy.deepcopy(clip), "lst")
    assert get_spec(clip).attention == "separate"
