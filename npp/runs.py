"""Run directories: the contract between the trainer, evaluation, notebooks and the app.

    runs/<name>/
      config.json       the TrainConfig that made the run (enough to resume or rebuild it)
      metrics.jsonl     one JSON object per logged step (step, stage, patch_size, loss, lr, ...), and
                        evaluation rows ("eval": true, fid, is, precision, recall, ...)
      checkpoints/      one folder per tag (step-00001200), each with meta.json: the step, the world
                        size and ZeRO stage, the ModelConfig and the tokenizer reference, so a checkpoint
                        loads and exports without its data; `latest` names the newest complete one
      export/           model.safetensors + config.json + tokenizer.json for inference
      samples/          sample grids
      tensorboard/      TensorBoard events

Readers only need this module; they never import DeepSpeed. `launch` starts a training process for a
config, with or without the `deepspeed` launcher, and streams its output: every place that trains a
run (the quickstart, the notebooks, the reproduction, the benchmarks) starts it this way.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence, TypeVar

from npp.config import TrainConfig
from npp.errors import CheckpointError, ConfigError, TrainingError
from npp.lock import RunLock
from npp.schedule import Stage, plan_stages
from npp.files import dump_json, write_text

TRAIN_SCRIPT = Path(__file__).resolve().parent / "train.py"
"""What the deepspeed launcher runs (`deepspeed npp/train.py ...`); one process runs `python -m npp.train`."""
Row = TypeVar("Row", bound=Mapping[str, Any])


def training_rows(rows: Iterable[Row]) -> list[Row]:
    """The training rows of metrics.jsonl (step, stage, loss, lr, ...), without the evaluation rows."""
    return [row for row in rows if not row.get("eval")]


def evaluation_rows(rows: Iterable[Row]) -> list[Row]:
    """The periodic evaluation rows of metrics.jsonl (step, fid, is, precision, recall, flops_seen, ...)."""
    return [row for row in rows if row.get("eval")]


class RunDir:
    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    @property
    def config(self) -> Path:
        return self.path / "config.json"

    @property
    def metrics(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    @property
    def export(self) -> Path:
        return self.path / "export"

    @property
    def samples(self) -> Path:
        return self.path / "samples"

    @property
    def tensorboard(self) -> Path:
        return self.path / "tensorboard"

    # ---- state -----------------------------------------------------------------------------

    @property
    def exported(self) -> bool:
        """Whether the run has an export (it finished, or `npp export` was run on it)."""
        return (self.export / "model.safetensors").is_file()

    def is_finished(self, config: TrainConfig) -> bool:
        """Exported, and trained as `config` says (how it is logged or evaluated may differ)."""
        return self.exported and self.config.is_file() and not config.changes_from(self.read_config())

    def set_aside(self) -> Path | None:
        """Move what a previous training left here (checkpoints, export, metrics, samples, evaluations) into
        previous-<time>/ and return that folder; None when there is nothing worth keeping."""
        owned = [self.config, self.metrics, self.checkpoints, self.export, self.samples, self.tensorboard,
                 self.path / "eval"]
        if not (self.checkpoint_tags() or self.exported):
            return None
        target = self.path / time.strftime("previous-%Y%m%d-%H%M%S")
        target.mkdir()
        for entry in owned:
            if entry.exists():
                os.replace(entry, target / entry.name)
        return target

    # ---- who writes it ----------------------------------------------------------------------

    def lock(self) -> RunLock:
        """RUN/.lock: held by the one process that trains or exports the run (npp.lock)."""
        return RunLock(self.path)

    def refuse_if_training(self, prog: str) -> None:
        """For a command that writes into the run without training it (an evaluation): refuse in one line
        while a trainer or an export holds the run, then remove what an interrupted export left. A folder
        that is not a run (the parent of a standalone export folder) is left alone."""
        self.lock().check_free()
        if self.config.is_file():
            self.remove_partial_exports(prog)

    def partial_exports(self) -> list[Path]:
        """The temporary folders of exports that never finished (`.export.*`: killed, or the disk filled)."""
        if not self.path.is_dir():
            return []
        return sorted(p for p in self.path.glob(f".{self.export.name}.*") if p.is_dir())

    def remove_partial_exports(self, prog: str) -> list[Path]:
        """Remove partial exports, each with a warning. Call it only while no process exports this run: the
        holder of the run's lock, or a command that found the run unlocked."""
        removed = self.partial_exports()
        for folder in removed:
            shutil.rmtree(folder, ignore_errors=True)
            print(f"{prog}: warning: removed {folder}, the partial export of an interrupted process", file=sys.stderr,
                  flush=True)
        return removed

    # ---- checkpoints -----------------------------------------------------------------------

    @staticmethod
    def tag(step: int) -> str:
        """The checkpoint tag of a step: tags sort by step."""
        return f"step-{step:08d}"

    def latest_tag(self) -> str | None:
        """The checkpoint `latest` points at, or None when there is no complete checkpoint. The pointer is
        replaced atomically only after every file of its checkpoint is written, so a crash mid-save leaves
        the previous one. It is a convenience: where it is missing or names no complete checkpoint, the
        newest complete one is taken (meta.json is written last, so it marks a checkpoint complete)."""
        complete = self.checkpoint_tags()
        pointer = self.checkpoints / "latest"
        tag = read_pointer(pointer, self.checkpoint_tags) if pointer.is_file() else None
        if tag in complete:
            return tag
        return complete[-1] if complete else None

    def checkpoint_tags(self) -> list[str]:
        """Complete checkpoints, oldest first (tags sort by step)."""
        if not self.checkpoints.is_dir():
            return []
        return sorted(p.name for p in self.checkpoints.iterdir()
                      if p.is_dir() and p.name.startswith("step-") and (p / "meta.json").is_file())

    def stage_checkpoints(self) -> list[tuple[Stage, str | None]]:
        """Each stage of the run's schedule, coarse to fine, with the tag of the checkpoint that ends it,
        or None where that checkpoint is not on disk (the trainer never prunes stage ends)."""
        on_disk = set(self.checkpoint_tags())
        stages = plan_stages(TrainConfig.from_dict(self.read_config()).schedule)
        return [(stage, self.tag(stage.end) if self.tag(stage.end) in on_disk else None) for stage in stages]

    def checkpoint_meta(self, tag: str) -> dict[str, Any]:
        """meta.json of a checkpoint: step, world_size, zero_stage, stage, model (ModelConfig), tokenizer."""
        path = self.checkpoints / tag / "meta.json"
        try:
            meta = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError, OSError) as err:
            raise CheckpointError(f"{path} is damaged ({err})") from None
        return checked_meta(meta, path)

    # ---- metrics ---------------------------------------------------------------------------

    def read_metrics(self) -> list[dict[str, Any]]:
        """Every row of metrics.jsonl; a torn last line (a crash mid-write) is ignored."""
        if not self.metrics.is_file():
            return []
        rows = []
        for line in self.metrics.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        return rows

    def train_rows(self) -> list[dict[str, Any]]:
        return training_rows(self.read_metrics())

    def eval_rows(self) -> list[dict[str, Any]]:
        return evaluation_rows(self.read_metrics())

    def truncate_metrics(self, after_step: int) -> None:
        """Drop rows logged after a checkpoint, so a resumed run does not log those steps twice."""
        keep = [row for row in self.read_metrics() if row.get("step", -1) <= after_step]
        write_text(self.metrics, "".join(json.dumps(row) + "\n" for row in keep))

    def append_metrics(self, rows: Iterable[dict[str, Any]]) -> None:
        with open(self.metrics, "a") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def read_config(self) -> dict[str, Any]:
        if not self.config.is_file():
            raise ConfigError(f"{self.path} is not a run directory (no config.json): "
                                    f"give runs/<name> of a run started with `npp train`")
        return read_run_config(self.config)

    def write_config(self, config: dict[str, Any]) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        dump_json(config, self.config)


