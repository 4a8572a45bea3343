import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import timm
import torch

from sop_lightning import DINO, SOP, LabelledDataModule, LinearProbe, SSLDataModule
from sop_lightning.cli import build_cli, main

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
TINY = dict(backbone="vit_tiny_patch16_224", img_size=28, patch_size=4, embed_dim=32, depth=2, num_heads=2,
            hidden_dim=32, out_dim=16)  # fmt: skip


def _free_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def test_export_round_trip(tmp_path):
    model = DINO(num_prototypes=8, **TINY)
    with torch.no_grad():
        for p in model.teacher.parameters():
            p.add_(0.01 * torch.randn_like(p))  # teacher differs from student: export must take the teacher
    kwargs = model.export_backbone(tmp_path / "backbone.pth")
    vit = timm.create_model(**kwargs)
    vit.load_state_dict(torch.load(tmp_path / "backbone.pth"), strict=True)
    x = torch.randn(2, 3, 28, 28)
    vit.eval()
    torch.testing.assert_close(vit.forward_features(x), model.teacher_backbone().tokens(x))
    torch.testing.assert_close(vit(x), model.teacher_backbone()(x).cls)  # num_classes=0: pooled [CLS]


def test_validate_checkpoint_reports_the_fit_knn_and_cli_export(fake_fmnist, tmp_path):
    config = ROOT / "experiments" / "demo" / "sop.yaml"
    common = [
        "--config", str(config), "--data.init_args.root", str(fake_fmnist), "--data.init_args.num_workers", "0",
        "--data.init_args.batch_size", "4", "--trainer.logger.init_args.save_dir", str(tmp_path),
        "--trainer.default_root_dir", str(tmp_path),
    ]  # fmt: skip
    small = ["--model.init_args.memory_size", "64", "--model.init_args.patch_memory_size", "32",
             "--model.init_args.num_anchors", "8", "--model.init_args.num_patch_anchors", "4",
             "--model.init_args.depth", "1", "--model.init_args.embed_dim", "32", "--model.init_args.num_heads", "2",
             "--model.init_args.hidden_dim", "32"]  # fmt: skip
    fit = build_cli(["fit", *common, *small, "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "3",
                     "--trainer.check_val_every_n_epoch", "1"])  # fmt: skip
    fit_top1 = float(fit.trainer.callback_metrics["val/knn_top1"])
    ckpt = next(Path(tmp_path).rglob("*.ckpt"))
    val = build_cli(["validate", *common, *small, "--ckpt_path", str(ckpt)])
    assert float(val.trainer.callback_metrics["val/knn_top1"]) == pytest.approx(fit_top1)
    assert 0 <= fit_top1 <= 100 and "val/knn_top5_k200" in val.trainer.callback_metrics
    out = tmp_path / "exported.pth"
    assert main(["export", "--ckpt_path", str(ckpt), "--output", str(out)]) == 0
    state = torch.load(out)
    vit = timm.create_model("vit_tiny_patch16_224", num_classes=0, img_size=28, patch_size=14, embed_dim=32, depth=1,
                            num_heads=2)  # fmt: skip
    vit.load_state_dict(state, strict=True)
    torch.testing.assert_close(state["pos_embed"], fit.model.teacher.backbone.vit.pos_embed.detach())


def test_export_refuses_what_is_not_a_method_checkpoint_by_name_with_status_2(tmp_path, capsys):
    (tmp_path / "folder").mkdir()
    (tmp_path / "notes.txt").write_text("not a checkpoint\n")
    (tmp_path / "empty.ckpt").write_bytes(b"")  # a copy that failed
    torch.save({"pos_embed": torch.zeros(1, 5, 32)}, tmp_path / "exported.pth")  # a timm state dict, not a method's
    refused = {
        "folder": "is a folder but not a distributed checkpoint (no .metadata)",
        "notes.txt": "cannot be read as a checkpoint (torch.load: ",
        "empty.ckpt": "cannot be read as a checkpoint (the file is empty or cut short)",
        "exported.pth": "holds no 'state_dict': is this a sop_lightning method checkpoint?",
        "missing.ckpt": "is neither a checkpoint file nor a distributed-checkpoint folder",
    }
    for name, reason in refused.items():
        with pytest.raises(SystemExit) as exit_info:
            main(["export", "--ckpt_path", str(tmp_path / name), "--output", str(tmp_path / "out.pth")])
        assert exit_info.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1].startswith(f"sop-lightning export: error: ckpt_path={str(tmp_path / name)!r} {reason}"), err
    assert not (tmp_path / "out.pth").exists()


