"""Backbone families (vpeft.arch.family): the one place that knows a family's internals.

* the token paths written on public modules equal the libraries' own forward passes bit for bit;
* a family registered from outside the package is found, adapted by methods, trained, cached and saved;
* every capability a family lacks is refused with the family's name.
"""

from __future__ import annotations

import pytest
import timm
import torch
from timm.models.vision_transformer import Block
from torch import nn

import vpeft
from vpeft.arch import FAMILIES, ArchSpec, BlockParts, Family, get_family, register_family, supported_families
from vpeft.errors import ConfigError, UnknownNameError, UnsupportedBackboneError


def _vit(**kw) -> nn.Module:
    torch.manual_seed(0)
    base = dict(pretrained=False, img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=5)
    return timm.create_model("vit_tiny_patch16_224", **{**base, **kw}).eval()


VITS = {
    "cls": {},
    "registers": {"reg_tokens": 2},
    "no_embed_class": {"no_embed_class": True, "reg_tokens": 1},
    "avg_no_cls": {"class_token": False, "global_pool": "avg"},
    "dynamic": {"dynamic_img_size": True},
    "no_pos_embed": {"pos_embed": "none"},
}


@pytest.mark.parametrize("kw", VITS.values(), ids=VITS)
def test_timm_vit_tokens_blocks_finish_is_the_models_own_forward(kw):
    model = _vit(**kw)
    family = get_family(model)
    assert family.name == "timm_vit"
    x = torch.randn(2, 3, 40 if kw.get("dynamic_img_size") else 32, 32)
    with torch.no_grad():
        tokens = family.tokens(model, x)
        for block in model.blocks:
            tokens = block(tokens)
        assert torch.equal(family.finish(model, tokens), model(x))
        assert torch.equal(family.pre_logits(model, x), model.forward_head(model.forward_features(x), True))


def test_open_clip_vision_tokens_and_pooling_are_open_clips_own_forward():
    pytest.importorskip("open_clip")
    from vpeft.backbones.clip import tiny_open_clip

    for pool in ("tok", "avg"):
        vision = tiny_open_clip().image.eval()
        vision.pool_type = pool
        family = get_family(vision)
        assert family.name == "open_clip_vision"
        x = torch.randn(2, 3, 32, 32)
        with torch.no_grad():
            tokens = family.tokens(vision, x)
            for block in vision.transformer.resblocks:
                tokens = block(tokens)
            assert torch.equal(family.finish(vision, tokens), vision(x))


# ---- a family from outside the package ------------------------------------------------------------------------
class ToyViT(nn.Module):
    """A ViT that no library knows: a conv patch embedding, a class token, timm blocks, a norm and a head."""

    def __init__(self, dim: int = 32, depth: int = 2, classes: int = 5) -> None:
        super().__init__()
        self.embed = nn.Conv2d(3, dim, 8, 8)
        self.cls = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.pos = nn.Parameter(torch.randn(1, 17, dim) * 0.02)
        self.layers = nn.ModuleList(Block(dim, 2, mlp_ratio=2.0) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.fc = nn.Linear(dim, classes)

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x).flatten(2).transpose(1, 2)
        return torch.cat([self.cls.expand(len(x), -1, -1), x], dim=1) + self.pos

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.tokens(x)
        for layer in self.layers:
            x = layer(x)
        return self.fc(self.norm(x)[:, 0])


class ToyFamily(Family):
    name = "toy_vit"

    def matches(self, model: nn.Module) -> bool:
        return isinstance(model, ToyViT)

    def spec(self, model: nn.Module) -> ArchSpec:
        parts = []
        for i in range(len(model.layers)):
            blk, p = vpeft.arch.spec.unwrap(model.layers[i], f"layers.{i}")
            a = f"{p}.attn"
            parts.append(
                BlockParts(
                    block=f"layers.{i}", norm1=f"{p}.norm1", attn=a, qkv=f"{a}.qkv", proj=f"{a}.proj",
                    norm2=f"{p}.norm2", mlp=f"{p}.mlp", fc1=f"{p}.mlp.fc1", fc2=f"{p}.mlp.fc2",
                )
            )  # fmt: skip
        return ArchSpec(
            arch="toy_vit", kind="vit", blocks=tuple(b.block for b in parts), parts=tuple(parts), head="fc",
            post_blocks=("norm",), stem=("embed",), embed_dim=32, num_prefix_tokens=1, patch_size=(8, 8),
            image_size=(32, 32), final_norm="norm",
        )  # fmt: skip

    def tokens(self, model, x):
        return model.tokens(x)

    def token_stem(self, model):
        return (model.embed,)

    def finish(self, model, tokens):
        return model.fc(model.norm(tokens)[:, 0])

    def pre_logits(self, model, x):
        x = model.tokens(x)
        for layer in model.layers:
            x = layer(x)
        return model.norm(x)[:, 0]