# ------------------------------------------------------------------------------------------------
# Reading what a run folder holds: a damaged file is a one-line error that names it and the fix
# ------------------------------------------------------------------------------------------------

META_FIELDS = {"step": int, "world_size": int, "zero_stage": int, "model": dict, "tokenizer": dict,
               "tokens_seen": int, "flops_seen": (int, float)}
"""The meta.json fields that resuming and exporting read (every checkpoint the trainer has written has them)."""


_META_FIX = ("that checkpoint cannot be used: `npp train` resumes from the one before it; to export an earlier "
             "one, write its tag into checkpoints/latest")


def checked_meta(meta: Any, path: Path) -> dict[str, Any]:
    """A checkpoint's meta.json after checking that it holds every field its readers use, with its type:
    `{}` (or a field of the wrong kind) is a damaged checkpoint, not a KeyError deep in an export."""
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path} is damaged (a JSON {type(meta).__name__}, not an object): {_META_FIX}")
    wrong = [name for name, kind in META_FIELDS.items()
             if not isinstance(meta.get(name), kind) or isinstance(meta.get(name), bool)]
    if wrong:
        raise CheckpointError(f"{path} is damaged (missing or malformed: {', '.join(wrong)}): {_META_FIX}")
    return meta


def read_pointer(pointer: Path, tags: Callable[[], list[str]]) -> str:
    """The tag that the `latest` pointer names. The trainer writes a tag and a newline and nothing else, so
    anything else (binary bytes, a path) is damage: refused in one line rather than guessed at. `tags` lists
    the complete checkpoints, for the fix."""
    try:
        tag = pointer.read_text(encoding="utf-8").strip()
        damage = None
    except UnicodeDecodeError:
        tag, damage = "", "not text"
    if tag and not (tag.isprintable() and " " not in tag and "/" not in tag and "\\" not in tag
                    and tag not in (".", "..")):
        damage = f"it holds {tag[:40]!r}, not a checkpoint tag"
    if damage is None:
        return tag
    complete = tags()
    fix = (f"write the tag of a complete checkpoint into it (echo {complete[-1]} > {pointer})" if complete
           else f"remove it ({pointer})")
    raise CheckpointError(f"{pointer} is damaged ({damage}): {fix}")


