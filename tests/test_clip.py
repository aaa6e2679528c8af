"""CLIP backbones (open_clip, Hugging Face), the zero-shot task and the vision-language methods: numerical oracles
on tiny random-init CLIPs (real BPE tokenizer, 77-token context; nothing is downloaded)."""

from __future__ import annotations

import copy
import json
import os

import pytest
import torch
import torch.nn.functional as F

os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytest.importorskip("open_clip")

import vpeft  # noqa: E402
from vpeft.arch import get_spec  # noqa: E402
from vpeft.backbones.clip import (  # noqa: E402
    FusedSelfAttention,
    hf_from_open_clip,
    open_clip_from_hf,
    tiny_hf_clip,
    tiny_open_clip,
)
from vpeft.methods.towers import TowersConfig, per_tower  # noqa: E402
from vpeft.tasks.zeroshot import IMAGENET_TEMPLATES, ZeroShotTask, read_class_names, zero_shot_logits  # noqa: E402

NAMES = ("dog", "cat", "golden retriever", "sea turtle")
KINDS = {"open_clip": tiny_open_clip, "hf": tiny_hf_clip}
CASES = [
    ("coop", {"num_tokens": 4}),
    ("coop", {"num_tokens": 3, "class_position": "middle", "class_specific": True, "num_classes": len(NAMES)}),
    ("coop", {"num_tokens": 2, "class_position": "front"}),
    ("cocoop", {}),
    ("maple", {"depth": 2}),
    ("clip_lora", {}),
    ("clip_adapter", {}),
    ("towers", {"image": {"method": "adapter", "bottleneck": 4}, "text": {"method": "bitfit"}}),
]


def images(n: int = 3, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def _method(name: str, kwargs: dict):
    cls = vpeft.get_method(name)
    return cls(cls.config_cls.from_kwargs(kwargs))


def randomise(model, seed: int = 3) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)


# ---- backbones ------------------------------------------------------------------------------------------------
def _native_open_clip():
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

    torch.manual_seed(0)
    vision = CLIPVisionCfg(layers=2, width=64, head_width=32, image_size=32, patch_size=8)
    text = CLIPTextCfg(context_length=77, vocab_size=49408, width=32, heads=2, layers=2)
    return CLIP(embed_dim=32, vision_cfg=vision, text_cfg=text, quick_gelu=True).eval()


def test_open_clip_runner_matches_native_forward():
    """The block-by-block runner is open_clip's own encode_image / encode_text on the same (fused) modules, bit for
    bit; fusing the attention (nn.MultiheadAttention -> one qkv Linear + SDPA) changes only float rounding."""
    from vpeft.backbones.clip import ClipBackbone, fuse_attention

    native = _native_open_clip()
    fused = copy.deepcopy(native)
    assert fuse_attention(fused) == 4
    clip = ClipBackbone("open_clip", fused, "open_clip:tiny")
    assert isinstance(clip.image_blocks()[0].attn, FusedSelfAttention)
    tokens = clip.tokenizer([f"a photo of a {n}." for n in NAMES])
    x = images()
    with torch.no_grad():
        assert torch.equal(clip.encode_image(x), fused.encode_image(x))  # the runner: exact
        assert torch.equal(clip.encode_text(tokens), fused.encode_text(tokens))
        di = (clip.encode_image(x) - native.encode_image(x)).abs().max().item()
        dt = (clip.encode_text(tokens) - native.encode_text(tokens)).abs().max().item()
    print(f"fused qkv vs open_clip's MultiheadAttention: image {di:.3g}, text {dt:.3g}")
    assert di < 1e-5 and dt < 1e-5, (di, dt)  # the fused kernel's rounding only


def test_hf_runner_matches_native_forward():
    from transformers import CLIPModel

    from vpeft.backbones.clip import ClipBackbone, hf_config

    torch.manual_seed(0)
    model = CLIPModel(hf_config(64, 32, 2, 32, 8, 32)).eval()
    clip = ClipBackbone("hf", model, "hf:tiny")
    tokens = clip.tokenizer([f"a photo of a {n}." for n in NAMES])
    x = images()
    with torch.no_grad():
        ni = model.visual_projection(model.vision_model(pixel_values=x).pooler_output)
        nt = model.text_projection(model.text_model(input_ids=tokens).pooler_output)
        assert torch.equal(clip.encode_image(x), ni)  # the same modules in the same order: exact
        assert torch.equal(clip.encode_text(tokens), nt)


