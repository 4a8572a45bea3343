"""DINO and iBOT objectives with logit, probability or no centering (ALGORITHMS.md §6, §7.5)."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..distributed import all_reduce_mean
from .common import at_least_fp32, cross_entropy, cross_view_mean, masked_image_mean, masked_student_rows, select_tokens

__all__ = ["Center", "DINOLoss", "IBOTPatchLoss", "teacher_stats"]

Centering = Literal["logit", "prob", "prob_subtractive", "none"]


@torch.no_grad()
def teacher_stats(p_t: Tensor) -> dict[str, Tensor]:
    """Collapse diagnostics of teacher targets ``(n, K)``: their mean distribution ``(K,)`` and mean
    entropy, and the fraction of columns that are some row's argmax."""
    p = at_least_fp32(p_t.reshape(-1, p_t.shape[-1]))
    entropy = torch.special.entr(p).sum(-1).mean()  # -Σ p log p with 0 log 0 = 0, one pass
    used = torch.zeros(p.shape[-1], device=p.device).index_fill_(0, p.argmax(-1), 1.0).mean()
    return {"mean_probs": p.mean(0), "entropy": entropy, "argmax_fraction": used}


class Center(nn.Module):
    """Teacher centering state and the centred teacher distribution.

    ``mode="logit"`` (DINO, §6.1): ``P_T = softmax((l - c)/τ + b)``, ``c ←  m c + (1-m) mean(l)``.
    ``mode="prob"`` (DINO-vMF, §7.5): ``P̃ = softmax(l/τ + b)``, ``P_T ∝ P̃ / c̄``,
    ``c̄ ← m c̄ + (1-m) mean(P̃)`` (init ``1/K``, clamped ≥ 1e-12).
    ``mode="prob_subtractive"``: ``P_T ∝ max(P̃ − c̄ + 1/K, 0)`` (the alternative reading of §7.5).
    ``mode="none"``: ``P_T = softmax(l/τ + b)``.

    ``l``: raw teacher logits ``(..., K)``; ``b``: optional per-prototype bias ``(K,)`` (the vMF
    log-normaliser). Means are over all rows of all ranks.
    """

    def __init__(self, dim: int, mode: Centering = "logit", momentum: float = 0.9):
        super().__init__()
        if mode not in ("logit", "prob", "prob_subtractive", "none"):
            raise ValueError(f"centering must be 'logit', 'prob', 'prob_subtractive' or 'none', got {mode!r}")
        if not 0.0 <= momentum <= 1.0:
            raise ValueError(f"center_momentum must be in [0, 1], got {momentum}")
        self.mode, self.momentum = mode, momentum
        init = torch.zeros(dim) if mode in ("logit", "none") else torch.full((dim,), 1.0 / dim)
        self.register_buffer("center", init)

    def _uncentred(self, logits: Tensor, temperature: float, bias: Tensor | None) -> Tensor:
        a = logits / temperature
        return a if bias is None else a + bias

    def teacher_probs(self, logits: Tensor, temperature: float, bias: Tensor | None = None) -> Tensor:
        if self.mode == "logit":
            a = (logits - self.center) / temperature
            return F.softmax(a if bias is None else a + bias, dim=-1)
        a = self._uncentred(logits, temperature, bias)
        if self.mode == "prob":
            a = a - self.center.clamp(min=1e-12).log()
        elif self.mode == "prob_subtractive":
            p = (F.softmax(a, dim=-1) - self.center + 1.0 / self.center.numel()).clamp(min=0.0)
            return p / p.sum(-1, keepdim=True).clamp(min=1e-12)
        return F.softmax(a, dim=-1)

    @torch.no_grad()
    def update(self, logits: Tensor, temperature: float, bias: Tensor | None = None) -> None:
        if self.mode == "none":
            return
        rows = at_least_fp32(logits.reshape(-1, logits.shape[-1]))
        if self.mode != "logit":
            rows = F.softmax(self._uncentred(rows, temperature, bias), dim=-1)
        batch = all_reduce_mean(rows.sum(0), rows.shape[0])
        self.center.mul_(self.momentum).add_(batch, alpha=1 - self.momentum)
        if self.mode != "logit":
            self.center.clamp_(min=1e-12)


