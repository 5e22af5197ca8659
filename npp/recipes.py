"""Named training recipes, shipped with the package: what a run trains with unless told otherwise.

    npp train --recipe paper --model XXL --data codes/imagenet256          # the NPP paper's run
    npp train --recipe llamagen --model XXL --data codes/imagenet256       # the NTP baseline, as LlamaGen
    npp train --recipe quickstart --name my-run                            # the CPU recipe of make quickstart

`paper` holds the settings of the NPP paper and of its authors' training code (docs/method.md §3, §10),
`llamagen` the NTP baseline as LlamaGen trained it (constant LR: the paper's baseline rows), and
`quickstart` the CPU recipe that trains the tiny quickstart pair in minutes. `auto` (the default of
`npp train` and the train notebook) is `quickstart` for the debug and tiny presets and `paper` for B
and larger. Lengths given in epochs become steps with the data set's size and the global batch, so a
recipe fits any data. Every value, with its source and where the paper and its code disagree, is in
docs/recipes.md, which `python -m npp.recipes` writes from this file (a test keeps the two equal).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Any

from npp.config import MODEL_PRESETS, TrainConfig
from npp.errors import check
from npp.flags import overlay
from npp.tokenizer import EMBEDDED_TOKENIZERS

SMALL_PRESETS = ("debug", "tiny")
"""Presets of the CPU world: `auto` gives them the quickstart recipe."""


@dataclass(frozen=True)
class Setting:
    """One row of a recipe's table: a TrainConfig field (dotted for nested ones), its value for each
    preset (or one value for all), and where the value comes from."""

    field: str
    value: Any
    source: str
    per_preset: dict[str, Any] = field(default_factory=dict)
    embedded_data_only: bool = False
    """Set only on the embedded MNIST data, whose test digits npp ships: the periodic evaluation's
    reference on other data is a folder only the user can name, so there TrainConfig's default stays."""

    def for_preset(self, preset: str) -> Any:
        return self.per_preset.get(preset, self.value)


@dataclass(frozen=True)
class Recipe:
    name: str
    description: str
    settings: tuple[Setting, ...]
    epochs: float = 0.0
    """Length in passes over the data (0: the recipe gives total steps instead)."""
    warmup_epochs: float = 0.0
    """Warm-up of every stage, in epochs (converted with the data set's size, like the length)."""

    def values(self, preset: str, *, data_size: int, batch_size: int | None = None,
               embedded_data: bool = False) -> dict[str, Any]:
        """TrainConfig fields (nested as TrainConfig.from_dict takes them) for a model preset and data
        of data_size images (the embedded MNIST or not); epochs become steps with batch_size (default:
        the recipe's)."""
        check(preset in MODEL_PRESETS, f"TrainConfig.model={preset!r}: choose one of {', '.join(MODEL_PRESETS)}")
        out: dict[str, Any] = {"recipe": self.name, "model": preset}
        for setting in self.settings:
            value = setting.for_preset(preset)
            if value is None or (setting.embedded_data_only and not embedded_data):  # TrainConfig's default stays
                continue
            *parents, leaf = setting.field.split(".")
            target = out
            for parent in parents:
                target = target.setdefault(parent, {})
            target[leaf] = value
        batch = batch_size or out["batch_size"]
        steps_per_epoch = data_size / batch
        if self.epochs:
            out.setdefault("schedule", {})["total_steps"] = max(1, round(self.epochs * steps_per_epoch))
        if self.warmup_epochs:
            out.setdefault("schedule", {})["warmup_steps"] = max(1, round(self.warmup_epochs * steps_per_epoch))
        return out


# ------------------------------------------------------------------------------------------------
# The recipes
# ------------------------------------------------------------------------------------------------

PAPER_CODE = "the authors' train_c2i.py"
LLAMAGEN_CODE = "LlamaGen's train_c2i.py"

