"""Evaluation: weighted k-NN (DINO protocol), linear probe, timm export."""

from .export import export_checkpoint_backbone, teacher_backbone_state_dict
from .knn import extract_features, knn_classify
from .linear import LinearProbe

__all__ = [
    "knn_classify",
    "extract_features",
    "LinearProbe",
    "export_checkpoint_backbone",
    "teacher_backbone_state_dict",
]
