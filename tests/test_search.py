"""NOAH / GLoRA structure search: weight sharing, exact budgets, export, the recipe and ``vpeft search``.

The ``noah`` and ``glora`` methods themselves run through the contract matrix (tests/test_contract.py).
"""

from __future__ import annotations

import json
import random

import pytest
import torch
from PIL import Image
from tiny import TINY_BACKBONES, batch
from torch import nn

import vpeft
from vpeft.cli import main
from vpeft.layers import LoRALinear, PromptedBlock, SequentialAdapter, Wrapper
from vpeft.layers.glora import ALL_CODES, GLoRALinear, GLoRASuperLinear, glora_params
from vpeft.run import build_backbone, evaluate_delta
from vpeft.search import (
    EvolutionConfig,
    GLoRASpace,
    NOAHSpace,
    Supernet,
    build_space,
    evolve,
    run_search,
    transfer_weights,
)
from vpeft.search.supernet import SuperAdapter, SuperLoRA, SuperPromptedBlock

SPACES = [("noah", {"sizes": (1, 2, 3)}), ("glora", {"r": 2})]


def _randomise(model: nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)


@pytest.mark.parametrize("bb", ["vit_cls", "vit_reg_ls"])
@pytest.mark.parametrize("space_name,kwargs", SPACES, ids=[s for s, _ in SPACES])
def test_subnet_equals_exported_config_with_sliced_weights(space_name, kwargs, bb):
    factory, size = TINY_BACKBONES[bb]
    supernet_model = factory()
    space = build_space(space_name, supernet_model, **kwargs)
    supernet = Supernet(supernet_model, space)
    _randomise(supernet_model)  # zero-initialised factors would hide slicing bugs
    supernet_model.eval()
    rng = random.Random(1)
    cands = [space.random(rng) for _ in range(3)]
    if space_name == "noah":  # sizes the space never samples: gaps, a prompt-free first block, a module absent
        depth = len(cands[0][0])
        cands.append(((0,) + (3,) * (depth - 1), (2,) + (0,) * (depth - 1), (0, 1) + (3,) * (depth - 2)))
    x = batch(size)
    for cand in cands:
        supernet.activate(cand)
        with torch.no_grad():
            expected = supernet_model(x)
        sub = factory()
        rep = vpeft.apply(sub, space.to_config(cand))
        assert rep.method_params == space.params(cand), "the search counts parameters exactly"
        transfer_weights(supernet_model, sub)
        with torch.no_grad():
            got = sub.eval()(x)
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


def test_supernet_trains_a_sampled_subnet_per_batch():
    factory, size = TINY_BACKBONES["vit_cls"]
    model = factory()
    frozen = {n: p.detach().clone() for n, p in model.named_parameters()}
    space = build_space("noah", model, sizes=(1, 2))
    supernet = Supernet(model, space, seed=0)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    own = {f"{mn}.{pn}" for mn, m in model.named_modules() if isinstance(m, Wrapper) for pn, _ in m.delta_parameters()}
    assert own and trainable == own | {"head.weight", "head.bias"}, "only the super layers and the head train"
    model.train()
    seen = set()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    for _ in range(6):
        model(batch(size)).logsumexp(-1).mean().backward()
        opt.step()
        opt.zero_grad()
        seen.add(supernet.current)
    assert len(seen) > 1, "a new subnet is sampled for every forward pass in training mode"
    for n, p in model.named_parameters():
        if not p.requires_grad:
            assert torch.equal(p, frozen[n.replace(".base_layer", "")]), n
    model.eval()
    supernet.activate(seen.pop())
    before = supernet.current
    model(batch(size))
    assert supernet.current == before, "no sampling in eval mode"
    supernet.close()


def _vit_b_noah() -> NOAHSpace:
    return NOAHSpace(depth=12, dim=768, qkv_out=3 * 768)


def _vit_b_glora() -> GLoRASpace:
    shapes = [("qkv", 768, 2304), ("proj", 768, 768), ("fc1", 768, 3072), ("fc2", 3072, 768)]
    return GLoRASpace([(f"blocks.{b}.{n}", i, o, True) for b in range(12) for n, i, o in shapes], r=4)


def _fake_score(cand) -> dict[str, float]:
    """Deterministic pseudo-accuracy, so the evolution can be exercised without any model."""
    h = random.Random(repr(cand)).random()
    return {"top1": round(h, 2), "loss": 1 - h}


@pytest.mark.parametrize("space,budget", [(_vit_b_noah(), 100_000), (_vit_b_glora(), 300_000)], ids=["noah", "glora"])
def test_every_candidate_respects_the_budget(space, budget):
    cfg = EvolutionConfig(population=12, generations=3, select=4, seed=0)
    result = evolve(space, _fake_score, budget, cfg, progress=False)
    assert len(result.history) > cfg.population, "mutation / crossover produced new candidates"
    assert {r.origin for r in result.history} >= {"random", "mutation", "crossover"}
    assert all(r.params == space.params(r.cand) <= budget for r in result.history)
    assert len({r.cand for r in result.history}) == len(result.history), "each candidate is evaluated once"
    assert result.best.key == max(r.key for r in result.history)
    if space.min_params():
        with pytest.raises(vpeft.ConfigError, match="below the smallest candidate"):
            evolve(space, _fake_score, space.min_params() - 1, cfg, progress=False)


