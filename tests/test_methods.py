import math
import warnings
from unittest.mock import patch

import lightning as L
import pytest
import torch

import sop_lightning.callbacks.ema as ema_module
from sop_lightning import DINO, IBOT, SOP, SSLDataModule
from sop_lightning.callbacks.ema import ema_update_
from sop_lightning.methods.base import clip_per_tensor_
from sop_lightning.network import Embeddings

TINY = dict(backbone="vit_tiny_patch16_224", img_size=28, patch_size=4, embed_dim=32, depth=1, num_heads=2,
            hidden_dim=64, out_dim=16)  # fmt: skip


def _data(root, **kw):
    args = dict(root=str(root), batch_size=4, num_workers=0, global_size=28, local_size=12, num_local=2,
                patch_size=4, mask_ratio=0.3, mask_ratio_var=0.0)  # fmt: skip
    args.update(kw)
    return SSLDataModule(**args)


def _trainer(**kw):
    args = dict(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                enable_model_summary=False, max_epochs=1)  # fmt: skip
    args.update(kw)
    return L.Trainer(**args)


SOP_SMALL = dict(memory_size=64, patch_memory_size=32, num_anchors=8, num_neighbors=2, num_patch_anchors=4)


@pytest.mark.parametrize("cls", [DINO, IBOT, SOP])
def test_gradients_reach_student_only(cls, fake_fmnist):
    model = cls(**SOP_SMALL, **TINY) if cls is SOP else cls(num_prototypes=32, **TINY)
    model.set_schedule_length(10, 5)
    batch = next(iter(_data(fake_fmnist).train_dataloader()))
    masks = batch.masks.flatten(0, 1) if model.uses_masks else None
    teacher = model.teacher(batch.views[:2], return_patches=model.uses_patches)
    student = model.student(batch.views, masks=masks, return_patches=model.uses_patches)
    model.compute_losses(student, teacher, masks, 0.04)["loss"].backward()
    assert all(p.grad is None for p in model.teacher.parameters())
    grads = {n: p.grad for n, p in model.student.named_parameters() if p.requires_grad}
    assert all(g is not None for g in grads.values()), [n for n, g in grads.items() if g is None]
    assert grads["backbone.vit.blocks.0.attn.qkv.weight"].abs().sum() > 0
    if model.uses_masks and masks.any():
        assert grads["backbone.mask_token"].abs().sum() > 0
    assert model.teacher.backbone.mask_token is None
    for buffer in model.buffers():
        assert not buffer.requires_grad


def test_sop_queues_teacher_rows_of_view_two(fake_fmnist):
    model = SOP(**SOP_SMALL, **TINY)
    model.set_schedule_length(10, 5)
    batch = next(iter(_data(fake_fmnist).train_dataloader()))
    masks = batch.masks.flatten(0, 1)
    with torch.no_grad():
        teacher = model.teacher(batch.views[:2], return_patches=True)
        student = model.student(batch.views, masks=masks, return_patches=True)
    model.compute_losses(student, teacher, masks, 0.04)
    (cls_bank, cls_rows, cls_images), (patch_bank, patch_rows, patch_images) = model.pop_memory_updates()
    assert cls_bank is model.sop_loss.memory and patch_bank is model.sop_mim_loss.memory
    torch.testing.assert_close(cls_rows, teacher.cls[4:8])  # B = 4: rows 4..7 are global view 2
    for b in range(4):  # each patch row is one of the image's own view-2 patch embeddings
        assert (teacher.patches[4 + b] - patch_rows[b]).abs().sum(-1).min() < 1e-6
    assert model.pop_memory_updates() == []


def test_sop_patch_enqueue_positions_follow_the_option_and_the_step():
    """``random_masked_one``: only masked positions (any when an image has none); ``random_one``: every
    position can be drawn; the draw is a function of the step (resume) and not of the process's RNG."""
    model = SOP(**SOP_SMALL, **TINY, patch_enqueue="random_masked_one")
    model.set_schedule_length(10, 5)
    B, N, d = 4, 49, 16
    patches = torch.arange(2 * B * N * d, dtype=torch.float32).view(2 * B, N, d)  # row r of image b is unique
    teacher = Embeddings(torch.zeros(2 * B, d), patches)
    masks = torch.zeros(2 * B, N, dtype=torch.bool)
    masks[B + 0, [3, 17]] = True  # view 2 of image 0: two masked patches; image 1: none
    masks[B + 2, 40] = True
    masks[B + 3, 0] = True

    def positions(step):
        model._queue_memory_updates(teacher, masks, B)
        rows = model.pop_memory_updates()[1][1]
        return [int(((patches[B + b] - rows[b]).abs().sum(-1) == 0).nonzero()) for b in range(B)]

    seen = {b: set() for b in range(B)}
    for step in range(40):
        with patch.object(SOP, "global_step", step):
            torch.manual_seed(step)  # the process RNG does not matter
            first = positions(step)
            torch.manual_seed(1000 + step)
            assert positions(step) == first
        for b, pos in enumerate(first):
            seen[b].add(pos)
    assert seen[0] == {3, 17} and seen[2] == {40} and seen[3] == {0}
    assert len(seen[1]) > 20  # no masked patch: any of the 49 positions


