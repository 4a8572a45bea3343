import math

import pytest
import torch
import torch.nn.functional as F

import sop_lightning.losses.sop as sop_module
from sop_lightning.losses import koleo_loss
from sop_lightning.losses.sop import SOPLoss, SOPMIMLoss, SOPs, build_sops, sop_probabilities, sop_rows


def _unit(*shape, seed=0):
    return F.normalize(torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64), dim=-1)


def _dense_y(contributions: torch.Tensor) -> torch.Tensor:
    """Y[(j,i), j] = c_ji and Y[(j,i), j'] = (1 - c_ji)/(K-1), rows renormalised (§3.2 step 6)."""
    K, S = contributions.shape
    Y = torch.zeros(K * S, K, dtype=torch.float64)
    for j in range(K):
        for i in range(S):
            c = float(contributions[j, i])
            for jj in range(K):
                Y[j * S + i, jj] = c if jj == j else (1 - c) / (K - 1)
    return Y / Y.sum(1, keepdim=True)


def test_probabilities_match_dense_y():
    memory = _unit(50, 8, seed=1)
    sops = build_sops(memory, torch.tensor([3, 10, 20, 33, 41]), num_neighbors=3, contribution="soft")
    x = _unit(7, 8, seed=2)
    D = sops.supports.reshape(-1, 8).double()
    dense = torch.softmax(x @ D.T / 0.1, -1) @ _dense_y(sops.contributions.double())
    got = sop_probabilities(x, sops, 0.1)
    torch.testing.assert_close(got.double(), dense, atol=1e-6, rtol=0)
    torch.testing.assert_close(got.sum(-1), torch.ones(7, dtype=got.dtype), atol=1e-6, rtol=0)
    assert (got >= 0).all()


@pytest.mark.parametrize("search_block", [None, 15])
def test_build_sops_matches_brute_force_neighbours(search_block, monkeypatch):
    """Also with the pool searched in slices of 5 rows (15 scores a block for 3 anchors): the slices' top-k
    merged must be the top-k of the whole pool."""
    if search_block is not None:
        monkeypatch.setattr(sop_module, "_CPU_SEARCH_BLOCK", search_block)
    memory = _unit(40, 6, seed=3).float()
    anchors = torch.tensor([0, 5, 17, 39])
    k = 4
    sops = build_sops(memory, anchors, k, smoothing=0.1, contribution="soft", chunk_size=3)
    for j, a in enumerate(anchors.tolist()):
        pool = [r for r in range(40) if r not in anchors.tolist()]
        cos = sorted(((float(memory[a] @ memory[r]), r) for r in pool), reverse=True)[:k]
        assert torch.equal(sops.supports[j, 0], memory[a])
        for i, (s, r) in enumerate(cos, start=1):
            torch.testing.assert_close(sops.supports[j, i], memory[r])
            assert float(sops.contributions[j, i]) == pytest.approx(min(max(s, 0.0), 1.0), abs=1e-6)
        assert float(sops.contributions[j, 0]) == pytest.approx(0.9)
        assert sop_rows(memory, anchors, k, chunk_size=3)[j].tolist() == [a] + [r for _, r in cos]


@pytest.mark.parametrize("search_dtype", ["float32", "bfloat16"])
def test_neighbours_skip_anchors_in_blocks_of_anchors_and_repeated_anchors(search_dtype, monkeypatch):
    """The search masks the anchors' columns instead of gathering a pool: with slices of 5 rows the first two
    slices hold nothing but anchors (fewer candidates than asked for), and an anchor drawn twice is still
    never a neighbour. Against the brute force written here."""
    monkeypatch.setattr(sop_module, "_CPU_SEARCH_BLOCK", 15)
    memory = _unit(40, 6, seed=7).float()
    anchors = torch.tensor([0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 9, 30])
    k = 4
    rows = sop_rows(memory, anchors, k, chunk_size=3) if search_dtype == "float32" else None
    sops = build_sops(memory, anchors, k, chunk_size=3, search_dtype=search_dtype)
    pool = [r for r in range(40) if r not in anchors.tolist()]
    for j, a in enumerate(anchors.tolist()):
        top = [r for _, r in sorted(((float(memory[a] @ memory[r]), r) for r in pool), reverse=True)[:k]]
        assert sops.rows[j].tolist() == [a, *top]
        if rows is not None:
            assert rows[j].tolist() == [a, *top]
        torch.testing.assert_close(sops.supports[j, 1:], memory[top])


