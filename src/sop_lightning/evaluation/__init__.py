"""Evaluation: weighted k-NN (DINO protocol)."""

from .knn import extract_features, knn_classify

__all__ = ["knn_classify", "extract_features"]