def test_noah_space_matches_the_paper():
    space = _vit_b_noah()
    assert space.depths == (3, 6, 9, 12) and space.sizes == (1, 5, 10)
    rng = random.Random(0)
    for _ in range(20):
        for sizes in space.random(rng):
            d = next((i for i, s in enumerate(sizes) if s == 0), 12)
            assert d in space.depths and set(sizes[:d]) <= {1, 5, 10} and not any(sizes[d:])
    # the cifar100 subnet released with NOAH's code (experiments/NOAH/subnet/VTAB/ViT-B_prompt_cifar100.yaml)
    prompts = (10, 5, 10, 1, 5, 1, 10, 1, 10, 5, 1, 10)
    lora = (10, 1, 5, 5, 1, 10, 1, 1, 1, 10, 1, 1)
    adapter = (5, 10, 10, 10, 5, 1, 1, 1, 10, 10, 10, 1)
    # LoRA r (d + 3d), adapter 2 d a + a + d, prompts p d
    expected = 47 * 4 * 768 + (74 * (2 * 768 + 1) + 12 * 768) + 69 * 768
    assert space.params((lora, adapter, prompts)) == expected == 320_330


def test_glora_layer_merges_for_every_code():
    torch.manual_seed(0)
    for bias in (True, False):
        x = torch.randn(3, 4, 6)
        for code in ALL_CODES[::7] + ("LLLVV", "NNNNN", "NNNNS", "NNVNN"):
            base = nn.Linear(6, 5, bias=bias)
            layer = GLoRALinear(base, code, r=2)
            _randomise(layer)
            assert sum(p.numel() for _, p in layer.delta_parameters()) == glora_params(code, 6, 5, 2, bias)
            y = layer(x)
            layer.merge_into_base()
            torch.testing.assert_close(base(x), y, rtol=1e-5, atol=1e-6)


def test_glora_super_layer_samples_per_forward_in_supernet_mode():
    layer = GLoRASuperLinear(nn.Linear(6, 5), r=2)
    _randomise(layer)
    x = torch.randn(2, 6)
    random.seed(0)
    outs = {tuple(layer(x).flatten().tolist()) for _ in range(8)}
    assert len(outs) > 1, "no choice set: a random choice at every forward (official supernet training)"
    layer.choice = "LVNSV"
    assert torch.equal(layer(x), layer(x))


def test_config_validation_and_broadcasting():
    factory, _ = TINY_BACKBONES["vit_reg_ls"]  # 3 blocks
    cfg = vpeft.get_method("noah").config_cls(lora="1,0,5", adapter=[2], prompts=(0, 3, 0))
    assert cfg.lora == (1, 0, 5) and vpeft.MethodConfig.from_json(cfg.to_json()) == cfg
    rep = vpeft.apply(factory(), cfg)
    # d = 32, qkv 96: LoRA r (d + 3d), adapter 2 d a + a + d in all 3 blocks, 3 prompts of width d
    assert rep.method_params == 6 * (32 + 96) + 3 * (2 * 32 * 2 + 2 + 32) + 3 * 32
    for bad in ({"lora": (-1,)}, {"adapter": ("x",)}, {"prompts": ()}):
        with pytest.raises(vpeft.ConfigError, match="noah"):
            vpeft.get_method("noah").config_cls(**bad)
    with pytest.raises(vpeft.ConfigError, match="3 blocks"):
        vpeft.apply(factory(), "noah", lora=(1, 2))
    with pytest.raises(vpeft.ConfigError, match="C='S' is invalid"):
        vpeft.apply(factory(), "glora", layers=["LLSVV"])
    with pytest.raises(vpeft.ConfigError, match="needs 1, 4 .* or 12"):
        vpeft.apply(factory(), "glora", layers=["LLLVV", "NNNNN"])
    model = factory()
    vpeft.apply(model, "noah", adapter=0, prompts=0, lora=2)  # LoRA only: identity at init and mergeable
    assert vpeft.merge(model)


# ---- the recipe and the command, end to end on a tiny generated task ---------------------------------------------
COLOURS = [(220, 30, 30), (30, 200, 40), (40, 60, 230)]


