"""``LinearProbe``: a linear classifier on a frozen teacher backbone (ALGORITHMS.md §11.2)."""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics.classification import MulticlassAccuracy

from ..backbones import ViTBackbone
from ..checkpoints import read_checkpoint_file, resume_epoch_end_checkpoint
from .export import load_teacher_backbone, teacher_backbone_state_dict

__all__ = ["LinearProbe"]


class LinearProbe(L.LightningModule):
    """Frozen ViT features → ``Linear(F, num_classes)`` (weight ``N(0, 0.01)``, bias 0), SGD with
    momentum 0.9 and cosine annealing to 0, lr = ``base_lr · global batch / 256``.

    Features (§11.2): the [CLS] tokens of the last ``n_last_blocks`` blocks, each after the final norm
    (ViT-S recipe: 4), optionally with the mean of the last block's patch tokens
    (``avgpool_patchtokens``, ViT-B/L recipe with ``n_last_blocks=1``).

    Args:
        checkpoint: a sop_lightning method checkpoint (a ``.ckpt`` file, or the folder of a distributed
            checkpoint written under FSDP2) or an exported timm state dict; the teacher backbone is loaded from
            it. ``None`` probes a randomly initialised backbone.
        backbone, img_size, patch_size, embed_dim, depth, num_heads, mlp_ratio: the ViT architecture (as in the
            method that produced the checkpoint).
        num_classes: classes of the labelled data.
    """

    def __init__(
        self,
        checkpoint: str | None = None,
        backbone: str = "vit_small_patch16_224",
        img_size: int | None = None,
        patch_size: int | None = None,
        embed_dim: int | None = None,
        depth: int | None = None,
        num_heads: int | None = None,
        mlp_ratio: float | None = None,
        num_classes: int = 1000,
        n_last_blocks: int = 4,
        avgpool_patchtokens: bool = False,
        base_lr: float = 1e-3,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
    ):
        super().__init__()
        self.save_hyperparameters()
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes}")
        if base_lr <= 0:
            raise ValueError(f"base_lr must be > 0, got {base_lr}")
        if checkpoint is not None:
            _check_exists(checkpoint)  # before the ViT is built and n_last_blocks checked against it
        self.backbone = ViTBackbone(
            backbone, img_size, patch_size, embed_dim, depth, num_heads, mask_token=False, mlp_ratio=mlp_ratio
        )
        if not 1 <= n_last_blocks <= len(self.backbone.vit.blocks):
            raise ValueError(f"n_last_blocks must be in [1, {len(self.backbone.vit.blocks)}], got {n_last_blocks}")
        if checkpoint is not None:
            self.load_backbone(checkpoint)
        else:
            warnings.warn("LinearProbe without checkpoint: probing a randomly initialised backbone", stacklevel=2)
        self.backbone.requires_grad_(False).eval()
        dim = self.backbone.embed_dim * (n_last_blocks + int(avgpool_patchtokens))
        self.classifier = nn.Linear(dim, num_classes)
        nn.init.normal_(self.classifier.weight, std=0.01)
        nn.init.zeros_(self.classifier.bias)
        self.val_top1 = MulticlassAccuracy(num_classes, top_k=1, average="micro")
        self.val_top5 = MulticlassAccuracy(num_classes, top_k=min(5, num_classes), average="micro")

    def load_backbone(self, path: str) -> None:
        """The teacher ViT of a method checkpoint (file or distributed-checkpoint folder), or an exported timm
        state dict, into the frozen backbone (``strict=True``)."""
        _check_exists(path)
        if Path(path).is_dir():
            state, _ = load_teacher_backbone(path)
        else:
            obj = read_checkpoint_file(path)  # a method checkpoint or an exported state dict
            state = teacher_backbone_state_dict(obj["state_dict"]) if "state_dict" in obj else obj
        self.backbone.vit.load_state_dict(state, strict=True)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        resume_epoch_end_checkpoint(checkpoint)  # a probe stopped mid-epoch resumes where it stopped

    def train(self, mode: bool = True) -> LinearProbe:
        super().train(mode)
        self.backbone.eval()  # frozen: no drop-path, no dropout
        return self

    @torch.no_grad()
    def features(self, x: Tensor) -> Tensor:
        hp = self.hparams
        blocks = self.backbone.last_blocks(x, hp.n_last_blocks)
        feats = [t[:, 0] for t in blocks]
        if hp.avgpool_patchtokens:
            feats.append(blocks[-1][:, self.backbone.num_prefix_tokens :].mean(1))
        return torch.cat(feats, dim=-1).float()

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x))

    def training_step(self, batch: tuple[Tensor, ...], batch_idx: int) -> Tensor:
        images, labels = batch[0], batch[1]
        loss = F.cross_entropy(self(images), labels)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: tuple[Tensor, ...], batch_idx: int) -> None:
        images, labels = batch[0], batch[1]
        logits = self(images)
        self.val_top1(logits, labels)
        self.val_top5(logits, labels)
        self.log("val/loss", F.cross_entropy(logits, labels), sync_dist=True)
        self.log("val/linear_top1", self.val_top1, prog_bar=True)
        self.log("val/linear_top5", self.val_top5)

    def configure_optimizers(self):
        trainer = self.trainer
        batch = getattr(trainer.datamodule, "batch_size", 256) if trainer.datamodule is not None else 256
        lr = self.hparams.base_lr * batch * trainer.world_size * trainer.accumulate_grad_batches / 256
        opt = torch.optim.SGD(
            self.classifier.parameters(), lr=lr, momentum=self.hparams.momentum, weight_decay=self.hparams.weight_decay
        )
        total = trainer.estimated_stepping_batches
        total = int(total) if math.isfinite(total) else 1
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, total), eta_min=0.0)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def _check_exists(checkpoint: str) -> None:
    if not Path(checkpoint).exists():
        raise ValueError(
            f"checkpoint={checkpoint!r} is not a file or folder (a method checkpoint, a distributed-checkpoint "
            "folder or an exported timm state dict)"
        )
