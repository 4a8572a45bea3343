"""iBOT (ALGORITHMS.md §6.2) and iBOT-vMF (§7): DINO on [CLS] plus masked-patch self-distillation."""

from __future__ import annotations

from typing import Literal

from torch import Tensor

from ..losses.common import masked_token_index, select_tokens
from ..losses.dino import DINOLoss, IBOTPatchLoss
from ..network import Embeddings
from .base import SelfDistillation
from .dino import CenteringArg

__all__ = ["IBOT", "IBOTvMF"]


class IBOT(SelfDistillation):
    """iBOT: masked global views for the student, one prototype layer for [CLS] and patches.

    Args:
        num_prototypes: ``K`` (8192, shared head).
        vmf: iBOT-vMF — the vMF correction on [CLS] and patch logits (§7.2), unnormalised prototypes,
            probability centering by default.
        norm_last_layer: freeze the prototype norms at 1 (default False, the ViT-S recipe).
        centering: ``"logit"``, ``"prob"``, ``"prob_subtractive"`` or ``"none"`` (default ``"logit"``,
            ``"prob"`` when ``vmf``); [CLS] and patches keep separate centers.
        center_momentum: 0.9.
        mim_weight: ``λ2`` of the patch loss.
        teacher_patch_temp: final teacher temperature of the patch targets (default ``teacher_temp``);
            it warms up like ``teacher_temp``, from ``pred_start_epoch`` on (§6.2).
        vmf_approx: ``log C_p`` evaluation: ``"approx"`` (§7.3), ``"approx1"`` or ``"exact"`` (slow).
        **kwargs: the shared training arguments of :class:`SelfDistillation`.
    """

    uses_masks = True
    uses_patches = True

    def __init__(
        self,
        num_prototypes: int = 8192,
        vmf: bool = False,
        norm_last_layer: bool = False,
        centering: CenteringArg | None = None,
        center_momentum: float = 0.9,
        mim_weight: float = 1.0,
        teacher_patch_temp: float | None = None,
        vmf_approx: Literal["approx", "approx1", "exact"] = "approx",
        **kwargs,
    ):
        super().__init__(**kwargs)
        if mim_weight < 0:
            raise ValueError(f"mim_weight must be >= 0, got {mim_weight}")
        if teacher_patch_temp is not None and teacher_patch_temp <= 0:
            raise ValueError(f"teacher_patch_temp must be > 0, got {teacher_patch_temp}")
        self.vmf, self.vmf_approx = vmf, vmf_approx
        self.add_prototypes(num_prototypes, norm_last_layer)
        centering = ("prob" if vmf else "logit") if centering is None else centering
        student_temp = self.hparams.student_temp
        self.dino_loss = DINOLoss(num_prototypes, student_temp, centering, center_momentum)
        self.patch_loss = IBOTPatchLoss(num_prototypes, student_temp, centering, center_momentum)

    def compute_losses(self, student: Embeddings, teacher: Embeddings, masks: Tensor | None, temp: float) -> dict:
        proto_s, proto_t = self.student.prototypes, self.teacher.prototypes
        s_bias, t_bias = self.prototype_biases(temp)
        cls_loss = self.dino_loss(proto_s(student.cls), proto_t(teacher.cls), temp, s_bias, t_bias)
        flat = masks.flatten(1)
        hp = self.hparams  # §6.2: the patch temperature starts its warm-up when masked modelling starts
        patch_temp = self.teacher_temp_at(self.global_step, hp.teacher_patch_temp, hp.pred_start_epoch)
        t_bias = self.prototype_biases(patch_temp)[1] if patch_temp != temp else t_bias
        index = masked_token_index(flat)  # the step's one read of the masked-token count on the host
        patch_loss = self.patch_loss(
            proto_s(select_tokens(student.patches, index)), proto_t(teacher.patches), flat, patch_temp, s_bias,
            t_bias, token_index=index,
        )  # fmt: skip
        loss = cls_loss + self.hparams.mim_weight * patch_loss
        return {"loss": loss, "cls_loss": cls_loss.detach(), "patch_loss": patch_loss.detach()}


class IBOTvMF(IBOT):
    """iBOT-vMF: :class:`IBOT` with ``vmf=True`` (unnormalised prototypes, probability centering)."""

    def __init__(self, vmf: bool = True, **kwargs):
        super().__init__(vmf=vmf, **kwargs)
