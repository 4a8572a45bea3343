"""Per-iteration schedules (ALGORITHMS.md §10.1).

Every schedule is a pure function of the global optimisation step, so resuming, gradient
accumulation and DDP all agree without storing arrays. ``cosine_schedule`` materialises the same
values as an array for inspection and tests.
"""

from __future__ import annotations

import math

import torch

__all__ = ["cosine_at", "cosine_schedule", "epoch_warmup_at", "ema_profile"]


def cosine_at(
    step: int,
    base: float,
    final: float,
    total_steps: int,
    warmup_steps: int = 0,
    start_warmup: float = 0.0,
) -> float:
    """Value at ``step`` of the DINO-style schedule (§10.1).

    For ``step < warmup_steps``: ``linspace(start_warmup, base, warmup_steps)[step]`` (endpoints
    inclusive). For the remaining ``n = total_steps - warmup_steps`` steps:
    ``final + 0.5 (base - final) (1 + cos(pi j / n))`` with ``j = step - warmup_steps``. Steps past the
    end keep the last value.
    """
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")
    if not 0 <= warmup_steps <= total_steps:
        raise ValueError(f"warmup_steps must be in [0, total_steps={total_steps}], got {warmup_steps}")
    step = min(max(int(step), 0), total_steps - 1)
    if step < warmup_steps:
        if warmup_steps == 1:
            return float(start_warmup)
        return start_warmup + (base - start_warmup) * step / (warmup_steps - 1)
    n = total_steps - warmup_steps
    j = step - warmup_steps
    return final + 0.5 * (base - final) * (1.0 + math.cos(math.pi * j / n))


def cosine_schedule(
    base: float,
    final: float,
    total_steps: int,
    warmup_steps: int = 0,
    start_warmup: float = 0.0,
) -> torch.Tensor:
    """The whole schedule as a float64 tensor of length ``total_steps`` (§10.1)."""
    return torch.tensor(
        [cosine_at(i, base, final, total_steps, warmup_steps, start_warmup) for i in range(total_steps)],
        dtype=torch.float64,
    )


def epoch_warmup_at(epoch: int, start: float, final: float, warmup_epochs: int, start_epoch: int = 0) -> float:
    """DINO/iBOT teacher temperature (§6.1–6.2): ``start`` before ``start_epoch``, then
    ``linspace(start, final, warmup_epochs)[epoch - start_epoch]``, then ``final``. iBOT's patch temperature
    starts its warm-up at ``pred_start_epoch``."""
    epoch = epoch - start_epoch
    if epoch < 0:
        return float(start)
    if epoch >= warmup_epochs:
        return float(final)
    if warmup_epochs == 1:
        return float(start)
    return start + (final - start) * epoch / (warmup_epochs - 1)


def ema_profile(momentum: float, momentum_end: float, total_steps: int) -> tuple[float, float]:
    """How much of the final EMA teacher is still its random initialisation, and where in the run the
    rest of its weights come from, for the momentum ``cosine(momentum, momentum_end, T)`` of §10.1.

    After ``T`` updates ``ξ_T = (Π_i m_i) ξ_0 + Σ_i w_i θ_i`` with ``w_i = (1 − m_i) Π_{j>i} m_j``. Returns
    ``(Π_i m_i, Σ_i w_i·i / (T·Σ_i w_i))``: the initialisation's share and the centre of the student
    steps' weights as a fraction of the run. Choose the momenta so that the first is small (≲ 1 %) and
    the second near the end of the run (published 100-epoch recipes: ≈ 0.9); a short run needs a lower
    ``momentum_end`` than 1 (the teacher averages over the last ≈ ``1/(1 − m)`` steps).
    """
    m = cosine_schedule(momentum, momentum_end, total_steps)
    after = torch.cat([torch.cumprod(m.flip(0), 0).flip(0)[1:], m.new_ones(1)])  # Π_{j>i} m_j
    w = (1 - m) * after
    initial = float(torch.prod(m))
    if float(w.sum()) == 0.0:
        return initial, 0.0
    centre = float((w * torch.arange(total_steps, dtype=m.dtype)).sum() / w.sum()) / total_steps
    return initial, centre
