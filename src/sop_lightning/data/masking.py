"""Blockwise (BEiT/iBOT) and random patch masks, and mask-ratio sampling (ALGORITHMS.md §9.2–9.3).

Masks are built in the data-loader workers, never in the training step.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from typing import Literal

import numpy as np
import torch
from torch import Tensor

__all__ = ["BlockMaskGenerator", "MaskRatioSampler"]


def _pair(grid: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(grid, int):
        return grid, grid
    h, w = grid
    return int(h), int(w)


class BlockMaskGenerator:
    """Masks of a ``H'×W'`` patch grid, True = masked (§9.2).

    ``shape="block"``: union of random rectangles, area drawn in ``[min_block, budget]`` and log-aspect
    in ``log(aspect)``, never more than ``floor(ratio·H'·W')`` cells. ``shape="rand"``: exactly
    ``int(ratio·H'·W')`` cells chosen uniformly without replacement.

    Args:
        grid: ``H'`` (square) or ``(H', W')``.
        aspect: aspect-ratio range of a block.
        min_block: smallest block area; default ``(min(H', W') // 3)²`` as in iBOT.
        shape: ``"block"`` or ``"rand"``.
    """

    def __init__(
        self,
        grid: int | tuple[int, int],
        aspect: tuple[float, float] = (0.3, 1 / 0.3),
        min_block: int | None = None,
        shape: Literal["block", "rand"] = "block",
    ):
        self.height, self.width = _pair(grid)
        if self.height < 1 or self.width < 1:
            raise ValueError(f"grid must be positive, got {grid!r}")
        if not 0 < aspect[0] <= aspect[1]:
            raise ValueError(f"aspect must satisfy 0 < aspect[0] <= aspect[1], got {aspect!r}")
        if shape not in ("block", "rand"):
            raise ValueError(f"shape must be 'block' or 'rand', got {shape!r}")
        self.log_aspect = (math.log(aspect[0]), math.log(aspect[1]))
        self.min_block = (min(self.height, self.width) // 3) ** 2 if min_block is None else int(min_block)
        self.shape = shape

    def __call__(self, ratio: float, generator: torch.Generator | None = None) -> Tensor:
        if not 0.0 <= ratio <= 1.0:
            raise ValueError(f"ratio must be in [0, 1], got {ratio}")
        H, W = self.height, self.width
        if self.shape == "rand":
            mask = torch.zeros(H * W, dtype=torch.bool)
            n = int(ratio * H * W)
            mask[torch.randperm(H * W, generator=generator)[:n]] = True
            return mask.view(H, W)

        def uniform(a: float, b: float) -> float:
            return a + (b - a) * float(torch.rand((), generator=generator))

        def randint(a: int, b: int) -> int:  # inclusive bounds
            return int(torch.randint(a, b + 1, (), generator=generator))

        mask = np.zeros((H, W), dtype=bool)  # numpy: the block loop's small slices cost less than on tensors
        target = ratio * H * W
        count = 0
        while count < target:
            budget = target - count
            added = 0
            for _ in range(10):
                area = uniform(self.min_block, budget)
                ar = math.exp(uniform(*self.log_aspect))
                h = int(round(math.sqrt(area * ar)))
                w = int(round(math.sqrt(area / ar)))
                if 0 < h < H and 0 < w < W:
                    top, left = randint(0, H - h), randint(0, W - w)
                    new = h * w - int(mask[top : top + h, left : left + w].sum())
                    if 0 < new <= budget:
                        mask[top : top + h, left : left + w] = True
                        added = new
                if added > 0:
                    break
            if added == 0:
                break
            count += added
        return torch.from_numpy(mask)


class MaskRatioSampler:
    """Per-crop mask ratio (§9.3): for each ``(μ, δ)`` draw ``U(μ-δ, μ+δ)``, then pick one uniformly.

    ``pred_ratio=[0, 0.3], pred_ratio_var=[0, 0.2]`` (iBOT recipe) gives no mask half of the time and
    ``r ~ U(0.1, 0.5)`` otherwise.
    """

    def __init__(self, pred_ratio: float | Sequence[float] = 0.3, pred_ratio_var: float | Sequence[float] = 0.0):
        ratios = [pred_ratio] if isinstance(pred_ratio, (int, float)) else list(pred_ratio)
        variances = [pred_ratio_var] if isinstance(pred_ratio_var, (int, float)) else list(pred_ratio_var)
        if len(ratios) != len(variances) or not ratios:
            raise ValueError(
                f"pred_ratio and pred_ratio_var must be non-empty and of equal length, got {ratios} and {variances}"
            )
        for mu, var in zip(ratios, variances):
            if not (0 <= var <= mu and mu + var <= 1):
                raise ValueError(
                    f"each (pred_ratio, pred_ratio_var) needs 0 <= var <= ratio <= 1 - var, got ({mu}, {var})"
                )
        self.ratios, self.variances = [float(r) for r in ratios], [float(v) for v in variances]

    def __call__(self, rng: random.Random | None = None) -> float:
        rng = rng or random
        candidates = [
            rng.uniform(mu - var, mu + var) if var > 0 else mu for mu, var in zip(self.ratios, self.variances)
        ]
        return candidates[rng.randrange(len(candidates))]
