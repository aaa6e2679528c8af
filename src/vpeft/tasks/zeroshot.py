"""Zero-shot (and prompt-learned) classification with a two-tower CLIP on the task slot.

Reference: Radford et al., "Learning Transferable Visual Models From Natural Language Supervision", ICML 2021
(zero-shot transfer, prompt ensembling); Zhou et al., "Learning to Prompt for Vision-Language Models" (CoOp),
IJCV 2022 (the per-dataset hand-crafted templates in :data:`COOP_TEMPLATES`).

The classes are *names* (``classes.txt``, underscores read as spaces), not indices into a trained head: the text
tower turns them into class weights, ``logits = logit_scale.exp() * norm(image) @ norm(text).T``. The text side is
the backbone's ``prompt`` slot (hand-written templates, or a learned prompt: CoOp, CoCoOp, MaPLe); its features
are computed once and cached while nothing that produces them changes (the cache is keyed on the version counters
of every text-side parameter, so an optimiser step or a loaded delta invalidates it) and recomputed every step
while a prompt learner or the text tower trains. A conditional prompt (CoCoOp) gives per-image class weights.

The same adapted backbone serves other class lists: ``ZeroShotTask(other_names).build(model.backbone)`` evaluates a
prompt trained on base classes on novel ones (base-to-novel) or on another data set (cross-dataset transfer).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from .._modules import tensor_versions
from ..config import Range
from ..errors import ConfigError, DataError
from .base import Task, TaskModel, register_task
from .classification import ClassificationMeter

__all__ = [
    "ZeroShotTask",
    "ZeroShotModel",
    "IMAGENET_TEMPLATES",
    "COOP_TEMPLATES",
    "templates_for",
    "read_class_names",
    "zero_shot_logits",
]

#: CLIP's 80 ImageNet prompt templates (Radford et al. 2021, the released prompt-engineering notebook)
IMAGENET_TEMPLATES: tuple[str, ...] = (
    "a bad photo of a {}.",
    "a photo of many {}.",
    "a sculpture of a {}.",
    "a photo of the hard to see {}.",
    "a low resolution photo of the {}.",
    "a rendering of a {}.",
    "graffiti of a {}.",
    "a bad photo of the {}.",
    "a cropped photo of the {}.",
    "a tattoo of a {}.",
    "the embroidered {}.",
    "a photo of a hard to see {}.",
    "a bright photo of a {}.",
    "a photo of a clean {}.",
    "a photo of a dirty {}.",
    "a dark photo of the {}.",
    "a drawing of a {}.",
    "a photo of my {}.",
    "the plastic {}.",
    "a photo of the cool {}.",
    "a close-up photo of a {}.",
    "a black and white photo of the {}.",
    "a painting of the {}.",
    "a painting of a {}.",
    "a pixelated photo of the {}.",
    "a sculpture of the {}.",
    "a bright photo of the {}.",
    "a cropped photo of a {}.",
    "a plastic {}.",
    "a photo of the dirty {}.",
    "a jpeg corrupted photo of a {}.",
    "a blurry photo of the {}.",
    "a photo of the {}.",
    "a good photo of the {}.",
    "a rendering of the {}.",
    "a {} in a video game.",
    "a photo of one {}.",
    "a doodle of a {}.",
    "a close-up photo of the {}.",
    "a photo of a {}.",
    "the origami {}.",
    "the {} in a video game.",
    "a sketch of a {}.",
    "a doodle of the {}.",
    "a origami {}.",
    "a low resolution photo of a {}.",
    "the toy {}.",
    "a rendition of the {}.",
    "a photo of the clean {}.",
    "a photo of a large {}.",
    "a rendition of a {}.",
    "a photo of a nice {}.",
    "a photo of a weird {}.",
    "a blurry photo of a {}.",
    "a cartoon {}.",
    "art of a {}.",
    "a sketch of the {}.",
    "a embroidered {}.",
    "a pixelated photo of a {}.",
    "itap of the {}.",
    "a jpeg corrupted photo of the {}.",
    "a good photo of a {}.",
    "a plushie {}.",
    "a photo of the nice {}.",
    "a photo of the small {}.",
    "a photo of the weird {}.",
    "the cartoon {}.",
    "art of the {}.",
    "a drawing of the {}.",
    "a photo of the large {}.",
    "a black and white photo of a {}.",
    "the plushie {}.",
    "a dark photo of a {}.",
    "itap of a {}.",
    "graffiti of the {}.",
    "a toy {}.",
    "itap of my {}.",
    "a photo of a cool {}.",
    "a photo of a small {}.",
    "a tattoo of the {}.",
)

#: CoOp's single hand-crafted template per data set (Zhou et al. 2022, Table/appendix; CoOp's dataset configs),
#: keyed by CoOp's data-set names and the VTAB-1k task names used here
COOP_TEMPLATES: Mapping[str, str] = {
    "imagenet": "a photo of a {}.",
    "caltech101": "a photo of a {}.",
    "oxford_pets": "a photo of a {}, a type of pet.",
    "oxford_iiit_pet": "a photo of a {}, a type of pet.",
    "stanford_cars": "a photo of a {}.",
    "oxford_flowers": "a photo of a {}, a type of flower.",
    "oxford_flowers102": "a photo of a {}, a type of flower.",
    "food101": "a photo of {}, a type of food.",
    "fgvc_aircraft": "a photo of a {}, a type of aircraft.",
    "sun397": "a photo of a {}.",
    "dtd": "{} texture.",
    "dtd10": "{} texture.",
    "eurosat": "a centered satellite photo of {}.",
    "ucf101": "a photo of a person doing {}.",
    "cifar10": "a photo of a {}.",
    "cifar100": "a photo of a {}.",
}
DEFAULT_TEMPLATE = "a photo of a {}."


CLASS_SETS = ("all", "base", "novel")


def _class_indices(which: str, n: int) -> list[int]:
    from ..data.fewshot import base_novel_split

    if which == "all":
        return list(range(n))
    base, novel = base_novel_split(n)
    return base if which == "base" else novel


def _default_lists_dir() -> Path:
    import os

    return Path(os.environ.get("VPEFT_CACHE") or Path.home() / ".cache" / "vpeft") / "fewshot"


def templates_for(dataset: str, ensemble: bool = False) -> tuple[str, ...]:
    """The prompt templates of a data set: CoOp's single template (default ``"a photo of a {}."``), or CLIP's 80."""
    if ensemble:
        return IMAGENET_TEMPLATES
    return (COOP_TEMPLATES.get(dataset.lower(), DEFAULT_TEMPLATE),)


def read_class_names(task_dir: str | Path) -> tuple[str, ...]:
    """Class names from ``<task_dir>/classes.txt`` (one per line, label order), underscores read as spaces."""
    path = Path(task_dir) / "classes.txt"
    if not path.is_file():
        raise DataError(f"{str(path)!r} does not exist; a zero-shot task needs its class names in classes.txt")
    names = [line.strip().replace("_", " ") for line in path.read_text().splitlines() if line.strip()]
    if not names:
        raise DataError(f"{str(path)!r} lists no class names")
    return tuple(names)


def zero_shot_logits(image: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """``logit_scale.exp() * norm(image) @ norm(text).T``; ``text`` ``(C, E)`` or per image ``(B, C, E)``."""
    image, text = F.normalize(image, dim=-1), F.normalize(text, dim=-1)
    scores = image @ text.T if text.dim() == 2 else torch.einsum("be,bce->bc", image, text)
    return logit_scale.exp() * scores


class ZeroShotModel(TaskModel):
    """A CLIP backbone classifying images among the task's class names (``decoder``: empty, nothing outside it).

    ``forward(images) -> (B, C)`` logits.
    """

    def __init__(self, backbone: nn.Module, task: ZeroShotTask) -> None:
        super().__init__(backbone, nn.Module(), task)
        self.__dict__["_cache"] = None
        if task.probe:  # a linear classifier on the frozen image feature, initialised as the zero-shot one
            self.decoder = self._zero_shot_probe()

    def _zero_shot_probe(self) -> nn.Linear:
        """``Linear(E, C)`` with ``W = exp(logit_scale) * normalize(text features)``, ``b = 0``: at initialisation its
        logits on the normalised image feature equal zero-shot CLIP's (the linear-probe baseline, initialised from
        the text side as in CLIP-LoRA's and LP++'s baselines rather than from random)."""
        with torch.no_grad():
            text = F.normalize(self.text_features().float(), dim=-1)
            probe = nn.Linear(text.shape[1], text.shape[0])
            probe.weight.copy_(self.backbone.logit_scale.exp().float() * text)
            probe.bias.zero_()
        return probe.to(device=self.backbone.logit_scale.device, dtype=self.backbone.logit_scale.dtype)

    def _text_parameters(self) -> list[torch.Tensor]:
        b = self.backbone
        mods = [b.prompt, b.text] + [m for m in (getattr(b, "text_proj", None),) if m is not None]
        return [p for m in mods for p in m.parameters()]

    def text_features(self, image_features: torch.Tensor | None = None) -> torch.Tensor:
        """The class weights ``(C, E)`` (``(B, C, E)`` for a conditional prompt), cached while valid."""
        task, prompt = self.task, self.backbone.prompt
        prompt.check_classes(len(task.class_names))
        args = (self.backbone, task.class_names, task.templates)
        if prompt.conditional:
            return prompt.text_features(*args, image_features)
        params = self._text_parameters()
        trains = torch.is_grad_enabled() and any(p.requires_grad for p in params)
        if trains:
            self.__dict__["_cache"] = None
            return prompt.text_features(*args)
        # inference-mode tensors cannot enter autograd later: a cache filled under inference_mode serves only it
        key = (
            task.class_names,
            task.templates,
            str(self.backbone.device),
            torch.is_inference_mode_enabled(),
            tensor_versions(params),
            tuple(id(p) for p in params),
        )
        cache = self.__dict__["_cache"]
        if cache is None or cache[0] != key:
            with torch.no_grad():
                cache = (key, prompt.text_features(*args))
            self.__dict__["_cache"] = cache
        return cache[1]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        b = self.backbone
        image = b.encode_image(images, b.prompt.vision_prompts(b))
        if self.task.probe:
            return self.decoder(F.normalize(image, dim=-1))
        return zero_shot_logits(image, self.text_features(image), b.logit_scale)


@register_task
@dataclasses.dataclass(frozen=True)
class ZeroShotTask(Task):
    """Classify among class *names* with a CLIP backbone.

    Attributes:
        class_names: the classes, in label order.
        templates: prompt templates with one ``{}`` for the class name (several: CLIP's ensemble).
        context_length: text context (CLIP: 77; larger is refused).
        classes: which of the folder's classes the task holds: ``"all"``, or for the base-to-novel protocol
            (CoCoOp) ``"base"`` (the first ceil(n/2) labels) or ``"novel"`` (the rest); samples of the other
            classes are dropped and labels renumbered within the subset.
        shots: K of a K-shot training set (CoOp: 1, 2, 4, 8, 16), drawn per class from the training split with
            ``shot_seed`` when the dataset is built for training, the drawn list written to ``lists_dir``
            (default ``$VPEFT_CACHE/fewshot``) so that a run can be reproduced; ``None``: the whole split.
        folder_classes: the folder's class count (set by :meth:`from_folder`; base/novel are taken from it).
        probe: the linear-probe baseline (Radford et al., ICML 2021's evaluation of CLIP features): a trained
            ``Linear(E, C)`` on the normalised image feature, initialised from the zero-shot class weights, as the
            task's decoder (train it with method ``linear``; it is class-specific, so no base-to-novel transfer).
    """

    kind: ClassVar[str] = "zeroshot"
    protocols: ClassVar[tuple[str, ...]] = ("base-to-novel",)
    transfers: ClassVar[bool] = True
    primary_metric: ClassVar[str] = "top1"
    folder_kinds: ClassVar[tuple[str, ...]] = ("classification",)  # reads VTAB-format classification folders
    class_names: tuple[str, ...] = ()
    templates: tuple[str, ...] = (DEFAULT_TEMPLATE,)
    context_length: int = 77
    classes: str = "all"
    shots: int | None = None
    shot_seed: int = 0
    lists_dir: str | None = None
    folder_classes: int | None = None
    probe: bool = False

    def __post_init__(self) -> None:
        for name in ("class_names", "templates"):
            value = getattr(self, name)
            object.__setattr__(self, name, (value,) if isinstance(value, str) else tuple(value))
        if not self.class_names:
            raise ConfigError("zeroshot: class_names is empty; give the class names (e.g. from classes.txt)")
        if len(set(self.class_names)) != len(self.class_names):
            raise ConfigError(f"zeroshot: class_names has repeated entries: {list(self.class_names)[:5]}...")
        bad = [t for t in self.templates if t.count("{}") != 1]
        if bad or not self.templates:
            raise ConfigError(f"zeroshot: template {bad[0] if bad else ''!r} is invalid; each needs exactly one '{{}}'")
        if self.classes not in CLASS_SETS:
            raise ConfigError(f"zeroshot: classes={self.classes!r} is invalid; valid: {', '.join(CLASS_SETS)}")
        shots = self.shots
        if shots is not None and (isinstance(shots, bool) or not isinstance(shots, int) or shots < 1):
            raise ConfigError(f"zeroshot: shots={self.shots!r} is invalid; expected an integer >= 1 or None")
        # random.Random(-s) draws what random.Random(s) draws: a negative seed would name another list of the same draw
        Range.int(0, 2**32 - 1).check("zeroshot: shot_seed", self.shot_seed)
        if not isinstance(self.context_length, int) or not 1 <= self.context_length <= 77:
            raise ConfigError(
                f"zeroshot: context_length={self.context_length!r} is invalid; CLIP's text tower has 77 positions "
                "(expected an integer in [1, 77])"
            )

    @classmethod
    def from_folder(cls, path: Path, **options: Any) -> ZeroShotTask:
        """The task of a VTAB-format folder: its ``classes.txt`` names and CoOp's template for the folder's name.

        Options: ``templates`` (list of templates), ``ensemble`` (CLIP's 80 ImageNet templates), ``context_length``,
        ``classes`` (all / base / novel), ``shots``, ``shot_seed``, ``lists_dir``.
        """
        valid = ("templates", "ensemble", "context_length", "classes", "shots", "shot_seed", "lists_dir", "probe")
        unknown = sorted(set(options) - set(valid))
        if unknown:
            raise ConfigError(
                f"zeroshot: unknown task option(s) {', '.join(unknown)}; valid options: {', '.join(valid)}"
            )
        names = read_class_names(path)
        templates = options.get("templates") or templates_for(Path(path).name, bool(options.get("ensemble", False)))
        chosen = options.get("classes", "all")
        kept = _class_indices(chosen, len(names)) if chosen in CLASS_SETS else range(len(names))
        return cls(
            tuple(names[i] for i in kept),
            tuple(templates),
            options.get("context_length", 77),
            classes=chosen,
            shots=options.get("shots"),
            shot_seed=options.get("shot_seed", 0),
            lists_dir=options.get("lists_dir"),
            folder_classes=len(names),
            probe=bool(options.get("probe", False)),
        )

    def dataset(
        self, path: Path, split: str, model: nn.Module, *, input_size: int | None = None, train: bool = False
    ) -> Dataset:
        """The ``split`` list of a VTAB-format folder, images prepared with the model's (CLIP's) mean/std."""
        from ..data import VTABTask, build_transform
        from ..data.fewshot import SampleList, read_split_list, restrict, sample_few_shot, write_list

        task = VTABTask.from_dir(path)
        expected = self.folder_classes if self.folder_classes is not None else len(self.class_names)
        if task.num_classes != expected:
            raise DataError(f"zeroshot: folder {str(path)!r} has {task.num_classes} classes, the task names {expected}")
        transform = build_transform(model, input_size=input_size)
        if self.classes == "all" and not (train and self.shots):
            return task.dataset(split, transform)
        samples = read_split_list(Path(path), split)
        if self.classes != "all":
            samples = restrict(samples, _class_indices(self.classes, task.num_classes))
        if train and self.shots:
            samples = sample_few_shot(samples, self.shots, self.shot_seed)
            lists = Path(self.lists_dir) if self.lists_dir else _default_lists_dir()
            name = f"{Path(path).name}_{self.classes}_{split}_shots{self.shots}_seed{self.shot_seed}.txt"
            write_list(samples, lists / name, path)
        return SampleList(samples, transform)

    def describe(self) -> str:
        subset = f" ({self.classes} classes)" if self.classes != "all" else ""
        shots = f", {self.shots}-shot" if self.shots else ""
        return f"zero-shot, {len(self.class_names)} class names{subset}{shots}, {len(self.templates)} template(s)"

    def folder_options(self) -> dict[str, Any]:
        return {"classes": self.classes}

    def subset(self, indices: Sequence[int]) -> ZeroShotTask:
        """The task restricted to the classes at ``indices`` (labels renumbered in that order)."""
        return dataclasses.replace(self, class_names=tuple(self.class_names[i] for i in indices))

    def backbone_classes(self) -> int:
        return 0

    def check_tokens(self, tokenizer) -> None:
        """Raise ConfigError naming the first class whose prompt does not fit the context."""
        for template in self.templates:
            for name in self.class_names:
                n = len(tokenizer.encode(template.format(name))) + 2
                if n > self.context_length:
                    raise ConfigError(
                        f"zeroshot: class {name!r} in template {template!r} is {n} tokens; CLIP's context holds "
                        f"{self.context_length}"
                    )

    def build(self, backbone: nn.Module) -> ZeroShotModel:
        if not callable(getattr(backbone, "encode_text_embeds", None)):
            raise ConfigError(
                f"zeroshot: {type(backbone).__name__} has no text tower; a zero-shot task needs a CLIP backbone "
                "(vpeft.backbones.clip.create)"
            )
        self.check_tokens(backbone.tokenizer)
        return ZeroShotModel(backbone, self)

    def loss(self, output: Any, target: torch.Tensor, *, label_smoothing: float = 0.0) -> torch.Tensor:
        return F.cross_entropy(output.float(), target, label_smoothing=label_smoothing)

    def new_meter(self) -> ClassificationMeter:
        return ClassificationMeter()

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "class_names": list(self.class_names),
            "templates": list(self.templates),
            "context_length": self.context_length,
            "classes": self.classes,
            "shots": self.shots,
            "shot_seed": self.shot_seed,
            "lists_dir": self.lists_dir,
            "folder_classes": self.folder_classes,
            "probe": self.probe,
            "num_classes": len(self.class_names),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ZeroShotTask:
        return cls(**{k: v for k, v in data.items() if k not in ("kind", "num_classes")})