def test_teacher_starts_as_copy_without_drop_path():
    model = IBOT(num_prototypes=32, drop_path_rate=0.3, **{**TINY, "depth": 2})
    assert any(getattr(m, "drop_prob", 0) > 0 for m in model.student.modules())
    s, t = dict(model.student.named_parameters()), dict(model.teacher.named_parameters())
    assert set(s) - set(t) == {"backbone.mask_token"}
    assert all(torch.equal(t[n], s[n]) for n in t)
    drops = [m.drop_prob for m in model.teacher.modules() if hasattr(m, "drop_prob")]
    assert drops and all(d == 0 for d in drops)


def test_ema_update_formula():
    student, teacher = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    t0 = teacher.weight.detach().clone()
    ema_update_(teacher, student, 0.9)
    torch.testing.assert_close(teacher.weight, 0.9 * t0 + 0.1 * student.weight.detach())


def test_clip_per_tensor_matches_reference():
    a, b = torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(2, 2))
    a.grad = torch.tensor([3.0, 4.0, 0.0])  # norm 5 -> clipped to 3
    b.grad = torch.full((2, 2), 0.5)  # norm 1 -> kept
    clip_per_tensor_([a, b], 3.0)
    torch.testing.assert_close(a.grad, torch.tensor([3.0, 4.0, 0.0]) * 3.0 / (5.0 + 1e-6))
    torch.testing.assert_close(b.grad, torch.full((2, 2), 0.5))


def test_parameter_groups():
    model = DINO(num_prototypes=32, norm_last_layer=False, **TINY)
    opt = model.configure_optimizers()
    names = {id(p): n for n, p in model.student.named_parameters()}
    decay = {names[id(p)] for p in opt.param_groups[0]["params"]}
    no_decay = {names[id(p)] for p in opt.param_groups[1]["params"]}
    assert "backbone.vit.cls_token" in decay and "backbone.vit.pos_embed" in decay
    assert "prototypes.last_layer.weight_v" in decay
    assert "prototypes.last_layer.weight_g" in no_decay
    assert "backbone.vit.norm.weight" in no_decay and "head.mlp.0.bias" in no_decay
    assert opt.param_groups[1]["weight_decay"] == 0


def test_ema_runs_once_per_optimizer_step_and_schedules_apply(fake_fmnist, monkeypatch):
    calls = []
    original = ema_module.ema_update_

    def spy(teacher, student, momentum):
        calls.append(momentum)
        original(teacher, student, momentum)

    monkeypatch.setattr(ema_module, "ema_update_", spy)
    model = IBOT(num_prototypes=32, warmup_epochs=0, base_lr=1e-3, **TINY)
    trainer = _trainer(accumulate_grad_batches=2, limit_train_batches=4, max_epochs=1)
    trainer.fit(model, _data(fake_fmnist))
    assert trainer.global_step == 2 and len(calls) == 2
    assert calls == pytest.approx([model.momentum_at(0), model.momentum_at(1)])
    # lr of the last step: cosine from base_lr * global batch (4 * 2) / 256, T = 2 steps
    opt = trainer.optimizers[0]
    assert opt.param_groups[0]["lr"] == pytest.approx(model.lr_at(1, 8))
    assert model.lr_at(0, 8) == pytest.approx(1e-3 * 8 / 256)
    assert opt.param_groups[1]["weight_decay"] == 0


@pytest.mark.parametrize("freeze", [0, 1])
def test_freeze_last_layer(fake_fmnist, freeze):
    model = DINO(num_prototypes=32, norm_last_layer=False, freeze_last_layer=freeze, warmup_epochs=0, **TINY)
    before = {n: p.detach().clone() for n, p in model.student.prototypes.named_parameters()}
    _trainer(limit_train_batches=2).fit(model, _data(fake_fmnist, masking=False))
    changed = [not torch.equal(before[n], p) for n, p in model.student.prototypes.named_parameters()]
    assert all(changed) if freeze == 0 else not any(changed)


