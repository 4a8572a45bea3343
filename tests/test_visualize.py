import lightning as L
import pytest
import torch

from sop_lightning import SOP, SSLDataModule
from sop_lightning.evaluation import nearest_images, show_retrievals, show_sops, sop_members

TINY_SOP = dict(backbone="vit_tiny_patch16_224", img_size=28, patch_size=4, embed_dim=32, depth=1, num_heads=2,
                hidden_dim=32, out_dim=16, memory_size=64, patch_memory_size=32, num_anchors=8, num_neighbors=2,
                num_patch_anchors=4)  # fmt: skip


def _data(root):
    return SSLDataModule(root=str(root), batch_size=4, num_workers=0, global_size=28, local_size=12, num_local=1,
                         patch_size=4, eval_resize_ratio=1.0)  # fmt: skip


def test_nearest_images_match_brute_force():
    g = torch.Generator().manual_seed(0)
    gallery, queries = torch.randn(30, 5, generator=g), torch.randn(4, 5, generator=g)
    idx, sims = nearest_images(queries, gallery, k=3)
    for q in range(4):
        cos = [(float(queries[q] @ x / (queries[q].norm() * x.norm())), j) for j, x in enumerate(gallery)]
        best = sorted(cos, reverse=True)[:3]
        assert idx[q].tolist() == [j for _, j in best]
        assert sims[q].tolist() == pytest.approx([c for c, _ in best], abs=1e-5)


@pytest.fixture
def trained_sop(fake_fmnist):
    L.seed_everything(0)
    model = SOP(track_indices=True, **TINY_SOP)
    trainer = L.Trainer(accelerator="cpu", max_steps=4, limit_train_batches=4, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False, limit_val_batches=0)  # fmt: skip
    trainer.fit(model, _data(fake_fmnist))
    return model


def test_sop_members_are_the_images_of_the_anchor_and_its_nearest_rows(trained_sop):
    bank = trained_sop.sop_loss.memory
    members = sop_members(trained_sop, num_sops=3, num_neighbors=4, seed=1)
    assert members.shape == (3, 5) and (members[:, 0] >= 0).all()
    # each image enters the bank once here (16 of 20); as in build_sops, no anchor is another's neighbour
    anchors = [int((bank.indices == row[0]).nonzero()[0]) for row in members.tolist()]
    for row, anchor in zip(members.tolist(), anchors):
        others = [r for r in range(bank.size) if r not in anchors]
        cos = sorted(((float(bank.embeddings[anchor] @ bank.embeddings[r]), r) for r in others), reverse=True)[:4]
        assert row[1:] == [int(bank.indices[r]) for _, r in cos]
    with pytest.raises(ValueError, match="track_indices=True"):
        sop_members(SOP(**TINY_SOP))


def test_pictures_are_written(trained_sop, fake_fmnist, tmp_path):
    data = _data(fake_fmnist)
    fig = show_retrievals(trained_sop, data, num_queries=3, k=4, path=tmp_path / "retrievals.png")
    assert len(fig.axes) == 3 * 5 and (tmp_path / "retrievals.png").stat().st_size > 1000
    fig = show_sops(trained_sop, data, num_sops=2, num_neighbors=3, path=tmp_path / "sops.png")
    assert len(fig.axes) == 2 * 4 and (tmp_path / "sops.png").stat().st_size > 1000
