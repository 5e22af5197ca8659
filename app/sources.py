"""What the app can sample: the exported runs under --runs and the .pt checkpoints given, with the metrics
rows it reads from a run (checked once, at start-up), the default pair and the training curves.

    sources = find_sources("runs", ["c2i_B_256.pt"])
    left, right = default_pair(sources, loads=backend.loads)
"""

from __future__ import annotations

import itertools
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from npp.errors import DataError, is_number
from npp.runs import RunDir


@dataclass(frozen=True)
class Source:
    """An exported run (runs/<name>, with export/model.safetensors) or a LlamaGen/NPP .pt checkpoint."""

    name: str
    path: Path
    kind: str
    """'run' or 'checkpoint'."""

    @property
    def run(self) -> RunDir | None:
        return RunDir(self.path) if self.kind == "run" else None


def find_sources(runs_dir: str | Path | None, checkpoints: Sequence[str | Path] = (),
                 warn: Callable[[str], None] | None = None) -> list[Source]:
    """Every exported run under runs_dir (sorted by name), then the checkpoints as given.

    Runs without export/ (still training, or tokenizer runs) are not models the app can sample. A run
    whose metrics.jsonl is malformed is left out with one warning line (its curves and the default pair
    read that file, and one bad run must not stop the app); `warn` prints it (stderr by default).
    """
    warn = warn or _warn
    sources = []
    if runs_dir is not None and Path(runs_dir).is_dir():
        for folder in sorted(Path(runs_dir).iterdir()):
            if not RunDir(folder).exported:
                continue
            try:
                run_rows(RunDir(folder))
            except DataError as err:
                warn(f"run {folder.name} skipped: {err}")
                continue
            sources.append(Source(folder.name, folder, "run"))
    for path in dict.fromkeys(map(Path, checkpoints)):
        sources.append(Source(unique_name(path, {s.name for s in sources}), path, "checkpoint"))
    return sources


def _warn(message: str) -> None:
    print(f"app: warning: {message}", file=sys.stderr, flush=True)


ROW_NUMBERS = ("step", "stage", "patch_size", "loss", "lr", "tokens_seen", "flops_seen", "imgs_per_s", "time",
               "fid", "is", "precision", "recall", "kid", "class_accuracy")
"""Fields of a metrics row that must be numbers when present: the app compares and plots them."""
TRAIN_ROW_NEEDS = ("step", "patch_size", "loss", "tokens_seen", "flops_seen")
"""What every training row must have: the curves plot loss against FLOPs and mark each patch-size switch
with its step, FLOPs and tokens."""


def run_rows(run: RunDir) -> list[dict[str, Any]]:
    """The run's metrics rows, each checked for what the app reads from it; a DataError names the first bad
    line and the fix. As in RunDir.read_metrics, a torn last line (a crash mid-write) is ignored; a bad line
    before it is damage, not a crash."""
    if not run.metrics.is_file():
        return []
    try:
        lines = run.metrics.read_bytes().decode("utf-8").splitlines()
    except (UnicodeDecodeError, OSError) as err:
        raise DataError(f"metrics.jsonl cannot be read ({type(err).__name__}): remove or repair it") from None
    rows = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            if number == len(lines):
                break
            raise DataError(f"metrics.jsonl line {number} is not JSON: remove or repair that line") from None
        if (problem := row_problem(row)) is not None:
            raise DataError(f"metrics.jsonl line {number} {problem}: remove or repair that line")
        rows.append(row)
    return rows


def row_problem(row: Any) -> str | None:
    """What is wrong with one metrics row for the app, or None."""
    if not isinstance(row, dict):
        return f"is {type(row).__name__}, not a JSON object"
    wrong = [key for key in ROW_NUMBERS if key in row and not is_number(row[key])]
    if wrong:
        return f"has {wrong[0]}={row[wrong[0]]!r}, not a number"
    missing = [key for key in TRAIN_ROW_NEEDS if key not in row] if not row.get("eval") else []
    if missing:
        return f"(a training row) lacks {', '.join(missing)}"
    if not row.get("eval") or "flops_seen" in row:
        return None
    return "(an evaluation row) lacks flops_seen"


def unique_name(path: Path, taken: set[str]) -> str:
    """The file's name, with as many of its folders as make it unique: users see names, and the folders
    above them are the server's business."""
    parts = path.parts[1:] if path.anchor else path.parts
    for depth in range(1, len(parts) + 1):
        if (name := "/".join(parts[-depth:])) not in taken:
            return name
    return next(name for k in itertools.count(2) if (name := f"{path.name} ({k})") not in taken)


def patch_trained(run: RunDir) -> bool:
    """Whether a run trained on patches at some point (an NPP run), read from its metrics."""
    return any(row.get("patch_size", 1) > 1 for row in run_rows(run) if not row.get("eval"))


def default_pair(sources: Sequence[Source], loads: Callable[[str], bool]) -> tuple[str | None, str | None]:
    """(left, right), each the first candidate that `loads`: the quickstart pair, then NTP-trained runs on
    the left and NPP-trained runs on the right as their metrics tell, then any source (the right one
    different from the left, unless only one loads). When none loads, the first candidate still shows
    why in its panel."""
    names = [s.name for s in sources]
    if not names:
        return None, None
    npp_runs = [s.name for s in sources if s.run is not None and patch_trained(s.run)]
    ntp_runs = [s.name for s in sources if s.run is not None and s.name not in npp_runs]
    left = _first_loading(["quickstart-ntp", *ntp_runs, *names], names, loads)
    others = [name for name in ("quickstart-npp", *npp_runs, *names) if name != left]
    return left, _first_loading([*others, left], names, loads)


def _first_loading(preferred: Sequence[str], offered: Sequence[str], loads: Callable[[str], bool]) -> str:
    """The first name of `preferred` that is offered and loads, else the first offered one."""
    candidates = [name for name in dict.fromkeys(preferred) if name in offered]
    return next((name for name in candidates if loads(name)), candidates[0])


# ------------------------------------------------------------------------------------------------
# Training curves
# ------------------------------------------------------------------------------------------------

def training_plots(sides: dict[str, Source | None]) -> tuple[Any, Any, str]:
    """(loss vs FLOPs, FID vs FLOPs, note) for the selected runs; .pt checkpoints have no curves."""
    from npp.viz import eval_figure, training_figure

    runs, notes = {}, [f"{s.name} is a .pt checkpoint: no training log." for s in sides.values()
                       if s is not None and s.run is None]
    for panel, s in sides.items():
        if s is None or s.run is None:
            continue
        try:
            runs[f"{s.name} ({panel})"] = run_rows(s.run)
        except DataError as err:  # damaged since start-up: say so instead of drawing half a curve
            notes.append(f"{s.name}: no curves, its {err}.")
    if runs and not any(row.get("eval") for rows in runs.values() for row in rows):
        notes.append("No evaluation rows yet: train with `--eval_every K` to get FID curves.")
    return training_figure(runs, "loss", x="flops"), eval_figure(runs, "fid", x="flops"), " ".join(notes)