def read_run_config(path: Path) -> dict[str, Any]:
    """A run's config.json as a dict; a file that is not UTF-8 JSON of an object is a one-line error."""
    fix = ("restore it from a copy of the run, or start the run again with `npp train ... --no-resume` "
           "(its files are then set aside, not deleted)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path} is damaged ({' '.join(str(err).split())[:120]}): {fix}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} is damaged (a JSON {type(data).__name__}, not an object of TrainConfig "
                          f"fields): {fix}")
    return data


def check_run_folder(config: TrainConfig) -> None:
    """Before any training: the runs folder and the run folder are folders (or can be made) and can be written
    to, so that a file in their place or a read-only disk is one line now, not a traceback after the data is
    loaded. Nothing is created here: os.access asks the system (it answers for read-only mounts and
    immutable folders even to root)."""
    run = Path(config.run_dir)
    for folder, fix in ((Path(config.runs_dir), "give a folder as --runs-dir (it is made if missing)"),
                        (run, "move the file away, or give another --name")):
        if folder.exists() and not folder.is_dir():
            raise ConfigError(f"{folder} is a file, not a folder: {fix}")
    existing = next(p for p in (run, *run.parents) if p.exists() or p == Path(p.anchor or "."))
    if not existing.is_dir():
        raise ConfigError(f"{existing} is a file, not a folder, so {run} cannot be made: give another --runs-dir")
    for folder in (existing, run / "checkpoints"):
        if folder.is_dir() and not os.access(folder, os.W_OK | os.X_OK):
            raise ConfigError(f"{folder} cannot be written to (a read-only file system, or no permission): choose "
                              f"another --runs-dir, or make it writable")
    check_room_for_a_checkpoint(RunDir(run))


def check_room_for_a_checkpoint(run: RunDir) -> None:
    """A run that has checkpoints needs room for one more (the old one is pruned only after the new one is
    complete): without it, a resume would train until its first save and stop there. Refused now in one line,
    with the run untouched; reading the checkpoints needs no room, so nothing is reported as unloadable."""
    tags = run.checkpoint_tags()
    if not tags:
        return
    needed = sum(f.stat().st_size for f in (run.checkpoints / tags[-1]).rglob("*") if f.is_file())
    free = shutil.disk_usage(run.checkpoints).free
    if free < needed:
        raise TrainingError(f"{run.checkpoints} has no room for another checkpoint: the disk is full ({free / 2**20:.1f} "
                          f"MiB free, the latest checkpoint takes {needed / 2**20:.1f} MiB); the run is kept as it is: "
                          f"make room, then run the same command again")


# ------------------------------------------------------------------------------------------------
# Starting a training process
# ------------------------------------------------------------------------------------------------

def train_command(spec: str | os.PathLike, *, num_gpus: int = 0, hostfile: str = "",
                  extra: Sequence[str] = ()) -> list[str]:
    """The command that trains the run described by the JSON file `spec`: `python -m npp.train` for one
    process, the `deepspeed` launcher for several GPUs (`num_gpus` > 1) or several nodes (`hostfile`)."""
    if num_gpus > 1 or hostfile:
        beside = Path(sys.executable).with_name("deepspeed")  # the launcher of this environment first
        launcher = [str(beside) if beside.is_file() else "deepspeed", *(["--hostfile", hostfile] if hostfile else ["--num_gpus", str(num_gpus)])]
        return [*launcher, str(TRAIN_SCRIPT), "--config", str(spec), *extra]
    return [sys.executable, "-m", "npp.train", "--config", str(spec), *extra]


def launch(config: TrainConfig, *, num_gpus: int = 0, hostfile: str = "", extra: Sequence[str] = (),
           echo: Callable[[str], None] | None = None, env: dict[str, str] | None = None) -> int:
    """Train (or resume) `config` in a process of its own and return its exit code.

    A process of its own: DeepSpeed keeps process-wide state (the process group, its communication
    groups) that a second run in the same interpreter cannot reuse, and a process hands all its memory
    back when it ends. The config is written beside the run (runs_dir/.<name>.json) for the command line.
    Output streams to `echo` as it comes (raw chunks, so a progress bar redraws one line), by default
    this process's stdout.
    """
    spec = Path(config.runs_dir) / f".{config.name}.json"
    spec.parent.mkdir(parents=True, exist_ok=True)
    dump_json(config.to_dict(), spec)
    command = train_command(spec, num_gpus=num_gpus, hostfile=hostfile, extra=extra)
    write = echo or (lambda text: print(text, end="", flush=True))
    write("$ " + " ".join(command) + "\n")
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env) as process:
        assert process.stdout is not None
        for chunk in iter(lambda: process.stdout.read1(4096), b""):
            write(chunk.decode(errors="replace"))
    return process.returncode
