"""Training images/second of the library against lightly's DINO and a bare PyTorch loop, side by side in one run.

    pip install -e '.[bench]'                      # lightly, for the peer column
    python benchmarks/throughput.py                # demo config, CPU: step and end-to-end figures, ratios
    python benchmarks/throughput.py --preset imagenet --precision bf16-mixed   # ViT-S/16, 2x224 + 10x96 (GPU)

Contestants, all on the same timm ViT, head sizes, crops, batch, precision and threads:

* ``library <method>``: :class:`sop_lightning.DINO` / ``IBOT`` / ``SOP`` from the preset's config, trained by a
  Lightning ``Trainer`` as users run them (logger, checkpoints and progress bar off in every contestant);
* ``lightly DINO``: lightly's ``DINOProjectionHead`` and ``DINOLoss`` with ``update_momentum``, written as in
  lightly's DINO example (a LightningModule, one forward per view), with AdamW, DINO's per-tensor gradient clip
  and the same ``Trainer``;
* ``bare DINO``: a plain PyTorch loop doing the same computation — teacher forward (no grad), student forward
  (global views in one call, local views in one call), DINO loss with centering, backward, per-tensor clip,
  AdamW, EMA (``torch._foreach_lerp_``) — the floor a hand-written script reaches.

Two modes: ``step`` feeds one fixed batch from memory (the training step alone, the batch made once by the
library's data module); ``loader`` trains end to end from each contestant's data pipeline (library:
``SSLDataModule``; lightly: ``DINOTransform``; bare: the torchvision pipeline of ``data_pipeline.py``) with
``--workers`` loader workers. Each contestant runs ``--steps`` steps ``--rounds`` times, the contestants
interleaved; a round's time per step is its mean over the steps after ``--warmup`` and the best round counts.
Targets (issue 11): library DINO step ≥ 1.0× lightly and ≥ 0.95× the bare loop; SOP step ≤ 1.05× iBOT step.

``--profile N`` runs each contestant once more in step mode with steps ``warmup + 1 … warmup + N`` under
``torch.profiler`` (not timed) and prints, per step, its device kernel time, launches, host synchronisations,
copies and ``.item()`` calls, then the operators where each library method differs most from the bare loop.
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import lightning as L
import timm
import torch
import torch.nn.functional as F
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from data_pipeline import IMAGENET_DATA, PILImages, bare_loader, demo_data_args, write_jpegs  # noqa: E402

import sop_lightning  # noqa: E402
from sop_lightning.data import SSLDataModule  # noqa: E402
from sop_lightning.data.demo import DEFAULT_FASHION_MNIST_ROOT  # noqa: E402
from sop_lightning.data.transforms import IMAGENET_MEAN, IMAGENET_STD  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
METHODS = {"dino": "DINO", "ibot": "IBOT", "sop": "SOP"}


# ---------------------------------------------------------------------------------------------------- configs
def preset(name: str, method: str) -> tuple[dict, dict]:
    """``(model init_args, data init_args)`` of ``method`` in a preset."""
    import yaml

    config = yaml.safe_load((ROOT / "experiments" / "demo" / f"{method}.yaml").read_text())
    model, data = dict(config["model"]["init_args"]), demo_data_args(method)
    if name == "imagenet":  # the papers' ViT-S/16 recipe sizes (heads, prototypes, banks at their defaults)
        for key in ("img_size", "patch_size", "embed_dim", "depth", "num_heads", "hidden_dim", "num_prototypes",
                    "memory_size", "patch_memory_size", "num_anchors", "num_patch_anchors"):  # fmt: skip
            model.pop(key, None)
        model["backbone"] = "vit_small_patch16_224"
        masking = data.get("masking", True)
        data = {**IMAGENET_DATA, "masking": masking}
    model["img_size"], model["patch_size"] = data["global_size"], data["patch_size"]  # as the CLI links them
    model["drop_path_rate"] = 0.0  # the bare loop and lightly's example have no stochastic depth
    return model, data


def vit_kwargs(model_args: dict, data_args: dict) -> dict:
    """``timm.create_model`` arguments of the preset's ViT (the library's backbone, built the same way)."""
    keys = ("embed_dim", "depth", "num_heads")
    kwargs = {k: model_args[k] for k in keys if model_args.get(k) is not None}
    return {"model_name": model_args["backbone"], "img_size": data_args["global_size"],
            "patch_size": data_args["patch_size"], "num_classes": 0, "dynamic_img_size": True, **kwargs}  # fmt: skip


def head_sizes(model_args: dict) -> tuple[int, int, int]:
    """``(hidden, bottleneck, prototypes)`` of the DINO head (library defaults where the config is silent)."""
    return model_args.get("hidden_dim", 2048), model_args.get("out_dim", 256), model_args.get("num_prototypes", 65536)


# ---------------------------------------------------------------------------------------------------- timing
class StepClock(L.Callback):
    """Wall-clock time at the end of every training step (after a device synchronisation)."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, *args) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)
        self.times.append(time.perf_counter())
        PROFILER.tick(len(self.times))


