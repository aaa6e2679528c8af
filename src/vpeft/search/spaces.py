"""Search spaces: what a candidate is, how it is sampled, mutated, crossed, counted and exported.

A candidate is a hashable tuple. Every space knows the *exact* trainable-parameter count of a candidate (head
excluded; the tests check it against :func:`vpeft.report` of the exported config) and can :meth:`shrink` a
candidate by one random step, which the evolution uses to repair candidates over the budget.

* :class:`NOAHSpace` (Zhang et al., "Neural Prompt Search", 2022; official configs
  ``experiments/NOAH/supernet/supernet-B_prompt_VPT.yaml``): for each of LoRA, Adapter and VPT a *depth* -- the
  module sits in the first ``depth`` blocks, depth in {L/4, L/2, 3L/4, L} ({3, 6, 9, 12} for ViT-B) -- and a size
  per present block from {1, 5, 10}. Candidate: ``(lora, adapter, prompts)``, one size per block (0: absent).
* :class:`GLoRASpace` (Chavan et al., 2023; official ``GLoRA/evolution.py``): per adapted Linear a form of each
  support tensor A..E, written as a five-letter code (see :mod:`vpeft.layers.glora`). Candidate: one code per
  layer.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

from torch import nn

from .._modules import get_module, set_module
from ..arch import ArchSpec, get_spec
from ..errors import ConfigError, UnsupportedBackboneError
from ..layers.glora import LETTERS, OPTIONS, TENSORS, GLoRASuperLinear, glora_params, parse_code
from ..layers.prompt import vpt_init_bound
from ..methods.glora import TARGETS as GLORA_TARGETS
from ..methods.glora import GLoRAConfig, layer_names
from ..methods.noah import MODULES, NOAHConfig, noah_param_count
from .space import Cand, SearchSpace
from .supernet import SuperAdapter, SuperLoRA, SuperPromptedBlock

__all__ = ["SearchSpace", "NOAHSpace", "GLoRASpace", "build_space", "SPACES"]


# ---- NOAH ---------------------------------------------------------------------------------------------------
def default_depths(depth: int) -> tuple[int, ...]:
    """NOAH's module depths {3, 6, 9, 12} for 12 blocks, as quarters of the depth for other backbones."""
    return tuple(sorted({max(1, int(depth * k / 4 + 0.5)) for k in range(1, 5)}))


