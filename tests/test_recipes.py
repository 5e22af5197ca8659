"""Training recipes: what `--recipe` selects, that epochs become steps, and that the docs table is the code."""

from pathlib import Path

import pytest

import npp
from npp.recipes import PAPER, RECIPES, markdown, recipe_for

ROOT = Path(__file__).resolve().parents[1]
IMAGENET = 1_281_167


def test_docs_recipes_md_is_written_from_the_code():
    assert (ROOT / "docs" / "recipes.md").read_text() == markdown()


@pytest.mark.parametrize("preset,cfg", [("B", 2.0), ("L", 1.75), ("XL", 1.75), ("XXL", 1.65), ("2B", 1.65)])
def test_the_paper_recipe_per_preset(preset, cfg):
    config = npp.TrainConfig.from_dict(PAPER.values(preset, data_size=IMAGENET))
    steps_per_epoch = IMAGENET / 256
    assert config.schedule.total_steps == round(300 * steps_per_epoch)  # 300 epochs at batch 256
    assert config.schedule.warmup_steps == round(steps_per_epoch)       # 1 epoch per stage, as the code does
    s = config.schedule
    assert (s.levels, s.segment_factor, s.lr, s.end_lr, s.decay_fraction) == (2, 0.5, 1e-4, 1e-5, 0.2)
    assert s.warmup_every_stage and s.decay_every_stage
    assert (config.batch_size, config.betas, config.weight_decay, config.grad_clip) == (256, (0.9, 0.95), 0.05, 1.0)
    assert config.model_overrides == {"token_dropout": 0.1, "resid_dropout": 0.1, "ffn_dropout": 0.1,
                                      "attn_dropout": 0.0, "class_dropout": 0.1}
    assert config.ema_decay == 0.0 and config.eval_sampler.cfg_scale == cfg and config.recipe == "paper"


def test_the_llamagen_recipe_is_ntp_at_a_constant_lr():
    config = npp.TrainConfig.from_dict(RECIPES["llamagen"].values("XXL", data_size=IMAGENET))
    assert config.schedule.levels == 1 and config.batch_size == 512 and config.schedule.lr == 2e-4
    stages = npp.plan_stages(config.schedule)
    lrs = {npp.lr_at(config.schedule, stages, step) for step in (0, 1, config.schedule.total_steps - 1)}
    assert lrs == {2e-4}


def test_auto_is_quickstart_for_small_presets_and_paper_otherwise():
    assert recipe_for("auto", "tiny").name == "quickstart" and recipe_for("auto", "debug").name == "quickstart"
    assert recipe_for("auto", "B").name == "paper" and recipe_for("auto", "XXL").name == "paper"
    with pytest.raises(npp.ConfigError, match="unknown recipe 'papr'"):
        recipe_for("papr", "B")


def test_a_given_batch_size_keeps_the_length_in_epochs():
    values = PAPER.values("L", data_size=10_000, batch_size=100)
    assert values["schedule"]["total_steps"] == 300 * 100 and values["schedule"]["warmup_steps"] == 100


def test_every_stage_warms_up_from_zero_at_a_switch_under_the_paper_recipe():
    config = npp.TrainConfig.from_dict(PAPER.values("B", data_size=2560))  # 10 steps per epoch, 3000 steps
    stages = npp.plan_stages(config.schedule)
    switch = stages[1].start
    lr = [npp.lr_at(config.schedule, stages, step) for step in range(switch - 2, switch + 3)]
    assert lr[1] == pytest.approx(1e-5)                      # the 2×2 stage has decayed to end_lr
    assert lr[2] == pytest.approx(1e-4 / 10)                 # the NTP stage starts its warm-up from 0
    assert lr[2] < lr[3] < lr[4] <= 1e-4


@pytest.mark.parametrize("argv,recipe,steps", [
    (["--model", "tiny"], "quickstart", 1200),
    (["--model", "B"], "paper", round(300 * 60_000 / 256)),
    (["--model", "B", "--recipe", "llamagen"], "llamagen", round(300 * 60_000 / 256)),
    (["--model", "B", "--batch-size", "128"], "paper", round(300 * 60_000 / 128)),
    (["--model", "XXL", "--schedule.total-steps", "100"], "paper", 100),
])
def test_npp_train_picks_the_recipe_by_preset_and_flags_win(argv, recipe, steps):
    from npp.train import build_parser, plan_from_args

    config = plan_from_args(build_parser().parse_args(["--name", "r", *argv])).config  # the embedded 60,000 digits
    assert config.recipe == recipe and config.schedule.total_steps == steps


def test_the_preflight_accepts_the_quickstart():
    from npp.plan import RunPlan
    from npp.preflight import check_run
    from npp.quickstart import QUICKSTART_RUNS, quickstart_config

    for name in QUICKSTART_RUNS:
        assert check_run(RunPlan.of(quickstart_config(name), world=1, device="cpu")).peak < 2**30  # under a GiB
