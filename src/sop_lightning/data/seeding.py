"""Random draws of the training augmentations, a function of ``(seed, epoch, sample index)`` only.

Without this, DDP ranks whose processes were seeded alike (``seed_everything(s)`` without
``workers=True``, or no seeding at all: every fresh process starts from the same default seed) draw the
same crop, flip, colour and mask parameters, so the global batch repeats its augmentations across ranks;
and draws that run on from sample to sample depend on the number of loader workers and cannot be replayed
when a run resumes in the middle of an epoch. Seeding each sample by its index in the epoch fixes all three:
ranks see different indices (:class:`~sop_lightning.data.sampler.GlobalBatchSampler`), any number of workers
or ranks gives the same views, and a resumed epoch redraws exactly the views it would have drawn.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from torch.utils.data import get_worker_info

from ..seeding import mix_seed

__all__ = ["AugmentationStreams"]


def _get_states() -> tuple[Any, ...]:
    return torch.get_rng_state(), random.getstate(), np.random.get_state()


def _set_states(states: tuple[Any, ...]) -> None:
    torch.set_rng_state(states[0])
    random.setstate(states[1])
    np.random.set_state(states[2])


def _seed_process(seed: int) -> None:
    torch.default_generator.manual_seed(seed)  # the CPU generator only: CUDA's belongs to the model
    random.seed(seed)
    np.random.seed(seed % (1 << 32))


class AugmentationStreams:
    """Seeds the draws of the training transforms and masks of each sample by ``(base, epoch, index)``.

    Wrap a sample's random work in :meth:`draws`. In a loader worker the worker's own torch (CPU), ``random``
    and numpy generators are reseeded for every sample (a worker's generators serve only the data); in the
    main process (``num_workers=0``) their states are saved and restored around the sample, so the model's
    random draws (drop-path) are left alone.

    Args:
        seed: base seed; ``None`` takes the main process's ``torch.initial_seed()`` when the training loader is
            built (:meth:`resolve_base`), so ``seed_everything`` still makes runs repeatable.

    :meth:`set_epoch` (shared memory, so persistent workers see it) at the start of every epoch. The base is
    part of the data module's checkpoint state, so a resumed run redraws the same views.
    """

    def __init__(self, seed: int | None = None):
        self.seed = seed
        self.base: int | None = seed
        self.epoch = torch.zeros((), dtype=torch.long).share_memory_()

    def resolve_base(self) -> int:
        """Fix the base seed (in the main process, before the loader's workers are forked)."""
        if self.base is None:  # no seed given (a given seed is the base from the start)
            self.base = torch.initial_seed()
        return self.base

    def set_epoch(self, epoch: int) -> None:
        self.epoch.fill_(int(epoch))

    @contextmanager
    def draws(self, index: int) -> Iterator[None]:
        """The random draws of sample ``index`` in the current epoch."""
        base = self.base if self.base is not None else self.resolve_base()
        seed = mix_seed(base, int(self.epoch), int(index))
        if get_worker_info() is not None:
            _seed_process(seed)
            yield
            return
        outside = _get_states()
        _seed_process(seed)
        try:
            yield
        finally:
            _set_states(outside)
