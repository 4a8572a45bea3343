"""EMA teacher update (ALGORITHMS.md §2 step 11)."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from torch import nn

from ..sharding import local_tensors

__all__ = ["ema_update_", "EMATeacher"]


@torch.no_grad()
def ema_update_(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """``ξ ← m·ξ + (1 − m)·θ`` over the parameters present in both (matched by name)."""
    student_params = dict(student.named_parameters())
    pairs = [(t, student_params[n]) for n, t in teacher.named_parameters() if n in student_params]
    if not pairs:
        raise ValueError("teacher and student share no parameter names")
    # FSDP2: teacher and student are sharded alike (sharding.shards_line_up), so the update is local
    t_params = local_tensors(t for t, _ in pairs)
    s_params = local_tensors(s.detach() for _, s in pairs)
    try:
        torch._foreach_lerp_(t_params, s_params, 1.0 - momentum)
    except (RuntimeError, TypeError, NotImplementedError):  # e.g. mixed DTensor placements
        for t, s in zip(t_params, s_params):
            t.lerp_(s, 1.0 - momentum)


class EMATeacher(L.Callback):
    """Moves ``pl_module.teacher`` towards ``pl_module.student`` after every *real* optimizer step.

    The step counter is the trainer's global step, so with gradient accumulation the EMA runs once per
    optimizer step, with the momentum of that step (``pl_module.momentum_at(step)``).
    """

    def __init__(self) -> None:
        self.last_step = -1

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.last_step = trainer.global_step

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        step = trainer.global_step
        if step <= self.last_step:
            return  # accumulating: the optimizer did not step
        ema_update_(pl_module.teacher, pl_module.student, pl_module.momentum_at(step - 1))
        self.last_step = step

    def state_dict(self) -> dict[str, Any]:
        return {"last_step": self.last_step}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.last_step = state_dict.get("last_step", -1)
