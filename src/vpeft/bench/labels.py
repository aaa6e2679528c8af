"""Readable names of benchmark rows: ``LoRA (r=8, targets=q,v)`` rather than the definition's label ``lora``.

A row of a leaderboard is a method label of the definition; what a reader wants to see is the method, the settings
that differ from its defaults (as the definition wrote them), and the decoder where runs differ in decoder (a
column of its own, see :mod:`vpeft.bench.report`). :func:`readable_labels` gives every row such a name, unique over
the rows (two rows that would read the same get their definition labels appended).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["METHOD_TITLES", "method_title", "readable_labels", "settings_text"]

#: The name of each built-in method as its paper writes it (a method without an entry shows its registry name).
METHOD_TITLES: dict[str, str] = {
    "adapter": "Adapter",
    "adaptformer": "AdaptFormer",
    "attention_only": "attention-only tuning",
    "bitfit": "BitFit",
    "clip_adapter": "CLIP-Adapter",
    "clip_lora": "CLIP-LoRA",
    "cocoop": "CoCoOp",
    "compose": "composition",
    "convpass": "Convpass",
    "coop": "CoOp",
    "difffit": "DiffFit",
    "dora": "DoRA",
    "e2vpt": "E2VPT",
    "fact_tk": "FacT-TK",
    "fact_tt": "FacT-TT",
    "full": "full fine-tuning",
    "glora": "GLoRA",
    "ia3": "(IA)3",
    "krona": "KronA",
    "linear": "linear probe",
    "ln_tune": "LN-Tune",
    "lora": "LoRA",
    "lst": "LST",
    "maple": "MaPLe",
    "mona": "Mona",
    "noah": "NOAH",
    "partial": "partial fine-tuning",
    "peft_tuner": "PEFT tuner",
    "prefix": "prefix tuning",
    "repadapter": "RepAdapter",
    "ssf": "SSF",
    "towers": "towers",
    "visual_prompt": "visual prompting",
    "vpt_deep": "VPT-Deep",
    "vpt_shallow": "VPT-Shallow",
}


def method_title(name: str, *, dense: bool = False) -> str:
    """The readable name of method ``name``; ``linear`` with a decoder (a dense task) is the frozen backbone."""
    if name == "linear" and dense:
        return "frozen backbone"
    from vpeft.registry import METHODS

    own = METHODS.get(name).title if name in METHODS else ""
    return own or METHOD_TITLES.get(name, name)


def _value(v: Any) -> str:
    if isinstance(v, (list, tuple)):
        return ",".join(_value(x) for x in v)
    if isinstance(v, Mapping):
        return "{" + ", ".join(f"{k}={_value(x)}" for k, x in v.items()) + "}"
    return str(v)


def settings_text(settings: Mapping[str, Any] | None) -> str:
    """``"r=8, targets=q,v"``: a definition's method settings in their order (``""`` without settings)."""
    return ", ".join(f"{k}={_value(v)}" for k, v in (settings or {}).items())


def readable_labels(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """One readable name per row, unique over ``rows``.

    Each row is ``{"label", "method_name", "settings" (or None: unknown), "dense" (has a decoder), "decoder"}``.
    The name is the method's title with its settings in brackets; a row whose method is not known by a registry
    name (``method_name`` equal to its label and no title) keeps its label. Rows that would read the same (same
    method, settings and decoder, e.g. two learning rates) get ``[label]`` appended.
    """
    names = []
    for r in rows:
        name = r["method_name"]
        if name not in METHOD_TITLES and name == r["label"]:
            names.append(r["label"])
            continue
        text = method_title(name, dense=bool(r.get("dense")))
        extra = settings_text(r.get("settings"))
        names.append(f"{text} ({extra})" if extra else text)
    keys = [(n, r.get("decoder")) for n, r in zip(names, rows)]
    return [f"{n} [{r['label']}]" if keys.count(k) > 1 else n for n, r, k in zip(names, rows, keys)]
