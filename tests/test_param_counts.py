"""Each method's trainable-parameter count on ViT-B/16 in its paper's default setting.

The model is a randomly initialised timm ``vit_base_patch16_224`` (d = 768, L = 12, MLP 3072,
patch 16) with a 100-class head (the size of the VTAB tables' CIFAR-100). Every expected count is
derived by hand below; ``method_params`` excludes the head (768 * 100 + 100 = 76,900).
"""

from __future__ import annotations

import copy

import pytest
import timm

import vpeft

D, L, MLP, P = 768, 12, 3072, 16
HEAD = D * 100 + 100  # 76,900

# One block: qkv (d x 3d + 3d), proj (d x d + d), fc1 (d x 4d + 4d), fc2 (4d x d + d), two LayerNorms (2 x 2d).
BLOCK = (D * 3 * D + 3 * D) + (D * D + D) + (D * MLP + MLP) + (MLP * D + D) + 2 * 2 * D  # 7,087,872
PATCH_EMBED = 3 * P * P * D + D  # conv 16x16x3 -> 768, + bias
TOKENS = D + 197 * D  # class token + position embeddings (196 patches + class)
FINAL_NORM = 2 * D

EXPECTED = {
    # head only
    "linear": 0,
    # every backbone weight: 12 blocks + patch embedding + tokens + final norm
    "full": L * BLOCK + PATCH_EMBED + TOKENS + FINAL_NORM,
    # all biases: per block qkv 3d + proj d + fc1 4d + fc2 d + two LayerNorm biases 2d;
    # + patch-embed bias + final norm bias
    "bitfit": L * (3 * D + D + MLP + D + 2 * D) + D + D,
    # LayerNorm weight and bias: 2 per block (4d) + the final norm (2d)
    "ln_tune": L * 4 * D + 2 * D,
    # last block + final norm
    "partial": BLOCK + FINAL_NORM,
    # r = 8 on q and v: per block 2 x (A: 8 x d + B: d x 8)
    "lora": L * 2 * (8 * D + D * 8),
    # bottleneck 8 after the MLP: down d x 8 + 8, up 8 x d + d
    "adapter": L * (D * 8 + 8 + 8 * D + D),
    # same branch shape, parallel to the MLP
    "adaptformer": L * (D * 8 + 8 + 8 * D + D),
    # 10 prompts of width d at the input only / at every block
    "vpt_shallow": 10 * D,
    "vpt_deep": L * 10 * D,
    # scale + shift (2 x channels) after norm1, qkv, proj, norm2, fc1, fc2 per block; patch embed; final norm
    "ssf": L * 2 * (D + 3 * D + D + D + MLP + D) + 2 * D + 2 * D,
    # DiffFit: BitFit's biases + LayerNorm weights (2 per block + final norm) + per-channel gamma on the attention
    # and MLP residual branches of every block; 102,912 + 19,200 + 18,432 (the paper reports DiT counts only)
    "difffit": (L * (3 * D + D + MLP + D + 2 * D) + D + D) + (L * 2 * D + D) + L * 2 * D,
    # attention-only (Touvron et al.): qkv (d x 3d + 3d) + proj (d x d + d) of every block; no count in the paper
    "attention_only": L * (D * 3 * D + 3 * D + D * D + D),
    # DoRA r = 8 on q and v: LoRA's pairs + one magnitude per adapted output row (d for q, d for v)
    "dora": L * 2 * (8 * D + D * 8) + L * 2 * D,
    # IA3: l_k (d) + l_v (d) + l_ff (4d) per block
    "ia3": L * (D + D + MLP),
    # FacT-TT r = 8: shared U (8 x d) + V (d x 8), one 8 x 8 core per slice, 12 slices per block
    # (q, k, v, o, 4 of fc1, 4 of fc2); the paper's 0.040M is its mean over per-task ranks 4/8/16
    "fact_tt": 2 * D * 8 + L * 12 * 8 * 8,
    # FacT-TK r = 32: shared U + V, Tucker core 32^3, P (12L x 32); the paper's 0.069M is its mean over ranks 16/32
    "fact_tk": 2 * D * 32 + 32**3 + L * 12 * 32,
    # KronA on q and v, A 32 x 32 and B (768/32) x (768/32) = 24 x 24 per adapted projection
    "krona": L * 2 * (32 * 32 + 24 * 24),
    # RepAdapter before attention and MLP: down d x 8 + 8, group-wise up (2 groups) d x 4 + d, 2 per block;
    # the paper's 0.22M counts the weights only: L * 2 * (d * 8 + d * 4) = 221,184
    "repadapter": L * 2 * (D * 8 + 8 + D * 4 + D),
    # Convpass dim 8, parallel to attention and MLP: down d x 8 + 8, 3x3 conv 8 x 8 x 9 + 8, up 8 x d + d, 2 per block;
    # 327,552 = the paper's 0.33M
    "convpass": L * 2 * (D * 8 + 8 + 8 * 8 * 9 + 8 + 8 * D + D),
    # Mona dim 64 after attention and after MLP: LN 2d + gamma d + gammax d + down d x 64 + 64 + depthwise 3/5/7
    # convs 64 x (9 + 25 + 49) + 3 x 64 + 1x1 conv 64 x 64 + 64 + up 64 x d + d (the paper has no ViT-B count)
    "mona": L * 2 * (2 * D + D + D + D * 64 + 64 + 64 * (9 + 25 + 49) + 3 * 64 + 64 * 64 + 64 + 64 * D + D),
    # prefix length 10: keys + values (10 x d each) per block
    "prefix": L * 2 * 10 * D,
    # E2VPT: 5 key-value prompts per head shared by K and V (12 heads x 5 x 64 = 5 x d) + 5 deep visual prompts
    # per block; no pruning (the paper reports only per-task pruned percentages)
    "e2vpt": L * 5 * D + L * 5 * D,
    # pixel padding prompt, 30 px at 224 px: 2 x 3 x 30 x 224 + 2 x 3 x (224 - 60) x 30 = 69,840 = the paper's count
    "visual_prompt": 2 * 3 * 30 * 224 + 2 * 3 * (224 - 60) * 30,
    # LST r = 8 (d_s = 96, MLP 384): first down d x 96 + 96, 12 ladder downs, 12 gates, 12 side blocks (2 LN 4 x 96,
    # qkv 96 x 288 + 288, proj 96 x 96 + 96, fc1 96 x 384 + 384, fc2 384 x 96 + 96), final LN, up 96 x d + d
    "lst": (L + 1) * (D * 96 + 96)
    + L
    + L * (4 * 96 + 96 * 288 + 288 + 96 * 96 + 96 + 96 * 384 + 384 + 384 * 96 + 96)
    + 2 * 96
    + (96 * D + D),
    # LoRA (q, v; r=8) + Pfeiffer adapter (8) + VPT-Deep (10), the default composition
    "compose": L * 2 * (8 * D + D * 8) + L * (D * 8 + 8 + 8 * D + D) + L * 10 * D,
    # GLoRA, rank 4 on qkv, proj, fc1, fc2, every tensor at its largest form but D (default "LLLNV"): per Linear
    # (in, out): A and B LoRA 2 x 4 (out + in), C LoRA 4 (in + 1), E vector out. The paper only reports searched
    # per-task subnets (0.86M / 0.44M / 0.29M on average, as its VTAB-1k table is usually quoted)
    "glora": L * sum(2 * 4 * (o + i) + 4 * (i + 1) + o for i, o in ((D, 3 * D), (D, D), (D, MLP), (MLP, D))),
    # NOAH subnet at the largest size of the search space ({1, 5, 10}) in every block: LoRA r=10 on the fused qkv
    # 10 (d + 3d), adapter 10 after the MLP d x 10 + 10 + 10 x d + d, 10 prompts 10 d. The paper's searched subnets
    # average 0.43M (the number usually quoted for its VTAB-1k table)
    "noah": L * (10 * (D + 3 * D) + (D * 10 + 10 + 10 * D + D) + 10 * D),
    # peft_tuner default: PEFT's LoHa r = 8 on qkv and fc1; per layer w1_a, w2_a (out x r) + w1_b, w2_b (r x in)
    "peft_tuner": L * sum(2 * 8 * (o + i) for i, o in ((D, 3 * D), (D, MLP))),
}


