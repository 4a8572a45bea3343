"""Self-supervised methods (LightningModules): a backbone, heads and objectives put together."""

from .base import SelfDistillation
from .dino import DINO
from .ibot import IBOT
from .sop import SOP

__all__ = ["SelfDistillation", "DINO", "IBOT", "SOP"]
