"""Exact resume (issue 10.4), as users resume: ``sop-lightning fit ... --ckpt_path`` in a new process.

8 steps straight (5 steps per epoch, so the run crosses an epoch boundary) against 3 (mid-epoch), 5 (the
epoch's last batch) or 7 (mid-epoch 1) steps, a checkpoint, and the rest in another process with another
number of loader workers: student, teacher, banks with their pointers and ages, anchor sets, centers, the
optimizer state and the logged losses are bit-identical on CPU. Stochastic depth is on, so its draws are
replayed too. One straight run per method; its resumes run side by side (most of a tiny fit is its
process's start-up)."""

import pytest
import torch
from test_distributed_methods import finish, finish_all, fit, start

CASES = {"sop": (3, 5, 7), "ibot_vmf": (3,), "dino": (5,)}


@pytest.mark.parametrize("method, resume_steps", CASES.items(),
                         ids=[f"{m}-from-step-{'-'.join(map(str, s))}" for m, s in CASES.items()])  # fmt: skip
def test_resumed_run_is_bit_identical_to_the_straight_run(method, resume_steps, fake_fmnist, tmp_path):
    common = ["--data.init_args.batch_size", "4", "--trainer.max_steps", "8", "--trainer.max_epochs", "2",
              "--model.init_args.drop_path_rate", "0.2", "--model.init_args.depth", "2"]  # fmt: skip
    # depth 2: timm spreads drop_path_rate over the blocks from 0, so one block would have none
    every_step = ["--trainer.callbacks+=ModelCheckpoint", f"--trainer.callbacks.dirpath={tmp_path / 'steps'}",
                  "--trainer.callbacks.every_n_train_steps=1", "--trainer.callbacks.save_top_k=-1",
                  "--trainer.callbacks.filename={step}"]  # fmt: skip
    fit(method, fake_fmnist, tmp_path / "straight", *common, *every_step)
    straight = torch.load(tmp_path / "straight" / "rank0.pt")
    assert straight["step"] == 8
    checkpoints = [tmp_path / "steps" / f"step={step}.ckpt" for step in resume_steps]
    for ckpt in checkpoints:
        assert ckpt.exists(), sorted(p.name for p in (tmp_path / "steps").iterdir())
    procs = [start(method, fake_fmnist, tmp_path / f"resumed{step}", *common, "--data.init_args.num_workers", "1",
                   "--ckpt_path", str(ckpt)) for step, ckpt in zip(resume_steps, checkpoints)]  # fmt: skip
    finish_all(*procs)
    for step, proc in zip(resume_steps, procs):
        resumed = finish(proc)  # already ended: reads its logs
        assert "not resumable" not in resumed.stderr  # Lightning's warning for a loader that restarts the epoch
        again = torch.load(tmp_path / f"resumed{step}" / "rank0.pt")
        assert again["step"] == 8, f"resumed from step {step}"
        assert straight["state"].keys() == again["state"].keys()
        for key, value in straight["state"].items():
            assert torch.equal(value, again["state"][key]), (step, key)
        _assert_same_optimizer(straight["optimizer"], again["optimizer"])
        assert straight["metrics"] == again["metrics"], f"resumed from step {step}"


def test_last_ckpt_of_a_fit_stopped_mid_epoch_or_at_the_epoch_end_resumes_exactly(fake_fmnist, tmp_path):
    """The configs' ``last.ckpt`` (``save_on_train_epoch_end``) of a fit stopped as ``max_time`` stops it
    (``should_stop`` after step 3, mid-epoch, and after step 5, the epoch's last batch, which is also every
    epoch-end ``last.ckpt``): resumed, the run reaches ``max_steps`` with the uninterrupted run's state.
    Lightning alone resumes inside the finished epoch and counts it twice: 5 and 6 steps, not 8."""
    common = ["--data.init_args.batch_size", "4", "--trainer.max_steps", "8", "--trainer.max_epochs", "2",
              "--model.init_args.drop_path_rate", "0.2", "--model.init_args.depth", "2"]  # fmt: skip
    stops = (3, 5)
    finish_all(start("sop", fake_fmnist, tmp_path / "straight", *common),
               *(start("sop", fake_fmnist, tmp_path / f"stopped{step}", *common,
                       "--trainer.callbacks+=state_saver.StopAt", f"--trainer.callbacks.step={step}")
                 for step in stops))  # fmt: skip
    for step in stops:
        assert torch.load(tmp_path / f"stopped{step}" / "rank0.pt")["step"] == step
    finish_all(*(start("sop", fake_fmnist, tmp_path / f"resumed{step}", *common, "--ckpt_path",
                       str(tmp_path / f"stopped{step}" / "checkpoints" / "last.ckpt")) for step in stops))  # fmt: skip
    straight = torch.load(tmp_path / "straight" / "rank0.pt")
    for step in stops:
        again = torch.load(tmp_path / f"resumed{step}" / "rank0.pt")
        assert again["step"] == straight["step"] == 8, f"stopped at {step}"
        for key, value in straight["state"].items():
            assert torch.equal(value, again["state"][key]), (step, key)
        _assert_same_optimizer(straight["optimizer"], again["optimizer"])
        assert straight["metrics"] == again["metrics"], f"stopped at {step}"


def _assert_same_optimizer(a: dict, b: dict) -> None:
    assert a["param_groups"] == b["param_groups"]
    for index, state in a["state"].items():
        for name, value in state.items():
            assert torch.equal(value, b["state"][index][name]), (index, name)
