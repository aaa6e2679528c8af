"""Generalised LoRA on a frozen ``nn.Linear`` (Chavan et al., "One-for-All: Generalized LoRA for
Parameter-Efficient Fine-tuning", 2023; official code Arnav0400/ViT-Slim, ``GLoRA/layer.py``).

The adapted layer computes ``y = x W'^T + b'`` with

    W' = W0 + W0 * A + B                (``*``: element-wise, broadcast)
    b' = b0 + b0 * D + E + W0 C

where the support tensors each take one of a few forms (the choice space of the official supernet):

* ``A``, ``B`` (out x in): ``lora`` (``X_d X_u``, out x r times r x in), ``vector`` (out x 1, one value per
  output row, broadcast over the inputs), ``scalar``, ``none``;
* ``C`` (in x 1): ``lora`` (``C_d C_u``, in x r times r x 1), ``vector`` (in), ``none``;
* ``D``, ``E`` (out): ``vector``, ``scalar``, ``none``.

A layer's choice is written as a five-letter code over ``A B C D E`` with ``L`` = lora, ``V`` = vector,
``S`` = scalar, ``N`` = none; e.g. ``"LLLVV"`` (every tensor at its largest form).

Initialisation as the official code: the ``X_d`` factors, vectors and scalars are zero and the ``X_u``
factors Xavier-uniform, so the layer is its base at initialisation. ``D`` scales the base bias: on a
Linear without bias it has no effect, so it is not created (and costs no parameter) there.

Two wrappers:

* :class:`GLoRALinear` -- one fixed choice, only the tensors that choice needs; mergeable (``W'`` and ``b'``
  are folded into the base layer; a bias is created when the base had none but ``E`` or ``C`` is used).
* :class:`GLoRASuperLinear` -- the supernet layer of the structure search: it holds the largest tensors and
  every choice reads them (weight sharing as in the official code: ``vector`` is the first column of the
  ``X_d`` factor, ``scalar`` its first entry). Its ``choice`` is set by the searcher; when it is ``None`` a
  choice is drawn uniformly at every forward pass (the official supernet training).
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Iterator, Mapping

import torch
from torch import nn
from torch.nn import functional as F

from .base import Wrapper

__all__ = [
    "TENSORS",
    "OPTIONS",
    "LETTERS",
    "ALL_CODES",
    "parse_code",
    "make_code",
    "glora_params",
    "GLoRALinear",
    "GLoRASuperLinear",
]

TENSORS = ("A", "B", "C", "D", "E")
OPTIONS: Mapping[str, tuple[str, ...]] = {
    "A": ("lora", "vector", "scalar", "none"),
    "B": ("lora", "vector", "scalar", "none"),
    "C": ("lora", "vector", "none"),
    "D": ("vector", "scalar", "none"),
    "E": ("vector", "scalar", "none"),
}
LETTERS = {"lora": "L", "vector": "V", "scalar": "S", "none": "N"}
_KINDS = {v: k for k, v in LETTERS.items()}
#: every valid layer code, in the official enumeration order (4 * 4 * 3 * 3 * 3 = 432)
ALL_CODES = tuple("".join(LETTERS[o] for o in combo) for combo in itertools.product(*(OPTIONS[t] for t in TENSORS)))


def parse_code(code: str) -> dict[str, str]:
    """``"LVNSV"`` -> ``{"A": "lora", "B": "vector", "C": "none", "D": "scalar", "E": "vector"}``.

    Raises:
        ValueError: not five letters, or a form a tensor does not allow (e.g. a scalar ``C``).
    """
    if not isinstance(code, str) or len(code) != 5:
        raise ValueError(f"GLoRA layer code {code!r} must be five letters over A B C D E (L/V/S/N), e.g. 'LLLVV'")
    out = {}
    for t, letter in zip(TENSORS, code.upper()):
        kind = _KINDS.get(letter)
        if kind not in OPTIONS[t]:
            allowed = "/".join(LETTERS[o] for o in OPTIONS[t])
            raise ValueError(f"GLoRA layer code {code!r}: {t}={letter!r} is invalid; {t} allows {allowed}")
        out[t] = kind
    return out


def make_code(choice: Mapping[str, str]) -> str:
    """Inverse of :func:`parse_code`."""
    return "".join(LETTERS[choice[t]] for t in TENSORS)


def _support_params(kind: str, rows: int, cols: int, r: int) -> int:
    return {"lora": rows * r + r * cols, "vector": rows, "scalar": 1, "none": 0}[kind]


def glora_params(code: str, in_features: int, out_features: int, r: int, bias: bool = True) -> int:
    """Exact trainable parameters of one :class:`GLoRALinear` (the official ``get_param_tensor`` count,
    except that ``D`` costs nothing on a Linear without bias, where vpeft does not create it)."""
    c = parse_code(code)
    n = _support_params(c["A"], out_features, in_features, r) + _support_params(c["B"], out_features, in_features, r)
    n += _support_params(c["C"], in_features, 1, r)
    n += _support_params(c["D"], out_features, 1, r) if bias else 0
    return n + _support_params(c["E"], out_features, 1, r)


def combine(
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    sup: Mapping[str, torch.Tensor | None],
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(W', b')`` from the base tensors and the support tensors in broadcast shape.

    ``A``, ``B``: (out, in), (out, 1) or (1,); ``C``: (in,); ``D``, ``E``: (out,) or (1,); ``None`` = absent.
    """
    a, b_, c, d, e = (sup.get(t) for t in TENSORS)
    w = weight
    if a is not None:
        w = w + weight * a
    if b_ is not None:
        w = w + b_
    out = bias
    if bias is not None and d is not None:
        out = out + bias * d
    if e is not None:
        out = e.expand(weight.shape[0]) if out is None else out + e
    if c is not None:
        wc = weight @ c
        out = wc if out is None else out + wc
    return w, out


