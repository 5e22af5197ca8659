"""A run's training checkpoints: one owner, the Checkpointer, for writing them, the `latest` pointer, pruning,
choosing what to resume from, reading them (weights-only) and the export.

    runs/<name>/checkpoints/step-00001200/   DeepSpeed's files (mp_rank_*, zero_pp_rank_* per process),
                                             ema.safetensors when the run keeps an EMA, meta.json (last:
                                             it marks the folder complete)
    runs/<name>/checkpoints/latest           the newest complete tag (a convenience: the folders say it too)

No engine is needed to read one: ZeRO shards of any stage are consolidated from the files, so a run exports
on a machine without the GPUs that trained it. A checkpoint describes itself (meta.json holds its ModelConfig
and tokenizer reference), so loading or exporting one never opens the training data. Every pickle is read
weights-only: a run folder can be shared like a model file.
"""

from __future__ import annotations

import argparse
import errno
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Collection

import torch
from safetensors import SafetensorError

from npp.config import ModelConfig, TrainConfig
from npp.errors import CheckpointError, ConfigError, TrainingError
from npp.files import atomic_dir, dump_json, write_text
from npp.model import GPT
from npp.runs import RunDir
from npp.tokenref import TokenizerRef
from npp.weights import (EMA_FIX, UnsafeCheckpointError, WeightsOnlyLoads, deepspeed_reads_weights_only,
                         deepspeed_state_classes, load_strict, read_weights, safe_load, write_weights)


@dataclass(frozen=True)
class CheckpointMeta:
    """What a checkpoint says of itself (its meta.json), written by the trainer with every checkpoint."""

    step: int
    """Optimizer steps done: the step a resume continues from."""
    world_size: int
    """Processes that wrote it: another count resumes through DeepSpeed's universal checkpoint."""
    zero_stage: int
    """The ZeRO stage of its files (0: one full model file; 2, 3: shards to consolidate)."""
    stage: int
    """The schedule stage its last step trained."""
    model: ModelConfig
    """The architecture, so the checkpoint loads without its data."""
    tokenizer: TokenizerRef
    """The tokenizer that decodes its codes (the export's tokenizer.json)."""
    tokens_seen: int
    flops_seen: float
    experiment: str
    """TrainConfig.experiment_id() of the run that wrote it: a resume or export of another run refuses it."""

    def to_dict(self) -> dict[str, Any]:
        return {"step": self.step, "world_size": self.world_size, "zero_stage": self.zero_stage, "stage": self.stage,
                "model": self.model.to_dict(), "tokenizer": self.tokenizer.to_dict(), "tokens_seen": self.tokens_seen,
                "flops_seen": self.flops_seen, "experiment": self.experiment}


@dataclass(frozen=True)
class Resumed:
    """The checkpoint a resume loaded into the engine: its meta.json and its EMA (None when it keeps none)."""

    tag: str
    meta: dict[str, Any]
    ema: dict[str, torch.Tensor] | None


class ForeignCheckpointError(CheckpointError):
    """A complete checkpoint of another experiment or model in this run's folder: refused, never skipped."""


_FAILURES = (CheckpointError, TrainingError, RuntimeError, OSError, KeyError, ValueError)
"""What loading a checkpoint into the engine raises for a damaged one (DeepSpeed's errors included)."""


