"""SOP objectives: Self-Organizing Visual Prototypes (ALGORITHMS.md §3, §4, §12).

Pure functions :func:`build_sops` and :func:`sop_probabilities` hold the math; :class:`SOPLoss`
([CLS]) and :class:`SOPMIMLoss` (masked patches) own their :class:`~sop_lightning.memory.MemoryBank`
and draw rank-consistent anchors.
"""

from __future__ import annotations

import warnings
from typing import Literal, NamedTuple, get_args

import torch
from torch import Tensor, nn

from ..distributed import rank as current_rank
from ..memory import MemoryBank
from ..seeding import mix_seed
from .common import (
    at_least_fp32,
    compute_dtype,
    cross_entropy,
    cross_view_mean,
    masked_image_mean,
    masked_student_rows,
    select_tokens,
)
from .dino import teacher_stats

__all__ = [
    "SOPs",
    "build_sops",
    "sop_rows",
    "distinct_supports",
    "resolve_search_dtype",
    "sop_probabilities",
    "SOPLoss",
    "SOPMIMLoss",
]

Contribution = Literal["soft", "onehot", "uniform"]
_TINY = torch.finfo(torch.float32).tiny


class SOPs(NamedTuple):
    """The step's SOPs. ``supports``: ``(K, k+1, d)``, index 0 the anchor, 1..k its neighbours by
    descending cosine; ``contributions``: ``(K, k+1)`` (§3.2); ``rows``: ``(K, k+1)`` the memory rows of the
    supports, or ``None`` — with them, a row that supports several SOPs is scored once
    (:func:`sop_probabilities`)."""

    supports: Tensor
    contributions: Tensor
    rows: Tensor | None = None
    #: ``(U, d)`` distinct supports and the ``(K·(k+1),)`` index of every support among them, when computed
    #: once for the step's several :func:`sop_probabilities` calls (:func:`distinct_supports`).
    distinct: tuple[Tensor, Tensor] | None = None


def _check_sop_sizes(memory: Tensor, anchor_idx: Tensor, num_neighbors: int, min_anchors: int) -> None:
    if memory.ndim != 2:
        raise ValueError(f"memory must be (M, d), got {tuple(memory.shape)}")
    M, K = memory.shape[0], anchor_idx.numel()
    if K < min_anchors:
        raise ValueError(f"the number of anchors K must be >= {min_anchors}, got {K}")
    if K > M:
        raise ValueError(f"the number of anchors K={K} exceeds the memory size {M}")
    if not 0 <= num_neighbors <= M - K:
        raise ValueError(
            f"num_neighbors={num_neighbors} must be in [0, memory size - anchors = {M - K}] (k >= bank size)"
        )


SearchDtype = Literal["float32", "bfloat16", "float16", "auto"]

#: Scores in one block of the neighbour search on CPUs (16 MB: recycled by the allocator, its top-k reads them
#: from the cache; 1024 anchors × 4096 rows).
_CPU_SEARCH_BLOCK = 1 << 22


def _check_search_dtype(search_dtype: str) -> None:
    if search_dtype not in get_args(SearchDtype):
        raise ValueError(f"search_dtype must be 'float32', 'bfloat16', 'float16' or 'auto', got {search_dtype!r}")


def resolve_search_dtype(search_dtype: SearchDtype, device: torch.device) -> str:
    """``"auto"`` → ``"bfloat16"`` where ``device`` multiplies bf16 matrices natively — CUDA GPUs with bf16
    support, CPUs with AVX512-BF16 or AMX — else ``"float32"``; other values are returned as they are.
    (On CPUs without those instructions a bf16 product is emulated and slower than fp32.)"""
    _check_search_dtype(search_dtype)
    if search_dtype != "auto":
        return search_dtype
    if device.type == "cuda":
        return "bfloat16" if torch.cuda.is_bf16_supported(including_emulation=False) else "float32"
    if device.type == "cpu":
        cpu = torch.cpu
        native = (
            getattr(cpu, "_is_avx512_bf16_supported", lambda: False)()
            or getattr(cpu, "_is_amx_tile_supported", lambda: False)()
        )
        return "bfloat16" if native else "float32"
    return "float32"