class StepProfiler:
    """``torch.profiler`` over steps ``start + 1 … start + steps`` of a contestant's run (``--profile``): per
    step, the device's kernel time, kernel launches, host synchronisations, copies and ``.item()`` calls, and
    each operator's time, to say where one contestant spends more than another."""

    def __init__(self) -> None:
        self.start = self.steps = 0
        self._prof, self.summaries = None, {}

    def tick(self, done: int) -> None:
        """Called after each step with the number of steps done."""
        if not self.steps:
            return
        if done == self.start:
            activities = [torch.profiler.ProfilerActivity.CPU]
            if torch.cuda.is_available():
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            self._prof = torch.profiler.profile(activities=activities)
            self._prof.start()
        elif done == self.start + self.steps and self._prof is not None:
            self._prof.stop()

    def take(self, name: str) -> str:
        """The summary of the run just profiled (``name``), kept for :meth:`differences`."""
        prof, self._prof = self._prof, None
        if prof is None:
            return f"profile {name}: the run ended before step {self.start + self.steps}"
        averages, n = prof.key_averages(), self.steps

        def device_ms(e) -> float:  # kernels only: user annotations also carry a device time
            kernel = e.device_type.name != "CPU" and not getattr(e, "is_user_annotation", False) and "#" not in e.key
            return (getattr(e, "self_device_time_total", 0) or 0) / 1000 if kernel else 0.0

        def calls(*keys: str) -> float:
            return sum(e.count for e in averages if e.key in keys) / n

        self.summaries[name] = {e.key: (device_ms(e) / n, e.count / n, e.self_cpu_time_total / 1000 / n)
                                for e in averages}  # fmt: skip
        kernels = sum(v[0] for v in self.summaries[name].values())
        return (f"profile {name}: {kernels:.1f} ms of device kernels a step, "
                f"{calls('cudaLaunchKernel', 'cuLaunchKernel', 'cudaLaunchKernelExC'):.0f} launches, "
                f"{calls('cudaStreamSynchronize', 'cudaDeviceSynchronize', 'cudaEventSynchronize'):.1f} "
                f"synchronisations, {calls('cudaMemcpyAsync', 'cudaMemcpy'):.1f} copies, "
                f"{calls('aten::_local_scalar_dense'):.1f} .item(), "
                f"{sum(e.count for e in averages if e.key.startswith('aten::')) / n:.0f} aten calls")  # fmt: skip

    def differences(self, a: str, b: str, rows: int = 12) -> str:
        """The operators whose device time, calls and host time per step differ most between runs ``a`` and ``b``."""
        if a not in self.summaries or b not in self.summaries:
            return ""
        sa, sb = self.summaries[a], self.summaries[b]
        keys, zero, out = set(sa) | set(sb), (0.0, 0.0, 0.0), []
        on_device = any(v[0] for v in (*sa.values(), *sb.values()))  # a CPU run has no device kernels
        for title, i in ((("device ms", 0),) if on_device else ()) + (("calls", 1), ("host ms", 2)):
            diff = sorted(((sa.get(k, zero)[i] - sb.get(k, zero)[i], k) for k in keys), reverse=True)[:rows]
            out += [f"{title} a step, {a} - {b}:"] + [f"  {d:+9.3f}  {k[:80]}" for d, k in diff]
        return "\n".join(out)


PROFILER = StepProfiler()


def seconds_per_step(times: list[float], warmup: int) -> float:
    kept = times[warmup:]
    return (kept[-1] - kept[0]) / (len(kept) - 1)


class FixedBatches:
    """The same batch ``steps`` times: a loader for Lightning without data loading."""

    def __init__(self, batch, steps: int):
        self.batch, self.steps = batch, steps

    def __len__(self) -> int:
        return self.steps

    def __iter__(self):
        return (self.batch for _ in range(self.steps))


