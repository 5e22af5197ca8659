"""What a training run reports (rank 0 only): metrics.jsonl rows, TensorBoard, wandb, a progress bar.

The trainer owns the numbers (step, loss, tokens and FLOPs seen); this class only writes them where
people and tools read them.
"""

from __future__ import annotations

import time
from pathlib import Path
from npp.config import TrainConfig
from npp.errors import require
from npp.runs import RunDir
from npp.schedule import Stage


class MetricsLogger:
    def __init__(self, config: TrainConfig, run: RunDir, start_step: int):
        self.config, self.run = config, run
        self.tb = None
        if config.tensorboard:
            writer = require("torch.utils.tensorboard", "TensorBoard logging (or --tensorboard false)")
            self.tb = writer.SummaryWriter(str(run.tensorboard), purge_step=start_step)
        self.wandb = None
        if config.wandb_project:
            wandb = require("wandb", "--wandb-project")
            self.wandb = wandb.init(project=config.wandb_project, name=config.name, config=config.to_dict(),
                                    resume="allow")
        self.bar = None
        if config.progress:
            tqdm = require("tqdm.auto", "the progress bar (or --progress false)").tqdm
            self.bar = tqdm(total=config.schedule.total_steps, initial=start_step, unit="step", dynamic_ncols=True)

    def steps(self, done: int, stage: Stage, loss: float, lr: float, tokens_seen: int, flops_seen: float, *,
              steps: int, seconds: float, peak_memory: int | None = None) -> None:
        """The row of step `done` (steps counted when finished), with the speed of the `steps` steps since the
        last row, which took `seconds` (data loading included), and on a GPU the peak memory so far."""
        imgs_per_s = self.config.batch_size * steps / seconds
        row = {"step": done, "stage": stage.index, "patch_size": stage.patch_size, "loss": loss, "lr": lr,
               "tokens_seen": tokens_seen, "flops_seen": flops_seen, "imgs_per_s": imgs_per_s, "time": time.time(),
               "threads": self.config.threads}
        if peak_memory is not None:
            row["peak_memory_gib"] = peak_memory / 2**30
        self.run.append_metrics([row])
        if self.tb is not None:
            for key in ("loss", "lr", "imgs_per_s", "patch_size"):
                self.tb.add_scalar(f"train/{key}", row[key], done)
            self.tb.add_scalar("train/loss_vs_gflops", loss, int(flops_seen / 1e9))
        if self.wandb is not None:
            self.wandb.log(row, step=done)
        if self.bar is not None:
            self.bar.set_postfix_str(f"stage {stage.index} ({stage.patch_size}×{stage.patch_size}) "
                                     f"loss {loss:.4f} {imgs_per_s:.0f} img/s", refresh=False)

    def advance(self, steps: int) -> None:
        if self.bar is not None:
            self.bar.update(steps)

    def evaluation(self, step: int, stage: Stage, metrics: dict[str, float], tokens_seen: int, flops_seen: float,
                   seconds: float, grid: Path) -> None:
        """An eval row: the metrics with the step's stage, tokens and FLOPs, for FID-vs-step/FLOPs curves."""
        c = self.config
        row = {"step": step, "stage": stage.index, "patch_size": stage.patch_size, "eval": True,
               **metrics, "eval_samples": c.eval_samples, "eval_sampler": c.eval_sampler.to_dict(),
               "tokens_seen": tokens_seen, "flops_seen": flops_seen, "eval_seconds": seconds,
               "samples": str(grid.relative_to(self.run.path)), "time": time.time()}
        self.run.append_metrics([row])
        if self.tb is not None:
            for key, value in metrics.items():
                self.tb.add_scalar(f"eval/{key}", value, step)
        if self.wandb is not None:
            self.wandb.log({f"eval/{k}": v for k, v in metrics.items()}, step=step)
        self.say(f"step {step}: " + ", ".join(f"{k} {v:.3g}" for k, v in metrics.items()
                                              if k in ("fid", "is", "class_accuracy"))
                 + f" ({c.eval_samples} samples, {seconds:.0f} s) -> {grid}")

    def say(self, text: str) -> None:
        """A line that does not break the progress bar."""
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(text, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()

