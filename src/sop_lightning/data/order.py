"""``TrainingOrder``: the training order of a data module, the same with any number of workers or ranks and
resumed exactly from any checkpoint (ARCHITECTURE.md, data flow).

It puts together the three parts both data modules use for their training loader: the seeded permutation
of :class:`~sop_lightning.data.sampler.GlobalBatchSampler`, the per-sample augmentation draws of
:class:`~sop_lightning.data.seeding.AugmentationStreams`, and the position in the epoch (the batches
already handed to the model), which is saved in every checkpoint and restored before the loader is built.
"""

from __future__ import annotations

from collections.abc import Sized
from typing import Any

from torch.utils.data import DataLoader

from ..distributed import rank as distributed_rank
from .sampler import GlobalBatchSampler
from .seeding import AugmentationStreams

__all__ = ["ResumableLoader", "TrainingOrder"]


class ResumableLoader(DataLoader):
    """The training ``DataLoader``, marked resumable for Lightning (``state_dict`` / ``load_state_dict``).

    The position itself is restored by the data module's :class:`TrainingOrder`, whose checkpoint state holds
    the epoch, the batches already trained on and the augmentation seed, before it builds this loader: its
    :class:`~sop_lightning.data.sampler.GlobalBatchSampler` then starts after those batches, so the loader
    state here is only informative."""

    def state_dict(self) -> dict:
        return {"epoch": int(getattr(self.sampler, "epoch", 0))}

    def load_state_dict(self, state_dict: dict) -> None:
        pass  # TrainingOrder.load_state_dict already placed the sampler


class TrainingOrder:
    """Sampler, augmentation seeds and resume position of one data module's training loader.

    Args:
        seed: base seed of the data order and of the augmentation draws; ``None`` takes the process seed
            (``seed_everything``) when the first training loader is built.

    The data module calls :meth:`sampler` in ``train_dataloader``, :meth:`count` in
    ``on_after_batch_transfer`` and forwards its ``state_dict`` / ``load_state_dict``. The sampler starts the
    augmentation streams of each epoch when Lightning sets its epoch, so any LightningModule trains on the
    epoch's views.
    """

    def __init__(self, seed: int | None = None):
        self.streams = AugmentationStreams(seed)
        self.position: tuple[int, int] = (0, 0)  # (epoch, training batches handed out in it)
        self.resume_at: tuple[int, int] | None = None

    def sampler(self, dataset: Sized, batch_size: int, trainer: Any, name: str = "dataset") -> GlobalBatchSampler:
        """The sampler of the next training loader: rank ``trainer.global_rank``'s share of each global batch of
        ``batch_size · world_size`` images; after :meth:`load_state_dict`, the interrupted epoch continues
        where its checkpoint was written. ``name`` names the data set in the error for one too small."""
        world = int(getattr(trainer, "world_size", 1)) if trainer is not None else 1
        rank = int(getattr(trainer, "global_rank", 0)) if trainer is not None else distributed_rank()
        if len(dataset) < batch_size * world:
            raise ValueError(
                f"{name} has {len(dataset)} images, fewer than batch_size={batch_size} x {world} rank(s) (the "
                "last incomplete global batch is dropped, so no step would run)"
            )
        base = self.streams.resolve_base()
        strategy = getattr(trainer, "strategy", None)
        if world > 1 and strategy is not None:  # unseeded processes differ: every rank takes rank 0's order
            base = self.streams.base = int(strategy.broadcast(base))
        sampler = GlobalBatchSampler(dataset, batch_size, world, rank, shuffle=True, seed=base,
                                     on_epoch=self.streams.set_epoch)  # fmt: skip
        epoch = trainer.current_epoch if trainer is not None else 0
        if self.resume_at is not None:  # set by load_state_dict: the epoch the checkpoint interrupted
            epoch, done = self.resume_at
            self.resume_at = None
            if done >= sampler.num_batches:
                epoch, done = epoch + 1, 0
            sampler.resume(epoch, done)
            self.position = (epoch, done)
        else:
            sampler.set_epoch(epoch)
        return sampler

    def count(self, trainer: Any) -> None:
        """One more training batch handed to the model (call it for training batches only)."""
        epoch, done = self.position
        current = trainer.current_epoch
        self.position = (current, done + 1 if epoch == current else 1)

    def state_dict(self, trainer: Any) -> dict:
        """The augmentation base seed and the batches of the current epoch already trained on."""
        epoch, done = self.position
        if trainer is not None and epoch != trainer.current_epoch:  # a new epoch has not drawn a batch yet
            epoch, done = trainer.current_epoch, 0
        return {"augmentation_base": self.streams.base, "epoch": epoch, "batches_done": done}

    def load_state_dict(self, state_dict: dict) -> None:
        if "epoch" not in state_dict:
            return  # a checkpoint written before the data position was saved: the epoch starts over
        if state_dict.get("augmentation_base") is not None:
            self.streams.base = int(state_dict["augmentation_base"])
        self.resume_at = (int(state_dict["epoch"]), int(state_dict["batches_done"]))
