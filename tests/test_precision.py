"""bf16-mixed: the backbones run in bf16, while softmaxes, centers, vMF normalisers, SOP probabilities,
banks, losses and the weights (student and EMA teacher) stay fp32 (ALGORITHMS.md §10)."""

import lightning as L
import pytest
import torch

import sop_lightning.losses.sop as sop_module
import sop_lightning.methods.base as base_module
from sop_lightning import DINO, IBOT, SOP, DINOvMF, IBOTvMF, SSLDataModule
from sop_lightning.losses.dino import Center

TINY = dict(backbone="vit_tiny_patch16_224", img_size=28, patch_size=4, embed_dim=32, depth=1, num_heads=2,
            hidden_dim=32, out_dim=16)  # fmt: skip
METHODS = {
    "SOP": (SOP, dict(memory_size=64, patch_memory_size=32, num_anchors=8, num_patch_anchors=4)),
    "DINO": (DINO, dict(num_prototypes=8)),
    "IBOT": (IBOT, dict(num_prototypes=8)),
    "DINOvMF": (DINOvMF, dict(num_prototypes=8)),
    "IBOTvMF": (IBOTvMF, dict(num_prototypes=8)),
}


def _recording(fn, seen, name):
    def wrapper(*args, **kwargs):
        out = fn(*args, **kwargs)
        seen.setdefault(name, set()).add(out.dtype)
        return out

    return wrapper


@pytest.mark.parametrize("name", list(METHODS))
def test_bf16_mixed_keeps_the_objectives_and_weights_in_fp32(name, fake_fmnist, monkeypatch):
    cls, kw = METHODS[name]
    seen: dict[str, set] = {}
    monkeypatch.setattr(base_module, "vmf_bias", _recording(base_module.vmf_bias, seen, "vmf_bias"))
    monkeypatch.setattr(sop_module, "sop_probabilities", _recording(sop_module.sop_probabilities, seen, "sop_probs"))
    monkeypatch.setattr(Center, "teacher_probs", _recording(Center.teacher_probs, seen, "teacher_probs"))
    model = cls(**TINY, **kw)
    model.student.backbone.vit.blocks[0].mlp.fc1.register_forward_hook(  # a matmul: bf16 under autocast
        lambda m, i, o: seen.setdefault("backbone", set()).add(o.dtype)
    )
    losses = [m for n, m in model.named_children() if n.endswith("loss")]
    for loss in losses:
        loss.register_forward_hook(lambda m, i, o: seen.setdefault("loss", set()).add(o.dtype))
    data = SSLDataModule(root=str(fake_fmnist), batch_size=4, num_workers=0, global_size=28, local_size=12,
                         num_local=1, patch_size=4, eval_resize_ratio=1.0)  # fmt: skip
    trainer = L.Trainer(accelerator="cpu", precision="bf16-mixed", max_steps=2, logger=False, limit_val_batches=0,
                        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False)  # fmt: skip
    trainer.fit(model, data)
    assert trainer.global_step == 2
    assert seen["backbone"] == {torch.bfloat16}  # autocast was on: the test would otherwise prove nothing
    assert seen["loss"] == {torch.float32}
    expected = {"SOP": {"sop_probs"}, "DINO": {"teacher_probs"}, "IBOT": {"teacher_probs"}}
    expected.update(DINOvMF={"teacher_probs", "vmf_bias"}, IBOTvMF={"teacher_probs", "vmf_bias"})
    for part in expected[name]:
        assert seen[part] == {torch.float32}, part
    buffers = {
        n: b for n, b in model.named_buffers() if b.is_floating_point() and not n.startswith(("student.", "teacher."))
    }
    assert buffers and all(b.dtype == torch.float32 for b in buffers.values())  # banks, centers
    assert all(p.dtype == torch.float32 for p in model.parameters())  # student and EMA teacher
    assert all(torch.isfinite(p).all() for p in model.teacher.parameters())
