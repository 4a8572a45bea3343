"""Loop state of Lightning checkpoints: what the methods and the linear probe rewrite when they load one."""

from __future__ import annotations

from typing import Any

__all__ = ["resume_epoch_end_checkpoint"]


def resume_epoch_end_checkpoint(checkpoint: dict[str, Any]) -> None:
    """Rewrite the loop state of a checkpoint saved in ``on_train_epoch_end`` (``ModelCheckpoint`` with
    ``save_on_train_epoch_end``, as the configs' ``last.ckpt``) into that of one saved in the last batch's
    ``on_train_batch_end``, which Lightning (2.6) resumes exactly.

    Saved at the epoch's end, the epoch counts as processed but not completed, and its last batch as completed.
    Lightning resumes such a checkpoint inside the finished epoch: it trains one more batch as part of it and
    counts the epoch twice, so each resume ends the run one epoch early (``max_epochs reached`` before
    ``max_steps``). A fit stopped mid-epoch (``max_time``, ``TimeBudget``, ``should_stop``) also runs the
    epoch-end hooks and has the same state. The two forms differ in exactly three counters, set back here:
    the epoch's ``processed``, the last batch's ``completed`` and ``_batches_that_stepped``."""
    fit = checkpoint.get("loops", {}).get("fit_loop")
    if not fit or not {"epoch_progress", "epoch_loop.batch_progress", "epoch_loop.state_dict"} <= set(fit):
        return
    epochs, batches, state = fit["epoch_progress"], fit["epoch_loop.batch_progress"], fit["epoch_loop.state_dict"]
    saved_at_epoch_end = "_batches_that_stepped" in state and all(
        epochs[k]["processed"] == epochs[k]["completed"] + 1 == epochs[k]["started"]
        and batches[k]["completed"] == batches[k]["processed"] >= 1
        for k in ("current", "total")
    )
    if saved_at_epoch_end:
        for k in ("current", "total"):
            epochs[k]["processed"] -= 1
            batches[k]["completed"] -= 1
        state["_batches_that_stepped"] -= 1
