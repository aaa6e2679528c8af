"""Evaluation protocols: what is measured after a run's final training, declared by the task types that support them.

A protocol is an :class:`EvalProtocol` registered in :data:`PROTOCOLS`; a task type lists the protocols it takes in
its ``protocols`` class attribute (every task takes ``"standard"``). ``vpeft bench`` validates a task entry's
``protocol`` against its task type and runs the protocol's :meth:`~EvalProtocol.after_training` on the trained
delta; nothing in the bench names a protocol.

* ``standard``: the test split, read once (nothing more);
* ``base-to-novel`` (CoCoOp, Zhou et al., CVPR 2022; zero-shot tasks): trained on the base half of the classes,
  tested on the base classes and, with the same adapted towers, on the novel half; the score is their harmonic mean.

Cross-dataset transfer (:class:`Transfer`, the ``transfer_to`` list of a zero-shot task) is a protocol object too:
the delta evaluated zero-shot on other task folders.

The protocols evaluate through a callable the runner gives them, ``evaluate_on(task_name, **task_options)`` (the
trained towers on that task's test split), so this layer imports no training code.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from ..data.fewshot import harmonic_mean
from ..errors import ConfigError
from ..registry import Registry

__all__ = ["PROTOCOLS", "BaseToNovel", "EvalProtocol", "Standard", "Transfer", "get_protocol", "protocols_of"]

#: ``evaluate_on(task_name, **task_options) -> metrics`` of the trained model on a task's test split.
EvaluateOn = Callable[..., Mapping[str, Any]]


class EvalProtocol:
    """One evaluation protocol (see the module docstring)."""

    name: str = ""
    #: the primary metric of a record written under this protocol ("": the task's own)
    primary_metric: str = ""

    def train_options(self, options: Mapping[str, Any], where: str) -> dict[str, Any]:
        """The task options the run trains with under this protocol (a bad option: ConfigError naming ``where``)."""
        return dict(options)

    def after_training(self, score: float, options: Mapping[str, Any], evaluate_on: EvaluateOn) -> dict[str, Any]:
        """What the protocol adds to the record after the final training (``score``: the test split's)."""
        return {}


PROTOCOLS: Registry[EvalProtocol] = Registry("protocol")


def get_protocol(name: str) -> EvalProtocol:
    return PROTOCOLS.get(name)


def protocols_of(task_cls: type) -> tuple[str, ...]:
    """The protocols a task type takes: ``"standard"`` and those it declares."""
    return ("standard", *(p for p in getattr(task_cls, "protocols", ()) if p != "standard"))


class Standard(EvalProtocol):
    name = "standard"


class BaseToNovel(EvalProtocol):
    name, primary_metric = "base-to-novel", "hm"

    def train_options(self, options: Mapping[str, Any], where: str) -> dict[str, Any]:
        if options.get("classes", "base") != "base":
            raise ConfigError(f"{where}.options.classes: base-to-novel trains on the base classes; leave it out")
        return {**options, "classes": "base"}

    def after_training(self, score: float, options: Mapping[str, Any], evaluate_on: EvaluateOn) -> dict[str, Any]:
        """The novel classes of the test split, their own class names, the same adapted towers."""
        kept = {k: v for k, v in options.items() if k not in ("classes", "shots", "shot_seed")}
        novel = evaluate_on(None, **kept, classes="novel")
        base, top1 = float(score), float(novel["top1"])
        return {"protocol": self.name, "base": base, "novel": top1, "hm": harmonic_mean(base, top1),
                "novel_n": int(novel["n"])}  # fmt: skip


class Transfer:
    """Cross-dataset transfer: the delta evaluated zero-shot on each of ``tasks`` (their own class names)."""

    def __init__(self, tasks: Sequence[str]) -> None:
        self.tasks = tuple(tasks)

    def after_training(self, evaluate_on: EvaluateOn) -> dict[str, dict[str, Any]]:
        out = {}
        for name in self.tasks:
            metrics = evaluate_on(name)
            out[name] = {"top1": float(metrics["top1"]), "n": int(metrics["n"])}
        return out


for _protocol in (Standard(), BaseToNovel()):
    PROTOCOLS.register(_protocol.name, _protocol)
