"""Which tokenizer decodes a run's codes: the reference that travels from the data to the export.

`npp extract` records the tokenizer in the data's manifest.json; the trainer adds the data spec and keeps the
reference in every checkpoint's meta.json; `npp export` writes it as the export's tokenizer.json; sampling and
evaluation load the tokenizer from it. One type for all of them, with the JSON shape those files have held
from the start, so recorded runs and exports keep loading:

    {"data": ..., "source": {...}, "fingerprint": "...", "path": "/abs/vq.pt" or null, "config": {VQConfig}}
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from npp.config import VQConfig
from npp.errors import CheckpointError, ConfigError
from npp.files import ASSETS
from npp.tokenizer import (EMBEDDED_TOKENIZERS, VQModel, load_embedded_tokenizer, load_tokenizer,
                           tokenizer_location)

SUPPLY_FIX = ("pass --tokenizer PATH (npp evaluate; Pipeline.from_run(tokenizer=PATH)), the tokenizer its codes "
              "were extracted with")
"""How a user supplies a tokenizer that a reference cannot (another machine's path, codes extracted in memory)."""

_TYPES: dict[str, type] = {"data": str, "source": dict, "fingerprint": str, "path": str, "config": dict}


@dataclass(frozen=True)
class TokenizerRef:
    """A tokenizer named by what it is (its fingerprint) and where to find it (a shipped name or a path)."""

    data: str | None = None
    """The data spec the codes belong to: a shipped data set's name (which names its tokenizer too) or the
    `npp extract` folder; None for the reference of a manifest, which does not know its own folder."""
    source: dict[str, Any] | None = None
    """Where the extracted images came from (the manifest's "source"), for people reading the export."""
    fingerprint: str | None = None
    """VQModel.fingerprint() of the tokenizer: any stand-in for `path` must have the same one."""
    path: str | None = None
    """The tokenizer folder or LlamaGen .pt (absolute, on the machine that extracted the codes); None for a
    shipped tokenizer, or for codes extracted in memory."""
    config: VQConfig | None = None
    """The tokenizer's architecture: what a LlamaGen .pt at `path` is built as (a folder carries its own)."""

    # ---- building ------------------------------------------------------------------------------

    @classmethod
    def shipped(cls, name: str) -> "TokenizerRef":
        """The reference of a shipped data set: its tokenizer by name, its codes from MNIST's training split."""
        vq = load_embedded_tokenizer(name)
        return cls(data=name, source={"kind": "mnist", "split": "train"}, fingerprint=vq.fingerprint(),
                   config=vq.config)

    @classmethod
    def extracted_with(cls, vq: VQModel, fingerprint: str, path: str | os.PathLike | None) -> "TokenizerRef":
        """What `npp extract` records of the tokenizer it ran (`path` None when it was given in memory)."""
        return cls(fingerprint=fingerprint, path=None if path is None else portable_path(path), config=vq.config)

    @classmethod
    def of_data(cls, data: str, manifest: dict[str, Any]) -> "TokenizerRef":
        """The reference of an `npp extract` folder: the manifest's tokenizer, with the folder and its source."""
        return cls.from_dict({"data": data, "source": manifest.get("source"), **manifest.get("tokenizer", {})},
                             where=f"{data}/manifest.json", fix="extract the codes again")

    # ---- JSON ----------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """The JSON object of meta.json and tokenizer.json (every key, in the order they were always written)."""
        return {"data": self.data, "source": self.source, "fingerprint": self.fingerprint, "path": self.path,
                "config": None if self.config is None else self.config.to_dict()}

    def manifest_entry(self) -> dict[str, Any]:
        """The manifest's "tokenizer" object: the data and source are recorded beside it there."""
        return {key: self.to_dict()[key] for key in ("fingerprint", "path", "config")}

    @classmethod
    def from_dict(cls, info: Any, *, where: str, fix: str = SUPPLY_FIX) -> "TokenizerRef":
        """A reference read from JSON, checked: an object whose known keys have their types (unknown keys are
        ignored, as they always were), whose config holds only VQConfig fields. `where` names the file."""
        if not isinstance(info, dict):
            raise CheckpointError(f"{where} is damaged (a JSON {type(info).__name__}, not an object): {fix}")
        missing = [key for key in ("data", "fingerprint") if key not in info]
        bad = [key for key, kind in _TYPES.items() if info.get(key) is not None and not isinstance(info[key], kind)]
        unknown = sorted(set(info.get("config") or {}) - set(VQConfig.__dataclass_fields__)) if "config" not in bad else []
        problems = [f"{what} {', '.join(keys)}" for what, keys in (("missing", missing), ("bad", bad),
                                                                  ("unknown config field", unknown)) if keys]
        if problems:
            raise CheckpointError(f"{where} is damaged ({'; '.join(problems)}): {fix}")
        config = info.get("config")
        return cls(data=info["data"], source=info.get("source"), fingerprint=info["fingerprint"], path=info.get("path"),
                   config=None if config is None else VQConfig.from_dict(config))

    @classmethod
    def read(cls, path: Path, *, override: str | os.PathLike | None = None) -> "TokenizerRef":
        """An export's tokenizer.json, checked before any weights are read: it names a tokenizer this machine
        has, unless `override` stands in for it. An empty reference when the file is absent (an export written
        by GPT.save_pretrained alone), which then needs a tokenizer given."""
        if not path.is_file():
            return cls()
        fix = f"{SUPPLY_FIX}, or export the run again"
        try:
            info = json.loads(path.read_bytes().decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise CheckpointError(f"{path} is damaged (not valid JSON): {fix}") from None
        ref = cls.from_dict(info, where=str(path), fix=fix)
        if override is None:
            ref.check_available(str(path))
        return ref

    # ---- the tokenizer -------------------------------------------------------------------------

    @property
    def on_embedded_data(self) -> bool:
        """Whether the codes are the embedded MNIST's (its classifier judges them)."""
        return self.data in EMBEDDED_TOKENIZERS or (self.source or {}).get("kind") == "mnist"

    def check_available(self, where: str) -> None:
        """Refuse in one line, before any weights are read, a reference that names no tokenizer this machine
        has: its path is elsewhere (another machine's), or it names none. `where` is the file it came from."""
        if self.path and not tokenizer_location(self.path).exists():
            raise CheckpointError(f"{where} names the tokenizer {self.path}, which is not on this machine "
                                  f"(fingerprint {self.fingerprint}): {SUPPLY_FIX}")
        if not self.path and self.data not in EMBEDDED_TOKENIZERS:
            raise CheckpointError(f"{where} names no tokenizer to load (data {self.data!r} is not one of the shipped "
                                  f"{', '.join(EMBEDDED_TOKENIZERS)}, and it gives no tokenizer path): {SUPPLY_FIX}")

    def check_decodes(self) -> str | None:
        """For training on the codes: the tokenizer they were extracted with is still the one at its path (a
        damaged or replaced file is refused now). Returns a warning, not an error, when the path is not on this
        machine (codes copied from another): evaluation will then be given the tokenizer."""
        if not self.path and self.fingerprint and self.data not in EMBEDDED_TOKENIZERS:
            return None  # codes extracted in memory: no tokenizer file to check (evaluation will ask for --tokenizer)
        if self.path and not tokenizer_location(self.path).exists():
            return (f"{self.path}, the tokenizer {self.data} was extracted with, is not on this machine: evaluation "
                    f"will need `npp evaluate --tokenizer`")
        self.load(where=str(self.data), fix="put the tokenizer the codes were extracted with back at that path, or "
                                            "extract the codes again")
        return None

    def load(self, *, override: str | os.PathLike | None = None, where: str = "the run",
             fix: str = "pass the right --tokenizer") -> VQModel:
        """The tokenizer: a shipped one by name, else the one at `path`; `override` replaces that path (codes
        extracted on another machine). Its fingerprint must be the recorded one; `fix` says what to do if not."""
        path = override or self.path
        if path:
            config = {} if tokenizer_location(path).is_dir() or self.config is None else self.config.to_dict()
            vq = load_tokenizer(path, **config)
        elif self.data in EMBEDDED_TOKENIZERS:
            vq = load_embedded_tokenizer(self.data)
        else:
            raise ConfigError(f"{where} does not say which tokenizer decodes its codes: pass --tokenizer "
                              f"PATH (the folder or LlamaGen .pt its training codes were extracted with)")
        if self.fingerprint and vq.fingerprint() != self.fingerprint:
            raise ConfigError(f"the tokenizer at {path} is not the one the codes of {where} were extracted with "
                              f"(fingerprint {vq.fingerprint()[:12]} ≠ {self.fingerprint[:12]}): {fix}")
        return vq


def portable_path(path: str | os.PathLike) -> str:
    """How a manifest records a tokenizer: a shipped one by its name (its folder in npp/assets moves with the
    install), any other by its absolute path."""
    path = Path(path).resolve()
    return path.name if path.parent == ASSETS.resolve() and path.name in EMBEDDED_TOKENIZERS else str(path)