def test_contribution_modes_and_clamp():
    memory = _unit(30, 4, seed=4).float()
    anchors = torch.tensor([1, 2, 3])
    assert torch.all(build_sops(memory, anchors, 2, contribution="onehot").contributions == 1)
    assert torch.allclose(build_sops(memory, anchors, 2, contribution="uniform").contributions, torch.tensor(0.9))
    raw = build_sops(memory, anchors, 26, clamp=False).contributions
    assert (raw < 0).any()  # in 4-d, far neighbours have negative cosine
    clamped = build_sops(memory, anchors, 26).contributions
    assert (clamped >= 0).all() and (clamped <= 1).all()


def test_invariant_k0_is_affine_map_of_anchor_softmax():
    memory = _unit(20, 5, seed=5)
    anchors = torch.tensor([0, 4, 9, 13])
    K, eps = 4, 0.1
    sops = build_sops(memory, anchors, 0, smoothing=eps)
    x = _unit(6, 5, seed=6)
    pi = torch.softmax(x @ memory[anchors].T / 0.2, -1)
    expected = (1 - eps - eps / (K - 1)) * pi + eps / (K - 1)
    torch.testing.assert_close(sop_probabilities(x, sops, 0.2).double(), expected, atol=1e-6, rtol=0)


def test_invariant_onehot_sums_support_probabilities():
    memory = _unit(30, 5, seed=7)
    sops = build_sops(memory, torch.tensor([2, 8, 14]), 2, contribution="onehot")
    x = _unit(4, 5, seed=8)
    pi = torch.softmax(x @ sops.supports.reshape(-1, 5).T / 0.1, -1).view(4, 3, 3)
    torch.testing.assert_close(sop_probabilities(x, sops, 0.1).double(), pi.sum(-1), atol=1e-6, rtol=0)


def _loss_reference(student, teacher, sops, ts, tt):
    B = teacher.shape[0] // 2
    ps, pt = sop_probabilities(student, sops, ts), sop_probabilities(teacher, sops, tt)
    V = student.shape[0] // B
    total, pairs = 0.0, 0
    for q in range(2):
        for v in range(V):
            if v != q:
                total += -(pt[q * B : (q + 1) * B] * ps[v * B : (v + 1) * B].log()).sum(-1).mean()
                pairs += 1
    return total / pairs


def test_sop_loss_value_and_permutation_invariance():
    torch.manual_seed(0)
    loss = SOPLoss(memory_size=64, dim=8, num_anchors=6, num_neighbors=3)
    student, teacher = _unit(12, 8, seed=9).float(), _unit(6, 8, seed=10).float()
    value = loss(student, teacher, 0.04, step=7)
    sops = loss.build(7)
    assert value.item() == pytest.approx(float(_loss_reference(student, teacher, sops, 0.1, 0.04)), rel=1e-5)
    perm = torch.randperm(6)
    inner = torch.tensor([0, 2, 1, 3])
    permuted = SOPs(sops.supports[perm][:, inner], sops.contributions[perm][:, inner])
    ref = _loss_reference(student, teacher, permuted, 0.1, 0.04)
    assert value.item() == pytest.approx(float(ref), rel=1e-5)


def test_no_gradient_into_memory_or_teacher():
    loss = SOPLoss(memory_size=64, dim=8, num_anchors=6, num_neighbors=3)
    loss.memory.embeddings.requires_grad_(True)  # even if someone asks, nothing flows there
    student = _unit(12, 8, seed=11).float().requires_grad_(True)
    teacher = _unit(6, 8, seed=12).float().requires_grad_(True)
    loss(student, teacher, 0.04, step=0).backward()
    assert student.grad is not None and student.grad.abs().sum() > 0
    assert teacher.grad is None and loss.memory.embeddings.grad is None


def test_anchor_draws_are_seeded_by_step_and_distinct():
    loss = SOPLoss(memory_size=100, dim=4, num_anchors=10, num_neighbors=2, seed=3)
    again = SOPLoss(memory_size=100, dim=4, num_anchors=10, num_neighbors=2, seed=3)
    assert torch.equal(loss.anchors(5), again.anchors(5))
    assert not torch.equal(loss.anchors(5), loss.anchors(6))
    assert len(set(loss.anchors(5).tolist())) == 10
    fixed = SOPLoss(memory_size=100, dim=4, num_anchors=10, num_neighbors=2, anchor_mode="fixed")
    assert torch.equal(fixed.anchors(1), fixed.anchors(2))


def test_anchor_keep_fraction_and_tasks():
    loss = SOPLoss(memory_size=200, dim=4, num_anchors=20, num_neighbors=2, anchor_keep_fraction=0.5, num_tasks=3)
    assert loss.build(0).supports.shape == (10, 3, 4)
    s, t = _unit(8, 4, seed=1).float(), _unit(4, 4, seed=2).float()
    assert torch.isfinite(loss(s, t, 0.04, 0))


