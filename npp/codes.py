"""Extracted codes as a data set: the manifest and memory-mapped arrays that `npp.extract` writes, checked,
and `CodeDataset`, which serves them one crop variant at a time to the trainer."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from npp.errors import DataError, is_int

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
