import math

import lightning as L
import pytest
import torch

from sop_lightning import SOP, Diagnostics, DINOvMF, SSLDataModule
from sop_lightning.callbacks.diagnostics import _effective
from sop_lightning.losses.dino import teacher_stats
from sop_lightning.memory import MemoryBank

TINY = dict(backbone="vit_tiny_patch16_224", img_size=28, patch_size=4, embed_dim=32, depth=1, num_heads=2,
            hidden_dim=32, out_dim=16)  # fmt: skip


def test_teacher_stats_and_effective_number():
    p = torch.tensor([[0.5, 0.5, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0]])
    stats = teacher_stats(p)
    torch.testing.assert_close(stats["mean_probs"], torch.tensor([0.25, 0.25, 0.5, 0.0]))
    assert stats["entropy"].item() == pytest.approx(math.log(2) / 2)
    assert stats["argmax_fraction"].item() == pytest.approx(2 / 4)
    assert _effective(torch.full((8,), 1 / 8)) == pytest.approx(8)
    assert _effective(torch.tensor([1.0, 0, 0])) == pytest.approx(1)


def test_bank_age():
    bank = MemoryBank(6, 2)
    bank.enqueue(torch.ones(4, 2))
    bank.enqueue(torch.ones(4, 2))  # rows 4, 5, 0, 1
    assert bank.age().tolist() == [0, 0, 1, 1, 0, 0]
    assert int(bank.num_enqueued) == 2
    fresh = MemoryBank(3, 2)
    fresh.enqueue(torch.ones(1, 2))
    assert fresh.age().tolist() == [0, 1, 1] and (fresh.written_at < 0).sum() == 2


@pytest.mark.parametrize("cls", [SOP, DINOvMF])
def test_diagnostics_logged_per_epoch(cls, fake_fmnist):
    kwargs = (dict(memory_size=64, patch_memory_size=32, num_anchors=8, num_neighbors=2, num_patch_anchors=4)
              if cls is SOP else dict(num_prototypes=12))  # fmt: skip
    model = cls(**kwargs, **TINY)
    data = SSLDataModule(root=str(fake_fmnist), batch_size=4, num_workers=0, global_size=28, local_size=12,
                         num_local=1, patch_size=4)  # fmt: skip
    diag = Diagnostics()
    trainer = L.Trainer(accelerator="cpu", max_epochs=1, limit_train_batches=3, limit_val_batches=0, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[diag])  # fmt: skip
    trainer.fit(model, data)
    m = diag.last_metrics
    if cls is SOP:
        assert 1 <= m["diag/sop_loss/effective_prototypes"] <= 8
        assert 0 < m["diag/sop_loss/argmax_fraction"] <= 1
        assert m["diag/sop_loss.memory/initial_fraction"] == pytest.approx((64 - 12) / 64)
        assert "diag/sop_mim_loss/teacher_entropy" in m
    else:
        assert 1 <= m["diag/dino_loss/effective_prototypes"] <= 12
        assert m["diag/kappa_min"] <= m["diag/kappa_mean"] <= m["diag/kappa_max"]
        kappa = model.student.prototypes.norms / 0.1
        assert m["diag/kappa_mean"] == pytest.approx(float(kappa.mean()), rel=1e-5)
