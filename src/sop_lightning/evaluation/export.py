"""Teacher-backbone export as a plain timm state dict (loads with ``strict=True``), from a method checkpoint:
a Lightning checkpoint file, or the folder of a distributed checkpoint (FSDP2: ``ModelParallelStrategy``)."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch

from ..checkpoints import is_distributed_checkpoint, read_checkpoint_file

__all__ = ["teacher_backbone_state_dict", "load_teacher_backbone", "export_checkpoint_backbone", "TEACHER_PREFIX"]

TEACHER_PREFIX = "teacher.backbone.vit."
_TIMM_KEYS = ("img_size", "patch_size", "embed_dim", "depth", "num_heads", "mlp_ratio")


def teacher_backbone_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The timm keys of the teacher ViT inside a method's state dict (Lightning checkpoint)."""
    out = {k[len(TEACHER_PREFIX) :]: v for k, v in state_dict.items() if k.startswith(TEACHER_PREFIX)}
    if not out:
        raise ValueError(f"no '{TEACHER_PREFIX}*' weights found: is this a sop_lightning method checkpoint?")
    return out


def _distributed_teacher(folder: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The teacher ViT's weights and the hyperparameters of a distributed checkpoint folder (Lightning's
    ``ModelParallelStrategy``: ``torch.distributed.checkpoint`` shards of ``{"state_dict": ..., "optimizer_0":
    ...}`` plus ``meta.pt``), read whole in this one process; the student and optimizer shards stay unread."""
    from torch.distributed import checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    reader = dcp.FileSystemReader(folder)
    stored = reader.read_metadata().state_dict_metadata  # flat keys: "state_dict.teacher.backbone.vit.<timm key>"
    prefix = f"state_dict.{TEACHER_PREFIX}"
    teacher = {
        key[len("state_dict.") :]: torch.empty(meta.size, dtype=meta.properties.dtype)
        for key, meta in stored.items()
        if key.startswith(prefix) and isinstance(meta, TensorStorageMetadata)
    }
    if not teacher:
        raise ValueError(f"no '{TEACHER_PREFIX}*' weights in the distributed checkpoint {str(folder)!r}")
    with warnings.catch_warnings():  # one process on purpose: not torch's "assuming the intent is ..." warning
        warnings.filterwarnings("ignore", message=".*assuming the intent is to load in a single process")
        dcp.load({"state_dict": teacher}, storage_reader=reader, no_dist=True)  # full tensors, whatever the sharding
    meta_file = folder / "meta.pt"
    meta = torch.load(meta_file, map_location="cpu", weights_only=True) if meta_file.is_file() else {}
    return teacher_backbone_state_dict(teacher), meta.get("hyper_parameters", {})


def load_teacher_backbone(ckpt_path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The teacher ViT's timm state dict and the method's hyperparameters from ``ckpt_path``: a Lightning
    checkpoint file or a distributed-checkpoint folder (FSDP2). Tensors and plain data only are read."""
    path = Path(ckpt_path)
    if path.is_dir():
        if not is_distributed_checkpoint(path):
            raise ValueError(f"ckpt_path={str(path)!r} is a folder but not a distributed checkpoint (no .metadata)")
        return _distributed_teacher(path)
    if not path.is_file():
        raise ValueError(f"ckpt_path={str(path)!r} is neither a checkpoint file nor a distributed-checkpoint folder")
    ckpt = read_checkpoint_file(path)
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise ValueError(f"ckpt_path={str(path)!r} holds no 'state_dict': is this a sop_lightning method checkpoint?")
    return teacher_backbone_state_dict(ckpt["state_dict"]), ckpt.get("hyper_parameters", {})


def export_checkpoint_backbone(ckpt_path: str | Path, output: str | Path) -> dict[str, Any]:
    """Write the teacher backbone of a method checkpoint (file, or distributed-checkpoint folder) to
    ``output``; returns the ``timm.create_model`` keyword arguments that rebuild the architecture."""
    state, hp = load_teacher_backbone(ckpt_path)
    kwargs: dict[str, Any] = {"model_name": hp.get("backbone", "vit_small_patch16_224"), "num_classes": 0}
    kwargs.update({k: hp[k] for k in _TIMM_KEYS if hp.get(k) is not None})
    Path(output).parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, output)
    return kwargs
