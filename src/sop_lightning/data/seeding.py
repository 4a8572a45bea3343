"""Random streams of the training augmentations, one per (seed, rank, loader worker, epoch).

Without this, DDP ranks whose processes were seeded alike (``seed_everything(s)`` without
``workers=True``, or no seeding at all: every fresh process starts from the same default seed) draw the
same crop, flip, colour and mask parameters, so the global batch repeats its augmentations across ranks.
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
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % (1 << 32))


class AugmentationStreams:
    """Seeds the draws of the training transforms and masks by ``(seed, rank, worker id, epoch)``.

    Wrap each sample's random work in :meth:`draws`. In a loader worker the worker's own torch, ``random``
    and numpy generators are reseeded whenever the epoch changes (a worker's generators serve only the
    data); in the main process (``num_workers=0``) a private stream is swapped in and out around each
    sample, so the model's random draws (dropout, drop-path) are left alone.

    Args:
        seed: base seed; ``None`` takes the loader's per-iterator base seed in a worker and
            ``torch.initial_seed()`` in the main process, so ``seed_everything`` still makes runs repeatable.

    ``rank`` is set by the data module when it builds the training loader; :meth:`set_epoch` (shared memory,
    so persistent workers see it) at the start of every epoch.
    """

    def __init__(self, seed: int | None = None):
        self.seed = seed
        self.rank = 0
        self.epoch = torch.zeros((), dtype=torch.long).share_memory_()
        self._key: tuple[int, int] | None = None
        self._main_states: tuple[Any, ...] | None = None

    def set_epoch(self, epoch: int) -> None:
        self.epoch.fill_(int(epoch))

    @contextmanager
    def draws(self) -> Iterator[None]:
        info = get_worker_info()
        worker = -1 if info is None else info.id
        key = (worker, int(self.epoch))
        if key != self._key:
            if self.seed is not None:
                base = self.seed
            else:
                base = torch.initial_seed() if info is None else info.seed - info.id
            seed = mix_seed(base, self.rank, worker, key[1])
            self._key = key
            if info is None:
                outside = _get_states()
                _seed_process(seed)
                self._main_states = _get_states()
                _set_states(outside)
            else:
                _seed_process(seed)
        if info is not None:
            yield
            return
        outside = _get_states()
        _set_states(self._main_states)
        try:
            yield
        finally:
            self._main_states = _get_states()
            _set_states(outside)