@pytest.mark.parametrize("kind", KINDS)
def test_tower_specs(kind):
    clip = KINDS[kind]()
    spec, text = get_spec(clip), get_spec(clip.text)
    assert spec.arch == ("open_clip" if kind == "open_clip" else "hf_clip")
    assert spec.blocks[0].startswith("image.") and spec.depth == 2 and spec.embed_dim == 64
    assert spec.patch_size == (8, 8) and spec.image_size == (32, 32) and spec.num_prefix_tokens == 1
    assert text.depth == 2 and text.embed_dim == 32
    p = spec.parts[0]
    assert (p.qkv if kind == "open_clip" else p.q) and p.proj and p.fc1 and p.fc2 and p.norm1 and p.mlp
    assert clip.pretrained_cfg["input_size"] == (3, 32, 32)


def test_weight_converter_open_clip_hf_round_trip():
    """open_clip -> HF -> open_clip: same zero-shot logits (the converted pair), same weights back."""
    oc = tiny_open_clip()
    hf = hf_from_open_clip(oc)
    back = open_clip_from_hf(hf, tiny_open_clip(seed=5))
    task = ZeroShotTask(NAMES)
    x = images()
    with torch.no_grad():
        a, b, c = (task.build(m).eval()(x) for m in (oc, hf, back))
    diff = (a - b).abs().max().item()
    print(f"open_clip vs converted HF zero-shot logits: max |diff| = {diff:.3g}")
    assert diff < 1e-4
    assert torch.equal(a, c)
    assert all(torch.equal(v, back.state_dict()[k]) for k, v in oc.state_dict().items())


def test_tokenizer_refuses_overflow_and_context_over_77():
    clip = tiny_open_clip()
    long_name = " ".join(["word"] * 80)
    with pytest.raises(vpeft.ConfigError, match="class 'word word.*tokens; CLIP's context holds 77"):
        ZeroShotTask(("dog", long_name)).build(clip)
    with pytest.raises(vpeft.ConfigError, match="context_length=100 is invalid"):
        ZeroShotTask(NAMES, context_length=100)
    with pytest.raises(vpeft.ConfigError, match="num_tokens=80 does not fit CLIP's 77-token context"):
        vpeft.apply(clip, "coop", num_tokens=80)
    coop = tiny_open_clip()
    vpeft.apply(coop, "coop", num_tokens=70)
    with pytest.raises(vpeft.ConfigError, match="prompt of class 'word word.*does not fit"):
        ZeroShotTask(("dog", " ".join(["word"] * 6))).build(coop)(images(1))


# ---- zero-shot task ----------------------------------------------------------------------------------------------
def test_zero_shot_logits_and_text_cache(monkeypatch):
    clip = tiny_open_clip()
    task = ZeroShotTask(NAMES, ("a photo of a {}.", "a drawing of a {}."))
    model = task.build(clip).eval()
    calls = []
    real = clip.encode_text
    monkeypatch.setattr(clip, "encode_text", lambda t: calls.append(1) or real(t))
    x = images()
    with torch.no_grad():
        out = model(x)
        model(x)
    assert len(calls) == 2, "two templates encoded once, then cached"
    # the formula, by hand: ensemble of normalised template features, renormalised
    with torch.no_grad():
        feats = [
            torch.nn.functional.normalize(real(clip.tokenizer([t.format(n) for n in NAMES])), dim=-1)
            for t in task.templates
        ]
        text = torch.nn.functional.normalize(torch.stack(feats).mean(0), dim=-1)
        img = torch.nn.functional.normalize(clip.encode_image(x), dim=-1)
        want = clip.logit_scale.exp() * img @ text.T
    assert torch.allclose(out, want, atol=1e-5)
    assert torch.allclose(zero_shot_logits(clip.encode_image(x), text, clip.logit_scale), want, atol=1e-5)
    with torch.no_grad():  # a changed text-side weight invalidates the cache
        clip.text.ln_final.weight.mul_(1.5)
        model(x)
    assert len(calls) == 4
    assert len(IMAGENET_TEMPLATES) == 80 and all(t.count("{}") == 1 for t in IMAGENET_TEMPLATES)


