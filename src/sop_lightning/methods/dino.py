"""DINO (ALGORITHMS.md §6.1): [CLS] self-distillation onto learned prototypes with centering."""

from __future__ import annotations

from typing import Literal

from torch import Tensor

from ..losses.dino import DINOLoss
from ..network import Embeddings
from .base import SelfDistillation

__all__ = ["DINO"]


class DINO(SelfDistillation):
    """DINO: student and teacher heads end in ``num_prototypes`` weight-normalised prototypes.

    Args:
        num_prototypes: ``K`` (65 536).
        norm_last_layer: freeze the prototype norms at 1.
        centering: ``"logit"`` (DINO), ``"prob"`` or ``"none"``.
        center_momentum: EMA momentum of the center (0.9).
        **kwargs: the shared training arguments of :class:`SelfDistillation`.
    """

    def __init__(
        self,
        num_prototypes: int = 65536,
        norm_last_layer: bool = True,
        centering: Literal["logit", "prob", "none"] = "logit",
        center_momentum: float = 0.9,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.add_prototypes(num_prototypes, norm_last_layer)
        self.dino_loss = DINOLoss(num_prototypes, self.hparams.student_temp, centering, center_momentum)

    def compute_losses(self, student: Embeddings, teacher: Embeddings, masks: Tensor | None, temp: float) -> dict:
        loss = self.dino_loss(self.student.prototypes(student.cls), self.teacher.prototypes(teacher.cls), temp)
        return {"loss": loss}