class NOAHSpace(SearchSpace):
    """Per-block sizes of LoRA (rank on qkv), Adapter (width after the MLP) and VPT-Deep (prompts)."""

    name = "noah"

    def __init__(
        self,
        depth: int,
        dim: int,
        qkv_out: int,
        patch_size: tuple[int, int] = (16, 16),
        num_prefix_tokens: int = 1,
        sizes: Sequence[int] = (1, 5, 10),
        depths: Sequence[int] | None = None,
        prompt_dropout: float = 0.1,
    ) -> None:
        sizes = tuple(sorted(set(int(s) for s in sizes)))
        depths = tuple(sorted(set(int(d) for d in depths))) if depths else default_depths(depth)
        if not sizes or sizes[0] < 1:
            raise ConfigError(f"noah search: sizes={list(sizes)} is invalid; expected integers >= 1")
        if not depths or depths[0] < 1 or depths[-1] > depth:
            raise ConfigError(f"noah search: depths={list(depths)} is invalid; expected integers in [1, {depth}]")
        self.depth, self.dim, self.qkv_out = depth, dim, qkv_out
        self.patch_size, self.num_prefix_tokens = patch_size, num_prefix_tokens
        self.sizes, self.depths, self.prompt_dropout = sizes, depths, prompt_dropout

    @classmethod
    def for_model(cls, model: nn.Module, **kwargs: Any) -> NOAHSpace:
        spec = get_spec(model)
        if spec.kind != "vit" or not spec.parts or not spec.parts[0].qkv:
            raise UnsupportedBackboneError(f"the noah search needs a ViT with fused qkv projections, got {spec.family}")
        qkv_out = get_module(model, spec.parts[0].qkv).out_features
        return cls(spec.depth, spec.embed_dim, qkv_out, spec.patch_size, spec.num_prefix_tokens, **kwargs)

    # -- sampling
    def _module(self, rng: random.Random, depth: int | None = None) -> tuple[int, ...]:
        d = rng.choice(self.depths) if depth is None else depth
        return tuple(rng.choice(self.sizes) for _ in range(d)) + (0,) * (self.depth - d)

    def random(self, rng: random.Random) -> Cand:
        return tuple(self._module(rng) for _ in MODULES)

    @staticmethod
    def _present(sizes: tuple[int, ...]) -> int:
        return next((i for i, s in enumerate(sizes) if s == 0), len(sizes))

    def mutate(self, cand: Cand, rng: random.Random, m_prob: float, s_prob: float) -> Cand:
        out = []
        for sizes in cand:
            sizes = list(sizes)
            cur = self._present(sizes)
            if rng.random() < m_prob and rng.random() < s_prob:  # NOAH: resample the module's depth
                new = rng.choice(self.depths)
                sizes = sizes[:cur] + [rng.choice(self.sizes) for _ in range(new - cur)] if new > cur else sizes[:new]
                sizes += [0] * (self.depth - len(sizes))
                cur = new
            for i in range(cur):  # AutoFormer-style per-block resampling (NOAH's code only changes depths)
                if rng.random() < m_prob:
                    sizes[i] = rng.choice(self.sizes)
            out.append(tuple(sizes))
        return tuple(out)

    def crossover(self, a: Cand, b: Cand, rng: random.Random) -> Cand:
        return tuple(rng.choice([x, y]) for x, y in zip(a, b))  # NOAH: each module's sizes from either parent

    def shrink(self, cand: Cand, rng: random.Random) -> Cand | None:
        moves = []
        for m, sizes in enumerate(cand):
            cur = self._present(sizes)
            moves += [(m, i) for i in range(cur) if sizes[i] > self.sizes[0]]
            if cur > self.depths[0]:
                moves.append((m, -1))
        if not moves:
            return None
        m, i = rng.choice(moves)
        sizes = list(cand[m])
        if i < 0:
            cur = self._present(sizes)
            new = max(d for d in self.depths if d < cur)
            sizes = sizes[:new] + [0] * (self.depth - new)
        else:
            sizes[i] = max(s for s in self.sizes if s < sizes[i])
        return tuple(tuple(sizes) if k == m else s for k, s in enumerate(cand))

    # -- counting / export
    def params(self, cand: Cand) -> int:
        return noah_param_count(dict(zip(MODULES, cand)), self.dim, self.qkv_out)

    def min_params(self) -> int:
        smallest = (self.sizes[0],) * self.depths[0] + (0,) * (self.depth - self.depths[0])
        return self.params((smallest,) * len(MODULES))

    def to_config(self, cand: Cand) -> NOAHConfig:
        return NOAHConfig(**dict(zip(MODULES, cand)), prompt_dropout=self.prompt_dropout)

    def describe(self) -> dict[str, Any]:
        return {"space": self.name, "sizes": list(self.sizes), "depths": list(self.depths), "blocks": self.depth}

    # -- supernet
    def inject_supernet(self, model: nn.Module, spec: ArchSpec) -> dict[str, list]:
        top = self.sizes[-1]
        layers: dict[str, list] = {"lora": [], "adapter": [], "prompts": []}
        for parts in spec.parts:
            qkv = get_module(model, parts.qkv)
            layers["lora"].append(SuperLoRA(qkv, top))
            set_module(model, parts.qkv, layers["lora"][-1])
            layers["adapter"].append(SuperAdapter(get_module(model, parts.mlp), spec.embed_dim, top))
            set_module(model, parts.mlp, layers["adapter"][-1])
        bound = vpt_init_bound(spec.patch_size, spec.embed_dim)
        for name in spec.blocks:
            blk = SuperPromptedBlock(
                get_module(model, name), spec.num_prefix_tokens, spec.embed_dim, top, bound, self.prompt_dropout
            )
            layers["prompts"].append(blk)
            set_module(model, name, blk)
        return layers

    def activate(self, layers: dict[str, list], cand: Cand) -> None:
        lora, adapter, prompts = cand
        for layer, k in zip(layers["lora"], lora):
            layer.active = k
        for layer, k in zip(layers["adapter"], adapter):
            layer.active = k
        present, last = 0, len(layers["prompts"]) - 1
        for i, (blk, k) in enumerate(zip(layers["prompts"], prompts)):
            blk.in_prompts, blk.new_prompts, blk.strip = present, k, i == last
            present = k or present


