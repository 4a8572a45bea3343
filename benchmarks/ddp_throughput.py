"""Training images/s of one process against DDP ranks at the same global batch, side by side in one run.

    python benchmarks/ddp_throughput.py --method dino --steps 60            # demo config, 1 vs 2 ranks

Arguments it does not know go to ``sop-lightning fit`` (e.g. ``--data.init_args.root DIR``).

Each configuration is a ``sop-lightning fit`` of the demo config (``experiments/demo/<method>.yaml``, the
loader, crops and model of ``make demo``) in its own process group: one process with ``batch_size`` images,
and ``--ranks`` processes (``--strategy``, default ``ddp``) with ``batch_size / ranks`` each. The median
step time of rank 0 after ``--warmup`` steps gives images/s of the global batch. On the 2-core CPU of the
CI machine two ranks share the same cores, so the ratio measures the overhead of the collectives (gloo
all-reduce of the gradients, the banks' all-gathers, the centers' all-reduces), not a speed-up.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import lightning as L

ROOT = Path(__file__).resolve().parents[1]


class StepTimes(L.Callback):
    """Rank 0 writes the wall-clock time of every training step's end to ``out`` (JSON)."""

    def __init__(self, out: str):
        self.out, self.times = out, []

    def on_train_batch_end(self, trainer, pl_module, *args) -> None:
        self.times.append(time.perf_counter())

    def on_train_end(self, trainer, pl_module) -> None:
        if trainer.global_rank == 0:
            Path(self.out).write_text(json.dumps({"times": self.times, "world_size": trainer.world_size}))


def run(method: str, batch: int, ranks: int, strategy: str, steps: int, workdir: Path, extra: list[str]) -> dict:
    out = workdir / f"times_{ranks}.json"
    executable = str(Path(sys.executable).parent / "sop-lightning")
    args = [executable, "fit", "--config", str(ROOT / "experiments" / "demo" / f"{method}.yaml"),
            "--data.init_args.batch_size", str(batch // ranks), "--trainer.max_steps", str(steps),
            "--trainer.max_time", "null", "--trainer.logger", "false", "--trainer.enable_progress_bar", "false",
            "--trainer.check_val_every_n_epoch", "1000", "--trainer.default_root_dir", str(workdir / str(ranks)),
            "--trainer.callbacks+=ddp_throughput.StepTimes", f"--trainer.callbacks.out={out}"]  # fmt: skip
    args += extra  # further `sop-lightning fit` arguments given to this script
    if ranks > 1:
        args += ["--trainer.strategy", strategy, "--trainer.devices", str(ranks)]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run(args, cwd=workdir, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed:\n{proc.stderr[-3000:]}")
    return json.loads(out.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--method", default="dino", choices=["sop", "dino", "ibot", "dino_vmf", "ibot_vmf"])
    parser.add_argument("--batch", type=int, default=64, help="global batch (the demo's 64)")
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--strategy", default="ddp", choices=["ddp", "ddp_spawn"])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--warmup", type=int, default=10)
    args, extra = parser.parse_known_args()  # the rest goes to `sop-lightning fit`, e.g. --data.init_args.root
    if args.batch % args.ranks:
        parser.error(f"--batch {args.batch} must be divisible by --ranks {args.ranks}")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for ranks in (1, args.ranks):
            result = run(args.method, args.batch, ranks, args.strategy, args.steps, Path(tmp), extra)
            gaps = step_gaps(result["times"][args.warmup :])
            seconds = statistics.median(gaps)
            rows.append((ranks, args.batch / seconds, seconds))
            print(f"{ranks} process(es) x {args.batch // ranks} images: {args.batch / seconds:7.1f} img/s "
                  f"(median step {seconds * 1000:.0f} ms over {len(gaps)} steps)", flush=True)  # fmt: skip
    (_, one, _), (_, many, _) = rows
    print(f"\n{args.method}, global batch {args.batch}, {os.cpu_count()} CPU cores: {args.ranks} ranks / 1 process "
          f"= {many / one:.2f}x images/s")  # fmt: skip


def step_gaps(values: list[float]) -> list[float]:
    return [b - a for a, b in zip(values, values[1:])]


if __name__ == "__main__":
    main()