def trainer(args, steps: int, clock: StepClock, workdir: Path) -> L.Trainer:
    return L.Trainer(
        accelerator=args.accelerator, devices=1, precision=args.precision, max_steps=steps, max_epochs=-1,
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        limit_val_batches=0, num_sanity_val_steps=0, callbacks=[clock], default_root_dir=str(workdir),
    )  # fmt: skip


def clip_per_tensor_(parameters, max_norm: float) -> None:
    """DINO's ``clip_gradients``: each gradient scaled to norm ≤ ``max_norm`` (foreach)."""
    grads = [p.grad for p in parameters if p.grad is not None]
    norms = torch._foreach_norm(grads)
    torch._foreach_mul_(grads, [(max_norm / (n + 1e-6)).clamp(max=1.0) for n in norms])


def adamw(parameters, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW with DINO's groups: weights decayed, biases and 1-D tensors not."""
    params = [p for p in parameters if p.requires_grad]
    decay = [p for p in params if p.ndim > 1]
    rest = [p for p in params if p.ndim <= 1]
    return torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}],
                             lr=lr)  # fmt: skip


# ---------------------------------------------------------------------------------------------------- lightly
class LightlyDINO(L.LightningModule):
    """lightly's DINO example on a timm ViT (``lightly.models.modules.DINOProjectionHead``, ``lightly.loss.DINOLoss``,
    ``lightly.models.utils.update_momentum``), with AdamW and the per-tensor clip of the other contestants."""

    def __init__(self, vit: dict, hidden: int, bottleneck: int, prototypes: int, lr: float, clip: float):
        super().__init__()
        from lightly.loss import DINOLoss
        from lightly.models.modules import DINOProjectionHead
        from lightly.models.utils import deactivate_requires_grad

        def backbone() -> nn.Module:
            return timm.create_model(**vit)

        def head() -> nn.Module:
            return DINOProjectionHead(self.student_backbone.embed_dim, hidden, bottleneck, prototypes,
                                      freeze_last_layer=0, norm_last_layer=False)  # fmt: skip

        self.student_backbone = backbone()
        self.student_head = head()
        # lightly's weight-normed head cannot be deep-copied: build the teacher and load the student's weights
        self.teacher_backbone, self.teacher_head = backbone(), head()
        self.teacher_backbone.load_state_dict(self.student_backbone.state_dict())
        self.teacher_head.load_state_dict(self.student_head.state_dict())
        deactivate_requires_grad(self.teacher_backbone)
        deactivate_requires_grad(self.teacher_head)
        self.criterion = DINOLoss(output_dim=prototypes, warmup_teacher_temp_epochs=0)
        self.lr, self.clip = lr, clip

    def forward(self, x: Tensor) -> Tensor:
        return self.student_head(self.student_backbone(x))

    def forward_teacher(self, x: Tensor) -> Tensor:
        return self.teacher_head(self.teacher_backbone(x))

    def training_step(self, batch, batch_idx: int) -> Tensor:
        from lightly.models.utils import update_momentum

        momentum = 0.996
        update_momentum(self.student_backbone, self.teacher_backbone, m=momentum)
        update_momentum(self.student_head, self.teacher_head, m=momentum)
        views = batch[0]
        teacher_out = [self.forward_teacher(view) for view in views[:2]]
        student_out = [self.forward(view) for view in views]
        return self.criterion(teacher_out, student_out, teacher_temp=0.04)

    def on_after_backward(self) -> None:
        self.student_head.cancel_last_layer_gradients(current_epoch=self.current_epoch)

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        clip_per_tensor_(self.parameters(), self.clip)

    def configure_optimizers(self):
        return adamw(list(self.student_backbone.parameters()) + list(self.student_head.parameters()), self.lr, 0.04)