# ---- GLoRA --------------------------------------------------------------------------------------------------
class GLoRASpace(SearchSpace):
    """Per-layer GLoRA forms of A..E over the Linears of every block (rank ``r`` for the lora forms)."""

    name = "glora"

    def __init__(
        self,
        layers: Sequence[tuple[str, int, int, bool]],
        r: int = 4,
        targets: Sequence[str] = GLORA_TARGETS,
    ) -> None:
        if r < 1:
            raise ConfigError(f"glora search: rank {r} is invalid; expected an integer >= 1")
        self.layers = [tuple(x) for x in layers]  # (name, in_features, out_features, has_bias)
        self.r, self.targets = r, tuple(t for t in GLORA_TARGETS if t in targets)

    @classmethod
    def for_model(cls, model: nn.Module, r: int = 4, targets: Sequence[str] = GLORA_TARGETS) -> GLoRASpace:
        spec = get_spec(model)
        if spec.kind != "vit":
            raise UnsupportedBackboneError(f"the glora search needs a ViT backbone, got {spec.family}")
        info = []
        for name in layer_names(spec, tuple(targets)):
            lin = get_module(model, name)
            info.append((name, lin.in_features, lin.out_features, lin.bias is not None))
        return cls(info, r, targets)

    def random(self, rng: random.Random) -> Cand:
        return tuple("".join(LETTERS[rng.choice(OPTIONS[t])] for t in TENSORS) for _ in self.layers)

    def mutate(self, cand: Cand, rng: random.Random, m_prob: float, s_prob: float) -> Cand:
        out = []
        for code in cand:  # official: each support tensor of each layer re-drawn with probability m_prob
            out.append(
                "".join(LETTERS[rng.choice(OPTIONS[t])] if rng.random() < m_prob else c for t, c in zip(TENSORS, code))
            )
        return tuple(out)

    def crossover(self, a: Cand, b: Cand, rng: random.Random) -> Cand:
        return tuple("".join(rng.choice([x, y]) for x, y in zip(ca, cb)) for ca, cb in zip(a, b))

    def shrink(self, cand: Cand, rng: random.Random) -> Cand | None:
        moves = []
        for i, (code, (_, _, _, bias)) in enumerate(zip(cand, self.layers)):
            for j, (t, kind) in enumerate(parse_code(code).items()):
                if kind != "none" and (t != "D" or bias):
                    moves.append((i, j, t, kind))
        if not moves:
            return None
        i, j, t, kind = rng.choice(moves)
        smaller = OPTIONS[t][OPTIONS[t].index(kind) + 1]  # options are ordered from largest to "none"
        code = cand[i][:j] + LETTERS[smaller] + cand[i][j + 1 :]
        return cand[:i] + (code,) + cand[i + 1 :]

    def params(self, cand: Cand) -> int:
        return sum(glora_params(code, i, o, self.r, bias) for code, (_, i, o, bias) in zip(cand, self.layers))

    def min_params(self) -> int:
        return 0

    def to_config(self, cand: Cand) -> GLoRAConfig:
        return GLoRAConfig(r=self.r, targets=self.targets, layers=tuple(cand))

    def describe(self) -> dict[str, Any]:
        return {"space": self.name, "r": self.r, "targets": list(self.targets), "layers": len(self.layers)}

    def inject_supernet(self, model: nn.Module, spec: ArchSpec) -> list[GLoRASuperLinear]:
        out = []
        for name, *_ in self.layers:
            out.append(GLoRASuperLinear(get_module(model, name), self.r))
            set_module(model, name, out[-1])
        return out

    def activate(self, layers: list[GLoRASuperLinear], cand: Cand) -> None:
        for layer, code in zip(layers, cand):
            layer.choice = code


SPACES = {"noah": NOAHSpace, "glora": GLoRASpace}


def build_space(name: str, model: nn.Module, **kwargs: Any) -> SearchSpace:
    """The search space ``name`` ("noah" or "glora") for ``model`` (an unadapted backbone)."""
    if name not in SPACES:
        raise ConfigError(f"unknown search space {name!r}; valid options: {', '.join(SPACES)}")
    return SPACES[name].for_model(model, **kwargs)
