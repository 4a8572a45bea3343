"""Lightning checkpoints: reading one (a file, or a distributed checkpoint's folder) with errors that say what is
wrong, and the loop state the methods and the linear probe rewrite when they load one."""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import torch

__all__ = ["is_distributed_checkpoint", "read_checkpoint_file", "resume_epoch_end_checkpoint"]


def is_distributed_checkpoint(path: str | Path) -> bool:
    """Whether ``path`` is the folder of a ``torch.distributed.checkpoint`` (what Lightning's
    ``ModelParallelStrategy`` writes: shards, ``.metadata`` and ``meta.pt``)."""
    return Path(path).is_dir() and (Path(path) / ".metadata").is_file()


def read_checkpoint_file(path: str | Path) -> Any:
    """``torch.load(path, weights_only=True)`` on the CPU (tensors and plain data only); a file it cannot read
    is a ``ValueError`` naming it and why, in one line."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as err:
        raise ValueError(f"ckpt_path={str(path)!r} cannot be read as a checkpoint ({_load_error(err)})") from err


def _load_error(err: BaseException) -> str:
    """What ``torch.load(weights_only=True)`` found wrong, in one line: the unpickler's own reason rather than
    its advice to retry with ``weights_only=False`` (wrong for a file that is no checkpoint at all)."""
    if isinstance(err, EOFError):
        return "the file is empty or cut short"
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    after = next((i + 1 for i, line in enumerate(lines) if line.endswith("WeightsUnpickler error:")), None)
    reason = lines[after] if after is not None and after < len(lines) else (lines[0] if lines else type(err).__name__)
    return f"torch.load: {reason}"


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