def test_task_from_folder_and_json(tmp_path):
    (tmp_path / "dtd").mkdir()
    (tmp_path / "dtd" / "classes.txt").write_text("banded\ncrystalline_rock\n")
    task = ZeroShotTask.from_folder(tmp_path / "dtd")
    assert task.class_names == ("banded", "crystalline rock") and task.templates == ("{} texture.",)
    assert read_class_names(tmp_path / "dtd") == task.class_names
    from vpeft.tasks import task_from_dict

    assert task_from_dict(task.to_dict()) == task
    assert task.backbone_classes() == 0
    assert task.subset([1]).class_names == ("crystalline rock",)


def test_zero_shot_needs_a_text_tower():
    import timm

    vit = timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2
    )
    with pytest.raises(vpeft.ConfigError, match="has no text tower"):
        ZeroShotTask(NAMES).build(vit)


# ---- methods: oracles --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_coop_from_words_equals_zero_shot_prompt(kind):
    """CoOp initialised from "a photo of a" == zero-shot CLIP with the prompt "a photo of a {class}."."""
    task = ZeroShotTask(NAMES, ("a photo of a {}.",))
    zs, coop = KINDS[kind](), KINDS[kind]()
    vpeft.apply(coop, "coop", num_tokens=4, init="a photo of a")
    x = images()
    with torch.no_grad():
        diff = (task.build(zs)(x) - task.build(coop)(x)).abs().max().item()
    print(f"{kind}: CoOp('a photo of a') vs zero-shot logits: max |diff| = {diff:.3g}")
    assert diff < 1e-5


@pytest.mark.parametrize("kind", KINDS)
def test_maple_depth_one_zero_coupling_is_its_shallow_form(kind):
    """MaPLe with J = 1 and a zero coupling: the text side is CoOp's (same context, same words), the image side is the
    frozen image tower with M zero prompt tokens (through its pre-norm) at its input only."""
    task = ZeroShotTask(NAMES)
    maple, coop, frozen = KINDS[kind](), KINDS[kind](), KINDS[kind]()
    vpeft.apply(maple, "maple", depth=1, num_tokens=2, init="a photo of a")
    vpeft.apply(coop, "coop", num_tokens=4, init="a photo of a")
    with torch.no_grad():
        maple.prompt.couple[0].weight.zero_()
        maple.prompt.couple[0].bias.zero_()
        maple.prompt.ctx.add_(0.1)  # trained-looking context, copied into CoOp's first two vectors
        coop.prompt.ctx[:2].copy_(maple.prompt.ctx)
    x = images()
    with torch.no_grad():
        tm = maple.prompt.text_features(maple, NAMES, task.templates)
        tc = coop.prompt.text_features(coop, NAMES, task.templates)
        im = maple(x)
        shallow = frozen.encode_image(x, [torch.zeros(2, frozen.image_width)])
    assert torch.equal(tm, tc), "the same embeddings through the same text tower: bit for bit"
    assert torch.equal(im, shallow), "F(ctx) = 0 * ctx + 0 is exactly zero: the same image tower input"
    assert len(maple.prompt.vision_prompts(maple)) == 1 and not len(maple.prompt.deep)


# An independent reference of a depth-1 MaPLe: both towers written out in plain torch ops on the model's own weights
# (read from its state dict by name), in float64; nothing of vpeft's prompt learner, tower runner or tokenizer is used.
def _plain_ln(x, weight_bias):
    return F.layer_norm(x, x.shape[-1:], *weight_bias, eps=1e-5)