# What the paper's and LlamaGen's runs share (docs/method.md §2, §10); the recipes below add their differences.
_COMMON = (
    Setting("betas", [0.9, 0.95], f"paper appendix; {PAPER_CODE}"),
    Setting("weight_decay", 0.05, f"paper appendix; {PAPER_CODE} (on tensors of ≥ 2 dimensions, embeddings "
                                  "and head included)"),
    Setting("grad_clip", 1.0, PAPER_CODE),
    Setting("model_overrides", {"token_dropout": 0.1, "resid_dropout": 0.1, "ffn_dropout": 0.1, "attn_dropout": 0.0,
                                "class_dropout": 0.1},
            f"{PAPER_CODE} (the paper says attention dropout 0.1; the code uses 0.0, which we follow)"),
    Setting("ema_decay", 0.0, f"{PAPER_CODE}: EMA only with --ema, not used for the paper's results"),
    Setting("precision", "auto", f"{PAPER_CODE}: torch autocast bf16 over fp32 weights and gradients "
                                 "(our amp-bf16, what auto picks on a GPU)"),
)

PAPER = Recipe(
    "paper", "The NPP paper's training: #L 2, λ ½, every stage warmed up and decayed, 300 epochs.",
    _COMMON + (
        Setting("batch_size", 256, f"paper appendix; {PAPER_CODE} --global-batch-size"),
        Setting("schedule.levels", 2, "paper §4 (main results: #L 2)"),
        Setting("schedule.segment_factor", 0.5, "paper §4 (main results: λ ½)"),
        Setting("schedule.lr", 1e-4, "paper appendix"),
        Setting("schedule.end_lr", 1e-5, f"{PAPER_CODE} (--scheduler)"),
        Setting("schedule.decay_fraction", 0.2, f"{PAPER_CODE}: linear decay over the last 20% of every stage"),
        Setting("schedule.warmup_every_stage", True, f"paper; {PAPER_CODE}"),
        Setting("schedule.decay_every_stage", True, f"paper; {PAPER_CODE}"),
        Setting("eval_sampler.cfg_scale", 2.0, "paper Table 1 (CFG of each model's FID; 2B, 3B: ours, as XXL)",
                per_preset={"L": 1.75, "XL": 1.75, "XXL": 1.65, "2B": 1.65, "3B": 1.65}),
    ),
    epochs=300, warmup_epochs=1)
"""Warm-up: 1 epoch per stage as the authors' code does (the paper's text says 5)."""

LLAMAGEN = Recipe(
    "llamagen", "The NTP baseline as LlamaGen trained it: next-token prediction at a constant LR, 300 epochs.",
    _COMMON + (
        Setting("batch_size", 256, "LlamaGen (docs/method.md §3; 2B and 3B: ours, as XXL)",
                per_preset={"XXL": 512, "2B": 512, "3B": 512}),
        Setting("schedule.levels", 1, "next-token prediction"),
        Setting("schedule.lr", 1e-4, "LlamaGen (docs/method.md §3; 2B and 3B: ours, as XXL)",
                per_preset={"XL": 2e-4, "XXL": 2e-4, "2B": 2e-4, "3B": 2e-4}),
        Setting("schedule.warmup_steps", 0, f"{LLAMAGEN_CODE}: no warm-up"),
        Setting("schedule.decay_fraction", 0.0, f"{LLAMAGEN_CODE} has no scheduler: the LR stays at its peak"),
        Setting("eval_sampler.cfg_scale", 2.0, "paper Table 1, LlamaGen rows (2B, 3B: ours, as XXL)",
                per_preset={"L": 1.75, "XL": 1.75, "XXL": 1.65, "2B": 1.65, "3B": 1.65}),
    ),
    epochs=300)

QUICKSTART = Recipe(
    "quickstart", "The CPU recipe of make quickstart: a 1.87M-parameter tiny GPT, 1,200 steps of 32 images.",
    (
        Setting("model_overrides", {}, "ours: sized for 2 CPU cores",
                per_preset={"tiny": {"n_layer": 4, "n_head": 4, "dim": 192, "token_dropout": 0.0, "resid_dropout": 0.0,
                                     "ffn_dropout": 0.0}}),
        Setting("batch_size", 32, "ours"),
        Setting("schedule.total_steps", 1200, "ours: about 9 minutes for the pair on 2 cores"),
        Setting("schedule.levels", 2, "paper §4 (#L 2)"),
        Setting("schedule.segment_factor", 0.5, "paper §4 (λ ½)"),
        Setting("schedule.lr", 2e-3, "ours: a small model on a short schedule takes a larger LR"),
        Setting("schedule.end_lr", 1e-4, "ours"),
        Setting("schedule.warmup_steps", 60, "ours: 5% of the run, every stage"),
        Setting("schedule.decay_fraction", 0.3, "ours"),
        Setting("num_workers", 1, "ours: one of the two cores decodes"),
        Setting("log_every", 10, "ours"),
        Setting("ckpt_every", 300, "ours"),
        Setting("eval_every", None, "ours: FID curves in the notebooks, at steps 300, 600, 900 and 1,200 (and every "
                "stage end); on the embedded data only", per_preset={"tiny": 300}, embedded_data_only=True),
        Setting("eval_samples", None, "ours: a quick estimate (~6 s an evaluation on one core); `npp evaluate` "
                "gives the final numbers", per_preset={"tiny": 300}, embedded_data_only=True),
    ))

