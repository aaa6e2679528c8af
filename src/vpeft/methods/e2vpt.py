"""E2VPT: key-value prompts in every attention layer plus deep visual prompts.

Reference: Han et al., "E^2VPT: An Effective and Efficient Approach for Visual Prompt Tuning",
ICCV 2023; official code ChengHan111/E2VPT (``src/models/vit_backbones/vit_changeVK.py``, defaults
in ``src/configs/config.py``, group ``MODEL.P_VK``).

Key-value prompts: in every block's attention, ``NUM_TOKENS`` (5) learnable vectors per head,
shaped ``[heads, tokens, head_dim]`` (``deep_QKV_embeddings``), are concatenated in front of the
layer's keys and values after the q/k/v projections (``LAYER_BEHIND=True``); the queries are
unchanged. With the official default ``SHARE_PARAM_KV=True`` one tensor serves as both keys and
values (``share_kv=False`` gives separate ones). Initialisation as the default ``ORIGIN_INIT=2``:
Kaiming-uniform (fan-in ``tokens * head_dim``, gain sqrt(2)), i.e. U(-b, b), b = sqrt(6 / (tokens * head_dim)).
Dropout on the prompts 0 (``P_VK.DROPOUT``).

Visual prompts: ``NUM_TOKENS_P`` (5) VPT-deep tokens at the input of every block (``DEEP_P=True``),
inserted after the class/register tokens, replaced at each block and removed after the last one --
:class:`~vpeft.layers.PromptedBlock` with VPT's Xavier-uniform bound; ``prompt_tokens=0`` keeps only
the key-value prompts.

Not implemented: the paper's pruning (token-wise and segment-wise masks found by a lottery-ticket
style prune-and-rewind schedule) -- the trained model holds all prompts, i.e. the un-pruned E2VPT.
The paper's per-task prompt counts differ; the defaults here are the official config defaults.

ViT-B/16 (12 heads of 64), 5 shared key-value prompts + 5 visual prompts: key-value 12 * 12 * 5 * 64 =
46,080, visual 12 * 5 * 768 = 46,080, total 92,160 parameters. The paper reports only per-task
percentages after pruning (no single count for this setting).
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import nn

from ..arch import ArchSpec, Target, attention_layout
from ..config import MethodConfig, check_float, check_int
from ..errors import ConfigError
from ..layers import PromptedBlock
from ..layers.kv_prompt import KVPromptAttention
from ..layers.prompt import vpt_init_bound
from ..registry import register_method
from .base import ADDITION, Method

__all__ = ["E2VPTConfig", "E2VPT"]


@dataclasses.dataclass(frozen=True)
class E2VPTConfig(MethodConfig):
    """E2VPT (without pruning).

    Attributes:
        kv_tokens: key-value prompts per head and layer (>= 1).
        prompt_tokens: deep visual prompts per block (>= 0; 0 disables them).
        share_kv: one tensor for the key and the value prompts (official default).
        dropout: dropout on the key-value prompts, in [0, 1).
        prompt_dropout: dropout on the visual prompts, in [0, 1).
    """

    method = "e2vpt"
    kv_tokens: int = 5
    prompt_tokens: int = 5
    share_kv: bool = True
    dropout: float = 0.0
    prompt_dropout: float = 0.0

    def validate(self) -> None:
        check_int(self, "kv_tokens", 1)
        check_int(self, "prompt_tokens", 0)
        if not isinstance(self.share_kv, bool):
            raise ConfigError(f"e2vpt: share_kv={self.share_kv!r} is invalid; expected true or false")
        check_float(self, "dropout", 0.0, 0.999)
        check_float(self, "prompt_dropout", 0.0, 0.999)


@register_method
class E2VPT(Method):
    config_cls = E2VPTConfig
    family = ADDITION
    paper = "Han et al., E^2VPT: An Effective and Efficient Approach for Visual Prompt Tuning, ICCV 2023"
    identity_at_init = False
    kinds = ("vit",)

    def target_roles(self, spec: ArchSpec) -> tuple[str, ...]:
        return ("attn", "block") if self.config.prompt_tokens else ("attn",)

    def check_target(self, model: nn.Module, spec: ArchSpec, target: Target) -> None:
        if target.role == "attn":
            attention_layout(model, spec, spec.parts[target.index])  # how to recompute it (or why vpeft cannot)

    def create(self, model: nn.Module, spec: ArchSpec, target: Target) -> nn.Module:
        if target.role == "attn":
            return self._kv_prompts(target.module, attention_layout(model, spec, spec.parts[target.index]))
        cfg, i, p = self.config, target.index, self.config.prompt_tokens
        return PromptedBlock(
            target.module,
            num_prefix_tokens=spec.num_prefix_tokens,
            in_prompts=0 if i == 0 else p,
            new_prompts=p,
            dim=spec.embed_dim,
            bound=vpt_init_bound(spec.patch_size, spec.embed_dim),
            strip=i == spec.depth - 1,
            dropout=cfg.prompt_dropout,
        )

    def _kv_prompts(self, attn: nn.Module, layout) -> KVPromptAttention:
        cfg = self.config
        wrapper = KVPromptAttention(attn, layout, cfg.kv_tokens, shared=cfg.share_kv, dropout=cfg.dropout)
        bound = math.sqrt(6.0 / (cfg.kv_tokens * wrapper.head_shape[1]))
        with torch.no_grad():
            for p in (wrapper.key, wrapper.value):
                if p is not None:
                    nn.init.uniform_(p, -bound, bound)
        return wrapper
