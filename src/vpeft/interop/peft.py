"""Hugging Face PEFT interop: a vpeft LoRA / DoRA delta <-> a PEFT adapter directory.

PEFT's on-disk format: ``adapter_config.json`` (a ``LoraConfig``) and ``adapter_model.safetensors`` with
the keys ``base_model.model.<module>.lora_A.weight`` (``r x in``, ``r x in x kh x kw`` for a conv),
``base_model.model.<module>.lora_B.weight`` (``out x r``, ``out x r x 1 x 1``),
``base_model.model.<module>.lora_magnitude_vector`` (DoRA: one magnitude per output row) and
``base_model.model.<head>.<param>`` for the classification head (``modules_to_save``). Neither direction
needs ``peft`` installed; the tests check the files with ``peft.PeftModel.from_pretrained``.

Conventions that match exactly: PEFT's update is ``scaling * B A`` with ``scaling = lora_alpha / r``
(``lora_alpha / sqrt(r)`` with ``use_rslora``), vpeft's ``alpha / r``; PEFT's DoRA is vpeft's DoRA
(``m * (W0 + s B A) / ||W0 + s B A||`` with the norm per output row over the input dimension, detached
from the graph -- vpeft's ``detach_norm=True``, the default); PEFT's conv LoRA is vpeft's (``A`` a conv
with the base layer's kernel, stride, padding and dilation to ``r`` channels, ``B`` a 1x1 conv).

Mapping. A vpeft LoRA layer over a whole module is a PEFT LoRA layer as it is. vpeft adapts a fused
``qkv`` Linear (timm) per output slice: q, k and v each get their own ``(A_i, B_i)``, so
``dW = [B_q A_q; B_k A_k; B_v A_v]``. That is written as one PEFT LoRA of rank ``3r`` on ``qkv`` with
``A = [A_q; A_k; A_v]`` and a block-diagonal ``B`` (``rank_pattern`` / ``alpha_pattern`` keep the scale):
the same function, and training it further in PEFT is a plain rank-3r LoRA on qkv. q/v-only adaptation of
a fused qkv (the k rows stay frozen) has no PEFT equivalent -- PEFT adapts whole modules -- so
:func:`export_peft` refuses it unless ``pad_fused=True`` (a rank-2r LoRA on the whole qkv whose k rows are
zero: the same outputs, but PEFT training would then adapt k too). Backbones with separate q/k/v Linears
(Hugging Face ViT/CLIP) map q/v-only LoRA directly.

Import reverses this: a PEFT layer of rank ``r`` on a fused qkv becomes vpeft LoRA on q, k and v with
``A`` shared by the three slices; a vpeft export (recognised by its metadata) comes back with its own
config. Per-module scales that differ from the common one are folded into ``B`` (same function).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import re
import shutil
import tempfile
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import api
from ..arch import ArchSpec, get_spec, role_modules
from ..config import MethodConfig
from ..errors import CheckpointError, ConfigError
from ..layers.dora import DoRALinear
from ..layers.lora import LoRALinear
from ..registry import get_method
from ..state import detach_state, head_names, state_of, unwrap_all

__all__ = ["export_peft", "import_peft", "read_peft", "CONFIG_NAME", "WEIGHTS_NAME", "PREFIX"]

log = logging.getLogger(__name__)

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."
_METHODS = ("lora", "dora")
_SUFFIXES = {
    ".lora_A.weight": "a",
    ".lora_B.weight": "b",
    ".lora_magnitude_vector": "m",
    ".lora_magnitude_vector.weight": "m",
}


@dataclasses.dataclass
class _PeftLayer:
    """One adapted module in PEFT's layout: ``dW = scaling * B A`` (+ DoRA magnitude)."""

    a: torch.Tensor
    b: torch.Tensor
    scaling: float
    magnitude: torch.Tensor | None = None

    @property
    def rank(self) -> int:
        return int(self.a.shape[0])


def _lora_layers(model: nn.Module) -> dict[str, nn.Module]:
    from ..layers.lora_conv import LoRAConv2d

    return {n: m for n, m in model.named_modules() if isinstance(m, (LoRALinear, LoRAConv2d))}


# ---- export -------------------------------------------------------------------------------------------------
def _covers(slices: list[tuple[int, int]], out: int) -> bool:
    pos = 0
    for start, stop in sorted(slices):
        if start != pos:
            return False
        pos = stop
    return pos == out


