"""Pictures of what a model learned: k-NN retrievals and the images that make up a SOP.

The functions return data-set indices (testable, usable without a plotting library);
:func:`image_grid` draws rows of images with matplotlib (the ``bench`` / ``dev`` extra), and
:func:`show_retrievals` / :func:`show_sops` combine both for a data module and a trained method.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from ..losses.sop import sop_rows
from .knn import extract_features, knn_search

if TYPE_CHECKING:  # pragma: no cover
    from matplotlib.figure import Figure

__all__ = ["embed_dataset", "nearest_images", "sop_members", "image_grid", "show_retrievals", "show_sops"]


@torch.no_grad()
def embed_dataset(
    model: Any, dataset: Dataset, batch_size: int = 256, network: Literal["teacher", "student"] = "teacher"
) -> Tensor:
    """``model.embed`` features ``(N, D)`` of a data set of ``(image tensor, label)`` items, in order."""
    from ..data.datamodule import collate_labelled

    was_training = model.training
    model.eval()
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate_labelled)
    device = next(model.parameters()).device
    features, _ = extract_features(lambda x: model.embed(x, network=network), loader, device)
    model.train(was_training)
    return features


def nearest_images(query_features: Tensor, gallery_features: Tensor, k: int = 8) -> tuple[Tensor, Tensor]:
    """For each query its ``k`` most similar gallery items: ``(indices (n, k), cosines (n, k))``, most similar
    first (:func:`~sop_lightning.evaluation.knn.knn_search`)."""
    sims, idx = knn_search(gallery_features, query_features, k)
    return idx, sims


@torch.no_grad()
def sop_members(
    model: Any,
    num_sops: int = 4,
    num_neighbors: int | None = None,
    objective: Literal["cls", "patch"] = "cls",
    seed: int = 0,
) -> Tensor:
    """Data-set indices ``(num_sops, k+1)`` of the images that make up ``num_sops`` SOPs of a trained
    :class:`~sop_lightning.SOP`: column 0 the anchor's image, then its ``k`` nearest bank rows' images
    (§3.2; -1 where a row is still a random initial one). Anchors are drawn (seeded) among the rows of
    known images. Needs ``SOP(track_indices=True)``; ``num_neighbors`` defaults to the objective's ``k``
    (at least 4, so the patch SOPs, ``k = 0`` in the paper, still show a neighbourhood)."""
    loss = {"cls": "sop_loss", "patch": "sop_mim_loss"}.get(objective)
    if loss is None:
        raise ValueError(f"objective must be 'cls' or 'patch', got {objective!r}")
    bank = getattr(getattr(model, loss, None), "memory", None)
    if bank is None:
        raise ValueError(f"model {type(model).__name__} has no {loss}.memory: sop_members needs a SOP method")
    if not bank.track_indices:
        raise ValueError("the memory bank does not keep data-set indices: train with SOP(track_indices=True)")
    known = (bank.indices >= 0).nonzero().squeeze(1)
    if known.numel() < num_sops:
        raise ValueError(f"num_sops={num_sops} exceeds the {known.numel()} bank rows of known images")
    k = max(getattr(model, loss).num_neighbors, 4) if num_neighbors is None else num_neighbors
    g = torch.Generator().manual_seed(seed)
    anchors = known[torch.randperm(known.numel(), generator=g)[:num_sops].to(known.device)]
    return bank.indices[sop_rows(bank.embeddings, anchors, k)]


def _to_display(image: Any, mean: Sequence[float] | None, std: Sequence[float] | None) -> Any:
    if isinstance(image, Tensor):
        x = image.detach().float().cpu()
        if mean is not None and std is not None and x.ndim == 3:
            x = x * torch.tensor(std).view(-1, 1, 1) + torch.tensor(mean).view(-1, 1, 1)
        elif x.max() > 1.0:
            x = x / 255.0
        x = x.clamp(0, 1)
        return x.permute(1, 2, 0).numpy() if x.ndim == 3 else x.numpy()
    return image  # PIL image or array


def image_grid(
    rows: Sequence[Sequence[Any | None]],
    row_titles: Sequence[str] | None = None,
    col_titles: Sequence[str] | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    path: str | Path | None = None,
    cell: float = 1.1,
) -> Figure:
    """Rows of images (tensors ``(3|1, H, W)`` normalised with ``mean``/``std`` or in [0, 1], PIL images,
    or ``None`` for an empty cell) as a matplotlib figure; saved to ``path`` (PNG) when given."""
    try:
        import matplotlib

        if path is not None:
            matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt
    except ImportError as err:  # pragma: no cover
        raise ImportError("image_grid needs matplotlib: pip install 'sop_lightning[bench]'") from err
    n_rows, n_cols = len(rows), max(len(r) for r in rows)
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(cell * n_cols, cell * n_rows), squeeze=False)
    for i, row in enumerate(rows):
        for j in range(n_cols):
            ax = axes[i][j]
            ax.set_xticks([])
            ax.set_yticks([])
            image = row[j] if j < len(row) else None
            if image is None:
                ax.axis("off")
                continue
            shown = _to_display(image, mean, std)
            ax.imshow(shown, cmap="gray" if getattr(shown, "ndim", 3) == 2 else None)
            if i == 0 and col_titles is not None and j < len(col_titles):
                ax.set_title(col_titles[j], fontsize=7)
        if row_titles is not None:
            axes[i][0].set_ylabel(row_titles[i], fontsize=7)
    fig.tight_layout()
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=120)
    return fig


def show_retrievals(
    model: Any, datamodule: Any, num_queries: int = 6, k: int = 8, seed: int = 0, path: str | Path | None = None
) -> Figure:
    """Test images (rows, first column) with their ``k`` nearest training images under ``model.embed``,
    from the data module's labelled k-NN splits; row titles give the query's label and how many of the
    ``k`` neighbours share it."""
    gallery, queries = datamodule.knn_datasets()
    g = torch.Generator().manual_seed(seed)
    picked = torch.randperm(len(queries), generator=g)[:num_queries].tolist()
    query_set = torch.utils.data.Subset(queries, picked)
    idx, _ = nearest_images(embed_dataset(model, query_set), embed_dataset(model, gallery), k)
    rows, titles = [], []
    for q, neighbours in zip(picked, idx.tolist()):
        image, label = queries[q]
        rows.append([image, *[gallery[j][0] for j in neighbours]])
        hits = sum(int(gallery[j][1] == label) for j in neighbours)
        titles.append(f"label {label}: {hits}/{k}")
    cols = ["query", *[f"nn {j}" for j in range(1, k + 1)]]
    mean, std = _normalisation(datamodule)
    return image_grid(rows, titles, cols, mean, std, path)


def show_sops(
    model: Any,
    datamodule: Any,
    num_sops: int = 4,
    num_neighbors: int | None = None,
    objective: Literal["cls", "patch"] = "cls",
    seed: int = 0,
    path: str | Path | None = None,
) -> Figure:
    """Each row one SOP: its anchor's image, then the images of its support embeddings (nearest bank rows),
    from the data module's training set under the eval transform (:func:`sop_members`)."""
    from ..data.datamodule import resolve_dataset
    from ..data.datasets import TransformedDataset

    members = sop_members(model, num_sops, num_neighbors, objective, seed)
    train = TransformedDataset(resolve_dataset(datamodule.dataset, datamodule.root), datamodule.eval_transform)
    rows = [[None if i < 0 else train[i][0] for i in row] for row in members.tolist()]
    cols = ["anchor", *[f"support {j}" for j in range(1, members.shape[1])]]
    mean, std = _normalisation(datamodule)
    return image_grid(rows, [f"SOP {r}" for r in range(len(rows))], cols, mean, std, path)


def _normalisation(datamodule: Any) -> tuple[Sequence[float] | None, Sequence[float] | None]:
    hp = getattr(datamodule, "hparams", {})
    return hp.get("mean"), hp.get("std")