def test_sop_mim_loss_reference():
    mim = SOPMIMLoss(memory_size=64, dim=8, num_anchors=5, num_neighbors=0)
    student, teacher = _unit(4, 6, 8, seed=13).float(), _unit(4, 6, 8, seed=14).float()
    masks = torch.zeros(4, 6, dtype=torch.bool)
    masks[0, :3] = True
    masks[2, 5] = True
    value = mim(student, teacher, masks, 0.05, step=1)
    sops = mim.build(1)
    total = 0.0
    for b in range(4):
        n = int(masks[b].sum())
        acc = 0.0
        for i in range(6):
            if masks[b, i]:
                pt = sop_probabilities(teacher[b, i], sops, 0.05)
                ps = sop_probabilities(student[b, i], sops, 0.1)
                acc += float(-(pt * ps.log()).sum())
        total += acc / max(1, n)
    assert value.item() == pytest.approx(total / 4, rel=1e-5)
    index = torch.tensor([0, 1, 2, 2 * 6 + 5])  # the methods' call: selected rows and their token index
    assert mim(student[masks], teacher, masks, 0.05, step=1, token_index=index).item() == pytest.approx(value.item())
    with pytest.raises(ValueError, match="student has 3 rows but masks select 4 tokens"):
        mim(student[masks][:3], teacher, masks, 0.05, step=1)


def test_koleo_reference():
    x = _unit(5, 3, seed=15).float()
    ref = 0.0
    for i in range(5):
        d = min(float((x[i] - x[j]).norm()) for j in range(5) if j != i)
        ref -= math.log(d + 1e-8) / 5
    assert koleo_loss(x).item() == pytest.approx(ref, rel=1e-5)


def test_errors():
    memory = _unit(10, 4).float()
    with pytest.raises(ValueError, match="K must be >= 2"):
        build_sops(memory, torch.tensor([1]), 2)
    with pytest.raises(ValueError, match="exceeds the memory size"):
        build_sops(memory, torch.arange(11) % 10, 0)
    with pytest.raises(ValueError, match="num_neighbors=8"):
        build_sops(memory, torch.tensor([0, 1, 2]), 8)
    with pytest.raises(ValueError, match="num_anchors \\(K\\) must be >= 2"):
        SOPLoss(memory_size=10, dim=4, num_anchors=1)
    with pytest.raises(ValueError, match="exceeds memory_size"):
        SOPLoss(memory_size=10, dim=4, num_anchors=11, num_neighbors=0)
    with pytest.raises(ValueError, match="num_neighbors=10"):
        SOPLoss(memory_size=10, dim=4, num_anchors=2, num_neighbors=10)


def test_probability_gradient_matches_dense_reference():
    memory = _unit(40, 6, seed=21)
    sops = build_sops(memory, torch.tensor([1, 7, 19, 30]), 2, contribution="soft")
    Y = _dense_y(sops.contributions.double())
    D = sops.supports.reshape(-1, 6).double()
    x = _unit(5, 6, seed=22).requires_grad_(True)
    x_ref = x.detach().clone().requires_grad_(True)
    weights = torch.randn(5, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    (sop_probabilities(x, sops, 0.2).double().log() * weights).sum().backward()
    ((torch.softmax(x_ref @ D.T / 0.2, -1) @ Y).log() * weights).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, atol=1e-7, rtol=1e-6)
    # batched leading dimensions keep their shape
    assert sop_probabilities(_unit(2, 3, 6, seed=4), sops, 0.2).shape == (2, 3, 4)


def test_shared_supports_are_scored_once_with_the_dense_result_and_gradient():
    """A small bank forces repeated rows (4 anchors x 6 neighbours among 8 rows): probabilities and gradient
    still equal the dense softmax over all K(k+1) columns times Y, in float64."""
    from sop_lightning.losses.sop import distinct_supports

    memory = _unit(12, 6, seed=31)
    sops = build_sops(memory, torch.tensor([0, 3, 7, 11]), 6, contribution="soft")
    unique, inverse = distinct_supports(sops)
    assert unique.shape[0] < 4 * 7  # rows do repeat
    torch.testing.assert_close(unique[inverse], sops.supports.reshape(-1, 6))
    # the distinct rows ascending, as torch.unique numbers them; the same with the bank's size as the bound
    rows, expected_inverse = torch.unique(sops.rows.reshape(-1), return_inverse=True)
    assert torch.equal(inverse, expected_inverse) and torch.equal(unique, memory[rows])
    bounded = distinct_supports(sops, num_rows=12)
    assert torch.equal(bounded[0], unique) and torch.equal(bounded[1], inverse)
    Y = _dense_y(sops.contributions.double())
    D = sops.supports.reshape(-1, 6).double()
    x = _unit(9, 6, seed=32).requires_grad_(True)
    x_ref = x.detach().clone().requires_grad_(True)
    weights = torch.randn(9, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    got = sop_probabilities(x, sops, 0.1)
    expected = torch.softmax(x_ref @ D.T / 0.1, -1) @ Y
    torch.testing.assert_close(got, expected, atol=1e-12, rtol=1e-10)
    (got.log() * weights).sum().backward()
    (expected.log() * weights).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, atol=1e-10, rtol=1e-8)
    # without the rows (SOPs built by hand) every column is scored: the same numbers
    plain = sop_probabilities(x.detach(), SOPs(sops.supports, sops.contributions), 0.1)
    torch.testing.assert_close(plain, got.detach(), atol=1e-12, rtol=1e-10)