def _fused_error(name: str, slices: list[tuple[int, int]]) -> ConfigError:
    return ConfigError(
        f"PEFT export: vpeft adapts only the output rows {slices} of the fused Linear {name} (e.g. q and v of "
        "timm's fused qkv, with k frozen); PEFT adapts whole modules, so this adaptation has no PEFT equivalent. "
        "Use LoRA targets ['qkv'] (q, k and v: exported as one rank-3r LoRA on qkv), a backbone with separate "
        "q/k/v Linears (Hugging Face ViT/CLIP), or export_peft(..., pad_fused=True) (vpeft export --pad-fused) "
        "for a rank-2r LoRA on the whole qkv whose k rows are zero (the same outputs, but training it further in "
        "PEFT adapts k as well)"
    )


@torch.no_grad()
def _linear_to_peft(name: str, layer: LoRALinear, pad_fused: bool) -> _PeftLayer:
    base, r = layer.base_layer, layer.r
    out = base.out_features
    slices = [tuple(s) for s in layer.slices]
    if len(slices) > 1 or slices[0] != (0, out):
        if not _covers(slices, out) and not pad_fused:
            raise _fused_error(name, slices)
    a = torch.cat([p.detach() for p in layer.lora_A])
    b = a.new_zeros(out, r * len(slices))
    for i, ((start, stop), bi) in enumerate(zip(slices, layer.lora_B)):
        b[start:stop, i * r : (i + 1) * r] = bi
    magnitude = None
    if isinstance(layer, DoRALinear):
        magnitude = torch.linalg.vector_norm(base.weight.detach(), dim=1)  # rows vpeft leaves alone: ratio 1
        for (start, stop), m in zip(slices, layer.magnitude):
            magnitude[start:stop] = m
    return _PeftLayer(a, b, layer.scaling, magnitude)


def _conv_to_peft(name: str, layer: nn.Module) -> _PeftLayer:
    base = layer.base_layer
    if tuple(base.dilation) != (1, 1) or base.padding_mode != "zeros":
        raise ConfigError(
            f"PEFT export: {name} has dilation {tuple(base.dilation)} / padding_mode {base.padding_mode!r}; PEFT's "
            "conv LoRA builds A with the kernel, stride and padding only, so it has no equivalent of this layer"
        )
    return _PeftLayer(layer.lora_A.detach(), layer.lora_B.detach(), layer.scaling)


def _number(x: float) -> float | int:
    return int(x) if float(x).is_integer() else float(x)


def _peft_config(state: Any, layers: Mapping[str, _PeftLayer], head: str) -> dict[str, Any]:
    cfg = state.config
    shapes = {n: (lay.rank, _number(lay.scaling * lay.rank)) for n, lay in layers.items()}
    r, alpha = Counter(shapes.values()).most_common(1)[0][0]
    odd = {n: s for n, s in shapes.items() if s != (r, alpha)}
    return {
        "peft_type": "LORA",
        "task_type": None,
        "r": r,
        "lora_alpha": alpha,
        "lora_dropout": float(cfg.dropout),
        "target_modules": sorted(layers),
        "rank_pattern": {re.escape(n): s[0] for n, s in sorted(odd.items())},
        "alpha_pattern": {re.escape(n): s[1] for n, s in sorted(odd.items())},
        "modules_to_save": [head] if head else None,
        "use_dora": cfg.method == "dora",
        "use_rslora": False,
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "layers_to_transform": None,
        "layers_pattern": None,
        "base_model_name_or_path": None,
        "revision": None,
        "auto_mapping": {"base_model_class": state.model_cls.__name__, "parent_library": state.library},
    }


