"""A sample folder of `npp evaluate`: which model and settings drew it and each PNG in it, claiming it for
one model before anything is drawn into it, and reading its samples back.

    folder/manifest.json     the identity that drew the samples (weights sha256, tokenizer, sampler, seeds,
                             batch size) and its key
    folder/000000.png ...    sample i, whose text chunks name that key and the batch it was drawn in

A PNG is reused only if its own text chunks say the same key drew it in the same batch. Samples or a
results.json of another model are moved aside, never scored and never deleted.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from npp.errors import DataError, require
from npp.files import dump_json

SAMPLES_MANIFEST = "manifest.json"
"""Beside the PNGs: what drew them (weights sha256, tokenizer, sampler, seeds, batch size) and its key."""

KEY_CHUNK, BATCH_CHUNK = "npp-samples", "npp-batch"
"""PNG text chunks of every sample: the key of what drew it, and the batch (`start+length`) it was drawn
in. Batch composition is part of the arithmetic, so a sample is reused only from the same batch."""


def samples_key(identity: dict[str, Any]) -> str:
    """A short name for an identity: 16 hex digits of the sha256 of its JSON."""
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


def batch_tag(indices: range) -> str:
    return f"{indices.start}+{len(indices)}"


def drawn_by(path: Path, key: str, batch: str) -> bool:
    """Whether the PNG at path exists and says it was drawn by `key` in `batch`."""
    image = require("PIL.Image", "reading samples")
    try:
        with image.open(path) as png:
            return png.info.get(KEY_CHUNK) == key and png.info.get(BATCH_CHUNK) == batch
    except (OSError, SyntaxError, ValueError):  # missing, or damaged (a copy cut off): draw it again
        return False


def _manifest_key(folder: Path) -> str | None:
    """The key a sample folder's manifest names, or None (no manifest, or an unreadable one)."""
    try:
        key = json.loads((folder / SAMPLES_MANIFEST).read_text()).get("key")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
        return None
    return key if isinstance(key, str) else None


def _aside(path: Path, label: str) -> Path:
    """Where to move a file or folder of another model: beside it, named by that model's key
    (`samples.<key>`, `results.<key>.json`; `-2`, `-3` … after the key when that name is taken)."""
    candidate, n = path.with_name(f"{path.stem}.{label}{path.suffix}"), 1
    while candidate.exists():
        n += 1
        candidate = path.with_name(f"{path.stem}.{label}-{n}{path.suffix}")
    return candidate


def claim_samples(folder: Path, identity: dict[str, Any]) -> str:
    """Make `folder` (a sample folder) this identity's, before anything is drawn into it; returns its key.

    Samples that another model or recipe drew, or of unknown origin (no manifest: an older npp), are moved
    beside the folder (`samples.<their key>`), with a one-line warning: they are never scored and never
    deleted. Samples of this identity set aside earlier come back, so nothing is drawn twice. The manifest
    is written before any PNG, so a folder never holds samples its manifest does not describe."""
    key = samples_key(identity)
    found = _manifest_key(folder)
    if folder.is_dir() and found != key and any(folder.glob("*.png")):
        aside = _aside(folder, found or "unverified")
        os.replace(folder, aside)
        whose = f"of another model or sampler (key {found})" if found else "of unknown origin (no manifest)"
        print(f"npp evaluate: warning: {folder} held samples {whose}; moved them to {aside.name} beside it, and "
              f"this model's samples are drawn anew", file=sys.stderr, flush=True)
    stash = folder.with_name(f"{folder.name}.{key}")
    if not folder.exists() and stash.is_dir():
        os.replace(stash, folder)  # this model's own samples, set aside by another model's evaluation
    folder.mkdir(parents=True, exist_ok=True)
    dump_json({"key": key, **identity, "files": "sample i is {i:06d}.png, drawn with torch.Generator()"
               ".manual_seed(base_seed + i); each PNG's text chunks name this key and its batch"},
              folder / SAMPLES_MANIFEST)
    return key


def claim_results(results: Path, key: str) -> None:
    """A results.json that another model or recipe wrote (or an older npp, which did not record its key) is
    moved aside (`results.<its key>.json`) with a one-line warning before this evaluation writes its own."""
    if not results.is_file():
        return
    try:
        found = json.loads(results.read_text()).get("samples_key")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
        found = None
    if found != key:
        aside = _aside(results, found if isinstance(found, str) else "earlier")
        os.replace(results, aside)
        whose = "another model or sampler" if found else "an evaluation that did not record its samples' key"
        print(f"npp evaluate: warning: {results} was written for {whose}; moved it to {aside.name} beside it",
              file=sys.stderr, flush=True)


def png_path(folder: Path, index: int) -> Path:
    return folder / f"{index:06d}.png"


def read_samples(folder: Path, num_samples: int, key: str | None = None) -> torch.Tensor:
    """The PNGs of samples 0 … num_samples − 1 (exactly those) as (N, H, W, 3) uint8; with `key`, each must
    say that key drew it (a folder changed by another process while it was being evaluated is refused)."""
    image = require("PIL.Image", "reading samples")
    arrays = []
    for i in range(num_samples):
        with image.open(png_path(folder, i)) as png:
            if key is not None and png.info.get(KEY_CHUNK) != key:
                raise DataError(f"{png_path(folder, i)} was replaced by another model's sample while this evaluation "
                                f"ran: evaluate into a folder of your own (--out)")
            arrays.append(np.asarray(png.convert("RGB")))
    return torch.from_numpy(np.stack(arrays))