# ---------------------------------------------------------------------------------------------------- bare loop
class BareDINO(nn.Module):
    """ViT → 3-layer MLP → L2 norm → weight-normalised prototypes, written out (DINO's ``DINOHead``)."""

    def __init__(self, vit: dict, hidden: int, bottleneck: int, prototypes: int):
        super().__init__()
        self.backbone = timm.create_model(**vit)
        d = self.backbone.embed_dim
        self.mlp = nn.Sequential(nn.Linear(d, hidden), nn.GELU(), nn.Linear(hidden, hidden), nn.GELU(),
                                 nn.Linear(hidden, bottleneck))  # fmt: skip
        self.weight_v = nn.Parameter(torch.randn(prototypes, bottleneck) * 0.02)
        self.weight_g = nn.Parameter(torch.ones(prototypes, 1))

    def forward(self, views: list[Tensor]) -> Tensor:
        """Logits ``(V·B, K)``: the 2 global views in one backbone call, the local views in another."""
        cls = [self.backbone.forward_features(torch.cat(views[:2]))[:, 0]]
        if len(views) > 2:
            cls.append(self.backbone.forward_features(torch.cat(views[2:]))[:, 0])
        z = F.normalize(self.mlp(torch.cat(cls)), dim=-1)
        w = self.weight_g * self.weight_v / self.weight_v.norm(dim=1, keepdim=True)
        return z @ w.to(z.dtype).t()


class BareLoop:
    """One DINO training step per call: forwards, loss with centering, backward, clip, AdamW, EMA."""

    def __init__(self, vit: dict, hidden: int, bottleneck: int, prototypes: int, device, precision: str, lr: float):
        self.student = BareDINO(vit, hidden, bottleneck, prototypes).to(device)
        self.teacher = copy.deepcopy(self.student).requires_grad_(False)
        self.optimizer = adamw(self.student.parameters(), lr, 0.04)
        self.center = torch.zeros(1, prototypes, device=device)
        self.device = torch.device(device)
        self.autocast = precision in ("bf16-mixed", "16-mixed")
        self.dtype = torch.bfloat16 if precision == "bf16-mixed" else torch.float16
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=precision == "16-mixed")
        self.student_params = list(self.student.parameters())
        self.teacher_params = list(self.teacher.parameters())

    def step(self, views: list[Tensor]) -> None:
        views = [v.to(self.device, non_blocking=True) for v in views]
        batch = views[0].shape[0]
        with torch.autocast(self.device.type, self.dtype, enabled=self.autocast):
            with torch.no_grad():
                teacher = self.teacher(views[:2])
            student = self.student(views)
        teacher, student = teacher.float(), student.float()
        targets = F.softmax((teacher - self.center) / 0.04, dim=-1).chunk(2)
        log_probs = F.log_softmax(student / 0.1, dim=-1).chunk(len(views))
        terms = [-(t * log_probs[v]).sum(-1).mean() for i, t in enumerate(targets)
                 for v in range(len(views)) if v != i]  # fmt: skip
        loss = sum(terms) / len(terms)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.optimizer)
        clip_per_tensor_(self.student_params, 3.0)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        with torch.no_grad():
            self.center.mul_(0.9).add_(teacher.mean(0, keepdim=True), alpha=0.1)
            torch._foreach_lerp_(self.teacher_params, self.student_params, 1 - 0.996)
        del batch

    def run(self, batches, steps: int) -> list[float]:
        """Train ``steps`` steps on ``batches`` (iterated again when it ends); the time after each step."""
        times: list[float] = []
        while len(times) < steps:
            for batch in batches:
                self.step(batch[0])
                if self.device.type == "cuda":
                    torch.cuda.synchronize(self.device)
                times.append(time.perf_counter())
                PROFILER.tick(len(times))
                if len(times) == steps:
                    break
        return times


# ---------------------------------------------------------------------------------------------------- runs
def library_run(method: str, args, batch, steps: int, workdir: Path, datamodule: SSLDataModule | None) -> list[float]:
    model_args, _ = preset(args.preset, method)
    if method == "sop" and args.search_dtype != "config":
        model_args["search_dtype"] = args.search_dtype
    torch.manual_seed(0)
    model = getattr(sop_lightning, METHODS[method])(**model_args)
    clock = StepClock()
    fit = trainer(args, steps, clock, workdir)
    if datamodule is None:
        fit.fit(model, train_dataloaders=FixedBatches(batch, steps))
    else:
        fit.fit(model, datamodule=datamodule)
    return clock.times


def lightly_run(args, loader, steps: int, workdir: Path) -> list[float]:
    model_args, data_args = preset(args.preset, "dino")
    torch.manual_seed(0)
    lr = model_args["base_lr"] * args.batch / 256
    model = LightlyDINO(vit_kwargs(model_args, data_args), *head_sizes(model_args), lr=lr, clip=3.0)
    clock = StepClock()
    trainer(args, steps, clock, workdir).fit(model, train_dataloaders=loader)
    return clock.times


