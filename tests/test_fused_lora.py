"""The fused LoRA autograd function: exact gradients, equality with the unfused reference, fall-backs."""

from __future__ import annotations

import pytest
import torch
from tiny import TINY_BACKBONES, batch
from torch import nn

import vpeft
from vpeft.layers import LoRALinear
from vpeft.layers.lora import fused_lora_linear

SLICES = {
    "whole": [(0, 12)],
    "q_v": [(0, 4), (8, 12)],
    "q_k_v": [(0, 4), (4, 8), (8, 12)],
}


# rows of x (batch * tokens) vs in = 5 and out = 12 features: each path of the function (the low-rank
# term in place, or folded into a temporary merged weight) is taken in forward and in backward
ROWS = {"in-place": (1, 2), "fold-forward": (2, 3), "fold-both": (4, 4)}


def _operands(slices, r=2, bias=True, seed=0, rows=(2, 3)):
    g = torch.Generator().manual_seed(seed)
    dt = torch.float64
    x = torch.randn(*rows, 5, generator=g, dtype=dt, requires_grad=True)
    w = torch.randn(12, 5, generator=g, dtype=dt)
    b = torch.randn(12, generator=g, dtype=dt) if bias else None
    a = [torch.randn(r, 5, generator=g, dtype=dt, requires_grad=True) for _ in slices]
    bb = [torch.randn(stop - start, r, generator=g, dtype=dt, requires_grad=True) for start, stop in slices]
    return x, w, b, a, bb


@pytest.mark.parametrize("slices", SLICES.values(), ids=SLICES.keys())
@pytest.mark.parametrize("scaling", [1.0, 0.5])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("rows", ROWS.values(), ids=ROWS.keys())
def test_gradcheck(slices, scaling, bias, rows):
    x, w, b, a, bb = _operands(slices, bias=bias, rows=rows)
    k = len(slices)

    def fn(x, *ab):
        return fused_lora_linear(x, w, b, list(ab[:k]), list(ab[k:]), scaling, slices)

    assert torch.autograd.gradcheck(fn, (x, *a, *bb))


@pytest.mark.parametrize("slices", SLICES.values(), ids=SLICES.keys())
def test_gradcheck_separate_branch_input(slices):
    """With dropout the branch reads ``h`` (the dropped-out x): its gradient is returned separately."""
    x, w, b, a, bb = _operands(slices)
    h = torch.randn(2, 3, 5, dtype=torch.float64, requires_grad=True)
    k = len(slices)

    def fn(x, h, *ab):
        return fused_lora_linear(x, w, b, list(ab[:k]), list(ab[k:]), 0.25, slices, h=h)

    assert torch.autograd.gradcheck(fn, (x, h, *a, *bb))


def _pair(slices, alpha=4.0, r=3, dropout=0.0, seed=0):
    torch.manual_seed(seed)
    base = nn.Linear(16, 24).requires_grad_(False)
    layer = LoRALinear(base, r, alpha, dropout, slices)
    with torch.no_grad():
        for b in layer.lora_B:
            b.normal_()
    return layer


def _grads(layer, x, fused):
    layer.fused = fused
    x = x.clone().requires_grad_(True)
    out = layer(x)
    (out * torch.linspace(-1, 1, out.shape[-1])).sum().backward()
    grads = [x.grad] + [p.grad.clone() for p in layer.parameters() if p.requires_grad]
    layer.zero_grad(set_to_none=True)
    return out.detach(), grads


@pytest.mark.parametrize("slices", [None, [(0, 8), (16, 24)], [(0, 8), (8, 16), (16, 24)]])
@pytest.mark.parametrize("alpha", [3.0, 6.0])
@pytest.mark.parametrize("rows", [(1, 7), (4, 7)])
def test_equals_unfused_reference(slices, alpha, rows):
    layer = _pair(slices, alpha=alpha)
    x = torch.randn(*rows, 16)
    out_f, grads_f = _grads(layer, x, fused=True)
    out_u, grads_u = _grads(layer, x, fused=False)
    torch.testing.assert_close(out_f, out_u, rtol=1e-5, atol=1e-5)
    assert len(grads_f) == len(grads_u) == 1 + 2 * len(layer.slices)
    for gf, gu in zip(grads_f, grads_u):
        torch.testing.assert_close(gf, gu, rtol=1e-5, atol=1e-5)
    assert layer.base_layer.weight.grad is None and layer.base_layer.bias.grad is None


