"""One tower adapter per CLIP source: what differs between open_clip's and Hugging Face's towers, in one place.

:class:`~vpeft.backbones.clip.ClipBackbone` runs both towers block by block through its source's
:class:`TowerAdapter` (``SOURCES[source]``): which modules are the towers, their blocks, the token embedding, the
text tower's positional embedding / causal mask / final norm / projection, and the image tower's token embedding,
pre-norm, blocks and pooling. Adding a CLIP library is one adapter here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ...arch import get_family
from ...errors import ConfigError

__all__ = ["EOT", "SOT", "SOURCES", "HFTowers", "OpenClipTextTower", "OpenClipTowers", "TowerAdapter", "Towers"]

SOT, EOT = 49406, 49407  # CLIP BPE start/end-of-text ids


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


@dataclass
class Towers:
    """What a source's model holds, taken over by the backbone."""

    image: nn.Module
    text: nn.Module
    image_proj: nn.Module | None
    text_proj: nn.Module | None
    image_size: Any
    image_width: int
    text_width: int
    context_length: int
    embed_dim: int
    eot_id: int | None  # None: the tokenizer's end-of-text id
    pool: str  # "argmax" (open_clip's default: the largest id) or "eos" (the first end-of-text token)


class TowerAdapter:
    """The per-source parts of a CLIP's two towers (see the module docstring)."""

    source: str = ""

    def take(self, model: nn.Module) -> Towers:
        raise NotImplementedError

    def image_blocks(self, image: nn.Module) -> nn.ModuleList:
        raise NotImplementedError

    def text_blocks(self, text: nn.Module) -> nn.ModuleList:
        raise NotImplementedError

    def token_embedding(self, text: nn.Module) -> nn.Embedding:
        raise NotImplementedError

    def text_input(self, text: nn.Module, embeds: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, nn.Module]:
        """``(x, mask, final_norm)``: embeddings + positions, the causal mask, the norm before pooling."""
        raise NotImplementedError

    def text_block(self, block: nn.Module, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError

    def text_project(self, clip: nn.Module, pooled: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def image_tokens(self, image: nn.Module, images: torch.Tensor) -> torch.Tensor:
        """The token sequence entering the first image block (pre-norm applied)."""
        raise NotImplementedError

    def image_pre_norm(self, image: nn.Module) -> nn.Module:
        raise NotImplementedError

    def image_block(self, block: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return self.text_block(block, x, None)

    def image_pool(self, clip: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """Projected image features from the last block's tokens."""
        raise NotImplementedError


class OpenClipTowers(TowerAdapter):
    """open_clip ``CLIP``: ``visual`` (a ``VisionTransformer``, its own projection), the text parts moved into
    :class:`~vpeft.backbones.clip.OpenClipTextTower`; blocks take ``attn_mask``."""

    source = "open_clip"

    def take(self, model: nn.Module) -> Towers:
        image, text = model.visual, OpenClipTextTower(model)
        eos = getattr(model, "text_pool_type", "argmax") == "eos"
        return Towers(
            image=image,
            text=text,
            image_proj=None,
            text_proj=None,
            image_size=image.image_size,
            image_width=int(image.transformer.width),
            text_width=int(text.transformer.width),
            context_length=int(text.positional_embedding.shape[0]),
            embed_dim=int(image.output_dim),
            eot_id=int(model.text_eos_id) if eos else EOT,
            pool="eos" if eos else "argmax",
        )

    def image_blocks(self, image: nn.Module) -> nn.ModuleList:
        return image.transformer.resblocks

    def text_blocks(self, text: nn.Module) -> nn.ModuleList:
        return text.transformer.resblocks

    def token_embedding(self, text: nn.Module) -> nn.Embedding:
        return text.token_embedding

    def text_input(self, text: nn.Module, embeds: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, nn.Module]:
        length = embeds.shape[1]
        x = embeds + text.positional_embedding[:length].to(embeds.dtype)
        return x, text.attn_mask[:length, :length].to(embeds.dtype), text.ln_final

    def text_block(self, block: nn.Module, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        return block(x) if mask is None else block(x, attn_mask=mask)

    def text_project(self, clip: nn.Module, pooled: torch.Tensor) -> torch.Tensor:
        proj = clip.text.text_projection
        if proj is None:
            return pooled
        return proj(pooled) if isinstance(proj, nn.Linear) else pooled @ proj

    def image_tokens(self, image: nn.Module, images: torch.Tensor) -> torch.Tensor:
        return get_family(image).tokens(image, images)

    def image_pre_norm(self, image: nn.Module) -> nn.Module:
        return image.ln_pre

    def image_pool(self, clip: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return get_family(clip.image).finish(clip.image, x)


class HFTowers(TowerAdapter):
    """Hugging Face ``CLIPModel``: ``vision_model`` / ``text_model`` with separate projections; encoder layers take
    the mask positionally and return a tuple."""

    source = "hf"

    def take(self, model: nn.Module) -> Towers:
        vc, tc = model.config.vision_config, model.config.text_config
        return Towers(
            image=model.vision_model,
            text=model.text_model,
            image_proj=model.visual_projection,
            text_proj=model.text_projection,
            image_size=vc.image_size,
            image_width=int(vc.hidden_size),
            text_width=int(tc.hidden_size),
            context_length=int(tc.max_position_embeddings),
            embed_dim=int(model.config.projection_dim),
            eot_id=EOT,
            pool="eos",
        )

    def image_blocks(self, image: nn.Module) -> nn.ModuleList:
        return image.encoder.layers

    def text_blocks(self, text: nn.Module) -> nn.ModuleList:
        return text.encoder.layers

    def token_embedding(self, text: nn.Module) -> nn.Embedding:
        return text.embeddings.token_embedding

    def text_input(self, text: nn.Module, embeds: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, nn.Module]:
        length = embeds.shape[1]
        x = embeds + text.embeddings.position_embedding.weight[:length].to(embeds.dtype)
        mask = torch.full((length, length), float("-inf"), device=x.device, dtype=x.dtype).triu(1)[None, None]
        return x, mask, text.final_layer_norm

    def text_block(self, block: nn.Module, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        out = block(x, mask)
        return out[0] if isinstance(out, tuple) else out

    def text_project(self, clip: nn.Module, pooled: torch.Tensor) -> torch.Tensor:
        return clip.text_proj(pooled)

    def image_tokens(self, image: nn.Module, images: torch.Tensor) -> torch.Tensor:
        return image.pre_layrnorm(image.embeddings(images))

    def image_pre_norm(self, image: nn.Module) -> nn.Module:
        return image.pre_layrnorm

    def image_pool(self, clip: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return clip.image_proj(clip.image.post_layernorm(x[:, 0]))


SOURCES: dict[str, TowerAdapter] = {a.source: a for a in (OpenClipTowers(), HFTowers())}
