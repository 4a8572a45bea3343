import math

import pytest
import torch

from sop_lightning.losses.dino import Center, DINOLoss, IBOTPatchLoss


def _softmax(row):
    m = max(row)
    e = [math.exp(v - m) for v in row]
    s = sum(e)
    return [v / s for v in e]


def _ce(p, q):
    return -sum(pi * math.log(qi) for pi, qi in zip(p, q) if pi > 0)


def _dino_reference(student, teacher, center, t_s, t_t, B):
    """Scalar-loop DINO loss (§6.1)."""
    V = len(student) // B
    total, pairs = 0.0, 0
    for q in range(2):
        for v in range(V):
            if v == q:
                continue
            for b in range(B):
                target = _softmax([(x - c) / t_t for x, c in zip(teacher[q * B + b], center)])
                pred = _softmax([x / t_s for x in student[v * B + b]])
                total += _ce(target, pred) / B
            pairs += 1
    return total / pairs


def test_dino_loss_matches_reference_and_updates_center():
    g = torch.Generator().manual_seed(0)
    B, V, K = 3, 4, 7
    s = torch.randn(V * B, K, generator=g, dtype=torch.float64)
    t = torch.randn(2 * B, K, generator=g, dtype=torch.float64)
    loss_fn = DINOLoss(K, student_temp=0.1, centering="logit", center_momentum=0.9).double()
    c0 = torch.randn(K, generator=g, dtype=torch.float64)
    loss_fn.center.center.copy_(c0)
    out = loss_fn(s, t, teacher_temp=0.04)
    ref = _dino_reference(s.tolist(), t.tolist(), c0.tolist(), 0.1, 0.04, B)
    assert out.item() == pytest.approx(ref, rel=1e-6)
    expected_center = [
        0.9 * c.item() + 0.1 * sum(t[r, j].item() for r in range(2 * B)) / (2 * B) for j, c in enumerate(c0)
    ]
    assert loss_fn.center.center.tolist() == pytest.approx(expected_center, rel=1e-6)
    # eval mode leaves the center alone
    loss_fn.eval()
    before = loss_fn.center.center.clone()
    loss_fn(s, t, teacher_temp=0.04)
    torch.testing.assert_close(loss_fn.center.center, before)


def test_dino_loss_gradient_only_to_student():
    s = torch.randn(8, 5, requires_grad=True)
    t = torch.randn(4, 5, requires_grad=True)
    DINOLoss(5)(s, t, 0.04).backward()
    assert s.grad is not None and t.grad is None


def test_ibot_patch_loss_matches_reference():
    g = torch.Generator().manual_seed(1)
    B2, N, K = 4, 5, 6
    s = torch.randn(B2, N, K, generator=g, dtype=torch.float64)
    t = torch.randn(B2, N, K, generator=g, dtype=torch.float64)
    masks = torch.rand(B2, N, generator=g) < 0.5
    masks[0] = False  # an image without masked patches still counts in the mean
    masks[1, 0] = True
    fn = IBOTPatchLoss(K, student_temp=0.1).double()
    c0 = torch.randn(K, generator=g, dtype=torch.float64)
    fn.center.center.copy_(c0)
    dense = fn(s, t, masks, teacher_temp=0.05)
    total = 0.0
    for b in range(B2):
        n = int(masks[b].sum())
        acc = 0.0
        for i in range(N):
            if masks[b, i]:
                target = _softmax([(x - c) / 0.05 for x, c in zip(t[b, i].tolist(), c0.tolist())])
                acc += _ce(target, _softmax([x / 0.1 for x in s[b, i].tolist()]))
        total += acc / max(1, n)
    assert dense.item() == pytest.approx(total / B2, rel=1e-6)
    # only-masked student rows give the same value
    fn.center.center.copy_(c0)
    assert fn(s[masks], t, masks, 0.05).item() == pytest.approx(dense.item(), rel=1e-9)
    # center = EMA of the mean over ALL patches
    expected = 0.9 * c0 + 0.1 * t.reshape(-1, K).mean(0)
    torch.testing.assert_close(fn.center.center, expected)
    # the caller's token index (what the methods pass): the same value, dense or selected student rows
    index = torch.tensor([b * N + i for b in range(B2) for i in range(N) if masks[b, i]])
    for student in (s, s[masks]):
        fn.center.center.copy_(c0)
        assert fn(student, t, masks, 0.05, token_index=index).item() == pytest.approx(dense.item(), rel=1e-9)
    with pytest.raises(ValueError, match=f"student_logits has 2 rows but masks select {len(index)} tokens"):
        fn(s[masks][:2], t, masks, 0.05, token_index=index)


