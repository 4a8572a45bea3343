import math

import mpmath
import pytest
import torch

from sop_lightning import DINO, DINOvMF, IBOTvMF
from sop_lightning.losses.dino import DINOLoss
from sop_lightning.losses.vmf import log_vmf_normalizer, vmf_bias, vmf_log_normalizer_derivative, vmf_logits

# ALGORITHMS.md §7.4: (p, κ, exact log C_p(κ), ℓ_A)
TABLE = [
    (16, 0.5, -1.3336340190, -1.3453722357), (16, 1, -1.3570208777, -1.3682947312),
    (16, 10, -4.0572990473, -4.0528854238), (16, 25, -13.6541837006, -13.6498968282),
    (16, 100, -79.0004224044, -78.9991794896), (16, 1000, -961.9515263053, -961.9514012560),
    (64, 1, 40.7599084501, 40.7572284897), (64, 10, 39.9954458219, 39.9934711894),
    (64, 25, 36.1909674061, 36.1909046284), (64, 100, -8.0407654392, -8.0397430313),
    (256, 0.5, 344.3343873737, 344.3337312373), (256, 1, 344.3329225438, 344.3322664983),
    (256, 5, 344.2860567654, 344.2854036198), (256, 10, 344.1397107151, 344.1390665565),
    (256, 25, 343.1198771013, 343.1192928057), (256, 50, 339.5401447906, 339.5397375850),
    (256, 100, 326.0486721899, 326.0486480009), (256, 1000, -345.5329358848, -345.5328151056),
    (256, 10000, -9059.2044615561, -9059.2044490598), (768, 1, 1458.7205000766, 1458.7202825006),
    (768, 25, 1458.3144647984, 1458.3142499757), (768, 100, 1452.2645803392, 1452.2644033120),
    (768, 1000, 1016.8174137588, 1016.8175056193),
]  # fmt: skip


def _mp_log_c(p, kappa):
    mpmath.mp.dps = 60
    nu = mpmath.mpf(p) / 2 - 1
    k = mpmath.mpf(kappa)
    return float(nu * mpmath.log(k) - mpmath.mpf(p) / 2 * mpmath.log(2 * mpmath.pi) - mpmath.log(mpmath.besseli(nu, k)))


@pytest.mark.parametrize("p,kappa,exact,approx", TABLE)
def test_exact_and_approx_against_table(p, kappa, exact, approx):
    k = torch.tensor([kappa], dtype=torch.float64)
    assert log_vmf_normalizer(k, p, "exact").item() == pytest.approx(exact, abs=1e-9)
    assert log_vmf_normalizer(k, p, "approx").item() == pytest.approx(approx, abs=1e-6)


def test_exact_against_mpmath_and_the_zero_limit():
    for p, kappa in ((256, 14.2857), (768, 50.0), (1024, 3.0), (1024, 10000.0)):
        got = log_vmf_normalizer(torch.tensor([kappa], dtype=torch.float64), p, "exact").item()
        assert got == pytest.approx(_mp_log_c(p, kappa), abs=1e-9 * max(1.0, abs(got) / 1e3))
    for p in (16, 64, 256, 768):
        limit = math.lgamma(p / 2) - math.log(2) - p / 2 * math.log(math.pi)
        zero = torch.zeros(1, dtype=torch.float64)
        assert log_vmf_normalizer(zero, p, "exact").item() == pytest.approx(limit, abs=1e-9)


def test_approximation_error_bounds_p256():
    kappa = torch.cat([torch.linspace(0, 100, 201), torch.logspace(2, 4, 50)]).double()
    exact = log_vmf_normalizer(kappa, 256, "exact")
    err_a = log_vmf_normalizer(kappa, 256, "approx") - exact
    err_a1 = log_vmf_normalizer(kappa, 256, "approx1") - exact
    # §7.4 states "< 7e-4" for ℓ_A and "< 2e-6" for ℓ_A1; measured: |ℓ_A - exact| <= 6.6e-4, but its
    # κ-dependent spread (what survives a softmax) reaches 9.0e-4, and ℓ_A1 peaks at 2.02e-6 near κ = 83.5.
    assert err_a.abs().max() < 7e-4
    assert (err_a - err_a[0]).abs().max() < 1e-3
    assert err_a1.abs().max() < 2.1e-6


def test_derivative_matches_bessel_ratio():
    for kappa in (1.0, 10.0, 25.0, 100.0):
        mpmath.mp.dps = 40
        ratio = -float(mpmath.besseli(128, kappa) / mpmath.besseli(127, kappa))
        k = torch.tensor([kappa], dtype=torch.float64, requires_grad=True)
        log_vmf_normalizer(k, 256).sum().backward()
        assert k.grad.item() == pytest.approx(vmf_log_normalizer_derivative(k.detach(), 256).item(), rel=1e-12)
        assert k.grad.item() == pytest.approx(ratio, rel=2e-4)