def _like(layer: nn.Linear) -> dict:
    return {"device": layer.weight.device, "dtype": layer.weight.dtype}


def _check_linear(base: nn.Module, what: str) -> nn.Linear:
    if not isinstance(base, nn.Linear):
        raise TypeError(f"{what} wraps an nn.Linear, got {type(base).__name__}")
    return base


class GLoRALinear(Wrapper):
    """GLoRA with one fixed choice ``code`` (see the module docstring), rank ``r`` for its ``lora`` tensors.

    Parameters, by form: ``lora`` -> ``X_d`` (rows x r, zero) and ``X_u`` (r x cols, Xavier-uniform);
    ``vector`` -> ``X`` (rows,), zero; ``scalar`` -> ``X`` (1,), zero; ``none`` -> nothing.
    """

    mergeable = True

    def __init__(self, base_layer: nn.Linear, code: str, r: int) -> None:
        super().__init__(_check_linear(base_layer, "GLoRALinear"))
        self.code, self.r = code.upper(), r
        self.choice = parse_code(code)
        out_f, in_f, kw = base_layer.out_features, base_layer.in_features, _like(base_layer)
        shapes = {"A": (out_f, in_f), "B": (out_f, in_f), "C": (in_f, 1), "D": (out_f, 1), "E": (out_f, 1)}
        for t in TENSORS:
            kind = self.choice[t]
            if t == "D" and base_layer.bias is None:
                kind = "none"
            rows, cols = shapes[t]
            if kind == "lora":
                self.register_parameter(f"{t}_d", nn.Parameter(torch.zeros(rows, r, **kw)))
                self.register_parameter(f"{t}_u", nn.Parameter(torch.empty(r, cols, **kw)))
                nn.init.xavier_uniform_(getattr(self, f"{t}_u"))
            elif kind == "vector":
                self.register_parameter(t, nn.Parameter(torch.zeros(rows, **kw)))
            elif kind == "scalar":
                self.register_parameter(t, nn.Parameter(torch.zeros(1, **kw)))

    def supports(self) -> dict[str, torch.Tensor | None]:
        """The support tensors in the broadcast shapes of :func:`combine`."""
        out: dict[str, torch.Tensor | None] = {}
        for t in TENSORS:
            kind = self.choice[t]
            if hasattr(self, f"{t}_d"):
                prod = getattr(self, f"{t}_d") @ getattr(self, f"{t}_u")
                out[t] = prod.squeeze(1) if t == "C" else prod
            elif kind in ("vector", "scalar") and isinstance(getattr(self, t, None), nn.Parameter):
                p = getattr(self, t)
                out[t] = p.unsqueeze(1) if (t in "AB" and kind == "vector") else p
            else:
                out[t] = None
        return out

    def effective(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        base = self.base_layer
        return combine(base.weight, base.bias, self.supports())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, b = self.effective()
        return F.linear(x, w, b)

    @torch.no_grad()
    def merge_into_base(self) -> None:
        base = self.base_layer
        w, b = self.effective()
        base.weight.copy_(w)
        if b is None:
            return
        if base.bias is None:
            base.bias = nn.Parameter(b.detach().clone(), requires_grad=False)
        else:
            base.bias.copy_(b)

    def extra_repr(self) -> str:
        return f"code={self.code}, r={self.r}"


class GLoRASuperLinear(Wrapper):
    """The GLoRA supernet layer: the largest support tensors, shared by every choice (official weight sharing).

    ``A_d``/``B_d`` (out x r) and ``C_d`` (in x r) are zero, ``A_u``/``B_u`` (r x in) and ``C_u`` (r x 1)
    Xavier-uniform, ``D`` and ``E`` (out) zero. A choice reads: ``lora`` -> ``X_d X_u``; ``vector`` -> the first
    column of ``X_d`` (``D``/``E``: the whole vector); ``scalar`` -> the first entry.
    """

    def __init__(self, base_layer: nn.Linear, r: int) -> None:
        super().__init__(_check_linear(base_layer, "GLoRASuperLinear"))
        out_f, in_f, kw = base_layer.out_features, base_layer.in_features, _like(base_layer)
        self.r = r
        self.A_d, self.A_u = nn.Parameter(torch.zeros(out_f, r, **kw)), nn.Parameter(torch.empty(r, in_f, **kw))
        self.B_d, self.B_u = nn.Parameter(torch.zeros(out_f, r, **kw)), nn.Parameter(torch.empty(r, in_f, **kw))
        self.C_d, self.C_u = nn.Parameter(torch.zeros(in_f, r, **kw)), nn.Parameter(torch.empty(r, 1, **kw))
        self.D = nn.Parameter(torch.zeros(out_f, **kw)) if base_layer.bias is not None else None
        self.E = nn.Parameter(torch.zeros(out_f, **kw))
        for u in (self.A_u, self.B_u, self.C_u):
            nn.init.xavier_uniform_(u)
        self.choice: str | None = None

    def _sliced(self, code: str) -> Iterator[tuple[str, str, dict[str, torch.Tensor]]]:
        """Per tensor: (name, form, {vpeft GLoRALinear parameter name: tensor in that layer's shape})."""
        for t, kind in parse_code(code).items():
            if t in ("D", "E"):
                full = self.D if t == "D" else self.E
                if full is None or kind == "none":
                    yield t, "none", {}
                else:
                    yield t, kind, {t: full if kind == "vector" else full[:1]}
                continue
            d, u = getattr(self, f"{t}_d"), getattr(self, f"{t}_u")
            if kind == "lora":
                yield t, kind, {f"{t}_d": d, f"{t}_u": u}
            elif kind == "vector":
                yield t, kind, {t: d[:, 0]}
            elif kind == "scalar":
                yield t, kind, {t: d[0, :1]}
            else:
                yield t, kind, {}

    def supports(self, code: str) -> dict[str, torch.Tensor | None]:
        out: dict[str, torch.Tensor | None] = {}
        for t, kind, tensors in self._sliced(code):
            if kind == "lora":
                prod = tensors[f"{t}_d"] @ tensors[f"{t}_u"]
                out[t] = prod.squeeze(1) if t == "C" else prod
            elif kind == "none":
                out[t] = None
            else:
                v = tensors[t]
                out[t] = v.unsqueeze(1) if (t in "AB" and kind == "vector") else v
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        code = self.choice if self.choice is not None else random.choice(ALL_CODES)
        base = self.base_layer
        w, b = combine(base.weight, base.bias, self.supports(code))
        return F.linear(x, w, b)

    @torch.no_grad()
    def export_to(self, sub: GLoRALinear) -> None:
        """Copy the weights ``sub``'s choice reads in this supernet layer into ``sub`` (same rank)."""
        if sub.r != self.r:
            raise ValueError(f"GLoRA export: the subnet layer has rank {sub.r}, the supernet {self.r}")
        params = dict(sub.named_parameters(recurse=False))
        for _, _, tensors in self._sliced(sub.code):
            for name, value in tensors.items():
                params[name].copy_(value)

    def extra_repr(self) -> str:
        return f"r={self.r}, choice={self.choice}"
