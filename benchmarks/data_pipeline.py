"""Images/second per loader worker of the training pipeline against a bare torchvision pipeline, side by side.

    python benchmarks/data_pipeline.py                       # demo and ImageNet settings, 1 worker
    python benchmarks/data_pipeline.py --settings imagenet --workers 1 2

Two settings:

* ``demo``: the data of ``make demo`` (``experiments/demo/sop.yaml``: Fashion-MNIST, its global and local
  crops, block masks; ``benchmarks/results/data_pipeline_cpu.txt`` was measured with 2 × 28 + 4 × 14 px);
* ``imagenet``: the paper recipes' crops (2 × 224 + 10 × 96 px, DINO's blur / solarisation probabilities,
  block masks on the 14 × 14 grid of a /16 ViT), decoded from a folder of synthetic JPEGs written by the
  benchmark (``--images`` files of ``--image-size`` px, about ImageNet's mean size and file size).

``library`` is :class:`~sop_lightning.SSLDataModule`'s training loader (multi-crop + per-sample seeding +
masks + collate into a :class:`~sop_lightning.data.MultiCropBatch`); ``bare`` is what one writes with
torchvision alone, as in DINO's reference code: a PIL pipeline of ``torchvision.transforms`` producing the same
crops (same sizes, scales, bicubic resizing, flip, colour jitter, grayscale, PIL Gaussian blur, solarisation,
normalisation; no masks), in a ``DataLoader`` with the same batch size and workers. Both read the same images.
Each loader is iterated for ``--batches`` batches after ``--warmup`` (worker start-up), the two alternating
``--rounds`` times; the best round counts. With ``W`` workers and nothing consuming the batches, images/s ÷ W
is the rate of one worker.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import yaml
from PIL import Image, ImageFilter, ImageOps
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms as T
from torchvision.transforms.functional import to_pil_image

ROOT = Path(__file__).resolve().parents[1]

#: Recipe values of the ImageNet setting (DINO / iBOT / SOP, ALGORITHMS.md §9.1).
IMAGENET_DATA = dict(
    global_size=224, local_size=96, num_local=10, global_scale=[0.25, 1.0], local_scale=[0.05, 0.25],
    patch_size=16, blur_probs=[1.0, 0.1, 0.5], jitter=[0.4, 0.4, 0.2, 0.1], masking=True,
    mask_ratio=[0.0, 0.3], mask_ratio_var=[0.0, 0.2],
)  # fmt: skip


def demo_data_args(method: str = "sop") -> dict:
    """The ``data.init_args`` of ``experiments/demo/<method>.yaml``."""
    config = yaml.safe_load((ROOT / "experiments" / "demo" / f"{method}.yaml").read_text())
    return dict(config["data"]["init_args"])


def write_jpegs(folder: Path, count: int, size: tuple[int, int] = (500, 375), seed: int = 0) -> Path:
    """``count`` synthetic RGB JPEGs (quality 90) of ``size`` px in ``folder``: smooth random colour fields with
    texture, so decoding and resizing cost what natural photographs of that size cost (~80–120 kB each)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    w, h = size
    for i in range(count):
        path = folder / f"img_{i:05d}.jpg"
        if path.exists():
            continue
        coarse = Image.fromarray(rng.integers(0, 256, (h // 40 + 2, w // 40 + 2, 3), dtype=np.uint8))
        field = np.asarray(coarse.resize((w, h), Image.BICUBIC), dtype=np.int16)
        texture = rng.normal(0, 24, (h, w, 1)).astype(np.int16)
        Image.fromarray(np.clip(field + texture, 0, 255).astype(np.uint8)).save(path, quality=90)
    return folder


class PILImages(Dataset):
    """``(PIL image, label)`` of a data set of tensor images (Fashion-MNIST) or of a folder of image files."""

    def __init__(self, source: Dataset | Path):
        self.source = source
        self.files = sorted(Path(source).glob("*.jpg")) if isinstance(source, Path) else None

    def __len__(self) -> int:
        return len(self.files) if self.files is not None else len(self.source)  # type: ignore[arg-type]

    def __getitem__(self, index: int):
        if self.files is not None:
            with Image.open(self.files[index]) as img:
                return img.convert("RGB"), 0
        image, label = self.source[index]
        return to_pil_image(image.as_subclass(torch.Tensor)), label


class _PILBlur:
    def __init__(self, p: float, sigma: tuple[float, float]):
        self.p, self.sigma = p, sigma

    def __call__(self, img):
        if random.random() >= self.p:
            return img
        return img.filter(ImageFilter.GaussianBlur(radius=random.uniform(*self.sigma)))


class _PILSolarize:
    def __init__(self, p: float):
        self.p = p

    def __call__(self, img):
        return ImageOps.solarize(img) if random.random() < self.p else img


class BareMultiCrop:
    """DINO's reference multi-crop written with ``torchvision.transforms`` on PIL images: the same crops as the
    library's :class:`~sop_lightning.data.MultiCropTransform` for the same arguments (a ``data.init_args`` dict)."""

    def __init__(self, args: dict):
        mean, std = args.get("mean", (0.485, 0.456, 0.406)), args.get("std", (0.229, 0.224, 0.225))
        jitter = args.get("jitter", (0.4, 0.4, 0.2, 0.1))
        blur = args.get("blur_probs", (1.0, 0.1, 0.5))
        sigma = tuple(args.get("blur_sigma", (0.1, 2.0)))

        def view(size: int, scale, blur_p: float, solarize_p: float) -> T.Compose:
            steps = [
                T.RandomResizedCrop(size, scale=tuple(scale), interpolation=T.InterpolationMode.BICUBIC),
                T.RandomHorizontalFlip(args.get("flip_prob", 0.5)),
                T.RandomApply([T.ColorJitter(*jitter)], p=args.get("jitter_prob", 0.8)),
                T.RandomGrayscale(args.get("grayscale_prob", 0.2)),
            ]
            if blur_p > 0:
                steps.append(_PILBlur(blur_p, sigma))
            if solarize_p > 0:
                steps.append(_PILSolarize(solarize_p))
            return T.Compose([*steps, T.ToTensor(), T.Normalize(mean, std)])

        solarize = args.get("solarize_prob", 0.2)
        self.global1 = view(args["global_size"], args["global_scale"], blur[0], 0.0)
        self.global2 = view(args["global_size"], args["global_scale"], blur[1], solarize)
        self.local = view(args["local_size"], args["local_scale"], blur[2], 0.0)
        self.num_local = args["num_local"]

    def __call__(self, img) -> list[torch.Tensor]:
        return [self.global1(img), self.global2(img)] + [self.local(img) for _ in range(self.num_local)]


class BareDataset(Dataset):
    def __init__(self, images: PILImages, transform: BareMultiCrop):
        self.images, self.transform = images, transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int):
        img, label = self.images[index]
        return self.transform(img), label


def bare_loader(images: PILImages, args: dict, batch_size: int, workers: int) -> DataLoader:
    """The bare torchvision loader: ``(views list of (B, 3, h, w), labels)`` batches by the default collate."""
    return DataLoader(BareDataset(images, BareMultiCrop(args)), batch_size=batch_size, shuffle=True, drop_last=True,
                      num_workers=workers, persistent_workers=workers > 0)  # fmt: skip


def library_loader(source, args: dict, batch_size: int, workers: int) -> DataLoader:
    from sop_lightning import SSLDataModule

    keep = {k: v for k, v in args.items() if k not in ("batch_size", "num_workers", "dataset")}  # root stays
    dm = SSLDataModule(dataset=source, batch_size=batch_size, num_workers=workers, augmentation_seed=0, **keep)
    dm.setup("fit")
    return dm.train_dataloader()


def images_per_second(loader: DataLoader, batches: int, warmup: int, batch_size: int) -> float:
    it = iter(loader)
    for _ in range(warmup):
        next(it)
    t0 = time.perf_counter()
    for _ in range(batches):
        next(it)
    return batches * batch_size / (time.perf_counter() - t0)


def setting(name: str, workdir: Path, image_count: int, image_size: tuple[int, int], root: str | None = None):
    """``(library data source, PILImages, data args)`` of a setting."""
    if name == "demo":
        from sop_lightning.data.demo import DEFAULT_FASHION_MNIST_ROOT, FashionMNIST

        args = {**demo_data_args("sop"), "root": root or DEFAULT_FASHION_MNIST_ROOT}
        return "fashion_mnist", PILImages(FashionMNIST(args["root"])), args
    folder = write_jpegs(workdir / "jpegs", image_count, image_size)
    return str(folder), PILImages(folder), dict(IMAGENET_DATA)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--settings", nargs="+", default=["demo", "imagenet"], choices=["demo", "imagenet"])
    parser.add_argument("--workers", type=int, nargs="+", default=[1])
    parser.add_argument("--batch", type=int, default=None, help="batch size (default: 64 demo, 32 imagenet)")
    parser.add_argument("--batches", type=int, default=None, help="timed batches (default: 30 demo, 6 imagenet)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--images", type=int, default=512, help="synthetic JPEGs of the imagenet setting")
    parser.add_argument("--image-size", type=int, nargs=2, default=[500, 375], metavar=("W", "H"))
    parser.add_argument("--workdir", default=None, help="folder for the JPEGs (default: a temporary one)")
    parser.add_argument("--root", default=None, help="Fashion-MNIST folder of the demo setting")
    args = parser.parse_args()
    torch.set_num_threads(1)  # as in a loader worker; the library sets no threads of its own
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(args.workdir or tmp)
        for name in args.settings:
            batch = args.batch or (64 if name == "demo" else 32)
            batches = args.batches or (30 if name == "demo" else 6)
            source, images, data_args = setting(name, workdir, args.images, tuple(args.image_size), args.root)
            if len(images) < (args.warmup + batches) * batch:
                sys.exit(f"--images {args.images} is too few for {args.warmup + batches} batches of {batch}")
            crops = f"2x{data_args['global_size']} + {data_args['num_local']}x{data_args['local_size']}"
            for workers in args.workers:
                best = {"library": 0.0, "bare": 0.0}
                for _ in range(args.rounds):
                    for who in best:
                        loader = (library_loader(source, data_args, batch, workers) if who == "library"
                                  else bare_loader(images, data_args, batch, workers))  # fmt: skip
                        best[who] = max(best[who], images_per_second(loader, batches, args.warmup, batch))
                        del loader
                per = max(workers, 1)
                print(f"{name} ({crops} px, masks {'on' if data_args.get('masking', True) else 'off'}), "
                      f"{workers} worker(s), batch {batch}: library {best['library'] / per:7.1f} img/s per worker, "
                      f"bare torchvision {best['bare'] / per:7.1f} img/s per worker -> library / bare = "
                      f"{best['library'] / best['bare']:.2f}x", flush=True)  # fmt: skip
    print(f"({os.cpu_count()} CPU cores, torch {torch.__version__}, 1 thread per worker)")


if __name__ == "__main__":
    main()
