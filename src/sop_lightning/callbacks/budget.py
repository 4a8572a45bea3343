"""Train for a wall-clock budget with schedules that end on time (ALGORITHMS.md §10.1 schedules).

Lightning's ``max_time`` stops a run where the clock says, in the middle of its lr, momentum and temperature
schedules, so a slower machine gets a run whose teacher never settled. :class:`TimeBudget` instead measures
the step time at the start of the fit and plans ``max_steps`` so that the planned run, and with it every
schedule, ends when the budget does. Step times drift during a run (a shared host, the loader's restart at
each epoch), so the plan is made again every ``replan_every`` steps from the latest steps' mean.
"""

from __future__ import annotations

import math
import time
from typing import Any

import lightning as L
from lightning.pytorch.utilities.rank_zero import rank_zero_debug, rank_zero_info

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
    (and ``max_epochs``, through the schedule length). Then every ``replan_every`` steps the plan is made
    again with the mean step time of those steps, so a machine that slows down (or speeds up) mid-run still
    ends on time: measured on a shared 2-core host, one run's step time went from 0.32 s at the start to
    0.43 s on average, 35 % over a plan made once. A re-plan moves the end of the schedules by the drift
    (cosines are functions of ``step / T``: small steps in lr and momentum, no restart). Validation time is
    not training time: it counts neither in the budget nor in the step times. Rank 0's plan is broadcast,
    so every rank stops at the same step. The method's schedules are re-read from the trainer at each
    change (the first ``calibration_steps`` ran on the config's length; warm-ups are in steps or epochs, so
    they are unchanged). The plan and the training time spent are checkpointed: a resumed fit keeps the
    plan and the rest of its budget instead of measuring again.

    From the command line::

        sop-lightning fit --config experiments/demo/sop.yaml \\
            --trainer.callbacks+=sop_lightning.callbacks.TimeBudget --trainer.callbacks.minutes=20

    Args:
        minutes: training wall clock to plan for.
        calibration_steps: optimizer steps timed (warm-up included) before the plan is made.
        warmup_steps: first steps left out of the median (allocator and loader warm-up).
        replan_every: optimizer steps between re-plans after the first plan (0: plan once).
    """

    def __init__(
        self, minutes: float, calibration_steps: int = 30, warmup_steps: int = 5, replan_every: int = 100
    ) -> None:
        if not (minutes > 0 and math.isfinite(minutes)):
            raise ValueError(f"minutes must be a positive finite number, got {minutes}")
        if warmup_steps < 0 or calibration_steps < warmup_steps + 2:
            raise ValueError(
                f"calibration_steps must be >= warmup_steps + 2 (two timed steps at least) and warmup_steps >= 0, "
                f"got calibration_steps={calibration_steps}, warmup_steps={warmup_steps}"
            )
        if replan_every < 0:
            raise ValueError(f"replan_every must be >= 0 (0: plan once), got {replan_every}")
        self.minutes, self.calibration_steps, self.warmup_steps = minutes, calibration_steps, warmup_steps
        self.replan_every = replan_every
        self.planned_steps: int | None = None
        self.seconds_per_step: float | None = None
        self._resumed_seconds = 0.0  # training seconds of the interrupted run a fit resumed from
        self._max_steps = -1  # the trainer's own cap
        self._reset_clock()

    def _reset_clock(self) -> None:
        self._since: float | None = None
        self._elapsed, self._last_step, self._last_time, self._gaps = self._resumed_seconds, -1, None, []
        self._plan_step = -1

    @property
    def train_seconds(self) -> float:
        """Training wall clock of this fit so far (validation left out; a resumed fit's earlier time in)."""
        return self._elapsed + (_clock() - self._since if self._since is not None else 0.0)

    # ------------------------------------------------------------------ clock (validation left out)
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._reset_clock()
        self._since, self._last_step, self._max_steps = _clock(), trainer.global_step, trainer.max_steps
        if self.planned_steps is not None:  # resumed: keep the plan of the interrupted run
            self._plan_step = trainer.global_step
            self._apply(trainer, pl_module)

    def _pause(self) -> None:
        if self._since is not None:
            self._elapsed += _clock() - self._since
            self._since = None

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._since is not None and trainer.state.fn == "fit":
            self._pause()
            self._last_time = None  # the gap across a validation is not a step time

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._since is None and trainer.state.fn == "fit" and self._last_step >= 0:  # not the sanity check
            self._since = _clock()

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._pause()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        step, now = trainer.global_step, _clock()
        if step <= self._last_step or (self.planned_steps is not None and not self.replan_every):
            return  # accumulating (the optimizer did not step), or planned once and for all
        if self._last_time is not None and step > self.warmup_steps:
            self._gaps.append((now - self._last_time) / (step - self._last_step))
        self._last_step, self._last_time = step, now
        if self.planned_steps is None:
            if len(self._gaps) >= self.calibration_steps - self.warmup_steps - 1:
                gaps = sorted(self._gaps)
                self._plan(trainer, pl_module, gaps[len(gaps) // 2], first=True)
        elif self.replan_every and step - self._plan_step >= self.replan_every and self._gaps:
            self._plan(trainer, pl_module, sum(self._gaps) / len(self._gaps), first=False)

    # ------------------------------------------------------------------ plan
    def _plan(self, trainer: L.Trainer, pl_module: L.LightningModule, per_step: float, first: bool) -> None:
        """Plan ``step + (budget − elapsed) / per_step`` (rank 0's, broadcast) and re-read the schedules
        if the plan changed; the step times of the next plan start here."""
        planned = trainer.global_step + steps_for_budget(self.minutes * 60 - self.train_seconds, per_step)
        if self._max_steps != -1:
            planned = min(planned, self._max_steps)
        planned, per_step = trainer.strategy.broadcast((planned, per_step), src=0)
        changed = planned != self.planned_steps
        self.planned_steps, self.seconds_per_step = int(planned), float(per_step)
        self._plan_step, self._gaps = trainer.global_step, []
        if changed:
            self._apply(trainer, pl_module)
        if first:
            rank_zero_info(
                f"TimeBudget: {per_step * 1000:.0f} ms a step, {self.planned_steps} steps planned for "
                f"{self.minutes:g} training minutes (the schedules end there; re-planned every "
                f"{self.replan_every} steps)"
            )
        elif changed:
            rank_zero_debug(f"TimeBudget: {per_step * 1000:.0f} ms a step, re-planned for {self.planned_steps} steps")

    def _apply(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        trainer.fit_loop.epoch_loop.max_steps = self.planned_steps
        refresh = getattr(pl_module, "refresh_schedule_length", None)
        if callable(refresh):
            refresh()

    def state_dict(self) -> dict[str, Any]:
        return {"minutes": self.minutes, "planned_steps": self.planned_steps, "seconds_per_step": self.seconds_per_step,
                "train_seconds": self.train_seconds}  # fmt: skip

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("minutes") == self.minutes:  # another budget: plan again
            self.planned_steps = state_dict.get("planned_steps")
            self.seconds_per_step = state_dict.get("seconds_per_step")
            self._resumed_seconds = float(state_dict.get("train_seconds", 0.0))