class _CenteredDistillation(nn.Module):
    """Student temperature, teacher center and the student log-probabilities shared by both losses."""

    def __init__(
        self,
        num_prototypes: int,
        student_temp: float = 0.1,
        centering: Centering = "logit",
        center_momentum: float = 0.9,
    ):
        super().__init__()
        if student_temp <= 0:
            raise ValueError(f"student_temp must be > 0, got {student_temp}")
        self.student_temp = student_temp
        self.center = Center(num_prototypes, centering, center_momentum)

    def student_log_probs(self, logits: Tensor, bias: Tensor | None) -> Tensor:
        a = at_least_fp32(logits) / self.student_temp
        return F.log_softmax(a if bias is None else a + bias.to(a.dtype), dim=-1)


class DINOLoss(_CenteredDistillation):
    """DINO [CLS] loss over all cross-view pairs (§6.1), in fp32.

    ``forward(student_logits (V·B, K), teacher_logits (2B, K), teacher_temp)`` with view-major rows;
    ``student_bias`` / ``teacher_bias`` ``(K,)`` are added after the temperature (vMF, §7.2). The center
    is updated after the loss while the module is in training mode.
    """

    def forward(
        self,
        student_logits: Tensor,
        teacher_logits: Tensor,
        teacher_temp: float,
        student_bias: Tensor | None = None,
        teacher_bias: Tensor | None = None,
    ) -> Tensor:
        t = at_least_fp32(teacher_logits.detach())
        batch = t.shape[0] // 2
        if t.shape[0] % 2 or student_logits.shape[0] % batch:
            raise ValueError(
                f"teacher rows {t.shape[0]} must be 2·B and student rows {student_logits.shape[0]} a multiple of B"
            )
        log_p_s = self.student_log_probs(student_logits, student_bias)
        p_t = self.center.teacher_probs(t, teacher_temp, teacher_bias)
        loss = cross_view_mean(list(p_t.split(batch)), list(log_p_s.split(batch)))
        if self.training:
            self.center.update(t, teacher_temp, teacher_bias)
            self.stats = teacher_stats(p_t)
        return loss


class IBOTPatchLoss(_CenteredDistillation):
    """iBOT masked-patch loss (§6.2): same-view pairs, masked positions only, with its own center.

    ``forward(student_logits, teacher_logits (2B, N, K), masks (2B, N), teacher_temp)``; the student
    logits are either dense ``(2B, N, K)`` or only the masked tokens ``(M, K)`` in row-major mask order
    (cheaper). The patch center averages the teacher logits of **all** patches. ``token_index`` ``(M,)``: the
    masked tokens' flat positions (:func:`~sop_lightning.losses.common.masked_token_index` of ``masks``), when
    the caller has them (it selected the student's tokens with them): a step then reads ``M`` on the host once.
    """

    def forward(
        self,
        student_logits: Tensor,
        teacher_logits: Tensor,
        masks: Tensor,
        teacher_temp: float,
        student_bias: Tensor | None = None,
        teacher_bias: Tensor | None = None,
        token_index: Tensor | None = None,
    ) -> Tensor:
        masks = masks.flatten(1).bool()
        t = at_least_fp32(teacher_logits.detach())
        if t.shape[:2] != masks.shape:
            raise ValueError(f"teacher_logits {tuple(t.shape)} and masks {tuple(masks.shape)} disagree on (2B, N)")
        s, index = masked_student_rows(student_logits, masks, token_index, "student_logits")
        log_p_s = self.student_log_probs(s, student_bias)
        p_t = self.center.teacher_probs(select_tokens(t, index), teacher_temp, teacher_bias)
        loss = masked_image_mean(cross_entropy(p_t, log_p_s), masks)
        if self.training:
            self.center.update(t, teacher_temp, teacher_bias)
            if p_t.shape[0]:
                self.stats = teacher_stats(p_t)
        return loss
