"""Memory-bank enqueue of the step's teacher outputs (ALGORITHMS.md §5)."""

from __future__ import annotations

from typing import Any

import lightning as L

from ..memory import MemoryBank

__all__ = ["MemoryEnqueue"]


class MemoryEnqueue(L.Callback):
    """After each training batch, writes the rows the method queued (``pl_module.pop_memory_updates()``,
    a list of ``(MemoryBank, rows, images)``, ``images`` the batch position of each row's image) into their
    banks, with the images' data-set indices when the batch carries them; at the start of fitting makes
    every rank hold rank 0's banks, so they stay bit-identical (each enqueue is all-gathered)."""

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        for module in pl_module.modules():
            if isinstance(module, MemoryBank):
                module.broadcast_(0)

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        batch_indices = getattr(batch, "indices", None)
        for bank, rows, images in pl_module.pop_memory_updates():
            indices = None if batch_indices is None else batch_indices.to(images.device)[images]
            bank.enqueue(rows, indices)
