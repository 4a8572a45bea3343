"""``make demo``: pre-train on the offline Fashion-MNIST demo data on CPU, then report the teacher's
weighted k-NN top-1 / top-5 on the test split (ALGORITHMS.md §11.1).

Usage: python scripts/demo.py [--config experiments/demo/ibot.yaml] [extra LightningCLI args ...]
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from sop_lightning.cli import main as cli_main
from sop_lightning.evaluation import extract_features, knn_classify


def run(argv: list[str]) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="experiments/demo/ibot.yaml")
    args, extra = parser.parse_known_args(argv)
    start = time.perf_counter()
    sys.argv = sys.argv[:1]  # the CLI gets its arguments explicitly
    cli = cli_main(["--config", args.config, *extra], run=False)
    cli.trainer.fit(cli.model, cli.datamodule)
    train_time = time.perf_counter() - start

    model, data = cli.model.eval(), cli.datamodule
    train_loader, test_loader = data.knn_dataloaders(batch_size=512)
    t0 = time.perf_counter()
    train_x, train_y = extract_features(model.embed, train_loader, model.device)
    test_x, test_y = extract_features(model.embed, test_loader, model.device)
    scores = knn_classify(train_x, train_y, test_x, k=20, temperature=0.07, backend="torch")
    top5 = scores.topk(5, dim=1).indices
    result = {
        "knn_top1": 100.0 * (top5[:, 0] == test_y).float().mean().item(),
        "knn_top5": 100.0 * (top5 == test_y[:, None]).any(1).float().mean().item(),
        "train_seconds": train_time,
        "knn_seconds": time.perf_counter() - t0,
    }
    method = type(model).__name__
    print(
        f"\n[demo] {method}: teacher weighted 20-NN on the Fashion-MNIST test split "
        f"({len(train_y)} train / {len(test_y)} test images): top-1 {result['knn_top1']:.2f} %, "
        f"top-5 {result['knn_top5']:.2f} %"
    )
    print(f"[demo] pre-training {train_time:.0f} s, k-NN {result['knn_seconds']:.0f} s; "
          f"TensorBoard logs: tensorboard --logdir {cli.trainer.log_dir}")  # fmt: skip
    return result


if __name__ == "__main__":
    torch.set_num_threads(max(1, torch.get_num_threads()))
    run(sys.argv[1:])
