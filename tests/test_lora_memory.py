"""Fused LoRA shares its saved input with the LayerNorm / GELU before it: the same results, no activation of its own."""

from __future__ import annotations

import copy

import pytest
import torch
from saved_memory import saved_step
from tiny import NUM_CLASSES, TINY_BACKBONES
from torch import nn

import vpeft
from vpeft.delta import read_delta
from vpeft.layers import LoRALinear
from vpeft.layers import lora as lora_mod

WIDE = ["qkv", "proj", "fc1", "fc2"]


def _step(model: nn.Module, x: torch.Tensor, y: torch.Tensor):
    """Output, loss, the trainable tensors' gradients and the bytes of the storages autograd saved (weights out)."""
    out, loss, grads, _, saved = saved_step(model, x, y)
    return out, loss, grads, saved


def _lora_model(dtype=torch.float32, **kwargs) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    make, size = TINY_BACKBONES["vit_cls"]
    model = make().to(dtype).train()
    vpeft.apply(model, "lora", r=2, alpha=4.0, targets=WIDE, **kwargs)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.1, generator=torch.Generator().manual_seed(len(n)))
    g = torch.Generator().manual_seed(3)
    x = torch.randn(4, 3, size, size, generator=g).to(dtype)
    return model, x, torch.randint(0, NUM_CLASSES, (4,), generator=g)


def _unshared(monkeypatch) -> None:
    """Today's fused layer: it saves its own input (no producer is recognised)."""
    monkeypatch.setattr(lora_mod, "_source_of", lambda x: None)


def test_wide_lora_shares_inputs_bit_identically(monkeypatch):
    model, x, y = _lora_model()
    out1, loss1, grads1, saved1 = _step(model, x, y)
    _unshared(monkeypatch)
    out0, loss0, grads0, saved0 = _step(copy.deepcopy(model), x, y)
    assert torch.equal(out0, out1) and torch.equal(loss0, loss1)
    assert grads0.keys() == grads1.keys() and any("lora_A" in n for n in grads0)
    for name in grads0:
        assert torch.equal(grads1[name], grads0[name]), name
    # rows = batch x tokens; per block the inputs of fc1 (norm2's output, width 32) and fc2 (GELU's output, width
    # 64) are shared, and qkv's (norm1's output) in block 1 only: block 0's norm1 reads the frozen embedding, which
    # requires no grad, so its backward keeps nothing to share
    rows = 4 * (model.patch_embed.num_patches + 1)
    assert saved0 - saved1 == 4 * rows * (2 * 32 + 2 * 64 + 32)


def test_shared_inputs_match_a_float64_autograd_reference(monkeypatch):
    model, x, y = _lora_model(torch.float64)
    out1, loss1, grads1, _ = _step(model, x, y)
    monkeypatch.setattr(LoRALinear, "fused", False)  # plain autograd: base output + F.linear(F.linear(x, A), B)
    out0, loss0, grads0, _ = _step(model, x, y)
    torch.testing.assert_close(out1, out0, rtol=1e-12, atol=1e-12)
    for name in grads0:
        torch.testing.assert_close(grads1[name], grads0[name], rtol=1e-10, atol=1e-12, msg=name)


class _LNThenLoRA(nn.Module):
    def __init__(self, inplace: bool) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(8).requires_grad_(False)
        self.lin = LoRALinear(nn.Linear(8, 6).requires_grad_(False), r=2, alpha=2.0)
        nn.init.normal_(self.lin.lora_B[0])
        self.inplace = inplace

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        if self.inplace:
            h.mul_(2.0)  # the producer's output changed after it was tagged: recomputing it would be wrong
        return self.lin(h)


@pytest.mark.parametrize("inplace", [False, True])
def test_shared_only_while_the_producer_output_is_unmodified(inplace):
    torch.manual_seed(0)
    layer = _LNThenLoRA(inplace)
    assert lora_mod.share_inputs(layer) == 1 and lora_mod.share_inputs(layer) == 1  # idempotent
    x = torch.randn(3, 5, 8, dtype=torch.float64, requires_grad=True)
    layer.double()

    def grads(fused: bool):
        layer.lin.fused = fused
        out = layer(x)
        out.pow(2).sum().backward()
        got = [t.grad.clone() for t in (x, layer.lin.lora_A[0], layer.lin.lora_B[0])]
        for t in (x, layer.lin.lora_A[0], layer.lin.lora_B[0]):
            t.grad = None
        return out.detach(), got

    out_f, grads_f = grads(True)
    out_u, grads_u = grads(False)
    torch.testing.assert_close(out_f, out_u, rtol=1e-12, atol=1e-12)
    for a, b in zip(grads_f, grads_u):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_dropout_and_trainable_base_fall_back(monkeypatch):
    """Dropout: the branch reads the dropped-out input, so the producer's output is not what it needs (saved as
    before, same mask as the reference); a trainable base runs the reference path."""
    model, x, y = _lora_model(dropout=0.3)
    torch.manual_seed(5)
    out1, _, grads1, saved1 = _step(model, x, y)
    monkeypatch.setattr(LoRALinear, "fused", False)
    torch.manual_seed(5)
    out0, _, grads0, _ = _step(model, x, y)
    torch.testing.assert_close(out1, out0, rtol=1e-5, atol=1e-6)
    for name in grads0:
        torch.testing.assert_close(grads1[name], grads0[name], rtol=1e-5, atol=1e-6, msg=name)
    monkeypatch.setattr(LoRALinear, "fused", True)
    plain, px, py = _lora_model()
    assert _step(plain, px, py)[3] < saved1  # without dropout the inputs are shared

    base = nn.Linear(8, 6)
    layer = LoRALinear(base, r=2, alpha=2.0)  # base weight trainable
    h = nn.LayerNorm(8).requires_grad_(False)
    lora_mod.share_inputs(h)
    out = layer(h(torch.randn(4, 8, requires_grad=True)))
    assert type(out.grad_fn).__name__ != "FusedLoRAFunctionBackward"
    out.sum().backward()
    assert base.weight.grad is not None


def test_sharing_leaves_names_deltas_and_merge_unchanged(tmp_path, monkeypatch):
    model, x, _ = _lora_model()
    assert any(getattr(m, "vpeft_tags_output", False) for m in model.modules())
    monkeypatch.setattr("vpeft.methods.lora.share_inputs", lambda m: 0)
    plain, _, _ = _lora_model()  # the same LoRA (same seeds) without the tagging hooks
    assert not any(getattr(m, "vpeft_tags_output", False) for m in plain.modules())
    sd, sd_plain = model.state_dict(), plain.state_dict()
    assert list(sd) == list(sd_plain) and all(torch.equal(sd[k], sd_plain[k]) for k in sd)
    vpeft.save(model, tmp_path / "a.safetensors")
    vpeft.save(plain, tmp_path / "b.safetensors")
    (meta_a, tensors_a), (meta_b, tensors_b) = (read_delta(tmp_path / f"{n}.safetensors") for n in "ab")
    assert list(tensors_a) == list(tensors_b) and all(torch.equal(tensors_a[k], tensors_b[k]) for k in tensors_a)
    differ = {k for k in meta_a.keys() | meta_b.keys() if meta_a.get(k) != meta_b.get(k)}
    assert differ <= {"created", "created_at", "content_sha256", "time"}, differ
    model.eval()
    with torch.no_grad():
        before = model(x)
        vpeft.merge(model)
        merged = model(x)
        vpeft.unmerge(model)
        after = model(x)
    torch.testing.assert_close(merged, before, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(after, before, rtol=1e-6, atol=1e-6)
