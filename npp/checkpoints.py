"""Training checkpoints on disk: the model of any checkpoint, and the export of a run.

No engine is needed: ZeRO shards of any stage are consolidated from the files, so this works on a
machine without the GPUs that trained the run. A checkpoint describes itself (meta.json holds its
ModelConfig and tokenizer reference), so loading or exporting one never opens the training data.
"""

from __future__ import annotations

import argparse
import os
import shutil
from pathlib import Path

import torch

from npp.config import ModelConfig
from npp.errors import TrainingError
from npp.files import atomic_dir, dump_json
from npp.model import GPT
from npp.runs import RunDir
from npp.weights import (EMA_FIX, deepspeed_loads_weights_only, deepspeed_state_classes, load_strict, read_weights,
                         safe_load)


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


def export_run(run_dir: str | os.PathLike) -> Path:
    """runs/<name>/export from the latest checkpoint: fp32 weights (EMA when kept), config, tokenizer."""
    run = RunDir(run_dir)
    run.read_config()  # a one-line error for a folder that is not a run
    tag = checkpoint_tag(run, None)
    model = load_checkpoint_model(run.path, tag)
    meta = run.checkpoint_meta(tag)
    with atomic_dir(run.export) as tmp:
        model.save_pretrained(tmp)
        dump_json(meta["tokenizer"], tmp / "tokenizer.json")
        dump_json({"run": str(run.path), "checkpoint": tag, "ema": (run.checkpoints / tag / "ema.safetensors").is_file()},
                  tmp / "source.json")
    return run.export


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
