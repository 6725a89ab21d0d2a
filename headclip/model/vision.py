"""The dual-path vision encoder with learnable head weights.

From the first adapted layer on, every block keeps CLIP's original path and
adds a second path whose attention is ``softmax(V V^T * scale) V`` (V-V
attention), reusing the block's own qkv and out-projection weights, with no
MLP. Both attentions read the original path's layer-normed hidden state. The
second path starts from the hidden state entering the first adapted layer and
adds each adapted layer's V-V attention output to it; patch features are read
from it. Each head's V-V output is scaled by a learnable weight before the
out-projection (HeadCLIP); weights of 1 give AnomalyCLIP's DPAM exactly.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import HeadCLIPConfig, default_map_layers, default_vv_start_layer


class VisionFeatures(NamedTuple):
    """Output of :class:`DualPathVisionEncoder`.

    class_token: (B, width) class token of the original path after the last block.
    patch_tokens: one (B, grid*grid, width) tensor per map layer, V-V path,
        class token removed, before ``ln_post``.
    """

    class_token: torch.Tensor
    patch_tokens: list[torch.Tensor]


def interpolate_pos_embedding(pos: torch.Tensor, grid: int, mode: str = "bilinear") -> torch.Tensor:
    """Resize a (1 + g*g, width) positional embedding to (1 + grid*grid, width).

    The class position is kept; the g x g patch positions are resized as an
    image with ``F.interpolate(mode=mode, align_corners=False)``, which with
    "bilinear" is AnomalyCLIP's call (its default align_corners is False).
    """
    cls_pos, patch_pos = pos[:1], pos[1:]
    old = int(round(math.sqrt(patch_pos.shape[0])))
    if old * old != patch_pos.shape[0]:
        raise ValueError(f"positional embedding of {patch_pos.shape[0]} patches is not a square grid")
    if old == grid:
        return pos.clone()
    patch_pos = patch_pos.reshape(1, old, old, -1).permute(0, 3, 1, 2).float()
    patch_pos = F.interpolate(patch_pos, size=(grid, grid), mode=mode, align_corners=False)
    patch_pos = patch_pos.permute(0, 2, 3, 1).reshape(grid * grid, -1).to(pos.dtype)
    return torch.cat([cls_pos, patch_pos], dim=0)


class DualPathVisionEncoder(nn.Module):
    """Runs an open_clip ``VisionTransformer``'s weights with the V-V path added.

    Learned state: ``head_weights`` of shape (adapted layers, heads), ones at init.
    """

    def __init__(self, visual: nn.Module, config: HeadCLIPConfig):
        super().__init__()
        blocks = visual.transformer.resblocks
        for block in blocks:
            if not isinstance(getattr(block, "attn", None), nn.MultiheadAttention):
                raise ValueError(f"{config.backbone}: vision blocks must use nn.MultiheadAttention")
        if getattr(visual, "attn_pool", None) is not None:
            raise ValueError(f"{config.backbone}: attentional pooling towers are not supported")
        self.depth = len(blocks)
        self.heads = blocks[0].attn.num_heads
        self.width = blocks[0].attn.embed_dim
        patch = visual.conv1.kernel_size
        self.patch_size = patch[0] if isinstance(patch, tuple) else int(patch)
        if config.image_size % self.patch_size:
            raise ValueError(
                f"image_size {config.image_size} is not a multiple of the patch size {self.patch_size}"
            )
        self.grid = config.image_size // self.patch_size

        start = config.vv_start_layer or default_vv_start_layer(self.depth)
        if not 1 <= start <= self.depth:
            raise ValueError(f"vv_start_layer {start} is outside 1..{self.depth}")
        map_layers = tuple(config.map_layers or default_map_layers(self.depth, start))
        for layer in map_layers:
            if not start <= layer <= self.depth:
                raise ValueError(
                    f"map layer {layer} must lie between the first V-V layer {start} and {self.depth}"
                )
        self.vv_start_layer = start
        self.map_layers = map_layers
        self.head_weights_enabled = config.head_weights
        self.head_weights_on_original = config.head_weights and config.head_weights_on_original

        self._visual = [visual]  # frozen weights belong to the backbone
        # At the weights' own grid the backbone's embedding is used as it is (so
        # it stays trainable when the backbone itself is trained); other input
        # sizes use an interpolated copy.
        native = visual.positional_embedding.shape[0] == 1 + self.grid * self.grid
        self.register_buffer(
            "_resized_pos_embedding",
            None if native else interpolate_pos_embedding(visual.positional_embedding.detach(), self.grid,
                                                          config.pos_embedding_interpolation),
            persistent=False,
        )
        self.head_weights = nn.Parameter(torch.ones(self.depth - start + 1, self.heads))

    @property
    def visual(self) -> nn.Module:
        return self._visual[0]

    @property
    def pos_embedding(self) -> torch.Tensor:
        """(1 + grid*grid, width) positional embedding for this input size."""
        resized = self._resized_pos_embedding
        return self.visual.positional_embedding if resized is None else resized

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Patch embedding, class token, positions, ln_pre; (B, 1 + grid*grid, width)."""
        visual = self.visual
        x = visual.conv1(images)
        batch, width = x.shape[:2]
        if x.shape[-1] != self.grid or x.shape[-2] != self.grid:
            raise ValueError(
                f"expected {self.grid * self.patch_size}px inputs, got {tuple(images.shape[-2:])}"
            )
        x = x.reshape(batch, width, -1).transpose(1, 2)
        cls = visual.class_embedding.to(x.dtype).view(1, 1, -1).expand(batch, -1, -1)
        x = torch.cat([cls, x], dim=1) + self.pos_embedding.to(x.dtype)
        return visual.ln_pre(x)

    def _qkv(self, attn: nn.MultiheadAttention, x: torch.Tensor):
        batch, tokens, _ = x.shape
        qkv = F.linear(x, attn.in_proj_weight, attn.in_proj_bias)
        qkv = qkv.view(batch, tokens, 3, self.heads, self.width // self.heads)
        return qkv.permute(2, 0, 3, 1, 4).unbind(0)  # 3 x (B, heads, N, head_dim)

    def _merge(self, attn: nn.MultiheadAttention, heads_out: torch.Tensor, weights: Optional[torch.Tensor]):
        if weights is not None:
            heads_out = heads_out * weights.to(heads_out.dtype).view(1, -1, 1, 1)
        batch, _, tokens, _ = heads_out.shape
        merged = heads_out.transpose(1, 2).reshape(batch, tokens, self.width)
        return attn.out_proj(merged)

    def block_forward(self, block: nn.Module, x: torch.Tensor, x_vv: Optional[torch.Tensor],
                      weights: Optional[torch.Tensor]):
        """One block of both paths. ``x_vv`` None: original path only.

        Returns (x, x_vv) after the block.
        """
        attn = block.attn
        q, k, v = self._qkv(attn, block.ln_1(x))
        original_weights = weights if self.head_weights_on_original else None
        if x_vv is None:
            out = F.scaled_dot_product_attention(q, k, v)
            x = x + block.ls_1(self._merge(attn, out, original_weights))
        else:
            both = F.scaled_dot_product_attention(torch.cat([q, v]), torch.cat([k, v]), torch.cat([v, v]))
            out, out_vv = both.chunk(2)
            x = x + block.ls_1(self._merge(attn, out, original_weights))
            x_vv = x_vv + block.ls_1(self._merge(attn, out_vv, weights))
        x = x + block.ls_2(block.mlp(block.ln_2(x)))
        return x, x_vv

    def forward(self, images: torch.Tensor) -> VisionFeatures:
        """images: (B, 3, S, S) normalised; S = image_size."""
        x = self.embed(images)
        x_vv = None
        patch_tokens = {}
        last_map_layer = max(self.map_layers)
        for layer, block in enumerate(self.visual.transformer.resblocks, start=1):
            weights = None
            if layer >= self.vv_start_layer and self.head_weights_enabled:
                weights = self.head_weights[layer - self.vv_start_layer]
            # The V-V path runs from its first layer up to the last map layer;
            # nothing reads it past that point.
            if self.vv_start_layer <= layer <= last_map_layer:
                x_vv = x if x_vv is None else x_vv
            else:
                x_vv = None
            x, x_vv = self.block_forward(block, x, x_vv, weights)
            if layer in self.map_layers:
                patch_tokens[layer] = x_vv[:, 1:]
        return VisionFeatures(class_token=x[:, 0], patch_tokens=[patch_tokens[l] for l in self.map_layers])

    def project(self, tokens: torch.Tensor, layernorm: bool = True) -> torch.Tensor:
        """``ln_post`` (optional) then the visual projection; (..., width) -> (..., embed_dim)."""
        visual = self.visual
        if layernorm:
            tokens = visual.ln_post(tokens)
        if visual.proj is not None:
            tokens = tokens @ visual.proj
        return tokens