@pytest.fixture
def toy_family():
    family = register_family(ToyFamily())
    yield family
    FAMILIES.unregister(family.name)


def _toy() -> ToyViT:
    torch.manual_seed(0)
    return ToyViT().eval()


def _loader(n: int = 16, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    data = torch.utils.data.TensorDataset(
        torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, 5, (n,), generator=g)
    )
    return torch.utils.data.DataLoader(data, batch_size=8, shuffle=True, generator=torch.Generator().manual_seed(1))


def test_a_family_registered_from_outside_is_found_adapted_trained_and_saved(toy_family, tmp_path):
    assert "toy_vit" in supported_families() and get_family(_toy()) is toy_family
    for method in ("lora", "adaptformer", "ssf", "vpt_shallow"):
        model = _toy()
        frozen = {k: v.clone() for k, v in model.state_dict().items()}
        vpeft.apply(model, vpeft.get_method(method).config_cls())
        from vpeft.train import TrainConfig, train

        train(model, _loader(), TrainConfig(epochs=1, batch_size=8, lr=1e-2, warmup_epochs=0), progress=False)
        vpeft.save(model, tmp_path / f"{method}.safetensors")
        again = _toy()
        vpeft.load(again, tmp_path / f"{method}.safetensors")
        x = torch.randn(2, 3, 32, 32)
        with torch.no_grad():
            assert torch.equal(model.eval()(x), again.eval()(x)), method
        kept = {n.replace(".base_layer", ""): p for n, p in model.named_parameters() if not p.requires_grad}
        assert kept and all(torch.equal(p, frozen[n]) for n, p in kept.items()), method  # the backbone is untouched


def test_the_feature_cache_splits_a_registered_family_at_its_blocks(toy_family):
    from vpeft.train import TrainConfig, train
    from vpeft.train.cache import cached_training_setup

    cfg = TrainConfig(epochs=2, batch_size=8, lr=1e-2, warmup_epochs=0, seed=3)
    results = []
    for cached in (False, True):
        model = _toy()
        vpeft.apply(model, vpeft.get_method("partial").config_cls(k=1))
        loader = _loader()
        if cached:
            setup = cached_training_setup(model, loader)
            assert setup.depth == 1  # the embedding and the first of two blocks are frozen: their tokens are cached
            train(setup.model, setup.train_loader, cfg, progress=False)
        else:
            train(model, loader, cfg, progress=False)
        results.append({k: v.clone() for k, v in model.state_dict().items()})
    assert all(torch.equal(results[0][k], results[1][k]) for k in results[0])


def test_what_a_family_lacks_is_refused_with_its_name(toy_family):
    from vpeft.train import TrainConfig, train

    with pytest.raises(ConfigError, match="gradient checkpointing is not supported on ToyViT .*'toy_vit'"):
        train(_toy(), _loader(), TrainConfig(epochs=1, batch_size=8, grad_checkpointing=True), progress=False)
    with pytest.raises(UnsupportedBackboneError, match="'toy_vit' does not support dense features"):
        toy_family.final_features(_toy(), torch.zeros(1, 3, 32, 32))


def test_unknown_models_and_duplicate_families_are_clear_errors(toy_family):
    with pytest.raises(UnsupportedBackboneError, match="'Linear' is not supported; supported families: timm_vit, "):
        get_family(nn.Linear(2, 2))
    with pytest.raises(ConfigError, match="'toy_vit' is already registered"):
        register_family(_Other())
    with pytest.raises(
        UnknownNameError,
        match="'toy_vt'. Did you mean 'toy_vit'.* Valid backbone families: clip, ",
    ):
        FAMILIES.get("toy_vt")


class _Other(ToyFamily):
    """Another object under a taken name."""
