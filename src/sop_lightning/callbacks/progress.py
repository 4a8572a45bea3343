"""The rich progress bar the command line installs by default."""

from __future__ import annotations

from lightning.pytorch.callbacks import RichProgressBar as _LightningRichProgressBar

__all__ = ["RichProgressBar"]


class RichProgressBar(_LightningRichProgressBar):
    """Lightning's rich progress bar, except that a run bounded by steps or time reads "Epoch 3" where Lightning
    2.6 writes "Epoch 3/-2" (``max_epochs=-1``, Lightning's value whenever ``max_steps`` is given without
    ``max_epochs``: no epoch count to show)."""

    def _get_train_description(self, current_epoch: int) -> str:
        text = super()._get_train_description(current_epoch)
        max_epochs = self.trainer.max_epochs
        if max_epochs is not None and max_epochs < 0:
            text = text.replace(f"Epoch {current_epoch}/{max_epochs - 1}", f"Epoch {current_epoch}", 1)
            text = f"{text.rstrip():{len(self.validation_description)}}"  # the padding that stops flicker
        return text
