"""The GPU path, proved in one run: the paper's XXL and 2B runs, MFU, precision, generation speed.

    bash benchmarks/gpu_check.sh                    # on one H100/H200 (≤ 8 minutes, set-up included)
    bash benchmarks/gpu_check.sh --dry-run          # the same steps at toy sizes on the CPU (the test suite)

Five parts, each a real command as a user runs it, its log and figures in --out (report.md sums up):

1. codes: synthetic ImageNet-shaped codes (16×16 grid, 16,384 codes, 1,000 classes) written by npp's
   extraction (a random one-level VQ encodes synthetic images, so no image-sized work is needed).
2. big: XXL and 2B through the train notebook (papermill) with the paper recipe, ZeRO-2 and activation
   checkpointing, for a short run: the preflight's estimate against the measured peak, checkpoints,
   and the 2B run stopped by SIGTERM after its first checkpoint and resumed by the same notebook, then
   exported.
3. mfu: GPT-B and GPT-L through the trainer (benchmarks/train_throughput.py stages), compiled, 2×2
   and NTP steps: images/s and MFU.
4. precision: GPT-B trained twice on the same data and seed, amp-bf16 (the authors': autocast over fp32
   weights) and DeepSpeed's bf16 mode: the loss curves side by side.
5. generate: GPT-B sampling throughput with CFG 2.0 (benchmarks/eval_throughput.py generate).

The dry run uses the debug preset on an 8×8 grid and compares amp-bf16 with fp32 (DeepSpeed's bf16 mode
needs a GPU), so that the script is known to work before a GPU is lent.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from npp.config import VQConfig
from npp.crops import CropConfig
from npp.extract import extract_codes
from npp.plan import RunPlan, plan_run
from npp.preflight import GiB, check_run
from npp.recipes import resolve
from npp.runs import RunDir
from npp.tokenizer import VQModel

from common import SyntheticImages, describe_machine, machine_line

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = Path(__file__).resolve().parent


@dataclass(frozen=True)
class Sizes:
    """How big each part is: the GPU's and the dry run's."""

    grid: int
    vocab: int
    classes: int
    images: int
    big: tuple[str, ...]
    big_steps: int
    big_batch: int
    mfu: tuple[str, ...]
    mfu_batch: int
    mfu_micro: int
    small: str
    curve_steps: int
    curve_batch: int
    precisions: tuple[str, str]
    generate_batch: int
    compile: bool
    """torch.compile the MFU runs (the big runs are too short to repay their compilation)."""


# Sized to finish in about 7 minutes on one H200, set-up included (estimated from docs/benchmarks.md's step
# times: not yet run on a GPU).
GPU = Sizes(grid=16, vocab=16384, classes=1000, images=4096, big=("XXL", "2B"), big_steps=60, big_batch=64,
            mfu=("B", "L"), mfu_batch=256, mfu_micro=128, small="B", curve_steps=200, curve_batch=64,
            precisions=("amp-bf16", "bf16"), generate_batch=256, compile=True)
DRY_RUN = Sizes(grid=8, vocab=64, classes=10, images=64, big=("debug", "debug"), big_steps=12, big_batch=8,
                mfu=("debug",), mfu_batch=8, mfu_micro=8, small="debug", curve_steps=12, curve_batch=8,
                precisions=("amp-bf16", "fp32"), generate_batch=4, compile=False)


def notebook_text(path: Path) -> str:
    """Everything an executed notebook printed (the training processes stream into its cells)."""
    cells = json.loads(path.read_text())["cells"]
    return "".join("".join(output.get("text", "")) for cell in cells for output in cell.get("outputs", []))


class Check:
    """Runs the parts, logs every command, and keeps what the report needs."""

    def __init__(self, out: Path, sizes: Sizes):
        self.out, self.sizes = out, sizes
        self.report: list[str] = []
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1"}

    def command(self, name: str, command: list[str], *, check: bool = True, timeout: int = 1800) -> str:
        """Run a command with its output in <out>/<name>.log; returns the output."""
        started = time.perf_counter()
        result = subprocess.run(command, cwd=ROOT, env=self.env, capture_output=True, text=True, timeout=timeout)
        (self.out / f"{name}.log").write_text(f"$ {' '.join(command)}\n{result.stdout}{result.stderr}")
        print(f"{name}: exit {result.returncode} in {time.perf_counter() - started:.0f} s", flush=True)
        if check and result.returncode:
            raise SystemExit(f"{name} failed (exit {result.returncode}): see {self.out / name}.log\n"
                             f"{result.stderr[-2000:]}")
        return result.stdout + result.stderr

    # ---- 1. codes --------------------------------------------------------------------------

    def codes(self) -> str:
        """ImageNet-shaped codes by the extraction code: a random VQ without downsampling reads images of
        grid × grid pixels, so the codes cost nothing image-sized."""
        s = self.sizes
        folder = self.out / "codes"
        if not (folder / "manifest.json").is_file():
            torch.manual_seed(0)
            vq = VQModel(VQConfig(image_size=s.grid, base_channels=32, ch_mult=(1,), num_res_blocks=1, z_channels=32,
                                  codebook_size=s.vocab, codebook_dim=8))
            # Saved, so that the codes' manifest names it and the notebook can decode its samples.
            vq.save_pretrained(self.out / "tokenizer")
            extract_codes(SyntheticImages(s.images, s.grid, s.grid, s.classes, 0), vq, folder,
                          CropConfig("none", size=s.grid), batch_size=256, progress=False,
                          tokenizer_path=self.out / "tokenizer")
        return str(folder)

    # ---- 2. XXL and 2B through the notebook ----------------------------------------------------

    def notebook_command(self, name: str, preset: str, codes: str, output: str) -> list[str]:
        """`papermill notebooks/train.ipynb` for the paper's run of a preset, shortened to big_steps."""
        s = self.sizes
        parameters = {"name": name, "runs_dir": str(self.out / "runs"), "model": preset, "data": codes,
                      "recipe": "paper", "steps": s.big_steps, "batch_size": s.big_batch, "ntp_baseline": False,
                      "activation_checkpointing": True, "deepspeed_config": "ds_configs/zero2.json",
                      "ckpt_every": s.big_steps // 3, "fid_samples": 0, "progress": False, "torch_compile": "false"}
        flags = [item for key, value in parameters.items() for item in ("-p", key, str(value))]
        return [sys.executable, "-m", "papermill", "notebooks/train.ipynb", str(self.out / output), *flags]

    def big(self, codes: str) -> None:
        rows = ["| model | preflight estimate (GiB) | measured peak (GiB) | steps | stopped and resumed | exported |",
                "|---|---|---|---|---|---|"]
        for index, preset in enumerate(self.sizes.big):
            name = f"{preset.lower()}-{index}"
            run = RunDir(self.out / "runs" / f"{name}-npp")
            resumed = index == 1  # the second model is stopped after its first checkpoint and resumed
            if resumed:
                self.stop_after_first_checkpoint(self.notebook_command(name, preset, codes, f"{name}-stopped.ipynb"), run)
            self.command(f"notebook-{name}", self.notebook_command(name, preset, codes, f"{name}.ipynb"))
            if resumed and "resuming at step" not in notebook_text(self.out / f"{name}.ipynb"):
                raise SystemExit(f"{name}: the second notebook run did not resume (see notebook-{name}.log)")
            config = resolve(json.loads(run.config.read_text()), "none")
            estimate = check_run(RunPlan.of(config, world=1))
            peaks = [row["peak_memory_gib"] for row in run.train_rows() if "peak_memory_gib" in row]
            measured = f"{max(peaks):.1f}" if peaks else "n/a (CPU)"
            rows.append(f"| {preset} | {estimate.peak / GiB:.1f} | {measured} | {run.train_rows()[-1]['step']} | "
                        f"{'yes' if resumed else '—'} | {'yes' if run.exported else 'no'} |")
        self.report += ["## The paper's runs through the train notebook (ZeRO-2, activation checkpointing)", "",
                        *rows, ""]

    def stop_after_first_checkpoint(self, command: list[str], run: RunDir) -> None:
        """Start the notebook, SIGTERM its training process once a checkpoint is complete, and let the
        notebook end (it reports the stop as a failed training)."""
        process = subprocess.Popen(command, cwd=ROOT, env=self.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        spec = run.path.parent / f".{run.path.name}.json"
        deadline = time.time() + 900
        while run.latest_tag() is None and process.poll() is None and time.time() < deadline:
            time.sleep(0.2)
        trainers = subprocess.run(["pgrep", "-f", f"npp.train --config {spec}"], capture_output=True, text=True)
        for pid in trainers.stdout.split():
            os.kill(int(pid), signal.SIGTERM)
        process.wait(timeout=900)
        print(f"{run.path.name}: stopped by SIGTERM at {run.latest_tag()}", flush=True)

    # ---- 3. MFU through the trainer -------------------------------------------------------------

    def mfu(self, codes: str) -> None:
        s = self.sizes
        for preset in s.mfu:
            result = self.out / f"mfu-{preset}.json"
            self.command(f"mfu-{preset}", [sys.executable, str(BENCHMARKS / "train_throughput.py"), "stages",
                                           "--preset", preset, "--data", codes, "--batch", str(s.mfu_batch),
                                           "--micro-batch", str(s.mfu_micro), "--patch-sizes", "2", "1",
                                           "--warmup", "3" if s.compile else "1", "--steps", "10" if s.compile else "2",
                                           *(["--compile"] if s.compile else []), "--json", str(result)])
            table = [line for line in (self.out / f"mfu-{preset}.log").read_text().splitlines() if line.startswith("|")]
            self.report += [f"## GPT-{preset} through the trainer (train_throughput.py stages, batch {s.mfu_batch})", "",
                            *table, ""]

    # ---- 4. precision: the same run in two modes -------------------------------------------

    def precision(self, codes: str) -> None:
        s = self.sizes
        losses = {}
        for precision in s.precisions:
            name = f"precision-{precision}"
            config = plan_run({"name": name, "runs_dir": str(self.out / "runs"), "model": s.small, "data": codes,
                              "batch_size": s.curve_batch, "precision": precision, "log_every": 1,
                              "ckpt_every": s.curve_steps, "compile": False, "progress": False, "tensorboard": False,
                              "num_workers": 2, "schedule": {"total_steps": s.curve_steps}}, "paper").config
            spec = self.out / f"{name}.json"
            spec.write_text(json.dumps(config.to_dict()))
            self.command(name, [sys.executable, "-m", "npp.train", "--config", str(spec), "--no-resume"])
            losses[precision] = [row["loss"] for row in RunDir(config.run_dir).train_rows()]
        a, b = (losses[p] for p in s.precisions)
        gaps = [abs(x - y) / abs(y) for x, y in zip(a, b)]
        (self.out / "precision-losses.json").write_text(json.dumps(losses))
        every = max(1, len(a) // 10)
        rows = [f"| {i + 1} | {a[i]:.5f} | {b[i]:.5f} | {gaps[i]:.1e} |" for i in range(0, len(a), every)]
        self.report += [f"## GPT-{s.small}: {s.precisions[0]} against {s.precisions[1]} (same data, seed and recipe)", "",
                        f"| step | {s.precisions[0]} loss | {s.precisions[1]} loss | relative difference |",
                        "|---|---|---|---|", *rows, "",
                        f"Largest relative difference {max(gaps):.1e}, mean {sum(gaps) / len(gaps):.1e}, last "
                        f"{gaps[-1]:.1e} over {len(a)} steps (precision-losses.json has every step).", ""]

    # ---- 5. generation -------------------------------------------------------------------------

    def generate(self) -> None:
        s = self.sizes
        result = self.out / "generate.json"
        self.command("generate", [sys.executable, str(BENCHMARKS / "eval_throughput.py"), "generate",
                                  "--preset", s.small, "--grid", str(s.grid), "--vocab", str(s.vocab),
                                  "--num-classes", str(s.classes), "--batch", str(s.generate_batch),
                                  "--cfg-scale", "2.0", "--repeats", "2", "--json", str(result)])
        figures = json.loads(result.read_text())
        self.report += [f"## GPT-{s.small} generation with CFG 2.0 (eval_throughput.py generate)", "",
                        f"{figures['samples_per_s']:,.1f} samples/s, {figures['tokens_per_s']:,.0f} tokens/s at batch "
                        f"{figures['batch']} ({s.grid}×{s.grid} tokens, KV cache, the batch doubled by CFG).", ""]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="toy sizes on the CPU (the test suite runs this)")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "gpu-check")),
                        help="folder for the logs, figures and report.md (default: $OUT, else ./gpu-check)")
    parser.add_argument("--parts", nargs="+", default=["big", "mfu", "precision", "generate"],
                        choices=["big", "mfu", "precision", "generate"], help="which parts to run")
    args = parser.parse_args(argv)
    if not args.dry_run and not torch.cuda.is_available():
        parser.error("no GPU: run with --dry-run on the CPU")
    args.out.mkdir(parents=True, exist_ok=True)
    check = Check(args.out.resolve(), DRY_RUN if args.dry_run else GPU)
    started = time.perf_counter()
    codes = check.codes()
    for part in args.parts:
        getattr(check, part)(codes) if part != "generate" else check.generate()
    machine = machine_line(describe_machine(torch.device("cuda" if torch.cuda.is_available() else "cpu")))
    header = [f"# GPU check{' (dry run)' if args.dry_run else ''}", "",
              f"{machine}; `bash benchmarks/gpu_check.sh{' --dry-run' if args.dry_run else ''}`; "
              f"{(time.perf_counter() - started) / 60:.1f} min", ""]
    (args.out / "report.md").write_text("\n".join(header + check.report) + "\n")
    print((args.out / "report.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