@pytest.fixture(scope="module")
def tiny_task(tmp_path_factory):
    """A VTAB-1k-format task: 3 colour classes, 16 px noisy images, 24/12/36/12 images per split."""
    root = tmp_path_factory.mktemp("data")
    task = root / "colours"
    (task / "images").mkdir(parents=True)
    g = torch.Generator().manual_seed(0)
    lines: dict[str, list[str]] = {"train800": [], "val200": [], "test": []}
    for split, n in (("train800", 24), ("val200", 12), ("test", 12)):
        for i in range(n):
            label = i % 3
            noise = torch.randint(-40, 40, (16, 16, 3), generator=g)
            pixels = (torch.tensor(COLOURS[label]) + noise).clamp(0, 255).to(torch.uint8).numpy()
            name = f"images/{split}_{i}.png"
            Image.fromarray(pixels).save(task / name)
            lines[split].append(f"{name} {label}")
    lines["train800val200"] = lines["train800"] + lines["val200"]
    for split, rows in lines.items():
        (task / f"{split}.txt").write_text("\n".join(rows) + "\n")
    return root


def test_vpeft_search_command_noah(tiny_task, tmp_path, capsys):
    out = tmp_path / "noah"
    argv = [
        "search", "--backbone", "test_vit", "--no-pretrained", "--img-size", "32", "--task", "colours",
        "--data-root", str(tiny_task), "--space", "noah", "--budget", "8000", "--supernet-epochs", "1",
        "--retrain-epochs", "1", "--population", "4", "--generations", "1", "--select", "2", "--batch-size", "12",
        "--out", str(out), "--quiet",
    ]  # fmt: skip
    assert main(argv) == 0
    assert json.loads(capsys.readouterr().out.split("\nfound config")[0])["budget"] == 8000
    summary = json.loads((out / "search_result.json").read_text())
    history = json.loads((out / "search_history.json").read_text())
    assert all(r["params"] <= 8000 for r in history["history"]) and len(history["history"]) >= 4
    assert summary["found_params"] == summary["retrain_params"] <= 8000
    assert (out / "retrain" / "delta.safetensors").is_file() and (out / "supernet" / "metrics.json").is_file()
    config = vpeft.MethodConfig.from_dict(json.loads((out / "found_config.json").read_text()))
    assert config.method == "noah" and len(config.lora) == 6
    model = build_backbone("test_vit", 3, 32, pretrained=False)
    assert vpeft.apply(model, config).method_params == summary["found_params"]


def test_run_search_glora_exports_a_mergeable_config(tiny_task, tmp_path):
    summary = run_search(
        backbone="test_vit", task="colours", data_root=tiny_task, space="glora", budget=3000, out_dir=tmp_path,
        img_size=32, pretrained=False, batch_size=12, rank=2, progress=False,
        evolution=EvolutionConfig(population=4, generations=1, select=2),
    )  # fmt: skip
    assert summary["max_params_evaluated"] <= 3000 and summary["retrain_params"] == summary["found_params"]
    assert 0.0 <= summary["top1"] <= 1.0
    found = json.loads((tmp_path / "found_config.json").read_text())
    assert found["method"] == "glora" and len(found["layers"]) == 6 * 4
    rec = evaluate_delta(tmp_path / "retrain" / "delta.safetensors", data_root=tiny_task, merged=True)
    assert rec["top1"] == pytest.approx(summary["top1"], abs=1e-6), "the retrained GLoRA subnet merges away"


def test_bad_search_input_is_a_one_line_error(tiny_task, tmp_path, capsys):
    argv = ["search", "--backbone", "test_vit", "--no-pretrained", "--img-size", "32", "--task", "colours",
            "--data-root", str(tiny_task), "--budget", "10", "--out", str(tmp_path), "--quiet"]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "below the smallest noah candidate" in err and len(err.splitlines()) == 1


def test_super_layers_are_the_real_layers_with_an_active_size():
    """NOAH's super layers subclass the real layers: the active slice computes, forward and backward, what the
    real layer of that size does (one implementation of the math); size 0 is the frozen layer."""
    assert issubclass(SuperLoRA, LoRALinear) and issubclass(SuperAdapter, SequentialAdapter)
    assert issubclass(SuperPromptedBlock, PromptedBlock)
    torch.manual_seed(0)
    base = nn.Linear(6, 6).requires_grad_(False)
    x = torch.randn(2, 9, 6)  # more rows than inputs: fused LoRA folds into a merged weight
    for sup, sub in ((SuperLoRA(base, 4), LoRALinear(base, 2, 2.0)), (SuperAdapter(base, 6, 4), None)):
        _randomise(sup)
        sup.active = 2
        sub = sub if sub is not None else SequentialAdapter(base, 6, 2, scale=1.0)
        sup.export_to(sub)
        for layer in (sup, sub):
            layer(x).square().sum().backward()
        for (_, p), (_, q) in zip(sup.delta_parameters(), sub.delta_parameters()):
            active = tuple(slice(0, n) for n in q.shape)
            torch.testing.assert_close(p.grad[active], q.grad, rtol=1e-5, atol=1e-5)
            p.grad[active] = 0
            assert not p.grad.any(), "inactive units get no gradient"
        sup.active = 0
        with torch.no_grad():
            assert torch.equal(sup(x), base(x))