def export_peft(
    model: nn.Module,
    directory: str | os.PathLike,
    *,
    pad_fused: bool = False,
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Write the LoRA/DoRA delta of an adapted model as a Hugging Face PEFT adapter directory, atomically.

    Load it with ``peft.PeftModel.from_pretrained(backbone, directory)`` onto the same (unadapted) backbone.

    Args:
        model: a backbone adapted with vpeft's ``lora`` or ``dora`` (not merged).
        directory: the adapter directory (created; an existing one gets both files replaced).
        pad_fused: export q/v-only adaptation of a fused qkv as a LoRA on the whole qkv with zero k rows.
        extra: JSON-serialisable run information kept in the weights' metadata (``vpeft_extra``; ``vpeft export``
            stores the delta's own: backbone argument, image size, task), which ``vpeft import`` reads back.

    Raises:
        ConfigError: another method, or q/v-only adaptation of a fused qkv without ``pad_fused``.
        CheckpointError: the model is merged, or ``directory`` is a file.
    """
    from ..layers.lora_conv import LoRAConv2d

    state = state_of(model)
    if state.merged is not None:
        raise CheckpointError("PEFT export: the model is merged; call vpeft.unmerge(model) first")
    if state.config.method not in _METHODS:
        raise ConfigError(
            f"PEFT export supports vpeft's lora and dora deltas, not {state.config.method!r} "
            "(PEFT's own tuners run inside vpeft through the 'peft_tuner' method)"
        )
    if state.config.method == "dora" and not state.config.detach_norm:
        log.warning("PEFT's DoRA detaches the weight norm; this delta was trained with detach_norm=False")
    layers = {}
    for name, layer in _lora_layers(model).items():
        conv = isinstance(layer, LoRAConv2d)
        layers[name] = _conv_to_peft(name, layer) if conv else _linear_to_peft(name, layer, pad_fused)
    tensors: dict[str, torch.Tensor] = {}
    for name, lay in layers.items():
        tensors[f"{PREFIX}{name}.lora_A.weight"] = lay.a
        tensors[f"{PREFIX}{name}.lora_B.weight"] = lay.b
        if lay.magnitude is not None:
            tensors[f"{PREFIX}{name}.lora_magnitude_vector"] = lay.magnitude
    params = dict(model.named_parameters())
    tensors.update({f"{PREFIX}{n}": params[n].detach() for n in state.head})
    tensors = {k: v.to("cpu").contiguous().clone() for k, v in tensors.items()}
    info = _ExportInfo(state.config, type(model), type(model).__module__)
    config = _peft_config(info, layers, state.spec.head if state.head else "")
    meta = {
        "format": "pt",
        "vpeft_config": state.config.to_json(),
        "vpeft_backbone": state.backbone,
        "vpeft_fingerprint": state.fingerprint,
    }
    if extra is not None:
        meta["vpeft_extra"] = json.dumps(dict(extra), sort_keys=True, allow_nan=False)
    path = _write_adapter(Path(directory), config, tensors, meta)
    log.info("exported %d LoRA layers (%s) as a PEFT adapter to %s", len(layers), state.config.method, path)
    return path


@dataclasses.dataclass
class _ExportInfo:
    config: MethodConfig
    model_cls: type
    library: str


def _write_adapter(directory: Path, config: dict, tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> Path:
    """Write both files into a temporary sibling directory, then move it (or its files) into place."""
    from safetensors.torch import save_file

    if directory.exists() and not directory.is_dir():
        raise CheckpointError(f"PEFT export: {str(directory)!r} exists and is not a directory")
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", suffix=".tmp", dir=directory.parent))
    try:
        save_file(tensors, str(tmp / WEIGHTS_NAME), metadata=meta)
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True, allow_nan=False) + "\n")
        if not directory.exists() or not any(directory.iterdir()):
            os.replace(tmp, directory)  # a missing or empty directory: the whole adapter appears at once
        else:  # weights first, the config (what readers look for) last
            for name in (WEIGHTS_NAME, CONFIG_NAME):
                os.replace(tmp / name, directory / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return directory


# ---- import -------------------------------------------------------------------------------------------------
def read_peft(directory: str | os.PathLike) -> tuple[dict[str, Any], dict[str, torch.Tensor], dict[str, str]]:
    """Read a PEFT adapter directory: ``(adapter config, tensors, safetensors metadata)``."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file, safe_open

    directory = Path(directory)
    cfg_path, weights = directory / CONFIG_NAME, directory / WEIGHTS_NAME
    if not cfg_path.is_file() or not weights.is_file():
        raise CheckpointError(
            f"{str(directory)!r} is not a PEFT adapter directory (needs {CONFIG_NAME} and {WEIGHTS_NAME})"
        )
    try:
        config = json.loads(cfg_path.read_text())
        with safe_open(str(weights), framework="pt") as f:
            meta = f.metadata() or {}
        tensors = load_file(str(weights))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"PEFT adapter {str(directory)!r} is unreadable ({exc})") from None
    return config, tensors, meta


