"""What can go wrong, said in one line: the error types every command turns into `npp X: error: ...`.

Each message names the problem and the fix. `check` is the one validation helper of the config
dataclasses; `require` imports a dependency that comes with an extra, or says which extra to install.
"""

from __future__ import annotations

import importlib
from types import ModuleType


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field and the fix."""


class CheckpointError(ValueError):
    """A checkpoint cannot be used; the one-line message says what is wrong with it."""


class DataError(ValueError):
    """A data set or an extraction folder cannot be used; the message names the path and the fix."""


class TrainingError(RuntimeError):
    """Training cannot go on (a non-finite loss, a failed save, ...); the message says why and what was kept."""


class MissingExtraError(ImportError):
    """A feature needs a dependency of an optional extra that is not installed."""


USER_ERRORS = (ConfigError, CheckpointError, DataError, TrainingError, MissingExtraError)
"""The errors a command reports as one line (exit code 2), never as a traceback."""


def check(ok: bool, message: str, error: type[Exception] = ConfigError) -> None:
    """Raise `error(message)` unless ok: the one-line validation of every config dataclass."""
    if not ok:
        raise error(message)


def known_fields(cls: type, data: object) -> dict:
    """`data` after checking that it is a dict of `cls`'s dataclass fields: a typo must not pass silently."""
    import dataclasses

    check(isinstance(data, dict), f"{cls.__name__}: expected an object of fields, got {type(data).__name__}")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    check(not unknown, f"{cls.__name__}: unknown field(s) {unknown}; check the spelling (known: "
                       f"{', '.join(sorted(known))})")
    return data


def check_device(device: object, *, auto: bool = True) -> None:
    """Refuse a torch device this machine does not have, in one line, before anything is loaded onto it
    (a missing GPU otherwise surfaces as a confusing error from whatever touches it first). `auto`: whether
    the command also takes --device auto (then offered in the fix)."""
    import torch

    fix = "use --device cpu (or auto)" if auto else "use --device cpu"
    if auto and device == "auto":
        return
    try:
        device = torch.device(device)  # type: ignore[arg-type]
    except (RuntimeError, TypeError):
        raise ConfigError(f"--device {device!r} is not a torch device: use cpu, cuda, cuda:N{' or auto' if auto else ''}") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        check(count > 0, f"no CUDA GPU is available: {fix}")
        check(device.index is None or device.index < count,
              f"--device {device}: this machine has {count} CUDA GPU(s) (cuda:0 … cuda:{count - 1}): use one of them")
    elif device.type == "mps":
        check(torch.backends.mps.is_available(), f"no MPS (Apple GPU) device is available: {fix}")


def is_int(value: object) -> bool:
    """A real integer: bool is an int subclass in Python, but `"ckpt_every": true` is not a step count."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


EXTRAS = {"deepspeed": "train", "tensorboard": "train", "torch_fidelity": "eval", "torchvision": "eval",
          "gradio": "app", "plotly": "notebooks", "papermill": "notebooks", "kaleido": "notebooks",
          "PIL": "train", "tqdm": "train"}
"""Which extra of the package brings each optional dependency (pyproject.toml's optional-dependencies)."""


def require(module: str, purpose: str) -> ModuleType:
    """Import an optional dependency, or raise MissingExtraError naming the pip command that brings it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        extra = EXTRAS.get(module.split(".")[0], "all")
        raise MissingExtraError(f"{purpose} needs {module.split('.')[0]}, which is not installed: "
                                f'pip install "npp[{extra}]"') from None
