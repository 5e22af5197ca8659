"""What identifies a run: whether a string can name its folder, and whether two data specs name the same codes.

TrainConfig refuses a name that is no folder name (run_name_problem) and lets a resumed run give its data
another spelling of the same codes (same_data).
"""

from __future__ import annotations

import os
from pathlib import Path


RUN_NAME_MAX = 100
"""Longest run name: far below the 255 bytes a file name may have, so that `previous-<time>` folders and
temporary names beside it fit too."""


def run_name_problem(name: str) -> str | None:
    """What makes `name` unusable as a run folder's name, or None: it must be one path component (no '/',
    not '.' or '..'), hold no NUL or other control character, and not be longer than RUN_NAME_MAX."""
    if not name:
        return "is empty"
    if "/" in name or "\\" in name or name in (".", ".."):
        return "is not a single folder name (no '/', '\\', '.' or '..')"
    if "\0" in name:
        return "contains a NUL byte"
    if not name.isprintable():
        return "contains a control character (a newline, a tab, ...)"
    if len(name) > RUN_NAME_MAX:
        return f"has {len(name)} characters, more than {RUN_NAME_MAX}"
    return None


def same_data(saved: str, given: str) -> bool:
    """Whether two `TrainConfig.data` values name the same training codes: the same string; or, for folders,
    the same folder however it is spelled (codes/x, ./codes/x/, a symlink to it), or one whose manifest is
    byte for byte the same (a copy or a move: the manifest records the source's digest, the tokenizer's
    fingerprint and the crops, so equal manifests mean equal codes). An embedded data set (mnist-8x8) is
    only ever itself."""
    if saved == given:
        return True
    from npp.tokenizer import EMBEDDED_TOKENIZERS

    if saved in EMBEDDED_TOKENIZERS or given in EMBEDDED_TOKENIZERS:
        return False
    if not (os.path.isdir(saved) and os.path.isdir(given)):
        return False
    if os.path.samefile(saved, given):
        return True
    digests = {_file_digest(Path(folder) / "manifest.json") for folder in (saved, given)}
    return len(digests) == 1 and None not in digests


def _file_digest(path: Path) -> str | None:
    """sha256 of a file, or None where it cannot be read."""
    import hashlib

    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return None
