"""DINO (ALGORITHMS.md §6.1) and DINO-vMF (§7): [CLS] self-distillation onto learned prototypes."""

from __future__ import annotations

from typing import Literal

from torch import Tensor

from ..losses.dino import DINOLoss
from ..network import Embeddings
from .base import SelfDistillation

__all__ = ["DINO", "DINOvMF"]

CenteringArg = Literal["logit", "prob", "prob_subtractive", "none"]


class DINO(SelfDistillation):
    """DINO: student and teacher heads end in ``num_prototypes`` weight-normalised prototypes.

    Args:
        num_prototypes: ``K`` (65 536).
        vmf: DINO-vMF — add ``log C_p(||w_k||/τ)`` to every logit (§7.2), unnormalised prototypes and
            probability centering by default.
        norm_last_layer: freeze the prototype norms at 1 (default True, False when ``vmf``).
        centering: ``"logit"`` (DINO), ``"prob"`` (divisive, DINO-vMF default), ``"prob_subtractive"``
            or ``"none"``.
        center_momentum: EMA momentum of the center (0.9).
        vmf_approx: ``log C_p`` evaluation: ``"approx"`` (§7.3), ``"approx1"`` or ``"exact"`` (slow).
        **kwargs: the shared training arguments of :class:`SelfDistillation`.
    """

    def __init__(
        self,
        num_prototypes: int = 65536,
        vmf: bool = False,
        norm_last_layer: bool | None = None,
        centering: CenteringArg | None = None,
        center_momentum: float = 0.9,
        vmf_approx: Literal["approx", "approx1", "exact"] = "approx",
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.vmf, self.vmf_approx = vmf, vmf_approx
        self.add_prototypes(num_prototypes, (not vmf) if norm_last_layer is None else norm_last_layer)
        centering = ("prob" if vmf else "logit") if centering is None else centering
        self.dino_loss = DINOLoss(num_prototypes, self.hparams.student_temp, centering, center_momentum)

    def compute_losses(self, student: Embeddings, teacher: Embeddings, masks: Tensor | None, temp: float) -> dict:
        s_bias, t_bias = self.prototype_biases(temp)
        loss = self.dino_loss(
            self.student.prototypes(student.cls), self.teacher.prototypes(teacher.cls), temp, s_bias, t_bias
        )
        return {"loss": loss}


class DINOvMF(DINO):
    """DINO-vMF: :class:`DINO` with ``vmf=True`` (unnormalised prototypes, probability centering)."""

    def __init__(self, vmf: bool = True, **kwargs):
        super().__init__(vmf=vmf, **kwargs)
