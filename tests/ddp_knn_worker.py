"""Run by tests/test_evaluation.py in a subprocess: k-NN validation on 2 gloo ranks (ddp_spawn) with
uneven shards (21 train / 7 val images), plus the raw variable-size all-gather."""

import json
import os
import sys

import lightning as L
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(__file__))
from conftest import write_fake_fmnist  # noqa: E402


def raw_gather(rank: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ["RAW_PORT"])
    dist.init_process_group("gloo", rank=rank, world_size=2)
    from sop_lightning.distributed import all_gather_varsize

    x = torch.arange(3 + 2 * rank, dtype=torch.float32).view(-1, 1) + 100 * rank  # 3 rows on rank 0, 5 on 1
    torch.save(all_gather_varsize(x), os.path.join(out, f"gather_{rank}.pt"))
    dist.destroy_process_group()


class Record(L.Callback):
    def __init__(self, out):
        self.out = out

    def on_validation_end(self, trainer, pl_module):
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/knn")}
        with open(os.path.join(self.out, f"knn_{trainer.world_size}_{trainer.global_rank}.json"), "w") as f:
            json.dump(metrics, f)


def knn_validate(out: str, root: str, devices: int) -> None:
    from sop_lightning import DINO, SSLDataModule

    torch.manual_seed(0)
    model = DINO(backbone="vit_tiny_patch16_224", img_size=28, patch_size=4, embed_dim=32, depth=1, num_heads=2,
                 hidden_dim=32, out_dim=16, num_prototypes=8)  # fmt: skip
    data = SSLDataModule(root=root, batch_size=2, num_workers=0, global_size=28, local_size=12, num_local=1,
                         patch_size=4, eval_resize_ratio=1.0)  # fmt: skip
    strategy = "ddp_spawn" if devices > 1 else "auto"
    trainer = L.Trainer(accelerator="cpu", devices=devices, strategy=strategy, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[Record(out)])  # fmt: skip
    trainer.validate(model, data, verbose=False)


if __name__ == "__main__":
    out = sys.argv[1]
    root = os.path.join(out, "data")
    os.makedirs(root, exist_ok=True)
    from pathlib import Path

    write_fake_fmnist(Path(root), n_train=21, n_test=7)
    mp.spawn(raw_gather, args=(out,), nprocs=2, join=True)
    knn_validate(out, root, devices=1)
    knn_validate(out, root, devices=2)
