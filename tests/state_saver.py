"""A callback the multi-process tests put into ``sop-lightning fit`` configs (``PYTHONPATH=tests``): every
rank writes what must agree across ranks, runs and resumes at the end of the fit."""

from pathlib import Path

import lightning as L
import torch


class SaveState(L.Callback):
    """Writes ``{out}/rank{r}.pt``: student and teacher weights, the objectives' buffers (banks, pointers,
    ages, anchor sets, centers), the optimizer state, the global step and the logged ``train/`` metrics."""

    def __init__(self, out: str):
        self.out = Path(out)
        self.initial: dict = {}

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.initial = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("train/")}
        optimizer = trainer.optimizers[0].state_dict()
        saved = {"state": state, "metrics": metrics, "step": trainer.global_step, "optimizer": optimizer,
                 "world_size": trainer.world_size, "initial": self.initial}  # fmt: skip
        torch.save(saved, self.out / f"rank{trainer.global_rank}.pt")
