"""Train for a wall-clock budget with schedules that end on time (ALGORITHMS.md §10.1 schedules).

Lightning's ``max_time`` stops a run where the clock says, in the middle of its lr, momentum and temperature
schedules, so a slower machine gets a run whose teacher never settled. :class:`TimeBudget` instead measures
the step time at the start of the fit and plans ``max_steps`` so that the planned run, and with it every
schedule, ends when the budget does.
"""

from __future__ import annotations

import math
import time
from typing import Any

import lightning as L
from lightning.pytorch.utilities import rank_zero_info

__all__ = ["TimeBudget", "steps_for_budget"]

_clock = time.perf_counter  # the training clock (a module global, so tests can drive it)


def steps_for_budget(seconds_left: float, seconds_per_step: float) -> int:
    """Whole steps that fit in ``seconds_left`` at ``seconds_per_step`` (never negative)."""
    if seconds_per_step <= 0 or not math.isfinite(seconds_per_step):
        raise ValueError(f"seconds_per_step must be a positive finite number, got {seconds_per_step}")
    return max(0, int(seconds_left // seconds_per_step))


class TimeBudget(L.Callback):
    """Plans ``max_steps`` of a fit for ``minutes`` of training.

    The first ``warmup_steps`` optimizer steps are not timed; after ``calibration_steps`` the median step
    time sets the plan ``step + (budget − elapsed) / median``, capped by the trainer's own ``max_steps``
    (and ``max_epochs``, through the schedule length). Validation time is not training time: it counts
    neither in the budget nor in the step times. Rank 0's plan is broadcast, so every rank stops at the
    same step. The method's schedules are re-read from the trainer right away (the first
    ``calibration_steps`` ran on the config's length; warm-ups are in steps or epochs, so they are unchanged).
    The plan is checkpointed: a resumed fit keeps it instead of measuring again.

    From the command line::

        sop-lightning fit --config experiments/demo/sop.yaml \\
            --trainer.callbacks+=sop_lightning.callbacks.TimeBudget --trainer.callbacks.minutes=20

    Args:
        minutes: training wall clock to plan for.
        calibration_steps: optimizer steps timed (warm-up included) before the plan is made.
        warmup_steps: first steps left out of the median (allocator and loader warm-up).
    """

    def __init__(self, minutes: float, calibration_steps: int = 30, warmup_steps: int = 5) -> None:
        if not (minutes > 0 and math.isfinite(minutes)):
            raise ValueError(f"minutes must be a positive finite number, got {minutes}")
        if warmup_steps < 0 or calibration_steps < warmup_steps + 2:
            raise ValueError(
                f"calibration_steps must be >= warmup_steps + 2 (two timed steps at least) and warmup_steps >= 0, "
                f"got calibration_steps={calibration_steps}, warmup_steps={warmup_steps}"
            )
        self.minutes, self.calibration_steps, self.warmup_steps = minutes, calibration_steps, warmup_steps
        self.planned_steps: int | None = None
        self.seconds_per_step: float | None = None
        self._reset_clock()

    def _reset_clock(self) -> None:
        self._since: float | None = None
        self._elapsed, self._last_step, self._last_time, self._gaps = 0.0, -1, None, []

    # ------------------------------------------------------------------ clock (validation left out)
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._reset_clock()
        self._since, self._last_step = _clock(), trainer.global_step
        if self.planned_steps is not None:  # resumed: keep the plan of the interrupted run
            self._apply(trainer, pl_module)

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._since is not None and trainer.state.fn == "fit":
            self._elapsed += _clock() - self._since
            self._since, self._last_time = None, None  # the gap across a validation is not a step time

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._since is None and trainer.state.fn == "fit" and self._last_step >= 0:  # not the sanity check
            self._since = _clock()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        step, now = trainer.global_step, _clock()
        if self.planned_steps is not None or step <= self._last_step:
            return  # planned (nothing more to time), or accumulating: the optimizer did not step
        if self._last_time is not None and step > self.warmup_steps:
            self._gaps.append((now - self._last_time) / (step - self._last_step))
        self._last_step, self._last_time = step, now
        if len(self._gaps) >= self.calibration_steps - self.warmup_steps - 1:
            self._plan(trainer, pl_module, now)

    # ------------------------------------------------------------------ plan
    def _plan(self, trainer: L.Trainer, pl_module: L.LightningModule, now: float) -> None:
        gaps = sorted(self._gaps)
        per_step = gaps[len(gaps) // 2]
        elapsed = self._elapsed + (now - self._since if self._since is not None else 0.0)
        planned = trainer.global_step + steps_for_budget(self.minutes * 60 - elapsed, per_step)
        if trainer.max_steps != -1:
            planned = min(planned, trainer.max_steps)
        planned, per_step = trainer.strategy.broadcast((planned, per_step), src=0)
        self.planned_steps, self.seconds_per_step = int(planned), float(per_step)
        self._apply(trainer, pl_module)
        rank_zero_info(
            f"TimeBudget: {per_step * 1000:.0f} ms a step, {self.planned_steps} steps planned for {self.minutes:g} "
            f"training minutes (the schedules end there)"
        )

    def _apply(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        trainer.fit_loop.epoch_loop.max_steps = self.planned_steps
        refresh = getattr(pl_module, "refresh_schedule_length", None)
        if callable(refresh):
            refresh()

    def state_dict(self) -> dict[str, Any]:
        return {"minutes": self.minutes, "planned_steps": self.planned_steps, "seconds_per_step": self.seconds_per_step}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("minutes") == self.minutes:  # another budget: plan again
            self.planned_steps = state_dict.get("planned_steps")
            self.seconds_per_step = state_dict.get("seconds_per_step")
