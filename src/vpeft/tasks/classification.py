"""Image classification: the backbone's own classifier, cross-entropy, top-1 accuracy (today's default task)."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from .base import Meter, Task, register_task

__all__ = ["ClassificationMeter", "ClassificationTask", "logits_of", "topk_correct"]


def logits_of(output: Any) -> torch.Tensor:
    """The logits of a model's output: the tensor itself (timm) or ``output.logits`` (Hugging Face)."""
    from ..arch.hf import logits_of as _hf_logits  # the arch layer knows Hugging Face's output types

    return _hf_logits(output)


def topk_correct(logits: torch.Tensor, targets: torch.Tensor, k: int = 1) -> torch.Tensor:
    """Number of rows whose target is among the ``k`` highest logits (a 0-d tensor on the logits' device)."""
    k = min(k, logits.shape[-1])
    top = logits.topk(k, dim=-1).indices
    return (top == targets.unsqueeze(-1)).any(dim=-1).sum()


class ClassificationMeter(Meter):
    """Running mean loss and top-1 accuracy over batches.

    Sums stay on the device as tensors, so updating never synchronises with an accelerator; call
    :meth:`compute` (which does) when the numbers are needed.
    """

    def __init__(self) -> None:
        self.loss_sum: torch.Tensor | float = 0.0
        self.correct: torch.Tensor | int = 0
        self.n = 0

    def update(self, loss: torch.Tensor, output: Any, target: torch.Tensor) -> None:
        """Add one batch: ``loss`` is the batch-mean loss, ``output`` logits ``(B, C)`` (or a model output)."""
        logits = logits_of(output)
        batch = target.shape[0]
        self.loss_sum = self.loss_sum + loss.detach().float() * batch
        self.correct = self.correct + topk_correct(logits.detach(), target, 1)
        self.n += batch

    def sums(self) -> torch.Tensor:
        return torch.tensor([float(self.loss_sum), float(self.correct), float(self.n)], dtype=torch.float64)

    def load_sums(self, sums: torch.Tensor) -> None:
        self.loss_sum, self.correct, self.n = float(sums[0]), round(float(sums[1])), round(float(sums[2]))

    def compute(self) -> dict[str, float | int]:
        """Return ``{"loss": mean loss, "top1": fraction correct in [0, 1], "n": samples}`` (NaN when empty)."""
        if self.n == 0:
            return {"loss": float("nan"), "top1": float("nan"), "n": 0}
        return {"loss": float(self.loss_sum) / self.n, "top1": float(self.correct) / self.n, "n": self.n}


@register_task
class ClassificationTask(Task):
    """One label per image; the head is the backbone's classifier (created with ``num_classes``)."""

    kind: ClassVar[str] = "classification"
    primary_metric: ClassVar[str] = "top1"

    def loss(self, output: Any, target: torch.Tensor, *, label_smoothing: float = 0.0) -> torch.Tensor:
        return F.cross_entropy(logits_of(output).float(), target, label_smoothing=label_smoothing)

    def new_meter(self) -> ClassificationMeter:
        return ClassificationMeter()

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind}
