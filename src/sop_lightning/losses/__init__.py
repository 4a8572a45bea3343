"""Training objectives: pure tensor functions plus thin stateful modules (ALGORITHMS.md §3–§7)."""

from .common import cross_entropy, koleo_loss
from .dino import Center, DINOLoss, IBOTPatchLoss
from .sop import SOPLoss, SOPMIMLoss, SOPs, build_sops, sop_probabilities
from .vmf import log_vmf_normalizer, vmf_bias, vmf_logits

__all__ = [
    "log_vmf_normalizer",
    "vmf_logits",
    "vmf_bias",
    "cross_entropy",
    "Center",
    "DINOLoss",
    "IBOTPatchLoss",
    "SOPs",
    "build_sops",
    "sop_probabilities",
    "SOPLoss",
    "SOPMIMLoss",
    "koleo_loss",
]
