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
        self.initial = _full(pl_module.state_dict())

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        state = _full(pl_module.state_dict())
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("train/")}
        optimizer = trainer.optimizers[0].state_dict()
        optimizer["state"] = {i: _full(v) for i, v in optimizer["state"].items()}
        saved = {"state": state, "metrics": metrics, "step": trainer.global_step, "optimizer": optimizer,
                 "world_size": trainer.world_size, "initial": self.initial,
                 "params": [n for n, _ in pl_module.named_parameters()],
                 "sharded": [n for n, p in pl_module.named_parameters() if type(p).__name__ == "DTensor"]}  # fmt: skip
        torch.save(saved, self.out / f"rank{trainer.global_rank}.pt")


def _full(state: dict) -> dict:
    """Whole tensors (FSDP2 shards gathered: every rank calls this) detached and copied."""
    from torch.distributed.tensor import DTensor

    return {k: (v.full_tensor() if isinstance(v, DTensor) else v).detach().clone() if torch.is_tensor(v) else v
            for k, v in state.items()}  # fmt: skip


class StopAt(L.Callback):
    """Stops the fit after ``step`` optimizer steps the way ``max_time`` does (``trainer.should_stop`` at the
    end of a training batch), so the schedules stay planned for the whole run."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_end(self, trainer: L.Trainer, *args) -> None:
        if trainer.global_step >= self.step:
            trainer.should_stop = True
