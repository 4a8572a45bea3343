"""Student / teacher network: backbone + projection head (+ prototype layer), run per resolution."""

from __future__ import annotations

import copy
from typing import NamedTuple

import torch
from timm.layers import DropPath
from torch import Tensor, nn

from .backbones import ViTBackbone
from .heads import ProjectionHead, PrototypeLayer

__all__ = ["SSLNetwork", "Embeddings", "make_teacher"]


class Embeddings(NamedTuple):
    """Head outputs of one network call. ``cls``: ``(V·B, d)`` unit rows, view-major, globals first;
    ``patches``: ``(2B, N, d)`` unit rows of the global views, or ``None`` when not asked for."""

    cls: Tensor
    patches: Tensor | None


class SSLNetwork(nn.Module):
    """Backbone → projection head; ``prototypes`` (DINO/iBOT) is applied by the objective.

    ``forward(views, masks, return_patches)``: the first ``num_global`` views (same size) run in one
    backbone call with ``masks`` (bool ``(num_global·B, H', W')``), the other views in one call per
    resolution, unmasked (§2 step 4). The head runs once, on all [CLS] tokens (and the global views'
    patch tokens when ``return_patches``). ``features=True``: the backbone's [CLS] features ``(B, D)`` of
    ``views[0]`` only (k-NN), through ``forward`` so that a sharded network gathers its weights.
    """

    def __init__(self, backbone: ViTBackbone, head: ProjectionHead, prototypes: PrototypeLayer | None = None):
        super().__init__()
        self.backbone, self.head, self.prototypes = backbone, head, prototypes

    def forward(
        self,
        views: list[Tensor],
        masks: Tensor | None = None,
        return_patches: bool = False,
        num_global: int = 2,
        features: bool = False,
    ) -> Embeddings | Tensor:
        if features:
            return self.backbone(views[0]).cls
        groups: list[list[Tensor]] = [views[:num_global]]
        for v in views[num_global:]:
            if len(groups) > 1 and groups[-1][-1].shape[-2:] == v.shape[-2:]:
                groups[-1].append(v)
            else:
                groups.append([v])
        cls_tokens, patches = [], None
        for i, group in enumerate(groups):
            out = self.backbone(_cat(group), masks if i == 0 else None)
            cls_tokens.append(out.cls)
            if i == 0 and return_patches:
                patches = out.patches
        cls = _cat(cls_tokens)
        if patches is None:
            return Embeddings(self.head(cls), None)
        # One head call on [CLS] and patch tokens together.
        n = cls.shape[0]
        joint = self.head(_cat([cls, patches.flatten(0, 1)]))
        return Embeddings(joint[:n], joint[n:].view(*patches.shape[:2], -1))


def _cat(tensors: list[Tensor]) -> Tensor:
    return tensors[0] if len(tensors) == 1 else torch.cat(tensors)


def make_teacher(student: SSLNetwork) -> SSLNetwork:
    """Teacher = copy of the student without mask token, drop-path 0 and no gradients (§2)."""
    teacher = copy.deepcopy(student)
    teacher.backbone.mask_token = None
    for m in teacher.modules():
        if isinstance(m, DropPath):
            m.drop_prob = 0.0
    teacher.requires_grad_(False)
    return teacher
