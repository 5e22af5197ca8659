"""Training checkpoints on disk: the model of any checkpoint, and the export of a run.

No engine is needed: ZeRO shards of any stage are consolidated from the files, so this works on a
machine without the GPUs that trained the run. A checkpoint describes itself (meta.json holds its
ModelConfig and tokenizer reference), so loading or exporting one never opens the training data.
"""

from __future__ import annotations

import argparse
import errno
import os
import shutil
import sys
from pathlib import Path

import torch
from safetensors import SafetensorError

from npp.config import ModelConfig, TrainConfig
from npp.errors import CheckpointError, ConfigError, TrainingError
from npp.files import atomic_dir, dump_json
from npp.model import GPT
from npp.runs import RunDir
from npp.weights import (EMA_FIX, UnsafeCheckpointError, deepspeed_loads_weights_only, deepspeed_state_classes,
                         load_strict, read_weights, safe_load)


def checkpoint_tag(run: RunDir, tag: str | None) -> str:
    """The given tag (default: the latest) after checking that it is a complete checkpoint of the run."""
    tag = tag or run.latest_tag()
    if tag is None:
        raise TrainingError(f"{run.path} has no complete checkpoint yet: train it first "
                            f"(npp train --config {run.config})")
    if tag not in run.checkpoint_tags():
        raise TrainingError(f"{run.checkpoints / tag} is not a complete checkpoint of {run.path}: choose one of "
                            f"{', '.join(run.checkpoint_tags()) or '(none yet)'}")
    return tag


def load_checkpoint_model(run_dir: str | os.PathLike, tag: str | None = None) -> GPT:
    """The model of one checkpoint of a run (default: the latest), in fp32 and eval mode: EMA weights
    when the run keeps them. Stage-end checkpoints are never pruned, so every stage can be sampled."""
    run = RunDir(run_dir)
    tag = checkpoint_tag(run, tag)
    folder = run.checkpoints / tag
    if (folder / "ema.safetensors").is_file():
        state = read_weights(folder / "ema.safetensors", fix=EMA_FIX)
    else:
        state = consolidated_state(run, tag)
    with torch.device("meta"):
        model = GPT(ModelConfig.from_dict(run.checkpoint_meta(tag)["model"]))
    return load_strict(model, {k: v.float() for k, v in state.items()}, str(folder)).eval()


def export_run(run_dir: str | os.PathLike, prog: str = "npp export") -> Path:
    """runs/<name>/export from the latest checkpoint: fp32 weights (EMA when kept), config, tokenizer.

    It holds the run's lock (a trainer exporting its own run already does), so no trainer writes a checkpoint
    meanwhile and what an interrupted export left (`.export.*`) can be removed first; the checkpoint must be
    one of this run's experiment, as for a resume. A write that fails (a full disk) leaves no partial folder."""
    run = RunDir(run_dir)
    run.read_config()  # a one-line error for a folder that is not a run
    with run.lock().held(prog):
        run.remove_partial_exports(prog)
        tag, model = newest_loadable_model(run, prog)
        meta = run.checkpoint_meta(tag)
        try:
            with atomic_dir(run.export) as tmp:
                model.save_pretrained(tmp)
                dump_json(meta["tokenizer"], tmp / "tokenizer.json")
                dump_json({"run": str(run.path), "checkpoint": tag,
                           "ema": (run.checkpoints / tag / "ema.safetensors").is_file()}, tmp / "source.json")
        except (OSError, RuntimeError, SafetensorError) as err:
            raise TrainingError(f"could not write the export of {run.path}: {save_failure(err, run.export)}; the "
                                f"partial folder was removed and the checkpoints are kept: make room or fix the "
                                f"folder, then run `npp export {run.path}`") from None
    return run.export


def newest_loadable_model(run: RunDir, prog: str) -> tuple[str, GPT]:
    """The latest checkpoint of this run and its model. One with a damaged file (cut off while it was copied,
    a disk error) is skipped with a warning for the one before it, as a resume does; one of another experiment,
    or one that asks to run code, is refused: those are not accidents an older checkpoint should paper over."""
    latest = checkpoint_tag(run, None)
    tags = run.checkpoint_tags()
    newest_first = tags[: tags.index(latest) + 1][::-1]
    for tag in newest_first[:-1]:
        try:
            return tag, _model_of_run(run, tag)
        except (UnsafeCheckpointError, ForeignCheckpointError):
            raise
        except CheckpointError as err:
            print(f"{prog}: warning: checkpoint {run.checkpoints / tag} could not be loaded ({err}); trying the one "
                  f"before it", file=sys.stderr, flush=True)
    return newest_first[-1], _model_of_run(run, newest_first[-1])


def _model_of_run(run: RunDir, tag: str) -> GPT:
    check_checkpoint_of_run(run, tag)
    return load_checkpoint_model(run.path, tag)


class ForeignCheckpointError(CheckpointError):
    """A complete checkpoint of another experiment or model in this run's folder: refused, never skipped."""


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


def consolidated_state(run: RunDir, tag: str) -> dict[str, torch.Tensor]:
    """The fp32 weights of a checkpoint, gathered from ZeRO shards when it has them."""
    if run.checkpoint_meta(tag)["zero_stage"] > 0:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        with deepspeed_loads_weights_only():
            return get_fp32_state_dict_from_zero_checkpoint(str(run.checkpoints), tag=tag)
    return safe_load(run.checkpoints / tag / "mp_rank_00_model_states.pt", allow=deepspeed_state_classes())["module"]


def to_universal(source: Path, target: Path) -> None:
    """DeepSpeed's universal checkpoint: optimizer state by parameter, loadable at any world size."""
    from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    args = argparse.Namespace(input_folder=str(source), output_folder=str(tmp), num_extract_workers=1,
                              num_merge_workers=1, keep_temp_folder=False, strict=True,
                              inject_missing_state=False)
    with deepspeed_loads_weights_only():
        ds_to_universal(args)
    os.replace(tmp, target)
