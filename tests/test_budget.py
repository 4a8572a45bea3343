"""TimeBudget: max_steps planned from the measured step time, schedules ending with the plan.

The callback reads a clock that these tests drive (each step and validation advances it by a known
amount), so the plans are exact whatever the machine's speed or load."""

import math
import warnings

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from sop_lightning import DINO, SSLDataModule
from sop_lightning.callbacks import TimeBudget
from sop_lightning.callbacks import budget as budget_module
from sop_lightning.callbacks.budget import steps_for_budget

TINY = dict(backbone="vit_tiny_patch16_224", img_size=28, patch_size=4, embed_dim=32, depth=1, num_heads=2,
            hidden_dim=64, out_dim=16, num_prototypes=32)  # fmt: skip


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch):
    c = Clock()
    monkeypatch.setattr(budget_module, "_clock", c)
    return c


class Ticking(L.LightningModule):
    """Each training step takes ``step_s`` of the test clock, each validation batch ``val_s``."""

    def __init__(self, clock: Clock, step_s: float, val_s: float = 0.0):
        super().__init__()
        self.layer, self.clock, self.step_s, self.val_s, self.refreshed = torch.nn.Linear(2, 1), clock, step_s, val_s, 0

    def training_step(self, batch, batch_idx):
        self.clock.now += self.step_s
        return self.layer(batch[0]).sum()

    def validation_step(self, batch, batch_idx):
        self.clock.now += self.val_s

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)

    def refresh_schedule_length(self):
        self.refreshed += 1


def _loader(n=8):
    return DataLoader(TensorDataset(torch.zeros(n, 2)), batch_size=1)


def _trainer(**kw):
    args = dict(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                enable_model_summary=False, max_epochs=-1, max_steps=10_000, num_sanity_val_steps=0)  # fmt: skip
    args.update(kw)
    return L.Trainer(**args)


def test_steps_for_budget():
    assert steps_for_budget(10.0, 0.3) == 33 and steps_for_budget(-1.0, 0.3) == 0
    with pytest.raises(ValueError, match=r"seconds_per_step must be a positive finite number, got 0"):
        steps_for_budget(1.0, 0)


def test_bad_arguments():
    with pytest.raises(ValueError, match=r"minutes must be a positive finite number, got 0"):
        TimeBudget(minutes=0)
    with pytest.raises(ValueError, match=r"calibration_steps must be >= warmup_steps \+ 2.*got calibration_steps=6"):
        TimeBudget(minutes=1, calibration_steps=6, warmup_steps=5)
    with pytest.raises(ValueError, match=r"replan_every must be >= 0 \(0: plan once\), got -1"):
        TimeBudget(minutes=1, replan_every=-1)


class SlowingDown(Ticking):
    """0.02 s steps up to step 20, then 0.04 s: a machine that slows down after the first plan."""

    def training_step(self, batch, batch_idx):
        self.step_s = 0.02 if self.global_step < 20 else 0.04
        return super().training_step(batch, batch_idx)


@pytest.mark.parametrize("replan_every", [0, 10])
def test_replanning_ends_on_time_when_the_machine_slows_down(clock, replan_every):
    # budget 8 s. Planned once at step 9 from 0.02 s steps: 9 + (8 - 0.18) / 0.02 = 400 steps, which take
    # 20 x 0.02 + 380 x 0.04 = 15.6 s. Re-planned every 10 steps from their mean, the run ends within one
    # window of the budget: 20 x 0.02 + n x 0.04 = 8 s at n = 190, i.e. 210 steps
    budget = TimeBudget(8 / 60, calibration_steps=10, warmup_steps=2, replan_every=replan_every)
    model = SlowingDown(clock, step_s=0.02)
    _trainer(callbacks=[budget], limit_val_batches=0).fit(model, _loader())
    if replan_every == 0:
        assert budget.planned_steps == model.trainer.global_step in (399, 400)  # floor of a float division
        assert clock.now == pytest.approx(20 * 0.02 + (model.trainer.global_step - 20) * 0.04)
    else:
        assert abs(clock.now - 8.0) <= 10 * 0.04 and abs(model.trainer.global_step - 210) <= 10
        assert budget.seconds_per_step == pytest.approx(0.04) and model.refreshed > 1
    assert budget.train_seconds == pytest.approx(clock.now)  # the clock stops with the fit


