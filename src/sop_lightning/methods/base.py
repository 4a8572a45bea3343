"""``SelfDistillation``: the student / EMA-teacher skeleton every method shares (ALGORITHMS.md §2, §10).

A method subclass only says which head it needs and how its objectives turn student and teacher
embeddings into losses (:meth:`compute_losses`); views, schedules, parameter groups, clipping,
last-layer freeze, fp32 losses and logging live here.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Timer
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor
from torch.nn.parallel import DistributedDataParallel

from ..backbones import ViTBackbone
from ..callbacks.diagnostics import Diagnostics
from ..callbacks.ema import EMATeacher
from ..callbacks.knn import KNNEvaluation
from ..checkpoints import resume_epoch_end_checkpoint
from ..data.datamodule import MultiCropBatch
from ..distributed import all_gather_with_grad
from ..heads import ProjectionHead, PrototypeLayer
from ..losses.common import koleo_loss
from ..losses.vmf import vmf_bias
from ..network import Embeddings, SSLNetwork, make_teacher
from ..schedules import cosine_at, epoch_warmup_at
from ..seeding import mix_seed
from ..sharding import full_tensor, is_sharded, local_tensors, reshard, shard_network, shards_line_up, sum_over_shards_

__all__ = ["SelfDistillation", "check_checkpoint_fits", "schedule_length"]


class SelfDistillation(L.LightningModule):
    """Student + EMA teacher with the shared training arguments of API.md.

    Args:
        backbone: timm ViT name; ``img_size``, ``patch_size``, ``embed_dim``, ``depth``, ``num_heads``,
            ``mlp_ratio`` override its config (small images).
        out_dim: head bottleneck ``d`` (256); ``hidden_dim``: head MLP width (2048).
        base_lr: learning rate per 256 images (scaled by the global batch); ``min_lr``; ``warmup_epochs``.
        weight_decay → weight_decay_end: cosine, decayed group only (§8.5).
        momentum_teacher → momentum_teacher_end: EMA momentum of the teacher, cosine over the run (§10.1;
            end 1.0 as in the papers). For a short run lower the end value so the final teacher is made of
            trained students, not its random start: :func:`~sop_lightning.schedules.ema_profile` gives the
            initialisation's share and the centre of the teacher's weights for a choice and a run length.
        teacher_temp, warmup_teacher_temp, warmup_teacher_temp_epochs: teacher temperature warm-up.
        student_temp: ``τ_s``.
        clip_grad: per-tensor gradient-norm clip (0 = off, §2 step 8).
        freeze_last_layer: epochs during which the prototype layer gets no update.
        drop_path_rate: student stochastic depth.
        pred_start_epoch: masked-image modelling starts at this epoch (masks are emptied before, §9.3);
            no effect on methods without masks.
        seed: seeds the rank-consistent random draws of the objectives.
        koleo_weight: ``λ_KoLeo`` of the KoLeo regulariser on the student's global-view [CLS] embeddings, per
            view chunk (ALGORITHMS.md §4.4, as DINOv2 adds it to iBOT); 0 = off. It spreads the embeddings and
            helps k-NN retrieval: on 28-px Fashion-MNIST 0.1 adds ≈ 2 points (``docs/benchmarks.md``).
    """

    #: The student sees masked global views (iBOT, SOP).
    uses_masks: bool = False
    #: The objectives need patch embeddings of the global views.
    uses_patches: bool = False
    #: Teacher temperature warms up per iteration (SOP) rather than per epoch (DINO / iBOT code).
    teacher_temp_per_iteration: bool = False

    def __init__(
        self,
        backbone: str = "vit_small_patch16_224",
        img_size: int | None = None,
        patch_size: int | None = None,
        embed_dim: int | None = None,
        depth: int | None = None,
        num_heads: int | None = None,
        mlp_ratio: float | None = None,
        out_dim: int = 256,
        hidden_dim: int = 2048,
        base_lr: float = 5e-4,
        min_lr: float = 1e-6,
        warmup_epochs: float = 10,
        weight_decay: float = 0.04,
        weight_decay_end: float = 0.4,
        momentum_teacher: float = 0.996,
        momentum_teacher_end: float = 1.0,
        teacher_temp: float = 0.04,
        warmup_teacher_temp: float = 0.04,
        warmup_teacher_temp_epochs: int = 0,
        student_temp: float = 0.1,
        clip_grad: float = 3.0,
        freeze_last_layer: int = 1,
        drop_path_rate: float = 0.1,
        pred_start_epoch: int = 0,
        seed: int = 0,
        koleo_weight: float = 0.0,
    ):
        super().__init__()
        self.save_hyperparameters()
        # the losses of the micro-batches since the last optimizer step, checked before it (_check_finite)
        self._unchecked: list[tuple[int, int, list[str], Tensor]] = []
        _check_positive(base_lr=base_lr, teacher_temp=teacher_temp, student_temp=student_temp, out_dim=out_dim)
        _check_range("momentum_teacher", momentum_teacher, 0.0, 1.0)
        _check_range("momentum_teacher_end", momentum_teacher_end, 0.0, 1.0)
        _check_range("drop_path_rate", drop_path_rate, 0.0, 1.0)
        if koleo_weight < 0:
            raise ValueError(f"koleo_weight must be >= 0, got {koleo_weight}")
        if pred_start_epoch < 0:
            raise ValueError(f"pred_start_epoch must be >= 0, got {pred_start_epoch}")
        if clip_grad < 0 or warmup_epochs < 0 or freeze_last_layer < 0 or warmup_teacher_temp_epochs < 0:
            raise ValueError(
                "clip_grad, warmup_epochs, freeze_last_layer and warmup_teacher_temp_epochs must be >= 0, got "
                f"{clip_grad}, {warmup_epochs}, {freeze_last_layer}, {warmup_teacher_temp_epochs}"
            )
        vit = ViTBackbone(
            backbone,
            img_size,
            patch_size,
            embed_dim,
            depth,
            num_heads,
            drop_path_rate,
            mask_token=self.uses_masks,
            mlp_ratio=mlp_ratio,
        )
        self.student = SSLNetwork(vit, ProjectionHead(vit.embed_dim, hidden_dim, out_dim))
        self.teacher = make_teacher(self.student)
        self._schedule_override: tuple[int, int] | None = None  # set_schedule_length
        self._schedule_from_trainer: tuple[int, int] | None = None  # derived once per fit

    # ------------------------------------------------------------------ what a method provides
    def add_prototypes(self, num_prototypes: int, norm_last_layer: bool) -> None:
        """Give the student a prototype layer (DINO / iBOT) and rebuild the teacher as its copy."""
        self.student.prototypes = PrototypeLayer(self.hparams.out_dim, num_prototypes, norm_last_layer)
        self.teacher = make_teacher(self.student)

    def prototype_biases(self, teacher_temp: float) -> tuple[Tensor | None, Tensor | None]:
        """vMF logit corrections ``log C_p(||w_k||/τ)`` of student (``τ_s``) and teacher (``τ_t``), or
        ``(None, None)`` when the method is not in vMF mode (§7.2)."""
        if not getattr(self, "vmf", False):
            return None, None
        d, method = self.hparams.out_dim, getattr(self, "vmf_approx", "approx")
        student = vmf_bias(full_tensor(self.student.prototypes.norms), d, self.hparams.student_temp, method)
        with torch.no_grad():
            teacher = vmf_bias(full_tensor(self.teacher.prototypes.norms), d, teacher_temp, method)
        return student, teacher

    def compute_losses(self, student: Embeddings, teacher: Embeddings, masks: Tensor | None, temp: float) -> dict:
        """``{"loss": total, ...named parts}`` in fp32 from the step's embeddings (method-specific)."""
        raise NotImplementedError

    # ------------------------------------------------------------------ schedules (§10.1)
    def set_schedule_length(self, total_steps: int, steps_per_epoch: int) -> None:
        """Fix ``T`` and the optimizer steps per epoch (by default both are read from the trainer at the
        start of each fit)."""
        if total_steps < 1 or steps_per_epoch < 1:
            raise ValueError(f"total_steps and steps_per_epoch must be >= 1, got {total_steps}, {steps_per_epoch}")
        self._schedule_override = (int(total_steps), int(steps_per_epoch))

    def refresh_schedule_length(self) -> None:
        """Read ``T`` from the trainer again at the next step (after ``max_steps`` changed during the fit,
        as :class:`~sop_lightning.callbacks.TimeBudget` does)."""
        self._schedule_from_trainer = None

    def _schedule_length(self) -> tuple[int, int]:
        if self._schedule_override is not None:
            return self._schedule_override
        if self._schedule_from_trainer is None:
            self._schedule_from_trainer = schedule_length(self.trainer)
        return self._schedule_from_trainer

    def rank_consistent_buffers(self) -> list[str]:
        """Names of the buffers every rank keeps identical by itself: the objectives' state outside student
        and teacher (memory banks written by all-gathered enqueues, centers updated from all-reduced
        means, seeded anchor sets). A subclass whose objective state is per rank must leave it out."""
        return [name for name, _ in self.named_buffers() if not name.startswith(("student.", "teacher."))]

    def setup(self, stage: str) -> None:
        precision = str(getattr(self._trainer, "precision", "32-true")) if self._trainer is not None else "32-true"
        if stage == "fit" and precision in ("bf16-true", "16-true", "bf16", "16"):
            raise ValueError(
                f"precision={precision!r} keeps the teacher in half precision, where the EMA update "
                f"(1 - m)·(student - teacher) with 1 - m <= {1 - self.hparams.momentum_teacher:.3g} falls below the "
                "resolution of the weights (bf16: 8 bits of mantissa) and the teacher stops moving; use "
                "precision='bf16-mixed' (or '16-mixed' on a GPU): the weights stay fp32, the matmuls run in half"
            )
        strategy = getattr(self._trainer, "strategy", None)
        if stage == "fit" and type(strategy).__name__ == "FSDPStrategy":
            raise ValueError(
                "strategy='fsdp' (FSDP1) is not supported: it flattens each wrapped unit's weights into one buffer, "
                "so the EMA teacher cannot be matched to the student shard by shard, and it was never run here. Use "
                "ModelParallelStrategy(data_parallel_size=<devices>, tensor_parallel_size=1) for FSDP2 (sharded "
                "student and teacher) or strategy='ddp'"
            )
        # DDP(broadcast_buffers=True) would resend these from rank 0 before every forward (~72 MB of SOP
        # banks at the paper sizes) although they are identical by construction (§5); student and teacher
        # buffers, if a backbone has any, are still broadcast.
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(self, self.rank_consistent_buffers())

    def configure_model(self) -> None:
        """Under ``ModelParallelStrategy`` (FSDP2): shard student and teacher with the same policy
        (:mod:`sop_lightning.sharding`), so the EMA runs on local shards; banks and centers stay replicated."""
        mesh = self.device_mesh
        if mesh is None or is_sharded(self.student):
            return
        dp_mesh = mesh["data_parallel"] if mesh.mesh_dim_names and "data_parallel" in mesh.mesh_dim_names else mesh
        if mesh.mesh_dim_names and "tensor_parallel" in mesh.mesh_dim_names and mesh["tensor_parallel"].size() > 1:
            raise ValueError(
                f"tensor_parallel_size={mesh['tensor_parallel'].size()}: the methods shard data-parallel only (FSDP2); "
                "use ModelParallelStrategy(data_parallel_size=<number of devices>, tensor_parallel_size=1) (its "
                "'auto' default puts all devices of a node into tensor_parallel)"
            )
        shard_network(self.student, dp_mesh)
        shard_network(self.teacher, dp_mesh)
        bad = shards_line_up(self.student, self.teacher)
        if bad:
            raise RuntimeError("student and teacher shards do not line up: " + "; ".join(bad[:5]))

    def on_fit_start(self) -> None:
        self.refresh_schedule_length()  # a new fit may have another trainer, loader or limits
        self._unchecked = []  # nothing left over from a fit that stopped between a step and its update

    def on_train_epoch_end(self) -> None:
        skipped = getattr(self.trainer.datamodule, "skipped_images", None)
        if skipped is not None:  # on_bad_image="skip": reads skipped so far, summed over ranks
            self.log("data/skipped_images", float(skipped), reduce_fx="sum", sync_dist=True)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["sop_lightning"] = {"method": type(self).__name__}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Refuse a checkpoint of another method or of another architecture with an error that names the
        difference, before Lightning's strict load reports a list of missing keys."""
        check_checkpoint_fits(self, checkpoint)
        resume_epoch_end_checkpoint(checkpoint)

    def on_fit_end(self) -> None:
        """Say so when training stops before the planned schedule ends (``max_time``, early stopping, a
        callback): lr, EMA momentum and teacher temperature then never reached their end values."""
        if not self.trainer.num_training_batches:
            return  # nothing was planned (limit_train_batches=0)
        try:
            total, _ = self._schedule_length()
        except ValueError:
            return  # no planned length (max_epochs = max_steps = -1) and no step ran
        step = self.trainer.global_step
        if step >= total:
            return
        timers = [cb for cb in self.trainer.callbacks if isinstance(cb, Timer)]
        reason = " because max_time was reached" if any((t.time_remaining() or 0) <= 0 for t in timers) else ""
        lr = self.optimizers().param_groups[0]["lr"] if self.trainer.optimizers else float("nan")
        rank_zero_warn(
            f"training stopped at step {step} of the {total} planned by the schedules{reason}: the learning rate "
            f"({lr:.3g}, end value {self.hparams.min_lr:.3g}), the EMA momentum ({self.momentum_at(step):.5f}, end "
            f"value {self.momentum_at(total - 1):.5f}) and the teacher temperature ({self.teacher_temp_at(step):.4g}, "
            f"end value {self.teacher_temp_at(total - 1):.4g}) never reached their end values. Resume from the last "
            "checkpoint (--ckpt_path last) to finish the schedule, or plan a run that fits the time budget "
            "(max_steps / max_epochs) so the schedules end where training stops.",
            category=UserWarning,
        )

    def global_batch_size(self, batch_size: int) -> int:
        trainer = self._trainer
        if trainer is None:
            return batch_size
        return batch_size * trainer.world_size * trainer.accumulate_grad_batches

    def lr_at(self, step: int, global_batch: int) -> float:
        total, per_epoch = self._schedule_length()
        hp = self.hparams
        warm = min(int(hp.warmup_epochs * per_epoch), total)
        return cosine_at(step, hp.base_lr * global_batch / 256, hp.min_lr, total, warm, 0.0)

    def weight_decay_at(self, step: int) -> float:
        total, _ = self._schedule_length()
        return cosine_at(step, self.hparams.weight_decay, self.hparams.weight_decay_end, total)

    def momentum_at(self, step: int) -> float:
        total, _ = self._schedule_length()
        return cosine_at(step, self.hparams.momentum_teacher, self.hparams.momentum_teacher_end, total)

    def teacher_temp_at(self, step: int, final: float | None = None, start_epoch: int = 0) -> float:
        """``τ_t`` at ``step``: warm-up from ``warmup_teacher_temp`` to ``final`` (default
        ``teacher_temp``), per iteration (SOP) or per epoch (DINO / iBOT), §10.1; held at
        ``warmup_teacher_temp`` before ``start_epoch`` (iBOT's patch temperature, §6.2)."""
        total, per_epoch = self._schedule_length()
        hp = self.hparams
        final = hp.teacher_temp if final is None else final
        if self.teacher_temp_per_iteration:
            warm = min(hp.warmup_teacher_temp_epochs * per_epoch, total)
            return cosine_at(step - start_epoch * per_epoch, final, final, total, warm, hp.warmup_teacher_temp)
        return epoch_warmup_at(
            step // per_epoch, hp.warmup_teacher_temp, final, hp.warmup_teacher_temp_epochs, start_epoch
        )

    # ------------------------------------------------------------------ Lightning hooks
    def configure_callbacks(self) -> list[L.Callback]:
        callbacks: list[L.Callback] = [EMATeacher()]
        # k-NN monitoring and collapse diagnostics, unless the user configured their own
        trainer = self._trainer
        for kind in (KNNEvaluation, Diagnostics):
            if trainer is None or not any(isinstance(cb, kind) for cb in trainer.callbacks):
                callbacks.append(kind())
        return callbacks

    def validation_step(self, batch: tuple[Tensor, ...], batch_idx: int, dataloader_idx: int = 0) -> dict:
        """Teacher features of the labelled k-NN splits (dataloader 0 = train, 1 = val), collected by
        :class:`~sop_lightning.callbacks.KNNEvaluation`."""
        images, labels, indices = batch
        return {"features": self.embed(images), "labels": labels, "indices": indices}

    def configure_optimizers(self) -> torch.optim.Optimizer:
        decay, no_decay = [], []
        for name, p in self.student.named_parameters():
            if not p.requires_grad:
                continue
            # §8.5: biases, 1-D tensors and weight-norm gains (shape (K, 1)) are not decayed.
            if name.endswith(".bias") or p.ndim <= 1 or name.endswith("weight_g"):
                no_decay.append(p)
            else:
                decay.append(p)
        groups = [
            {"params": decay, "weight_decay": self.hparams.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ]
        return torch.optim.AdamW(
            groups, lr=self.hparams.base_lr, betas=(0.9, 0.999), eps=1e-8, **adamw_kernel(decay + no_decay)
        )

    def training_step(self, batch: MultiCropBatch, batch_idx: int) -> Tensor:
        step = self.global_step
        lr = self.lr_at(step, self.global_batch_size(batch.batch_size))
        wd = self.weight_decay_at(step)
        temp = self.teacher_temp_at(step)
        optimizer = self.optimizers()
        for group in optimizer.param_groups:
            group["lr"] = lr
        optimizer.param_groups[0]["weight_decay"] = wd

        views = batch.views
        masks = batch.masks.flatten(0, 1) if self.uses_masks else None  # (2B, H', W')
        if masks is not None and self.current_epoch < self.hparams.pred_start_epoch:
            masks = torch.zeros_like(masks)
        with torch.no_grad():
            teacher = self.teacher(views[:2], return_patches=self.uses_patches)
        reshard(self.teacher)  # FSDP2: no backward will free the teacher's gathered weights
        with self._step_random_draws(step):
            student = self.student(views, masks=masks, return_patches=self.uses_patches)
        with torch.autocast(device_type=self.device.type, enabled=False):
            teacher = Embeddings(*(None if t is None else t.float() for t in teacher))
            student = Embeddings(*(None if s is None else s.float() for s in student))
            losses = self.compute_losses(student, teacher, masks, temp)
            if self.hparams.koleo_weight > 0:
                losses = self._add_koleo(losses, student.cls, teacher.cls.shape[0] // 2)
        loss = losses["loss"]
        names = list(losses)
        values = torch.stack([losses[k].detach() for k in names])
        if self.trainer.world_size > 1:  # the logged losses are the global batch's: one all-reduce for all
            values = self.trainer.strategy.reduce(values, reduce_op="mean")
        # checked before the optimizer step (after backward has been queued: no wait for the forward here); the
        # global batch's values, so a non-finite loss on any rank stops every rank at the same point
        self._unchecked.append((step, self.current_epoch, names, values))
        log = {f"train/{k}": v for k, v in zip(names, values)}
        every = self.trainer.log_every_n_steps  # the schedules only on the steps the logger writes: a call
        writes = every > 0 and (step + 1) % every == 0  # of self.log costs ~0.5 ms (Lightning), 4 % of a demo step
        if writes:
            log.update({"train/lr": lr, "train/weight_decay": wd, "train/teacher_temp": temp,
                        "train/momentum": self.momentum_at(step)})  # fmt: skip
        self.log_dict(log, on_step=True, on_epoch=False, batch_size=batch.batch_size)
        if writes or step == 0:  # the bar's loss follows the logger, as a host copy: Lightning turns a logged
            # progress-bar tensor into a number on every later step too, a host sync each step on a GPU
            loss_host = log["train/loss"].to("cpu")
            self.log("loss", loss_host, prog_bar=True, logger=False, batch_size=batch.batch_size)
        return loss

    def _add_koleo(self, losses: dict, student_cls: Tensor, batch: int) -> dict:
        """``losses`` with ``λ_KoLeo · KoLeo`` added: the mean over the two global views' chunks ``(B, d)`` of
        the student's [CLS] embeddings (§4.4). Under data parallelism each chunk is the global batch's (all
        ranks' rows, gradients flowing back to each), so the loss does not depend on the number of ranks."""
        chunks = [all_gather_with_grad(chunk) for chunk in student_cls[: 2 * batch].split(batch)]
        koleo = sum(koleo_loss(chunk) for chunk in chunks) / 2
        return {**losses, "loss": losses["loss"] + self.hparams.koleo_weight * koleo, "koleo_loss": koleo.detach()}

    @contextmanager
    def _step_random_draws(self, step: int) -> Iterator[None]:
        """The student's random draws (stochastic depth) of ``step`` come from a generator seeded by
        ``(seed, step, rank)``, so a resumed run redraws them exactly; the process's generators are restored
        afterwards."""
        if self.hparams.drop_path_rate <= 0:
            yield
            return
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):  # CPU, plus this rank's GPU
            seed = mix_seed(self.hparams.seed, 0x5D, step, self.global_rank)
            torch.manual_seed(seed)
            yield

    def configure_gradient_clipping(
        self,
        optimizer: torch.optim.Optimizer,
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str | None = None,
    ) -> None:
        clip = self.hparams.clip_grad
        if clip > 0:
            clip_per_tensor_(self.student.parameters(), clip)
        if gradient_clip_val:
            self.clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        self._check_finite()
        prototypes = self.student.prototypes
        if prototypes is not None and self.current_epoch < self.hparams.freeze_last_layer:
            for p in prototypes.parameters():
                p.grad = None

    def _check_finite(self) -> None:
        """Raise ``FloatingPointError`` naming the step and the non-finite terms if a loss since the last
        optimizer step is not finite: after its backward, before the update, the EMA, the banks' enqueue and any
        checkpoint of the step, so the last checkpoint is the last good step. One host read a step."""
        checks, self._unchecked = self._unchecked, []
        if not checks or bool(torch.isfinite(torch.cat([v for *_, v in checks])).all()):
            return
        step, epoch, names, values = next(c for c in checks if not bool(torch.isfinite(c[3]).all()))
        terms = ", ".join(f"{k}={float(v)}" for k, v in zip(names, values) if not torch.isfinite(v))
        where = " (the mean over ranks)" if self.trainer.world_size > 1 else ""
        raise FloatingPointError(
            f"non-finite loss at step {step} (epoch {epoch}): {terms}{where}. Training stopped before this step's "
            "update; the checkpoints already written are untouched (resume from the last one with a lower base_lr, "
            "a smaller clip_grad or bf16-mixed instead of 16-mixed)"
        )

    # ------------------------------------------------------------------ public helpers (API.md)
    def teacher_backbone(self) -> ViTBackbone:
        return self.teacher.backbone

    @torch.no_grad()
    def embed(self, images: Tensor, network: Literal["teacher", "student"] = "teacher") -> Tensor:
        """L2-normalised [CLS] features ``(B, D)`` after the final norm (§11.1), of the teacher (what the
        papers evaluate) or the student."""
        if network not in ("teacher", "student"):
            raise ValueError(f"network must be 'teacher' or 'student', got {network!r}")
        net = self.teacher if network == "teacher" else self.student
        return F.normalize(net([images], features=True).float(), dim=-1)

    def export_backbone(self, path: str | Path) -> dict[str, Any]:
        """Write the teacher backbone as a plain timm state dict; returns the ``timm.create_model``
        keyword arguments that load it with ``strict=True``."""
        backbone = self.teacher.backbone
        state = {k: full_tensor(v).detach().cpu().clone() for k, v in backbone.vit.state_dict().items()}
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        torch.save(state, path)
        return backbone.timm_kwargs()


def check_checkpoint_fits(model: L.LightningModule, checkpoint: dict[str, Any]) -> None:
    """Raise ``ValueError`` when ``checkpoint`` was written by another method than ``model``'s or holds
    tensors of other shapes (another ``embed_dim``, ``patch_size``, bank size, ...), naming the method,
    the differing tensors and the hyper-parameters that differ."""
    method = checkpoint.get("sop_lightning", {}).get("method")
    if method is not None and method != type(model).__name__:
        raise ValueError(
            f"the checkpoint was written by {method}, not {type(model).__name__}: load it with the config of a "
            f"{method} (class_path sop_lightning.{method}) and the architecture it was trained with"
        )
    state = checkpoint.get("state_dict")
    if state is None:
        return
    own = model.state_dict()
    problems = [f"{k}: checkpoint {tuple(state[k].shape)}, model {tuple(v.shape)}" for k, v in own.items()
                if k in state and hasattr(state[k], "shape") and tuple(state[k].shape) != tuple(v.shape)]  # fmt: skip
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if not (problems or missing or unexpected):
        return
    saved = checkpoint.get("hyper_parameters", {})
    differ = [f"{k}={saved[k]!r} (checkpoint) vs {v!r} (model)" for k, v in model.hparams.items()
              if k in saved and saved[k] != v and not callable(v)]  # fmt: skip
    lines = problems[:5] + [f"missing from the checkpoint: {k}" for k in missing[:3]]
    lines += [f"not in the model: {k}" for k in unexpected[:3]]
    raise ValueError(
        f"the checkpoint does not fit this {type(model).__name__} (another configuration): "
        + "; ".join(lines)
        + (f". Hyper-parameters that differ: {', '.join(differ)}" if differ else "")
        + ". Use the config the checkpoint was trained with."
    )


def schedule_length(trainer: L.Trainer) -> tuple[int, int]:
    """``(T, optimizer steps per epoch)`` of a fit: ``T`` is the trainer's estimate (``max_steps`` and
    ``max_epochs`` both honoured), the steps per epoch come from the real loader length after
    ``limit_train_batches`` and gradient accumulation, so ``step // per_epoch == current_epoch``."""
    total = trainer.estimated_stepping_batches  # sets the train loader up when needed
    if not math.isfinite(total):
        raise ValueError("set max_epochs or max_steps: the schedules need the run length")
    batches = trainer.num_training_batches
    if math.isfinite(batches):
        per_epoch = max(1, math.ceil(batches / trainer.accumulate_grad_batches))
    else:  # a loader without a length: the run is one long epoch
        per_epoch = max(1, int(total))
    return max(1, int(total)), per_epoch


@torch.no_grad()
def clip_per_tensor_(parameters, max_norm: float) -> None:
    """For every gradient ``g``: ``g ← g · min(1, c / (||g|| + 1e-6))`` (§2 step 8)."""
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return
    local = local_tensors(grads)  # FSDP2: each rank's shards; the norms need the whole tensors
    if any(t is not g for t, g in zip(local, grads)):
        squares = torch.stack([t.float().pow(2).sum() for t in local])
        norms = sum_over_shards_(squares, grads).sqrt()
    else:
        norms = torch.stack(torch._foreach_norm(grads))
    scales = (max_norm / (norms + 1e-6)).clamp(max=1.0)  # one op for all tensors, not one each
    torch._foreach_mul_(local, list(scales.unbind()))


def adamw_kernel(params: list[Tensor]) -> dict[str, bool]:
    """``{"fused": True}`` where every parameter is a plain floating-point tensor on a device with torch's fused
    AdamW kernel (CPU and CUDA): one kernel for all tensors; on CPU the default is a Python loop over them (8 ms
    of a demo step on 2 cores against 1 ms fused). Sharded (FSDP2 DTensor) parameters keep torch's default."""
    plain = all(
        type(p) in (Tensor, torch.nn.Parameter) and p.is_floating_point() and p.device.type in ("cpu", "cuda")
        for p in params
    )
    return {"fused": True} if plain and params else {}


def _check_positive(**values: float) -> None:
    for name, value in values.items():
        if not value > 0:
            raise ValueError(f"{name} must be > 0, got {value}")


def _check_range(name: str, value: float, lo: float, hi: float) -> None:
    if not lo <= value <= hi:
        raise ValueError(f"{name} must be in [{lo}, {hi}], got {value}")