def _check_peft_config(config: Mapping[str, Any], head: str) -> None:
    peft_type = str(config.get("peft_type", "")).upper()
    if peft_type != "LORA":
        raise ConfigError(
            f"PEFT import: {peft_type or 'an unknown'} adapter; vpeft imports LoRA/DoRA adapters only "
            "(run PEFT's other tuners inside vpeft with the 'peft_tuner' method)"
        )
    unsupported = {
        "bias": config.get("bias", "none") != "none",
        "lora_bias": bool(config.get("lora_bias")),
        "fan_in_fan_out": bool(config.get("fan_in_fan_out")),
        "target_parameters": bool(config.get("target_parameters")),
        "layer_replication": bool(config.get("layer_replication")),
    }
    bad = [k for k, v in unsupported.items() if v]
    if bad:
        raise ConfigError(f"PEFT import: options {bad} have no vpeft LoRA equivalent")
    extra = [m for m in config.get("modules_to_save") or [] if m != head]
    if extra:
        raise ConfigError(f"PEFT import: modules_to_save {extra} besides the head ({head!r}) have no vpeft equivalent")


def _pattern_value(patterns: Mapping[str, Any], name: str, default: Any) -> Any:
    for key, value in (patterns or {}).items():  # PEFT's get_pattern_key
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def _peft_layers(
    config: Mapping[str, Any], tensors: Mapping[str, torch.Tensor], head: str
) -> tuple[dict[str, _PeftLayer], dict[str, torch.Tensor]]:
    parts: dict[str, dict[str, torch.Tensor]] = {}
    head_tensors: dict[str, torch.Tensor] = {}
    for key, value in tensors.items():
        name = key.removeprefix(PREFIX)
        if head and name.startswith(head + "."):
            head_tensors[name] = value
            continue
        for suffix, what in _SUFFIXES.items():
            if name.endswith(suffix):
                parts.setdefault(name[: -len(suffix)], {})[what] = value
                break
        else:
            raise CheckpointError(f"PEFT import: unexpected tensor {key!r} (not a LoRA/DoRA weight or the head)")
    layers = {}
    for name, p in sorted(parts.items()):
        if "a" not in p or "b" not in p:
            raise CheckpointError(f"PEFT import: {name} lacks lora_A or lora_B")
        rank = int(p["a"].shape[0])
        alpha = float(_pattern_value(config.get("alpha_pattern"), name, config.get("lora_alpha", 8)))
        scaling = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
        layers[name] = _PeftLayer(p["a"], p["b"], scaling, p.get("m"))
    if not layers:
        raise CheckpointError("PEFT import: the adapter holds no LoRA layers")
    if bool(config.get("use_dora")) != all(lay.magnitude is not None for lay in layers.values()):
        raise CheckpointError("PEFT import: use_dora does not match the magnitude vectors in the weights")
    return layers, head_tensors


def _infer_config(model: nn.Module, spec: ArchSpec, config: Mapping[str, Any], layers: Mapping[str, _PeftLayer]):
    roles = role_modules(model, spec)
    if "q" in roles:  # separate projections: LoRA targets are q, k, v (not their union "qkv")
        roles.pop("qkv", None)
    names, known, targets = set(layers), set(), []
    for target, modules in roles.items():
        known |= set(modules)
        hit = names & set(modules)
        if hit and hit != set(modules):
            missing = sorted(set(modules) - hit)
            raise ConfigError(
                f"PEFT import: the adapter adapts {len(hit)} of the {len(modules)} {target!r} layers (not e.g. "
                f"{missing[0]}); vpeft's LoRA adapts a target in every block"
            )
        if hit:
            targets.append(target)
    stray = sorted(names - known)
    if stray:
        raise ConfigError(
            f"PEFT import: {stray[:3]} are no LoRA targets vpeft knows on {spec.arch} "
            f"(targets here: {', '.join(f'{t} ({v[0]}, ...)' for t, v in roles.items() if v)})"
        )
    ranks = sorted({lay.rank for lay in layers.values()})
    if len(ranks) > 1:
        raise ConfigError(f"PEFT import: the adapter mixes ranks {ranks}; vpeft's LoRA has one rank r")
    r = ranks[0]
    scaling = next(iter(layers.values())).scaling
    method = "dora" if config.get("use_dora") else "lora"
    return get_method(method).config_cls(
        r=r, alpha=_number(scaling * r), dropout=float(config.get("lora_dropout", 0.0)), targets=tuple(targets)
    )


def _config_from_meta(model: nn.Module, spec: ArchSpec, meta: Mapping[str, str]) -> MethodConfig | None:
    if "vpeft_config" not in meta:
        return None
    cfg = MethodConfig.from_json(meta["vpeft_config"])
    got = api.fingerprint(model, exclude=tuple(head_names(model, spec)))
    if meta.get("vpeft_fingerprint") not in (None, got):
        raise CheckpointError(
            f"PEFT import: this adapter was exported from other weights of {meta.get('vpeft_backbone')!r} "
            f"(fingerprint {meta['vpeft_fingerprint']}, model {got}); load it onto the backbone it was trained from"
        )
    return cfg


