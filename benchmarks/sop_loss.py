"""SOP loss machinery vs. the one matrix product it fundamentally needs (issue: SOP, item 7).

At paper scale — [CLS] bank 65 536, patch bank 8192, 4096 / 512 anchors, k = 8 / 0, batch 128 with
2 global + 10 local views, d = 256 — times in one run:

* ``loss``: both SOP losses (SOPLoss + SOPMIMLoss), forward and backward to the student embeddings;
* ``matmul``: the anchors × bank product ``(4096, 256) @ (256, 65536)`` alone, in blocks of 1024 anchors
  (a 4096 × 65 536 result is 1 GB);
* ``floor``: the products the losses cannot avoid, each computed the fastest way we know: the anchors × pool
  product (the 61 440 non-anchor rows, the only ones searched) in blocks of 1024 × 2048 scores whose 8 MB
  buffer the allocator recycles (≈ 35 % faster on CPUs than 1024 × 65 536 blocks, which pay page faults for
  every fresh 256 MB result), plus the student-probability products on the distinct supports forward and
  backward (``x @ Dᵀ`` and ``dπ @ D`` for the 12 views of the [CLS] loss and the masked patches) and the
  teacher's forward, as bare matmuls of the same shapes;

and prints the ratios (targets: ≤ 1.15 × the floor in fp32). ``--search-dtype bfloat16`` times the losses
with the half-precision neighbour search as well. Usage: ``python benchmarks/sop_loss.py [--repeats 5]``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import best_of, best_of_interleaved  # noqa: E402

from sop_lightning.losses.sop import SOPLoss, SOPMIMLoss, distinct_supports


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--memory-size", type=int, default=65536, help="[CLS] bank rows")
    parser.add_argument("--anchors", type=int, default=4096, help="[CLS] SOPs (anchors)")
    parser.add_argument("--patch-memory-size", type=int, default=8192)
    parser.add_argument("--patch-anchors", type=int, default=512)
    parser.add_argument("--mask-fraction", type=float, default=0.15, help="mean masked fraction of patches")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--search-dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"],
                        help="also time the losses with this neighbour-search dtype")  # fmt: skip
    args = parser.parse_args()
    torch.manual_seed(0)
    dev, B, d, N, V = torch.device(args.device), args.batch, 256, 196, 12
    cls_loss = SOPLoss(args.memory_size, d, args.anchors, 8).to(dev)
    mim_loss = SOPMIMLoss(args.patch_memory_size, d, args.patch_anchors, 0).to(dev)
    student_cls = F.normalize(torch.randn(V * B, d, device=dev), dim=1).requires_grad_(True)
    teacher_cls = F.normalize(torch.randn(2 * B, d, device=dev), dim=1)
    masks = torch.rand(2 * B, N, device=dev) < args.mask_fraction
    student_patches = F.normalize(torch.randn(int(masks.sum()), d, device=dev), dim=1).requires_grad_(True)
    teacher_patches = F.normalize(torch.randn(2 * B, N, d, device=dev), dim=-1)
    step = [0]

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    def loss_step():
        step[0] += 1
        loss = cls_loss(student_cls, teacher_cls, 0.04, step[0])
        loss = loss + mim_loss(student_patches, teacher_patches, masks, 0.04, step[0])
        loss.backward()
        student_cls.grad = student_patches.grad = None
        sync()

    anchors = cls_loss.memory.embeddings[: args.anchors].clone()
    bank = cls_loss.memory.embeddings

    def matmul():  # in blocks of 1024 anchors, as the library searches (a 4096 x 65536 block is 1 GB)
        for block in anchors.split(1024):
            block @ bank.T
        sync()

    # the distinct supports of the [CLS] SOPs (at most K (k + 1): a row shared by SOPs is scored once)
    S = distinct_supports(cls_loss.build(1))[0].shape[0]
    supports = torch.randn(S, d, device=dev)
    patch_supports = torch.randn(args.patch_anchors, d, device=dev)
    n_masked = int(masks.sum())
    x_cls, x_t = torch.randn(V * B, d, device=dev), torch.randn(2 * B, d, device=dev)
    x_p = torch.randn(n_masked, d, device=dev)
    pi_cls, pi_p = torch.randn(V * B, S, device=dev), torch.randn(n_masked, args.patch_anchors, device=dev)

    pool = bank[args.anchors :]  # as many rows as the non-anchor pool the search scores
    width = 2048 if dev.type == "cpu" else pool.shape[0]  # cache-sized blocks on CPUs; GPUs take whole rows

    def floor():
        for block in anchors.split(1024):  # the neighbour search's product
            for rows in pool.split(width):
                block @ rows.T
        x_cls @ supports.T, pi_cls @ supports, x_t @ supports.T  # [CLS]: student fwd, bwd, teacher fwd
        x_p @ patch_supports.T, pi_p @ patch_supports, x_p @ patch_supports.T  # masked patches, same
        sync()

    def search():  # the library's [CLS] neighbour search (product + top-k + supports), as the loss runs it
        step[0] += 1
        cls_loss.build(step[0])
        sync()

    # interleaved (loss, search, floor, loss, ...): drifts of a shared machine hit them alike
    times = best_of_interleaved({"loss": loss_step, "mm": matmul, "floor": floor, "search": search}, args.repeats)
    t_loss, t_mm, t_floor, t_search = times["loss"], times["mm"], times["floor"], times["search"]
    print(f"device {dev}, threads {torch.get_num_threads()}, masked patches {n_masked}, distinct [CLS] supports "
          f"{S} of {args.anchors * 9}")  # fmt: skip
    print(f"SOP losses fwd+bwd           : {t_loss * 1e3:9.1f} ms")
    print(f"anchors x bank mm            : {t_mm * 1e3:9.1f} ms  (blocks of 1024 anchors x the whole bank)")
    print(f"library [CLS] search (build) : {t_search * 1e3:9.1f} ms  (product + top-k + supports)")
    print(f"floor (search + SOP products): {t_floor * 1e3:9.1f} ms  (products only, cache-sized blocks)")
    print(f"losses / floor               : {t_loss / t_floor:9.2f}   (target <= 1.15)")
    print(f"losses / anchors x bank mm   : {t_loss / t_mm:9.2f}")
    if args.search_dtype != "float32":
        cls_loss.search_dtype = mim_loss.search_dtype = args.search_dtype
        t_half = best_of(loss_step, args.repeats)
        low = getattr(torch, args.search_dtype)
        a_low, b_low = anchors.to(low), bank.to(low)

        def matmul_low():
            for block in a_low.split(1024):
                block @ b_low.T
            sync()

        t_mm_low = best_of(matmul_low, args.repeats)
        print(
            f"{args.search_dtype} search mm        : {t_mm_low * 1e3:9.1f} ms ({t_mm / t_mm_low:.2f}x the fp32 search)"
        )
        print(
            f"SOP losses, {args.search_dtype} search : {t_half * 1e3:9.1f} ms ({t_loss / t_half:.2f}x faster than fp32)"
        )


if __name__ == "__main__":
    main()
