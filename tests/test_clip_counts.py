"""Trainable-parameter counts of the vision-language methods on CLIP ViT-B/16, derived by hand.

The model is a randomly initialised open_clip ``ViT-B-16`` (``pretrained=None``; built once for the module):
image tower width 768, 12 blocks, patch 16 at 224 px; text tower width 512, 12 blocks, 77 positions, vocabulary
49,408; joint embedding 512. Every expected count below is derived from those numbers.
"""

from __future__ import annotations

import copy
import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytest.importorskip("open_clip")

import vpeft  # noqa: E402
from vpeft.methods.towers import CLIP_METHODS  # noqa: E402

W_TXT, W_IMG, E, L, MLP_IMG, MLP_TXT = 512, 768, 512, 12, 3072, 2048
C = 100  # class count for the class-specific (CSC) CoOp case

EXPECTED = {
    # CoOp: M context vectors of the text width, shared by all classes
    ("coop", ()): 16 * W_TXT,  # 8,192
    ("coop", (("num_tokens", 4),)): 4 * W_TXT,  # 2,048
    # CSC: one context per class
    ("coop", (("num_tokens", 16), ("class_specific", True), ("num_classes", C))): C * 16 * W_TXT,
    # CoCoOp: 4 context vectors + meta-net Linear(E -> E/16) - ReLU - Linear(E/16 -> W_text)
    ("cocoop", ()): 4 * W_TXT + (E * (E // 16) + E // 16) + ((E // 16) * W_TXT + W_TXT),  # 2,048 + 33,312
    # MaPLe, M = 2, J = 9: input context M x W_text, deep language prompts (J - 1) x M x W_text, and J couplings
    # Linear(W_text -> W_image) with bias
    ("maple", ()): 2 * W_TXT + 8 * 2 * W_TXT + 9 * (W_TXT * W_IMG + W_IMG),
    # MaPLe at depth 1 (shallow): context + one coupling
    ("maple", (("depth", 1),)): 2 * W_TXT + (W_TXT * W_IMG + W_IMG),
    # CLIP-LoRA r = 2 on q, k, v of every block of both towers: per projection A (r x w) + B (w x r)
    ("clip_lora", ()): L * 3 * (2 * W_IMG + W_IMG * 2) + L * 3 * (2 * W_TXT + W_TXT * 2),
    # CLIP-Adapter, reduction 4, bias-free: E x E/4 + E/4 x E
    ("clip_adapter", ()): E * (E // 4) + (E // 4) * E,
    # towers default: LoRA r = 8 on q, v of both towers
    ("towers", ()): L * 2 * (8 * W_IMG + W_IMG * 8) + L * 2 * (8 * W_TXT + W_TXT * 8),
}


def test_hand_arithmetic():
    assert EXPECTED[("coop", ())] == 8_192
    assert EXPECTED[("coop", (("num_tokens", 4),))] == 2_048
    assert EXPECTED[("cocoop", ())] == 35_360 == 2_048 + 33_312
    assert EXPECTED[("maple", ())] == 3_555_072
    assert EXPECTED[("clip_lora", ())] == 184_320 == 110_592 + 73_728
    assert EXPECTED[("clip_adapter", ())] == 131_072
    assert {name for name, _ in EXPECTED} == set(CLIP_METHODS)


@pytest.fixture(scope="module")
def vit_b16():
    from vpeft.backbones.clip import create

    base = create("open_clip:ViT-B-16")  # pretrained=None: random weights, nothing downloaded
    return lambda: copy.deepcopy(base)


def test_vit_b16_architecture(vit_b16):
    """The frozen model itself, counted from the architecture (the towers' sizes the counts rely on)."""
    clip = vit_b16()
    assert (clip.image_width, clip.text_width, clip.embed_dim, clip.context_length) == (W_IMG, W_TXT, E, 77)
    assert len(clip.image_blocks()) == len(clip.text_blocks()) == L

    def block(w, mlp):  # qkv, out proj, fc1, fc2, two LayerNorms
        return (w * 3 * w + 3 * w) + (w * w + w) + (w * mlp + mlp) + (mlp * w + w) + 4 * w

    image = 3 * 16 * 16 * W_IMG + W_IMG + 197 * W_IMG + 2 * W_IMG + L * block(W_IMG, MLP_IMG) + 2 * W_IMG + W_IMG * E
    text = 49_408 * W_TXT + 77 * W_TXT + L * block(W_TXT, MLP_TXT) + 2 * W_TXT + W_TXT * E
    assert sum(p.numel() for p in clip.image.parameters()) == image
    assert sum(p.numel() for p in clip.text.parameters()) == text
    assert sum(p.numel() for p in clip.parameters()) == image + text + 1  # + logit_scale
    assert image + text + 1 == 149_620_737


@pytest.mark.parametrize("case", sorted(EXPECTED), ids=lambda c: c[0] + "".join(f"-{k}={v}" for k, v in c[1]))
def test_vit_b16_count(case, vit_b16):
    name, kwargs = case
    rep = vpeft.apply(vit_b16(), name, **dict(kwargs))
    assert rep.head == 0
    assert rep.method_params == EXPECTED[case], f"{name}: {rep.method_params:,} != {EXPECTED[case]:,}"