def test_bad_arguments():
    with pytest.raises(ValueError, match="momentum_teacher"):
        DINO(momentum_teacher=1.5, **TINY)
    with pytest.raises(ValueError, match="base_lr"):
        DINO(base_lr=0, **TINY)
    with pytest.raises(ValueError, match="mim_weight"):
        IBOT(mim_weight=-1, **TINY)


@pytest.mark.parametrize("cls", [SOP, IBOT])
def test_bf16_mixed_step_keeps_losses_fp32(cls, fake_fmnist, monkeypatch):
    model = cls(**SOP_SMALL, **TINY) if cls is SOP else cls(num_prototypes=32, **TINY)
    seen = []
    original = model.compute_losses

    def spy(student, teacher, masks, temp):
        seen.append((student.cls.dtype, torch.is_autocast_enabled("cpu")))
        out = original(student, teacher, masks, temp)
        seen.append((out["loss"].dtype, None))
        return out

    monkeypatch.setattr(model, "compute_losses", spy)
    _trainer(precision="bf16-mixed", limit_train_batches=2, limit_val_batches=0).fit(model, _data(fake_fmnist))
    assert seen and all(dtype == torch.float32 for dtype, _ in seen)
    assert all(autocast is False for _, autocast in seen[::2])


def test_pred_start_epoch_empties_masks_and_memory_fill_zeroes_sop_loss(fake_fmnist, monkeypatch):
    model = SOP(pred_start_epoch=1, memory_fill_steps=5, **SOP_SMALL, **TINY)
    seen = []
    original = model.compute_losses

    def spy(student, teacher, masks, temp):
        out = original(student, teacher, masks, temp)
        seen.append((bool(masks.any()), float(out["loss"]), float(out["cls_loss"])))
        return out

    monkeypatch.setattr(model, "compute_losses", spy)
    _trainer(limit_train_batches=2, limit_val_batches=0).fit(model, _data(fake_fmnist))
    assert len(seen) == 2
    assert all(not any_mask for any_mask, _, _ in seen)  # epoch 0 < pred_start_epoch
    assert all(loss == 0.0 and cls > 0 for _, loss, cls in seen)  # steps 0, 1 < memory_fill_steps
    assert int(model.sop_loss.memory.ptr) == 8  # the banks still filled
    with pytest.raises(ValueError, match="pred_start_epoch"):
        DINO(pred_start_epoch=-1, **TINY)


@pytest.mark.parametrize("cls", [IBOT, SOP])
def test_masking_off_trains_methods_that_mask(cls, fake_fmnist, monkeypatch):
    """``masking=False`` gives all-False masks of the real grid: the student sees unmasked views, the
    patch objectives have no masked token and add 0, and the [CLS] loss still trains."""
    model = cls(**SOP_SMALL, **TINY) if cls is SOP else cls(num_prototypes=32, **TINY)
    seen = []
    original = model.compute_losses

    def spy(student, teacher, masks, temp):
        out = original(student, teacher, masks, temp)
        seen.append((tuple(masks.shape), bool(masks.any()), float(out["loss"])))
        return out

    monkeypatch.setattr(model, "compute_losses", spy)
    _trainer(limit_train_batches=2, limit_val_batches=0).fit(model, _data(fake_fmnist, masking=False))
    assert [s[:2] for s in seen] == [((8, 7, 7), False)] * 2  # 2 global views x B = 4
    assert all(loss > 0 and loss == loss for *_, loss in seen)


def test_schedules_use_the_real_steps_per_epoch_when_max_steps_and_max_epochs_are_both_set(fake_fmnist):
    """4 batches per epoch (limit_train_batches) while max_steps / max_epochs = 6 / 3 = 2: the per-epoch
    teacher temperature must follow ``current_epoch`` and the lr warm-up last 1 epoch = 4 steps."""
    model = DINO(num_prototypes=32, base_lr=1e-3, min_lr=1e-6, warmup_epochs=1, teacher_temp=0.07,
                 warmup_teacher_temp=0.04, warmup_teacher_temp_epochs=2, freeze_last_layer=0, **TINY)  # fmt: skip
    seen = []
    original = model.compute_losses

    def spy(student, teacher, masks, temp):
        seen.append((model.current_epoch, temp, model.optimizers().param_groups[0]["lr"]))
        return original(student, teacher, masks, temp)

    model.compute_losses = spy
    _trainer(max_steps=6, max_epochs=3, limit_train_batches=4, limit_val_batches=0).fit(
        model, _data(fake_fmnist, masking=False)
    )
    assert [e for e, _, _ in seen] == [0, 0, 0, 0, 1, 1]
    assert [t for _, t, _ in seen] == pytest.approx([0.04] * 4 + [0.07] * 2)  # linspace(0.04, 0.07, 2)[epoch]
    peak, low = 1e-3 * 4 / 256, 1e-6
    lr = [peak * i / 3 for i in range(4)] + [low + 0.5 * (peak - low) * (1 + math.cos(math.pi * j / 2)) for j in (0, 1)]
    assert [r for _, _, r in seen] == pytest.approx(lr)


