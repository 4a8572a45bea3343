import gzip
import os
import struct
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture
def rng():
    return torch.Generator().manual_seed(0)


def _write_idx(path, array: torch.Tensor):
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + b"".join(struct.pack(">I", d) for d in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.to(torch.uint8).numpy().tobytes())


def write_fake_fmnist(folder, n_train: int = 20, n_test: int = 8, seed: int = 0):
    """A tiny Fashion-MNIST-format folder, written independently of the library. Images of class c are
    noisy versions of a class template, so k-NN has something to find."""
    g = torch.Generator().manual_seed(seed)
    templates = torch.randint(0, 256, (10, 28, 28), generator=g).float()
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        labels = torch.arange(n) % 10
        images = (templates[labels] + 40 * torch.randn(n, 28, 28, generator=g)).clamp(0, 255)
        _write_idx(folder / f"{prefix}-images-idx3-ubyte.gz", images)
        _write_idx(folder / f"{prefix}-labels-idx1-ubyte.gz", labels)
    return folder


@pytest.fixture
def fake_fmnist(tmp_path):
    """20 train / 8 test images in Fashion-MNIST format (see ``write_fake_fmnist``)."""
    folder = tmp_path / "fmnist"
    folder.mkdir()
    return write_fake_fmnist(folder)
