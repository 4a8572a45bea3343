"""Teacher-backbone export as a plain timm state dict (loads with ``strict=True``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

__all__ = ["teacher_backbone_state_dict", "export_checkpoint_backbone", "TEACHER_PREFIX"]

TEACHER_PREFIX = "teacher.backbone.vit."
_TIMM_KEYS = ("img_size", "patch_size", "embed_dim", "depth", "num_heads", "mlp_ratio")


def teacher_backbone_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The timm keys of the teacher ViT inside a method's state dict (Lightning checkpoint)."""
    out = {k[len(TEACHER_PREFIX) :]: v for k, v in state_dict.items() if k.startswith(TEACHER_PREFIX)}
    if not out:
        raise ValueError(f"no '{TEACHER_PREFIX}*' weights found: is this a sop_lightning method checkpoint?")
    return out


def export_checkpoint_backbone(ckpt_path: str | Path, output: str | Path) -> dict[str, Any]:
    """Write the teacher backbone of a method checkpoint to ``output``; returns the
    ``timm.create_model`` keyword arguments that rebuild the architecture."""
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)  # tensors and plain data only
    state = teacher_backbone_state_dict(ckpt["state_dict"])
    hp = ckpt.get("hyper_parameters", {})
    kwargs: dict[str, Any] = {"model_name": hp.get("backbone", "vit_small_patch16_224"), "num_classes": 0}
    kwargs.update({k: hp[k] for k in _TIMM_KEYS if hp.get(k) is not None})
    Path(output).parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, output)
    return kwargs
