"""Reading and writing weights: foreign .pt checkpoints (strict, weights_only) and our safetensors.

Shared by the GPT and the VQ tokenizer, so both refuse the same bad files with the same one-line
errors, and both write the same atomic ``model.safetensors`` + ``config.json`` pair.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import pickle
import re
import sys
import warnings
import zipfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import torch
import torch.nn as nn

from npp.errors import CheckpointError, check_device
from npp.files import atomic_path, dump_json, sha256_file, write_text


_WRAPPER_KEYS = ("model", "module", "state_dict")

FOREIGN_CHECKPOINT_CLASSES = (argparse.Namespace,)
"""Non-tensor classes a foreign .pt may hold, allowed by safe_load: LlamaGen's train script stores its argparse
arguments beside the weights."""

DEEPSPEED_STATE_CLASSES = ("deepspeed.runtime.fp16.loss_scaler.LossScaler",
                           "deepspeed.runtime.zero.config.ZeroStageEnum",
                           "deepspeed.utils.tensor_fragment.fragment_address")
"""The only non-tensor objects DeepSpeed's checkpoints hold (read off ZeRO-0, -2 and -3 checkpoints of
0.19.8): plain state classes, allowed by name when a training checkpoint is read."""


class UnsafeCheckpointError(CheckpointError):
    """A pickle that asks to run code: tampering, never skipped for an older checkpoint as damage is."""


def safe_load(path: str | os.PathLike, *, map_location: Any = "cpu", allow: Sequence[Any] = ()) -> Any:
    """torch.load with weights_only=True: tensors, numbers, strings and containers, plus the classes in
    `allow`; a pickle that asks for anything else (a function to call, a class to build) is refused before
    any of it runs. Every failure is one CheckpointError naming the file and what is wrong with it."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: no such file; give the path of a .pt checkpoint")
    if os.path.getsize(path) == 0:
        raise CheckpointError(f"{path} is empty: it was cut off while being written or copied; copy or export it again")
    # Memory-map the zip format (new files: no copy of a large checkpoint in RAM); the legacy format cannot be.
    mmap = zipfile.is_zipfile(path)
    try:
        with allowing(allow), warnings.catch_warnings():
            # A plain pickle of protocol > 2 makes torch warn before it refuses it; the refusal says enough.
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as err:
        raise _refused(path, err) from None
    except Exception as err:  # noqa: BLE001 (damaged bytes reach torch's unpickler as every kind of error)
        raise _unreadable(path, err) from None


def allowing(classes: Sequence[Any]) -> Any:
    """torch.serialization.safe_globals for the classes not allowed already: leaving a nested block must not
    take back what an enclosing one allowed (torch removes every class its block named)."""
    allowed = torch.serialization.get_safe_globals()
    return torch.serialization.safe_globals([c for c in classes if c not in allowed])


def _refused(path: str, err: pickle.UnpicklingError, what: str = "") -> CheckpointError:
    """The error for a pickle a weights-only load refused: code it asks to run, or bytes that are no pickle."""
    blocked = re.search(r"GLOBAL ([\w.]+)", str(err))
    if blocked:
        return UnsafeCheckpointError(f"{what + ' ' if what else ''}{path} asks to run or build {blocked.group(1)}, "
                                     f"which a weights-only load refuses: a checkpoint holds tensors, not code, so "
                                     f"this file is not one or was tampered with; do not load it, get it again from "
                                     f"its source")
    return _unreadable(f"{what + ' ' if what else ''}{path}", err)


def _unreadable(path: str, err: BaseException) -> CheckpointError:
    return CheckpointError(f"{path} is not a readable PyTorch checkpoint ({_reason(err)}): it is damaged, cut off "
                           f"or another kind of file; get it again from its source")


def _reason(err: BaseException) -> str:
    """The cause in torch's error, without its advice: torch suggests retrying with weights_only=False, which
    would run whatever the file asks, and that is never the fix for a file we refuse."""
    text = str(err)
    cause = re.search(r"WeightsUnpickler error:\s*(.+?)\s*(?:\n\s*\n|Check the documentation|$)", text, re.S)
    if cause:
        text = cause.group(1)
    lines = [line.strip() for line in text.strip().splitlines() if line.strip() and "weights_only" not in line]
    return lines[0][:200] if lines else type(err).__name__


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0][:200] if text else type(err).__name__


