"""Projection head and prototype layer (ALGORITHMS.md §6.1, §8.4)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["ProjectionHead", "PrototypeLayer"]


class ProjectionHead(nn.Module):
    """``Linear(D, h)-GELU-[Linear(h, h)-GELU]*-Linear(h, d)`` then L2-normalisation (§8.4).

    Args:
        in_dim: backbone width ``D``.
        hidden_dim: hidden width (2048 in every reference recipe).
        bottleneck_dim: output dimension ``d`` (256).
        num_layers: number of Linear layers (3).

    Shapes: ``(..., D) -> (..., d)``, unit rows (eps 1e-6).
    """

    def __init__(self, in_dim: int, hidden_dim: int = 2048, bottleneck_dim: int = 256, num_layers: int = 3):
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {num_layers}")
        dims = [in_dim] + [hidden_dim] * (num_layers - 1) + [bottleneck_dim]
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
            layers.append(nn.Linear(a, b))
            if i < num_layers - 1:
                layers.append(nn.GELU())
        self.mlp = nn.Sequential(*layers)
        for m in self.mlp:
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        self.out_dim = bottleneck_dim

    def forward(self, x: Tensor) -> Tensor:
        return F.normalize(self.mlp(x), dim=-1, eps=1e-6)


class _WeightNormLinear(nn.Module):
    """``Linear(d, K, bias=False)`` with rows ``w_k = g_k v_k / ||v_k||``; parameters ``weight_g``
    ``(K, 1)`` and ``weight_v`` ``(K, d)`` (the names of DINO's checkpoints).

    Written out rather than with ``torch.nn.utils.parametrizations.weight_norm`` because parametrized
    modules cannot be pickled, which ``ddp_spawn`` and notebook launchers need.
    """

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        v = nn.Linear(in_dim, out_dim, bias=False).weight.detach()  # PyTorch's default Linear init
        self.weight_v = nn.Parameter(v.clone())
        self.weight_g = nn.Parameter(v.norm(dim=1, keepdim=True).clone())

    @property
    def weight(self) -> Tensor:
        return self.weight_g * self.weight_v / self.weight_v.norm(dim=1, keepdim=True)

    def forward(self, y: Tensor) -> Tensor:
        return F.linear(y, self.weight.to(y.dtype))


class PrototypeLayer(nn.Module):
    """Weight-normalised ``Linear(d, K, bias=False)``: rows ``w_k = g_k v_k / ||v_k||`` (§6.1, §8.4).

    ``norm_last_layer=True`` freezes the gains at 1 (unit prototypes, DINO); ``False`` lets the norms
    ``||w_k|| = |g_k|`` learn, which the vMF methods read through :attr:`norms` (§7.2).

    Shapes: ``(..., d) -> (..., K)`` logits before temperature.
    """

    def __init__(self, in_dim: int = 256, num_prototypes: int = 65536, norm_last_layer: bool = True):
        super().__init__()
        if num_prototypes < 1:
            raise ValueError(f"num_prototypes must be >= 1, got {num_prototypes}")
        self.last_layer = _WeightNormLinear(in_dim, num_prototypes)
        with torch.no_grad():
            self.last_layer.weight_g.fill_(1.0)
        self.last_layer.weight_g.requires_grad_(not norm_last_layer)
        self.norm_last_layer = norm_last_layer
        self.num_prototypes = num_prototypes

    @property
    def weight(self) -> Tensor:
        """Effective prototype matrix ``W ∈ R^{K×d}``."""
        return self.last_layer.weight

    @property
    def norms(self) -> Tensor:
        """Prototype norms ``||w_k|| = |g_k|``, shape ``(K,)``."""
        return self.last_layer.weight_g.abs().flatten()

    def forward(self, y: Tensor) -> Tensor:
        return self.last_layer(y)
