"""``GlobalBatchSampler``: the training order as a sequence of *global* batches, split between ranks and
resumable mid-epoch (ARCHITECTURE.md, data flow; ALGORITHMS.md §5 for why the order of a global batch
matters).

Each epoch is one seeded permutation of the data set cut into global batches of ``batch_size · world_size``
images; rank ``r`` takes the ``r``-th contiguous slice of ``batch_size`` images of every global batch. The
rank-major all-gather of the memory banks therefore sees the global batch in the order one process with
``batch_size · world_size`` images would, so a run is the same on any number of ranks (up to the float
order of the reductions). :class:`torch.utils.data.DistributedSampler` deals the images out round-robin
instead, which changes the order of the banks' rows with the number of ranks.

It is a ``DistributedSampler`` so that Lightning keeps it as it is (Lightning replaces any other sampler of
a distributed run) and calls :meth:`set_epoch` at every epoch start.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sized

import torch
from torch.utils.data import DistributedSampler

from ..seeding import mix_seed

__all__ = ["GlobalBatchSampler"]


class GlobalBatchSampler(DistributedSampler):
    """Indices of rank ``rank``'s share of every global batch; the last incomplete global batch is dropped.

    Args:
        dataset: a sized data set of ``n`` images.
        batch_size: images per rank and step (``B``).
        num_replicas, rank: the world size ``W`` and this rank.
        shuffle: a new permutation each epoch, seeded by ``(seed, epoch)`` (the same on every rank).
        seed: the permutations' seed.
        on_epoch: called with the epoch whenever :meth:`set_epoch` starts one (Lightning calls it at every
            epoch start; :meth:`resume` too), so the epoch's augmentation draws follow its permutation.

    ``len(sampler) = (n // (B·W)) · B``. :meth:`resume` makes the next iterator start after the batches
    already trained on in an epoch; ``len`` stays the epoch's full length, as the trainer counts batches
    from the epoch start.
    """

    def __init__(
        self,
        dataset: Sized,
        batch_size: int,
        num_replicas: int = 1,
        rank: int = 0,
        shuffle: bool = True,
        seed: int = 0,
        on_epoch: Callable[[int], None] | None = None,
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if num_replicas < 1 or not 0 <= rank < num_replicas:
            raise ValueError(f"rank must be in [0, num_replicas={num_replicas}), got {rank}")
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed, drop_last=True)
        self.batch_size = batch_size
        self.num_batches = len(dataset) // (batch_size * num_replicas)
        self.num_samples = self.num_batches * batch_size
        self.total_size = self.num_samples * num_replicas
        self._skip = 0
        self.on_epoch = on_epoch

    def set_epoch(self, epoch: int) -> None:
        super().set_epoch(epoch)
        if self.on_epoch is not None:
            self.on_epoch(epoch)

    def resume(self, epoch: int, batches_done: int) -> None:
        """Continue ``epoch`` after its first ``batches_done`` batches (per rank) with the next iterator."""
        if not 0 <= batches_done <= self.num_batches:
            raise ValueError(f"batches_done must be in [0, {self.num_batches}], got {batches_done}")
        self.set_epoch(epoch)
        self._skip = batches_done

    def order(self) -> torch.Tensor:
        """This epoch's permutation of all ``n`` indices (the same on every rank)."""
        n = len(self.dataset)  # type: ignore[arg-type]
        if not self.shuffle:
            return torch.arange(n)
        generator = torch.Generator().manual_seed(mix_seed(self.seed, self.epoch))
        return torch.randperm(n, generator=generator)

    def __iter__(self) -> Iterator[int]:
        B, W = self.batch_size, self.num_replicas
        per_batch = self.order()[: self.total_size].view(self.num_batches, W, B)  # global batch, rank, image
        start, self._skip = self._skip, 0  # the skip serves one iterator: the resumed epoch
        return iter(per_batch[start:, self.rank].flatten().tolist())

    def __len__(self) -> int:
        return self.num_samples