def test_linear_probe_loads_checkpoints_and_trains(fake_fmnist, tmp_path):
    sop = SOP(memory_size=64, patch_memory_size=32, num_anchors=8, num_patch_anchors=4, **TINY)
    path = tmp_path / "bb.pth"
    sop.export_backbone(path)
    arch = {k: TINY[k] for k in ("backbone", "img_size", "patch_size", "embed_dim", "depth", "num_heads")}
    probe = LinearProbe(checkpoint=str(path), num_classes=10, n_last_blocks=2, **arch)
    for name, p in probe.backbone.vit.state_dict().items():
        assert torch.equal(p, sop.teacher.backbone.vit.state_dict()[name])
    assert probe.classifier.in_features == 2 * 32
    assert probe.features(torch.randn(3, 3, 28, 28)).shape == (3, 64)
    before = {n: p.clone() for n, p in probe.backbone.named_parameters()}
    data = LabelledDataModule(root=str(fake_fmnist), batch_size=5, num_workers=0, global_size=28, patch_size=4)
    trainer = L.Trainer(accelerator="cpu", max_epochs=1, limit_train_batches=2, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)  # fmt: skip
    trainer.fit(probe, data)
    assert all(torch.equal(before[n], p) for n, p in probe.backbone.named_parameters())
    assert "val/linear_top1" in trainer.callback_metrics
    with pytest.raises(ValueError, match="is not a file or folder"):
        LinearProbe(checkpoint=str(tmp_path / "missing.ckpt"), num_classes=10, **arch)
    (tmp_path / "empty.ckpt").write_bytes(b"")
    with pytest.raises(ValueError, match=r"cannot be read as a checkpoint \(the file is empty or cut short\)"):
        LinearProbe(checkpoint=str(tmp_path / "empty.ckpt"), num_classes=10, n_last_blocks=2, **arch)


def _probe_fit(root, out, workers=0, ckpt=None, stop=None):
    """A 2-epoch linear probe of a random tiny ViT (the 20 fake images: 5 batches of 4 an epoch) with the
    configs' checkpoints; returns the trainer and the probe."""
    from lightning.pytorch.callbacks import ModelCheckpoint
    from state_saver import StopAt

    L.seed_everything(0)
    arch = {k: TINY[k] for k in ("backbone", "img_size", "patch_size", "embed_dim", "depth", "num_heads")}
    with pytest.warns(UserWarning, match="randomly initialised"):
        probe = LinearProbe(num_classes=10, n_last_blocks=2, base_lr=0.5, **arch)
    data = LabelledDataModule(root=str(root), batch_size=4, num_workers=workers, global_size=28, patch_size=4,
                              train_scale=(0.3, 1.0))  # fmt: skip
    callbacks = [ModelCheckpoint(dirpath=out, save_top_k=-1, save_last=True, save_on_train_epoch_end=True)]
    trainer = L.Trainer(accelerator="cpu", max_epochs=2, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=callbacks + ([StopAt(stop)] if stop else []))  # fmt: skip
    trainer.fit(probe, data, ckpt_path=ckpt)
    return trainer, probe