def test_fp32_and_bf16_safety_at_large_kappa():
    k = torch.tensor([0.0, 1.0, 1e4], dtype=torch.float32, requires_grad=True)
    out = log_vmf_normalizer(k, 1024)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    out.sum().backward()
    assert torch.isfinite(k.grad).all()
    y = torch.nn.functional.normalize(torch.randn(4, 256), dim=1)
    w = torch.randn(8, 256) * 1e4 * 0.04 / 16  # norms ≈ 400 -> κ = 1e4 at τ = 0.04
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = vmf_logits(y.bfloat16(), w.bfloat16(), 0.04)
    assert logits.dtype == torch.float32 and torch.isfinite(logits).all()


def test_equal_norms_give_dino_probabilities():
    y = torch.nn.functional.normalize(torch.randn(6, 16, dtype=torch.float64), dim=1)
    w = torch.nn.functional.normalize(torch.randn(10, 16, dtype=torch.float64), dim=1) * 3.0
    a = vmf_logits(y, w, 0.1)
    torch.testing.assert_close(torch.softmax(a.double(), -1), torch.softmax(y @ w.T / 0.1, -1), atol=1e-6, rtol=0)
    diff = a.double() - y @ w.T / 0.1
    torch.testing.assert_close(diff, diff[:, :1].expand_as(diff), atol=1e-4, rtol=0)


def test_gradient_reaches_prototype_norms():
    loss = DINOLoss(5, centering="prob")
    norms = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0], requires_grad=True)
    bias = vmf_bias(norms, 16, 0.1)
    loss(torch.randn(8, 5), torch.randn(4, 5), 0.04, student_bias=bias).backward()
    assert norms.grad is not None and norms.grad.abs().sum() > 0


def test_vmf_methods_defaults():
    tiny = dict(backbone="vit_tiny_patch16_224", img_size=28, patch_size=4, embed_dim=32, depth=1, num_heads=2,
                hidden_dim=32, out_dim=16, num_prototypes=8)  # fmt: skip
    m = DINOvMF(**tiny)
    assert m.vmf and not m.student.prototypes.norm_last_layer and m.dino_loss.center.mode == "prob"
    assert DINO(**tiny).dino_loss.center.mode == "logit" and DINO(**tiny).student.prototypes.norm_last_layer
    i = IBOTvMF(**tiny)
    assert i.patch_loss.center.mode == "prob" and i.dino_loss.center.mode == "prob"
    s_bias, t_bias = m.prototype_biases(0.04)
    assert s_bias.shape == (8,) and not t_bias.requires_grad and s_bias.requires_grad


def test_errors():
    with pytest.raises(ValueError, match="dim must be >= 3"):
        log_vmf_normalizer(torch.ones(1), 2)
    with pytest.raises(ValueError, match="method"):
        log_vmf_normalizer(torch.ones(1), 16, "bessel")


def _ell_a_float64(kappa: torch.Tensor, p: int) -> torch.Tensor:
    """§7.3 ℓ_A written out again in float64, independently of the library."""
    nu = p / 2 - 1
    s = torch.sqrt(kappa.double() ** 2 + nu**2)
    return -s + nu * torch.log(nu + s) + 0.5 * torch.log(s) - (p - 1) / 2 * math.log(2 * math.pi)


def test_float64_stays_float64_and_low_precision_computes_in_fp32():
    g = torch.Generator().manual_seed(0)
    y = torch.nn.functional.normalize(torch.randn(5, 256, generator=g, dtype=torch.float64), dim=1)
    w = (
        torch.randn(7, 256, generator=g, dtype=torch.float64)
        * torch.linspace(0.5, 3.0, 7, dtype=torch.float64)[:, None]
    )
    tau = 0.1
    reference = y @ w.T / tau + _ell_a_float64(w.norm(dim=1) / tau, 256)
    got = vmf_logits(y, w, tau)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, reference, rtol=1e-12, atol=1e-10)  # fp32 would be off by ~1e-5
    bias = vmf_bias(w.norm(dim=1), 256, tau)
    assert bias.dtype == torch.float64
    torch.testing.assert_close(bias, _ell_a_float64(w.norm(dim=1) / tau, 256), rtol=1e-12, atol=1e-10)
    for low in (torch.bfloat16, torch.float16):
        assert vmf_logits(y.to(low), w.to(low), tau).dtype == torch.float32
        assert vmf_bias(w.norm(dim=1).to(low), 256, tau).dtype == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert vmf_logits(y.float(), w.float(), tau).dtype == torch.float32


def test_dino_loss_keeps_float64():
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(8, 16, generator=g, dtype=torch.float64), torch.randn(4, 16, generator=g, dtype=torch.float64)
    bias = torch.randn(16, generator=g, dtype=torch.float64)
    loss = DINOLoss(16, centering="prob")(s, t, 0.04, bias, bias)
    assert loss.dtype == torch.float64
    # reference: centre is uniform 1/K at start, so "prob" centering is a no-op here
    log_ps = torch.log_softmax(s / 0.1 + bias, -1).split(2)
    pt = torch.softmax(t / 0.04 + bias, -1).split(2)
    pairs = [-(pt[q] * log_ps[v]).sum(-1).mean() for q in range(2) for v in range(4) if v != q]
    torch.testing.assert_close(loss, torch.stack(pairs).mean(), rtol=1e-12, atol=1e-12)