class Checkpointer:
    """The checkpoints of one run. Every process of a training holds one: `rank` 0 writes what is written
    once (the EMA, meta.json, the pointer) and speaks; `agree` tells whether a condition holds on every rank
    (an all-reduce in training, the identity in one process), so every rank takes the same fallback."""

    def __init__(self, run: RunDir, prog: str, *, rank: int = 0, agree: Callable[[bool], bool] = bool):
        self.run, self.prog, self.rank, self.agree = run, prog, rank, agree

    # ---- choosing --------------------------------------------------------------------------

    def tag(self, tag: str | None = None) -> str:
        """The given tag (default: the latest) after checking that it is a complete checkpoint of the run."""
        run = self.run
        tag = tag or run.latest_tag()
        if tag is None:
            raise TrainingError(f"{run.path} has no complete checkpoint yet: train it first "
                                f"(npp train --config {run.config})")
        if tag not in run.checkpoint_tags():
            raise TrainingError(f"{run.checkpoints / tag} is not a complete checkpoint of {run.path}: choose one of "
                                f"{', '.join(run.checkpoint_tags()) or '(none yet)'}")
        return tag

    def newest_first(self) -> list[str]:
        """The complete checkpoints to try, newest first: the latest, then each one before it."""
        tags = self.run.checkpoint_tags()
        return tags[: tags.index(self.tag()) + 1][::-1]

    # ---- writing ---------------------------------------------------------------------------

    def save(self, engine: Any, meta: CheckpointMeta, *, ema: dict[str, torch.Tensor] | None, keep_last: int,
             keep: Collection[str]) -> None:
        """Write the checkpoint of meta.step on every rank, then (rank 0) the EMA, meta.json, the pointer, and
        prune: checkpoints beyond the newest `keep_last` go, except the tags in `keep` (the stage ends: the models
        each stage produced, a few at most). A write that fails removes the partial folder."""
        # universal_checkpoint_info lets DeepSpeed's ds_to_universal re-shard this checkpoint for
        # another number of processes (no tensor parallelism here, so it holds only its version).
        from deepspeed.checkpoint.constants import (UNIVERSAL_CHECKPOINT_INFO, UNIVERSAL_CHECKPOINT_VERSION_KEY,
                                                    UNIVERSAL_CHECKPOINT_VERSION_VALUE)

        tag = RunDir.tag(meta.step)
        folder = self.run.checkpoints / tag
        self.run.checkpoints.mkdir(parents=True, exist_ok=True)
        try:
            engine.save_checkpoint(str(self.run.checkpoints), tag=tag, save_latest=False, client_state={
                "step": meta.step,
                UNIVERSAL_CHECKPOINT_INFO: {UNIVERSAL_CHECKPOINT_VERSION_KEY: UNIVERSAL_CHECKPOINT_VERSION_VALUE}})
            if self.rank == 0:
                self._complete(folder, meta, ema)
                self.set_latest(tag)
                self.prune(keep_last, keep)
        except (OSError, RuntimeError) as err:
            # A half-written folder has no meta.json, so nothing would load it; remove it all the same.
            shutil.rmtree(folder, ignore_errors=True)
            raise TrainingError(f"could not save checkpoint {tag} in {self.run.checkpoints}: {save_failure(err, folder)}; "
                                f"the partial folder was removed and {self.run.latest_tag() or 'no earlier checkpoint'} "
                                f"is the last complete one: make room or fix the folder, then resume with the same "
                                f"command") from None

    @staticmethod
    def _complete(folder: Path, meta: CheckpointMeta, ema: dict[str, torch.Tensor] | None) -> None:
        if ema is not None:
            write_weights({k: v.contiguous().cpu() for k, v in ema.items()}, folder / "ema.safetensors")
        dump_json(meta.to_dict(), folder / "meta.json")  # last: it marks the folder complete

    def set_latest(self, tag: str) -> None:
        """Point `latest` at a complete checkpoint (replaced atomically, so a crash leaves the previous one)."""
        write_text(self.run.checkpoints / "latest", tag + "\n")

    def prune(self, keep_last: int, keep: Collection[str]) -> None:
        """Remove the complete checkpoints older than the newest `keep_last`, except those in `keep`."""
        for old in self.run.checkpoint_tags()[:-keep_last]:
            if old not in keep:
                shutil.rmtree(self.run.checkpoints / old, ignore_errors=True)

    # ---- resuming --------------------------------------------------------------------------

    def resume_needs_resharding(self, experiment: str, world: int) -> bool:
        """Checks before the engine exists: the newest readable checkpoint belongs to this experiment. Returns
        whether it must be re-sharded for `world` processes (DeepSpeed's universal checkpoint, chosen at init)."""
        meta = next(filter(None, map(self._meta_if_readable, reversed(self.run.checkpoint_tags()))), None)
        if meta is None:
            raise TrainingError(f"no checkpoint of {self.run.path} has a readable meta.json: start the run again "
                                f"with --no-resume (its files are then set aside, not deleted)")
        if meta.get("experiment") not in (None, experiment):
            raise ConfigError(f"{self.run.checkpoints / RunDir.tag(meta['step'])} was written by another experiment "
                              f"than {self.run.config} describes: move the checkpoints folder away, or pass --no-resume")
        return meta["world_size"] != world and meta["zero_stage"] > 0

    def _meta_if_readable(self, tag: str) -> dict[str, Any] | None:
        try:
            return self.run.checkpoint_meta(tag)
        except CheckpointError:
            return None

    def resume(self, engine: Any, *, universal: bool, with_ema: bool) -> Resumed:
        """Load the newest complete checkpoint into the engine (and its EMA when `with_ema`); one that cannot be
        loaded (damaged, truncated, or holding more than tensors) is skipped with a warning for the one before
        it, so a crash while a file was being copied costs the steps since that checkpoint, not the run. Every
        rank moves on together."""
        if not isinstance(engine.checkpoint_engine, WeightsOnlyLoads):
            engine.checkpoint_engine = WeightsOnlyLoads(engine.checkpoint_engine)
        failures = []
        for tag in reversed(self.run.checkpoint_tags()):
            resumed, error = None, None
            try:
                resumed = self._load_into(engine, tag, universal, with_ema)
            except _FAILURES as err:
                error = " ".join(str(err).split())[:300] or type(err).__name__
            if self.agree(error is None):
                return resumed
            failures.append(f"{tag}: {error or 'another process could not load it'}")
            self._warn(f"checkpoint {self.run.checkpoints / tag} could not be loaded "
                       f"({error or 'another process could not load it'}); trying the one before it")
        raise TrainingError(f"no checkpoint of {self.run.path} could be loaded ({'; '.join(failures)}): start the run "
                            f"again with --no-resume (its files are then set aside, not deleted)")

    def _load_into(self, engine: Any, tag: str, universal: bool, with_ema: bool) -> Resumed:
        meta = self.run.checkpoint_meta(tag)
        load_tag = self._universal(tag) if universal else tag
        # The engine's own files go through WeightsOnlyLoads; the universal form is read by torch.load directly.
        with deepspeed_reads_weights_only(self.run.checkpoints / load_tag):
            _, client = engine.load_checkpoint(str(self.run.checkpoints), tag=load_tag, load_optimizer_states=True,
                                               load_lr_scheduler_states=False)
        if client is None:
            raise TrainingError(f"DeepSpeed found no checkpoint files in {self.run.checkpoints / load_tag}")
        ema_file = self.run.checkpoints / tag / "ema.safetensors"
        ema = read_weights(ema_file, fix=EMA_FIX) if with_ema and ema_file.is_file() else None
        return Resumed(tag, meta, ema)

    def _universal(self, tag: str) -> str:
        """The tag of the universal form of a checkpoint (made by rank 0 the first time it is needed)."""
        universal = f"{tag}-universal"
        if (self.run.checkpoints / universal).is_dir():
            return universal
        converted = None
        if self.rank == 0:
            try:
                to_universal(self.run.checkpoints / tag, self.run.checkpoints / universal)
            except (CheckpointError, RuntimeError, OSError) as err:
                converted = err
        if not self.agree(converted is None):
            raise converted or CheckpointError(f"rank 0 could not convert {tag} for this number of processes")
        return universal

    # ---- reading ---------------------------------------------------------------------------

    def model(self, tag: str | None = None) -> GPT:
        """The model of one checkpoint (default: the latest), in fp32 and eval mode: EMA weights when the run
        keeps them. Stage-end checkpoints are never pruned, so every stage can be sampled."""
        tag = self.tag(tag)
        folder = self.run.checkpoints / tag
        if (folder / "ema.safetensors").is_file():
            state = read_weights(folder / "ema.safetensors", fix=EMA_FIX)
        else:
            state = self._consolidated(tag)
        with torch.device("meta"):
            model = GPT(ModelConfig.from_dict(self.run.checkpoint_meta(tag)["model"]))
        return load_strict(model, {k: v.float() for k, v in state.items()}, str(folder)).eval()

    def _consolidated(self, tag: str) -> dict[str, torch.Tensor]:
        """The fp32 weights of a checkpoint, gathered from ZeRO shards when it has them."""
        folder = self.run.checkpoints / tag
        if self.run.checkpoint_meta(tag)["zero_stage"] == 0:
            return safe_load(folder / "mp_rank_00_model_states.pt", allow=deepspeed_state_classes())["module"]
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        try:
            with deepspeed_reads_weights_only(folder):
                return get_fp32_state_dict_from_zero_checkpoint(str(self.run.checkpoints), tag=tag)
        except CheckpointError:
            raise
        except (RuntimeError, OSError, KeyError, ValueError, EOFError) as err:
            # zero_to_fp32 names no file: say which checkpoint, so the export can fall back past it.
            raise CheckpointError(f"the ZeRO shards of {folder} could not be consolidated "
                                  f"({' '.join(str(err).split())[:200] or type(err).__name__}): {EMA_FIX}") from None

    def newest_loadable_model(self) -> tuple[str, GPT]:
        """The latest checkpoint of this run and its model. One with a damaged file (cut off while it was copied,
        a disk error) is skipped with a warning for the one before it, as a resume does; one of another experiment,
        or one that asks to run code, is refused: those are not accidents an older checkpoint should paper over."""
        *newer, oldest = self.newest_first()
        for tag in newer:
            try:
                return tag, self._model_of_run(tag)
            except (UnsafeCheckpointError, ForeignCheckpointError):
                raise
            except CheckpointError as err:
                self._warn(f"checkpoint {self.run.checkpoints / tag} could not be loaded ({err}); trying the one "
                           f"before it")
        return oldest, self._model_of_run(oldest)

    def _model_of_run(self, tag: str) -> GPT:
        check_checkpoint_of_run(self.run, tag)
        return self.model(tag)

    # ---- export ----------------------------------------------------------------------------

    def export(self) -> Path:
        """runs/<name>/export from the latest loadable checkpoint: fp32 weights (EMA when kept), config,
        tokenizer.json, source.json.

        It holds the run's lock (a trainer exporting its own run already does), so no trainer writes a checkpoint
        meanwhile and what an interrupted export left (`.export.*`) can be removed first; the checkpoint must be
        one of this run's experiment, as for a resume. A write that fails (a full disk) leaves no partial folder."""
        run = self.run
        run.read_config()  # a one-line error for a folder that is not a run
        with run.lock().held(self.prog):
            run.remove_partial_exports(self.prog)
            tag, model = self.newest_loadable_model()
            meta_file = run.checkpoints / tag / "meta.json"
            tokenizer = TokenizerRef.from_dict(run.checkpoint_meta(tag)["tokenizer"], where=str(meta_file),
                                               fix="export an earlier checkpoint (write its tag into checkpoints/latest)")
            try:
                with atomic_dir(run.export) as tmp:
                    model.save_pretrained(tmp)
                    dump_json(tokenizer.to_dict(), tmp / "tokenizer.json")
                    dump_json({"run": str(run.path), "checkpoint": tag,
                               "ema": (run.checkpoints / tag / "ema.safetensors").is_file()}, tmp / "source.json")
            except (OSError, RuntimeError, SafetensorError) as err:
                raise TrainingError(f"could not write the export of {run.path}: {save_failure(err, run.export)}; the "
                                    f"partial folder was removed and the checkpoints are kept: make room or fix the "
                                    f"folder, then run `npp export {run.path}`") from None
        return run.export

    def _warn(self, message: str) -> None:
        if self.rank == 0:
            print(f"{self.prog}: warning: {message}", file=sys.stderr, flush=True)


