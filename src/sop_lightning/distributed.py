"""Small collective helpers that are no-ops outside ``torch.distributed``."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = [
    "is_distributed",
    "world_size",
    "rank",
    "all_reduce_mean",
    "all_gather_cat",
    "all_gather_varsize",
    "all_gather_with_grad",
]


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


@torch.no_grad()
def all_reduce_mean(total: Tensor, count: float | Tensor) -> Tensor:
    """``(Σ_ranks total) / (Σ_ranks count)`` for a per-rank sum ``total`` over ``count`` rows.

    A Python ``count`` never becomes a tensor made on the host (``torch.as_tensor(count, device=...)`` is a copy
    to the device, a host synchronisation on a GPU each call): it is filled on ``total``'s device."""
    if not is_distributed():
        return total / count
    count = count.to(total).reshape(1) if isinstance(count, Tensor) else total.new_full((1,), float(count))
    packed = torch.cat([total.reshape(-1), count])
    dist.all_reduce(packed)
    return packed[:-1].view_as(total) / packed[-1]


@torch.no_grad()
def all_gather_cat(x: Tensor) -> Tensor:
    """Concatenate ``x`` (same shape on every rank) from all ranks along dim 0, rank-major, no grad."""
    if not is_distributed() or dist.get_world_size() == 1:
        return x.detach()
    out = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(out, x.detach().contiguous())
    return torch.cat(out)


@torch.no_grad()
def all_gather_varsize(x: Tensor) -> Tensor:
    """Concatenate ``x`` ``(n_r, ...)`` from all ranks, rank-major, where ``n_r`` may differ per rank."""
    if not is_distributed() or dist.get_world_size() == 1:
        return x.detach()
    world = dist.get_world_size()
    size = torch.tensor([x.shape[0]], device=x.device, dtype=torch.long)
    sizes = [torch.zeros_like(size) for _ in range(world)]
    dist.all_gather(sizes, size)
    sizes_int = [int(s) for s in sizes]
    padded = x.new_zeros((max(sizes_int), *x.shape[1:]))
    padded[: x.shape[0]] = x.detach()
    out = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(out, padded.contiguous())
    return torch.cat([o[:n] for o, n in zip(out, sizes_int)])


class _AllGatherWithGrad(torch.autograd.Function):
    """Forward: the rank-major concatenation of ``x`` from all ranks. Backward: the gradients of every rank's
    copy summed (all-reduce), this rank's slice kept — so a loss every rank computes identically on the
    gathered rows gets, after the data-parallel average of the gradients, exactly the one-process gradient."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        ctx.rows = x.shape[0]
        out = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(out, x.contiguous())
        return torch.cat(out)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        grad = grad.clone(memory_format=torch.contiguous_format)  # autograd's buffer is not ours to change
        dist.all_reduce(grad)
        start = dist.get_rank() * ctx.rows
        return grad[start : start + ctx.rows]


def all_gather_with_grad(x: Tensor) -> Tensor:
    """:func:`all_gather_cat` through which gradients flow back to every rank's rows (same shape on every
    rank). For a loss that all ranks compute on the global batch: each rank's rows receive the gradient of
    every rank's copy, which the data-parallel mean of DDP / FSDP2 turns into the global batch's gradient."""
    if not is_distributed() or dist.get_world_size() == 1:
        return x
    return _AllGatherWithGrad.apply(x)
