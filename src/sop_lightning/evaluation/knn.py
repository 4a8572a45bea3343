"""Weighted k-NN classification, DINO protocol (ALGORITHMS.md §11.1)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["knn_classify", "knn_search", "extract_features", "faiss_available"]


def faiss_available() -> bool:
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True


def _topk_torch(train: Tensor, test: Tensor, k: int, max_elements: int) -> tuple[Tensor, Tensor]:
    """Exact top-k inner products, test rows in chunks so a chunk × train block stays bounded."""
    chunk = max(1, max_elements // max(1, train.shape[0]))
    sims, idx = [], []
    for start in range(0, test.shape[0], chunk):
        s, i = (test[start : start + chunk] @ train.T).topk(k, dim=1)
        sims.append(s)
        idx.append(i)
    return torch.cat(sims), torch.cat(idx)


def faiss_gpu_available() -> bool:
    try:
        import faiss
    except ImportError:
        return False
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def _topk_faiss(train: Tensor, test: Tensor, k: int) -> tuple[Tensor, Tensor]:
    import faiss

    if test.device.type == "cuda" and faiss_gpu_available():  # faiss-gpu: exact inner-product index on the GPU
        config = faiss.GpuIndexFlatConfig()
        config.device = test.device.index or 0
        index = faiss.GpuIndexFlatIP(faiss.StandardGpuResources(), train.shape[1], config)
    else:
        index = faiss.IndexFlatIP(train.shape[1])
    index.add(train.detach().cpu().float().contiguous().numpy())
    sims, idx = index.search(test.detach().cpu().float().contiguous().numpy(), k)
    return torch.from_numpy(sims).to(test.device), torch.from_numpy(idx).to(test.device)


def _check_features(train_features: Tensor, test_features: Tensor, k: int, backend: str) -> None:
    if train_features.ndim != 2 or test_features.ndim != 2 or train_features.shape[1] != test_features.shape[1]:
        raise ValueError(
            f"train_features {tuple(train_features.shape)} and test_features {tuple(test_features.shape)} "
            "must be (N, D) with the same D"
        )
    if train_features.shape[0] == 0:
        raise ValueError("train_features is empty")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if backend not in ("auto", "torch", "faiss"):
        raise ValueError(f"backend must be 'auto', 'torch' or 'faiss', got {backend!r}")


@torch.no_grad()
def knn_search(
    train_features: Tensor,
    test_features: Tensor,
    k: int = 20,
    backend: Literal["auto", "torch", "faiss"] = "auto",
    max_elements: int = 2**26,
) -> tuple[Tensor, Tensor]:
    """Exact cosine search: for each test row its ``k`` most similar training rows, as ``(cosines (Nte, k),
    indices (Nte, k))`` by descending cosine (features are L2-normalised; ``k`` capped at ``Ntr``).

    Backends: ``"torch"`` (chunked matmul + top-k, blocks of at most ``max_elements``), ``"faiss"``
    (IndexFlatIP; GpuIndexFlatIP for CUDA features when faiss-gpu is installed) or ``"auto"`` (faiss where
    it applies, else torch). The search of :func:`knn_classify` and of the retrieval pictures.
    """
    _check_features(train_features, test_features, k, backend)
    train = F.normalize(train_features.float(), dim=1)
    test = F.normalize(test_features.float(), dim=1)
    k = min(k, train.shape[0])
    # auto: faiss on CPU features, faiss-gpu on CUDA features when installed, else the chunked torch search
    on_cpu = test.device.type == "cpu"
    use_faiss = backend == "faiss" or (
        backend == "auto" and faiss_available() and (on_cpu or (test.device.type == "cuda" and faiss_gpu_available()))
    )
    if use_faiss:
        return _topk_faiss(train, test, k)
    return _topk_torch(train, test, k, max_elements)


@torch.no_grad()
def knn_classify(
    train_features: Tensor,
    train_labels: Tensor,
    test_features: Tensor,
    k: int = 20,
    temperature: float = 0.07,
    num_classes: int | None = None,
    backend: Literal["auto", "torch", "faiss"] = "auto",
    max_elements: int = 2**26,
) -> Tensor:
    """Class scores ``(Nte, C)`` of the DINO weighted vote.

    Features are L2-normalised; each test row votes with its ``k`` most similar training rows
    (:func:`knn_search`), weight ``exp(s_i / T)`` for class ``y_i``. Prediction = ``argmax``; top-5 from the
    same scores.

    Args:
        train_features: ``(Ntr, D)``; train_labels: ``(Ntr,)`` in ``[0, C)``; test_features: ``(Nte, D)``.
        k: neighbours (capped at ``Ntr``); temperature: ``T``; num_classes: ``C`` (default ``max label + 1``).
        backend, max_elements: as :func:`knn_search`.
    """
    _check_features(train_features, test_features, k, backend)
    if train_labels.shape != (train_features.shape[0],):
        raise ValueError(f"train_labels of shape {tuple(train_labels.shape)} must be ({train_features.shape[0]},)")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if (train_labels < 0).any():
        raise ValueError("train_labels must be >= 0 (unlabelled rows cannot vote)")
    num_classes = int(train_labels.max()) + 1 if num_classes is None else num_classes
    sims, idx = knn_search(train_features, test_features, k, backend, max_elements)
    weights = (sims / temperature).exp()
    labels = train_labels.to(idx.device)[idx]
    scores = torch.zeros(test_features.shape[0], num_classes, device=sims.device, dtype=weights.dtype)
    return scores.scatter_add_(1, labels, weights)


@torch.no_grad()
def extract_features(
    embed: Callable[[Tensor], Tensor], loader: Iterable, device: torch.device | str = "cpu"
) -> tuple[Tensor, Tensor]:
    """Run ``embed`` over ``(images, labels[, indices])`` batches; returns ``(features (N, D), labels (N,))``
    on CPU."""
    feats, labels = [], []
    for images, y, *_ in loader:
        feats.append(embed(images.to(device)).float().cpu())
        labels.append(y)
    return torch.cat(feats), torch.cat(labels)
