"""Trainable-parameter counts of the video methods on ViT-B/16 at 8 frames, derived by hand.

The model is a randomly initialised timm ``vit_base_patch16_224`` (d = 768, L = 12) without a classifier, inside a
video model (:class:`vpeft.tasks.VideoTask`, 8 frames); ``method_params`` excludes the video head. Video-only
methods (``Method.inputs`` without ``"image"``) are counted here instead of in tests/test_param_counts.py.
"""

from __future__ import annotations

import copy

import pytest
import timm

import vpeft
from vpeft.tasks import VideoTask

D, L, T = 768, 12, 8

# AIM: three adapters per block (temporal, spatial, joint), each d -> d/4 -> d with biases, + the temporal embedding
AIM_ADAPTER = D * (D // 4) + D // 4 + (D // 4) * D + D  # 295,872
AIM = L * 3 * AIM_ADAPTER + T * D  # 10,651,392 + 6,144
# ST-Adapter: d -> 384, depthwise 3x1x1 Conv3d (3 weights + 1 bias per channel), 384 -> d; one per block (pre-attn)
ST_ADAPTER = D * 384 + 384 + 384 * 3 + 384 + 384 * D + D  # 592,512
ST = L * ST_ADAPTER
# the SSv2 setting (placement="attn_mlp"): a second, identical adapter before each block's MLP -- 2 per block
ST_ATTN_MLP = L * 2 * (D * 384 + 384 + 384 * 3 + 384 + 384 * D + D)  # 24 adapters

# ZeroI2V: four linear adapters per block (before qkv, after proj, before fc1, after fc2), each d -> d/4 -> d with
# biases (AIM's adapter shape without the activation), + the temporal embedding; the head shift has no parameters
ZEROI2V = L * 4 * AIM_ADAPTER + T * D  # 14,201,856 + 6,144

EXPECTED = {"aim": AIM, "st_adapter": ST, "zeroi2v": ZEROI2V}
# (method, options) beyond the defaults: their counts on the same model
OPTION_CASES = [
    ("st_adapter", {"placement": "attn_mlp"}, ST_ATTN_MLP),
    ("st_adapter", {"placement": "mlp"}, ST),  # the official K400 code's placement: 12 adapters as well
]


def test_hand_arithmetic_against_the_papers():
    assert AIM_ADAPTER == 295_872 and L * 3 * AIM_ADAPTER == 10_651_392
    assert AIM == 10_657_536  # the paper's "11M" adds the K400 head: 768 * 400 + 400 = 307,600 -> 10.97M
    assert ST_ADAPTER == 592_512 and ST == 7_110_144  # the paper's 7.1M; with pre-MLP adapters too: 14.2M
    assert ST_ATTN_MLP == 2 * ST == 14_220_288  # the paper's 14.2M (SSv2: adapters before attention and MLP)
    assert L * 4 * AIM_ADAPTER == 14_201_856 and ZEROI2V == 14_208_000  # the paper's "14M" trained on ViT-B


def test_every_video_only_method_has_an_expected_count():
    video_only = {n for n in vpeft.list_methods() if "image" not in vpeft.get_method(n).inputs}
    assert video_only <= set(EXPECTED), "add the new video method's ViT-B/16 count here"


@pytest.fixture(scope="module")
def vit_b():
    base = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=0)
    return lambda: VideoTask(400, num_frames=T).build(copy.deepcopy(base))


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_vit_b16_count(name, vit_b):
    rep = vpeft.apply(vit_b(), name)
    assert rep.decoder == D * 400 + 400  # the mean head's classifier
    assert rep.method_params == EXPECTED[name], f"{name}: {rep.method_params:,} != {EXPECTED[name]:,}"


@pytest.mark.parametrize("name,options,expected", OPTION_CASES, ids=[f"{c[0]}-{c[1]}" for c in OPTION_CASES])
def test_vit_b16_count_with_options(name, options, expected, vit_b):
    rep = vpeft.apply(vit_b(), name, **options)
    assert rep.method_params == expected, f"{name} {options}: {rep.method_params:,} != {expected:,}"
