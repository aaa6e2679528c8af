"""CLIP backbones (both towers) from ``open_clip`` or Hugging Face ``transformers``, behind one interface.

Reference: Radford et al., "Learning Transferable Visual Models From Natural Language Supervision", ICML 2021.

:class:`ClipBackbone` holds an image tower, a text tower and ``logit_scale``, whatever library built them:

* ``image``: open_clip's ``VisionTransformer`` (its ``proj`` inside) or Hugging Face's ``CLIPVisionModel``
  (+ ``image_proj``, the ``visual_projection`` Linear): patch embedding, class token, positional embedding, pre-norm,
  blocks, post-norm, class-token pooling, projection;
* ``text``: :class:`OpenClipTextTower` (open_clip's token embedding, positional embedding, causal blocks, final norm
  and projection moved into one module) or Hugging Face's ``CLIPTextModel`` (+ ``text_proj``), pooled at the first
  end-of-text token (open_clip's argmax of the token ids is the same position: end-of-text has the largest id).

Both towers are run block by block here (:meth:`ClipBackbone.encode_image`, :meth:`ClipBackbone.encode_text_embeds`),
so prompt learners can start the text tower from *token embeddings* and place prompt tokens at any layer of either
tower. vpeft methods reach a tower by its sub-module (``backbone.image`` / ``backbone.text``), which has an ArchSpec of
its own (:mod:`vpeft.arch.clip`); the ArchSpec of the whole backbone is its image tower's (names under ``image.``).

open_clip's blocks use ``nn.MultiheadAttention``, whose q/k/v projection is a bare parameter; :func:`create` replaces
each by :class:`FusedSelfAttention` (same weights, the packed projection as an ``nn.Linear`` ``qkv``) so LoRA and the
other Linear-level methods see q, k and v as slices of one Linear, exactly as on timm ViTs.

Two slots take the vision-language methods: ``prompt`` (:class:`TemplatePrompt`: the text side, hand-written templates;
CoOp, CoCoOp and MaPLe wrap it) and ``image_adapter`` (identity; CLIP-Adapter wraps it).

Tokenisation uses CLIP's BPE (shipped inside ``open-clip-torch``, offline) for both libraries; a text that does not
fit the context (77 tokens) raises :class:`~vpeft.errors.ConfigError` instead of being truncated.

No weights are downloaded unless ``pretrained`` is given (open_clip tag or Hugging Face hub id).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..arch import clip as _clip_specs  # noqa: F401  (registers the CLIP ArchSpecs)
from ..arch import get_family
from ..errors import ConfigError, UnknownNameError

__all__ = [
    "ClipBackbone",
    "FusedSelfAttention",
    "OpenClipTextTower",
    "TemplatePrompt",
    "ClipTokenizer",
    "create",
    "tiny_open_clip",
    "tiny_hf_clip",
    "hf_from_open_clip",
    "open_clip_from_hf",
    "TOWERS",
    "CLIP_MEAN",
    "CLIP_STD",
]

TOWERS = ("image", "text")
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
SOT, EOT = 49406, 49407  # CLIP BPE start/end-of-text ids


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


class OpenClipTextTower(nn.Module):
    """open_clip's text tower in one module: token/positional embeddings, causal blocks, final norm, projection."""

    def __init__(self, clip: nn.Module) -> None:
        super().__init__()
        self.token_embedding = clip.token_embedding
        self.positional_embedding = clip.positional_embedding
        self.transformer = clip.transformer
        self.ln_final = clip.ln_final
        proj = clip.text_projection
        self.text_projection = proj
        self.register_buffer("attn_mask", clip.attn_mask, persistent=False)
        if getattr(clip, "text_pool_type", "argmax") not in ("argmax", "eos"):
            raise ConfigError(f"open_clip text pooling {clip.text_pool_type!r} is not supported (argmax/eos only)")


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
        if source not in ("open_clip", "hf"):
            raise ConfigError(f"CLIP source {source!r} is invalid; valid sources: open_clip, hf")
        self.source = source
        if source == "open_clip":
            self.image = model.visual
            self.text = OpenClipTextTower(model)
            self.image_proj = self.text_proj = None
            size = self.image.image_size
            width, twidth = self.image.transformer.width, self.text.transformer.width
            ctx, self.embed_dim = self.text.positional_embedding.shape[0], int(self.image.output_dim)
            eos = getattr(model, "text_pool_type", "argmax") == "eos"
            self.eot_id, self.pool = (int(model.text_eos_id), "eos") if eos else (EOT, "argmax")
        else:
            self.image, self.image_proj = model.vision_model, model.visual_projection
            self.text, self.text_proj = model.text_model, model.text_projection
            vc, tc = model.config.vision_config, model.config.text_config
            size, width, twidth, ctx = vc.image_size, vc.hidden_size, tc.hidden_size, tc.max_position_embeddings
            self.embed_dim = int(model.config.projection_dim)
            self.eot_id, self.pool = EOT, "eos"
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
        return self.image.transformer.resblocks if self.source == "open_clip" else self.image.encoder.layers

    def text_blocks(self) -> nn.ModuleList:
        return self.text.transformer.resblocks if self.source == "open_clip" else self.text.encoder.layers

    def token_embedding(self) -> nn.Embedding:
        return self.text.token_embedding if self.source == "open_clip" else self.text.embeddings.token_embedding

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
        n, length, _ = embeds.shape
        if self.source == "open_clip":
            x = embeds + self.text.positional_embedding[:length].to(embeds.dtype)
            mask, post = self.text.attn_mask[:length, :length].to(embeds.dtype), self.text.ln_final
        else:
            pos = self.text.embeddings.position_embedding.weight[:length]
            x = embeds + pos.to(embeds.dtype)
            mask = torch.full((length, length), float("-inf"), device=x.device, dtype=x.dtype).triu(1)[None, None]
            post = self.text.final_layer_norm
        for i, block in enumerate(self.text_blocks()):
            prompt = deep[i - 1] if 0 < i <= len(deep) else None
            if prompt is not None:
                p = prompt.to(x.dtype).unsqueeze(0).expand(n, -1, -1)
                x = torch.cat([x[:, :deep_at], p, x[:, deep_at + p.shape[1] :]], dim=1)
            x = block(x, attn_mask=mask) if self.source == "open_clip" else _hf_layer(block, x, mask)
        x = post(x)[torch.arange(n, device=x.device), eot]
        if self.source == "hf":
            return self.text_proj(x)
        proj = self.text.text_projection
        if proj is None:
            return x
        return proj(x) if isinstance(proj, nn.Linear) else x @ proj

    # ---- image tower ---------------------------------------------------------------------------------------
    def _image_tokens(self, images: torch.Tensor) -> torch.Tensor:
        if self.source == "open_clip":
            return get_family(self.image).tokens(self.image, images)
        return self.image.pre_layrnorm(self.image.embeddings(images))

    def _image_pool(self, x: torch.Tensor) -> torch.Tensor:
        if self.source == "open_clip":
            return get_family(self.image).finish(self.image, x)
        return self.image_proj(self.image.post_layernorm(x[:, 0]))

    def encode_image(self, images: torch.Tensor, prompts: Sequence[torch.Tensor | None] | None = None) -> torch.Tensor:
        """``(B, E)`` projected image features, through ``image_adapter``.

        Args:
            prompts: MaPLe's deep vision prompts: ``prompts[0]`` ``(M, W)`` tokens appended after the patch tokens
                and normalised with them by the pre-norm (as MaPLe concatenates before ``ln_pre``), ``prompts[i]``
                (``i >= 1``, or None) replace the last ``M`` tokens at layer ``i``'s input. Class-token pooling
                ignores them.
        """
        x = self._image_tokens(images)
        prompts = list(prompts or ())
        pre = self.image.ln_pre if self.source == "open_clip" else self.image.pre_layrnorm
        for i, block in enumerate(self.image_blocks()):
            p = prompts[i] if i < len(prompts) else None
            if p is not None:
                p = (pre(p) if i == 0 else p).to(x.dtype).unsqueeze(0).expand(x.shape[0], -1, -1)
                x = torch.cat([x, p] if i == 0 else [x[:, : -p.shape[1]], p], dim=1)
            x = block(x) if self.source == "open_clip" else _hf_layer(block, x, None)
        return self.image_adapter(self._image_pool(x))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Image features ``(B, E)`` (a CLIP is an image feature extractor; see :mod:`vpeft.tasks.zeroshot`)."""
        return self.encode_image(images, self.prompt.vision_prompts(self))


def _hf_layer(block: nn.Module, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    out = block(x, mask)
    return out[0] if isinstance(out, tuple) else out


# ---- construction ---------------------------------------------------------------------------------------------
def _open_clip_model(name: str, pretrained: str | None, **kwargs: Any) -> nn.Module:
    import open_clip

    if pretrained:  # network path: open_clip downloads the tagged checkpoint
        return open_clip.create_model(name, pretrained=pretrained, **kwargs)
    cfg = open_clip.get_model_config(name)
    if cfg is None:
        raise UnknownNameError(f"open_clip has no model {name!r}; see open_clip.list_models()")
    with _without_random_init_warning():
        return open_clip.create_model(name, pretrained=None, **kwargs)


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
            for ``hf:`` any true value loads the hub weights with ``from_pretrained``. Both need a network.
            ``None`` / ``False``: random weights (open_clip: nothing is downloaded; ``hf:`` still reads the config).
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
        from transformers import CLIPConfig, CLIPModel

        if pretrained:
            model = CLIPModel.from_pretrained(model_name, **kwargs)
        else:
            cfg = CLIPConfig.from_pretrained(model_name, **kwargs)
            if img_size is not None:
                cfg.vision_config.image_size = img_size
            model = CLIPModel(cfg)
        return ClipBackbone("hf", model, name)
    raise UnknownNameError(f"CLIP backbone {name!r} is invalid; use 'open_clip:<model>' or 'hf:<hub id>'")


def tiny_open_clip(
    width: int = 64,
    text_width: int = 32,
    layers: int = 2,
    image_size: int = 32,
    patch_size: int = 8,
    embed_dim: int = 32,
    seed: int = 0,
    quick_gelu: bool = True,
) -> ClipBackbone:
    """A random-init open_clip CLIP small enough for tests (real BPE vocabulary, 77-token context)."""
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

    torch.manual_seed(seed)
    vision = CLIPVisionCfg(
        layers=layers, width=width, head_width=width // 2, image_size=image_size, patch_size=patch_size
    )
    text = CLIPTextCfg(context_length=77, vocab_size=49408, width=text_width, heads=2, layers=layers)
    model = CLIP(embed_dim=embed_dim, vision_cfg=vision, text_cfg=text, quick_gelu=quick_gelu)
    fuse_attention(model)
    return ClipBackbone("open_clip", model, "open_clip:tiny")


def _hf_config(
    width: int, text_width: int, layers: int, image_size: int, patch_size: int, embed_dim: int, act: str = "quick_gelu"
):
    from transformers import CLIPConfig

    text = dict(
        vocab_size=49408,
        hidden_size=text_width,
        intermediate_size=4 * text_width,
        num_hidden_layers=layers,
        num_attention_heads=max(1, text_width // 16),
        max_position_embeddings=77,
        hidden_act=act,
        bos_token_id=SOT,
        eos_token_id=EOT,
        pad_token_id=0,
    )
    vision = dict(
        hidden_size=width,
        intermediate_size=4 * width,
        num_hidden_layers=layers,
        num_attention_heads=max(1, width // 32),
        image_size=image_size,
        patch_size=patch_size,
        hidden_act=act,
    )
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=embed_dim)


def tiny_hf_clip(
    width: int = 64,
    text_width: int = 32,
    layers: int = 2,
    image_size: int = 32,
    patch_size: int = 8,
    embed_dim: int = 32,
    seed: int = 0,
) -> ClipBackbone:
    """A random-init ``transformers.CLIPModel`` small enough for tests (same shapes as :func:`tiny_open_clip`)."""
    from transformers import CLIPModel

    torch.manual_seed(seed)
    model = CLIPModel(_hf_config(width, text_width, layers, image_size, patch_size, embed_dim))
    return ClipBackbone("hf", model, "hf:tiny")


# ---- weight conversion open_clip <-> Hugging Face ------------------------------------------------------------
def _pairs(layers_img: int, layers_txt: int) -> list[tuple[str, str, str]]:
    """(open_clip name, HF name, how) for every tensor; how: "" copy, "T" transpose, "qkv" split into q/k/v."""
    out = [
        ("image.conv1.weight", "image.embeddings.patch_embedding.weight", ""),
        ("image.class_embedding", "image.embeddings.class_embedding", ""),
        ("image.positional_embedding", "image.embeddings.position_embedding.weight", ""),
        ("image.proj", "image_proj.weight", "T"),
        ("text.token_embedding.weight", "text.embeddings.token_embedding.weight", ""),
        ("text.positional_embedding", "text.embeddings.position_embedding.weight", ""),
        ("text.text_projection", "text_proj.weight", "T"),
        ("logit_scale", "logit_scale", ""),
    ]
    norms = [
        ("image.ln_pre", "image.pre_layrnorm"),
        ("image.ln_post", "image.post_layernorm"),
        ("text.ln_final", "text.final_layer_norm"),
    ]
    for tower, n in (("image", layers_img), ("text", layers_txt)):
        for i in range(n):
            a, b = f"{tower}.transformer.resblocks.{i}", f"{tower}.encoder.layers.{i}"
            norms += [(f"{a}.ln_1", f"{b}.layer_norm1"), (f"{a}.ln_2", f"{b}.layer_norm2")]
            for p in ("weight", "bias"):
                out += [
                    (f"{a}.attn.qkv.{p}", f"{b}.self_attn.{{}}_proj.{p}", "qkv"),
                    (f"{a}.attn.out_proj.{p}", f"{b}.self_attn.out_proj.{p}", ""),
                    (f"{a}.mlp.c_fc.{p}", f"{b}.mlp.fc1.{p}", ""),
                    (f"{a}.mlp.c_proj.{p}", f"{b}.mlp.fc2.{p}", ""),
                ]
    out += [(f"{a}.{p}", f"{b}.{p}", "") for a, b in norms for p in ("weight", "bias")]
    return out


def _clean(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k.replace(".base_layer", ""): v for k, v in sd.items()}


def hf_from_open_clip(clip: ClipBackbone) -> ClipBackbone:
    """The same network as a Hugging Face ``CLIPModel`` (plain open_clip ViT towers: class-token pooling, GELU or
    QuickGELU, LayerNorm eps 1e-5, no bias in the patch embedding)."""
    from transformers import CLIPModel

    if clip.source != "open_clip":
        raise ConfigError(f"hf_from_open_clip needs an open_clip backbone, got {clip.source!r}")
    blk = clip.image_blocks()[0]
    act = "quick_gelu" if type(blk.mlp.gelu).__name__ == "QuickGELU" else "gelu"
    cfg = _hf_config(
        clip.image_width,
        clip.text_width,
        len(clip.image_blocks()),
        clip.image.image_size[0],
        clip.image.patch_size[0],
        clip.embed_dim,
        act,
    )
    cfg.vision_config.num_hidden_layers, cfg.text_config.num_hidden_layers = (
        len(clip.image_blocks()),
        len(clip.text_blocks()),
    )
    cfg.vision_config.num_attention_heads = clip.image_blocks()[0].attn.num_heads
    cfg.text_config.num_attention_heads = clip.text_blocks()[0].attn.num_heads
    cfg.vision_config.intermediate_size = blk.mlp.c_fc.out_features
    cfg.text_config.intermediate_size = clip.text_blocks()[0].mlp.c_fc.out_features
    cfg.text_config.vocab_size = clip.token_embedding().num_embeddings
    cfg.text_config.max_position_embeddings = clip.context_length
    out = ClipBackbone("hf", CLIPModel(cfg), clip.pretrained_cfg["vpeft_backbone"].replace("open_clip:", "hf:"))
    src, dst = _clean(clip.state_dict()), out.state_dict()
    with torch.no_grad():
        for a, b, how in _pairs(len(clip.image_blocks()), len(clip.text_blocks())):
            t = src[a]
            if how == "qkv":
                for name, part in zip("qkv", t.chunk(3, dim=0)):
                    dst[b.format(name)].copy_(part)
            else:
                dst[b].copy_(t.T if how == "T" else t)
    return out


def open_clip_from_hf(clip: ClipBackbone, like: ClipBackbone) -> ClipBackbone:
    """Copy a Hugging Face backbone's weights into ``like`` (an open_clip backbone of the same shapes), in place."""
    if clip.source != "hf" or like.source != "open_clip":
        raise ConfigError("open_clip_from_hf needs a Hugging Face backbone and an open_clip one of the same shapes")
    src, dst = _clean(clip.state_dict()), _clean(like.state_dict())
    with torch.no_grad():
        for a, b, how in _pairs(len(like.image_blocks()), len(like.text_blocks())):
            if how == "qkv":
                dst[a].copy_(torch.cat([src[b.format(n)] for n in "qkv"], dim=0))
            else:
                dst[a].copy_(src[b].T if how == "T" else src[b])
    return like


def param_count(module: nn.Module) -> int:
    """Number of parameters of ``module``."""
    return sum(p.numel() for p in module.parameters())