@torch.no_grad()
def _vpeft_tensors(name: str, layer: nn.Module, peft: _PeftLayer) -> dict[str, torch.Tensor]:
    """The wrapper's parameters (relative names) from a PEFT layer; rows vpeft does not adapt must be zero."""
    from ..layers.lora_conv import LoRAConv2d

    fold = peft.scaling / layer.scaling
    if isinstance(layer, LoRAConv2d):
        return {"lora_A": peft.a, "lora_B": peft.b * fold}
    r, rank, out = layer.r, peft.rank, layer.base_layer.out_features
    slices = [tuple(s) for s in layer.slices]
    if rank not in (r, r * len(slices)):
        raise CheckpointError(f"PEFT import: {name} has rank {rank}; vpeft's layer needs {r} or {r * len(slices)}")
    b = peft.b * fold
    used = torch.zeros_like(b, dtype=torch.bool)
    out_t: dict[str, torch.Tensor] = {}
    for i, (start, stop) in enumerate(slices):
        cols = slice(0, r) if rank == r else slice(i * r, (i + 1) * r)
        out_t[f"lora_A.{i}"] = peft.a[cols]
        out_t[f"lora_B.{i}"] = b[start:stop, cols]
        used[start:stop, cols] = True
        if peft.magnitude is not None:
            out_t[f"magnitude.{i}"] = peft.magnitude[start:stop]
    if bool((b[~used] != 0).any()):
        raise CheckpointError(
            f"PEFT import: {name}'s update reaches outputs vpeft's layer does not adapt (slices {slices} of {out} rows)"
        )
    return out_t


def _load(model: nn.Module, layers: Mapping[str, _PeftLayer], head_tensors: Mapping[str, torch.Tensor]) -> None:
    wrappers = _lora_layers(model)
    if set(wrappers) != set(layers):
        missing, extra = sorted(set(wrappers) - set(layers)), sorted(set(layers) - set(wrappers))
        raise CheckpointError(f"PEFT import: adapter does not fit (missing {missing[:3]}, unexpected {extra[:3]})")
    params = dict(model.named_parameters())
    values = {f"{n}.{k}": v for n, w in wrappers.items() for k, v in _vpeft_tensors(n, w, layers[n]).items()}
    values.update(head_tensors)
    for n, t in values.items():
        if n not in params or params[n].shape != t.shape:
            shape = tuple(params[n].shape) if n in params else None
            raise CheckpointError(f"PEFT import: {n} has shape {tuple(t.shape)}, the model {shape}")
    for n, t in values.items():
        params[n].copy_(t)


def import_peft(model: nn.Module, directory: str | os.PathLike) -> api.Report:
    """Apply a Hugging Face PEFT LoRA/DoRA adapter directory to a fresh backbone as a vpeft delta.

    The vpeft config comes from the adapter's vpeft metadata when it was written by :func:`export_peft`,
    otherwise from the adapted modules (every block's qkv/proj/fc1/fc2, q/k/v or convs), their rank and
    scale; the head is loaded when the adapter saved it (``modules_to_save``).

    Raises:
        CheckpointError: not a PEFT adapter, tensors that do not fit, or another backbone's export.
        ConfigError: a non-LoRA adapter, or one vpeft cannot express (partial blocks, mixed ranks, biases).
    """
    if api.is_adapted(model):
        raise ConfigError("PEFT import: the model already has a vpeft method applied; start from a fresh backbone")
    config, tensors, meta = read_peft(directory)
    spec = get_spec(model)
    _check_peft_config(config, spec.head)
    layers, head_tensors = _peft_layers(config, tensors, spec.head)
    cfg = _config_from_meta(model, spec, meta) or _infer_config(model, spec, config, layers)
    if cfg.method not in _METHODS:
        raise ConfigError(f"PEFT import: the adapter's vpeft config is {cfg.method!r}, not lora/dora")
    requires_grad = {n: p.requires_grad for n, p in model.named_parameters()}
    api.apply(model, cfg)
    try:
        with torch.no_grad():
            _load(model, layers, head_tensors)
    except BaseException:  # leave the model as it was
        unwrap_all(model)
        detach_state(model)
        for n, p in model.named_parameters():
            p.requires_grad_(requires_grad[n])
        raise
    return api.report(model)
