import os
import socket
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch

from sop_lightning import SOP, SSLDataModule
from sop_lightning.memory import MemoryBank

HERE = Path(__file__).resolve().parent


def test_initial_rows_are_unit_and_seeded():
    bank = MemoryBank(16, 5, seed=1)
    torch.testing.assert_close(bank.embeddings.norm(dim=1), torch.ones(16))
    assert torch.equal(bank.embeddings, MemoryBank(16, 5, seed=1).embeddings)
    assert int(bank.ptr) == 0


def test_fifo_and_wrap_around_never_drops_rows():
    bank = MemoryBank(5, 2)
    ref = bank.embeddings.clone()
    ptr = 0
    for step in range(6):
        rows = torch.full((3, 2), float(step)) + torch.arange(3.0).view(3, 1)
        bank.enqueue(rows)
        for i in range(3):  # reference ring buffer, written independently
            ref[(ptr + i) % 5] = rows[i]
        ptr = (ptr + 3) % 5
        assert torch.equal(bank.embeddings, ref) and int(bank.ptr) == ptr
    bank.enqueue(torch.ones(5, 2))  # a batch exactly the size of the bank
    assert torch.equal(bank.embeddings, torch.ones(5, 2))


def test_enqueue_reads_nothing_back_to_the_host(monkeypatch):
    """The ring position is computed where the pointer lives: no ``int(ptr)``, ``.item()`` or truth test of a
    tensor in ``enqueue`` (each a host synchronisation per step on a GPU), and the rows, ages and indices still
    land where a ring buffer written out here puts them, wrap-around included."""
    bank = MemoryBank(5, 2, track_indices=True)
    ref, ids, written, ptr = bank.embeddings.clone(), [-1] * 5, [-1] * 5, 0

    def refuse(self, *args, **kwargs):
        raise AssertionError("enqueue read a tensor's value on the host")

    for step in range(4):
        rows = torch.full((3, 2), float(step)) + torch.arange(3.0).view(3, 1)
        with monkeypatch.context() as m:
            for name in ("item", "tolist", "__int__", "__index__", "__bool__", "__float__"):
                m.setattr(torch.Tensor, name, refuse)
            bank.enqueue(rows, torch.arange(3) + 10 * step)
        for i in range(3):
            ref[(ptr + i) % 5], ids[(ptr + i) % 5], written[(ptr + i) % 5] = rows[i], 10 * step + i, step
        ptr = (ptr + 3) % 5
        assert torch.equal(bank.embeddings, ref) and int(bank.ptr) == ptr and bank.indices.tolist() == ids
        assert bank.written_at.tolist() == written and int(bank.num_enqueued) == step + 1


def test_errors():
    bank = MemoryBank(4, 3)
    with pytest.raises(ValueError, match="larger than the memory size 4"):
        bank.enqueue(torch.zeros(5, 3))
    with pytest.raises(ValueError, match=r"shape \(b, 3\)"):
        bank.enqueue(torch.zeros(2, 4))
    with pytest.raises(ValueError, match="memory size"):
        MemoryBank(0, 3)


def test_state_dict_round_trip_restores_bank_and_pointer():
    bank = MemoryBank(8, 3)
    bank.enqueue(torch.randn(5, 3))
    other = MemoryBank(8, 3, seed=9)
    other.load_state_dict(bank.state_dict())
    assert torch.equal(other.embeddings, bank.embeddings) and int(other.ptr) == 5


TINY_SOP = dict(backbone="vit_tiny_patch16_224", embed_dim=32, depth=1, num_heads=2, hidden_dim=32, out_dim=16,
                memory_size=64, patch_memory_size=32, num_anchors=8, num_neighbors=2, num_patch_anchors=4)  # fmt: skip


def _data(root):
    return SSLDataModule(root=str(root), batch_size=4, num_workers=0, global_size=28, local_size=12, num_local=1,
                         patch_size=4)  # fmt: skip


def test_sop_fit_enqueues_and_checkpoint_restores_banks(fake_fmnist, tmp_path):
    model = SOP(img_size=28, patch_size=4, **TINY_SOP)
    start_cls = model.sop_loss.memory.embeddings.clone()
    trainer = L.Trainer(accelerator="cpu", max_steps=3, limit_train_batches=3, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path)  # fmt: skip
    trainer.fit(model, _data(fake_fmnist))
    bank = model.sop_loss.memory
    assert int(bank.ptr) == 12 and int(model.sop_mim_loss.memory.ptr) == 12  # 3 steps x 4 images
    assert not torch.equal(bank.embeddings[:12], start_cls[:12]) and torch.equal(bank.embeddings[12:], start_cls[12:])
    ckpt = tmp_path / "sop.ckpt"
    trainer.save_checkpoint(ckpt)
    restored = SOP.load_from_checkpoint(ckpt)
    assert torch.equal(restored.sop_loss.memory.embeddings, bank.embeddings)
    assert int(restored.sop_loss.memory.ptr) == 12
    assert torch.equal(restored.sop_mim_loss.memory.embeddings, model.sop_mim_loss.memory.embeddings)


