"""sop_lightning: self-supervised visual representation learning with PyTorch Lightning.

Methods: SOP (Self-Organizing Visual Prototypes), DINO and iBOT (and their vMF variants).
"""

from .backbones import ViTBackbone
from .data import BlockMaskGenerator, MultiCropBatch, MultiCropTransform, SSLDataModule
from .evaluation import knn_classify
from .memory import MemoryBank
from .methods import DINO, IBOT, SOP, DINOvMF, IBOTvMF, SelfDistillation

__version__ = "0.1.0"

__all__ = [
    "ViTBackbone", "BlockMaskGenerator", "MultiCropBatch", "MultiCropTransform", "SSLDataModule",
    "knn_classify", "DINO", "DINOvMF", "IBOT", "IBOTvMF", "SOP", "SelfDistillation", "MemoryBank", "__version__",
]  # fmt: skip
