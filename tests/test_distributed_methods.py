"""Every method under ``--trainer.strategy ddp_spawn --trainer.devices 2`` (CPU, gloo), run as users run it:
the installed ``sop-lightning`` executable in a subprocess. Both ranks must end with identical teachers,
banks, anchors and centers, and 2 ranks x batch 4 must give the teacher 1 process x batch 8 gives (the
same global batches in the same order, :class:`~sop_lightning.data.sampler.GlobalBatchSampler`): nothing
is counted twice or missed. The logged losses are the global batch's (reduced over the ranks)."""

import contextlib
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import write_fake_fmnist

from sop_lightning.cli import main
from sop_lightning.evaluation import LinearProbe

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
METHODS = {
    "sop": ["--model.init_args.memory_size", "64", "--model.init_args.patch_memory_size", "32",
            "--model.init_args.num_anchors", "8", "--model.init_args.num_neighbors", "2",
            "--model.init_args.num_patch_anchors", "4"],
    "dino": ["--model.init_args.num_prototypes", "16"],
    "ibot": ["--model.init_args.num_prototypes", "16"],
    "dino_vmf": ["--model.init_args.num_prototypes", "16"],
    "ibot_vmf": ["--model.init_args.num_prototypes", "16"],
}  # fmt: skip


def _executable() -> str:
    return str(Path(sys.executable).parent / "sop-lightning")


