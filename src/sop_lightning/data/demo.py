"""The offline demo data set: Fashion-MNIST from Debian's ``dataset-fashion-mnist`` package."""

from __future__ import annotations

import gzip
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset
from torchvision import tv_tensors

__all__ = ["FashionMNIST", "DEFAULT_FASHION_MNIST_ROOT", "FASHION_MNIST_CLASSES"]

DEFAULT_FASHION_MNIST_ROOT = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}


def _read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (optionally gzipped): big-endian magic, dims, then uint8 data."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    zero, dtype_code, ndim = data[0] * 256 + data[1], data[2], data[3]
    if zero != 0 or dtype_code != 0x08:
        raise ValueError(f"{path} is not a uint8 IDX file (magic {data[:4].hex()})")
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


class FashionMNIST(Dataset):
    """Fashion-MNIST (60k train / 10k test, 28×28, 10 classes) read from IDX files.

    Items are ``(image, label)`` with ``image`` a ``tv_tensors.Image`` of shape ``[3, 28, 28]``, uint8
    (the grey channel repeated, so RGB pipelines apply unchanged).

    Args:
        root: folder holding the ``*-idx?-ubyte[.gz]`` files.
        split: ``"train"`` or ``"test"``.
    """

    classes = FASHION_MNIST_CLASSES

    def __init__(self, root: str = DEFAULT_FASHION_MNIST_ROOT, split: Literal["train", "test"] = "train"):
        if split not in _FILES:
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        root_path = Path(root)
        paths = []
        for name in _FILES[split]:
            candidates = [root_path / name, root_path / name.removesuffix(".gz")]
            found = next((p for p in candidates if p.is_file()), None)
            if found is None:
                raise FileNotFoundError(
                    f"Fashion-MNIST file {name} not found under root={str(root)!r}. Install the demo data "
                    "with `sudo apt-get install dataset-fashion-mnist` (files in "
                    f"{DEFAULT_FASHION_MNIST_ROOT}), or pass root= a folder holding the IDX files."
                )
            paths.append(found)
        self.images = torch.from_numpy(_read_idx(paths[0]).copy())
        self.targets = torch.from_numpy(_read_idx(paths[1]).astype(np.int64))
        if len(self.images) != len(self.targets):
            raise ValueError(f"{paths[0]} has {len(self.images)} images but {paths[1]} {len(self.targets)} labels")
        self.root, self.split = str(root), split

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        image = self.images[index].unsqueeze(0).expand(3, -1, -1).contiguous()
        return tv_tensors.Image(image), int(self.targets[index])
