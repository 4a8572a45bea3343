"""Per-iteration schedules (ALGORITHMS.md §10.1).

Every schedule is a pure function of the global optimisation step, so resuming, gradient
accumulation and DDP all agree without storing arrays. ``cosine_schedule`` materialises the same
values as an array for inspection and tests.
"""

from __future__ import annotations

import math

import torch

__all__ = ["cosine_at", "cosine_schedule", "epoch_warmup_at"]


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