def bare_run(args, batches, steps: int) -> list[float]:
    model_args, data_args = preset(args.preset, "dino")
    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() and args.accelerator != "cpu" else "cpu"
    loop = BareLoop(vit_kwargs(model_args, data_args), *head_sizes(model_args), device, args.precision,
                    model_args["base_lr"] * args.batch / 256)  # fmt: skip
    return loop.run(batches, steps)


def data_source(args, workdir: Path):
    """``(library dataset argument, PILImages)`` of the preset's training images."""
    if args.preset == "demo":
        from sop_lightning.data.demo import FashionMNIST

        return "fashion_mnist", PILImages(FashionMNIST(args.root))
    folder = write_jpegs(workdir / "jpegs", args.images)
    return str(folder), PILImages(folder)


def datamodule(args, method: str, source, workers: int) -> SSLDataModule:
    _, data_args = preset(args.preset, method)
    keep = {k: v for k, v in data_args.items() if k not in ("batch_size", "num_workers", "dataset", "root")}
    return SSLDataModule(dataset=source, root=args.root, batch_size=args.batch, num_workers=workers,
                         augmentation_seed=0, **keep)  # fmt: skip


def lightly_loader(args, images: PILImages, workers: int):
    from lightly.transforms import DINOTransform

    _, d = preset(args.preset, "dino")
    jitter, blur = d.get("jitter", (0.4, 0.4, 0.2, 0.1)), d.get("blur_probs", (1.0, 0.1, 0.5))
    transform = DINOTransform(
        global_crop_size=d["global_size"], global_crop_scale=tuple(d["global_scale"]), local_crop_size=d["local_size"],
        local_crop_scale=tuple(d["local_scale"]), n_local_views=d["num_local"], cj_prob=d.get("jitter_prob", 0.8),
        cj_strength=1.0, cj_bright=jitter[0], cj_contrast=jitter[1], cj_sat=jitter[2], cj_hue=jitter[3],
        random_gray_scale=d.get("grayscale_prob", 0.2), gaussian_blur=tuple(blur),
        sigmas=tuple(d.get("blur_sigma", (0.1, 2.0))), solarization_prob=d.get("solarize_prob", 0.2),
        normalize={"mean": list(d.get("mean", IMAGENET_MEAN)), "std": list(d.get("std", IMAGENET_STD))},
    )  # fmt: skip

    class Views(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return len(images)

        def __getitem__(self, i: int):
            img, label = images[i]
            return transform(img), label

    return torch.utils.data.DataLoader(Views(), batch_size=args.batch, shuffle=True, drop_last=True,
                                       num_workers=workers, persistent_workers=workers > 0)  # fmt: skip


def fixed_batch(args, method: str, source):
    """One training batch made by the library's data module (crops and masks of ``method``'s config)."""
    dm = datamodule(args, method, source, 0)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    if torch.cuda.is_available() and args.accelerator != "cpu":  # in device memory: the step alone is timed
        batch = type(batch)([v.cuda() for v in batch.views], batch.masks.cuda(), batch.labels, batch.indices)
    return batch


def contestants(args, mode: str, source, images: PILImages, workdir: Path) -> dict[str, Callable[[], list[float]]]:
    """Name → a call that trains ``steps`` steps and returns the step end times."""
    steps = args.steps if mode == "step" else int(args.steps * 1.5)
    runs: dict[str, Callable[[], list[float]]] = {}
    if mode == "step":
        batches = {m: fixed_batch(args, m, source) for m in {"dino", *args.methods}}
        plain = (batches["dino"].views, None)  # lightly's and the bare loop's batch: (views, labels)
        for m in args.methods:
            runs[f"library {m}"] = partial(library_run, m, args, batches[m], steps, workdir, None)
        peer_data = {"lightly": partial(FixedBatches, plain, steps), "bare": partial(FixedBatches, plain, steps)}
    else:
        for m in args.methods:
            runs[f"library {m}"] = lambda m=m: library_run(m, args, None, steps, workdir,
                                                           datamodule(args, m, source, args.workers))  # fmt: skip
        _, data_args = preset(args.preset, "dino")
        peer_data = {"lightly": partial(lightly_loader, args, images, args.workers),
                     "bare": partial(bare_loader, images, data_args, args.batch, args.workers)}  # fmt: skip
    if "lightly" in args.peers:
        runs["lightly dino"] = lambda: lightly_run(args, peer_data["lightly"](), steps, workdir)
    if "bare" in args.peers:
        runs["bare dino"] = lambda: bare_run(args, peer_data["bare"](), steps)
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="demo", choices=["demo", "imagenet"])
    parser.add_argument("--modes", nargs="+", default=["step", "loader"], choices=["step", "loader"])
    parser.add_argument("--methods", nargs="+", default=["dino", "ibot", "sop"], choices=list(METHODS))
    parser.add_argument("--peers", nargs="+", default=["lightly", "bare"], choices=["lightly", "bare"])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=30, help="steps per round (step mode; loader mode: 1.5x)")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workers", type=int, default=1, help="loader workers of the loader mode")
    parser.add_argument("--precision", default="32-true", choices=["32-true", "bf16-mixed", "16-mixed"])
    parser.add_argument("--accelerator", default="auto")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--images", type=int, default=2048, help="synthetic JPEGs of the imagenet preset")
    parser.add_argument("--root", default=DEFAULT_FASHION_MNIST_ROOT, help="Fashion-MNIST folder of the demo preset")
    parser.add_argument("--profile", type=int, default=0, help="after the timed rounds, one more step-mode run of "
                        "each contestant with this many steps after the warm-up under torch.profiler (not timed): "
                        "where its step differs from the bare loop's")  # fmt: skip
    parser.add_argument("--search-dtype", default="config", choices=["config", "auto", "float32", "bfloat16"],
                        help="SOP's neighbour-search dtype (default: the config's, 'auto')")  # fmt: skip
    args = parser.parse_args()
    if args.profile < 0 or args.warmup + args.profile > args.steps:
        parser.error(
            f"--profile {args.profile} must be >= 0 and fit after --warmup {args.warmup} in --steps {args.steps}"
        )
    if args.threads:
        torch.set_num_threads(args.threads)
    if "lightly" in args.peers:
        try:
            import lightly  # noqa: F401
        except ImportError:
            sys.exit("the lightly column needs the bench extra: pip install -e '.[bench]' (or --peers bare)")
    L.seed_everything(0, verbose=False)
    import logging
    import warnings

    for name in ("lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)

    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", ".*stopped at step.*")
    results: dict[tuple[str, str], float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        source, images = data_source(args, workdir)
        for mode in args.modes:
            runs = contestants(args, mode, source, images, workdir)
            best = {name: math.inf for name in runs}
            for _ in range(args.rounds):
                for name, run in runs.items():
                    best[name] = min(best[name], seconds_per_step(run(), args.warmup))
            if mode == "step" and args.profile > 0:  # an extra run each, its times not counted
                for name, run in runs.items():
                    PROFILER.start, PROFILER.steps = args.warmup, args.profile
                    run()
                    print(PROFILER.take(name), flush=True)
                PROFILER.steps = 0
                for name in (n for n in runs if n.startswith("library") and "bare dino" in runs):
                    print(PROFILER.differences(name, "bare dino"), flush=True)
            for name, seconds in best.items():
                results[(mode, name)] = seconds
                print(f"{mode:6s} {name:13s} {args.batch / seconds:8.1f} img/s  ({seconds * 1000:7.1f} ms/step)",
                      flush=True)  # fmt: skip
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"{os.cpu_count()} CPU cores"
    print(f"\n{args.preset} preset, batch {args.batch}, {args.precision}, {device}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, best of {args.rounds} rounds")  # fmt: skip
    if "sop" in args.methods:
        from sop_lightning.losses.sop import resolve_search_dtype

        search = args.search_dtype if args.search_dtype != "config" else preset(args.preset, "sop")[0].get(
            "search_dtype", "float32")  # fmt: skip
        where = torch.device("cuda" if torch.cuda.is_available() and args.accelerator != "cpu" else "cpu")
        print(f"SOP neighbour search: search_dtype={search!r} -> {resolve_search_dtype(search, where)}")
    for mode in args.modes:
        t = {name: s for (m, name), s in results.items() if m == mode}
        lib = t.get("library dino")
        if lib is not None and "lightly dino" in t:
            print(f"{mode}: library DINO / lightly DINO = {t['lightly dino'] / lib:.2f}x images/s (target >= 1.0)")
        if lib is not None and "bare dino" in t:
            print(f"{mode}: library DINO / bare loop = {t['bare dino'] / lib:.2f}x images/s (target >= 0.95)")
        if "library sop" in t and "library ibot" in t:
            print(f"{mode}: SOP step / iBOT step = {t['library sop'] / t['library ibot']:.2f}x time (target <= 1.05)")


if __name__ == "__main__":
    main()
