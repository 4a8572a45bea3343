"""The installed ``sop-lightning`` executable, run as users and schedulers run it: exit status 0 on success,
non-zero with a clear message on failure (issue 8.1)."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import write_fake_fmnist

ROOT = Path(__file__).resolve().parents[1]
SOP_DEMO = ROOT / "experiments" / "demo" / "sop.yaml"


def _executable() -> str:
    local = Path(sys.executable).parent / "sop-lightning"
    found = str(local) if local.exists() else shutil.which("sop-lightning")
    assert found, "the sop-lightning console script is not installed"
    return found


def _run(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run([_executable(), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def _tiny(root: Path, out: Path) -> list[str]:
    return [
        "--config", str(SOP_DEMO),
        "--data.init_args.root", str(root), "--data.init_args.num_workers", "0", "--data.init_args.batch_size", "4",
        "--model.init_args.embed_dim", "32", "--model.init_args.depth", "1", "--model.init_args.num_heads", "2",
        "--model.init_args.hidden_dim", "32", "--model.init_args.memory_size", "64",
        "--model.init_args.patch_memory_size", "32", "--model.init_args.num_anchors", "8",
        "--model.init_args.num_patch_anchors", "4",
        "--trainer.default_root_dir", str(out), "--trainer.logger.init_args.save_dir", str(out),
    ]  # fmt: skip


def _assert_ok(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, f"exit status {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    assert "SOPLightningCLI object" not in proc.stdout + proc.stderr


def test_fit_validate_export_exit_zero(fake_fmnist, tmp_path):
    fit = _run("fit", *_tiny(fake_fmnist, tmp_path), "--trainer.max_steps", "2", cwd=tmp_path)
    _assert_ok(fit)
    ckpts = sorted(tmp_path.rglob("*.ckpt"))
    assert ckpts, fit.stdout[-2000:]
    val = _run("validate", *_tiny(fake_fmnist, tmp_path), "--ckpt_path", str(ckpts[-1]), cwd=tmp_path)
    _assert_ok(val)
    assert "val/knn_top1" in val.stdout
    out = tmp_path / "teacher.pth"
    export = _run("export", "--ckpt_path", str(ckpts[-1]), "--output", str(out), cwd=tmp_path)
    _assert_ok(export)
    assert out.exists() and "timm.create_model" in export.stdout


def test_progress_bar_of_a_run_bounded_by_steps(fake_fmnist, tmp_path):
    """A run bounded by steps (``max_epochs=-1``) shows "Epoch 1", not Lightning 2.6's "Epoch 1/-2"."""
    fit = _run("fit", *_tiny(fake_fmnist, tmp_path), "--trainer.max_epochs", "-1", "--trainer.max_steps", "7",
               cwd=tmp_path)  # fmt: skip
    _assert_ok(fit)
    bars = [line for line in fit.stdout.splitlines() if line.startswith("Epoch ")]
    assert bars and all(line.split()[1] in ("0", "1") for line in bars), bars  # 5 steps an epoch: epochs 0 and 1


FAILURES = {
    # a bad value: status 2 and this one line naming it, not jsonargparse's Union report
    "bad-value": (["fit", "--model.init_args.base_lr", "-1"], "base_lr must be > 0, got -1",
                  "sop-lightning fit: error: base_lr must be > 0, got -1.0"),
    # a misspelt argument: status 2 and one line with the closest names, not the 50-line usage
    "unknown-argument": (["fit", "--trainer.max_stepz", "2"], "max_stepz",
                         "sop-lightning fit: error: unknown argument --trainer.max_stepz (did you mean "
                         "--trainer.max_steps or --trainer.max_time or --trainer.min_steps?)"),
    # a data folder that is not there: refused by name when the data module is built, no traceback
    "missing-data-root": (["fit", "--data.init_args.root", "nowhere"], "root='nowhere' is not a folder",
                          "sop-lightning fit: error: root='nowhere' is not a folder: dataset='fashion_mnist' reads the "
                          "Fashion-MNIST IDX files from it. Install the demo data with `sudo apt-get install "
                          "dataset-fashion-mnist` (files in /usr/share/datasets/fashion-mnist), or pass root= a folder "
                          "holding the IDX files"),
    "missing-checkpoint": (["export", "--ckpt_path", "missing.ckpt", "--output", "x.pth"], "missing.ckpt",
                           "sop-lightning export: error: ckpt_path='missing.ckpt' is neither a checkpoint file nor a "
                           "distributed-checkpoint folder"),
    # a misspelt subcommand: the closest of LightningCLI's and the library's export
    "unknown-subcommand": (["fitt"], "fitt", "sop-lightning: error: unknown subcommand 'fitt' (did you mean fit?): "
                           "one of fit, validate, test, predict, export"),
    # no subcommand: one line naming them all, not jsonargparse's "expected ... {fit,validate,test,predict}"
    "no-subcommand": ([], "a subcommand is required", "sop-lightning: error: a subcommand is required: one of fit, "
                      "validate, test, predict, export (e.g. sop-lightning fit --config CONFIG)"),
    # a checkpoint path that is not there: refused by name before the model is built, no traceback
    "validate-missing-checkpoint": (
        ["validate", "--ckpt_path", "missing.ckpt"], "missing.ckpt",
        "sop-lightning validate: error: ckpt_path 'missing.ckpt' does not exist (a checkpoint file or "
        "distributed-checkpoint folder, or one of 'last', 'best')"),
}  # fmt: skip


