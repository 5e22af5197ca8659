"""The evaluation a training run makes every `eval_every` steps and at each stage end (FID, IS, precision/recall).

Built once, before the engine exists, so a missing reference or weights file fails at once rather than at the
first evaluation; then called with the model at a step. Neighbours: npp.evaluate (QuickEval: the sampling and
the metrics), npp.trainlog (the row it becomes in metrics.jsonl).
"""

from __future__ import annotations

import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch

from npp.config import ModelConfig, TrainConfig
from npp.distributed import ZeroStage
from npp.runs import RunDir
from npp.tokenref import TokenizerRef


@dataclass(frozen=True)
class Evaluation:
    """One periodic evaluation's outcome, as the metrics row records it."""

    metrics: dict[str, float]
    seconds: float
    grid: Path  # the PNG of the first samples, under the run's samples/


class PeriodicEval:
    """Samples the model on rank 0 while the other ranks wait. Sampling draws from its own generators and
    leaves the training RNG alone, so a run with evaluations trains the same."""

    def __init__(self, config: TrainConfig, tokenizer: TokenizerRef, model: ModelConfig, run: RunDir, *,
                 rank: int, device: torch.device, zero: ZeroStage):
        from npp.evaluate import EvalConfig, QuickEval

        settings = EvalConfig(num_samples=config.eval_samples, batch_size=min(config.eval_samples, 100),
                              sampler=config.eval_sampler, reference=config.eval_reference,
                              inception_weights=config.eval_inception_weights or None,
                              metrics=("fid", "isc", "prc"), save_png=False, progress=False)
        vq = tokenizer.load(where=f"TrainConfig.data={config.data!r}")
        self.quick_eval = QuickEval(settings, vq.to(device).eval(), tokenizer.on_embedded_data, model.grid)
        self.run, self.rank, self.zero = run, rank, zero
        # Labels are balanced (sample i asks for class i mod C): with C ≤ 10 columns, one class each.
        self.columns = min(model.num_classes, 10)

    def __call__(self, module: torch.nn.Module, step: int) -> Evaluation | None:
        """Evaluate `module` (the engine's, on every rank) as it is at `step`; the outcome on rank 0, else None."""
        import deepspeed

        from npp.images import image_grid, save_png

        # ZeRO-3 holds a shard of every weight per rank: gather them for the duration of the sampling.
        gathered = deepspeed.zero.GatheredParameters(list(module.parameters())) if self.zero == ZeroStage.WEIGHTS \
            else nullcontext()
        outcome = None
        with gathered:
            if self.rank == 0:
                started = time.perf_counter()
                metrics, images, _ = self.quick_eval(module)
                grid = save_png(image_grid(images[: 8 * self.columns], nrow=self.columns),
                                self.run.samples / f"{RunDir.tag(step)}.png")
                outcome = Evaluation(metrics, time.perf_counter() - started, grid)
        torch.distributed.barrier()
        return outcome