def test_linear_probe_resumes_exactly(fake_fmnist, tmp_path):
    """A probe stopped mid-epoch (as ``max_time`` stops it) or at the first epoch's end, resumed from its
    ``last.ckpt`` with another number of loader workers, ends with the straight run's classifier and
    optimizer state: the same batches in the same order with the same crops, and no epoch counted twice."""
    straight, probe = _probe_fit(fake_fmnist, tmp_path / "straight")
    assert straight.global_step == 10
    momentum = straight.optimizers[0].state_dict()["state"]
    for stop in (3, 5):
        stopped, _ = _probe_fit(fake_fmnist, tmp_path / f"stop{stop}", stop=stop)
        assert stopped.global_step == stop
        resumed, again = _probe_fit(fake_fmnist, tmp_path / f"resumed{stop}", workers=1,
                                    ckpt=tmp_path / f"stop{stop}" / "last.ckpt")  # fmt: skip
        assert resumed.global_step == 10, f"stopped at {stop}"
        for name, value in probe.classifier.state_dict().items():
            assert torch.equal(value, again.classifier.state_dict()[name]), (stop, name)
        other = resumed.optimizers[0].state_dict()["state"]
        assert all(torch.equal(momentum[i]["momentum_buffer"], other[i]["momentum_buffer"]) for i in momentum)


def test_knn_on_fake_data_beats_chance(fake_fmnist):
    # the fake classes are noisy templates: even a random teacher separates them far above 10 %
    model = DINO(num_prototypes=8, **TINY)
    data = SSLDataModule(root=str(fake_fmnist), batch_size=4, num_workers=0, global_size=28, local_size=12,
                         num_local=1, patch_size=4, eval_resize_ratio=1.0)  # fmt: skip
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    metrics = trainer.validate(model, data, verbose=False)[0]
    assert metrics["val/knn_top1"] > 50


@pytest.mark.ddp
def test_knn_gathers_uneven_shards_across_two_ranks(tmp_path):
    env = {**os.environ, "RAW_PORT": _free_port(), "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(HERE / "ddp_knn_worker.py"), str(tmp_path)], env=env,
                          capture_output=True, text=True, timeout=240)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    expected = torch.tensor([0.0, 1, 2, 100, 101, 102, 103, 104]).view(-1, 1)
    for rank in (0, 1):
        assert torch.equal(torch.load(tmp_path / f"gather_{rank}.pt"), expected)
    single = json.loads((tmp_path / "knn_1_0.json").read_text())
    r0 = json.loads((tmp_path / "knn_2_0.json").read_text())
    r1 = json.loads((tmp_path / "knn_2_1.json").read_text())
    assert single and single == r0 == r1
    assert "sync_dist=True" not in proc.stderr  # no Lightning advice per metric: the values agree on every rank


def test_student_knn_is_logged_next_to_the_teacher(fake_fmnist):
    model = DINO(num_prototypes=8, **TINY)
    with torch.no_grad():
        for p in model.teacher.parameters():
            p.add_(0.5 * torch.randn_like(p))  # teacher and student now embed differently
    data = SSLDataModule(root=str(fake_fmnist), batch_size=4, num_workers=0, global_size=28, local_size=12,
                         num_local=1, patch_size=4, eval_resize_ratio=1.0)  # fmt: skip
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    metrics = trainer.validate(model, data, verbose=False)[0]
    model.eval()
    train, val = data.knn_datasets()

    def top1(backbone):  # brute-force weighted 20-NN vote (T = 0.07) on 20 train / 8 test images
        with torch.no_grad():
            feats = [[torch.nn.functional.normalize(backbone(torch.stack([d[i][0] for i in range(len(d))])).cls, dim=1)]
                     for d in (train, val)]  # fmt: skip
        (tr,), (te,) = feats
        ytr, yte = [torch.tensor([d[i][1] for i in range(len(d))]) for d in (train, val)]
        hits = 0
        for q, y in zip(te, yte):
            sims = tr @ q
            scores = torch.zeros(10)
            for j in sims.argsort(descending=True)[:20]:
                scores[ytr[j]] += torch.exp(sims[j] / 0.07)
            hits += int(scores.argmax() == y)
        return 100 * hits / len(yte)

    assert metrics["val/knn_student_top1"] == pytest.approx(top1(model.student.backbone))
    assert metrics["val/knn_top1"] == pytest.approx(top1(model.teacher.backbone))
    assert "val/knn_student_top5_k200" in metrics
