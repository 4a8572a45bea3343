"""timm Vision Transformer wrapper: [CLS] + patch tokens, mask token, any image size (ALGORITHMS.md §8)."""

from __future__ import annotations

from typing import NamedTuple

import timm
import torch
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn

__all__ = ["ViTBackbone", "BackboneOutput"]


class BackboneOutput(NamedTuple):
    """``cls``: ``(B, D)``; ``patches``: ``(B, N, D)``, both after the final LayerNorm."""

    cls: Tensor
    patches: Tensor


class ViTBackbone(nn.Module):
    """A timm ViT that returns [CLS] and patch tokens and can mask patch embeddings (§8.2–8.3).

    Args:
        name: any timm ViT name (``vit_small_patch16_224``, ``vit_tiny_patch16_224``, ...).
        img_size, patch_size, embed_dim, depth, num_heads, mlp_ratio: overrides of the timm config, e.g. for
            28–32 px images (``mlp_ratio``: MLP width over ``embed_dim``, timm's 4); ``None`` keeps timm's value.
        drop_path_rate: stochastic depth of the student (0 for the teacher).
        mask_token: add a learnable ``(1, D)`` mask token (student only, init zeros).

    ``forward(x, mask)``: ``x`` of shape ``(B, 3, H, W)`` with ``H, W`` multiples of the patch size (any
    such size: position embeddings are resampled, timm ``dynamic_img_size``); ``mask`` a bool
    ``(B, H/p, W/p)`` (True = masked) whose patch embeddings are replaced by the mask token *before* the
    position embedding is added. With ``mask=None`` the output equals timm's ``forward_features``.
    """

    def __init__(
        self,
        name: str = "vit_small_patch16_224",
        img_size: int | None = None,
        patch_size: int | None = None,
        embed_dim: int | None = None,
        depth: int | None = None,
        num_heads: int | None = None,
        drop_path_rate: float = 0.0,
        mask_token: bool = True,
        mlp_ratio: float | None = None,
    ):
        super().__init__()
        if not timm.is_model(name):
            close = timm.list_models(f"*{name.split('_')[0]}*")[:8] if name else []
            raise ValueError(
                f"backbone={name!r} is not a timm model name; try e.g. 'vit_small_patch16_224'"
                + (f" (similar: {', '.join(close)})" if close else "")
            )
        overrides = {
            k: v
            for k, v in dict(
                img_size=img_size,
                patch_size=patch_size,
                embed_dim=embed_dim,
                depth=depth,
                num_heads=num_heads,
            ).items()
            if v is not None
        }
        for key, value in overrides.items():
            if value < 1:
                raise ValueError(f"{key} must be a positive integer, got {value}")
        if mlp_ratio is not None:
            if not mlp_ratio > 0:
                raise ValueError(f"mlp_ratio must be > 0, got {mlp_ratio}")
            overrides["mlp_ratio"] = mlp_ratio
        if img_size is not None and patch_size is not None and img_size % patch_size:
            raise ValueError(f"img_size={img_size} must be divisible by patch_size={patch_size}")
        self.model_name = name
        self.model_kwargs = overrides
        try:
            vit = timm.create_model(
                name, pretrained=False, num_classes=0, dynamic_img_size=True, drop_path_rate=drop_path_rate, **overrides
            )
        except TypeError as err:  # a non-ViT architecture rejects the ViT keyword arguments
            raise ValueError(f"backbone={name!r} is not a timm VisionTransformer ({err})") from err
        if not isinstance(vit, VisionTransformer):
            raise ValueError(f"backbone={name!r} is a {type(vit).__name__}, not a timm VisionTransformer")
        grid, patch = vit.patch_embed.grid_size, vit.patch_embed.patch_size
        img = vit.patch_embed.img_size
        if img[0] % patch[0] or img[1] % patch[1]:
            raise ValueError(f"img_size={tuple(img)} must be divisible by patch_size={tuple(patch)}")
        self.vit = vit
        self.embed_dim: int = vit.embed_dim
        self.patch_size: tuple[int, int] = tuple(patch)
        self.grid_size: tuple[int, int] = tuple(grid)
        self.mask_token = nn.Parameter(torch.zeros(1, vit.embed_dim)) if mask_token else None

    @property
    def num_prefix_tokens(self) -> int:
        return self.vit.num_prefix_tokens

    def timm_kwargs(self) -> dict:
        """Keyword arguments that make ``timm.create_model`` build this architecture (for export)."""
        return {"model_name": self.model_name, "num_classes": 0, **self.model_kwargs}

    def tokens(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        """All tokens after the final norm, ``(B, prefix + N, D)``."""
        ph, pw = self.patch_size
        if x.ndim != 4 or x.shape[-2] % ph or x.shape[-1] % pw:
            raise ValueError(f"input of shape {tuple(x.shape)} must be (B, C, H, W) with H, W multiples of {ph}x{pw}")
        vit = self.vit
        t = vit.patch_embed(x)  # (B, H', W', D) with dynamic_img_size
        if mask is not None:
            if self.mask_token is None:
                raise ValueError("mask given but this backbone has no mask token (mask_token=False)")
            if mask.shape != t.shape[:3]:
                raise ValueError(
                    f"mask of shape {tuple(mask.shape)} does not match the patch grid {tuple(t.shape[:3])} of the "
                    f"input: the data module's global_size / patch_size must give the model's grid (patch_size="
                    f"{self.patch_size[0]}); the CLI links them, in Python pass the same patch_size to both"
                )
            t = torch.where(mask.unsqueeze(-1), self.mask_token.to(t.dtype), t)
        t = vit._pos_embed(t)
        t = vit.patch_drop(t)
        t = vit.norm_pre(t)
        t = vit.blocks(t)
        return vit.norm(t)

    def last_blocks(self, x: Tensor, n: int = 1) -> list[Tensor]:
        """Tokens ``(B, prefix + N, D)`` after each of the last ``n`` blocks, each through the final norm
        (linear-probe features, §11.2)."""
        depth = len(self.vit.blocks)
        if not 1 <= n <= depth:
            raise ValueError(f"n must be in [1, depth={depth}], got {n}")
        vit = self.vit
        t = vit.norm_pre(vit.patch_drop(vit._pos_embed(vit.patch_embed(x))))
        outs = []
        for i, block in enumerate(vit.blocks):
            t = block(t)
            if i >= depth - n:
                outs.append(vit.norm(t))
        return outs

    def forward(self, x: Tensor, mask: Tensor | None = None) -> BackboneOutput:
        t = self.tokens(x, mask)
        return BackboneOutput(t[:, 0], t[:, self.num_prefix_tokens :])
