"""k-NN classification speed (issue: Evaluation, item 6).

50 000 × 256 training features, 10 000 queries, k = 20, measured side by side in one run:

* ``matmul+topk``: plain ``test @ train.T`` then ``topk`` (the floor any exact search pays);
* ``faiss IndexFlatIP``: index build + search alone;
* ``knn_classify`` with ``backend="torch"``, ``"faiss"`` and ``"auto"`` (the library's whole vote).

Prints each time (best of ``--repeats``, the calls interleaved) and its ratio to faiss IndexFlatIP
(target: ``auto`` ≤ 1.05 on CPU).
Usage: ``python benchmarks/knn.py [--train 50000 --test 10000 --dim 256 --repeats 3]``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import best_of_interleaved  # noqa: E402

from sop_lightning.evaluation import knn_classify


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train", type=int, default=50_000)
    parser.add_argument("--test", type=int, default=10_000)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    import faiss

    g = torch.Generator().manual_seed(0)
    train = F.normalize(torch.randn(args.train, args.dim, generator=g), dim=1)
    test = F.normalize(torch.randn(args.test, args.dim, generator=g), dim=1)
    labels = torch.randint(0, args.classes, (args.train,), generator=g)

    def matmul_topk():
        for start in range(0, args.test, 1024):
            (test[start : start + 1024] @ train.T).topk(20, dim=1)

    def faiss_flat():
        index = faiss.IndexFlatIP(args.dim)
        index.add(train.numpy())
        index.search(test.numpy(), 20)

    fns = {"matmul+topk": matmul_topk, "faiss IndexFlatIP": faiss_flat}
    for backend in ("torch", "faiss", "auto"):
        fns[f"knn_classify[{backend}]"] = lambda b=backend: knn_classify(
            train, labels, test, k=20, num_classes=args.classes, backend=b
        )
    results = best_of_interleaved(fns, args.repeats)  # interleaved: machine drift hits every entry alike
    ref = results["faiss IndexFlatIP"]
    print(f"train {args.train} x {args.dim}, test {args.test}, k=20, threads {torch.get_num_threads()}")
    for name, seconds in results.items():
        print(f"{name:22s} {seconds * 1e3:9.1f} ms   ratio to faiss IndexFlatIP {seconds / ref:5.2f}")
    same = torch.equal(
        knn_classify(train, labels, test[:500], backend="torch").argmax(1),
        knn_classify(train, labels, test[:500], backend="faiss").argmax(1),
    )
    print(f"torch and faiss backends agree on the first 500 predictions: {same}")


if __name__ == "__main__":
    main()
