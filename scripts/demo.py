"""``make demo``: pre-train on the offline Fashion-MNIST demo data on CPU, then report the teacher's
weighted k-NN top-1 / top-5 on the test split (ALGORITHMS.md §11.1), computed by the library's
``KNNEvaluation`` at validation — exactly what ``sop-lightning validate`` reports for the checkpoint.

The run is planned for ``--minutes`` of training (default 7.5, so that ``make demo`` stays under 10 minutes
with the evaluation): :class:`~sop_lightning.callbacks.TimeBudget` times the first steps and sets
``max_steps`` (at most the config's 2400) so that the lr, momentum and temperature schedules end on time
on a slow machine too, instead of being cut by ``max_time``. ``--minutes 0`` runs the config's steps.

Usage: python scripts/demo.py [--config experiments/demo/sop.yaml] [--minutes 7.5] [extra LightningCLI args ...]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from sop_lightning.callbacks import TimeBudget
from sop_lightning.cli import ConfigError, build_cli


def run(argv: list[str]) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="experiments/demo/sop.yaml")
    parser.add_argument("--minutes", type=float, default=7.5, help="training minutes to plan for (0: the config's)")
    args, extra = parser.parse_known_args(argv)
    if args.minutes < 0:
        parser.error(f"--minutes must be >= 0 (0 runs the config's max_steps), got {args.minutes}")
    sys.argv = sys.argv[:1]  # the CLI gets its arguments explicitly
    start = time.perf_counter()
    try:
        cli = build_cli(["--config", args.config, *extra], run=False)
    except ConfigError as err:  # a bad value or misspelt argument: one line and status 2, as sop-lightning says it
        parser.error(str(err))
    trainer, model, data = cli.trainer, cli.model, cli.datamodule
    if args.minutes > 0:
        trainer.callbacks.append(TimeBudget(args.minutes))
    trainer.fit(model, data)
    train_time = time.perf_counter() - start
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/knn")}
    if "val/knn_top1" not in metrics:  # stopped before the end-of-epoch validation (max_time)
        metrics = {k: float(v) for k, v in trainer.validate(model, data, verbose=False)[0].items()}
    total = time.perf_counter() - start
    ckpt = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
    if not ckpt and trainer.log_dir:
        ckpt = str(Path(trainer.log_dir) / "checkpoints" / "demo-final.ckpt")
        trainer.save_checkpoint(ckpt, weights_only=False)  # resumable: callbacks and loops too
    method = type(model).__name__
    print(
        f"\n[demo] {method} after {trainer.global_step} steps: teacher weighted 20-NN on the Fashion-MNIST test "
        f"split: top-1 {metrics['val/knn_top1']:.2f} %, top-5 {metrics['val/knn_top5']:.2f} % "
        f"(k=200: top-1 {metrics.get('val/knn_top1_k200', float('nan')):.2f} %)"
    )
    print(f"[demo] wall time {total:.0f} s (pre-training + evaluation); TensorBoard: tensorboard --logdir runs/demo")
    if ckpt:
        print(f"[demo] checkpoint {ckpt}")
        print(f"[demo] re-evaluate it: sop-lightning validate --config {args.config} --ckpt_path {ckpt}")
        export = Path(ckpt).with_name("teacher_backbone.pth")
        kwargs = model.export_backbone(export)
        print(
            f"[demo] teacher backbone exported to {export}; load it with\n"
            f"         model = timm.create_model({', '.join(f'{k}={v!r}' for k, v in kwargs.items())})\n"
            f"         model.load_state_dict(torch.load({str(export)!r}), strict=True)"
        )
    return {**metrics, "train_seconds": train_time, "total_seconds": total}


if __name__ == "__main__":
    run(sys.argv[1:])
