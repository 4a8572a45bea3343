import gzip
import os
import struct
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
FMNIST = Path("/usr/share/datasets/fashion-mnist")

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture
def rng():
    return torch.Generator().manual_seed(0)


requires_fmnist = pytest.mark.skipif(
    not (FMNIST / "train-images-idx3-ubyte.gz").exists(), reason="dataset-fashion-mnist not installed"
)


def _write_idx(path, array: torch.Tensor):
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + b"".join(struct.pack(">I", d) for d in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.to(torch.uint8).numpy().tobytes())


@pytest.fixture
def fake_fmnist(tmp_path):
    """A tiny Fashion-MNIST-format folder (20 train / 8 test images), written independently of the library."""
    g = torch.Generator().manual_seed(0)
    for prefix, n in (("train", 20), ("t10k", 8)):
        _write_idx(tmp_path / f"{prefix}-images-idx3-ubyte.gz", torch.randint(0, 256, (n, 28, 28), generator=g))
        _write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte.gz", torch.arange(n) % 10)
    return tmp_path