def _plain_blocks(sd, kind, tower):
    """Per block: ``{ln1, q, k, v, out, ln2, fc1, fc2: (weight, bias)}`` (open_clip's fused qkv split in q, k, v)."""
    if kind == "open_clip":
        prefix, attn = f"{tower}.transformer.resblocks", "attn"
        names = {"ln1": "ln_1", "ln2": "ln_2", "out": "attn.out_proj", "fc1": "mlp.c_fc", "fc2": "mlp.c_proj"}
    else:
        prefix, attn = f"{tower}.encoder.layers", "self_attn"
        names = {"ln1": "layer_norm1", "ln2": "layer_norm2", "out": "self_attn.out_proj", "fc1": "mlp.fc1"}
        names["fc2"] = "mlp.fc2"
    blocks, i = [], 0
    while f"{prefix}.{i}.{names['ln1']}.weight" in sd:
        b = {k: (sd[f"{prefix}.{i}.{v}.weight"], sd[f"{prefix}.{i}.{v}.bias"]) for k, v in names.items()}
        if kind == "open_clip":
            w, bias = sd[f"{prefix}.{i}.{attn}.qkv.weight"], sd[f"{prefix}.{i}.{attn}.qkv.bias"]
            b.update(zip("qkv", zip(w.chunk(3), bias.chunk(3))))
        else:
            b.update({n: (sd[f"{prefix}.{i}.{attn}.{n}_proj.weight"], sd[f"{prefix}.{i}.{attn}.{n}_proj.bias"])
                      for n in "qkv"})  # fmt: skip
        blocks.append(b)
        i += 1
    return blocks