def start(method: str, root: Path, out: Path, *extra: str) -> subprocess.Popen:
    """Starts a tiny ``sop-lightning fit`` of the demo config of ``method``; every rank saves its state to
    ``out``. Independent fits run side by side (most of a tiny fit is its processes' start-up)."""
    args = [
        _executable(), "fit", "--config", str(ROOT / "experiments" / "demo" / f"{method}.yaml"),
        "--seed_everything", "0",
        "--data.init_args.root", str(root), "--data.init_args.num_workers", "0",
        "--data.init_args.augmentation_seed", "3", "--data.init_args.num_local", "2",
        "--model.init_args.embed_dim", "32", "--model.init_args.depth", "1", "--model.init_args.num_heads", "2",
        "--model.init_args.hidden_dim", "32", "--model.init_args.out_dim", "16",
        "--trainer.logger", "false", "--trainer.enable_progress_bar", "false", "--trainer.max_time", "null",
        "--trainer.default_root_dir", str(out), "--trainer.check_val_every_n_epoch", "1000",
        "--trainer.callbacks+=state_saver.SaveState", f"--trainer.callbacks.out={out}",
        *METHODS[method], *extra,
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(HERE), "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    logs = [out.parent / f"{out.name}.{name}" for name in ("stdout", "stderr")]  # files: no pipe fills up
    with open(logs[0], "w") as stdout, open(logs[1], "w") as stderr:  # the child keeps its own descriptors
        proc = subprocess.Popen(
            args, cwd=out.parent, env=env, stdout=stdout, stderr=stderr, start_new_session=True
        )  # its own process group: a kill reaches the spawned ranks
    proc.logs = logs
    return proc


def finish(proc: subprocess.Popen, timeout: int = 240) -> subprocess.CompletedProcess:
    """Waits for a fit of :func:`start` (killed after ``timeout`` seconds) and asserts its exit status 0."""
    try:
        proc.wait(timeout=timeout)
        failure = None if proc.returncode == 0 else f"exit {proc.returncode}"
    except subprocess.TimeoutExpired:
        _kill(proc)
        failure = f"timed out after {timeout} s"
    stdout, stderr = (log.read_text() for log in proc.logs)
    assert failure is None, f"{failure}\n{stdout[-2000:]}\n{stderr[-5000:]}"
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


def _kill(proc: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def finish_all(*procs: subprocess.Popen) -> None:
    """:func:`finish` each fit; a failure kills the others before it is raised."""
    try:
        for proc in procs:
            finish(proc)
    finally:
        for proc in procs:
            if proc.poll() is None:
                _kill(proc)


def fit(method: str, root: Path, out: Path, *extra: str, timeout: int = 240) -> subprocess.CompletedProcess:
    """A tiny ``sop-lightning fit`` (:func:`start`), waited for."""
    return finish(start(method, root, out, *extra), timeout)


@pytest.fixture(scope="module")
def two_rank_runs(tmp_path_factory) -> dict[str, tuple[Path, list[subprocess.Popen]]]:
    """For every method, 1 process x batch 8 and ``ddp_spawn`` 2 ranks x batch 4, all started side by side
    (most of a tiny fit is its processes' start-up)."""
    root = write_fake_fmnist(tmp_path_factory.mktemp("fmnist"))
    steps = ["--trainer.max_steps", "3", "--trainer.max_epochs", "1"]
    runs = {}
    for method in METHODS:
        out = tmp_path_factory.mktemp(method)
        runs[method] = out, [
            start(method, root, out / "one", "--data.init_args.batch_size", "8", *steps),
            start(method, root, out / "two", "--data.init_args.batch_size", "4", *steps,
                  "--trainer.strategy", "ddp_spawn", "--trainer.devices", "2"),
        ]  # fmt: skip
    yield runs
    for _, procs in runs.values():
        for proc in procs:
            if proc.poll() is None:
                _kill(proc)


@pytest.mark.ddp
@pytest.mark.parametrize("method", list(METHODS))
def test_two_ranks_match_one_process_on_the_same_global_batch(method, two_rank_runs):
    tmp_path, procs = two_rank_runs[method]
    finish_all(*procs)
    one = torch.load(tmp_path / "one" / "rank0.pt")
    r0, r1 = (torch.load(tmp_path / "two" / f"rank{r}.pt") for r in (0, 1))
    assert one["step"] == r0["step"] == r1["step"] == 2  # 20 images // (8 per global batch): 2 steps per epoch
    assert r0["world_size"] == 2 and one["world_size"] == 1
    objective = [k for k in one["state"] if not k.startswith(("student.", "teacher."))]
    assert objective, "no banks / centers found"
    for key, value in r0["state"].items():  # the ranks agree exactly: weights, banks, pointers, centers
        assert torch.equal(value, r1["state"][key]), key
    for key, value in one["state"].items():  # and agree with one process up to the order of float sums
        other = r0["state"][key]
        if value.is_floating_point():
            torch.testing.assert_close(other, value, rtol=1e-4, atol=1e-5, msg=key)
        else:
            assert torch.equal(other, value), key
    moved = [
        k for k in one["state"] if k.startswith("teacher.") and not torch.equal(one["state"][k], one["initial"][k])
    ]
    assert moved, "the teacher did not move: the comparison would prove nothing"
    assert r0["metrics"] == r1["metrics"]  # the logged losses are reduced over the ranks ...
    for key, value in one["metrics"].items():  # ... into the global batch's
        assert r0["metrics"][key] == pytest.approx(value, rel=1e-4, abs=1e-6), key


FSDP2 = '{"class_path": "lightning.pytorch.strategies.ModelParallelStrategy", "init_args": {"data_parallel_size": 2, "tensor_parallel_size": 1}}'  # noqa: E501


@pytest.mark.ddp
@pytest.mark.parametrize("method", ["ibot_vmf", "sop"])
def test_fsdp2_matches_one_process_and_resumes_from_a_distributed_checkpoint(method, fake_fmnist, tmp_path):
    """``ModelParallelStrategy`` (FSDP2 ``fully_shard``), 2 ranks x 4: the teacher, banks and centers of
    1 process x 8, and a resume in new processes from the step-3 distributed checkpoint (mid-epoch) or
    from the ``last.ckpt`` of a fit stopped after step 2 (the first epoch's end, as ``max_time`` stops it)
    gives the uninterrupted run's state exactly. (``configure_model`` asserts that student and teacher
    shards line up, so the EMA is local.)"""
    steps = ["--trainer.max_steps", "4", "--trainer.max_epochs", "2"]
    every_step = ["--trainer.callbacks+=ModelCheckpoint", f"--trainer.callbacks.dirpath={tmp_path / 'steps'}",
                  "--trainer.callbacks.every_n_train_steps=1", "--trainer.callbacks.save_top_k=-1",
                  "--trainer.callbacks.filename={step}"]  # fmt: skip
    sharded = ["--data.init_args.batch_size", "4", "--trainer.strategy", FSDP2, "--trainer.devices", "2", *steps]
    stop = ["--trainer.callbacks+=state_saver.StopAt", "--trainer.callbacks.step=2"]  # 2 steps an epoch
    finish_all(start(method, fake_fmnist, tmp_path / "one", "--data.init_args.batch_size", "8", *steps),
               start(method, fake_fmnist, tmp_path / "fsdp", *sharded, *every_step),
               start(method, fake_fmnist, tmp_path / "stopped", *sharded, *stop))  # fmt: skip
    checkpoint = tmp_path / "steps" / "step=3.ckpt"
    assert checkpoint.is_dir(), "a distributed checkpoint is a folder of shards"
    finish_all(start(method, fake_fmnist, tmp_path / "resumed", *sharded, "--ckpt_path", str(checkpoint)),
               start(method, fake_fmnist, tmp_path / "resumed_stopped", *sharded,
                     "--ckpt_path", str(tmp_path / "stopped" / "checkpoints" / "last.ckpt")))  # fmt: skip
    one = torch.load(tmp_path / "one" / "rank0.pt")
    r0, r1, again = (torch.load(tmp_path / d / f"rank{r}.pt") for d, r in (("fsdp", 0), ("fsdp", 1), ("resumed", 0)))
    after_stop = torch.load(tmp_path / "resumed_stopped" / "rank0.pt")
    assert torch.load(tmp_path / "stopped" / "rank0.pt")["step"] == 2
    assert one["step"] == r0["step"] == again["step"] == after_stop["step"] == 4
    assert not one["sharded"] and sorted(r0["sharded"]) == sorted(r0["params"])  # every weight is sharded
    assert any(n.startswith("teacher.") for n in r0["sharded"])
    for key, value in one["state"].items():
        assert torch.equal(r0["state"][key], r1["state"][key]), key  # gathered: the same on both ranks
        assert torch.equal(again["state"][key], r0["state"][key]), key  # resumed = uninterrupted
        assert torch.equal(after_stop["state"][key], r0["state"][key]), key
        if value.is_floating_point():
            torch.testing.assert_close(r0["state"][key], value, rtol=1e-4, atol=1e-5, msg=key)
        else:
            assert torch.equal(r0["state"][key], value), key
    assert again["metrics"] == after_stop["metrics"] == r0["metrics"]
    for key, value in one["metrics"].items():
        assert r0["metrics"][key] == pytest.approx(value, rel=1e-4, abs=1e-6), key
    # the teacher ViT of a distributed checkpoint, read in one process: `export` and the linear probe take the folder
    final, prefix = tmp_path / "steps" / "step=4.ckpt", "teacher.backbone.vit."
    teacher = {k.removeprefix(prefix): v for k, v in r0["state"].items() if k.startswith(prefix)}
    assert main(["export", "--ckpt_path", str(final), "--output", str(tmp_path / "teacher.pth")]) == 0
    exported = torch.load(tmp_path / "teacher.pth")
    assert exported.keys() == teacher.keys() and all(torch.equal(exported[k], teacher[k]) for k in teacher)
    probe = LinearProbe(checkpoint=str(final), backbone="vit_tiny_patch16_224", img_size=28, patch_size=14,
                        embed_dim=32, depth=1, num_heads=2, num_classes=10, n_last_blocks=1)  # fmt: skip
    assert all(torch.equal(v, teacher[k]) for k, v in probe.backbone.vit.state_dict().items())