def _neighbours(
    memory: Tensor, anchor_idx: Tensor, num_neighbors: int, chunk_size: int, search_dtype: SearchDtype = "float32"
) -> tuple[Tensor, Tensor]:
    """Cosines ``(K, k)`` and memory rows ``(K, k)`` of each anchor's top-``k`` non-anchor rows (§3.2),
    by descending cosine.

    The ``K × M`` scores are computed in blocks of ``chunk_size`` anchors × a slice of the memory rows, the
    anchors' own columns set to ``-inf`` (the candidate pool is every non-anchor row, without gathering it:
    no copy of the bank, and no host read of the pool's size on a GPU); each block keeps its top ``k`` and the
    blocks' candidates are merged (a row's top ``k`` lie among its blocks' top ``k``). On CPUs a block has
    ``_CPU_SEARCH_BLOCK`` scores, so its top-``k`` reads them from cache instead of memory (the search runs
    ≈ 25 % faster than one product and a top-``k`` over whole rows at the paper's sizes); on other devices a
    block spans the whole bank.

    ``search_dtype`` below fp32: the scores are computed in that dtype (the one product that grows with the
    bank), the top ``2k`` candidates are kept, and their cosines are recomputed in the memory's dtype to
    choose and order the final ``k``; so only ties within half-precision resolution of the ``k``-th cosine
    can change the choice, and the returned cosines are exact."""
    K, M = anchor_idx.numel(), memory.shape[0]
    if num_neighbors == 0:
        return memory.new_zeros(K, 0), anchor_idx.new_zeros(K, 0)
    search_dtype = resolve_search_dtype(search_dtype, memory.device)
    low_dtype = getattr(torch, search_dtype)
    low = search_dtype != "float32" and memory.dtype != low_dtype
    anchors = memory.index_select(0, anchor_idx)  # row gathers by index_select: ~4x faster than [] on CPUs
    width = M if memory.device.type != "cpu" else max(1, _CPU_SEARCH_BLOCK // min(chunk_size, K))
    # each slice's anchor columns; on CPUs (several slices) found by a search read on the host, no sync there
    starts = range(0, M, width)
    if len(starts) == 1:
        excluded = [anchor_idx]
    else:
        ordered = anchor_idx.sort().values
        cuts = torch.searchsorted(ordered, torch.tensor([*starts, M], device=ordered.device)).tolist()
        excluded = [ordered[a:b] - start for a, b, start in zip(cuts, cuts[1:], starts)]
    # at least M − K non-anchor rows (exactly, for distinct anchors), and num_neighbors <= M − K (checked): the
    # merged candidates are all non-anchor rows (finite scores), whatever the slices held
    candidates = min(2 * num_neighbors, M - K) if low else num_neighbors
    chunks = (anchors.to(low_dtype) if low else anchors).split(chunk_size)
    scores, rows = [], []  # per slice of the bank: each anchor's best scores (K, c) and their memory rows
    for start, cols in zip(starts, excluded):
        block = memory[start : start + width]
        block_t = (block.to(low_dtype) if low else block).T  # (d, width): GEMM reads it transposed
        c = min(candidates, block.shape[0])
        best = [(a @ block_t).index_fill_(1, cols, float("-inf")).topk(c, dim=1) for a in chunks]
        scores.append(torch.cat([s for s, _ in best]))
        rows.append(torch.cat([i for _, i in best]) + start)
    s, i = torch.cat(scores, 1), torch.cat(rows, 1)
    if len(scores) > 1:
        s, order = s.topk(candidates, dim=1)
        i = i.gather(1, order)
    if low:  # exact cosines of the candidates (in blocks of 128 anchors: small buffers), then their top k
        s = torch.cat([
            torch.einsum("kd,kcd->kc", a_b, memory.index_select(0, i_b.flatten()).view(*i_b.shape, -1))
            for a_b, i_b in zip(anchors.split(128), i.split(128))
        ])  # fmt: skip
        s, order = s.topk(num_neighbors, dim=1)
        i = i.gather(1, order)
    return s, i


@torch.no_grad()
def sop_rows(memory: Tensor, anchor_idx: Tensor, num_neighbors: int, chunk_size: int = 1024) -> Tensor:
    """The memory rows ``(K, k+1)`` that make up each SOP: column 0 the anchor, then its neighbours by
    descending cosine — the rows whose embeddings :func:`build_sops` stacks as supports (§3.2)."""
    _check_sop_sizes(memory, anchor_idx, num_neighbors, min_anchors=1)
    with torch.autocast(device_type=memory.device.type, enabled=False):
        _, idx = _neighbours(at_least_fp32(memory.detach()), anchor_idx, num_neighbors, chunk_size)
    return torch.cat([anchor_idx.view(-1, 1), idx], dim=1)


@torch.no_grad()
def build_sops(
    memory: Tensor,
    anchor_idx: Tensor,
    num_neighbors: int,
    smoothing: float = 0.1,
    contribution: Contribution = "soft",
    clamp: bool = True,
    chunk_size: int = 1024,
    search_dtype: SearchDtype = "float32",
) -> SOPs:
    """Build ``K`` SOPs from ``memory`` ``(M, d)`` (unit rows) around the anchors ``anchor_idx`` ``(K,)``.

    Neighbours are the top-``num_neighbors`` rows by cosine among the **non-anchor** rows, searched in
    fp32 in chunks of ``chunk_size`` anchors (so 4096 × 65 536 fits in memory), or with ``search_dtype``
    scores in half precision and the candidates re-ranked in fp32 (:func:`_neighbours`; ``"auto"``:
    :func:`resolve_search_dtype`). Contributions (§3.2
    step 5): ``"soft"`` anchor ``1-ε``, neighbour its cosine; ``"onehot"`` all 1; ``"uniform"`` all
    ``1-ε``; clamped into ``[0, 1]`` when ``clamp``. No gradient flows into the memory.
    """
    _check_sop_sizes(memory, anchor_idx, num_neighbors, min_anchors=2)  # a softmax over K >= 2 regions
    K = anchor_idx.numel()
    if not 0.0 <= smoothing < 1.0:
        raise ValueError(f"smoothing must be in [0, 1), got {smoothing}")
    if contribution not in ("soft", "onehot", "uniform"):
        raise ValueError(f"contribution must be 'soft', 'onehot' or 'uniform', got {contribution!r}")
    with torch.autocast(device_type=memory.device.type, enabled=False):
        memory = at_least_fp32(memory.detach())
        scores, idx = _neighbours(memory, anchor_idx, num_neighbors, chunk_size, search_dtype)
        rows = torch.cat([anchor_idx.view(-1, 1), idx], dim=1)  # (K, k+1)
        supports = memory.index_select(0, rows.flatten()).view(*rows.shape, -1)
        if contribution == "soft":
            contributions = torch.cat([scores.new_full((K, 1), 1.0 - smoothing), scores], dim=1)
        elif contribution == "onehot":
            contributions = scores.new_ones(K, num_neighbors + 1)
        else:
            contributions = scores.new_full((K, num_neighbors + 1), 1.0 - smoothing)
        if clamp:
            contributions = contributions.clamp(0.0, 1.0)
    return SOPs(supports, contributions, rows)


#: Elements of the ``(U, n)`` blocks of the backward on CPUs (16 MB): blocks this small are recycled by the
#: allocator, larger ones are mapped afresh and pay their page faults every step.
_CPU_BLOCK_ELEMENTS = 1 << 22


class _SOPProbabilities(torch.autograd.Function):
    """Fused ``P = softmax(x Dᵀ/τ) · Y`` with a hand-written backward, on the ``U`` distinct supports.

    A memory row that supports several SOPs (the neighbour of two anchors) is one embedding: its score is
    computed once and enters the softmax with its multiplicity ``m_u``, so the products cost ``N·U·d`` instead
    of ``N·K(k+1)·d`` (the search picks neighbours in dense regions, and a bank smaller than ``K(k+1)`` rows
    must repeat rows). The support → SOP weights form a sparse matrix ``W`` ``(K, U)`` (``k+1`` entries a
    row), so the per-SOP sums are sparse products and no ``N × K(k+1)`` buffer is built; the normaliser and
    ``Q`` are one dense ``(2, U) @ (U, N)`` product.

    With ``e_u = exp(s_u − max)``, ``Z = Σ_u m_u e_u``, ``w_ji = (K c_ji − 1)/(K − 1)``, ``Q = Σ_u C_u e_u / Z``
    (``C_u`` the contributions of row ``u`` summed over its columns):
    ``P_j = (W e)_j / Z + (1 − Q)/(K − 1)``; backward, with ``g = Σ_j dP_j /(K−1)`` and
    ``β = Σ_j dP_j (P_j − (1−Q)/(K−1)) − g Q`` (``= Σ π ∂L/∂π``):
    ``∂L/∂s_u = (e_u / Z)·((Wᵀ dP)_u − g C_u − m_u β)``, ``dx = (∂L/∂s / τ)ᵀ · D_U``; the bracket is one
    sparse product ``[Wᵀ, C, m] · [dP; −g; −β]``, computed in column blocks of ``(U, n)``.
    """

    @staticmethod
    def forward(ctx, x: Tensor, unique: Tensor, inverse: Tensor, c: Tensor, inv_tau: float) -> Tensor:  # type: ignore[override]
        K, S = c.shape
        U = unique.shape[0]
        # (U, N) scores, turned into exp((s - max)/τ) in place (τ > 0: the max of s/τ is max(s)/τ); no scaled copy
        # of the (U, d) supports or of x (N, d), either of which may be the larger
        e = unique @ x.T
        e.sub_(e.amax(0, keepdim=True)).mul_(inv_tau).exp_()
        w = ((K * c - 1.0) / (K - 1)).reshape(K * S)
        m = torch.bincount(inverse, minlength=U).to(e.dtype)
        c_rows = torch.zeros(U, dtype=e.dtype, device=e.device).index_add_(0, inverse, c.reshape(K * S))
        # Z and Q·Z as a dense (2, U) @ (U, N) product: as two dense rows of the sparse product each would be
        # summed by one thread
        z, q = torch.stack([m, c_rows]) @ e  # (N,) each
        q = q.div_(z)
        sums = _csr(*_sop_rows_layout(inverse, w, K), (K, U)) @ e  # W e, (K, N)
        p = sums.div_(z).add_((1.0 - q).div_(K - 1)).T  # (N, K)
        ctx.save_for_backward(e, z, unique, inverse, m, c_rows, w, p, q)
        ctx.inv_tau = inv_tau
        return p

    @staticmethod
    def backward(ctx, dp: Tensor):  # type: ignore[override]
        e, z, unique, inverse, m, c_rows, w, p, q = ctx.saved_tensors
        K, (U, N) = p.shape[1], e.shape
        g = dp.sum(-1) / (K - 1)  # (N,)
        beta = (dp * (p - ((1.0 - q) / (K - 1)).unsqueeze(-1))).sum(-1) - g * q  # (N,)
        rhs = torch.cat([dp.T, -g.unsqueeze(0), -beta.unsqueeze(0)])  # (K + 2, N)
        bracket = _csr(*_support_rows_layout(inverse, w, m, c_rows, K), (U, K + 2))
        block = N if e.device.type != "cpu" else max(1, _CPU_BLOCK_ELEMENTS // U)
        dx = torch.empty(N, unique.shape[1], dtype=e.dtype, device=e.device)
        for a in range(0, N, block):
            grad = bracket @ rhs[:, a : a + block]  # (U, n): (Wᵀ dP)_u − g C_u − m_u β
            grad.mul_(e[:, a : a + block])
            torch.mm(grad.T, unique, out=dx[a : a + block])
        return dx.mul_((ctx.inv_tau / z).unsqueeze(1)), None, None, None, None


def _sop_rows_layout(inverse: Tensor, w: Tensor, K: int) -> tuple[Tensor, Tensor, Tensor]:
    """CSR ``(crow, col, values)`` of ``W`` ``(K, U)``: row ``j`` holds ``w_ji`` at the columns ``inverse[j·S + i]``."""
    S = inverse.numel() // K
    return torch.arange(0, K * S + 1, S, device=inverse.device), inverse, w


def _support_rows_layout(
    inverse: Tensor, w: Tensor, m: Tensor, c_rows: Tensor, K: int
) -> tuple[Tensor, Tensor, Tensor]:
    """CSR ``(crow, col, values)`` of ``[Wᵀ, C, m]`` ``(U, K + 2)``: row ``u`` holds ``w_ji`` at the SOPs ``j`` of
    its columns (ascending), then ``C_u`` at column ``K`` and ``m_u`` at ``K + 1``."""
    S, U = inverse.numel() // K, m.numel()
    order = torch.argsort(inverse, stable=True)  # columns grouped by support row, ascending within a row
    counts = torch.bincount(inverse, minlength=U)
    crow = torch.zeros(U + 1, dtype=inverse.dtype, device=inverse.device)
    crow[1:] = (counts + 2).cumsum(0)
    starts = crow[:-1]
    sorted_rows = inverse[order]
    first = counts.cumsum(0) - counts  # where each row's entries begin in `order`
    dst = starts[sorted_rows] + torch.arange(order.numel(), device=order.device) - first[sorted_rows]
    nnz = inverse.numel() + 2 * U  # crow[-1], known on the host: Σ counts = K·S, plus 2 columns a row
    cols = torch.empty(nnz, dtype=inverse.dtype, device=inverse.device)
    vals = torch.empty(nnz, dtype=w.dtype, device=w.device)
    cols[dst], vals[dst] = order // S, w[order]
    cols[starts + counts], vals[starts + counts] = K, c_rows
    cols[starts + counts + 1], vals[starts + counts + 1] = K + 1, m
    return crow, cols, vals


def _csr(crow: Tensor, cols: Tensor, values: Tensor, size: tuple[int, int]) -> Tensor:
    with warnings.catch_warnings():  # "sparse CSR support is in beta"
        warnings.simplefilter("ignore")
        return torch.sparse_csr_tensor(crow, cols, values, size=size, check_invariants=False)


def distinct_supports(sops: SOPs, num_rows: int | None = None) -> tuple[Tensor, Tensor]:
    """``(U, d)`` distinct support embeddings and the ``(K·S,)`` index of every support among them (all
    supports, ``U = K·S``, when their memory rows are not given: unknown, or known to differ). ``num_rows``: the
    memory's size, a bound on the row numbers (read from the rows when not given: a host synchronisation on a
    GPU)."""
    K, S, d = sops.supports.shape
    flat = sops.supports.detach().reshape(K * S, d)
    if sops.rows is None:
        return flat, torch.arange(K * S, device=flat.device)
    rows = sops.rows.reshape(-1)
    # the distinct rows ascending, without a sort: mark the rows present, number them by a running count
    bound = int(rows.max()) + 1 if num_rows is None else num_rows
    present = torch.zeros(bound, dtype=torch.bool, device=rows.device).index_fill_(0, rows, True)
    running = present.cumsum(0)  # its last entry is the number of distinct rows
    inverse = (running - 1).index_select(0, rows)
    columns = torch.arange(rows.numel(), device=rows.device)
    first = columns.new_full((int(running[-1]),), rows.numel()).scatter_reduce_(0, inverse, columns, "amin")
    return flat.index_select(0, first), inverse  # each row from its first column (deterministic on GPUs too)


def sop_probabilities(x: Tensor, sops: SOPs, temperature: float) -> Tensor:
    """``P = softmax(x · Dᵀ / τ) · Y`` of shape ``(..., K)`` for ``x`` ``(..., d)`` (§3.3).

    Uses ``P_j = q_j + (R − r_j)/(K−1)`` with ``q_j = Σ_i π_(j,i) c_(j,i)``, ``r_j = Σ_i π_(j,i)(1−c_(j,i))``
    and ``R = Σ_j r_j``, which equals ``Yᵀ π`` without building the dense ``K(k+1) × K`` matrix ``Y``; the
    softmax, the reduction and their backward are fused, and a memory row shared by several SOPs is scored
    once (``sops.rows``, :class:`_SOPProbabilities`). Computed in fp32 (or the input's wider dtype) even under
    autocast; gradients flow to ``x`` only.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    K, S, d = sops.supports.shape
    if K < 2:
        raise ValueError(f"the number of SOPs K must be >= 2, got {K}")
    dtype = compute_dtype(x)
    unique, inverse = sops.distinct if sops.distinct is not None else distinct_supports(sops)
    with torch.autocast(device_type=x.device.type, enabled=False):
        flat = x.to(dtype).reshape(-1, d)
        p = _SOPProbabilities.apply(flat, unique.to(dtype), inverse, sops.contributions.detach().to(dtype),
                                    1.0 / temperature)  # fmt: skip
        return p.reshape(*x.shape[:-1], K)


def _log(p: Tensor) -> Tensor:
    return p.clamp(min=_TINY).log()


class _SOPObjective(nn.Module):
    """Memory bank + rank-consistent anchor draws shared by the [CLS] and patch objectives."""

    def __init__(
        self,
        memory_size: int,
        dim: int,
        num_anchors: int,
        num_neighbors: int,
        smoothing: float,
        contribution: Contribution,
        student_temp: float,
        anchor_keep_fraction: float,
        anchor_mode: Literal["random", "fixed"],
        clamp_contributions: bool,
        seed: int,
        objective_id: int,
        knn_chunk: int,
        per_rank_anchors: bool = False,
        track_indices: bool = False,
        search_dtype: SearchDtype = "float32",
    ):
        super().__init__()
        _check_search_dtype(search_dtype)
        self.search_dtype = search_dtype
        if num_anchors < 2:
            raise ValueError(f"num_anchors (K) must be >= 2, got {num_anchors}")
        if num_anchors > memory_size:
            raise ValueError(f"num_anchors={num_anchors} exceeds memory_size={memory_size}")
        if not 0 <= num_neighbors <= memory_size - num_anchors:
            raise ValueError(
                f"num_neighbors={num_neighbors} must be in [0, memory_size - num_anchors = {memory_size - num_anchors}]"
            )
        if not 0 < anchor_keep_fraction <= 1 or int(num_anchors * anchor_keep_fraction) < 2:
            raise ValueError(
                f"anchor_keep_fraction={anchor_keep_fraction} must be in (0, 1] and keep >= 2 of {num_anchors} anchors"
            )
        if anchor_mode not in ("random", "fixed"):
            raise ValueError(f"anchor_mode must be 'random' or 'fixed', got {anchor_mode!r}")
        if contribution not in ("soft", "onehot", "uniform"):
            raise ValueError(f"contribution must be 'soft', 'onehot' or 'uniform', got {contribution!r}")
        if student_temp <= 0:
            raise ValueError(f"student_temp must be > 0, got {student_temp}")
        self.memory = MemoryBank(
            memory_size, dim, seed=mix_seed(seed, objective_id, -1) % (1 << 31), track_indices=track_indices
        )
        self.num_anchors, self.num_neighbors = num_anchors, num_neighbors
        self.smoothing, self.contribution, self.clamp = smoothing, contribution, clamp_contributions
        self.student_temp, self.keep = student_temp, anchor_keep_fraction
        self.anchor_mode, self.seed, self.objective_id, self.knn_chunk = anchor_mode, seed, objective_id, knn_chunk
        self.per_rank_anchors = per_rank_anchors
        fixed = torch.randperm(memory_size, generator=torch.Generator().manual_seed(mix_seed(seed, objective_id)))
        self.register_buffer("fixed_anchors", fixed[:num_anchors].clone(), persistent=True)

    def anchors(self, step: int, task: int = 0) -> Tensor:
        """Anchor indices ``(K,)``: a random draw seeded by (seed, step, task, objective) — identical on
        every rank, or per rank with ``per_rank_anchors`` (§5) — or the fixed set drawn at construction
        (``anchor_mode="fixed"``)."""
        if self.anchor_mode == "fixed":
            return self.fixed_anchors
        parts = (self.seed, step, task, self.objective_id) + ((current_rank(),) if self.per_rank_anchors else ())
        g = torch.Generator().manual_seed(mix_seed(*parts))
        perm = torch.randperm(self.memory.size, generator=g)
        # drawn on the CPU (the same draw on any device); non_blocking: a blocking copy to a GPU waits for it
        return perm[: self.num_anchors].to(self.memory.embeddings.device, non_blocking=True)

    def build(self, step: int, task: int = 0) -> SOPs:
        sops = build_sops(
            self.memory.embeddings, self.anchors(step, task), self.num_neighbors, self.smoothing,
            self.contribution, self.clamp, self.knn_chunk, self.search_dtype,
        )  # fmt: skip
        if self.keep < 1.0:  # §3.5 code "low_energy": keep a uniformly random subset of the SOPs
            g = torch.Generator().manual_seed(mix_seed(self.seed, step, task, self.objective_id, 1))
            kept = torch.randperm(self.num_anchors, generator=g)[: int(self.num_anchors * self.keep)]
            kept = kept.to(sops.supports.device, non_blocking=True)
            sops = SOPs(sops.supports[kept], sops.contributions[kept], sops.rows[kept])
        # once for the student and teacher calls; with k = 0 each SOP is its anchor alone and the anchors are drawn
        # without repetition, so every support is distinct: no rows to compare (no count read back from the device)
        to_compare = sops if self.num_neighbors else sops._replace(rows=None)
        return sops._replace(distinct=distinct_supports(to_compare, self.memory.size))


class SOPLoss(_SOPObjective):
    """SOP [CLS] loss (§3): all cross-view pairs, ``num_tasks`` independent anchor draws averaged.

    ``forward(student (V·B, d), teacher (2B, d), teacher_temp, step)``, unit rows, view-major. Reads the
    memory as it is (the enqueue of this step happens afterwards, §5).
    """

    def __init__(
        self,
        memory_size: int = 65536,
        dim: int = 256,
        num_anchors: int = 4096,
        num_neighbors: int = 8,
        smoothing: float = 0.1,
        contribution: Contribution = "soft",
        student_temp: float = 0.1,
        num_tasks: int = 1,
        anchor_keep_fraction: float = 1.0,
        anchor_mode: Literal["random", "fixed"] = "random",
        clamp_contributions: bool = True,
        seed: int = 0,
        knn_chunk: int = 1024,
        per_rank_anchors: bool = False,
        track_indices: bool = False,
        search_dtype: SearchDtype = "float32",
    ):
        super().__init__(
            memory_size, dim, num_anchors, num_neighbors, smoothing, contribution, student_temp,
            anchor_keep_fraction, anchor_mode, clamp_contributions, seed, 0, knn_chunk, per_rank_anchors,
            track_indices, search_dtype,
        )  # fmt: skip
        if num_tasks < 1:
            raise ValueError(f"num_tasks must be >= 1, got {num_tasks}")
        self.num_tasks = num_tasks

    def forward(self, student: Tensor, teacher: Tensor, teacher_temp: float, step: int) -> Tensor:
        batch = teacher.shape[0] // 2
        if teacher.shape[0] % 2 or student.shape[0] % batch:
            raise ValueError(f"teacher rows {teacher.shape[0]} must be 2·B and student rows {student.shape[0]} k·B")
        total = student.new_zeros((), dtype=torch.float32)
        for task in range(self.num_tasks):
            sops = self.build(step, task)
            log_p_s = _log(sop_probabilities(student, sops, self.student_temp))
            with torch.no_grad():
                p_t = sop_probabilities(teacher.detach(), sops, teacher_temp)
            total = total + cross_view_mean(list(p_t.split(batch)), list(log_p_s.split(batch)))
        if self.training:
            self.stats = teacher_stats(p_t)  # of the last task: anchors change every step
        return total / self.num_tasks


class SOPMIMLoss(_SOPObjective):
    """SOP-MIM (§4): same-view masked patches against local SOPs of the patch memory.

    ``forward(student, teacher (2B, N, d), masks (2B, N), teacher_temp, step)``; ``student`` is dense
    ``(2B, N, d)`` or only the masked tokens ``(M, d)`` in row-major mask order. ``token_index`` ``(M,)``: the
    masked tokens' flat positions (:func:`~sop_lightning.losses.common.masked_token_index` of ``masks``), when
    the caller has them (it selected the student's tokens with them): a step then reads ``M`` on the host once.
    """

    def __init__(
        self,
        memory_size: int = 8192,
        dim: int = 256,
        num_anchors: int = 512,
        num_neighbors: int = 0,
        smoothing: float = 0.1,
        contribution: Contribution = "soft",
        student_temp: float = 0.1,
        anchor_mode: Literal["random", "fixed"] = "random",
        clamp_contributions: bool = True,
        seed: int = 0,
        knn_chunk: int = 1024,
        per_rank_anchors: bool = False,
        track_indices: bool = False,
        search_dtype: SearchDtype = "float32",
    ):
        super().__init__(
            memory_size, dim, num_anchors, num_neighbors, smoothing, contribution, student_temp, 1.0,
            anchor_mode, clamp_contributions, seed, 1, knn_chunk, per_rank_anchors, track_indices, search_dtype,
        )  # fmt: skip

    def forward(
        self,
        student: Tensor,
        teacher: Tensor,
        masks: Tensor,
        teacher_temp: float,
        step: int,
        token_index: Tensor | None = None,
    ) -> Tensor:
        masks = masks.flatten(1).bool()
        if teacher.shape[:2] != masks.shape:
            raise ValueError(f"teacher {tuple(teacher.shape)} and masks {tuple(masks.shape)} disagree on (2B, N)")
        student, index = masked_student_rows(student, masks, token_index)
        sops = self.build(step)
        log_p_s = _log(sop_probabilities(student, sops, self.student_temp))
        with torch.no_grad():
            p_t = sop_probabilities(select_tokens(teacher.detach(), index), sops, teacher_temp)
        if self.training and p_t.shape[0]:
            self.stats = teacher_stats(p_t)
        return masked_image_mean(cross_entropy(p_t, log_p_s), masks)
