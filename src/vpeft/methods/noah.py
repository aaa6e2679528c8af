"""NOAH subnet: LoRA + Adapter + VPT with per-block sizes (the result of a Neural Prompt Search).

Reference: Zhang, Zhou & Liu, "Neural Prompt Search", 2022 (NOAH); official code ZhangYuanhan-AI/NOAH.
NOAH trains a supernet holding the three modules in every block, searches per-block sizes under a parameter
budget (``vpeft search``, :mod:`vpeft.search`) and retrains the found subnet -- this method, whose config is
what the search exports. Per block ``i``:

* LoRA of rank ``lora[i]`` on the whole fused ``qkv`` (q, k and v share one ``A``: r x d; ``B``: 3d x r, zero),
  scale 1 (NOAH adds ``B A x`` unscaled); on separate q, k, v projections (Hugging Face) the same LoRA on the
  virtual fused qkv: one ``A`` shared by the three, each with its rows of ``B``
  (:class:`~vpeft.layers.shared_lora.SharedALoRALinear`) -- same function and parameter count;
* a sequential adapter of width ``adapter[i]`` after the MLP (``y + up(gelu(down(y)))``, Pfeiffer placement);
* ``prompts[i]`` new VPT-Deep tokens at the block's input, replacing the previous prompts; a block with 0 keeps
  the incoming prompts (NOAH's prompt depth: prompts inserted by the last prompted block travel to the end).

``0`` means the module is absent in that block. Each tuple holds one size per block, or a single size for every
block (so the default is valid on any depth).
Default: every module at the largest size of NOAH's search space ({1, 5, 10}) in every block.
ViT-B/16: 12 * (10 * (768 + 2304) + (768*10 + 10 + 10*768 + 768) + 10 * 768) = 654,456 parameters.

Differences from the official code: the adapter's up-projection starts at zero and uses GELU (vpeft's adapter;
NOAH: Xavier-initialised up-projection, QuickGELU), prompts sit after the class token instead of at the end of
the sequence (equivalent for attention), and NOAH's unused input-level prompt and its position embedding are
neither created nor counted.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from torch import nn

from ..arch import ArchSpec, Target
from ..config import MethodConfig, check_float
from ..errors import ConfigError
from ..layers import LoRALinear, PromptedBlock, SequentialAdapter
from ..layers.prompt import vpt_init_bound
from ..layers.shared_lora import SharedALoRALinear, SharedDown
from ..registry import register_method
from .base import UNIFIED, Method

__all__ = ["NOAHConfig", "NOAH", "MODULES", "per_block", "noah_param_count", "noah_block_params"]

MODULES = ("lora", "adapter", "prompts")


def _as_sizes(name: str, value) -> tuple[int, ...]:
    if isinstance(value, str):  # "1,5,10" (the CLI's --opt lora=1,5,10)
        items: tuple = tuple(v for v in value.split(",") if v.strip())
    else:
        items = (value,) if isinstance(value, int) else tuple(value)
    out = []
    for v in items:
        try:
            if isinstance(v, bool) or float(v) != int(v):
                raise ValueError
            n = int(v)
        except (TypeError, ValueError):
            raise ConfigError(f"noah: {name}={list(items)!r} is invalid; expected integers >= 0") from None
        if n < 0:
            raise ConfigError(f"noah: {name}={list(items)!r} is invalid; expected integers >= 0")
        out.append(n)
    if not out:
        raise ConfigError(f"noah: {name}=[] is invalid; give one size per block or one size for every block")
    return tuple(out)


@dataclasses.dataclass(frozen=True)
class NOAHConfig(MethodConfig):
    """NOAH subnet.

    Attributes:
        lora: per-block LoRA rank on the fused qkv (0: none).
        adapter: per-block adapter width after the MLP (0: none).
        prompts: per-block number of new prompt tokens (0: keep the incoming ones).
        prompt_dropout: dropout on the prompt tokens, in [0, 1).
    Each tuple has one entry per block, or a single entry used for every block.
    """

    method = "noah"
    lora: tuple[int, ...] = (10,)
    adapter: tuple[int, ...] = (10,)
    prompts: tuple[int, ...] = (10,)
    prompt_dropout: float = 0.1

    def __post_init__(self) -> None:
        for name in MODULES:
            object.__setattr__(self, name, _as_sizes(name, getattr(self, name)))
        super().__post_init__()

    def validate(self) -> None:
        check_float(self, "prompt_dropout", 0.0, 0.999)


def per_block(cfg: NOAHConfig, depth: int) -> dict[str, tuple[int, ...]]:
    """The three size tuples expanded to ``depth`` blocks."""
    out = {}
    for name in MODULES:
        sizes = getattr(cfg, name)
        if len(sizes) == 1:
            sizes = sizes * depth
        elif len(sizes) != depth:
            raise ConfigError(f"noah: {name} has {len(sizes)} sizes; the backbone has {depth} blocks (give 1 or all)")
        out[name] = sizes
    return out


def noah_block_params(lora: int, adapter: int, prompts: int, dim: int, qkv_out: int) -> int:
    """Parameters of one block: LoRA ``r (d + qkv_out)``, adapter ``2 d a + a + d``, prompts ``p d``."""
    return lora * (dim + qkv_out) + (2 * dim * adapter + adapter + dim if adapter else 0) + prompts * dim


def noah_param_count(sizes: dict[str, Sequence[int]], dim: int, qkv_out: int) -> int:
    """Exact trainable parameters (head excluded) of a subnet with per-block ``sizes``."""
    return sum(
        noah_block_params(r, a, p, dim, qkv_out) for r, a, p in zip(sizes["lora"], sizes["adapter"], sizes["prompts"])
    )


@register_method
class NOAH(Method):
    config_cls = NOAHConfig
    family = UNIFIED
    paper = "Zhang, Zhou & Liu, Neural Prompt Search (NOAH), 2022"
    identity_at_init = False
    kinds = ("vit",)

    def __init__(self, config: NOAHConfig) -> None:
        super().__init__(config)
        # an instance without prompts is the identity at init; without adapters and prompts it merges away
        self.identity_at_init = not any(config.prompts)
        self.mergeable = not any(config.prompts) and not any(config.adapter)

    def target_roles(self, spec: ArchSpec) -> tuple[str, ...]:
        sizes = per_block(self.config, spec.depth)
        # the LoRA on the attention's input projection (fused qkv, or each of separate q, k, v), the adapter
        # after the MLP, the prompts around the blocks
        return tuple(role for role, key in (("qkv", "lora"), ("mlp", "adapter")) if any(sizes[key])) + ("block",)

    def prepare(self, model: nn.Module, spec: ArchSpec, targets: list[Target]) -> None:
        self._sizes = per_block(self.config, spec.depth)
        self._present = 0  # prompts inserted by an earlier block
        self._down: dict[int, SharedDown] = {}  # per block: the A shared by separate q, k, v projections

    def create(self, model: nn.Module, spec: ArchSpec, target: Target) -> nn.Module | None:
        i = target.index
        if target.role == "qkv":
            r = self._sizes["lora"][i]
            if not r:
                return None
            if target.fused:
                return LoRALinear(target.module, r, float(r))
            w = target.module.weight  # separate q, k, v: LoRA on the virtual fused qkv (one A, B split by rows)
            down = self._down.setdefault(i, SharedDown(target.module.in_features, r, device=w.device, dtype=w.dtype))
            return SharedALoRALinear(target.module, down, 1.0)
        if target.role == "mlp":
            a = self._sizes["adapter"][i]
            return SequentialAdapter(target.module, spec.embed_dim, a) if a else None
        return self._prompted(spec, target)

    def finish(self, model: nn.Module, spec: ArchSpec, adapted: list[str]) -> list[str]:
        # a shared A is reported (trained, saved) by the layer under which model.parameters() finds it first
        seen: set[int] = set()
        for module in model.modules():
            if isinstance(module, SharedALoRALinear):
                module.owns_down = id(module.down) not in seen
                seen.add(id(module.down))
        return adapted

    def _prompted(self, spec: ArchSpec, target: Target) -> nn.Module | None:
        new, present = self._sizes["prompts"][target.index], self._present
        strip = target.index == spec.depth - 1 and (present or new)
        if not new and not strip:
            return None
        self._present = new or present
        return PromptedBlock(
            target.module,
            num_prefix_tokens=spec.num_prefix_tokens,
            in_prompts=present,
            new_prompts=new,
            dim=spec.embed_dim,
            bound=vpt_init_bound(spec.patch_size, spec.embed_dim),
            strip=bool(strip),
            dropout=self.config.prompt_dropout,
        )