def _free_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


@pytest.mark.ddp
def test_two_gloo_ranks_hold_identical_banks(fake_fmnist, tmp_path):
    env = {**os.environ, "RAW_PORT": _free_port(), "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, str(HERE / "ddp_memory_worker.py"), str(tmp_path), str(fake_fmnist)],
        env=env, capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    r0, r1 = (torch.load(tmp_path / f"raw_{r}.pt") for r in (0, 1))
    assert torch.equal(r0["start"], r1["start"])  # broadcast from rank 0
    ref, ptr = r0["start"].clone(), 0
    for step, ((e0, p0, i0), (e1, p1, i1)) in enumerate(zip(r0["history"], r1["history"])):
        assert torch.equal(e0, e1) and torch.equal(p0, p1) and torch.equal(i0, i1)
        rows = [torch.full((3,), float(100 * step + 10 * rank)) + i for rank in (0, 1) for i in range(3)]
        for i, row in enumerate(rows):  # rank-major, wrapping around the 10-row bank
            ref[(ptr + i) % 10] = row
        ptr = (ptr + 6) % 10
        assert torch.equal(e0, ref) and int(p0) == ptr
        written = [i for i in range(10) if not torch.equal(ref[i], r0["start"][i])]
        assert torch.equal(i0[written], ref[written, 0].long())  # the indices travel with their rows
    f0, f1 = (torch.load(tmp_path / f"fit_{r}.pt") for r in (0, 1))
    assert f0["step"] == f1["step"] == 3
    assert int(f0["ptr"]) == 3 * 3 * 2  # 3 steps x 3 images x 2 ranks
    for key in ("cls", "patch", "ptr"):
        assert torch.equal(f0[key], f1[key]), key
    # the banks stay identical through their all-gathered enqueues alone: DDP does not rebroadcast them
    assert f0["ddp"] == "DistributedDataParallel"
    assert not [name for name in f0["ddp_broadcast_buffers"] if "memory" in name], f0["ddp_broadcast_buffers"]
    assert f0["ddp_syncs_buffers"] is False
    # seeded alike, the ranks still draw their own masks (and crops): the data module seeds by rank
    assert f0["first_masks"].any() and not torch.equal(f0["first_masks"], f1["first_masks"])


def test_track_indices_follow_the_rows_through_wrap_around_and_checkpoints():
    bank = MemoryBank(5, 2, track_indices=True)
    assert bank.indices.tolist() == [-1] * 5
    reference = [-1] * 5
    ptr = 0
    for step, ids in enumerate(([10, 11, 12], [20, 21], [30, 31, 32])):
        bank.enqueue(torch.randn(len(ids), 2), torch.tensor(ids) if step != 1 else None)  # step 1: unknown images
        for i, idx in enumerate(ids):
            reference[(ptr + i) % 5] = idx if step != 1 else -1
        ptr = (ptr + len(ids)) % 5
    assert bank.indices.tolist() == reference == [30, 31, 32, -1, -1]
    restored = MemoryBank(5, 2, track_indices=True)
    restored.load_state_dict(bank.state_dict())
    assert torch.equal(restored.indices, bank.indices)
    assert not hasattr(MemoryBank(5, 2), "indices") and "indices" not in MemoryBank(5, 2).state_dict()
    with pytest.raises(ValueError, match=r"indices must have shape \(3,\)"):
        bank.enqueue(torch.randn(3, 2), torch.tensor([1, 2]))


def test_sop_banks_keep_the_dataset_index_of_each_row(fake_fmnist, tmp_path):
    seen = []

    class Spy(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen.append(batch.indices.clone())

    model = SOP(img_size=28, patch_size=4, track_indices=True, **TINY_SOP)
    trainer = L.Trainer(accelerator="cpu", max_steps=2, limit_train_batches=2, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False, callbacks=[Spy()])  # fmt: skip
    trainer.fit(model, _data(fake_fmnist))
    images = torch.cat(seen)  # 2 steps x 4 images, in loader order
    assert images.unique().numel() == 8 and int(images.max()) < 20
    for bank in (model.sop_loss.memory, model.sop_mim_loss.memory):  # view 2 / one patch per image
        assert bank.indices[:8].tolist() == images.tolist() and (bank.indices[8:] == -1).all()
