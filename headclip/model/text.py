"""Learnable object-agnostic prompts and the text encoder that reads them.

Two prompts, "X X ... X object." (normal) and "X X ... X damaged object."
(abnormal), whose X tokens are learnable context vectors. Deep prompts replace
the tokens right after the start token on entry to text layers
``deep_prompt_start..deep_prompt_end`` (1-based). Features are read at the
end-of-text token, passed through ``ln_final`` and the text projection.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from .config import HeadCLIPConfig


class PromptLearner(nn.Module):
    """Learnable prompts over a frozen open_clip text tower.

    Parameters (the learned state):
        ctx_normal, ctx_abnormal: (n_ctx, text_width)
        deep: (n_deep_layers, deep_prompt_length, text_width)
    """

    def __init__(self, clip: nn.Module, tokenizer, config: HeadCLIPConfig):
        super().__init__()
        text_layers = len(clip.transformer.resblocks)
        width = clip.token_embedding.weight.shape[1]
        if config.n_deep_layers and config.deep_prompt_end > text_layers:
            raise ValueError(
                f"deep prompts reach text layer {config.deep_prompt_end} but "
                f"{config.backbone} has {text_layers} text layers"
            )
        self.config = config
        self.text_width = width
        self.text_layers = text_layers
        # The frozen text tower, held as a list so its weights stay out of
        # this module's state dict (they belong to the backbone).
        self._clip = [clip]

        prefix = " ".join(["X"] * config.n_ctx)
        prompts = [f"{prefix} {config.normal_template}.", f"{prefix} {config.abnormal_template}."]
        tokens = tokenizer(prompts)  # (2, context_length)
        self.register_buffer("tokens", tokens, persistent=False)
        self.register_buffer("eot_index", self._eot_index(clip, tokens), persistent=False)

        generator = torch.Generator().manual_seed(config.init_seed)
        self.ctx_normal = nn.Parameter(torch.randn(config.n_ctx, width, generator=generator) * 0.02)
        self.ctx_abnormal = nn.Parameter(torch.randn(config.n_ctx, width, generator=generator) * 0.02)
        self.deep = nn.Parameter(
            torch.randn(config.n_deep_layers, config.deep_prompt_length, width, generator=generator) * 0.02
        )

    @staticmethod
    def _eot_index(clip: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
        eos_id = getattr(clip, "text_eos_id", None)
        if getattr(clip, "text_pool_type", "argmax") == "argmax" or eos_id is None:
            return tokens.argmax(dim=-1)
        return (tokens == eos_id).int().argmax(dim=-1)

    @property
    def clip(self) -> nn.Module:
        return self._clip[0]

    def prompt_embeddings(self) -> torch.Tensor:
        """Token embeddings with the context vectors in place; (2, context_length, width)."""
        clip = self.clip
        embedded = clip.token_embedding(self.tokens).to(self.ctx_normal.dtype)
        ctx = torch.stack([self.ctx_normal, self.ctx_abnormal])  # (2, n_ctx, width)
        n_ctx = ctx.shape[1]
        return torch.cat([embedded[:, :1], ctx, embedded[:, 1 + n_ctx:]], dim=1)

    def forward(self) -> torch.Tensor:
        """Unnormalised text features, row 0 normal and row 1 abnormal; (2, embed_dim)."""
        clip = self.clip
        x = self.prompt_embeddings()
        x = x + clip.positional_embedding.to(x.dtype)
        mask = clip.attn_mask
        start, length = self.config.deep_prompt_start, self.config.deep_prompt_length
        for layer, block in enumerate(clip.transformer.resblocks, start=1):
            depth = layer - start
            if length and 0 <= depth < self.deep.shape[0]:
                deep = self.deep[depth].unsqueeze(0).expand(x.shape[0], -1, -1).to(x.dtype)
                x = torch.cat([x[:, :1], deep, x[:, 1 + length:]], dim=1)
            x = block(x, attn_mask=mask)
        x = clip.ln_final(x)
        x = x[torch.arange(x.shape[0], device=x.device), self.eot_index]
        projection = clip.text_projection
        if isinstance(projection, nn.Linear):
            return projection(x)
        return x @ projection
