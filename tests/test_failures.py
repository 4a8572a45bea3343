"""Failures and bad input: each is refused with an error that names the argument, its value and the
constraint, and nothing already written (checkpoints) is lost."""

import math
import os
import subprocess
import sys

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from PIL import Image
from torch.utils.data import TensorDataset

from sop_lightning import DINO, IBOT, SOP, SSLDataModule
from sop_lightning.data.datasets import ImageFolderDataset, UnreadableImageError

TINY = dict(backbone="vit_tiny_patch16_224", img_size=28, patch_size=4, embed_dim=32, depth=1, num_heads=2,
            hidden_dim=32, out_dim=16)  # fmt: skip
SMALL_SOP = dict(memory_size=64, patch_memory_size=32, num_anchors=8, num_patch_anchors=4)


def _data(source, **kw):
    args = dict(batch_size=4, num_workers=0, global_size=28, local_size=12, num_local=1, patch_size=4,
                eval_resize_ratio=1.0)  # fmt: skip
    if isinstance(source, dict):
        args.update(source)
    else:
        args["root"] = str(source)
    return SSLDataModule(**{**args, **kw})


def _trainer(tmp_path=None, **kw):
    args = dict(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                enable_checkpointing=False, limit_val_batches=0, default_root_dir=tmp_path)  # fmt: skip
    return L.Trainer(**{**args, **kw})


def _image_folder(path, n_good: int, size: int = 28, n_bad: int = 0):
    path.mkdir()
    g = torch.Generator().manual_seed(0)
    for i in range(n_good):
        pixels = torch.randint(0, 256, (size, size, 3), generator=g, dtype=torch.uint8).numpy()
        Image.fromarray(pixels).save(path / f"good_{i:02d}.png")
    for i in range(n_bad):
        (path / f"bad_{i}.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    return path


class NaNAtStep2(DINO):
    """DINO whose cls loss turns NaN at step 2."""

    def compute_losses(self, student, teacher, masks, temp):
        losses = super().compute_losses(student, teacher, masks, temp)
        if self.global_step == 2:
            losses["cls_loss"] = losses["loss"] * float("nan")
            losses["loss"] = losses["loss"] + losses["cls_loss"]
        return losses


def test_non_finite_loss_stops_with_step_and_term_and_keeps_the_last_good_checkpoint(fake_fmnist, tmp_path):
    model = NaNAtStep2(num_prototypes=8, **TINY)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=1, save_last=True, save_top_k=-1)
    trainer = _trainer(tmp_path, max_steps=5, callbacks=[ckpt], enable_checkpointing=True)
    with pytest.raises(FloatingPointError, match=r"non-finite loss at step 2 .*cls_loss=nan"):
        trainer.fit(model, _data(fake_fmnist))
    last = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)
    assert last["global_step"] == 2  # written after step 2's predecessor, not overwritten by the failed step
    assert all(torch.isfinite(v).all() for v in last["state_dict"].values() if v.is_floating_point())
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["epoch=0-step=1.ckpt", "epoch=0-step=2.ckpt",
                                                                     "last.ckpt"]  # fmt: skip


class NaNAtBatch2(DINO):
    """DINO whose loss turns NaN on batch 2: with two batches a step, the first of step 1's two."""

    def compute_losses(self, student, teacher, masks, temp):
        losses = super().compute_losses(student, teacher, masks, temp)
        if self.trainer.fit_loop.epoch_loop.batch_idx == 2:
            losses["loss"] = losses["loss"] * float("nan")
        return losses


