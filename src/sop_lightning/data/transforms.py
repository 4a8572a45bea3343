"""Multi-crop augmentation on torchvision.transforms.v2 (ALGORITHMS.md §9.1)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor
from torchvision.transforms import InterpolationMode, v2

__all__ = ["MultiCropTransform", "eval_transform", "IMAGENET_MEAN", "IMAGENET_STD"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _blur(size: int, sigma: tuple[float, float], p: float, reference_size: int | None) -> list[v2.Transform]:
    """Gaussian blur applied with probability ``p`` (none at all when ``p = 0``); ``sigma`` is in pixels, or
    in pixels of a ``reference_size`` crop and scaled to this one."""
    if p == 0:
        return []
    if reference_size is not None:
        sigma = (sigma[0] * size / reference_size, sigma[1] * size / reference_size)
    # Kernel covers ±3σ of the widest blur, kept odd and no larger than the crop.
    kernel = min(2 * math.ceil(3 * sigma[1]) + 1, size if size % 2 else size - 1)
    return [v2.RandomApply([v2.GaussianBlur(max(kernel, 3), sigma=sigma)], p=p)]


class MultiCropTransform:
    """Image → ``[global1, global2, local_1 .. local_n]`` tensors ``(3, h, w)``, globals first (§9.1).

    Each view: ``RandomResizedCrop`` (bicubic) → flip → colour jitter (p=0.8) → grayscale (p=0.2) →
    Gaussian blur (p = 1.0 / 0.1 / 0.5 for global 1 / global 2 / locals) → solarisation (global 2,
    p=0.2) → normalise. Accepts a PIL image or an image tensor (uint8 or float in [0, 1]); a 1-channel
    image is repeated to 3 channels. Sizes are configurable, e.g. 28/12 px for the demo data.

    Every probability is an argument (0 removes the step). ``blur_sigma`` is in pixels of each view, or,
    with ``blur_reference_size=R``, in pixels of an ``R``-px crop and scaled to each view's size (``R = 224``
    keeps DINO's blur relative to the crop on small images); ``blur_probs=(0, 0, 0)`` turns blur off, as
    small-image recipes (CIFAR-size) do.
    """

    def __init__(
        self,
        global_size: int = 224,
        local_size: int = 96,
        num_local: int = 10,
        global_scale: tuple[float, float] = (0.25, 1.0),
        local_scale: tuple[float, float] = (0.05, 0.25),
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        flip_prob: float = 0.5,
        jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.2, 0.1),
        jitter_prob: float = 0.8,
        grayscale_prob: float = 0.2,
        blur_sigma: tuple[float, float] = (0.1, 2.0),
        blur_probs: tuple[float, float, float] = (1.0, 0.1, 0.5),
        solarize_prob: float = 0.2,
        blur_reference_size: int | None = None,
    ):
        for name, value in (("global_size", global_size), ("local_size", local_size)):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if num_local < 0:
            raise ValueError(f"num_local must be >= 0, got {num_local}")
        for name, (lo, hi) in (("global_scale", global_scale), ("local_scale", local_scale)):
            if not 0 < lo <= hi <= 1:
                raise ValueError(f"{name} must satisfy 0 < min <= max <= 1, got {(lo, hi)}")
        probs = {"flip_prob": flip_prob, "jitter_prob": jitter_prob, "grayscale_prob": grayscale_prob,
                 "solarize_prob": solarize_prob}  # fmt: skip
        probs.update({f"blur_probs[{i}]": p for i, p in enumerate(blur_probs)})
        for name, value in probs.items():
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be a probability in [0, 1], got {value}")
        if len(blur_probs) != 3:
            raise ValueError(f"blur_probs must hold 3 probabilities (global 1, global 2, locals), got {blur_probs!r}")
        if not 0 < blur_sigma[0] <= blur_sigma[1]:
            raise ValueError(f"blur_sigma must satisfy 0 < min <= max, got {tuple(blur_sigma)}")
        if blur_reference_size is not None and blur_reference_size < 1:
            raise ValueError(f"blur_reference_size must be >= 1 or None, got {blur_reference_size}")
        self.num_local = num_local

        def view(size: int, scale: tuple[float, float], blur_p: float, solarize_p: float) -> v2.Compose:
            steps: list[v2.Transform] = [
                v2.ToImage(),
                v2.RGB(),
                v2.RandomResizedCrop(size, scale=scale, interpolation=InterpolationMode.BICUBIC, antialias=True),
                v2.ToDtype(torch.float32, scale=True),
                v2.RandomHorizontalFlip(flip_prob),
                v2.RandomApply([v2.ColorJitter(*jitter)], p=jitter_prob),
                v2.RandomGrayscale(grayscale_prob),
                *_blur(size, blur_sigma, blur_p, blur_reference_size),
            ]
            if solarize_p > 0:
                steps.append(v2.RandomSolarize(0.5, p=solarize_p))
            steps.append(v2.Normalize(mean=list(mean), std=list(std)))
            return v2.Compose(steps)

        self.global1 = view(global_size, global_scale, blur_probs[0], 0.0)
        self.global2 = view(global_size, global_scale, blur_probs[1], solarize_prob)
        self.local = view(local_size, local_scale, blur_probs[2], 0.0)

    def __call__(self, image) -> list[Tensor]:
        views = [self.global1(image), self.global2(image)]
        views += [self.local(image) for _ in range(self.num_local)]
        return [v.as_subclass(Tensor) for v in views]


def eval_transform(
    size: int = 224,
    resize_ratio: float = 256 / 224,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> v2.Compose:
    """``Resize(size·resize_ratio, bicubic) → CenterCrop(size) → normalise`` (§11.1)."""
    return v2.Compose(
        [
            v2.ToImage(),
            v2.RGB(),
            v2.Resize(int(round(size * resize_ratio)), interpolation=InterpolationMode.BICUBIC, antialias=True),
            v2.CenterCrop(size),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(mean=list(mean), std=list(std)),
        ]
    )
