"""The coarse-to-fine stage plan, the learning rate in each stage, and the cost of a schedule.

With #L levels and segment factor λ, stage sides are 2^(L-1), …, 2, 1 and cumulative stage ends are
T·λ^i for i = L-1 … 0, so the final stage is plain next-token prediction ending at T (docs/method.md §3).
Every stage warms up from 0, holds the peak LR, then decays linearly to end_lr over its last
decay_fraction (the paper; warmup_every_stage / decay_every_stage turn the restart off for ablations).
The LR is a pure function of the global step, so resuming needs only the step.
"""

from __future__ import annotations

from dataclasses import dataclass

from npp.config import ConfigError, ModelConfig, ScheduleConfig, tiles


@dataclass(frozen=True)
class Stage:
    index: int
    patch_size: int
    start: int
    """First global step of the stage (inclusive)."""
    end: int
    """Global step at which the next stage begins (exclusive)."""

    @property
    def steps(self) -> int:
        return self.end - self.start


def plan_stages(schedule: ScheduleConfig, grid: int | None = None) -> list[Stage]:
    """Stages of a run, coarse to fine, covering steps [0, total_steps) without gaps.

    Raises ConfigError when a stage would be empty or a patch side does not tile the grid.
    """
    T, levels, lam = schedule.total_steps, schedule.levels, schedule.segment_factor
    ends = [round(T * lam**i) for i in range(levels - 1, 0, -1)] + [T]
    sides = schedule.patch_sizes
    stages, start = [], 0
    for index, (side, end) in enumerate(zip(sides, ends)):
        if end <= start:
            raise ConfigError(
                f"stage {index} ({side}×{side} patches) would have no steps with total_steps={T}, "
                f"levels={levels}, segment_factor={lam}: raise total_steps or lower levels")
        if grid is not None and not tiles(side, grid):
            raise ConfigError(f"ScheduleConfig: {side}×{side} patches do not tile the {grid}×{grid} "
                              f"token grid: lower levels to at most {grid.bit_length()}")
        stages.append(Stage(index, side, start, end))
        start = end
    return stages


def stage_at(stages: list[Stage], step: int) -> Stage:
    """The stage that contains a global step (the last one for steps past the end)."""
    for stage in stages:
        if step < stage.end:
            return stage
    return stages[-1]


def lr_at(schedule: ScheduleConfig, stages: list[Stage], step: int) -> float:
    """Learning rate for the optimizer step with this global index (0-based)."""
    stage = stage_at(stages, step)
    t = step - stage.start
    first, last = stage.index == 0, stage.index == len(stages) - 1
    warmup = min(schedule.warmup_steps, stage.steps) if first or schedule.warmup_every_stage else 0
    if t < warmup:
        return schedule.lr * (t + 1) / warmup
    decay = round(schedule.decay_fraction * stage.steps) if last or schedule.decay_every_stage else 0
    decay_start = stage.steps - decay
    if t < decay_start or decay == 0:
        return schedule.lr
    progress = (t - decay_start + 1) / decay
    return schedule.lr + (schedule.end_lr - schedule.lr) * min(progress, 1.0)


def relative_cost(schedule: ScheduleConfig, model: ModelConfig | None = None) -> float:
    """Training cost of the schedule relative to NTP for the same number of steps.

    Without a model: counted in sequence positions (each stage costs 1/p² of NTP per step), which
    gives the paper's Table 3 (0.625 for #L 2, λ ½). With a model: counted in training FLOPs,
    attention's quadratic term included (≈0.62 for GPT-B at #L 2, λ ½).
    """
    stages = plan_stages(schedule, None if model is None else model.grid)
    if model is None:
        weighted = sum(stage.steps / stage.patch_size**2 for stage in stages)
    else:
        weighted = sum(stage.steps * model.flops_per_sample(stage.patch_size) for stage in stages)
        weighted /= model.flops_per_sample(1)
    return weighted / schedule.total_steps

