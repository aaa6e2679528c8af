"""The two-tower CLIP backbone (see :mod:`vpeft.backbones.clip`): its tokenizer, slots, towers and construction."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ...arch import register_arch
from ...arch.clip import clip_backbone_spec, open_clip_text_spec
from ...errors import ConfigError, UnknownNameError
from .. import hub
from .hf_configs import LOCAL_HF_CLIP, local_hf_config
from .towers import SOURCES, OpenClipTextTower

__all__ = [
    "ClipBackbone",
    "ClipTokenizer",
    "FusedSelfAttention",
    "OpenClipTextTower",
    "TemplatePrompt",
    "create",
    "fuse_attention",
    "TOWERS",
    "CLIP_MEAN",
    "CLIP_STD",
]

TOWERS = ("image", "text")
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


# ---- tokenizer ------------------------------------------------------------------------------------------------
class ClipTokenizer:
    """CLIP's BPE tokenizer (open_clip's ``SimpleTokenizer``) that refuses texts longer than the context."""

    def __init__(self, context_length: int = 77) -> None:
        from open_clip.tokenizer import SimpleTokenizer

        self.bpe = SimpleTokenizer()
        self.context_length = context_length
        self.sot, self.eot = self.bpe.encoder["<start_of_text>"], self.bpe.encoder["<end_of_text>"]

    def encode(self, text: str) -> list[int]:
        """BPE ids of ``text`` (no start/end tokens)."""
        return self.bpe.encode(text)

    def ids(self, parts: Sequence[int]) -> list[int]:
        """``[sot] + parts + [eot]``, checked against the context length."""
        ids = [self.sot, *parts, self.eot]
        if len(ids) > self.context_length:
            raise ConfigError(
                f"text of {len(ids)} tokens does not fit CLIP's context of {self.context_length} tokens "
                f"({self.bpe.decode(list(parts))[:60]!r}...)"
            )
        return ids

    def pad(self, rows: Sequence[Sequence[int]]) -> torch.Tensor:
        out = torch.zeros(len(rows), self.context_length, dtype=torch.long)
        for i, row in enumerate(rows):
            out[i, : len(row)] = torch.tensor(row)
        return out

    def __call__(self, texts: Sequence[str]) -> torch.Tensor:
        """``(N, context_length)`` token ids of ``texts`` (zero padded)."""
        return self.pad([self.ids(self.encode(t)) for t in texts])


# ---- open_clip attention with a Linear qkv -------------------------------------------------------------------
class FusedSelfAttention(nn.Module):
    """``nn.MultiheadAttention`` (self-attention, no dropout) with its packed projection as ``qkv: nn.Linear``.

    Called like the module it replaces (``attn(x, x, x, need_weights=False, attn_mask=mask)``), returns
    ``(output, None)``. Same parameters, same result (up to float rounding of the fused kernel).
    """

    def __init__(self, mha: nn.MultiheadAttention) -> None:
        super().__init__()
        same = mha.kdim == mha.vdim == mha.embed_dim
        if not same or mha.in_proj_weight is None:
            raise ConfigError("FusedSelfAttention needs a self-attention nn.MultiheadAttention (one packed q/k/v)")
        width = mha.embed_dim
        self.num_heads, self.batch_first = mha.num_heads, mha.batch_first
        self.qkv = nn.Linear(width, 3 * width, bias=mha.in_proj_bias is not None)
        with torch.no_grad():
            self.qkv.weight.copy_(mha.in_proj_weight)
            if mha.in_proj_bias is not None:
                self.qkv.bias.copy_(mha.in_proj_bias)
        self.qkv.to(mha.in_proj_weight.dtype)
        self.out_proj = mha.out_proj

    def forward(self, query, key=None, value=None, need_weights: bool = False, attn_mask=None, **_: Any):
        if (key is not None and key is not query) or (value is not None and value is not query):
            raise ConfigError("FusedSelfAttention is self-attention only (key and value must be the query)")
        x = query if self.batch_first else query.transpose(0, 1)
        b, n, w = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.num_heads, w // self.num_heads).permute(2, 0, 3, 1, 4)
        if attn_mask is not None and attn_mask.dtype == torch.bool:
            attn_mask = torch.zeros_like(attn_mask, dtype=q.dtype).masked_fill(attn_mask, float("-inf"))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        out = self.out_proj(out.transpose(1, 2).reshape(b, n, w))
        return (out if self.batch_first else out.transpose(0, 1)), None


def fuse_attention(module: nn.Module) -> int:
    """Replace every ``nn.MultiheadAttention`` named ``attn`` by :class:`FusedSelfAttention`; return the count."""
    found = [
        (parent, name)
        for parent in module.modules()
        for name, child in parent.named_children()
        if name == "attn" and isinstance(child, nn.MultiheadAttention)
    ]
    for parent, name in found:
        setattr(parent, name, FusedSelfAttention(getattr(parent, name)))
    return len(found)


# ---- the text-side slot --------------------------------------------------------------------------------------
class TemplatePrompt(nn.Module):
    """The ``prompt`` slot's default: class names in hand-written templates, ensembled (CLIP, Sec. 3.1.4).

    It implements :class:`vpeft.layers.prompt_slot.PromptSlot`, the protocol of the slot; every prompt learner
    (CoOp, CoCoOp, MaPLe) wraps this slot and implements the same protocol.
    """

    conditional = False  # text features depend on the image (CoCoOp)

    def vision_prompts(self, clip: ClipBackbone) -> list[torch.Tensor | None] | None:
        """Per-layer prompt tokens for the image tower (None: none)."""
        return None

    def text_features(
        self, clip: ClipBackbone, class_names: Sequence[str], templates: Sequence[str], image_features=None
    ) -> torch.Tensor:
        """``(C, E)`` unit-norm text features: per class, the normalised mean of its normalised template features."""
        feats = []
        for template in templates:
            tokens = clip.tokenizer([template.format(name) for name in class_names])
            feats.append(F.normalize(clip.encode_text(tokens.to(clip.device)), dim=-1))
        return F.normalize(torch.stack(feats).mean(0), dim=-1)

    def check_classes(self, num_classes: int) -> None:
        """Raise ConfigError if this prompt cannot describe ``num_classes`` classes (class-specific contexts)."""


# ---- the backbone ---------------------------------------------------------------------------------------------
class ClipBackbone(nn.Module):
    """Two CLIP towers with one interface (see the module docstring).

    Args:
        source: ``"open_clip"`` or ``"hf"``.
        model: the library's model (open_clip ``CLIP`` with fused attention, or ``transformers.CLIPModel``); its
            towers are taken over, the wrapper object itself is not kept.
        name: the backbone name recorded in deltas (``"open_clip:ViT-B-16"``).
    """

    vpeft_towers = {"image": "image", "text": "text"}

    def __init__(self, source: str, model: nn.Module, name: str) -> None:
        super().__init__()
        if source not in SOURCES:
            raise ConfigError(f"CLIP source {source!r} is invalid; valid sources: {', '.join(SOURCES)}")
        self.source = source
        adapter = SOURCES[source]
        self.__dict__["towers"] = adapter  # the per-source parts (vpeft.backbones.clip.towers), not a module
        t = adapter.take(model)
        self.image, self.text, self.image_proj, self.text_proj = t.image, t.text, t.image_proj, t.text_proj
        size, width, twidth, ctx, self.embed_dim = (
            t.image_size,
            t.image_width,
            t.text_width,
            t.context_length,
            t.embed_dim,
        )
        self.eot_id, self.pool = t.eot_id, t.pool
        self.logit_scale = model.logit_scale
        self.prompt = TemplatePrompt()
        self.image_adapter = nn.Identity()
        self.image_width, self.text_width, self.context_length = int(width), int(twidth), int(ctx)
        size = (size, size) if isinstance(size, int) else tuple(int(s) for s in size)
        self.__dict__["tokenizer"] = ClipTokenizer(min(self.context_length, 77))
        self.__dict__["pretrained_cfg"] = {
            "vpeft_backbone": name,
            "architecture": name,
            "mean": CLIP_MEAN,
            "std": CLIP_STD,
            "input_size": (3, *size),
        }

    # ---- description -----------------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.logit_scale.device

    def image_blocks(self) -> nn.ModuleList:
        return self.towers.image_blocks(self.image)

    def text_blocks(self) -> nn.ModuleList:
        return self.towers.text_blocks(self.text)

    def token_embedding(self) -> nn.Embedding:
        return self.towers.token_embedding(self.text)

    # ---- text tower ---------------------------------------------------------------------------------------
    def embed_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """``(N, L, W)`` token embeddings (no positional embedding) of ``(N, L)`` ids."""
        return self.token_embedding()(tokens)

    def eot_positions(self, tokens: torch.Tensor) -> torch.Tensor:
        """The pooled position of every row: the argmax of the ids (open_clip's default) or the first end-of-text."""
        if self.pool == "argmax":
            return tokens.argmax(dim=-1)
        return (tokens == self.eot_id).int().argmax(dim=-1)

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        """``(N, E)`` projected (not normalised) text features of ``(N, L)`` token ids."""
        return self.encode_text_embeds(self.embed_tokens(tokens), self.eot_positions(tokens))

    def encode_text_embeds(
        self,
        embeds: torch.Tensor,
        eot: torch.Tensor,
        deep: Sequence[torch.Tensor | None] = (),
        deep_at: int = 1,
    ) -> torch.Tensor:
        """Run the text tower from token embeddings.

        Args:
            embeds: ``(N, L, W)`` token embeddings (prompt vectors already in place).
            eot: ``(N,)`` end-of-text positions (the pooled token).
            deep: per layer ``i >= 1``, ``deep[i - 1]`` is ``None`` or ``(M, W)`` prompt tokens that replace
                positions ``deep_at .. deep_at + M - 1`` at that layer's input (MaPLe's deep language prompts).
            deep_at: first replaced position.

        Returns:
            ``(N, E)`` projected text features.
        """
        n = embeds.shape[0]
        x, mask, post = self.towers.text_input(self.text, embeds)
        for i, block in enumerate(self.text_blocks()):
            prompt = deep[i - 1] if 0 < i <= len(deep) else None
            if prompt is not None:
                p = prompt.to(x.dtype).unsqueeze(0).expand(n, -1, -1)
                x = torch.cat([x[:, :deep_at], p, x[:, deep_at + p.shape[1] :]], dim=1)
            x = self.towers.text_block(block, x, mask)
        return self.towers.text_project(self, post(x)[torch.arange(n, device=x.device), eot])

    # ---- image tower ---------------------------------------------------------------------------------------
    def encode_image(self, images: torch.Tensor, prompts: Sequence[torch.Tensor | None] | None = None) -> torch.Tensor:
        """``(B, E)`` projected image features, through ``image_adapter``.

        Args:
            prompts: MaPLe's deep vision prompts: ``prompts[0]`` ``(M, W)`` tokens appended after the patch tokens
                and normalised with them by the pre-norm (as MaPLe concatenates before ``ln_pre``), ``prompts[i]``
                (``i >= 1``, or None) replace the last ``M`` tokens at layer ``i``'s input. Class-token pooling
                ignores them.
        """
        x = self.towers.image_tokens(self.image, images)
        prompts = list(prompts or ())
        pre = self.towers.image_pre_norm(self.image)
        for i, block in enumerate(self.image_blocks()):
            p = prompts[i] if i < len(prompts) else None
            if p is not None:
                p = (pre(p) if i == 0 else p).to(x.dtype).unsqueeze(0).expand(x.shape[0], -1, -1)
                x = torch.cat([x, p] if i == 0 else [x[:, : -p.shape[1]], p], dim=1)
            x = self.towers.image_block(block, x)
        return self.image_adapter(self.towers.image_pool(self, x))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Image features ``(B, E)`` (a CLIP is an image feature extractor; see :mod:`vpeft.tasks.zeroshot`)."""
        return self.encode_image(images, self.prompt.vision_prompts(self))


# ---- construction ---------------------------------------------------------------------------------------------
def _open_clip_model(name: str, pretrained: str | None, **kwargs: Any) -> nn.Module:
    import open_clip

    if pretrained:  # open_clip downloads the tagged checkpoint; offline, its cached copy or a one-line refusal
        cached = hub.open_clip_cached(f"open_clip:{name}", name, pretrained, kwargs.get("cache_dir"))
        return open_clip.create_model(name, pretrained=cached or pretrained, **kwargs)
    cfg = open_clip.get_model_config(name)
    if cfg is None:
        raise UnknownNameError(f"open_clip has no model {name!r}; see open_clip.list_models()")
    with _without_random_init_warning():
        return open_clip.create_model(name, pretrained=None, **kwargs)


_HUB_KWARGS = ("cache_dir", "revision", "token", "local_files_only")  # from_pretrained's, not config fields


def _hf_model(name: str, repo: str, pretrained: bool, img_size: int | None, kwargs: dict[str, Any]) -> nn.Module:
    """``transformers.CLIPModel`` of hub id ``repo``: pretrained from the hub (offline: its cached copy); random
    weights from a local config (:mod:`.hf_configs`) for the names it knows, else from the hub's (offline: cached)
    ``config.json``. Offline with nothing cached: a one-line :class:`~vpeft.backbones.hub.HubOfflineError`."""
    from transformers import CLIPConfig, CLIPModel

    overrides = {k: v for k, v in kwargs.items() if k not in _HUB_KWARGS}
    cfg = None if pretrained or "revision" in kwargs else local_hf_config(repo, **overrides)
    if cfg is None:
        local = hub.hf_cached(name, repo, pretrained, list(LOCAL_HF_CLIP), **kwargs)
        args = {**kwargs, "local_files_only": True} if local else kwargs
        if pretrained:
            return CLIPModel.from_pretrained(repo, **args)
        cfg = CLIPConfig.from_pretrained(repo, **args)
    if img_size is not None:
        cfg.vision_config.image_size = img_size
    return CLIPModel(cfg)


class _RandomInitNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("No pretrained weights loaded for model")


class _AsWithoutHandlers(logging.Handler):
    """What the root logger does without handlers (Python's last-resort stderr handler), as a handler."""

    def emit(self, record: logging.LogRecord) -> None:
        if logging.lastResort is not None and record.levelno >= logging.lastResort.level:
            logging.lastResort.handle(record)


@contextlib.contextmanager
def _without_random_init_warning() -> Iterator[None]:
    """Random weights were asked for: drop open_clip's warning that none were loaded. open_clip logs it with
    ``logging.warning``, which also installs a stderr handler on a root logger without handlers (``basicConfig``):
    a stand-in handler that behaves as no handler prevents that for the call's duration, so the caller's logging
    set-up is left as it was."""
    root, notice = logging.getLogger(), _RandomInitNotice()
    placeholder = None if root.handlers else _AsWithoutHandlers()
    root.addFilter(notice)
    if placeholder is not None:
        root.addHandler(placeholder)
    try:
        yield
    finally:
        if placeholder is not None:
            root.removeHandler(placeholder)
        root.removeFilter(notice)


def create(
    name: str, pretrained: str | bool | None = None, img_size: int | None = None, num_classes: int = 0, **kwargs: Any
) -> ClipBackbone:
    """A CLIP backbone by name: ``"open_clip:<model>"`` (e.g. ``open_clip:ViT-B-16``) or ``"hf:<hub id>"``.

    Args:
        name: library-qualified model name.
        pretrained: open_clip's pretrained tag (``"openai"``, ``"laion2b_s34b_b88k"``...; ``True``: ``"openai"``);
            for ``hf:`` any true value loads the hub weights with ``from_pretrained``. Both download from the hub;
            offline (``HF_HUB_OFFLINE=1``, ``--offline`` or no network, see :mod:`vpeft.backbones.hub`) they load the
            local cache's copy or fail in one line before any hub call.
            ``None`` / ``False``: random weights (nothing is downloaded; ``hf:`` names in
            :data:`~vpeft.backbones.clip.hf_configs.LOCAL_HF_CLIP` build from a local config, others read the hub's
            ``config.json``, offline its cached copy).
        img_size: input side (open_clip ``force_image_size``; Hugging Face ``image_size``, random weights only).
        num_classes: must be 0: a CLIP has no classifier (the zero-shot task's class names are its classes).
        **kwargs: passed to ``open_clip.create_model`` or to the Hugging Face constructor.
    """
    if num_classes:
        raise ConfigError(
            f"CLIP backbones have no classifier (num_classes={num_classes}); classify by class names with the "
            "zeroshot task (vpeft.tasks.zeroshot)"
        )
    source, _, model_name = name.partition(":")
    if source == "open_clip" and model_name:
        tag = "openai" if pretrained is True else (pretrained or None)
        if img_size is not None:
            kwargs["force_image_size"] = img_size
        model = _open_clip_model(model_name, tag, **kwargs)
        fuse_attention(model)
        return ClipBackbone("open_clip", model, name)
    if source == "hf" and model_name:
        return ClipBackbone("hf", _hf_model(name, model_name, bool(pretrained), img_size, kwargs), name)
    raise UnknownNameError(f"CLIP backbone {name!r} is invalid; use 'open_clip:<model>' or 'hf:<hub id>'")


# The families of vpeft's own CLIP classes are registered here, beside the classes (recognised by isinstance).
register_arch("open_clip_text", lambda m: isinstance(m, OpenClipTextTower))(open_clip_text_spec)
register_arch("clip", lambda m: isinstance(m, ClipBackbone))(clip_backbone_spec)