def deepspeed_state_classes() -> list[type]:
    """DEEPSPEED_STATE_CLASSES imported: what safe_load must allow to read a DeepSpeed checkpoint file."""
    import importlib

    classes = []
    for name in DEEPSPEED_STATE_CLASSES:
        module, _, attr = name.rpartition(".")
        classes.append(getattr(importlib.import_module(module), attr))
    return classes


_FORCE_WEIGHTS_ONLY = "TORCH_FORCE_WEIGHTS_ONLY_LOAD"
"""torch's switch that makes a torch.load weights-only even where its caller passes weights_only=False."""


@contextmanager
def deepspeed_reads_weights_only(folder: str | os.PathLike) -> Iterator[None]:
    """DeepSpeed's module-level readers (zero_to_fp32, ds_to_universal, the universal checkpoint's load) call
    torch.load with weights_only=False, which would run any code a pickle asks for, and take no loader to use
    instead. In this block torch's own switch for that case makes those loads weights-only, with DeepSpeed's
    state classes allowed, so a run folder can be shared like a checkpoint: exporting or converting it never runs
    code planted in it. torch.load itself is left alone. A refused pickle is one CheckpointError naming `folder`
    (torch's error names no file)."""
    previous = os.environ.get(_FORCE_WEIGHTS_ONLY)
    os.environ[_FORCE_WEIGHTS_ONLY] = "1"
    try:
        with allowing(deepspeed_state_classes()):
            yield
    except pickle.UnpicklingError as err:
        raise _refused(os.fspath(folder), err, what="a file of") from None
    finally:
        if previous is None:
            os.environ.pop(_FORCE_WEIGHTS_ONLY, None)
        else:
            os.environ[_FORCE_WEIGHTS_ONLY] = previous


class WeightsOnlyLoads:
    """A DeepSpeed engine's checkpoint engine whose loads go through safe_load (DeepSpeed's state classes
    allowed), everything else through the engine it wraps: installed on our engine, so a resume names each
    file it refuses."""

    def __init__(self, inner: Any):
        self._inner = inner

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def load(self, path: str, map_location: Any = None) -> Any:
        return safe_load(path, map_location=map_location, allow=deepspeed_state_classes())


@dataclass(frozen=True)
class ForeignCheckpoint:
    """What a foreign .pt file holds: its bare state dict, a name for it in messages, and the training
    arguments stored beside the weights (LlamaGen's train script saves its argparse Namespace as "args"),
    as a plain dict, or None when the file has none (a bare FSDP state dict, a hand-saved {"model": …})."""

    state: dict[str, torch.Tensor]
    source: str
    args: dict[str, Any] | None = None


def read_foreign_checkpoint(path_or_state_dict) -> ForeignCheckpoint:
    """The state dict (and stored training arguments) of a .pt file or mapping saved by DDP, DeepSpeed,
    FSDP or by hand: under "model", "module" or "state_dict", or bare; `module.`/`_orig_mod.` prefixes
    stripped when every key has them. Tensors keep their dtype (bf16 files stay bf16).

    Unpickling uses weights_only=True (safe_load): a malicious file cannot run code. argparse.Namespace is
    allowed because LlamaGen's training script stores its arguments in the checkpoint.
    """
    if isinstance(path_or_state_dict, Mapping):
        obj, source = path_or_state_dict, "the given state dict"
    else:
        source = os.fspath(path_or_state_dict)
        obj = safe_load(source, allow=FOREIGN_CHECKPOINT_CLASSES)
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{source} holds a {type(obj).__name__}, not a state dict")
    args = _training_args(obj.get("args"))
    for key in _WRAPPER_KEYS:
        if key in obj and isinstance(obj[key], Mapping):
            obj = obj[key]
            break
    state = {k: v for k, v in obj.items()}
    if not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{source} holds no state dict (looked for keys {_WRAPPER_KEYS} "
                              f"or a bare name→tensor mapping)")
    # torch.compile and DDP wrappers prefix every key; strip a prefix only when all keys share it.
    for prefix in ("_orig_mod.", "module."):
        if all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    return ForeignCheckpoint(state, source, args)


def _training_args(args: Any) -> dict[str, Any] | None:
    """Stored training arguments as a dict: an argparse.Namespace (LlamaGen) or a plain mapping."""
    if isinstance(args, argparse.Namespace):
        return dict(vars(args))
    if isinstance(args, Mapping):
        return dict(args)
    return None


def load_foreign_state_dict(path_or_state_dict) -> tuple[dict[str, torch.Tensor], str]:
    """The bare state dict of a .pt file (or mapping) and a name for it in messages (read_foreign_checkpoint
    without the training arguments)."""
    checkpoint = read_foreign_checkpoint(path_or_state_dict)
    return checkpoint.state, checkpoint.source


