"""Multi-crop augmentation on torchvision.transforms.v2 (ALGORITHMS.md §9.1)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from PIL import Image
from torch import Tensor
from torchvision import transforms as T
from torchvision.transforms import InterpolationMode, v2
from torchvision.transforms.v2 import functional as F

__all__ = ["MultiCropTransform", "CropView", "hue_shift", "gaussian_blur", "eval_transform", "IMAGENET_MEAN",
           "IMAGENET_STD"]  # fmt: skip

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def hue_shift(image: Tensor, factor: float) -> Tensor:
    """Rotate the HSV hue of RGB images ``(..., 3, H, W)`` in ``[0, 1]`` by ``factor`` turns (``[-0.5, 0.5]``).

    The same result as torchvision's ``adjust_hue`` (to float rounding) in about half its passes over the
    image: saturation and value are unchanged, so each pixel keeps its max ``M`` and its chroma ``C``, and
    only the hue sextant ``h6 ∈ [0, 6)`` moves; channel ``n`` (R, G, B: n = 5, 3, 1) is then
    ``M − C·clamp(2 − |((h6 + n) mod 6) − 2|, 0, 1)`` (the piecewise-linear form of HSV → RGB).
    """
    r, g, b = image.unbind(-3)
    low, high = torch.aminmax(image, dim=-3)
    chroma = high - low
    safe = torch.where(chroma > 0, chroma, torch.ones_like(chroma))
    # sextant of the hue; ties pick R, then G, as torchvision and PIL do (any choice when C = 0)
    h6 = torch.where(high == r, (g - b) / safe, torch.where(high == g, (b - r) / safe + 2.0, (r - g) / safe + 4.0))
    h6.add_(6.0 * factor)
    channels = []
    for n in (5.0, 3.0, 1.0):
        k = (h6 + n).remainder_(6.0).sub_(2.0).abs_().neg_().add_(2.0).clamp_(0.0, 1.0)
        channels.append(torch.addcmul(high, chroma, k, value=-1.0))
    return torch.stack(channels, dim=-3)


def gaussian_blur(image: Tensor, sigma: float) -> Tensor:
    """Separable Gaussian blur of ``(..., C, H, W)`` float images, kernel ``2·ceil(3σ) + 1`` taps (kept below
    the image size), reflect padding: torchvision's ``gaussian_blur`` with that kernel, in two 1-D passes."""
    *lead, c, h, w = image.shape
    radius = max(1, min(math.ceil(3.0 * sigma), (min(h, w) - 1) // 2))
    x = torch.arange(-radius, radius + 1, dtype=image.dtype, device=image.device)
    kernel = torch.exp(-0.5 * (x / sigma) ** 2)
    kernel = kernel / kernel.sum()
    flat = image.reshape(-1, c, h, w)
    out = torch.nn.functional.pad(flat, (radius, radius, 0, 0), mode="reflect")
    out = torch.nn.functional.conv2d(out, kernel.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    out = torch.nn.functional.pad(out, (0, 0, radius, radius), mode="reflect")
    out = torch.nn.functional.conv2d(out, kernel.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)
    return out.reshape(*lead, c, h, w)


def _factor_range(strength: float, name: str, centre: float = 1.0) -> list[float] | None:
    if strength < 0:
        raise ValueError(f"{name} must be >= 0, got {strength}")
    if strength == 0:
        return None
    if centre == 0.0:  # hue, in turns
        if strength > 0.5:
            raise ValueError(f"{name} must be in [0, 0.5], got {strength}")
        return [-strength, strength]
    return [max(0.0, centre - strength), centre + strength]


class CropView:
    """One augmented view of an RGB image tensor ``(3, H, W)`` (uint8, or float in [0, 1]) → float ``(3, size,
    size)`` (§9.1): ``RandomResizedCrop`` (bicubic, antialiased) → flip → colour jitter (brightness, contrast,
    saturation, hue in a random order) with ``jitter_prob`` → grayscale → Gaussian blur (``σ ~ U(blur_sigma)``)
    with ``blur_prob`` → solarisation with ``solarize_prob`` → normalise.

    The random parameters are drawn as torchvision's transforms draw them (from torch's generator, so
    :class:`~sop_lightning.data.seeding.AugmentationStreams` seeds them) and applied with torchvision's image
    kernels called directly, which saves the per-step dispatch of ``v2.Compose`` (most of the cost on small
    images); hue and blur use :func:`hue_shift` and :func:`gaussian_blur` (faster, same results).
    """

    def __init__(
        self,
        size: int,
        scale: tuple[float, float],
        flip_prob: float,
        jitter: tuple[float, float, float, float],
        jitter_prob: float,
        grayscale_prob: float,
        blur_sigma: tuple[float, float] | None,
        blur_prob: float,
        solarize_prob: float,
        mean: Sequence[float],
        std: Sequence[float],
    ):
        self.size, self.scale, self.ratio = size, (float(scale[0]), float(scale[1])), (3 / 4, 4 / 3)
        self.flip_prob, self.jitter_prob, self.grayscale_prob = flip_prob, jitter_prob, grayscale_prob
        names = ("jitter[0] (brightness)", "jitter[1] (contrast)", "jitter[2] (saturation)", "jitter[3] (hue)")
        self.jitter = [_factor_range(j, n, 0.0 if i == 3 else 1.0) for i, (j, n) in enumerate(zip(jitter, names))]
        self.blur_sigma = None if blur_prob == 0 or blur_sigma is None else (float(blur_sigma[0]), float(blur_sigma[1]))
        self.blur_prob, self.solarize_prob = blur_prob, solarize_prob
        self.mean = torch.tensor(list(mean), dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(list(std), dtype=torch.float32).view(3, 1, 1)

    def __call__(self, image: Tensor) -> Tensor:
        top, left, h, w = T.RandomResizedCrop.get_params(image, list(self.scale), list(self.ratio))
        size = [self.size, self.size]
        x = F.resized_crop_image(image, top, left, h, w, size, InterpolationMode.BICUBIC, antialias=True)
        x = F.to_dtype_image(x, torch.float32, scale=True)
        if _draw() < self.flip_prob:
            x = x.flip(-1)
        if _draw() < self.jitter_prob and any(r is not None for r in self.jitter):
            order, brightness, contrast, saturation, hue = T.ColorJitter.get_params(*self.jitter)
            for i in order.tolist():
                if i == 0 and brightness is not None:
                    x = F.adjust_brightness_image(x, brightness)
                elif i == 1 and contrast is not None:
                    x = F.adjust_contrast_image(x, contrast)
                elif i == 2 and saturation is not None:
                    x = F.adjust_saturation_image(x, saturation)
                elif i == 3 and hue is not None:
                    x = hue_shift(x, hue)
        if _draw() < self.grayscale_prob:
            x = F.rgb_to_grayscale_image(x, num_output_channels=3)
        if self.blur_sigma is not None and _draw() < self.blur_prob:
            x = gaussian_blur(x, float(torch.empty(1).uniform_(*self.blur_sigma)))
        if self.solarize_prob > 0 and _draw() < self.solarize_prob:
            x = torch.where(x >= 0.5, 1.0 - x, x)
        return x.sub(self.mean).div_(self.std)  # x may be an expanded grayscale view: not in place


def _draw() -> float:
    return float(torch.rand(1))


def _rgb_tensor(image) -> Tensor:
    """A PIL image or an image tensor ``(C, H, W)`` (uint8, or float in [0, 1]) as a plain RGB tensor
    ``(3, H, W)``; 1-channel images are repeated, an alpha channel dropped."""
    if isinstance(image, Image.Image):
        if image.mode != "RGB":
            image = image.convert("RGB")
        return F.pil_to_tensor(image)
    if not isinstance(image, Tensor):
        raise TypeError(f"expected a PIL image or an image tensor, got {type(image).__name__}")
    x = image.as_subclass(Tensor)
    if x.ndim == 2:
        x = x.unsqueeze(0)
    if x.ndim != 3 or x.shape[0] not in (1, 3, 4):
        raise ValueError(f"expected an image tensor of shape (C, H, W) with C in (1, 3, 4), got {tuple(x.shape)}")
    if x.shape[0] == 1:
        return x.repeat(3, 1, 1)
    return x[:3]


class MultiCropTransform:
    """Image → ``[global1, global2, local_1 .. local_n]`` tensors ``(3, h, w)``, globals first (§9.1).

    Each view (:class:`CropView`): ``RandomResizedCrop`` (bicubic) → flip → colour jitter (p=0.8) →
    grayscale (p=0.2) → Gaussian blur (p = 1.0 / 0.1 / 0.5 for global 1 / global 2 / locals) → solarisation
    (global 2, p=0.2) → normalise. Accepts a PIL image or an image tensor (uint8 or float in [0, 1]); a
    1-channel image is repeated to 3 channels, once for all views. Sizes are configurable, e.g. 28/12 px for
    the demo data.

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
        if len(jitter) != 4:
            raise ValueError(f"jitter must hold 4 strengths (brightness, contrast, saturation, hue), got {jitter!r}")
        if not 0 < blur_sigma[0] <= blur_sigma[1]:
            raise ValueError(f"blur_sigma must satisfy 0 < min <= max, got {tuple(blur_sigma)}")
        if blur_reference_size is not None and blur_reference_size < 1:
            raise ValueError(f"blur_reference_size must be >= 1 or None, got {blur_reference_size}")
        self.num_local = num_local

        def view(size: int, scale: tuple[float, float], blur_p: float, solarize_p: float) -> CropView:
            sigma = tuple(blur_sigma)
            if blur_reference_size is not None:
                sigma = (sigma[0] * size / blur_reference_size, sigma[1] * size / blur_reference_size)
            return CropView(size, scale, flip_prob, tuple(jitter), jitter_prob, grayscale_prob, sigma, blur_p,
                            solarize_p, mean, std)  # fmt: skip

        self.global1 = view(global_size, global_scale, blur_probs[0], 0.0)
        self.global2 = view(global_size, global_scale, blur_probs[1], solarize_prob)
        self.local = view(local_size, local_scale, blur_probs[2], 0.0)

    def __call__(self, image) -> list[Tensor]:
        image = _rgb_tensor(image)
        views = [self.global1(image), self.global2(image)]
        views += [self.local(image) for _ in range(self.num_local)]
        return views


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
