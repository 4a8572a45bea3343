"""``KNNEvaluation``: weighted k-NN of fresh teacher features at validation (ALGORITHMS.md §11.1)."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from torch import Tensor
from torchmetrics.functional.classification import multiclass_accuracy

from ..distributed import all_gather_varsize
from ..evaluation.knn import knn_classify

__all__ = ["KNNEvaluation"]


class KNNEvaluation(L.Callback):
    """At validation, the method's ``validation_step`` embeds the labelled k-NN splits (dataloader 0 =
    train, 1 = val, items ``(image, label, index)``) with the teacher; this callback collects the
    features, gathers them from every rank (uneven shards allowed, the distributed sampler's padding
    removed through the sample indices), runs the weighted vote for each ``k`` and logs
    ``val/knn_top1`` and ``val/knn_top5`` (first ``k``) and ``val/knn_top{1,5}_k{k}`` for every ``k``: the
    teacher's, as the papers report. With ``student=True`` the student's [CLS] features get the same
    evaluation, logged as ``val/knn_student_top1`` etc.

    It runs at every validation, so ``Trainer(check_val_every_n_epoch=n)`` sets how often; the datamodule's
    ``knn_train_subset`` / ``knn_val_subset`` bound its cost for quick monitoring.

    Args:
        k: neighbour counts (20 and 200, DINO protocol).
        temperature: vote temperature ``T`` (0.07).
        backend: ``knn_classify`` backend.
        student: also evaluate the student backbone (one more forward pass over the k-NN splits).
    """

    def __init__(
        self,
        k: list[int] | tuple[int, ...] = (20, 200),
        temperature: float = 0.07,
        backend: str = "auto",
        student: bool = True,
    ):
        if not k or min(k) < 1:
            raise ValueError(f"k must be a non-empty list of positive integers, got {k!r}")
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.k, self.temperature, self.backend, self.student = list(k), temperature, backend, student
        # (network, dataloader index) -> [(features, labels, indices), ...]
        self._store: dict[tuple[str, int], list[tuple[Tensor, Tensor, Tensor]]] = {}
        self.last_metrics: dict[str, float] = {}

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._store = {}

    def on_validation_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:  # fmt: skip
        if trainer.sanity_checking or not isinstance(outputs, dict) or "features" not in outputs:
            return
        labels, indices = outputs["labels"].detach(), outputs["indices"].detach()
        self._store.setdefault(("teacher", dataloader_idx), []).append(
            (outputs["features"].detach().float(), labels, indices)
        )
        if self.student and hasattr(pl_module, "embed"):
            student = pl_module.embed(batch[0], network="student")
            self._store.setdefault(("student", dataloader_idx), []).append((student, labels, indices))

    @staticmethod
    def _collect(parts: list[tuple[Tensor, Tensor, Tensor]], device: torch.device, dim: int) -> tuple[Tensor, Tensor]:
        # a rank without batches still joins the collectives, with empty tensors on the right device
        feats = torch.cat([p[0] for p in parts]) if parts else torch.zeros(0, dim, device=device)
        labels = torch.cat([p[1] for p in parts]) if parts else torch.zeros(0, dtype=torch.long, device=device)
        index = torch.cat([p[2] for p in parts]) if parts else torch.zeros(0, dtype=torch.long, device=device)
        feats, labels, index = all_gather_varsize(feats), all_gather_varsize(labels), all_gather_varsize(index)
        # the distributed sampler pads shards by repeating samples: keep one copy per index, in index order
        order = torch.argsort(index, stable=True)
        index, feats, labels = index[order], feats[order], labels[order]
        keep = torch.ones_like(index, dtype=torch.bool)
        keep[1:] = index[1:] != index[:-1]
        return feats[keep], labels[keep]

    def _metrics(self, train_x: Tensor, train_y: Tensor, test_x: Tensor, test_y: Tensor, prefix: str) -> dict:
        num_classes = int(max(train_y.max(), test_y.max())) + 1
        metrics: dict[str, float] = {}
        for i, k in enumerate(self.k):
            scores = knn_classify(train_x, train_y, test_x, k, self.temperature, num_classes, self.backend)
            test = test_y.to(scores.device)
            top1 = multiclass_accuracy(scores, test, num_classes, top_k=1, average="micro").item() * 100
            top5 = multiclass_accuracy(scores, test, num_classes, top_k=min(5, num_classes), average="micro").item()
            metrics[f"{prefix}_top1_k{k}"], metrics[f"{prefix}_top5_k{k}"] = top1, top5 * 100
            if i == 0:
                metrics[f"{prefix}_top1"], metrics[f"{prefix}_top5"] = top1, top5 * 100
        return metrics

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        store, self._store = self._store, {}
        if trainer.sanity_checking or not store:
            return
        dim = next(iter(store.values()))[0][0].shape[1]
        metrics: dict[str, float] = {}
        # every rank joins the same collectives in the same order: the networks present anywhere are the
        # configured ones (the teacher always, the student when ``student``)
        for network, prefix in (("teacher", "val/knn"), ("student", "val/knn_student")):
            if network == "student" and not self.student:
                continue
            train_x, train_y = self._collect(store.get((network, 0), []), pl_module.device, dim)
            test_x, test_y = self._collect(store.get((network, 1), []), pl_module.device, dim)
            if len(train_y) and len(test_y):
                metrics.update(self._metrics(train_x, train_y, test_x, test_y, prefix))
        self.last_metrics = metrics
        # every rank computed the same values from the gathered features; sync_dist averages those equal values
        # (a few scalars once a validation), which keeps Lightning from warning, per metric and validation, that
        # epoch-level values of a distributed run want sync_dist=True
        for name, value in metrics.items():
            pl_module.log(name, value, prog_bar=name == "val/knn_top1", sync_dist=True)
