"""Tiny randomly initialised backbones and the method cases every contract test runs over."""

from __future__ import annotations

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
    # composition: a mergeable stack (SSF stacks on LoRA's qkv), and a CNN-capable one
    ("compose", {"methods": [{"method": "lora", "targets": ["q", "v", "fc1"]}, "bitfit", "ssf"]}),
    ("compose", {"methods": ["bitfit", "ln_tune"]}),
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
def _probe(backbone: str) -> tuple[nn.Module, vpeft.arch.ArchSpec]:
    model = TINY_BACKBONES[backbone][0]()
    return model, vpeft.arch.get_spec(model)


def supports(name: str, kwargs: dict, backbone: str) -> bool:
    """Whether the method accepts the backbone: its ``kinds`` and its finer ``check`` (which must not mutate)."""
    model, spec = _probe(backbone)
    try:
        method_of(name, kwargs).check(model, spec)
    except vpeft.UnsupportedBackboneError:
        return False
    return True
