"""`make quickstart`: the whole workbench loop on a laptop CPU, in minutes.

1. The embedded data: the shipped MNIST tokenizer and classifier (npp/assets), and the codes of the
   60,000 training digits, extracted once into the cache ($NPP_CACHE, default ~/.cache/npp).
2. Two runs with the same steps, batch and learning rate, from configs/quickstart-{ntp,npp}.json:
   next-token prediction, and next-patch prediction (#L 2, λ ½: 2×2 patches for the first half).
3. Samples of every digit from each run as a PNG grid, and an evaluation of 1,000 samples each
   (`npp evaluate`): domain FID, IS, precision/recall against the test digits and class accuracy,
   the share of samples that the classifier reads as the digit that was asked for.

Each run is an ordinary `python -m npp.train --config …` process, so what it prints is what a user
of the trainer sees; a finished run is reused, an interrupted one resumes.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

from npp.config import TrainConfig, cache_dir
from npp.evaluate import EvalConfig, evaluate
from npp.images import image_grid, save_png
from npp.model import GPT
from npp.runs import RunDir
from npp.sampling import generate
from npp.tokenizer import VQModel, to_uint8
from npp.tokenizer_train import load_embedded_tokenizer

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
QUICKSTART_RUNS = ("quickstart-ntp", "quickstart-npp")


def sample_digits(model: GPT, vq: VQModel, per_class: int, *, cfg_scale: float = 2.0,
                  seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """per_class samples of each class, decoded: uint8 images (B, H, W, 3) and their labels (B,)."""
    labels_B = torch.arange(model.config.num_classes).repeat_interleave(per_class)
    tokens_BL = generate(model, labels_B, cfg_scale=cfg_scale, generator=torch.Generator().manual_seed(seed))
    grid = model.config.grid
    return to_uint8(vq.decode(tokens_BL.view(-1, grid, grid))), labels_B


def train_run(config_path: Path, runs_dir: str) -> float:
    """Train (or resume, or reuse) one run in its own process; returns the wall time in seconds."""
    started = time.perf_counter()
    command = [sys.executable, "-m", "npp.train", "--config", str(config_path), "--runs_dir", runs_dir]
    print("$ python " + " ".join(command[1:]), flush=True)
    subprocess.run(command, check=True)
    return time.perf_counter() - started


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="npp quickstart", description=__doc__.splitlines()[0])
    parser.add_argument("--runs-dir", default="runs", help="where the two run directories go")
    parser.add_argument("--per-class", type=int, default=10, help="samples of each digit in the grid")
    parser.add_argument("--eval-samples", type=int, default=1000, help="samples per run for npp evaluate")
    args = parser.parse_args(argv)

    print(f"1/3 embedded data: shipped tokenizer mnist-8x8 and classifier; codes cached in {cache_dir()}",
          flush=True)
    vq = load_embedded_tokenizer("mnist-8x8")
    report = []
    print("2/3 training", flush=True)
    for name in QUICKSTART_RUNS:
        path = CONFIGS / f"{name}.json"
        config = TrainConfig.from_dict(json.loads(path.read_text()))
        run = RunDir(Path(args.runs_dir) / config.name)
        if (run.export / "model.safetensors").is_file():
            print(f"{run.path} is already trained: reusing it (delete the folder to train again)")
            seconds = None
        else:
            seconds = train_run(path, args.runs_dir)
        report.append((name, run, seconds))

    print(f"3/3 a grid of every digit per run, and {args.eval_samples} samples each for npp evaluate "
          f"(domain metrics: MNIST classifier features, not comparable to ImageNet FID)", flush=True)
    for name, run, seconds in report:
        model = GPT.from_pretrained(run.export)
        images, _ = sample_digits(model, vq, args.per_class)
        grid = save_png(image_grid(images, nrow=args.per_class), run.samples / "quickstart.png")
        results = evaluate(run.path, EvalConfig(num_samples=args.eval_samples, cfg_scale=2.0, progress=False))
        m, rows = results["metrics"], run.train_rows()
        took = "" if seconds is None else f" in {seconds / 60:.1f} min"
        print(f"  {name}: {rows[-1]['flops_seen'] / 1e12:.1f} TFLOP{took}, final loss {rows[-1]['loss']:.3f}; "
              f"FID {m['fid']:.1f}, IS {m['is']:.2f}, precision {m['precision']:.2f}, recall {m['recall']:.2f}; "
              f"{m['class_accuracy']:.0%} show the requested digit\n      grid: {grid}\n"
              f"      results: {results['results']}", flush=True)

    print("\nnext:\n"
          "  tensorboard --logdir runs               loss, LR and throughput of both runs by step\n"
          "  npp.GPT.from_pretrained('runs/quickstart-npp/export')   the trained weights, for npp.generate\n"
          "  npp evaluate runs/quickstart-npp --num-samples 10000   a closer FID estimate\n"
          "  npp train --config configs/quickstart-npp.json --name npp-l3 --schedule.levels 3   another schedule")
    return 0


if __name__ == "__main__":
    sys.exit(main())