def test_plan_leaves_validation_out_of_the_budget_and_the_step_times(clock):
    # 0.02 s steps, a 0.3 s validation after steps 4 and 8. The step times are the gaps between steps 3-4,
    # 4-5 (no: a validation), 6-7, ...: the 7th timed gap comes at step 11, after 11 x 0.02 s of training,
    # so the plan is 11 + (1.5 - 0.22) / 0.02 = 75; counting the validations' 0.6 s would plan 45
    model, budget = Ticking(clock, step_s=0.02, val_s=0.3), TimeBudget(1.5 / 60, calibration_steps=10, warmup_steps=2)
    trainer = _trainer(callbacks=[budget], val_check_interval=4, check_val_every_n_epoch=None, limit_val_batches=1)
    trainer.fit(model, _loader(), _loader(2))
    assert budget.seconds_per_step == pytest.approx(0.02)
    assert budget.planned_steps in (74, 75) and trainer.global_step == budget.planned_steps
    assert model.refreshed == 1  # the schedules were re-read once, when the plan was made


def test_plan_is_capped_by_max_steps_and_kept_on_resume(clock):
    budget = TimeBudget(minutes=10, calibration_steps=4, warmup_steps=1)
    trainer = _trainer(callbacks=[budget], max_steps=12, limit_val_batches=0)
    trainer.fit(Ticking(clock, step_s=0.1), _loader())
    assert budget.planned_steps == 12 and trainer.global_step == 12
    assert budget.state_dict()["train_seconds"] == pytest.approx(1.2)
    resumed = TimeBudget(minutes=10, calibration_steps=1000)  # would never calibrate by itself
    resumed.load_state_dict({**budget.state_dict(), "planned_steps": 7})
    trainer = _trainer(callbacks=[resumed], limit_val_batches=0)
    model = Ticking(clock, step_s=0.1)
    trainer.fit(model, _loader())
    assert trainer.global_step == 7 and model.refreshed == 1
    assert resumed.train_seconds == pytest.approx(1.2 + 0.1 * 7)  # the budget spent before the resume counts
    other = TimeBudget(minutes=5)
    other.load_state_dict(budget.state_dict())  # another budget: plans again
    assert other.planned_steps is None


def test_method_schedules_end_with_the_plan(fake_fmnist, clock):
    data = SSLDataModule(root=str(fake_fmnist), batch_size=4, num_workers=0, global_size=28, local_size=12,
                         num_local=0, patch_size=4, masking=False)  # fmt: skip
    model = DINO(momentum_teacher=0.9, momentum_teacher_end=0.99, **TINY)

    class Tick(L.Callback):  # each step takes 0.25 s of the test clock
        def on_train_batch_start(self, *args):
            clock.now += 0.25

    budget = TimeBudget(minutes=5 / 60, calibration_steps=6, warmup_steps=1)  # plan: 5 + (5 - 1.25) / 0.25 = 20
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _trainer(callbacks=[Tick(), budget], max_steps=100_000, limit_val_batches=0).fit(model, data)
    assert not [w for w in caught if "planned by the schedules" in str(w.message)]
    total, _ = model._schedule_length()
    assert total == budget.planned_steps == model.trainer.global_step == 20
    last = 0.99 + (0.9 - 0.99) * 0.5 * (1 + math.cos(math.pi * (total - 1) / total))  # cosine over the plan
    assert model.momentum_at(total - 1) == pytest.approx(last)