def check_state_dict(model: nn.Module, state: Mapping[str, torch.Tensor], source: str) -> None:
    """Strict key and shape matching, reported in one line before anything is copied."""
    expected = {k: v.shape for k, v in model.state_dict().items()}

    def listing(keys: list[str]) -> str:
        return ", ".join(keys[:4]) + (f" (+{len(keys) - 4} more)" if len(keys) > 4 else "")

    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        parts = ([f"missing keys {listing(missing)}"] if missing else []) + \
                ([f"unexpected keys {listing(unexpected)}"] if unexpected else [])
        raise CheckpointError(f"{source} does not match the model: {'; '.join(parts)}")
    wrong = [f"{k} {tuple(state[k].shape)} vs {tuple(s)}" for k, s in expected.items()
             if tuple(state[k].shape) != tuple(s)]
    if wrong:
        raise CheckpointError(f"{source} has shape mismatches (checkpoint vs model): {listing(wrong)}; "
                              f"check the architecture arguments or the preset")


def load_strict(model: nn.Module, state: Mapping[str, torch.Tensor], source: str) -> nn.Module:
    """Check, then assign the tensors of state to a model built on the meta device."""
    check_state_dict(model, state, source)
    model.load_state_dict(state, strict=True, assign=True)
    return model


class Pretrained:
    """Our format for a module built from one config dataclass: `save_pretrained` writes model.safetensors
    and config.json (tagged with the class, so a folder is never loaded as the wrong kind of model) and
    `from_pretrained` rebuilds it with no other arguments. Subclasses name their `config_class`."""

    config_class: type

    @classmethod
    def architecture(cls) -> str:
        return f"npp.{cls.__name__}"

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def save_pretrained(self, directory: str | os.PathLike, *, inferred: str | None = None) -> Path:
        """Write model.safetensors and config.json (atomically) into directory. `inferred`, when given, is
        recorded in config.json as provenance (what a conversion inferred, and from where); loading ignores it."""
        provenance = {"inferred": inferred} if inferred else {}
        return save_safetensors(self, directory, {"architecture": self.architecture(), **self.config.to_dict(),
                                                  **provenance})

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, *, device: str | torch.device = "cpu"):
        """Rebuild a model written by save_pretrained, in eval mode (no other flags needed)."""
        config, state = read_safetensors(directory, cls.architecture(), f"{cls.__name__}.save_pretrained", device)
        with torch.device("meta"):
            model = cls(cls.config_class.from_dict(config))
        return load_strict(model, state, f"{directory}/model.safetensors").eval()