def _plain_block(x, b, heads: int, causal: bool):
    """A pre-norm CLIP block: softmax(q k^T / sqrt(d)) v over ``heads`` heads, quick-GELU MLP."""
    n, w = x.shape[-2:]

    def linear(t, key):
        return t @ b[key][0].T + b[key][1]

    h = _plain_ln(x, b["ln1"])
    q, k, v = (linear(h, c).unflatten(-1, (heads, w // heads)).transpose(-3, -2) for c in "qkv")
    att = q @ k.transpose(-1, -2) / (w // heads) ** 0.5
    if causal:
        att = att.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
    x = x + linear((att.softmax(-1) @ v).transpose(-3, -2).flatten(-2), "out")
    h = linear(_plain_ln(x, b["ln2"]), "fc1")
    return x + linear(h * torch.sigmoid(1.702 * h), "fc2")


def _plain_text(sd, kind, ids, ctx):
    """Projected text features of ``ids`` with the M context vectors at positions 1..M (after start-of-text)."""
    if kind == "open_clip":
        tok, pos = sd["text.token_embedding.weight"], sd["text.positional_embedding"]
        final, proj = (sd["text.ln_final.weight"], sd["text.ln_final.bias"]), sd["text.text_projection"]
    else:
        tok, pos = sd["text.embeddings.token_embedding.weight"], sd["text.embeddings.position_embedding.weight"]
        final = (sd["text.final_layer_norm.weight"], sd["text.final_layer_norm.bias"])
        proj = sd["text_proj.weight"].T
    x = tok[ids].clone()
    x[:, 1 : 1 + ctx.shape[0]] = ctx
    x = x + pos[: ids.shape[1]]
    for b in _plain_blocks(sd, kind, "text"):
        x = _plain_block(x, b, heads=2, causal=True)
    eot = (ids == ids.max()).int().argmax(-1)  # the end-of-text id is the vocabulary's last
    return _plain_ln(x, final)[torch.arange(len(ids)), eot] @ proj


def _plain_image(sd, kind, images, prompts):
    """Projected image features with ``prompts`` (M, W) appended after the patch tokens (no position embedding),
    normalised with them by the pre-norm; class-token pooling."""
    if kind == "open_clip":
        conv, cls, pos = sd["image.conv1.weight"], sd["image.class_embedding"], sd["image.positional_embedding"]
        pre, post, proj = "image.ln_pre", "image.ln_post", sd["image.proj"]
    else:
        e = "image.embeddings."
        conv, cls, pos = (
            sd[e + "patch_embedding.weight"],
            sd[e + "class_embedding"],
            sd[e + "position_embedding.weight"],
        )
        pre, post, proj = "image.pre_layrnorm", "image.post_layernorm", sd["image_proj.weight"].T
    x = F.conv2d(images, conv, stride=conv.shape[-1]).flatten(2).transpose(1, 2)
    x = torch.cat([cls.expand(len(x), 1, -1), x], 1) + pos
    x = torch.cat([x, prompts.expand(len(x), -1, -1)], 1)
    x = _plain_ln(x, (sd[pre + ".weight"], sd[pre + ".bias"]))
    for b in _plain_blocks(sd, kind, "image"):
        x = _plain_block(x, b, heads=2, causal=False)
    return _plain_ln(x[:, 0], (sd[post + ".weight"], sd[post + ".bias"])) @ proj


REFERENCE_ATOL = 5e-6
"""vpeft runs in float32, the reference in float64 on the same weights: they differ by float32 rounding alone, at
most 7.2e-7 measured on outputs of size <= 2.3 (a few float32 ulps through two blocks). 5e-6 is 7x that; each
planted change of MaPLe's depth-1 path moves an output by 0.04 or more (prompts without the pre-norm, a coupling
without its bias, the context one position late). Where the prompts sit among the image tokens cannot be seen at
J = 1 (they carry no position embedding and self-attention ignores order), so that is not claimed."""


@pytest.mark.parametrize("coupling", ["zero", "random"])
@pytest.mark.parametrize("kind", KINDS)
def test_maple_depth_one_equals_an_independent_plain_torch_reference(kind, coupling):
    """MaPLe with J = 1: the text tower reads "X X of a {class}." with the context in the X positions; the image
    tower reads F_0(context) = context W^T + b appended after the patch tokens, before the pre-norm. A zero coupling
    gives zero prompt tokens: CLIP with M extra pre-normalised zero tokens at the input (the shallow form)."""
    import open_clip

    maple = KINDS[kind]()
    vpeft.apply(maple, "maple", depth=1, num_tokens=2, init="a photo of a")
    g = torch.Generator().manual_seed(5)
    couple = maple.prompt.couple[0]
    with torch.no_grad():
        maple.prompt.ctx.add_(0.1 * torch.randn(maple.prompt.ctx.shape, generator=g))  # trained-looking context
        for t in (couple.weight, couple.bias):
            t.copy_(torch.zeros_like(t) if coupling == "zero" else 0.2 * torch.randn(t.shape, generator=g))
    x = images()
    with torch.no_grad():
        text = maple.prompt.text_features(maple, NAMES, ZeroShotTask(NAMES).templates)
        image = maple(x)
    sd = {k: v.detach().double() for k, v in maple.state_dict().items()}
    ctx = sd["prompt.ctx"]
    if coupling == "zero":
        prompts = torch.zeros(2, maple.image_width, dtype=torch.float64)
    else:
        prompts = ctx @ sd["prompt.couple.0.weight"].T + sd["prompt.couple.0.bias"]
    ids = open_clip.tokenize([f"a photo of a {name}." for name in NAMES])  # "a photo" is where the context goes
    ref_text = F.normalize(_plain_text(sd, kind, ids, ctx), dim=-1)
    ref_image = _plain_image(sd, kind, x.double(), prompts)
    dt, di = (text.double() - ref_text).abs().max().item(), (image.double() - ref_image).abs().max().item()
    print(f"{kind}, {coupling} coupling: max |vpeft - reference| text {dt:.2g}, image {di:.2g}")
    torch.testing.assert_close(text.double(), ref_text, rtol=0, atol=REFERENCE_ATOL)
    torch.testing.assert_close(image.double(), ref_image, rtol=0, atol=REFERENCE_ATOL)
    without = _plain_image(sd, kind, x.double(), prompts[:0])
    assert (image.double() - without).abs().max() > 100 * REFERENCE_ATOL, "the prompt tokens matter to the output"


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("case", CASES, ids=[f"{n}{i}" for i, (n, _) in enumerate(CASES)])
def test_method_contract(kind, case, tmp_path):
    """Frozen towers bit-identical after an optimiser step, gradients everywhere, save/load round trip exact."""
    name, kwargs = case
    clip = KINDS[kind]()
    x, y = images(), torch.tensor([0, 1, 3])
    with torch.no_grad():
        ref = ZeroShotTask(NAMES).build(clip.eval())(x)
    rep = vpeft.apply(clip, name, **kwargs)
    assert rep.trainable > 0
    if _method(name, kwargs).identity_at_init:
        with torch.no_grad():
            torch.testing.assert_close(ZeroShotTask(NAMES).build(clip)(x), ref, rtol=0, atol=1e-6)
    clip.train()
    randomise(clip)
    model = ZeroShotTask(NAMES).build(clip)
    frozen = {n: p.detach().clone() for n, p in clip.named_parameters() if not p.requires_grad}
    trainable = [p for p in clip.parameters() if p.requires_grad]
    opt = torch.optim.SGD(trainable, lr=0.1)
    model.task.loss(model(x), y).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in trainable), "every trainable tensor learns"
    opt.step()
    assert all(torch.equal(p, frozen[n]) for n, p in clip.named_parameters() if n in frozen)
    clip.eval()
    with torch.no_grad():
        want = model(x)
    path = vpeft.save(clip, tmp_path / "delta.safetensors")
    fresh = KINDS[kind]()
    vpeft.load(fresh, path)
    with torch.no_grad():
        got = ZeroShotTask(NAMES).build(fresh.eval())(x)
    assert torch.equal(got, want)


def test_clip_lora_merges():
    clip = tiny_open_clip()
    vpeft.apply(clip, "clip_lora")
    randomise(clip)
    model = ZeroShotTask(NAMES).build(clip.eval())
    x = images()
    with torch.no_grad():
        before = model(x)
        vpeft.merge(clip)
        merged = model(x)
        vpeft.unmerge(clip)
        again = model(x)
    assert (before - merged).abs().max() < 1e-4 and torch.equal(before, again)


def test_conditional_prompt_per_image_weights():
    clip = tiny_open_clip()
    vpeft.apply(clip, "cocoop")
    randomise(clip)
    x = images()
    with torch.no_grad():
        feats = clip.prompt.text_features(clip, NAMES, (), clip.encode_image(x))
        one = clip.prompt.text_features(clip, NAMES, (), clip.encode_image(x[1:2]))
    assert feats.shape == (3, len(NAMES), clip.embed_dim)
    assert torch.allclose(feats[1], one[0], atol=1e-5)
    assert not torch.allclose(feats[0], feats[1])


# ---- towers: existing methods on either tower ---------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_tower_qualified_targets(kind):
    clip = KINDS[kind]()
    rep = vpeft.apply(clip, per_tower("lora", ["image.q", "image.v", "text.v"], r=2))
    assert all(n.startswith(("image.", "text.")) for n in rep.adapted)
    assert sum("text." in n for n in rep.adapted) == 2  # v of 2 text blocks (a fused qkv once per block)
    assert rep.trainable == 2 * 2 * (2 * 64 + 64 * 2) + 2 * (2 * 32 + 32 * 2)
    bit = KINDS[kind]()
    rep = vpeft.apply(bit, per_tower("bitfit", ["text"]))
    assert rep.trainable > 0 and all(n.startswith("text.") for n, p in bit.named_parameters() if p.requires_grad)
    plain = KINDS[kind]()  # a method named without a tower adapts the image tower
    rep = vpeft.apply(plain, "vpt_deep", num_tokens=2)
    assert rep.trainable == 2 * 2 * 64 and all(n.startswith("image.") for n in rep.adapted)
    assert ZeroShotTask(NAMES).build(plain)(images()).shape == (3, len(NAMES))


def test_one_line_errors():
    import timm

    def one_line(exc_info):
        assert "\n" not in str(exc_info.value)

    with pytest.raises(vpeft.ConfigError, match="unknown tower 'audio'; valid towers: image, text") as e:
        per_tower("lora", ["audio.q"])
    one_line(e)
    with pytest.raises(vpeft.ConfigError, match="unknown tower 'vision'"):
        vpeft.apply(tiny_open_clip(), "clip_lora", targets=["vision.q"])
    with pytest.raises(vpeft.ConfigError, match="cannot adapt the text tower") as e:
        TowersConfig(text={"method": "vpt_deep"})
    one_line(e)
    csc = tiny_open_clip()
    vpeft.apply(csc, "coop", class_specific=True, num_classes=3, num_tokens=2)
    with pytest.raises(vpeft.ConfigError, match="built for 3 classes, the task has 4") as e:
        ZeroShotTask(NAMES).build(csc)(images(1))
    one_line(e)
    with pytest.raises(vpeft.ConfigError, match="num_classes=5 is only used with class_specific=True"):
        vpeft.get_method("coop").config_cls(num_classes=5)
    vit = timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2
    )
    for name in ("coop", "cocoop", "maple", "clip_lora", "clip_adapter", "towers"):
        with pytest.raises(vpeft.UnsupportedBackboneError, match=name) as e:
            vpeft.apply(copy.deepcopy(vit), name)
        one_line(e)


def test_clip_delta_refused_on_image_only_backbone(tmp_path):
    import timm

    clip = tiny_open_clip()
    vpeft.apply(clip, "coop", num_tokens=2)
    path = vpeft.save(clip, tmp_path / "coop.safetensors")
    vit = timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2
    )
    with pytest.raises(vpeft.CheckpointError, match="trained on backbone 'open_clip:tiny'") as e:
        vpeft.load(vit, path)
    assert "\n" not in str(e.value)
    other = tiny_open_clip(seed=7)  # same architecture, other weights: the fingerprint refuses it
    with pytest.raises(vpeft.CheckpointError, match="belongs to other weights"):
        vpeft.load(other, path)


def test_task_model_through_api_and_engine(tmp_path):
    """apply / save / load on the ZeroShotModel (the task slot), trained and evaluated by vpeft.train; the delta
    header records the task; the delta of a base-class prompt loads onto a model for other class names."""
    from vpeft.train import TrainConfig, evaluate, train

    task = ZeroShotTask(NAMES)
    model = task.build(tiny_open_clip())
    rep = vpeft.apply(model, "coop", num_tokens=4, init="a photo of a")
    assert rep.method_params == 4 * 32 and rep.decoder == 0
    data = [(images(4, seed=s), torch.tensor([0, 1, 2, 3])) for s in range(3)]
    before = model.backbone.prompt.ctx.detach().clone()
    train(model, data, TrainConfig(epochs=1, lr=1e-2, batch_size=4), progress=False)
    assert not torch.equal(model.backbone.prompt.ctx, before)
    metrics = evaluate(model, data)
    assert 0.0 <= metrics["top1"] <= 1.0 and metrics["n"] == 12
    path = vpeft.save(model, tmp_path / "coop.safetensors")
    meta, tensors = vpeft.api.read_delta(path)
    assert json.loads(meta["task"]) == task.to_dict()
    assert set(tensors) == {"backbone.prompt.ctx"}
    fresh = task.build(tiny_open_clip())
    vpeft.load(fresh, path)
    x = images()
    with torch.no_grad():
        assert torch.equal(fresh.eval()(x), model.eval()(x))
    novel = ZeroShotTask(("zebra", "tulip")).build(tiny_open_clip())
    vpeft.load(novel, path)  # a unified context describes any class list
    assert novel(x).shape == (3, 2)


def test_converted_pair_native_forwards_agree():
    """open_clip's own forward (nn.MultiheadAttention, unfused) vs Hugging Face's own forward of the converted
    weights: the same zero-shot logits (each library's code, not vpeft's runner)."""
    from vpeft.backbones.clip import ClipBackbone, fuse_attention

    native = _native_open_clip()
    fused = copy.deepcopy(native)
    fuse_attention(fused)
    hf = hf_from_open_clip(ClipBackbone("open_clip", fused, "open_clip:tiny")).eval()
    tokens = hf.tokenizer([f"a photo of a {n}." for n in NAMES])
    x = images()
    with torch.no_grad():
        a = native.get_logits(x, tokens)[0]
        img = hf.image_proj(hf.image(pixel_values=x).pooler_output)
        txt = hf.text_proj(hf.text(input_ids=tokens).pooler_output)
        b = zero_shot_logits(img, txt, hf.logit_scale)
    diff = (a - b).abs().max().item()
    print(f"native open_clip vs native HF (converted) logits: max |diff| = {diff:.3g}")
    assert diff < 1e-4


def test_create_by_name_errors():
    from vpeft.backbones.clip import create

    with pytest.raises(vpeft.UnknownNameError, match="use 'open_clip:<model>' or 'hf:<hub id>'"):
        create("ViT-B-16")
    with pytest.raises(vpeft.UnknownNameError, match="open_clip has no model 'ViT-Q-99'"):
        create("open_clip:ViT-Q-99")
    with pytest.raises(vpeft.ConfigError, match="have no classifier"):
        create("open_clip:ViT-B-16", num_classes=10)


def test_cached_text_features_survive_evaluation_between_epochs():
    """Validation (inference mode) between training epochs of an image-side method (text features cached)."""
    from vpeft.train import TrainConfig, evaluate, train

    model = ZeroShotTask(NAMES).build(tiny_open_clip())
    vpeft.apply(model, "clip_adapter")
    data = [(images(4, seed=s), torch.tensor([0, 1, 2, 3])) for s in range(2)]
    evaluate(model, data)  # fills the cache under inference mode first
    result = train(model, data, TrainConfig(epochs=2, lr=1e-2, batch_size=4), val_loader=data, progress=False)
    assert len(result.history) == 2 and result.history[-1]["val_top1"] is not None


@pytest.mark.parametrize("case", CASES, ids=[f"{n}{i}" for i, (n, _) in enumerate(CASES)])
def test_config_json_round_trip(case):
    name, kwargs = case
    cfg = vpeft.get_method(name).config_cls.from_kwargs(kwargs)
    assert vpeft.MethodConfig.from_json(cfg.to_json()) == cfg


def test_per_tower_configs():
    cfg = per_tower("lora", ["image.q", "text.q", "text.v"], r=4)
    assert cfg.image.targets == ("q",) and cfg.text.targets == ("q", "v") and cfg.text.r == 4
    assert per_tower("bitfit", ["image"]).text is None
    with pytest.raises(vpeft.ConfigError, match="bitfit: has no targets; name the bare tower"):
        per_tower("bitfit", ["text.q"])
    with pytest.raises(vpeft.ConfigError, match="towers: no method given"):
        TowersConfig(image=None, text=None)


# ---- the linear-probe baseline on frozen CLIP features -----------------------------------------------------------
def test_linear_probe_starts_as_zero_shot_and_trains_only_its_classifier(tmp_path):
    """probe=True: a Linear(E, C) decoder on the normalised image feature, initialised from the zero-shot class
    weights (its logits equal zero-shot CLIP's before training), trained with method ``linear`` while both towers
    stay frozen; the delta holds the classifier and reloads exactly."""
    clip = tiny_open_clip()
    x = images(4)
    with torch.no_grad():
        zero_shot = ZeroShotTask(NAMES).build(copy.deepcopy(clip)).eval()(x)
    task = ZeroShotTask(NAMES, probe=True)
    model = task.build(copy.deepcopy(clip)).eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x), zero_shot, rtol=1e-5, atol=1e-5)
    rep = vpeft.apply(model, "linear")
    assert rep.decoder == rep.trainable == clip.embed_dim * len(NAMES) + len(NAMES)
    frozen = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model.train()
    torch.nn.functional.cross_entropy(model(x), torch.arange(4) % len(NAMES)).backward()
    opt.step()
    assert all(torch.equal(v, frozen[k]) for k, v in model.backbone.state_dict().items())
    path = vpeft.save(model, tmp_path / "probe.safetensors")
    fresh = ZeroShotTask(NAMES, probe=True).build(copy.deepcopy(clip))
    vpeft.load(fresh, path)
    model.eval(), fresh.eval()
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))


def test_every_prompt_learner_implements_the_declared_prompt_slot_protocol():
    """The ``prompt`` slot's protocol (vpeft.layers.prompt_slot.PromptSlot) is declared once; the default template
    prompt and every prompt learner implement it, and the learners share ContextPrompt from the layer module."""
    from vpeft.backbones.clip import TemplatePrompt, tiny_open_clip
    from vpeft.layers.prompt_slot import ContextPrompt, PromptSlot

    assert isinstance(TemplatePrompt(), PromptSlot)
    for method, options in (("coop", {}), ("cocoop", {}), ("maple", {"depth": 2})):
        clip = tiny_open_clip()
        vpeft.apply(clip, method, **options)
        assert isinstance(clip.prompt, PromptSlot) and isinstance(clip.prompt, ContextPrompt), method
    assert not isinstance(torch.nn.Linear(2, 2), PromptSlot)  # the check is not vacuous