@pytest.mark.parametrize("rows", [1, 40])
def test_inference_equals_reference(rows):
    layer = _pair([(0, 8), (16, 24)])
    x = torch.randn(rows, 16)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), layer.forward_unfused(x), rtol=1e-5, atol=1e-5)
    with torch.inference_mode():
        torch.testing.assert_close(layer(x), layer.forward_unfused(x), rtol=1e-5, atol=1e-5)


def test_frozen_lora_tensors_get_no_gradient():
    layer = _pair([(0, 8), (16, 24)])
    layer.lora_A.requires_grad_(False)
    x = torch.randn(40, 16, requires_grad=True)
    layer(x).sum().backward()
    assert all(b.grad is not None for b in layer.lora_B) and all(a.grad is None for a in layer.lora_A)
    layer.fused = False
    x2 = x.detach().clone().requires_grad_(True)
    layer(x2).sum().backward()
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-5, atol=1e-5)


def test_dropout_same_mask_as_reference():
    layer = _pair([(0, 8), (16, 24)], dropout=0.5).train()
    x = torch.randn(4, 7, 16)
    torch.manual_seed(11)
    out_f, grads_f = _grads(layer, x, fused=True)
    torch.manual_seed(11)
    out_u, grads_u = _grads(layer, x, fused=False)
    torch.testing.assert_close(out_f, out_u, rtol=1e-5, atol=1e-5)
    for gf, gu in zip(grads_f, grads_u):
        torch.testing.assert_close(gf, gu, rtol=1e-5, atol=1e-5)


def test_uses_fused_path_and_falls_back():
    layer = _pair(None)
    x = torch.randn(2, 16, requires_grad=True)
    assert type(layer(x).grad_fn).__name__ == "FusedLoRAFunctionBackward"
    layer.base_layer.weight.requires_grad_(True)  # a trainable base needs its weight gradient: reference path
    assert type(layer(x).grad_fn).__name__ != "FusedLoRAFunctionBackward"
    layer.base_layer.weight.requires_grad_(False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
    assert type(out.grad_fn).__name__ != "FusedLoRAFunctionBackward"
    assert out.dtype == torch.bfloat16


def test_saves_only_the_input():
    """Activation memory: the fused function keeps x only (x A^T is recomputed), never an output-sized tensor."""
    layer = _pair([(0, 8), (8, 16), (16, 24)])
    x = torch.randn(8, 50, 16, requires_grad=True)

    def saved_bytes(fused):
        layer.fused = fused
        storages = {}

        def pack(t):
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            layer(x)
        params = {p.untyped_storage().data_ptr() for p in layer.parameters()}
        return sum(n for ptr, n in storages.items() if ptr not in params)

    assert saved_bytes(True) == x.untyped_storage().nbytes()
    assert saved_bytes(True) <= saved_bytes(False)


def test_checkpoint_layout_unchanged():
    layer = _pair([(0, 8), (16, 24)])
    assert sorted(k for k in layer.state_dict() if "lora" in k) == ["lora_A.0", "lora_A.1", "lora_B.0", "lora_B.1"]


@pytest.mark.parametrize("bb", ["vit_cls", "vit_reg_ls"])
def test_whole_model_fused_equals_unfused(bb, monkeypatch):
    factory, size = TINY_BACKBONES[bb]
    model = factory()
    vpeft.apply(model, "lora", r=2, alpha=4.0, targets=["qkv", "proj", "fc1", "fc2"])
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.1)
    x = batch(size)

    def run(fused):
        monkeypatch.setattr(LoRALinear, "fused", fused)
        model.zero_grad(set_to_none=True)
        out = model.train()(x)
        out.pow(2).mean().backward()
        return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    out_f, grads_f = run(True)
    out_u, grads_u = run(False)
    torch.testing.assert_close(out_f, out_u, rtol=1e-5, atol=1e-5)
    assert grads_f.keys() == grads_u.keys()
    for n in grads_f:
        torch.testing.assert_close(grads_f[n], grads_u[n], rtol=1e-4, atol=1e-6, msg=n)