def load_checkpoint_model(run_dir: str | os.PathLike, tag: str | None = None) -> GPT:
    """The model of one checkpoint of a run (default: the latest): Checkpointer.model, for notebooks."""
    return Checkpointer(RunDir(run_dir), "npp").model(tag)


def export_run(run_dir: str | os.PathLike, prog: str = "npp export") -> Path:
    """Write runs/<name>/export (Checkpointer.export) and return it."""
    return Checkpointer(RunDir(run_dir), prog).export()


def check_checkpoint_of_run(run: RunDir, tag: str) -> None:
    """The checks a resume makes, for an export: the checkpoint was written by the experiment config.json
    describes (meta.json's experiment hash) and holds the architecture that config trains (its preset and
    overrides; vocabulary, classes and grid come from the data, so they are taken from meta.json). A
    checkpoint copied in from another run must not be exported under this run's name."""
    config = TrainConfig.from_dict(run.read_config())
    meta = run.checkpoint_meta(tag)
    where = run.checkpoints / tag
    fix = (f"move it out of {run.checkpoints} and point {run.checkpoints / 'latest'} at a checkpoint of this run, "
           f"or export the run it came from")
    if meta.get("experiment") not in (None, config.experiment_id()):
        raise ForeignCheckpointError(f"{where} was written by another experiment than {run.config} describes: {fix}")
    saved = meta.get("model")
    if not isinstance(saved, dict):
        raise CheckpointError(f"{where / 'meta.json'} names no model (ModelConfig): {fix}")
    try:
        saved_config = ModelConfig.from_dict(saved)
        data_fields = {"vocab_size": saved_config.vocab_size, "num_classes": saved_config.num_classes,
                       "grid": saved_config.grid}
        expected = ModelConfig.preset(config.model, **{**config.model_overrides, **data_fields})
    except (ConfigError, TypeError) as err:
        raise CheckpointError(f"{where / 'meta.json'} holds a model this run cannot describe ({err}): {fix}") from None
    differ = [f"{k} {v} (the run: {expected.to_dict()[k]})" for k, v in saved_config.to_dict().items()
              if v != expected.to_dict()[k]]
    if differ:
        raise ForeignCheckpointError(f"{where} holds another model than {run.config} trains (--model {config.model}): "
                              f"{', '.join(differ[:4])}: {fix}")


