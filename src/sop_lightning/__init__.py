"""sop_lightning: self-supervised visual representation learning with PyTorch Lightning.

Methods: SOP (Self-Organizing Visual Prototypes), DINO and iBOT (and their vMF variants).
"""

from .backbones import ViTBackbone
from .callbacks import Diagnostics, EMATeacher, KNNEvaluation, MemoryEnqueue, TimeBudget
from .data import BlockMaskGenerator, LabelledDataModule, MultiCropBatch, MultiCropTransform, SSLDataModule
from .evaluation import LinearProbe, knn_classify
from .memory import MemoryBank
from .methods import DINO, IBOT, SOP, DINOvMF, IBOTvMF, SelfDistillation

__version__ = "0.1.0"

__all__ = [
    "ViTBackbone",
    "Diagnostics",
    "EMATeacher",
    "KNNEvaluation",
    "MemoryEnqueue",
    "TimeBudget",
    "BlockMaskGenerator",
    "MultiCropBatch",
    "MultiCropTransform",
    "SSLDataModule",
    "LabelledDataModule",
    "LinearProbe",
    "knn_classify",
    "MemoryBank",
    "DINO",
    "DINOvMF",
    "IBOT",
    "IBOTvMF",
    "SOP",
    "SelfDistillation",
    "__version__",
]
