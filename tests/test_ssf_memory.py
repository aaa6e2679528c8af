"""SSF on a frozen token LayerNorm keeps only the norm's input: the same results, one activation less per norm."""

from __future__ import annotations

import copy

import pytest
import torch
from saved_memory import saved_step
from tiny import NUM_CLASSES, TINY_BACKBONES
from torch import nn

import vpeft
from vpeft.layers import ScaleShift


def _step(model: nn.Module, x: torch.Tensor, y: torch.Tensor):
    """Output, loss, the trainable tensors' and the input's gradients, bytes of the storages autograd saved."""
    return saved_step(model, x, y, input_grad=True)


def _close(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_ssf_on_norms_keeps_the_input_only(monkeypatch):
    make, size = TINY_BACKBONES["vit_cls"]
    model = make().train()
    vpeft.apply(model, "ssf")
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(4, 3, size, size, generator=g), torch.randint(0, NUM_CLASSES, (4,), generator=g)
    out1, loss1, grads1, gx1, saved1 = _step(model, x, y)
    monkeypatch.setattr(ScaleShift, "_recomputes_norm", lambda self, x: False)  # today's SSF: keeps the output
    out0, loss0, grads0, gx0, saved0 = _step(copy.deepcopy(model), x, y)
    assert torch.equal(out0, out1) and torch.equal(loss0, loss1)
    assert grads0.keys() == grads1.keys()
    for name in grads0:
        _close(grads1[name], grads0[name])
    _close(gx1, gx0)
    # norm1 and norm2 of both blocks: one (batch x tokens x width) fp32 tensor each (the final norm's output
    # stays: the trainable head saves its class-token view); every norm's mean and 1/std (batch x tokens) too
    tokens, width = model.patch_embed.num_patches + 1, model.embed_dim
    assert saved0 - saved1 == 4 * (4 * tokens * width * 4) + 5 * 2 * (4 * tokens * 4)


@pytest.mark.parametrize("norm_cls", [nn.LayerNorm, "timm"])
@pytest.mark.parametrize("small_scale", [False, True])
def test_norm_scale_shift_matches_autograd(norm_cls, small_scale):
    from timm.layers import LayerNorm

    torch.manual_seed(0)
    norm = (LayerNorm if norm_cls == "timm" else nn.LayerNorm)(12).requires_grad_(False)
    with torch.no_grad():
        norm.weight.normal_(), norm.bias.normal_()
    layer = ScaleShift(norm)
    if small_scale:  # where today's SSF saves the output it divides by gamma; here nothing does
        with torch.no_grad():
            layer.scale[:3] = 1e-5
    x, g = torch.randn(2, 5, 12, dtype=torch.float64), torch.randn(2, 5, 12, dtype=torch.float64)
    layer = layer.double()
    xi = x.clone().requires_grad_(True)
    out = layer(xi)
    assert out.grad_fn.name() == "_NormScaleShiftFnBackward"
    out.backward(g)
    xr = x.clone().requires_grad_(True)  # the reference: plain autograd on the same formula
    ref = norm.double()(xr) * layer.scale + layer.shift
    gs, gb, gx = torch.autograd.grad(ref, [layer.scale, layer.shift, xr], g)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)
    for a, b in ((layer.scale.grad, gs), (layer.shift.grad, gb), (xi.grad, gx)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_norm_scale_shift_falls_back_where_it_cannot_recompute():
    norm = nn.LayerNorm(8)  # trainable affine (composed with LN-tune): autograd as before
    layer = ScaleShift(norm)
    assert layer(torch.randn(2, 3, 8)).grad_fn.name() != "_NormScaleShiftFnBackward"
    norm.requires_grad_(False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert layer(torch.randn(2, 3, 8)).grad_fn.name() != "_NormScaleShiftFnBackward"
    with torch.no_grad():
        assert layer(torch.randn(2, 3, 8)).grad_fn is None


def test_ssf_after_the_attention_projection_keeps_no_activation(monkeypatch):
    """The projection after a fused attention: its output is recomputed from the attention's output (which the
    attention keeps) instead of kept; one (batch x tokens x width) tensor less per block, same results."""
    make, size = TINY_BACKBONES["vit_cls"]
    model = make().train()
    vpeft.apply(model, "ssf")
    marked = [n for n, m in model.named_modules() if isinstance(m, ScaleShift) and m.recompute_base]
    assert marked == [f"blocks.{i}.attn.proj" for i in range(len(model.blocks))]
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(4, 3, size, size, generator=g), torch.randint(0, NUM_CLASSES, (4,), generator=g)
    out1, loss1, grads1, gx1, saved1 = _step(model, x, y)
    monkeypatch.setattr(ScaleShift, "_recomputes_linear", lambda self, x: False)  # today's SSF: keeps the output
    out0, loss0, grads0, gx0, saved0 = _step(copy.deepcopy(model), x, y)
    assert torch.equal(out0, out1) and torch.equal(loss0, loss1)
    assert grads0.keys() == grads1.keys()
    for name in grads0:
        _close(grads1[name], grads0[name])
    _close(gx1, gx0)
    tokens, width = model.patch_embed.num_patches + 1, model.embed_dim
    assert saved0 - saved1 == len(model.blocks) * (4 * tokens * width * 4)


@pytest.mark.parametrize("bias", [True, False])
def test_linear_scale_shift_matches_a_float64_reference(bias):
    torch.manual_seed(0)
    layer = ScaleShift(nn.Linear(12, 12, bias=bias).requires_grad_(False)).double()
    layer.recompute_base = True
    x, g = torch.randn(2, 5, 12, dtype=torch.float64), torch.randn(2, 5, 12, dtype=torch.float64)
    xi = x.clone().requires_grad_(True)
    out = layer(xi)
    assert out.grad_fn.name() == "_LinearScaleShiftFnBackward"
    out.backward(g)
    xr = x.clone().requires_grad_(True)
    ref = layer.base_layer(xr) * layer.scale + layer.shift  # plain autograd on the same formula
    gs, gb, gx = torch.autograd.grad(ref, [layer.scale, layer.shift, xr], g)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)
    for a, b in ((layer.scale.grad, gs), (layer.shift.grad, gb), (xi.grad, gx)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_linear_scale_shift_falls_back():
    base = nn.Linear(8, 8)  # trainable (composed with full or BitFit-like training): autograd as before
    layer = ScaleShift(base)
    layer.recompute_base = True
    x = torch.randn(2, 3, 8)
    assert layer(x).grad_fn.name() != "_LinearScaleShiftFnBackward"
    base.requires_grad_(False)
    assert layer(x).grad_fn.name() == "_LinearScaleShiftFnBackward"
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert layer(x).grad_fn.name() != "_LinearScaleShiftFnBackward"
    layer.recompute_base = False
    assert layer(x).grad_fn.name() != "_LinearScaleShiftFnBackward"
