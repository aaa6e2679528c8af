"""Tiny randomly initialised backbones and the method cases every contract test runs over."""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable

import timm
import torch
from torch import nn

import vpeft

NUM_CLASSES = 5


def _seeded(fn: Callable[[], nn.Module]) -> Callable[[], nn.Module]:
    def make() -> nn.Module:
        torch.manual_seed(0)
        return fn().eval()

    return make


TINY_BACKBONES: dict[str, tuple[Callable[[], nn.Module], int]] = {
    # name: (factory, input size)
    "vit_cls": (
        _seeded(
            lambda: timm.create_model(
                "vit_tiny_patch16_224",
                pretrained=False,
                img_size=32,
                patch_size=8,
                embed_dim=32,
                depth=2,
                num_heads=2,
                mlp_ratio=2,
                num_classes=NUM_CLASSES,
            )
        ),
        32,
    ),
    # DINOv2-like: register tokens, layer scale, patch 14
    "vit_reg_ls": (
        _seeded(
            lambda: timm.create_model(
                "vit_small_patch14_reg4_dinov2",
                pretrained=False,
                img_size=28,
                embed_dim=32,
                depth=3,
                num_heads=2,
                init_values=0.5,
                num_classes=NUM_CLASSES,
            )
        ),
        28,
    ),
    # no class token, average pooling
    "vit_avg": (
        _seeded(
            lambda: timm.create_model(
                "vit_tiny_patch16_224",
                pretrained=False,
                img_size=32,
                patch_size=8,
                embed_dim=32,
                depth=2,
                num_heads=2,
                class_token=False,
                global_pool="avg",
                num_classes=NUM_CLASSES,
            )
        ),
        32,
    ),
    "cnn_effnet": (
        _seeded(lambda: timm.create_model("test_efficientnet", pretrained=False, num_classes=NUM_CLASSES)),
        32,
    ),
    # four stages of different widths (24..64), LayerNorm2d stem/downsampling, channels-last MLP Linears
    "cnn_convnext": (
        _seeded(
            lambda: timm.create_model(
                "test_convnext", pretrained=False, depths=(1, 1, 1, 1), ls_init_value=0.5, num_classes=NUM_CLASSES
            )
        ),
        32,
    ),
}


def _hf_vit() -> nn.Module:
    from transformers import ViTConfig, ViTForImageClassification

    cfg = ViTConfig(
        image_size=32,
        patch_size=8,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        num_labels=NUM_CLASSES,
    )
    return ViTForImageClassification(cfg)


TINY_BACKBONES.update(
    {
        # hierarchical: widths 32 then 64, window attention (a shifted block in stage 0), PatchMerging
        "swin": (
            _seeded(
                lambda: timm.create_model(
                    "swin_tiny_patch4_window7_224",
                    pretrained=False,
                    img_size=32,
                    window_size=4,
                    embed_dim=32,
                    depths=(2, 1),
                    num_heads=(1, 2),
                    num_classes=NUM_CLASSES,
                )
            ),
            32,
        ),
        # Hugging Face transformers: separate q/k/v Linears, pixel_values in, ImageClassifierOutput out
        "hf_vit": (_seeded(_hf_vit), 32),
    }
)


def forward(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The logits of any tiny backbone (timm returns a tensor, transformers a ModelOutput)."""
    return vpeft.arch.logits_of(model(x))


def features_and_logits(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Every token's (every position's) features after the last block, and the logits, from one pass."""
    if hasattr(model, "forward_features"):
        feats = model.forward_features(x)
        return feats, model.forward_head(feats)
    out = model(x, output_hidden_states=True)
    return out.hidden_states[-1], out.logits


# Extra (method, options) cases run through the same contract bodies as every method's defaults.
EXTRA_CASES: list[tuple[str, dict]] = [
    ("lora", {"r": 2, "targets": ["qkv", "proj", "fc1", "fc2"], "alpha": 4.0}),
    ("lora", {"r": 1, "targets": ["k"]}),
    ("lora", {"r": 2, "targets": ["pw", "kxk"]}),  # CNNs: 1x1 and k x k convs (+ channel Linears)
    ("adapter", {"placement": "houlsby", "bottleneck": 4, "act": "relu"}),
    ("partial", {"k": 2}),
    ("vpt_deep", {"num_tokens": 3, "dropout": 0.0}),
    ("vpt_shallow", {"num_tokens": 1}),
    ("adaptformer", {"bottleneck": 16, "scale": 1.0}),
    # video: ST-Adapter's SSv2 placement (adapters before attention and MLP); image models refuse it
    ("st_adapter", {"placement": "attn_mlp", "bottleneck": 8}),
    # composition: a mergeable stack (SSF stacks on LoRA's qkv), and a CNN-capable one
    ("compose", {"methods": [{"method": "lora", "targets": ["q", "v", "fc1"]}, "bitfit", "ssf"]}),
    ("compose", {"methods": ["bitfit", "ln_tune"]}),
    # a multiplicatively merged PEFT tuner (orthogonal rotations of the weights) through the bridge
    ("peft_tuner", {"peft_config": {"peft_type": "OFT", "r": 0, "oft_block_size": 8}, "targets": ["qkv", "fc2"]}),
]


def method_cases() -> list[tuple[str, dict]]:
    return [(name, {}) for name in vpeft.list_methods()] + EXTRA_CASES


def case_id(case: tuple[str, dict]) -> str:
    name, kwargs = case
    return name + "".join(f"-{k}={v}" for k, v in kwargs.items()).replace(" ", "")


def batch(size: int, n: int = 4, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, size, size, generator=g)


def method_of(name: str, kwargs: dict) -> vpeft.methods.Method:
    """The method instance for a case (flags such as ``mergeable`` may depend on the config, e.g. compose)."""
    cls = vpeft.get_method(name)
    return cls(cls.config_cls.from_kwargs(kwargs))


@functools.cache
def _probe(backbone: str) -> nn.Module:
    return TINY_BACKBONES[backbone][0]()


def supports(name: str, kwargs: dict, backbone: str) -> bool:
    """Whether applying the method to the backbone succeeds rather than raising UnsupportedBackboneError.

    A trial apply on a copy: a method may refuse in its ``check`` (kinds, missing parts) or while injecting.
    """
    try:
        vpeft.apply(copy.deepcopy(_probe(backbone)), name, **kwargs)
    except vpeft.UnsupportedBackboneError:
        return False
    return True