@pytest.fixture(scope="module")
def failed_runs(tmp_path_factory) -> dict[str, subprocess.Popen]:
    """Every case of :data:`FAILURES`, started side by side (most of each run is the process's start-up)."""
    tmp_path = tmp_path_factory.mktemp("failures")
    root = write_fake_fmnist(tmp_path_factory.mktemp("fmnist"))
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    procs = {}
    for case, (args, _, _) in FAILURES.items():
        cmd, rest = args[:1], args[1:]
        extra = _tiny(root, tmp_path / case) if cmd in (["fit"], ["validate"]) else []
        procs[case] = subprocess.Popen([_executable(), *cmd, *extra, *rest], cwd=tmp_path, env=env,
                                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    yield procs
    for proc in procs.values():
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


@pytest.mark.parametrize("case", list(FAILURES))
def test_failures_exit_nonzero_with_a_clear_message(failed_runs, case):
    _, message, one_line = FAILURES[case]
    proc = failed_runs[case]
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode != 0
    assert message in stderr, stderr[-3000:]
    if one_line is not None:
        assert proc.returncode == 2
        assert stderr.strip().splitlines()[-1] == one_line, stderr[-3000:]
        assert "Traceback" not in stderr and "Union" not in stderr, stderr[-3000:]


def test_demo_script_plans_its_steps_for_the_minutes(fake_fmnist, tmp_path):
    """``make demo``'s script: the run is planned for --minutes (TimeBudget), ends with a k-NN line, a
    checkpoint and an exported backbone; a negative --minutes and a misspelt argument are refused by name."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    demo = [sys.executable, str(ROOT / "scripts" / "demo.py")]
    args = [*_tiny(fake_fmnist, tmp_path), "--trainer.max_steps", "40", "--trainer.max_epochs", "-1",
            "--trainer.check_val_every_n_epoch", "1000"]  # fmt: skip
    refused = {  # side by side with the run (most of each is the process's start-up)
        "--minutes must be >= 0 (0 runs the config's max_steps), got -1.0": ["--minutes", "-1", *args],
        "demo.py: error: model.init_args.num_anchorz: sop_lightning.SOP has no argument 'num_anchorz'": [
            *args, "--model.init_args.num_anchorz", "2"],
        # make demo DEMO_CONFIG=experiments/demo/sopp.yaml
        f"demo.py: error: --config {str(ROOT / 'experiments' / 'demo' / 'sopp.yaml')!r} does not exist (did you "
        "mean sop.yaml there?)": ["--config", str(ROOT / "experiments" / "demo" / "sopp.yaml")],
    }  # fmt: skip
    pipes = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, "text": True}
    bad = {message: subprocess.Popen([*demo, *argv], cwd=tmp_path, env=env, **pipes)
           for message, argv in refused.items()}  # fmt: skip
    proc = subprocess.run([*demo, "--minutes", "0.1", *args], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)  # fmt: skip
    _assert_ok(proc)
    out = proc.stdout + proc.stderr
    planned = int(out.split(" steps planned for 0.1 training minutes")[0].rsplit(",", 1)[1])
    assert 1 <= planned <= 40 and f"[demo] SOP after {planned} steps" in out and "top-1" in out
    assert list(tmp_path.rglob("teacher_backbone.pth"))
    for message, refusal in bad.items():  # a bad value of the script, a misspelt argument, a missing config
        _, stderr = refusal.communicate(timeout=300)
        assert refusal.returncode == 2 and message in stderr and "Traceback" not in stderr, stderr[-3000:]
