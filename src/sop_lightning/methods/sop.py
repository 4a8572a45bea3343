"""SOP: Self-Organizing Visual Prototypes (ALGORITHMS.md §2.1, §3–§5, §12)."""

from __future__ import annotations

from typing import Literal

import lightning as L
import torch
from torch import Tensor

from ..callbacks.memory import MemoryEnqueue
from ..losses.common import masked_token_index, select_tokens
from ..losses.sop import SOPLoss, SOPMIMLoss
from ..memory import MemoryBank
from ..network import Embeddings
from ..seeding import mix_seed
from .base import SelfDistillation

__all__ = ["SOP"]


class SOP(SelfDistillation):
    """SOP [CLS] loss + SOP-MIM on a shared L2-normalised head, no prototypes, no centering.

    Args:
        memory_size, patch_memory_size: ``N_C`` (65 536) and ``N_P`` (8192).
        num_anchors, num_neighbors: ``K`` (4096) and ``k`` (8) of the [CLS] SOPs.
        num_patch_anchors, num_patch_neighbors: ``K_P`` (512) and ``k_P`` (0) of the patch SOPs.
        contribution: ``"soft"``, ``"onehot"`` or ``"uniform"``; smoothing: ``ε`` (0.1).
        mim_weight: ``λ2`` (``λ_KoLeo`` is the shared ``koleo_weight``).
        memory_fill_steps: for the first steps only fill the banks (the SOP losses are multiplied by 0, §5).
        num_tasks, anchor_keep_fraction: reference-code options (§3.5).
        anchor_mode: ``"random"`` or ``"fixed"`` (the collapse ablation).
        per_rank_anchors: draw different anchors on each rank (default: the same SOPs on every rank).
        enqueue_views: teacher global view(s) whose [CLS] rows enter the memory.
        patch_enqueue: ``"random_one"`` (any patch) or ``"random_masked_one"`` per image of view 2.
        track_indices: the banks also keep each row's data-set index (``MemoryBank(track_indices=True)``),
            so :func:`~sop_lightning.evaluation.visualize.sop_members` can show which images make up a SOP.
        search_dtype: dtype of the anchors × bank scores of the neighbour search; ``"bfloat16"`` halves the
            cost of that product (3.5× faster on a CPU with AVX512-BF16), the candidates are re-ranked in fp32
            (:func:`build_sops`); ``"auto"``: bf16 where the device multiplies it natively, else fp32
            (:func:`~sop_lightning.losses.sop.resolve_search_dtype`; the demo and recipe configs use it).
        teacher_temp, warmup_teacher_temp, warmup_teacher_temp_epochs: τ_t 0.04 → 0.07 over 30 epochs,
            per iteration, shared by both losses.
        **kwargs: the shared training arguments of :class:`SelfDistillation`.
    """

    uses_masks = True
    uses_patches = True
    teacher_temp_per_iteration = True

    def __init__(
        self,
        memory_size: int = 65536,
        patch_memory_size: int = 8192,
        num_anchors: int = 4096,
        num_neighbors: int = 8,
        num_patch_anchors: int = 512,
        num_patch_neighbors: int = 0,
        contribution: Literal["soft", "onehot", "uniform"] = "soft",
        smoothing: float = 0.1,
        mim_weight: float = 1.0,
        memory_fill_steps: int = 0,
        num_tasks: int = 1,
        anchor_keep_fraction: float = 1.0,
        anchor_mode: Literal["random", "fixed"] = "random",
        per_rank_anchors: bool = False,
        enqueue_views: Literal["second", "first", "both"] = "second",
        patch_enqueue: Literal["random_one", "random_masked_one"] = "random_one",
        track_indices: bool = False,
        search_dtype: Literal["float32", "bfloat16", "float16", "auto"] = "float32",
        teacher_temp: float = 0.07,
        warmup_teacher_temp: float = 0.04,
        warmup_teacher_temp_epochs: int = 30,
        **kwargs,
    ):
        super().__init__(
            teacher_temp=teacher_temp, warmup_teacher_temp=warmup_teacher_temp,
            warmup_teacher_temp_epochs=warmup_teacher_temp_epochs, **kwargs,
        )  # fmt: skip
        if memory_fill_steps < 0:
            raise ValueError(f"memory_fill_steps must be >= 0, got {memory_fill_steps}")
        if mim_weight < 0:
            raise ValueError(f"mim_weight must be >= 0, got {mim_weight}")
        if enqueue_views not in ("second", "first", "both"):
            raise ValueError(f"enqueue_views must be 'second', 'first' or 'both', got {enqueue_views!r}")
        if patch_enqueue not in ("random_one", "random_masked_one"):
            raise ValueError(f"patch_enqueue must be 'random_one' or 'random_masked_one', got {patch_enqueue!r}")
        hp, d = self.hparams, self.hparams.out_dim
        self.sop_loss = SOPLoss(
            memory_size, d, num_anchors, num_neighbors, smoothing, contribution, hp.student_temp, num_tasks,
            anchor_keep_fraction, anchor_mode, seed=hp.seed, per_rank_anchors=per_rank_anchors,
            track_indices=track_indices, search_dtype=search_dtype,
        )  # fmt: skip
        self.sop_mim_loss = SOPMIMLoss(
            patch_memory_size, d, num_patch_anchors, num_patch_neighbors, smoothing, contribution, hp.student_temp,
            anchor_mode, seed=hp.seed, per_rank_anchors=per_rank_anchors, track_indices=track_indices,
            search_dtype=search_dtype,
        )  # fmt: skip
        self._memory_updates: list[tuple[MemoryBank, Tensor, Tensor]] = []

    def configure_callbacks(self) -> list[L.Callback]:
        return [*super().configure_callbacks(), MemoryEnqueue()]

    def on_train_batch_start(self, batch, batch_idx: int) -> None:
        """Refuse, before the first update, a global batch that would overfill a bank in one enqueue."""
        b = batch.batch_size * self.trainer.world_size
        views = 2 if self.hparams.enqueue_views == "both" else 1
        for name, size, rows in (("memory_size", self.hparams.memory_size, b * views),
                                 ("patch_memory_size", self.hparams.patch_memory_size, b)):  # fmt: skip
            if rows > size:
                raise ValueError(
                    f"{name}={size} is smaller than the rows one step enqueues ({rows} = batch_size "
                    f"{batch.batch_size} x {self.trainer.world_size} ranks"
                    + (" x 2 views" if rows > b else "")
                    + f"): use {name} >= {rows} or a smaller batch_size"
                )

    def pop_memory_updates(self) -> list[tuple[MemoryBank, Tensor, Tensor]]:
        """The step's ``(bank, rows (b, d), images (b,))``: each row with the position in the batch of the
        image it came from (the enqueue callback maps positions to data-set indices)."""
        updates, self._memory_updates = self._memory_updates, []
        return updates

    def compute_losses(self, student: Embeddings, teacher: Embeddings, masks: Tensor | None, temp: float) -> dict:
        hp, step = self.hparams, self.global_step
        batch = teacher.cls.shape[0] // 2
        flat = masks.flatten(1)
        index = masked_token_index(flat)  # the step's one read of the masked-token count on the host
        cls_loss = self.sop_loss(student.cls, teacher.cls, temp, step)
        mim_loss = self.sop_mim_loss(
            select_tokens(student.patches, index), teacher.patches, flat, temp, step, token_index=index
        )
        loss = cls_loss + hp.mim_weight * mim_loss
        if step < hp.memory_fill_steps:  # the banks still hold mostly random rows: no learning signal yet
            loss = loss * 0.0
        out = {"cls_loss": cls_loss.detach(), "mim_loss": mim_loss.detach()}
        if self.training:
            self._queue_memory_updates(teacher, flat, batch)
        return {"loss": loss, **out}

    def _patch_draws(self, batch: int) -> Tensor:
        """``(B,)`` uniform draws choosing each image's enqueued patch: drawn for the global batch from a
        generator seeded by ``(seed, step)``, this rank's slice taken, so the bank is the same on any number
        of ranks and after a resume."""
        trainer = self._trainer
        world, rank = (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
        g = torch.Generator().manual_seed(mix_seed(self.hparams.seed, self.global_step, 0x9A7C))
        return torch.rand(batch * world, generator=g)[rank * batch : (rank + 1) * batch]

    @torch.no_grad()
    def _queue_memory_updates(self, teacher: Embeddings, masks: Tensor, batch: int) -> None:
        """§5: teacher [CLS] of the chosen view(s) and one random patch per image of global view 2."""
        views = {"second": [1], "first": [0], "both": [0, 1]}[self.hparams.enqueue_views]
        cls_rows = torch.cat([teacher.cls[v * batch : (v + 1) * batch] for v in views])
        patches = teacher.patches[batch : 2 * batch]  # (B, N, d), global view 2
        n = patches.shape[1]
        u = self._patch_draws(batch).to(patches.device, non_blocking=True)  # (B,) uniform in [0, 1)
        if self.hparams.patch_enqueue == "random_masked_one":
            # uniform over the masked positions of the image (any position when none is masked)
            weights = masks[batch : 2 * batch].float() + (~masks[batch : 2 * batch].any(1, keepdim=True)).float()
            cdf = weights.cumsum(1)
            pos = torch.searchsorted(cdf, (u * cdf[:, -1]).unsqueeze(1), right=True).squeeze(1).clamp(max=n - 1)
        else:
            pos = (u * n).long().clamp(max=n - 1)
        images = torch.arange(patches.shape[0], device=patches.device)
        patch_rows = patches[images, pos]
        self._memory_updates = [
            (self.sop_loss.memory, cls_rows, images.repeat(len(views))),
            (self.sop_mim_loss.memory, patch_rows, images),
        ]