def test_probability_centering_keeps_a_distribution():
    c = Center(6, mode="prob")
    torch.testing.assert_close(c.center, torch.full((6,), 1 / 6))
    logits = torch.randn(10, 6)
    c.update(logits, 0.1)
    p = c.teacher_probs(logits, 0.1)
    torch.testing.assert_close(p.sum(-1), torch.ones(10))
    # divisive form: p ∝ softmax(l/τ) / c̄
    ref = torch.softmax(logits / 0.1, -1) / c.center
    torch.testing.assert_close(p, ref / ref.sum(-1, keepdim=True))
    none = Center(6, mode="none")
    torch.testing.assert_close(none.teacher_probs(logits, 0.1), torch.softmax(logits / 0.1, -1))


def test_errors():
    with pytest.raises(ValueError, match="centering"):
        Center(4, mode="bad")
    with pytest.raises(ValueError, match="student_temp"):
        DINOLoss(4, student_temp=0)
    with pytest.raises(ValueError, match="masks"):
        IBOTPatchLoss(4)(torch.randn(3, 4), torch.randn(2, 5, 4), torch.ones(2, 5, dtype=torch.bool), 0.04)


@pytest.mark.parametrize("views", [2, 3, 6])
def test_cross_view_mean_equals_the_mean_over_pairs(views):
    """Against the pair loop written here (float64): value and gradient; a target's zeros may face -inf
    log-probabilities of other views (0 log 0 = 0), and a view's -inf against its own target is ignored."""
    from sop_lightning.losses.common import cross_view_mean

    g = torch.Generator().manual_seed(views)
    B, K = 3, 5
    targets = torch.softmax(torch.randn(2, B, K, generator=g, dtype=torch.float64), -1)
    targets[0, 0, 1] = 0.0
    logits = torch.randn(views, B, K, generator=g, dtype=torch.float64)
    log_preds = torch.log_softmax(logits, -1)
    log_preds[views - 1, 0, 1] = float("-inf")  # faces target 0's zero; with 2 views view 1 is target 1's own
    if views > 2:
        targets[1, 0, 1] = 0.0
    log_preds.requires_grad_(True)
    got = cross_view_mean(list(targets), list(log_preds))
    pairs, want = 0, 0.0
    for q in range(2):
        for v in range(views):
            if v != q:
                terms = [-(t * lp) if t > 0 else 0.0 for t, lp in zip(targets[q].flatten(), log_preds[v].flatten())]
                want = want + sum(terms) / B
                pairs += 1
    want = want / pairs
    assert torch.isfinite(got)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=0)
    (grad_got,) = torch.autograd.grad(got, log_preds)
    grad_want = torch.zeros_like(log_preds)
    for q in range(2):
        for v in range(views):
            if v != q:
                grad_want[v] -= targets[q] / (B * pairs)
    torch.testing.assert_close(grad_got, grad_want, rtol=1e-12, atol=1e-15)


def test_masked_token_selection_matches_boolean_indexing():
    """``select_tokens(x, masked_token_index(masks))`` is ``x[masks]`` (values and gradients), and
    ``masked_image_mean`` the per-image loop written here, an image without masked tokens counting as 0."""
    from sop_lightning.losses.common import masked_image_mean, masked_token_index, select_tokens

    g = torch.Generator().manual_seed(2)
    masks = torch.rand(5, 7, generator=g) < 0.4
    masks[2] = False
    x = torch.randn(5, 7, 3, generator=g, dtype=torch.float64, requires_grad=True)
    index = masked_token_index(masks)
    assert index.tolist() == [b * 7 + i for b in range(5) for i in range(7) if masks[b, i]]
    picked = select_tokens(x, index)
    assert torch.equal(picked, x[masks])
    w = torch.randn(picked.shape, generator=g, dtype=torch.float64)
    (grad,) = torch.autograd.grad((picked * w).sum(), x)
    (ref,) = torch.autograd.grad((x[masks] * w).sum(), x)
    assert torch.equal(grad, ref)
    per_token = torch.rand(len(index), generator=g, dtype=torch.float64)
    it = iter(per_token.tolist())
    sums = [sum(next(it) for i in range(7) if masks[b, i]) for b in range(5)]
    want = sum(t / max(1, int(masks[b].sum())) for b, t in enumerate(sums)) / 5
    assert masked_image_mean(per_token, masks).item() == pytest.approx(want, rel=1e-12)
