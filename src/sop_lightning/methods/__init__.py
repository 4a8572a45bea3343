"""Self-supervised methods (LightningModules): a backbone, heads and objectives put together."""

from .base import SelfDistillation
from .dino import DINO, DINOvMF
from .ibot import IBOT, IBOTvMF
from .sop import SOP

__all__ = ["SelfDistillation", "DINO", "DINOvMF", "IBOT", "IBOTvMF", "SOP"]
