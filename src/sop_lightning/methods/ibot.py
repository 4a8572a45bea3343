"""iBOT (ALGORITHMS.md §6.2): DINO on [CLS] plus masked-patch self-distillation, shared head."""

from __future__ import annotations

from typing import Literal

from torch import Tensor

from ..losses.dino import DINOLoss, IBOTPatchLoss
from ..network import Embeddings
from .base import SelfDistillation

__all__ = ["IBOT"]


class IBOT(SelfDistillation):
    """iBOT: masked global views for the student, one prototype layer for [CLS] and patches.

    Args:
        num_prototypes: ``K`` (8192, shared head).
        norm_last_layer: freeze the prototype norms at 1 (the ViT-S recipe uses False).
        centering: ``"logit"``, ``"prob"`` or ``"none"``; [CLS] and patches keep separate centers.
        center_momentum: 0.9.
        mim_weight: ``λ2`` of the patch loss.
        teacher_patch_temp: final teacher temperature of the patch targets (default ``teacher_temp``);
            it warms up like ``teacher_temp``.
        **kwargs: the shared training arguments of :class:`SelfDistillation`.
    """

    uses_masks = True
    uses_patches = True

    def __init__(
        self,
        num_prototypes: int = 8192,
        norm_last_layer: bool = False,
        centering: Literal["logit", "prob", "none"] = "logit",
        center_momentum: float = 0.9,
        mim_weight: float = 1.0,
        teacher_patch_temp: float | None = None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if mim_weight < 0:
            raise ValueError(f"mim_weight must be >= 0, got {mim_weight}")
        if teacher_patch_temp is not None and teacher_patch_temp <= 0:
            raise ValueError(f"teacher_patch_temp must be > 0, got {teacher_patch_temp}")
        self.add_prototypes(num_prototypes, norm_last_layer)
        student_temp = self.hparams.student_temp
        self.dino_loss = DINOLoss(num_prototypes, student_temp, centering, center_momentum)
        self.patch_loss = IBOTPatchLoss(num_prototypes, student_temp, centering, center_momentum)

    def compute_losses(self, student: Embeddings, teacher: Embeddings, masks: Tensor | None, temp: float) -> dict:
        proto_s, proto_t = self.student.prototypes, self.teacher.prototypes
        cls_loss = self.dino_loss(proto_s(student.cls), proto_t(teacher.cls), temp)
        flat = masks.flatten(1)
        patch_temp = self.teacher_temp_at(self.global_step, self.hparams.teacher_patch_temp)
        patch_loss = self.patch_loss(proto_s(student.patches[flat]), proto_t(teacher.patches), flat, patch_temp)
        loss = cls_loss + self.hparams.mim_weight * patch_loss
        return {"loss": loss, "cls_loss": cls_loss.detach(), "patch_loss": patch_loss.detach()}