def test_a_non_finite_loss_in_any_accumulated_batch_stops_before_the_update(fake_fmnist):
    """With gradient accumulation the check runs once, before the optimizer step, over every batch since the
    last one: a NaN in the first of two batches is not missed, and the weights keep the last good update."""
    model = NaNAtBatch2(num_prototypes=8, **TINY)
    seen = {}

    class Snapshot(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if batch_idx == 1:  # after step 0's update
                seen["student"] = {k: v.clone() for k, v in pl_module.student.state_dict().items()}

    trainer = _trainer(max_steps=4, accumulate_grad_batches=2, callbacks=[Snapshot()])
    with pytest.raises(FloatingPointError, match=r"non-finite loss at step 1 \(epoch 0\): loss=nan\."):
        trainer.fit(model, _data(fake_fmnist))
    assert trainer.global_step == 1
    for k, v in model.student.state_dict().items():
        assert torch.equal(v, seen["student"][k]), k


NAN_ON_ONE_RANK = """
import sys
import time
from pathlib import Path

import lightning as L

from sop_lightning import DINO, SSLDataModule

root, out = sys.argv[1], Path(sys.argv[2])


class NaNOnRank0(DINO):
    def compute_losses(self, student, teacher, masks, temp):
        losses = super().compute_losses(student, teacher, masks, temp)
        if self.global_step == 2 and self.global_rank == 0:  # the same terms on every rank, one of them NaN
            losses["loss"] = losses["loss"] * float("nan")
        return losses

    def _check_finite(self):
        try:
            super()._check_finite()
        except FloatingPointError as error:  # each rank says what stopped it (spawn reports one rank's error)
            (out / f"rank{self.global_rank}.txt").write_text(f"FloatingPointError: {error}")
            time.sleep(3)  # before the first rank to fail takes the others down
            raise


if __name__ == "__main__":  # the spawned ranks import this file
    model = NaNOnRank0(num_prototypes=8, backbone="vit_tiny_patch16_224", img_size=28, patch_size=4, embed_dim=32,
                       depth=1, num_heads=2, hidden_dim=32, out_dim=16)
    data = SSLDataModule(root=root, batch_size=2, num_workers=0, global_size=28, local_size=12, num_local=1,
                         patch_size=4, eval_resize_ratio=1.0)
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp_spawn", max_steps=5, logger=False,
                        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                        limit_val_batches=0)
    trainer.fit(model, data)
"""


def test_a_non_finite_loss_on_one_rank_stops_every_rank_at_the_same_step(fake_fmnist, tmp_path):
    """Under DDP the check reads the losses reduced over the ranks: a NaN on rank 0 alone stops both ranks at
    step 2 with the same error, instead of rank 0 stopping while rank 1 waits for it in a collective."""
    script = tmp_path / "nan_on_one_rank.py"
    script.write_text(NAN_ON_ONE_RANK)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(script), str(fake_fmnist), str(tmp_path)], env=env, timeout=180,
                          capture_output=True, text=True)  # fmt: skip
    assert done.returncode != 0, done.stdout[-2000:]
    for rank in (0, 1):
        marker = tmp_path / f"rank{rank}.txt"
        assert marker.exists(), f"rank {rank} did not stop with the error\n{done.stderr[-3000:]}"
        message = marker.read_text()
        assert message.startswith("FloatingPointError: non-finite loss at step 2 (epoch 0): loss=nan (the mean over "
                                  "ranks). Training stopped before this step's update"), message  # fmt: skip


def test_unreadable_images_raise_with_the_path_or_are_skipped_and_counted(tmp_path):
    folder = _image_folder(tmp_path / "imgs", n_good=11, n_bad=1)
    with pytest.raises(UnreadableImageError, match=r"bad_0\.png.*on_bad_image='skip'"):
        [ImageFolderDataset(str(folder))[i] for i in range(12)]
    with pytest.raises(ValueError, match="on_bad_image must be 'raise' or 'skip', got 'ignore'"):
        ImageFolderDataset(str(folder), on_bad_image="ignore")
    with pytest.raises(ValueError, match="on_bad_image"):
        _data({"dataset": str(folder)}, on_bad_image="ignore")
    # skip: a full epoch of 12 images visits the bad one once; the batch keeps its size; the count is logged
    data = _data({"dataset": str(folder)}, on_bad_image="skip")
    trainer = _trainer(max_epochs=1)
    with pytest.warns(UserWarning, match=r"cannot read image .*bad_0\.png.*skipped"):
        trainer.fit(DINO(num_prototypes=8, **TINY), data)
    assert trainer.global_step == 3 and data.skipped_images == 1
    assert trainer.callback_metrics["data/skipped_images"] == 1


def test_empty_data_and_images_smaller_than_the_crop_are_refused(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="contains no images"):
        _data({"dataset": str(empty)}).setup("fit")
    with pytest.raises(ValueError, match="dataset=TensorDataset.* is empty"):
        _data({"dataset": TensorDataset(torch.zeros(0, 3, 28, 28))}).setup("fit")
    small = _image_folder(tmp_path / "small", n_good=8, size=16)
    with pytest.raises(ValueError, match=r"median shorter side 16 px < global_size=28.*allow_upscale=True"):
        _data({"dataset": str(small)}).setup("fit")
    data = _data({"dataset": str(small)}, allow_upscale=True)
    batch = next(iter(data.train_dataloader()))
    assert batch.views[0].shape == (4, 3, 28, 28)
    few = _image_folder(tmp_path / "few", n_good=3)
    with pytest.raises(ValueError, match="has 3 images, fewer than batch_size=4"):
        _data({"dataset": str(few)}).train_dataloader()


