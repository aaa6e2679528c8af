"""One training step that also counts what autograd saved: the exact-memory measure of the memory tests.

``saved`` is the bytes of the distinct storages autograd's saved-tensor hooks see, the parameters and the input
excluded (``benchmarks/bench_step.py`` counts the same way): two tensors viewing one storage count once.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def saved_step(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, input_grad: bool = False, seed: int | None = None
):
    """``(output, loss, the trainable tensors' gradients, the input's gradient or None, saved bytes)`` of one
    cross-entropy step; ``seed`` seeds the global generator first (drop-path draws from it). The model's gradients
    are cleared afterwards, so a copy made after the step starts from none."""
    if input_grad:
        x = x.clone().requires_grad_(True)
    weights = {t.untyped_storage().data_ptr() for t in [*model.parameters(), x]}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.untyped_storage().data_ptr() not in weights:
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    if seed is not None:
        torch.manual_seed(seed)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(x)
        loss = F.cross_entropy(out, y)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return out.detach(), loss.detach(), grads, (x.grad if input_grad else None), sum(saved.values())
