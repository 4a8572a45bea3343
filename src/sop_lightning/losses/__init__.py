"""Training objectives: pure tensor functions plus thin stateful modules (ALGORITHMS.md §3–§7)."""

from .common import cross_entropy
from .dino import Center, DINOLoss, IBOTPatchLoss

__all__ = ["cross_entropy", "Center", "DINOLoss", "IBOTPatchLoss"]
