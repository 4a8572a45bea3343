"""Shared numerics of the objectives."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "compute_dtype",
    "at_least_fp32",
    "cross_entropy",
    "cross_view_mean",
    "koleo_loss",
    "masked_image_mean",
    "masked_student_rows",
    "masked_token_index",
    "select_tokens",
]


def compute_dtype(*tensors: Tensor) -> torch.dtype:
    """The dtype the objectives compute in: the inputs' promoted dtype, at least float32 — bf16/fp16
    inputs (autocast) compute in fp32, float64 stays float64."""
    dtype = torch.float32
    for t in tensors:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def at_least_fp32(x: Tensor) -> Tensor:
    """``x`` in :func:`compute_dtype` (a no-op for fp32 and fp64 tensors)."""
    return x.to(compute_dtype(x))


def cross_entropy(target: Tensor, log_pred: Tensor) -> Tensor:
    """``H(p, q) = -Σ_j p_j log q_j`` over the last axis, with ``0·log 0 = 0`` (shape ``(...)``)."""
    return -torch.where(target > 0, target * log_pred, torch.zeros_like(log_pred)).sum(-1)


def cross_view_mean(targets: list[Tensor], log_preds: list[Tensor]) -> Tensor:
    """Mean over ordered pairs ``(q, v)``, ``v ≠ q``, of ``mean_b H(targets[q], preds[v])`` (§3.4, §6.1).

    ``targets``: the ``2`` teacher global views, each ``(B, K)``; ``log_preds``: all ``V`` student views
    (globals first), each ``(B, K)`` log-probabilities.

    ``H`` is linear in the log-probabilities, so the sum over the views paired with target ``q`` is one
    cross-entropy with their summed log-probabilities: ``V`` additions and ``2`` cross-entropies instead of
    ``2(V−1)`` cross-entropies. The sums skip view ``q`` rather than subtract it (no cancellation).
    """
    Q, V = len(targets), len(log_preds)
    rest = [sum(log_preds[Q + 1 :], log_preds[Q])] if V > Q else []  # the views that are no target's own
    total, pairs = log_preds[0].new_zeros(()), 0
    for q, target in enumerate(targets):
        others = [log_preds[v] for v in range(min(Q, V)) if v != q] + rest
        if others:
            total = total + cross_entropy(target, sum(others[1:], others[0])).mean()
            pairs += V - (1 if q < V else 0)
    return total / pairs


def masked_token_index(masks: Tensor) -> Tensor:
    """``(M,)`` flat positions ``b·N + i`` of the masked tokens of ``masks`` ``(B', N)`` (bool), ascending
    (row-major mask order). ``M`` depends on the data, so this is the one host read of a masked step on a GPU:
    compute it once and share it (:func:`select_tokens`, the losses' ``token_index``) — a boolean index
    ``x[masks]`` reads ``M`` again every time, and once more in its backward."""
    return masks.reshape(-1).nonzero().squeeze(1)


def select_tokens(x: Tensor, token_index: Tensor) -> Tensor:
    """``(M, ...)`` rows of ``x`` ``(B', N, ...)`` at the flat positions ``token_index`` ``(M,)``
    (:func:`masked_token_index`): ``x[masks]`` without a host read, forward or backward."""
    return x.flatten(0, 1).index_select(0, token_index)


def masked_student_rows(
    student: Tensor, masks: Tensor, token_index: Tensor | None, name: str = "student"
) -> tuple[Tensor, Tensor]:
    """The masked-patch losses' inputs (§4.3, §6.2): ``(rows (M, ...), token_index (M,))`` — the student's rows
    of the masked tokens, selected from dense ``(B', N, ...)`` or given as ``(M, ...)`` in row-major mask order
    and checked against the count, and their positions (``token_index``, :func:`masked_token_index` of
    ``masks`` (bool ``(B', N)``) when not given). ``name``: the argument named in the error."""
    index = masked_token_index(masks) if token_index is None else token_index
    rows = select_tokens(student, index) if student.ndim == 3 else student
    if rows.shape[0] != index.numel():
        raise ValueError(f"{name} has {rows.shape[0]} rows but masks select {index.numel()} tokens")
    return rows, index


def masked_image_mean(per_token: Tensor, masks: Tensor) -> Tensor:
    """iBOT/SOP-MIM reduction (§4.3, §6.2): ``mean_b [Σ_i m_bi ℓ_bi / max(1, Σ_i m_bi)]``.

    ``per_token``: losses of the masked tokens only, ``(M,)`` in row-major order of ``masks``;
    ``masks``: bool ``(B', N)``. Images without a masked token count as 0 in the mean over ``B'``.
    No host read: each token's image comes from the per-image counts, with ``M`` taken from ``per_token``.
    """
    per_image = masks.sum(1)
    image_of_token = torch.repeat_interleave(
        torch.arange(masks.shape[0], device=masks.device), per_image, output_size=per_token.numel()
    )
    counts = per_image.clamp(min=1).to(per_token.dtype)
    return (per_token / counts[image_of_token]).sum() / masks.shape[0]


def koleo_loss(x: Tensor, eps: float = 1e-8) -> Tensor:
    """KoLeo regulariser (ALGORITHMS.md §4.4, DINOv2): ``-mean_i log(||x_i - x_nn(i)|| + eps)`` over the rows
    of ``x`` ``(B, d)``, re-normalised, ``nn(i)`` the nearest other row. Spreads the embeddings of a batch
    (a differential entropy estimate); any method can add it (``koleo_weight``)."""
    x = F.normalize(at_least_fp32(x), dim=-1, eps=eps)
    with torch.no_grad():
        sims = x @ x.T
        sims.fill_diagonal_(float("-inf"))
        nn_idx = sims.argmax(dim=1)
    dist = (x - x[nn_idx]).norm(dim=-1)
    return -(dist + eps).log().mean()
