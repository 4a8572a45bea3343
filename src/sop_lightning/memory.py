"""``MemoryBank``: the FIFO ring buffer of teacher embeddings used by SOP (ALGORITHMS.md §5)."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from .distributed import all_gather_cat, is_distributed

__all__ = ["MemoryBank"]


class MemoryBank(nn.Module):
    """FIFO memory of ``size`` unit rows of dimension ``dim``, identical on every rank.

    Buffers (persistent, so checkpoints restore them): ``embeddings`` ``(size, dim)``, initialised to
    i.i.d. Gaussian rows L2-normalised, and ``ptr`` (the next row to write).

    :meth:`enqueue` all-gathers the rows of every rank (rank-major), writes them at ``ptr`` and wraps
    around the end, so any global batch ``≤ size`` is stored whole. :meth:`broadcast_` copies rank 0's
    state to every rank (called once at the start of training).

    With ``track_indices=True`` one more persistent buffer, ``indices`` ``(size,)``, keeps the data-set
    index of the image each row came from (-1: an initial random row or an unknown image), all-gathered
    and checkpointed like the rows, so one can ask which images make up a region of the bank.
    """

    def __init__(self, size: int, dim: int, seed: int = 0, track_indices: bool = False):
        super().__init__()
        if size < 1:
            raise ValueError(f"memory size must be >= 1, got {size}")
        if dim < 1:
            raise ValueError(f"memory dim must be >= 1, got {dim}")
        g = torch.Generator().manual_seed(seed)
        self.register_buffer("embeddings", F.normalize(torch.randn(size, dim, generator=g), dim=1))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))
        # enqueue counter and, per row, the counter value when it was written (-1: initial random row)
        self.register_buffer("num_enqueued", torch.zeros((), dtype=torch.long))
        self.register_buffer("written_at", torch.full((size,), -1, dtype=torch.long))
        if track_indices:
            self.register_buffer("indices", torch.full((size,), -1, dtype=torch.long))
        self.size, self.dim, self.track_indices = size, dim, track_indices

    def __len__(self) -> int:
        return self.size

    @torch.no_grad()
    def enqueue(self, x: Tensor, indices: Tensor | None = None) -> None:
        """Append the rows ``x`` ``(b, dim)`` of this rank and of every other rank (no gradient);
        ``indices`` ``(b,)``: their images' data-set indices, kept when the bank tracks them."""
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"enqueue expects embeddings of shape (b, {self.dim}), got {tuple(x.shape)}")
        if indices is not None and indices.shape != x.shape[:1]:
            raise ValueError(f"indices must have shape ({x.shape[0]},) like the rows, got {tuple(indices.shape)}")
        world = dist.get_world_size() if is_distributed() else 1
        if x.shape[0] * world > self.size:
            raise ValueError(
                f"global batch {x.shape[0]} x {world} ranks = {x.shape[0] * world} rows is larger than the "
                f"memory size {self.size}; use a larger memory or a smaller batch"
            )
        rows = all_gather_cat(x.detach()).to(self.embeddings.dtype)
        n = rows.shape[0]
        # the rows' positions ptr, ptr+1, ... wrapped around, computed where ptr lives: reading ptr on the host
        # would synchronise a GPU with the host at every step
        where = (self.ptr + torch.arange(n, device=self.ptr.device)) % self.size
        self.embeddings.index_copy_(0, where, rows)
        self.written_at.index_copy_(0, where, self.num_enqueued.expand(n).clone())
        if self.track_indices:
            local = torch.full((x.shape[0],), -1, dtype=torch.long, device=x.device) if indices is None else indices
            ids = all_gather_cat(local.to(device=x.device, dtype=torch.long))
            self.indices.index_copy_(0, where, ids)
        self.ptr.add_(n).remainder_(self.size)
        self.num_enqueued.add_(1)

    def age(self) -> Tensor:
        """Per-row age in enqueue calls (steps); initial random rows count from before the first call."""
        return self.num_enqueued - self.written_at - 1

    @torch.no_grad()
    def broadcast_(self, src: int = 0) -> None:
        """Make every rank hold rank ``src``'s memory and pointer."""
        if is_distributed():
            for buffer in self.buffers():
                dist.broadcast(buffer, src)

    def extra_repr(self) -> str:
        return f"size={self.size}, dim={self.dim}"
