"""Files npp writes and reads: atomic writes, JSON, hashes, which files are images, where assets live.

Everything npp writes goes through `atomic_path` (or `atomic_dir` for a folder): the content is
written beside its destination and renamed onto it only once complete, so a reader (the app, a
resumed run, another rank) never sees half a file, and a crash or a full disk leaves the previous
version. Files get the permissions of any file the user creates (umask), since runs are shared.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

ASSETS = Path(__file__).resolve().parent / "assets"
"""The shipped weights: MNIST tokenizers and classifier (npp/assets/<name>)."""

IMAGE_EXTENSIONS = (".bmp", ".jpeg", ".jpg", ".pgm", ".png", ".ppm", ".tif", ".tiff", ".webp")
"""File endings (any case) taken as images, in image folders to extract and in evaluation references."""


def is_image(filename: str | os.PathLike) -> bool:
    return os.fspath(filename).lower().endswith(IMAGE_EXTENSIONS)


def _shareable(path: str) -> None:
    # mkstemp and safetensors create files private (0600); give them the permissions of any new file.
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary path beside `path` to write to; renamed onto `path` when the block ends, removed if it fails.

    The temporary name keeps the suffix (np.savez and PIL choose formats by it) and starts with a dot.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".tmp" + path.suffix)
    os.close(fd)
    try:
        yield Path(tmp)
        _shareable(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary folder beside `path` to fill; it replaces `path` (and whatever was there) when complete."""
    path = Path(path)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}."))
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_umask())
        old = path.with_name(f".{path.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        if path.exists():
            os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Write a text file atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def dump_json(obj: Any, path: str | os.PathLike) -> Path:
    """Write JSON atomically (sorted keys, indented, a final newline)."""
    return write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def sha256_file(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
