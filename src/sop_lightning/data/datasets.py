"""Data sources: image folders (flat or with class sub-folders) and the multi-crop wrapper."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import Literal

import torch
from PIL import Image
from torch.utils.data import Dataset

from .seeding import AugmentationStreams

__all__ = ["ImageFolderDataset", "TransformedDataset", "IndexedDataset", "UnreadableImageError", "IMG_EXTENSIONS"]

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMG_EXTENSIONS)


class UnreadableImageError(OSError):
    """An image file that PIL cannot decode (corrupt, truncated, not an image)."""


class ImageFolderDataset(Dataset):
    """Images under ``root``: class sub-folders (labels = sorted folder index) or a flat folder
    (labels ``None``). Items are ``(PIL RGB image, label)``.

    ``on_bad_image``: ``"raise"`` stops at an unreadable file with an error naming its path; ``"skip"``
    warns and returns the next readable image instead (so batches keep their size) and counts the skipped
    files in :attr:`skipped_images`, shared by the loader workers."""

    def __init__(self, root: str, on_bad_image: Literal["raise", "skip"] = "raise"):
        if on_bad_image not in ("raise", "skip"):
            raise ValueError(f"on_bad_image must be 'raise' or 'skip', got {on_bad_image!r}")
        path = Path(root)
        if not path.is_dir():
            raise ValueError(f"root={str(root)!r} is not a directory")
        subdirs = sorted(d for d in path.iterdir() if d.is_dir())
        samples: list[tuple[Path, int | None]] = []
        classes: list[str] = []
        for d in subdirs:
            files = _images_in(d)
            if files:
                samples += [(f, len(classes)) for f in files]
                classes.append(d.name)
        if not samples:
            samples = [(f, None) for f in _images_in(path)]
        if not samples:
            raise ValueError(
                f"root={str(root)!r} contains no images ({', '.join(IMG_EXTENSIONS)}) directly or in class sub-folders"
            )
        self.root, self.samples, self.classes = str(root), samples, classes
        self.on_bad_image = on_bad_image
        self._skipped = torch.zeros((), dtype=torch.int64).share_memory_()  # counted in every worker

    @property
    def skipped_images(self) -> int:
        """Unreadable files skipped so far (``on_bad_image="skip"``), over all loader workers."""
        return int(self._skipped)

    def __len__(self) -> int:
        return len(self.samples)

    def image_side(self, index: int) -> int | None:
        """Shorter side of image ``index`` from its header alone (no decoding); ``None`` if unreadable."""
        try:
            with Image.open(self.samples[index][0]) as img:
                return min(img.size)
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
            return None

    def _read(self, index: int):
        path, label = self.samples[index]
        try:
            with Image.open(path) as img:
                return img.convert("RGB"), label
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
            raise UnreadableImageError(
                f"cannot read image {str(path)!r} ({type(err).__name__}: {err}); fix or remove the file, or pass "
                "on_bad_image='skip'"
            ) from err

    def __getitem__(self, index: int):
        if self.on_bad_image == "raise":
            return self._read(index)
        n = len(self.samples)
        for offset in range(n):  # the next readable image stands in, so the batch keeps its size
            try:
                return self._read((index + offset) % n)
            except UnreadableImageError as err:
                self._skipped += 1
                warnings.warn(f"{err.args[0].split('; ')[0]}: skipped (on_bad_image='skip')", stacklevel=2)
        raise UnreadableImageError(f"none of the {n} images under root={self.root!r} can be read")


class TransformedDataset(Dataset):
    """Applies ``transform`` to the image of a ``(image, label)`` (or bare image) data set; an optional
    ``extra`` callable adds per-sample items built in the worker (the masks), and then the sample's index
    comes last: ``(views, extra, label, index)``. With ``streams``, the random
    draws of both come from :class:`~sop_lightning.data.seeding.AugmentationStreams`."""

    def __init__(
        self,
        dataset: Dataset,
        transform: Callable,
        extra: Callable | None = None,
        streams: AugmentationStreams | None = None,
    ):
        self.dataset, self.transform, self.extra, self.streams = dataset, transform, extra, streams

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int):
        item = self.dataset[index]
        image, label = item if isinstance(item, (tuple, list)) else (item, None)
        with nullcontext() if self.streams is None else self.streams.draws(index):
            out = self.transform(image)
            if self.extra is None:
                return out, label
            return out, self.extra(), label, index


class IndexedDataset(Dataset):
    """``(image, label)`` → ``(image, label, index)`` (k-NN evaluation removes the distributed sampler's
    padding duplicates through the index)."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int):
        image, label = self.dataset[index]
        return image, label, index