def test_wrong_patch_grid_is_refused_with_both_sizes(fake_fmnist):
    with pytest.raises(ValueError, match="global_size=28 must be divisible by patch_size=5"):
        _data(fake_fmnist, patch_size=5)
    with pytest.raises(ValueError, match="local_size=12 must be divisible by patch_size=7"):
        _data(fake_fmnist, patch_size=7)
    assert _data(fake_fmnist, patch_size=7, num_local=0).hparams.local_size == 12  # no local crops: not used
    # library mode: data masks for 4-px patches (7x7), a model with 7-px patches (4x4)
    model = IBOT(num_prototypes=8, **{**TINY, "patch_size": 7})
    with pytest.raises(ValueError, match=r"does not match the patch grid.*patch_size=7"):
        _trainer(max_steps=1).fit(model, _data(fake_fmnist))


def test_batch_larger_than_a_bank_and_anchors_larger_than_a_bank(fake_fmnist):
    model = SOP(**{**TINY, **SMALL_SOP, "patch_memory_size": 6, "num_patch_anchors": 2})
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"patch_memory_size=6 is smaller than the rows one step enqueues \(8"):
        _trainer(max_steps=1).fit(model, _data(fake_fmnist, batch_size=8))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # nothing was updated
    model = SOP(**{**TINY, **SMALL_SOP, "enqueue_views": "both", "memory_size": 12, "num_anchors": 2,
                   "num_neighbors": 2})  # fmt: skip
    with pytest.raises(ValueError, match=r"memory_size=12 .* \(16 = batch_size 8 x 1 ranks x 2 views\)"):
        _trainer(max_steps=1).fit(model, _data(fake_fmnist, batch_size=8))
    with pytest.raises(ValueError, match="num_anchors=128 exceeds memory_size=64"):
        SOP(**{**TINY, **SMALL_SOP, "num_anchors": 128})
    with pytest.raises(ValueError, match=r"num_neighbors=60 must be in \[0, memory_size - num_anchors = 56\]"):
        SOP(**{**TINY, **SMALL_SOP, "num_neighbors": 60})


def test_half_true_precision_is_refused_for_the_ema_teacher(fake_fmnist):
    with pytest.raises(ValueError, match=r"precision='bf16-true'.*1 - m <= 0.004.*bf16-mixed"):
        _trainer(max_steps=1, precision="bf16-true").fit(DINO(num_prototypes=8, **TINY), _data(fake_fmnist))


def test_the_fsdp1_strategy_is_refused_with_the_fsdp2_alternative():
    """Lightning's ``fsdp`` strategy refuses CPU before the model sees it; on a GPU the method's ``setup``
    refuses it (checked here with a stand-in trainer holding the real strategy object)."""
    from types import SimpleNamespace

    from lightning.pytorch.strategies import FSDPStrategy

    model = DINO(num_prototypes=8, **TINY)
    model._trainer = SimpleNamespace(strategy=FSDPStrategy(), precision="32-true")
    with pytest.raises(ValueError, match=r"strategy='fsdp' \(FSDP1\) is not supported.*ModelParallelStrategy"):
        model.setup("fit")


@pytest.fixture
def sop_checkpoint(fake_fmnist, tmp_path):
    model = SOP(**TINY, **SMALL_SOP)
    trainer = _trainer(tmp_path, max_steps=1)
    trainer.fit(model, _data(fake_fmnist))
    path = tmp_path / "sop.ckpt"
    trainer.save_checkpoint(path)
    return path


def test_checkpoints_hold_plain_data_and_refuse_another_method_or_config(sop_checkpoint, fake_fmnist):
    ckpt = torch.load(sop_checkpoint, weights_only=True)  # no pickled objects beyond tensors and plain data
    assert ckpt["sop_lightning"] == {"method": "SOP"}
    with pytest.raises(ValueError, match="the checkpoint was written by SOP, not DINO"):
        _trainer().validate(DINO(num_prototypes=8, **TINY), _data(fake_fmnist), ckpt_path=sop_checkpoint)
    other = SOP(**{**TINY, **SMALL_SOP, "embed_dim": 64})
    with pytest.raises(ValueError, match=r"does not fit this SOP.*pos_embed.*embed_dim=32 \(checkpoint\) vs 64"):
        _trainer().validate(other, _data(fake_fmnist), ckpt_path=sop_checkpoint)
    same = SOP(**TINY, **SMALL_SOP)
    metrics = _trainer(limit_val_batches=None).validate(same, _data(fake_fmnist), ckpt_path=sop_checkpoint)
    assert math.isfinite(metrics[0]["val/knn_top1"])
