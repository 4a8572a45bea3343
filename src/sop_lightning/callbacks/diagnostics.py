"""Collapse diagnostics logged per epoch: teacher entropy, effective prototypes / SOPs used, κ
statistics of vMF prototypes, memory-bank age (what a researcher watches to catch collapse)."""

from __future__ import annotations

import math
from typing import Any

import lightning as L
from torch import Tensor

from ..losses.common import cross_entropy
from ..memory import MemoryBank
from ..sharding import full_tensor

__all__ = ["Diagnostics"]


class Diagnostics(L.Callback):
    """Per training epoch, for every objective exposing ``stats`` (DINO/iBOT/SOP losses) logs
    ``diag/<objective>/teacher_entropy`` (mean entropy of the teacher targets),
    ``diag/<objective>/effective_prototypes`` (``exp`` of the entropy of the mean teacher distribution
    over the epoch; for SOP, whose anchors change every step, the per-step value averaged) and
    ``diag/<objective>/argmax_fraction`` (share of prototypes / SOPs that are some target's argmax).
    With prototypes: ``diag/kappa_{min,mean,max}`` (``κ_k = ||w_k||/τ_s`` of the student) and a
    TensorBoard histogram. With memory banks: ``diag/<bank>/age_mean`` (steps since written) and
    ``diag/<bank>/initial_fraction`` (rows still from the random initialisation).
    """

    def __init__(self, histogram: bool = True):
        self.histogram = histogram
        self._sums: dict[str, dict[str, Any]] = {}
        self._modules: list[tuple[str, Any]] = []

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._sums = {}
        self._modules = list(pl_module.named_modules())  # listed once, not walked every step

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        for name, module in self._modules:
            stats = getattr(module, "stats", None)
            if not isinstance(stats, dict) or not stats:
                continue
            # accumulate on the device: no host synchronisation per step
            acc = self._sums.setdefault(name, {"n": 0, "entropy": 0.0, "argmax": 0.0, "eff": 0.0, "probs": None})
            p = stats["mean_probs"].detach()
            acc["n"] += 1
            acc["entropy"] = acc["entropy"] + stats["entropy"].detach()
            acc["argmax"] = acc["argmax"] + stats["argmax_fraction"].detach()
            acc["eff"] = acc["eff"] + _entropy(p).exp()
            acc["probs"] = p.clone() if acc["probs"] is None or acc["probs"].shape != p.shape else acc["probs"] + p
            module.stats = {}

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        metrics: dict[str, float] = {}
        anchors_change = hasattr(pl_module, "sop_loss")
        for name, acc in self._sums.items():
            if acc["n"] == 0:
                continue
            n = acc["n"]
            metrics[f"diag/{name}/teacher_entropy"] = float(acc["entropy"]) / n
            metrics[f"diag/{name}/argmax_fraction"] = float(acc["argmax"]) / n
            eff = float(acc["eff"]) / n if anchors_change else _effective(acc["probs"] / n)
            metrics[f"diag/{name}/effective_prototypes"] = eff
        prototypes = getattr(getattr(pl_module, "student", None), "prototypes", None)
        if prototypes is not None:
            kappa = full_tensor(prototypes.norms.detach()).float() / pl_module.hparams.student_temp
            metrics.update({"diag/kappa_min": float(kappa.min()), "diag/kappa_mean": float(kappa.mean()),
                            "diag/kappa_max": float(kappa.max())})  # fmt: skip
            self._histogram(trainer, "diag/kappa", kappa)
        for name, module in pl_module.named_modules():
            if isinstance(module, MemoryBank):
                age = module.age().float()
                metrics[f"diag/{name}/age_mean"] = float(age.mean())
                metrics[f"diag/{name}/initial_fraction"] = float((module.written_at < 0).float().mean())
        self.last_metrics = metrics
        if metrics:
            pl_module.log_dict(metrics, sync_dist=True)  # ranks average their own batches (once per epoch)
        self._sums = {}

    def _histogram(self, trainer: L.Trainer, tag: str, values: Tensor) -> None:
        if not self.histogram:
            return
        for logger in trainer.loggers:
            experiment = getattr(logger, "experiment", None)
            if hasattr(experiment, "add_histogram"):
                experiment.add_histogram(tag, values.cpu(), global_step=trainer.global_step)


def _entropy(p: Tensor) -> Tensor:
    """``H(p)`` (nats) of a distribution ``(K,)``, renormalised; a 0-d tensor on ``p``'s device."""
    p = p.float().clamp(min=0)
    p = p / p.sum().clamp(min=1e-30)
    return cross_entropy(p, p.clamp(min=1e-30).log())


def _effective(p: Tensor) -> float:
    """``exp(H(p))`` of a distribution ``(K,)``."""
    return float(math.exp(float(_entropy(p))))
