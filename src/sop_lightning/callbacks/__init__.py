"""Callbacks the methods install themselves or that users add."""

from .ema import EMATeacher, ema_update_

__all__ = ["EMATeacher", "ema_update_"]
