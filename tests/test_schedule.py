import pytest

import npp
from npp.schedule import lr_at, plan_stages, relative_cost, stage_at


@pytest.mark.parametrize("levels,lam,expected", [
    (2, 1 / 2, 0.625), (3, 1 / 2, 0.578), (2, 2 / 3, 0.5), (2, 3 / 4, 0.43), (2, 4 / 5, 0.4),
])
def test_paper_table3_costs(levels, lam, expected):
    cost = relative_cost(npp.ScheduleConfig(total_steps=3_000_000, levels=levels, segment_factor=lam))
    assert cost == pytest.approx(expected, abs=0.008)


def test_flop_cost_includes_attention():
    # docs/method.md §3: with the attention term the FLOP ratio of #L 2, λ ½ is about 0.62 for GPT-B.
    cost = relative_cost(npp.ScheduleConfig(total_steps=1000), npp.ModelConfig.preset("B"))
    assert 0.6 < cost < 0.625


@pytest.mark.parametrize("levels,sides,ends", [
    (1, [1], [1000]),
    (2, [2, 1], [500, 1000]),
    (3, [4, 2, 1], [250, 500, 1000]),
    (4, [8, 4, 2, 1], [125, 250, 500, 1000]),
])
def test_stage_plan(levels, sides, ends):
    stages = plan_stages(npp.ScheduleConfig(total_steps=1000, levels=levels), grid=16)
    assert [s.patch_size for s in stages] == sides
    assert [s.end for s in stages] == ends
    assert stages[0].start == 0 and all(a.end == b.start for a, b in zip(stages, stages[1:]))
    assert stage_at(stages, 999).patch_size == 1 and stage_at(stages, 0).patch_size == sides[0]


def test_lr_warms_up_holds_and_decays_in_every_stage():
    cfg = npp.ScheduleConfig(total_steps=200, levels=2, lr=1e-3, end_lr=1e-5, warmup_steps=10,
                             decay_fraction=0.2)
    stages = plan_stages(cfg)
    lrs = [lr_at(cfg, stages, s) for s in range(200)]
    for start in (0, 100):  # each stage restarts the warm-up from zero
        assert lrs[start] == pytest.approx(1e-4)
        assert lrs[start + 9] == pytest.approx(1e-3)
        assert all(a < b for a, b in zip(lrs[start:start + 10], lrs[start + 1:start + 10]))
        assert lrs[start + 50] == 1e-3
        assert lrs[start + 80] < 1e-3 and lrs[start + 99] == pytest.approx(1e-5)
    assert lrs[79] == 1e-3 and lrs[80] == pytest.approx(1e-3 - (1e-3 - 1e-5) / 20)


@pytest.mark.parametrize("warmup_every_stage,decay_every_stage", [(False, True), (True, False), (False, False)])
def test_the_lr_restart_at_a_stage_switch_can_be_turned_off(warmup_every_stage, decay_every_stage):
    cfg = npp.ScheduleConfig(total_steps=200, levels=2, lr=1e-3, end_lr=1e-5, warmup_steps=10,
                             decay_fraction=0.2, warmup_every_stage=warmup_every_stage,
                             decay_every_stage=decay_every_stage)
    lrs = [lr_at(cfg, plan_stages(cfg), s) for s in range(200)]
    assert lrs[0] == pytest.approx(1e-4) and lrs[199] == pytest.approx(1e-5)  # the run's ends never change
    assert (lrs[99] == pytest.approx(1e-5)) == decay_every_stage
    assert (lrs[99] == 1e-3) == (not decay_every_stage)
    assert (lrs[100] == pytest.approx(1e-4)) == warmup_every_stage
    assert (lrs[100] == 1e-3) == (not warmup_every_stage)


@pytest.mark.parametrize("kwargs,message", [
    ({"segment_factor": 1.5}, "λ must lie in"),
    ({"segment_factor": 0.0}, "λ must lie in"),
    ({"levels": 0}, "levels"),
    ({"total_steps": 0}, "total_steps"),
    ({"end_lr": 1.0}, "end_lr"),
    ({"stage_patch_sizes": [4, 2, 1]}, "has 3 entries but levels=2"),
    ({"stage_patch_sizes": [3, 1]}, "powers of two"),
])
def test_bad_schedules_are_named(kwargs, message):
    with pytest.raises(npp.ConfigError, match=message):
        npp.ScheduleConfig(**kwargs)


def test_empty_stage_and_untileable_grid_are_named():
    with pytest.raises(npp.ConfigError, match="would have no steps"):
        plan_stages(npp.ScheduleConfig(total_steps=4, levels=4))
    with pytest.raises(npp.ConfigError, match="do not tile the 8×8"):
        plan_stages(npp.ScheduleConfig(total_steps=1000, levels=5), grid=8)