RECIPES = {recipe.name: recipe for recipe in (PAPER, LLAMAGEN, QUICKSTART)}


def recipe_for(name: str, preset: str) -> Recipe:
    """The recipe called `name`; "auto" is quickstart for the debug and tiny presets, paper otherwise."""
    if name == "auto":
        name = "quickstart" if preset in SMALL_PRESETS else "paper"
    check(name in RECIPES, f"unknown recipe {name!r}: choose one of auto, {', '.join(RECIPES)} (or none)")
    return RECIPES[name]


def resolve(given: dict[str, Any], recipe: str = "auto", *, data_size: int | None = None) -> TrainConfig:
    """The run config of a recipe with the values given on top (a config file's fields and flags, nested as
    TrainConfig.from_dict takes them); model_overrides are merged field by field. Lengths in epochs become
    steps with the data set's size (npp.plan.plan_run reads it from the data) and the batch that wins.
    recipe "none" takes TrainConfig's own defaults for what is not given."""
    if recipe == "none":
        return TrainConfig.from_dict(given)
    preset = given.get("model", TrainConfig().model)
    chosen = recipe_for(recipe, preset)
    check(data_size is not None or not (chosen.epochs or chosen.warmup_epochs),
          f"recipe {chosen.name!r} gives lengths in epochs: resolve it with npp.plan.plan_run, which reads the "
          f"data set's size")
    base = chosen.values(preset, data_size=data_size or 0, batch_size=given.get("batch_size"),
                         embedded_data=given.get("data", TrainConfig().data) in EMBEDDED_TOKENIZERS)
    values = overlay(TrainConfig, base, given)
    values["model_overrides"] = {**base.get("model_overrides", {}), **given.get("model_overrides", {})}
    return TrainConfig.from_dict(values)


# ------------------------------------------------------------------------------------------------
# The documentation table
# ------------------------------------------------------------------------------------------------

def _shown(value: Any) -> str:
    if isinstance(value, float) and value and (value < 1e-2 or value >= 1e4):
        return f"{value:.0e}".replace("e-0", "e-")
    return str(value).replace("'", "") if not isinstance(value, bool) else str(value).lower()


def markdown() -> str:
    """docs/recipes.md: every value of every recipe with its source."""
    lines = ["# Training recipes", "",
             "Written by `python -m npp.recipes > docs/recipes.md` from `npp/recipes.py`; "
             "tests/test_recipes.py checks that the two agree. `npp train --recipe NAME` and the train "
             "notebook's `recipe` parameter select one; flags and notebook parameters override single values. "
             "Lengths in epochs become steps with the data set's size and the global batch "
             "(ImageNet-1k's 1,281,167 images at batch 256: 5,005 steps per epoch).", ""]
    for recipe in RECIPES.values():
        lines += [f"## {recipe.name}", "", recipe.description, "",
                  "| setting | value | per preset | source |", "|---|---|---|---|"]
        if recipe.epochs:
            lines.append(f"| length | {recipe.epochs:g} epochs | | paper appendix; {PAPER_CODE} --epochs |")
        if recipe.warmup_epochs:
            lines.append(f"| schedule.warmup_steps | {recipe.warmup_epochs:g} epoch per stage | | {PAPER_CODE} "
                         f"(the paper says 5 epochs; we follow the code) |")
        for s in recipe.settings:
            per = ", ".join(f"{p}: {_shown(v)}" for p, v in s.per_preset.items())
            lines.append(f"| {s.field} | {'—' if s.value is None else _shown(s.value)} | {per} | {s.source} |")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.stdout.write(markdown())
