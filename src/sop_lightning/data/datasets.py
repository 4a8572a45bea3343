"""Data sources: image folders (flat or with class sub-folders) and the multi-crop wrapper."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path

from PIL import Image
from torch.utils.data import Dataset

from .seeding import AugmentationStreams

__all__ = ["ImageFolderDataset", "TransformedDataset", "IndexedDataset", "IMG_EXTENSIONS"]

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMG_EXTENSIONS)


class ImageFolderDataset(Dataset):
    """Images under ``root``: class sub-folders (labels = sorted folder index) or a flat folder
    (labels ``None``). Items are ``(PIL RGB image, label)``."""

    def __init__(self, root: str):
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

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        path, label = self.samples[index]
        with Image.open(path) as img:
            return img.convert("RGB"), label


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
        with nullcontext() if self.streams is None else self.streams.draws():
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