def test_hand_arithmetic():
    assert BLOCK == 7_087_872
    assert EXPECTED["full"] == 85_798_656  # timm's 86,567,656 for ViT-B/16 minus its 1000-class head (769,000)
    assert EXPECTED["lora"] == 294_912
    assert EXPECTED["bitfit"] == 102_912
    assert EXPECTED["ssf"] == 205_824
    assert EXPECTED["glora"] == 1_520_832
    assert EXPECTED["noah"] == 654_456
    assert EXPECTED["peft_tuner"] == 1_327_104


def test_every_registered_method_has_an_expected_count():
    from vpeft.methods.towers import CLIP_METHODS  # counted on CLIP ViT-B/16 in tests/test_clip_counts.py

    # video-only methods (Method.inputs without "image") are counted on a video model in tests/test_video_counts.py
    video_only = {n for n in vpeft.list_methods() if "image" not in vpeft.get_method(n).inputs}
    assert set(vpeft.list_methods()) - set(CLIP_METHODS) - video_only <= set(EXPECTED), (
        "add the new method's ViT-B/16 count here"
    )


@pytest.fixture(scope="module")
def vit_b():
    base = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=100)
    return lambda: copy.deepcopy(base)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_vit_b16_count(name, vit_b):
    rep = vpeft.apply(vit_b(), name)
    assert rep.head == HEAD
    assert rep.method_params == EXPECTED[name], f"{name}: {rep.method_params:,} != {EXPECTED[name]:,}"
