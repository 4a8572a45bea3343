"""Exact resume (issue 10.4), as users resume: ``sop-lightning fit ... --ckpt_path`` in a new process.

8 steps straight (5 steps per epoch, so the run crosses an epoch boundary) against 3 (mid-epoch), 5 (the
epoch's last batch) or 7 (mid-epoch 1) steps, a checkpoint, and the rest in another process with another
number of loader workers: student, teacher, banks with their pointers and ages, anchor sets, centers, the
optimizer state and the logged losses are bit-identical on CPU. Stochastic depth is on, so its draws are
replayed too."""

import pytest
import torch
from test_distributed_methods import fit

CASES = [("sop", 3), ("sop", 5), ("sop", 7), ("ibot_vmf", 3), ("dino", 5)]


@pytest.mark.parametrize("method, resume_step", CASES, ids=[f"{m}-from-step-{s}" for m, s in CASES])
def test_resumed_run_is_bit_identical_to_the_straight_run(method, resume_step, fake_fmnist, tmp_path):
    common = ["--data.init_args.batch_size", "4", "--trainer.max_steps", "8", "--trainer.max_epochs", "2",
              "--model.init_args.drop_path_rate", "0.2", "--model.init_args.depth", "2"]  # fmt: skip
    # depth 2: timm spreads drop_path_rate over the blocks from 0, so one block would have none
    every_step = ["--trainer.callbacks+=ModelCheckpoint", f"--trainer.callbacks.dirpath={tmp_path / 'steps'}",
                  "--trainer.callbacks.every_n_train_steps=1", "--trainer.callbacks.save_top_k=-1",
                  "--trainer.callbacks.filename={step}"]  # fmt: skip
    fit(method, fake_fmnist, tmp_path / "straight", *common, *every_step)
    ckpt = tmp_path / "steps" / f"step={resume_step}.ckpt"
    assert ckpt.exists(), sorted(p.name for p in (tmp_path / "steps").iterdir())
    resumed = fit(method, fake_fmnist, tmp_path / "resumed", *common, "--data.init_args.num_workers", "1",
                  "--ckpt_path", str(ckpt))  # fmt: skip
    assert "not resumable" not in resumed.stderr  # Lightning's warning for a loader that restarts the epoch
    straight, again = (torch.load(tmp_path / d / "rank0.pt") for d in ("straight", "resumed"))
    assert straight["step"] == again["step"] == 8
    assert straight["state"].keys() == again["state"].keys()
    for key, value in straight["state"].items():
        assert torch.equal(value, again["state"][key]), key
    _assert_same_optimizer(straight["optimizer"], again["optimizer"])
    assert straight["metrics"] == again["metrics"]


def _assert_same_optimizer(a: dict, b: dict) -> None:
    assert a["param_groups"] == b["param_groups"]
    for index, state in a["state"].items():
        for name, value in state.items():
            assert torch.equal(value, b["state"][index][name]), (index, name)
