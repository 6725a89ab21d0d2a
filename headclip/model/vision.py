"""The dual-path vision encoder with learnable head weights.

From the first adapted layer on, every block keeps CLIP's original path and
adds a second path whose attention is ``softmax(V V^T * scale) V`` (V-V
attention), reusing the block's own qkv and out-projection weights, with no
MLP. Both attentions read the original path's layer-normed hidden state. The
second path starts from the hidden state entering the first adapted layer and
adds each adapted layer's V-V attention output to it; patch features are read
from it. Each head's V-V output is scaled by a learnable weight before the
out-projection (HeadCLIP); weights of 1 give AnomalyCLIP's DPAM exactly.

:class:`ForwardOptions` selects rewrites of this forward that compute the same
thing with less work; all off is the original forward, kept as the reference
(tests/test_forward_rewrites.py checks each against it). The tower runs in the
dtype of its weights (see :func:`headclip.model.inference.set_precision`).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import HeadCLIPConfig, default_map_layers, default_vv_start_layer


class VisionFeatures(NamedTuple):
    """Output of :class:`DualPathVisionEncoder`.

    class_token: (B, width) class token of the original path after the last block
        (None from :meth:`DualPathVisionEncoder.map_tokens`, which stops at the last map layer).
    patch_tokens: one (B, grid*grid, width) tensor per map layer, V-V path,
        class token removed, before ``ln_post``.
    """

    class_token: Optional[torch.Tensor]
    patch_tokens: list[torch.Tensor]


@dataclass
class ForwardOptions:
    """Rewrites of the vision forward; each is exact in fp32 (up to summation order).

    split_sdpa: the V-V block's two attentions as two SDPA calls on the qkv
        views, instead of one call on ``torch.cat`` copies of them.
    class_token_last: the last block's query, out-projection and MLP of the
        original path run on the class token only (nothing else is read).
    fold_head_weights: head weights scale the out-projection's columns instead
        of the (B, heads, N, head_dim) activations.
    cudnn_attention: on CUDA, SDPA prefers cuDNN's fused attention kernel.
    """

    split_sdpa: bool = True
    class_token_last: bool = True
    fold_head_weights: bool = True
    cudnn_attention: bool = False

    @classmethod
    def reference(cls) -> "ForwardOptions":
        """The original forward: every rewrite off."""
        return cls(split_sdpa=False, class_token_last=False, fold_head_weights=False, cudnn_attention=False)


def attention_backends(device: torch.device, prefer_cudnn: bool):
    """A context in which SDPA on CUDA tries cuDNN attention first; a no-op elsewhere."""
    if not prefer_cudnn or device.type != "cuda":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    order = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
             SDPBackend.MATH]
    return sdpa_kernel(order, set_priority=True)


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
        self.pos_interpolation = config.pos_embedding_interpolation
        self._pos_at_grid: dict[int, torch.Tensor] = {}  # other grids' interpolated copies (map_tokens)
        self.head_weights = nn.Parameter(torch.ones(self.depth - start + 1, self.heads))
        self.options = ForwardOptions()

    @property
    def visual(self) -> nn.Module:
        return self._visual[0]

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the tower computes in: that of its weights."""
        return self.visual.conv1.weight.dtype

    @property
    def pos_embedding(self) -> torch.Tensor:
        """(1 + grid*grid, width) positional embedding for this input size."""
        resized = self._resized_pos_embedding
        return self.visual.positional_embedding if resized is None else resized

    def pos_embedding_at(self, grid: int) -> torch.Tensor:
        """(1 + grid*grid, width) positional embedding for inputs of ``grid`` patches a side: the model's own
        at its grid, else the weights' embedding interpolated as a model built at that size would (cached)."""
        if grid == self.grid:
            return self.pos_embedding
        native = self.visual.positional_embedding
        cached = self._pos_at_grid.get(grid)
        if cached is None or cached.device != native.device or cached.dtype != native.dtype:
            cached = interpolate_pos_embedding(native.detach(), grid, self.pos_interpolation)
            self._pos_at_grid[grid] = cached
        return cached

    def embed(self, images: torch.Tensor, any_size: bool = False) -> torch.Tensor:
        """Patch embedding, class token, positions, ln_pre; (B, 1 + grid*grid, width).

        ``any_size``: inputs of any square side that is a multiple of the patch size, with
        :meth:`pos_embedding_at` their grid; otherwise only the model's own side is taken.
        """
        visual = self.visual
        side = images.shape[-1]
        if images.shape[-2] != side or (any_size and side % self.patch_size) or \
                (not any_size and side != self.grid * self.patch_size):
            expected = f"square inputs whose side is a multiple of {self.patch_size}" if any_size else \
                f"{self.grid * self.patch_size}px inputs"
            raise ValueError(f"expected {expected}, got {tuple(images.shape[-2:])}")
        x = visual.conv1(images.to(self.dtype))
        batch, width = x.shape[:2]
        pos = self.pos_embedding_at(x.shape[-1])
        x = x.reshape(batch, width, -1).transpose(1, 2)
        cls = visual.class_embedding.to(x.dtype).view(1, 1, -1).expand(batch, -1, -1)
        x = torch.cat([cls, x], dim=1) + pos.to(x.dtype)
        return visual.ln_pre(x)

    def _qkv(self, attn: nn.MultiheadAttention, x: torch.Tensor, class_only: bool = False):
        """3 x (B, heads, N, head_dim) views of the projections; ``class_only``: q of the class token alone."""
        batch, tokens, _ = x.shape
        head_dim = self.width // self.heads
        if not class_only:
            qkv = F.linear(x, attn.in_proj_weight, attn.in_proj_bias)
            qkv = qkv.view(batch, tokens, 3, self.heads, head_dim)
            return qkv.permute(2, 0, 3, 1, 4).unbind(0)
        width = self.width
        q = F.linear(x[:, :1], attn.in_proj_weight[:width], attn.in_proj_bias[:width])
        kv = F.linear(x, attn.in_proj_weight[width:], attn.in_proj_bias[width:])
        k, v = kv.view(batch, tokens, 2, self.heads, head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        return q.view(batch, 1, self.heads, head_dim).transpose(1, 2), k, v

    def _merge(self, attn: nn.MultiheadAttention, heads_out: torch.Tensor, weights: Optional[torch.Tensor]):
        """(B, heads, N, head_dim) -> out-projection (B, N, width), each head scaled by ``weights``."""
        out_weight = attn.out_proj.weight
        if weights is not None:
            if self.options.fold_head_weights:  # W diag(w) x: the weights scale W's columns
                columns = weights.to(out_weight.dtype).repeat_interleave(self.width // self.heads)
                out_weight = out_weight * columns
            else:
                heads_out = heads_out * weights.to(heads_out.dtype).view(1, -1, 1, 1)
        batch, _, tokens, _ = heads_out.shape
        merged = heads_out.transpose(1, 2).reshape(batch, tokens, self.width)
        return F.linear(merged, out_weight, attn.out_proj.bias)

    def block_forward(self, block: nn.Module, x: torch.Tensor, x_vv: Optional[torch.Tensor],
                      weights: Optional[torch.Tensor], class_only: bool = False):
        """One block of both paths. ``x_vv`` None: original path only.

        ``class_only``: only the class token of the original path is wanted
        after this block; the returned ``x`` is then (B, 1, width).
        Returns (x, x_vv) after the block.
        """
        attn = block.attn
        q, k, v = self._qkv(attn, block.ln_1(x), class_only)
        original_weights = weights if self.head_weights_on_original else None
        out_vv = None
        if x_vv is None:
            out = F.scaled_dot_product_attention(q, k, v)
        elif self.options.split_sdpa or class_only:
            out = F.scaled_dot_product_attention(q, k, v)
            out_vv = F.scaled_dot_product_attention(v, v, v)
        else:
            both = F.scaled_dot_product_attention(torch.cat([q, v]), torch.cat([k, v]), torch.cat([v, v]))
            out, out_vv = both.chunk(2)
        if class_only:
            x = x[:, :1]
        x = x + block.ls_1(self._merge(attn, out, original_weights))
        if out_vv is not None:
            x_vv = x_vv + block.ls_1(self._merge(attn, out_vv, weights))
        x = x + block.ls_2(block.mlp(block.ln_2(x)))
        return x, x_vv

    def forward(self, images: torch.Tensor) -> VisionFeatures:
        """images: (B, 3, S, S) normalised; S = image_size."""
        with attention_backends(images.device, self.options.cudnn_attention):
            return self._forward(images)

    def map_tokens(self, images: torch.Tensor) -> list[torch.Tensor]:
        """images: (B, 3, R, R) normalised, R any multiple of the patch size -> per map layer the V-V
        path's patch tokens (B, (R/patch)^2, width), as :meth:`forward` at a model built at side R gives
        them; the blocks after the last map layer are not run."""
        with attention_backends(images.device, self.options.cudnn_attention):
            return self._forward(images, maps_only=True).patch_tokens

    def _forward(self, images: torch.Tensor, maps_only: bool = False) -> VisionFeatures:
        x = self.embed(images, any_size=maps_only)
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
            class_only = self.options.class_token_last and layer == self.depth
            x, x_vv = self.block_forward(block, x, x_vv, weights, class_only)
            if layer in self.map_layers:
                patch_tokens[layer] = x_vv[:, 1:]
            if maps_only and layer == last_map_layer:
                return VisionFeatures(class_token=None, patch_tokens=[patch_tokens[l] for l in self.map_layers])
        return VisionFeatures(class_token=x[:, 0], patch_tokens=[patch_tokens[l] for l in self.map_layers])

    def project(self, tokens: torch.Tensor, layernorm: bool = True) -> torch.Tensor:
        """``ln_post`` (optional) then the visual projection; (..., width) -> (..., embed_dim)."""
        visual = self.visual
        if layernorm:
            tokens = visual.ln_post(tokens)
        if visual.proj is not None:
            tokens = tokens @ visual.proj
        return tokens
