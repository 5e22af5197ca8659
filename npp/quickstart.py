"""`make quickstart`: the whole workbench loop on a laptop CPU, in minutes.

1. The embedded data: the shipped MNIST tokenizer and classifier (npp/assets), and the codes of the
   60,000 training digits, extracted once into the cache ($NPP_CACHE, default ~/.cache/npp).
2. Two runs of the `quickstart` recipe (npp.recipes, shipped in the package), the same steps, batch
   and learning rate: next-token prediction, and next-patch prediction (#L 2, λ ½: 2×2 patches for
   the first half).
3. Samples of every digit from each run as a PNG grid, and an evaluation of 1,000 samples each
   (`npp evaluate`): domain FID, IS, precision/recall against the test digits and class accuracy,
   the share of samples that the classifier reads as the digit that was asked for.

Each run is an ordinary training process (npp.runs.launch), so what it prints is what a user of the
trainer sees; a finished run is reused, an interrupted one resumes.
"""

from __future__ import annotations

import sys
import time

import torch

from npp.config import PAPER_SAMPLER, TrainConfig, cache_dir
from npp.errors import ConfigError, TrainingError, check
from npp.evaluate import EvalConfig, evaluate
from npp.flags import Parser, parse_int, run_command
from npp.images import image_grid, save_png
from npp.pipeline import Pipeline
from npp.recipes import resolve
from npp.runs import RunDir, check_run_folder, launch

QUICKSTART_RUNS = ("quickstart-ntp", "quickstart-npp")


def quickstart_config(name: str, runs_dir: str = "runs") -> TrainConfig:
    """One of the quickstart pair: the quickstart recipe on the tiny preset and the embedded 8×8 data,
    next-token prediction (quickstart-ntp) or #L 2 λ ½ (quickstart-npp)."""
    levels = {"quickstart-ntp": 1, "quickstart-npp": 2}[name]
    return resolve({"name": name, "runs_dir": runs_dir, "model": "tiny", "data": "mnist-8x8",
                    "schedule": {"levels": levels}}, "quickstart")


def digit_grid(pipe: Pipeline, per_class: int, seed: int = 0) -> torch.Tensor:
    """per_class samples of each class, class by class, with the paper's sampler: uint8 (B, H, W, 3)."""
    labels_B = torch.arange(pipe.model.config.num_classes).repeat_interleave(per_class)
    return pipe(labels_B, PAPER_SAMPLER, generator=torch.Generator().manual_seed(seed))


PROG = "npp quickstart"


def build_parser() -> Parser:
    parser = Parser(prog=PROG, description=__doc__.splitlines()[0])
    parser.add_argument("--runs-dir", default="runs", help="where the two run directories go")
    parser.add_argument("--per-class", type=parse_int, default=10, help="samples of each digit in the grid")
    parser.add_argument("--eval-samples", type=parse_int, default=1000, help="samples per run for npp evaluate")
    return parser


def preflight(per_class: int, eval_samples: int, configs: list[TrainConfig]) -> EvalConfig:
    """Everything the quickstart can refuse, checked before the first of its minutes of training: its own
    options, the evaluation settings they make, and the run folders. Returns the evaluation settings."""
    check(per_class >= 1, f"--per-class {per_class}: give a whole number ≥ 1 (samples of each digit in the grid)")
    try:
        settings = EvalConfig(num_samples=eval_samples, progress=False)
    except ConfigError as err:  # its own check of the count, said with the flag's name
        raise ConfigError(f"--eval-samples {eval_samples}: {err}") from None
    for config in configs:
        check_run_folder(config)
    return settings


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_command(PROG, lambda: quickstart(args.runs_dir, args.per_class, args.eval_samples))


def quickstart(runs_dir: str, per_class: int, eval_samples: int) -> int:
    """The three steps of the module docstring; every refusal comes before the training."""
    configs = [quickstart_config(name, runs_dir) for name in QUICKSTART_RUNS]
    settings = preflight(per_class, eval_samples, configs)
    print(f"1/3 embedded data: shipped tokenizer mnist-8x8 and classifier; codes cached in {cache_dir()}",
          flush=True)
    report = []
    print("2/3 training", flush=True)
    for config in configs:
        name, run = config.name, RunDir(config.run_dir)
        seconds = None
        if run.is_finished(config):
            print(f"{run.path} is already trained: reusing it (delete the folder to train again)")
        else:
            started = time.perf_counter()
            if launch(config):
                raise TrainingError(f"training {run.path} failed: the lines above say why")
            seconds = time.perf_counter() - started
        report.append((name, run, seconds))

    print(f"3/3 a grid of every digit per run, and {eval_samples} samples each for npp evaluate "
          f"(domain metrics: MNIST classifier features, not comparable to ImageNet FID)", flush=True)
    for name, run, seconds in report:
        grid = save_png(image_grid(digit_grid(Pipeline.from_run(run.path), per_class), nrow=per_class),
                        run.samples / "quickstart.png")
        results = evaluate(run.path, settings)
        m, rows = results["metrics"], run.train_rows()
        took = "" if seconds is None else f" in {seconds / 60:.1f} min"
        print(f"  {name}: {rows[-1]['flops_seen'] / 1e12:.1f} TFLOP{took}, final loss {rows[-1]['loss']:.3f}; "
              f"FID {m['fid']:.1f}, IS {m['is']:.2f}, precision {m['precision']:.2f}, recall {m['recall']:.2f}; "
              f"{m['class_accuracy']:.0%} show the requested digit\n      grid: {grid}\n"
              f"      results: {results['results']}", flush=True)

    print("\nnext:\n"
          "  tensorboard --logdir runs               loss, LR and throughput of both runs by step\n"
          "  npp.Pipeline.from_run('runs/quickstart-npp')   the trained model and its tokenizer, one call\n"
          "  npp evaluate runs/quickstart-npp --num-samples 10000   a closer FID estimate\n"
          "  npp train --recipe quickstart --name npp-l3 --schedule.levels 3   another schedule on the same recipe")
    return 0


if __name__ == "__main__":
    sys.exit(main())