def test_ibot_patch_temperature_warms_up_from_pred_start_epoch(fake_fmnist):
    """§6.2 / iBOT code: ``concat(ones(s)·0.04, linspace(0.04, τ'_t, W), ones·τ'_t)`` for the patches while
    the [CLS] temperature warms up from epoch 0."""
    model = IBOT(num_prototypes=32, pred_start_epoch=2, teacher_temp=0.07, teacher_patch_temp=0.06,
                 warmup_teacher_temp=0.04, warmup_teacher_temp_epochs=2, **TINY)  # fmt: skip
    seen = []
    dino_forward, patch_forward = model.dino_loss.forward, model.patch_loss.forward

    def cls_spy(s, t, temp, *args):
        seen.append({"epoch": model.current_epoch, "cls": temp})
        return dino_forward(s, t, temp, *args)

    def patch_spy(s, t, masks, temp, *args, **kwargs):
        seen[-1]["patch"] = temp
        return patch_forward(s, t, masks, temp, *args, **kwargs)

    model.dino_loss.forward, model.patch_loss.forward = cls_spy, patch_spy
    _trainer(max_epochs=5, limit_train_batches=1, limit_val_batches=0).fit(model, _data(fake_fmnist))
    assert [s["epoch"] for s in seen] == [0, 1, 2, 3, 4]
    assert [s["cls"] for s in seen] == pytest.approx([0.04, 0.07, 0.07, 0.07, 0.07])
    assert [s["patch"] for s in seen] == pytest.approx([0.04, 0.04, 0.04, 0.06, 0.06])


def test_max_time_stop_mid_schedule_warns_with_step_and_plan(fake_fmnist):
    model = DINO(num_prototypes=32, **TINY)
    data = _data(fake_fmnist, masking=False)
    with pytest.warns(UserWarning, match=r"stopped at step 0 of the 4 planned by the schedules because max_time"):
        _trainer(max_time={"seconds": 0}, limit_train_batches=4, limit_val_batches=0).fit(model, data)

    class StopAfterTwo(L.Callback):
        def on_train_batch_end(self, trainer, *args):
            trainer.should_stop = trainer.global_step >= 2

    with pytest.warns(UserWarning, match=r"stopped at step 2 of the 4 planned by the schedules: the learning rate"):
        _trainer(limit_train_batches=4, limit_val_batches=0, callbacks=[StopAfterTwo()]).fit(model, data)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _trainer(limit_train_batches=4, limit_val_batches=0).fit(DINO(num_prototypes=32, **TINY), data)
    assert not [w for w in caught if "planned by the schedules" in str(w.message)]


def test_momentum_teacher_end():
    model = DINO(num_prototypes=32, momentum_teacher=0.9, momentum_teacher_end=0.5, **TINY)
    model.set_schedule_length(4, 4)
    expected = [0.5 + 0.5 * (0.9 - 0.5) * (1 + math.cos(math.pi * i / 4)) for i in range(4)]
    assert [model.momentum_at(i) for i in range(4)] == pytest.approx(expected)
    assert DINO(num_prototypes=32, **TINY).hparams.momentum_teacher_end == 1.0  # the papers' default
    with pytest.raises(ValueError, match=r"momentum_teacher_end must be in \[0.0, 1.0\], got 1.5"):
        DINO(momentum_teacher_end=1.5, **TINY)


def _koleo_reference(x: torch.Tensor) -> float:
    """Brute force: each re-normalised row's distance to its nearest other row."""
    rows = [r / r.norm() for r in x.double()]
    dists = [min((rows[i] - rows[j]).norm() for j in range(len(rows)) if j != i) for i in range(len(rows))]
    return -sum(math.log(float(d) + 1e-8) for d in dists) / len(rows)


