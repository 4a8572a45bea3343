"""von Mises–Fisher normaliser and vMF-corrected logits (ALGORITHMS.md §7).

``log C_p(κ) = ν log κ − (p/2) log 2π − log I_ν(κ)``, ``ν = p/2 − 1``. ``approx`` is the leading term
of the uniform large-order expansion of ``I_ν`` (DLMF 10.41.3), finite at κ = 0, fp32-safe and
differentiable; ``approx1`` adds its first correction; ``exact`` sums the Bessel series in the log
domain in float64 (reference path for tests and diagnostics; no gradient needed).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor

from .common import at_least_fp32, compute_dtype

__all__ = ["log_vmf_normalizer", "vmf_logits", "vmf_log_normalizer_derivative", "vmf_bias"]

Method = Literal["approx", "approx1", "exact"]


def _check_dim(dim: int) -> float:
    if dim < 3:
        raise ValueError(f"dim must be >= 3 (sphere S^(p-1) with p = dim; ν = p/2 - 1 > 0), got {dim}")
    return dim / 2.0 - 1.0


def _approx(kappa: Tensor, dim: int, first_correction: bool) -> Tensor:
    nu = _check_dim(dim)
    k = at_least_fp32(kappa).clamp(min=0.0)
    s = torch.sqrt(k * k + nu * nu)  # hypot(ν, κ); hypot lacks a double-backward on some builds
    ell = -s + nu * torch.log(nu + s) + 0.5 * torch.log(s) - 0.5 * (dim - 1) * math.log(2 * math.pi)
    if first_correction:
        t = nu / s
        ell = ell - torch.log1p((3 * t - 5 * t**3) / (24 * nu))
    return ell


@torch.no_grad()
def _exact(kappa: Tensor, dim: int, chunk: int = 64) -> Tensor:
    """Series ``log I_ν(κ) = ν log(κ/2) − lgamma(ν+1) + log Σ_m (κ²/4)^m / (m! (ν+1)_m)`` in float64."""
    nu = _check_dim(dim)
    k = kappa.detach().to(torch.float64).clamp(min=0.0).cpu().flatten()
    out = torch.empty_like(k)
    # ν log κ − ν log(κ/2) = ν log 2, so log C = ν log 2 + lgamma(ν+1) − (p/2) log 2π − log Σ_m t_m.
    const = nu * math.log(2.0) + math.lgamma(nu + 1.0) - 0.5 * dim * math.log(2 * math.pi)
    for start in range(0, k.numel(), chunk):
        kc = k[start : start + chunk]
        kmax = float(kc.max()) if kc.numel() else 0.0
        terms = int(kmax + 30.0 * math.sqrt(kmax) + 80)  # the terms peak near m ≈ κ/2 and decay past it
        m = torch.arange(terms, dtype=torch.float64)
        log_x = 2.0 * torch.log(kc / 2.0).unsqueeze(1)  # log(κ²/4); -inf at κ = 0 keeps only m = 0
        log_t = m * log_x - torch.lgamma(m + 1) - (torch.lgamma(nu + m + 1) - math.lgamma(nu + 1))
        log_t[:, 0] = 0.0
        out[start : start + chunk] = const - torch.logsumexp(log_t, dim=1)
    return out.view(kappa.shape).to(kappa.device)


def log_vmf_normalizer(kappa: Tensor, dim: int, method: Method = "approx") -> Tensor:
    """``log C_p(κ)`` elementwise, **including** its additive constant (§7.3–7.4).

    Args:
        kappa: concentrations ``κ ≥ 0`` (any shape; negative values are clamped to 0).
        dim: ``p``, the ambient dimension of the sphere (the head output, 256).
        method: ``"approx"`` (default, §7.3 ``ℓ_A``), ``"approx1"`` (``ℓ_A1``) or ``"exact"`` (float64).

    Returns a tensor of ``kappa``'s shape, at least fp32 (``exact``: float64).
    """
    if method == "approx":
        return _approx(kappa, dim, False)
    if method == "approx1":
        return _approx(kappa, dim, True)
    if method == "exact":
        return _exact(kappa, dim)
    raise ValueError(f"method must be 'approx', 'approx1' or 'exact', got {method!r}")


def vmf_log_normalizer_derivative(kappa: Tensor, dim: int) -> Tensor:
    """``d ℓ_A / dκ = −κ/(ν + s) + κ/(2 s²)`` (exact value: ``−I_{ν+1}(κ)/I_ν(κ)``), §7.3."""
    nu = _check_dim(dim)
    k = at_least_fp32(kappa).clamp(min=0.0)
    s = torch.sqrt(k * k + nu * nu)
    return -k / (nu + s) + k / (2 * s * s)


def vmf_logits(y: Tensor, weight: Tensor, temperature: float, method: Method = "approx") -> Tensor:
    """``a_k = <w_k, y>/τ + log C_p(||w_k||/τ)`` of shape ``(N, K)`` for ``y`` ``(N, d)``, ``weight``
    ``(K, d)`` (§7.2), computed in the inputs' promoted dtype and at least fp32 (bf16/fp16 and autocast give
    fp32, float64 stays float64); gradients reach ``y`` and the prototype norms."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    with torch.autocast(device_type=y.device.type, enabled=False):
        dtype = compute_dtype(y, weight)
        w = weight.to(dtype)
        logits = y.to(dtype) @ w.T / temperature
        return logits + log_vmf_normalizer(w.norm(dim=1) / temperature, w.shape[1], method).to(logits.dtype)


def vmf_bias(norms: Tensor, dim: int, temperature: float, method: Method = "approx") -> Tensor:
    """Per-prototype logit correction ``log C_p(||w_k||/τ)`` ``(K,)`` for prototype norms ``(K,)``
    (what :func:`vmf_logits` adds; the DINO/iBOT losses take it as ``student_bias`` / ``teacher_bias``), at
    least fp32 (float64 norms give a float64 bias)."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    norms = at_least_fp32(norms)
    return log_vmf_normalizer(norms / temperature, dim, method).to(norms.dtype)
