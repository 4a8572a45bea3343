"""Run by tests/test_memory.py in a subprocess: two gloo ranks (spawned), results to a file.

1. Raw MemoryBank: different seeds per rank, broadcast, then enqueues of rank-specific rows
   (rank-major order, wrap-around).
2. A 2-process Lightning fit of a tiny SOP (ddp_spawn): every rank saves its banks at the end.
"""

import os
import sys

import lightning as L
import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def raw_bank(rank: int, world: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ["RAW_PORT"])
    dist.init_process_group("gloo", rank=rank, world_size=world)
    from sop_lightning.memory import MemoryBank

    bank = MemoryBank(10, 3, seed=100 + rank, track_indices=True)  # deliberately different start
    bank.broadcast_(0)
    start = bank.embeddings.clone()
    history = []
    for step in range(4):  # 3 rows per rank per step: 6 rows/step on a 10-row bank -> wraps
        rows = torch.full((3, 3), float(100 * step + 10 * rank)) + torch.arange(3.0).view(3, 1)
        bank.enqueue(rows, rows[:, 0].long())  # each row's "image index" is its value
        history.append((bank.embeddings.clone(), bank.ptr.clone(), bank.indices.clone()))
    torch.save({"start": start, "history": history}, os.path.join(out, f"raw_{rank}.pt"))
    dist.destroy_process_group()


def lightning_fit(out: str, root: str) -> None:
    from sop_lightning import SOP, SSLDataModule

    model = SOP(backbone="vit_tiny_patch16_224", embed_dim=32, depth=1, num_heads=2, hidden_dim=32, out_dim=16,
                img_size=28, patch_size=4, memory_size=64, patch_memory_size=32, num_anchors=8, num_neighbors=2,
                num_patch_anchors=4)  # fmt: skip
    L.seed_everything(0)  # the same seed on both ranks, without workers=True
    data = SSLDataModule(root=root, batch_size=3, num_workers=0, global_size=28, local_size=12, num_local=1,
                         patch_size=4, mask_ratio=0.3, mask_ratio_var=0.0)  # fmt: skip
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp_spawn", max_steps=3, limit_train_batches=3,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[SaveBanks(out)])  # fmt: skip
    trainer.fit(model, data)


class SaveBanks(L.Callback):
    def __init__(self, out):
        self.out = out
        self.first_masks = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self.first_masks is None:
            self.first_masks = batch.masks.clone()

    def on_train_end(self, trainer, pl_module):
        ddp = trainer.strategy.model  # the DistributedDataParallel wrapper
        torch.save(
            {"cls": pl_module.sop_loss.memory.embeddings.clone(), "ptr": pl_module.sop_loss.memory.ptr.clone(),
             "patch": pl_module.sop_mim_loss.memory.embeddings.clone(), "step": trainer.global_step,
             "ddp": type(ddp).__name__, "ddp_broadcast_buffers": sorted(ddp.named_module_buffers),
             "ddp_syncs_buffers": ddp.will_sync_module_buffers(), "first_masks": self.first_masks},
            os.path.join(self.out, f"fit_{trainer.global_rank}.pt"),
        )  # fmt: skip


if __name__ == "__main__":
    out, root = sys.argv[1], sys.argv[2]
    mp.spawn(raw_bank, args=(2, out), nprocs=2, join=True)
    lightning_fit(out, root)
