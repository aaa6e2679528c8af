"""The one training loop, its optimizer and schedule, and evaluation.

Typical use::

    from vpeft.train import TrainConfig, evaluate, train

    cfg = TrainConfig(epochs=10, lr=1e-3, batch_size=64)
    result = train(model, train_loader, cfg, val_loader=val_loader, device="cuda", out_dir="runs/x")
    test = evaluate(model, test_loader, device="cuda")  # {"top1": fraction in [0, 1], "loss", "n"}
"""

from vpeft.train.engine import (
    NO_DECAY_ATTR,
    Callback,
    TrainConfig,
    TrainResult,
    WarmupCosine,
    build_optimizer,
    build_scheduler,
    evaluate,
    mark_no_decay,
    set_seed,
    train,
)
from vpeft.train.metrics import ClassificationMeter, topk_correct, write_json_atomic

__all__ = [
    "NO_DECAY_ATTR",
    "Callback",
    "ClassificationMeter",
    "TrainConfig",
    "TrainResult",
    "WarmupCosine",
    "build_optimizer",
    "build_scheduler",
    "evaluate",
    "mark_no_decay",
    "set_seed",
    "topk_correct",
    "train",
    "write_json_atomic",
]
