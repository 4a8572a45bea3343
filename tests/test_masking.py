import math
import random

import pytest
import torch

from sop_lightning.data.masking import BlockMaskGenerator, MaskRatioSampler


def _components(mask: torch.Tensor) -> list[set[tuple[int, int]]]:
    H, W = mask.shape
    seen, comps = set(), []
    for r in range(H):
        for c in range(W):
            if mask[r, c] and (r, c) not in seen:
                stack, comp = [(r, c)], set()
                seen.add((r, c))
                while stack:
                    y, x = stack.pop()
                    comp.add((y, x))
                    for dy, dx in ((1, 0), (-1, 0), (0, 1), (0, -1)):
                        ny, nx = y + dy, x + dx
                        if 0 <= ny < H and 0 <= nx < W and mask[ny, nx] and (ny, nx) not in seen:
                            seen.add((ny, nx))
                            stack.append((ny, nx))
                comps.append(comp)
    return comps


@pytest.mark.parametrize("grid", [14, 7, (6, 9)])
@pytest.mark.parametrize("ratio", [0.0, 0.1, 0.3, 0.5])
def test_block_mask_statistics(grid, ratio):
    gen = BlockMaskGenerator(grid)
    g = torch.Generator().manual_seed(1)
    H, W = (grid, grid) if isinstance(grid, int) else grid
    sums = []
    for _ in range(50):
        m = gen(ratio, generator=g)
        assert m.dtype == torch.bool and m.shape == (H, W)
        assert int(m.sum()) <= math.floor(ratio * H * W)
        sums.append(int(m.sum()))
        if ratio == 0:
            assert not m.any()
    if ratio >= 0.3 and min(H, W) >= 7:
        assert sum(sums) / len(sums) > 0.5 * ratio * H * W  # blocks do fill most of the budget


def test_blocks_are_rectangles_not_scatter():
    # With a min block of 16 cells on 14x14, every connected component has >= 2 cells in both directions.
    gen = BlockMaskGenerator(14)
    g = torch.Generator().manual_seed(3)
    for _ in range(30):
        m = gen(0.4, generator=g)
        for comp in _components(m):
            rows = {r for r, _ in comp}
            cols = {c for _, c in comp}
            assert len(rows) >= 2 and len(cols) >= 2
            # contiguity: rows and columns of a component have no gaps
            assert max(rows) - min(rows) + 1 == len(rows)
            assert max(cols) - min(cols) + 1 == len(cols)


def test_rand_shape_exact_count():
    gen = BlockMaskGenerator(14, shape="rand")
    for r in (0.0, 0.25, 0.5):
        assert int(gen(r).sum()) == int(r * 196)


def test_ratio_sampler_recipe_distribution():
    sampler = MaskRatioSampler([0.0, 0.3], [0.0, 0.2])
    rng = random.Random(0)
    draws = [sampler(rng) for _ in range(4000)]
    zeros = sum(d == 0 for d in draws)
    assert 0.45 < zeros / len(draws) < 0.55
    nonzero = [d for d in draws if d != 0]
    assert min(nonzero) >= 0.1 - 1e-12 and max(nonzero) <= 0.5 + 1e-12
    assert MaskRatioSampler(0.3, 0.0)(rng) == 0.3


def test_bad_arguments():
    with pytest.raises(ValueError, match="ratio"):
        BlockMaskGenerator(14)(1.5)
    with pytest.raises(ValueError, match="pred_ratio"):
        MaskRatioSampler([0.1, 0.3], [0.0])
    with pytest.raises(ValueError, match="var"):
        MaskRatioSampler(0.1, 0.2)
    with pytest.raises(ValueError, match="grid"):
        BlockMaskGenerator(0)
