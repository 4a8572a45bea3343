"""Callbacks the methods install themselves or that users add."""

from .budget import TimeBudget
from .diagnostics import Diagnostics
from .ema import EMATeacher, ema_update_
from .knn import KNNEvaluation
from .memory import MemoryEnqueue
from .progress import RichProgressBar

__all__ = [
    "Diagnostics",
    "EMATeacher",
    "ema_update_",
    "MemoryEnqueue",
    "KNNEvaluation",
    "RichProgressBar",
    "TimeBudget",
]