def test_per_rank_anchors_differ_between_ranks(monkeypatch):

    shared = SOPLoss(memory_size=100, dim=4, num_anchors=10, num_neighbors=2)
    per_rank = SOPLoss(memory_size=100, dim=4, num_anchors=10, num_neighbors=2, per_rank_anchors=True)
    draws = {}
    for r in (0, 1):
        monkeypatch.setattr(sop_module, "current_rank", lambda r=r: r)
        draws[r] = (shared.anchors(3), per_rank.anchors(3))
    assert torch.equal(draws[0][0], draws[1][0])
    assert not torch.equal(draws[0][1], draws[1][1])


@pytest.mark.parametrize("search_dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("search_block", [None, 200 * 300])
def test_half_precision_search_picks_the_exact_neighbours_except_near_ties(search_dtype, search_block, monkeypatch):
    """Against a float64 brute force written here: every chosen neighbour set equals the exact top-k unless
    the k-th and (k+1)-th exact cosines are closer than the search dtype's resolution; the returned
    contributions (cosines) are the fp32 values of the chosen rows. Also with the pool searched in slices of
    300 rows."""
    if search_block is not None:
        monkeypatch.setattr(sop_module, "_CPU_SEARCH_BLOCK", search_block)
    g = torch.Generator().manual_seed(0)
    M, d, K, k = 3000, 64, 200, 8
    memory = torch.nn.functional.normalize(torch.randn(M, d, generator=g), dim=1)
    anchor_idx = torch.randperm(M, generator=g)[:K]
    sops = build_sops(memory, anchor_idx, k, search_dtype=search_dtype)
    ref = build_sops(memory, anchor_idx, k)  # fp32 search
    eps = torch.finfo(getattr(torch, search_dtype)).eps
    exact_mismatch = 0
    mem64 = memory.double()
    pool = torch.ones(M, dtype=torch.bool)
    pool[anchor_idx] = False
    for j in range(K):
        cos = mem64[pool] @ mem64[anchor_idx[j]]
        rows = pool.nonzero().squeeze(1)
        order = cos.argsort(descending=True)
        top = set(rows[order[:k]].tolist())
        got = {int(torch.nonzero((memory == row).all(1))[0]) for row in sops.supports[j, 1:]}
        if got != top:
            exact_mismatch += 1
            gap = float(cos[order[k - 1]] - cos[order[k]])
            assert gap < 4 * eps, (j, gap)  # only a near tie may differ
        chosen = sops.supports[j, 1:].double() @ mem64[anchor_idx[j]]
        torch.testing.assert_close(sops.contributions[j, 1:].double(), chosen.clamp(0, 1), atol=1e-6, rtol=0)
    assert exact_mismatch <= K // 20
    same = (sops.supports == ref.supports).all(-1).all(-1).float().mean()
    assert same >= 0.95


def test_auto_search_dtype_follows_the_hardware(monkeypatch):
    """``"auto"``: bf16 on CPUs with native bf16 products, fp32 on others and on devices without a rule;
    explicit dtypes pass through; unknown names are refused with the argument named."""
    from sop_lightning.losses.sop import resolve_search_dtype

    cpu = torch.device("cpu")
    for bf16, amx, want in [(True, False, "bfloat16"), (False, True, "bfloat16"), (False, False, "float32")]:
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda bf16=bf16: bf16)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda amx=amx: amx)
        assert resolve_search_dtype("auto", cpu) == want
    assert resolve_search_dtype("float16", cpu) == "float16"
    assert resolve_search_dtype("auto", torch.device("meta")) == "float32"
    with pytest.raises(ValueError, match="search_dtype must be .* got 'bf16'"):
        resolve_search_dtype("bf16", cpu)
    # the losses accept it and, on a CPU without bf16, search exactly as fp32
    memory = F.normalize(torch.randn(300, 16, generator=torch.Generator().manual_seed(0)), dim=1)
    anchors = torch.arange(0, 300, 10)
    auto = build_sops(memory, anchors, 4, search_dtype="auto")
    assert torch.equal(auto.rows, build_sops(memory, anchors, 4).rows)