def save_safetensors(model: nn.Module, directory: str | os.PathLike, config: dict[str, Any]) -> Path:
    """Write model.safetensors (with its sha256 record) and config.json into directory, each atomically."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    write_weights(tensors, directory / "model.safetensors", metadata={"format": "pt"})
    dump_json(config, directory / "config.json")
    return directory


EXPORT_FIX = "write the folder again (npp export RUN for a run's export) or copy it again"
"""What to do about a damaged model.safetensors of a save_pretrained folder."""

EMA_FIX = "copy the checkpoint again, or move that checkpoint folder away so that the one before it is used"
"""What to do about a damaged ema.safetensors of a training checkpoint."""


PROVENANCE_KEYS = ("inferred",)
"""config.json entries that record where a model came from (npp convert's inferred architecture); loading
ignores them, every other unknown entry is still refused."""


def read_safetensors(directory: str | os.PathLike, architecture: str, writer: str,
                     device: str | torch.device = "cpu") -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The config (without its architecture tag) and tensors of a folder written by save_safetensors."""
    directory = Path(directory)
    for name in ("config.json", "model.safetensors"):
        if not (directory / name).is_file():
            raise CheckpointError(f"{directory} has no {name}: point at a folder written by {writer}")
    try:
        config = json.loads((directory / "config.json").read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{directory}/config.json is damaged ({_first_line(err)}): {EXPORT_FIX}") from None
    found = config.pop("architecture", None) if isinstance(config, dict) else None
    if found != architecture:
        raise CheckpointError(f"{directory}/config.json describes {found!r}, not {architecture!r}: "
                              f"load it with the matching class")
    for key in PROVENANCE_KEYS:  # a record for people, not a config field
        config.pop(key, None)
    return config, read_weights(directory / "model.safetensors", device=device, fix=EXPORT_FIX)


# ------------------------------------------------------------------------------------------------
# Weights files with their sha256 beside them
# ------------------------------------------------------------------------------------------------
# Every safetensors file npp writes (an export's or tokenizer's model.safetensors, a checkpoint's
# ema.safetensors) gets `<file>.sha256` beside it, in `sha256sum` format, and every read checks it:
# a bit flipped on disk or in a copy is refused in one line instead of being sampled and scored.
# A file with no record (written by an older npp) still loads, with a one-line warning.

def record_path(path: str | os.PathLike) -> Path:
    """Where the sha256 of a weights file is recorded: beside it, as `<name>.sha256`."""
    path = Path(path)
    return path.with_name(path.name + ".sha256")


_HASHES: dict[tuple[str, int, int, int], str] = {}
_WARNED: set[str] = set()


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 of a file, streamed, and remembered while the file is unchanged (same inode, size and
    modification time), so that verifying a large file and naming it in results hash it once."""
    stat = os.stat(path)
    key = (os.path.realpath(path), stat.st_ino, stat.st_size, stat.st_mtime_ns)
    if key not in _HASHES:
        _HASHES[key] = sha256_file(path)
    return _HASHES[key]


def write_weights(tensors: Mapping[str, torch.Tensor], path: str | os.PathLike,
                  metadata: dict[str, str] | None = None) -> str:
    """Write a safetensors file atomically and record its sha256 beside it; returns the sha256.

    The old record goes first: a crash before the new one is written leaves a file without a record
    (loaded with a warning), never a file with a wrong record (refused although it is fine)."""
    from safetensors.torch import save_file

    path = Path(path)
    record = record_path(path)
    record.unlink(missing_ok=True)
    with atomic_path(path) as tmp:
        save_file(dict(tensors), str(tmp), metadata=metadata)
        digest = sha256_file(tmp)
    write_text(record, f"{digest}  {path.name}\n")
    return digest


def verified_sha256(path: str | os.PathLike, fix: str) -> str:
    """The sha256 of a weights file after checking it against its record; `fix` says what to do about a
    mismatch. A missing record is a warning, not a refusal: files npp wrote before it kept records must load."""
    path = Path(path)
    record = record_path(path)
    digest = file_sha256(path)
    if not record.is_file():
        if str(path) not in _WARNED:
            _WARNED.add(str(path))
            print(f"npp: warning: {path} has no sha256 record ({record.name}: written by an older npp or by hand), "
                  f"so it loads unverified; npp records one whenever it writes the file (npp export RUN for a run's "
                  f"export)", file=sys.stderr, flush=True)
        return digest
    try:
        expected = record.read_text().split()[0].lower()
    except (OSError, UnicodeDecodeError, IndexError):
        expected = ""
    if len(expected) != 64 or any(c not in "0123456789abcdef" for c in expected):
        raise CheckpointError(f"{record} is damaged (not a sha256 record): {fix}")
    if digest != expected:
        raise CheckpointError(f"{path} is damaged: its sha256 ({digest[:12]}…) is not the one recorded when it was "
                              f"written ({expected[:12]}…, {record.name}): {fix}")
    return digest


def read_weights(path: str | os.PathLike, *, device: str | torch.device = "cpu",
                 fix: str = "write it again or copy it again") -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file we wrote, after checking its sha256 record (one CheckpointError
    naming the file and `fix` for a mismatch or unreadable bytes)."""
    from safetensors.torch import load_file

    check_device(device)  # a missing GPU is said as such, not as damage to the file
    path = Path(path)
    verified_sha256(path, fix)
    try:
        return load_file(str(path), device=str(device))
    except Exception as err:  # noqa: BLE001 (safetensors raises its own error types for every kind of damage)
        raise CheckpointError(f"{path} is damaged ({_first_line(err)}): {fix}") from None


def check_finite(state: Mapping[str, torch.Tensor], source: str) -> None:
    """Refuse a state dict with a NaN or infinite weight, naming the first such tensor: a model built from it
    samples garbage (or nothing) without saying why."""
    for name, tensor in state.items():
        if tensor.is_floating_point() and tensor.numel() and not bool(torch.isfinite(tensor).all()):
            bad = int((~torch.isfinite(tensor)).sum())
            raise CheckpointError(f"{source}: tensor {name} holds {bad} NaN or infinite value(s) of {tensor.numel()}: "
                                  f"the checkpoint is damaged or was saved after training diverged; use another one")


def fingerprint(model: nn.Module) -> str:
    """sha256 of the state dict's names, dtypes, shapes and bytes: the same for a .pt and its export."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().contiguous().cpu()
        digest.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()
