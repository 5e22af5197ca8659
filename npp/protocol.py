"""The evaluation protocol: the CFG scale and scoring size a model is evaluated (and shown in the app) with
when no flag or box says otherwise, and where they come from.

    default_protocol("runs/c2i_L_384")  # a converted GPT-L: Protocol(2.0, 256, "LlamaGen's FID protocol ...")

A released LlamaGen GPT is scored as LlamaGen scores it (its published CFG per model; its 384-px models
resized to 256 px), a run of ours by its recipe's CFG, anything else by the paper's sampler. Everything is
read from the JSON files beside the weights, before any weights are loaded.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from npp.config import MODEL_PRESETS, PAPER_SAMPLER, SamplerConfig
from npp.model import LLAMAGEN_DOWNSAMPLE, LLAMAGEN_PRESETS
from npp.pipeline import Pipeline, export_folder

LLAMAGEN_FID_CFG = {"B": 2.0, "L": 2.0, "XL": 1.75, "XXL": 1.75, "3B": 1.65}
"""The CFG scale of each released LlamaGen c2i GPT's published FID (the sampling commands of its
GETTING_STARTED.md)."""

LLAMAGEN_EVAL_SIZES = {384: 256}
"""LlamaGen scores its 384-px GPTs at 256 px (sample_c2i_ddp.py --image-size-eval 256); 256-px ones as drawn."""


@dataclass(frozen=True)
class Protocol:
    """The defaults a model is evaluated with, and where they come from (said when evaluate starts)."""

    cfg_scale: float
    eval_image_size: int
    """0: the model's own size."""
    source: str


PAPER_PROTOCOL = Protocol(PAPER_SAMPLER.cfg_scale, 0, "the paper's sampler (PAPER_SAMPLER)")
"""What a model is scored by when nothing says otherwise."""


def default_protocol(path: str | os.PathLike) -> Protocol:
    """A released LlamaGen GPT (an export `npp convert` wrote: its config.json records what was inferred, and
    its width is a LlamaGen preset's) is scored as LlamaGen scores it; a run of ours by its recipe's CFG (the
    run's eval_sampler); anything else by the paper's sampler. Read from the JSON files, before any weights."""
    export = export_folder(path)
    model = _json_object(export / "config.json")
    if "inferred" in model and (released := released_protocol(model.get("dim"), model.get("grid", 0))):
        return released
    run = _json_object(export.parent / "config.json")
    sampler = run.get("eval_sampler")
    scale = sampler.get("cfg_scale") if isinstance(sampler, dict) else run.get("eval_cfg_scale")
    if isinstance(scale, (int, float)) and not isinstance(scale, bool):
        return Protocol(float(scale), 0, f"the run's recipe ({export.parent / 'config.json'}: eval_sampler)")
    return PAPER_PROTOCOL


def released_protocol(dim: Any, grid: Any) -> Protocol | None:
    """LlamaGen's FID protocol for a GPT read from one of its files whose width is a released preset's, or None
    (a width no released GPT has: not one of LlamaGen's models)."""
    released = [name for name in LLAMAGEN_PRESETS if MODEL_PRESETS[name][2] == dim]
    if not released:
        return None
    name, size = released[0], grid * LLAMAGEN_DOWNSAMPLE
    return Protocol(LLAMAGEN_FID_CFG[name], LLAMAGEN_EVAL_SIZES.get(size, 0),
                    f"LlamaGen's FID protocol for its released GPT-{name} at {size} px")


def pipeline_protocol(pipe: Pipeline) -> Protocol:
    """default_protocol of a loaded model: an export's as its files say; a GPT read from a LlamaGen/NPP .pt
    (it carries `model.inferred`) as a released one, when its width is a released preset's; else the paper's."""
    if pipe.export is not None:
        return default_protocol(pipe.export)
    config = pipe.model.config
    if pipe.model.inferred is not None and (released := released_protocol(config.dim, config.grid)):
        return released
    return PAPER_PROTOCOL


def default_sampler(protocol: Protocol, sampler: type[SamplerConfig] = SamplerConfig) -> SamplerConfig:
    """The sampler a model is evaluated (and shown in the app) with when no flag or box says otherwise: the
    paper's knobs with the protocol's CFG scale; a SamplerConfig subclass's own fields keep their defaults."""
    return sampler(**{**PAPER_SAMPLER.to_dict(), "cfg_scale": protocol.cfg_scale})


def _json_object(path: Path) -> dict[str, Any]:
    """A JSON object file's content, or {} (absent or unreadable: the loader reports damage, not this guess)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return {}
    return data if isinstance(data, dict) else {}