@pytest.mark.parametrize("cls", [DINO, IBOT, SOP])
def test_koleo_weight_adds_the_regulariser_to_every_method(cls, fake_fmnist, monkeypatch):
    """``koleo_weight`` is shared: the step's loss is the objective's plus ``λ·KoLeo``, KoLeo averaged over
    the two global views' student [CLS] chunks (§4.4), and ``train/koleo_loss`` is logged."""
    weight = 0.3
    kwargs = SOP_SMALL if cls is SOP else dict(num_prototypes=32)
    model = cls(koleo_weight=weight, **kwargs, **TINY)
    seen = []
    original = model.compute_losses

    def spy(student, teacher, masks, temp):
        out = original(student, teacher, masks, temp)
        seen.append((student.cls.detach().clone(), teacher.cls.shape[0] // 2, float(out["loss"])))
        return out

    monkeypatch.setattr(model, "compute_losses", spy)
    trainer = _trainer(max_steps=1, limit_val_batches=0, log_every_n_steps=1)
    trainer.fit(model, _data(fake_fmnist))
    ((cls_rows, batch, objective),) = seen
    koleo = (_koleo_reference(cls_rows[:batch]) + _koleo_reference(cls_rows[batch : 2 * batch])) / 2
    metrics = trainer.callback_metrics
    assert float(metrics["train/koleo_loss"]) == pytest.approx(koleo, rel=1e-4)
    assert float(metrics["train/loss"]) == pytest.approx(objective + weight * koleo, rel=1e-4)
    with pytest.raises(ValueError, match="koleo_weight"):
        cls(koleo_weight=-0.1, **kwargs, **TINY)


def test_progress_bar_loss_is_a_host_copy_logged_with_the_logger(fake_fmnist, monkeypatch):
    """The bar's ``loss`` is logged on step 0 and the steps the logger writes (``log_every_n_steps``), as a
    detached host tensor: Lightning turns a logged progress-bar tensor into a number on every later step too,
    which for a device tensor is a host sync each step on a GPU. The bar shows the last written value."""
    model = DINO(num_prototypes=32, warmup_epochs=0, **TINY)
    logged = []
    original = L.LightningModule.log

    def spy(self, name, value, *args, **kwargs):
        if name == "loss":
            logged.append((self.global_step, value.device.type, value.requires_grad, float(value)))
        return original(self, name, value, *args, **kwargs)

    monkeypatch.setattr(L.LightningModule, "log", spy)
    trainer = _trainer(max_steps=7, max_epochs=-1, log_every_n_steps=3)
    trainer.fit(model, _data(fake_fmnist))
    assert [(s, d, g) for s, d, g, _ in logged] == [(0, "cpu", False), (2, "cpu", False), (5, "cpu", False)]
    assert trainer.progress_bar_metrics["loss"] == pytest.approx(logged[-1][3])


@pytest.mark.parametrize(
    ("cls", "kwargs", "allowed"),
    [
        (DINO, dict(num_prototypes=32), {"finite-loss check": 1}),
        (IBOT, dict(num_prototypes=32), {"finite-loss check": 1, "masked tokens": 1}),
        (SOP, SOP_SMALL, {"finite-loss check": 1, "masked tokens": 1, "distinct supports": 1}),
    ],
)
def test_a_training_step_reads_few_device_values_on_the_host(cls, kwargs, allowed, fake_fmnist):
    """Every read of a device value on the host (``.item()``, a truth test, ``nonzero`` — a boolean index runs
    one, and its backward another) is a synchronisation on a GPU. Counted with torch.profiler over steps 2-4:
    the finite-loss check (by design: it stops training before a bad update), one read of the masked-token
    count (its length is the data's) and the count of SOP's distinct [CLS] supports (the size of its sparse
    products; SOP-MIM's, with k = 0, are its anchors, distinct by construction); nothing else. Two reads that
    only a CPU makes are not counted: the CPU fused AdamW's and Lightning's reading of the progress bar's host
    copy; nor the data loading's (in the process here: ``num_workers=0``)."""
    model = cls(warmup_epochs=0, **kwargs, **TINY)
    profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], with_stack=True)

    class Window(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if batch_idx == 2:
                profiler.start()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if batch_idx == 4:
                profiler.stop()

    _trainer(max_steps=6, max_epochs=-1, log_every_n_steps=100, callbacks=[Window()]).fit(model, _data(fake_fmnist))
    reads = []
    for event in profiler.events():
        if event.name not in ("aten::nonzero", "aten::_local_scalar_dense"):
            continue
        chain, parent = [], event.cpu_parent
        while parent is not None:
            chain.append(parent.name)
            parent = parent.cpu_parent
        skip = ("sop_lightning/data/", "torchvision/", "_fused_adamw_", "to_item")  # loading the next batch
        if not any(s in c for c in chain for s in skip):
            reads.append(" <- ".join(chain[:3]))
    assert len(reads) == 3 * sum(allowed.values()), "\n".join(reads)
