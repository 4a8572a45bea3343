"""Evaluation: weighted k-NN (DINO protocol), linear probe, timm export."""

from .export import export_checkpoint_backbone, load_teacher_backbone, teacher_backbone_state_dict
from .knn import extract_features, knn_classify, knn_search
from .linear import LinearProbe
from .visualize import embed_dataset, image_grid, nearest_images, show_retrievals, show_sops, sop_members

__all__ = [
    "knn_classify",
    "knn_search",
    "extract_features",
    "embed_dataset",
    "nearest_images",
    "sop_members",
    "image_grid",
    "show_retrievals",
    "show_sops",
    "LinearProbe",
    "export_checkpoint_backbone",
    "load_teacher_backbone",
    "teacher_backbone_state_dict",
]