def save_failure(err: BaseException, folder: Path) -> str:
    """Why a checkpoint or an export could not be written, in words: a full disk, a folder one cannot write
    to, or the error."""
    code = getattr(err, "errno", None)
    try:
        free = shutil.disk_usage(folder.parent if folder.parent.exists() else folder.parent.parent).free
    except OSError:
        free = None
    # torch's zip writer reports a full disk as "unexpected pos …" and safetensors as "… (os error 28)",
    # without an errno.
    text = str(err)
    full = f"the disk is full ({free / 2**20:.0f} MiB free)" if free is not None else "the disk is full"
    if code == errno.ENOSPC or "unexpected pos" in text or f"os error {errno.ENOSPC})" in text:
        return full
    # Before the free-space guess: a small read-only filesystem has little room and is not full.
    if code in (errno.EACCES, errno.EPERM, errno.EROFS) or "Parent directory" in text or not _writable(folder):
        return "the folder cannot be written to (read-only, or no permission)"
    if free is not None and free < 2**26:
        return full
    return " ".join(text.split())[:300] or type(err).__name__


def _writable(folder: Path) -> bool:
    """Whether the nearest existing folder at or above `folder` can be written (a read-only mount says no,
    even to root)."""
    existing = next((p for p in (folder, *folder.parents) if p.exists()), None)
    return existing is None or os.access(existing, os.W_OK)


def to_universal(source: Path, target: Path) -> None:
    """DeepSpeed's universal checkpoint: optimizer state by parameter, loadable at any world size."""
    from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    args = argparse.Namespace(input_folder=str(source), output_folder=str(tmp), num_extract_workers=1,
                              num_merge_workers=1, keep_temp_folder=False, strict=True,
                              inject_missing_state=False)
    with deepspeed_reads_weights_only(source):
        ds_to_universal(args)
    os.replace(tmp, target)
