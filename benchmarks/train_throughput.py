"""Speed and memory of the real trainer: per stage, over a whole schedule, and the largest batch.

Everything here goes through `npp.train.Trainer` (the DeepSpeed engine, AdamW with weight-decay
groups, gradient clipping, bf16 on CUDA, the per-step loss all-reduce), so the figures are those
of `npp train`, not of a hand-written loop (benchmarks/step_throughput.py times that one).

Three modes:

    stages     imgs/s, tokens/s, TFLOP/s and model FLOP utilisation (MFU) of every patch level
               (p = 2^k while the coarse grid is at least 2×2, and NTP), by calling
               `Trainer.train_step` at steps that fall in each stage of a many-level schedule.
               Peak memory per stage on CUDA.
    schedule   whole-schedule wall time of an NPP run (#L 2, λ ½ by default) over an NTP run with
               the same steps and batch: both run end to end in a training process of their own, as
               every run is started (`npp.runs.launch`: `python -m npp.train --config ...`), timed by
               their metrics.jsonl rows (one per step), so start-up and the final export are
               excluded; NTP and NPP runs alternate, and each pair gives one ratio.
    fit        the largest micro-batch that fits one GPU: doubling from --min-micro-batch until
               CUDA runs out of memory or --max-micro-batch, a fresh trainer for every size (NTP,
               the stage that needs the most memory), each size that fits timed with its peak memory.

The codes are synthetic: seeded random images of grid×grid pixels (benchmarks/common.py) encoded by
`npp.extract` with a random one-level VQ tokenizer of codebook --vocab (so the folder is a genuine
`npp extract` folder with a manifest), labels cycling over --num-classes. Speed depends on shapes,
not on the codes.
FLOPs are the model's own count (`ModelConfig.flops_per_sample(p)`: 6·N_matmul·S + 12·n_layer·dim·S²,
docs/method.md §9); recomputation under activation checkpointing is not counted, as is usual for MFU.

Usage (from the repository root, npp importable: installed, or PYTHONPATH=.):

    # CPU, tiny model: per-stage throughput, then NPP/NTP wall time of a whole schedule
    python benchmarks/train_throughput.py stages --preset tiny --grid 16 --vocab 256 --num-classes 10 --batch 16
    python benchmarks/train_throughput.py schedule --preset tiny --grid 16 --vocab 256 --num-classes 10 \\
        --batch 16 --total-steps 40 --repeats 3

    # one GPU: GPT-L bf16 per stage at batch 256, compiled; the largest XXL micro-batch under ZeRO-2
    python benchmarks/train_throughput.py stages --preset L --grid 16 --vocab 16384 --num-classes 1000 \\
        --batch 256 --compile --warmup 5
    python benchmarks/train_throughput.py fit --preset XXL --grid 16 --vocab 16384 --num-classes 1000 \\
        --deepspeed ds_configs/zero2.json --activation-checkpointing

    # several GPUs: the same script under the DeepSpeed launcher (a folder all ranks share)
    deepspeed --num_gpus 8 benchmarks/train_throughput.py stages --preset L --batch 2048 \\
        --deepspeed ds_configs/zero2.json --workdir /tmp/npp-bench

Record the figures in docs/benchmarks.md with the machine, the date and the exact command.
"""

from __future__ import annotations

import argparse
import gc
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

import npp
from npp.batches import micro_batches, open_data
from npp.config import MODEL_PRESETS, ModelConfig, ScheduleConfig, TrainConfig, VQConfig
from npp.crops import CropConfig
from npp.distributed import is_rank0
from npp.extract import extract_codes
from npp.runs import RunDir, launch
from npp.schedule import plan_stages, relative_cost

from common import (SyntheticImages, add_mfu, command_line, compare_with_ntp, describe_machine, levels_table,
                    machine_line, markdown_table, patch_sides, peak_memory, reset_peak_memory, step_figures,
                    write_result)

MODES = ("stages", "schedule", "fit")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Throughput and memory of npp.train.Trainer: per stage, whole schedule, largest batch.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("mode", choices=MODES, help="what to measure (see the module docstring)")
    model = parser.add_argument_group("model and data")
    model.add_argument("--preset", default="tiny", choices=list(MODEL_PRESETS), help="model preset")
    model.add_argument("--grid", type=int, default=16, help="side of the token grid (ImageNet VQ-16: 16)")
    model.add_argument("--vocab", type=int, default=256, help="codebook size (LlamaGen VQ-16: 16384)")
    model.add_argument("--num-classes", type=int, default=10, help="class labels (ImageNet: 1000)")
    model.add_argument("--images", type=int, default=1024, help="synthetic images to extract")
    model.add_argument("--data", default="",
                       help="train on this `npp extract` folder or embedded data set instead of synthetic "
                            "codes (then --grid/--vocab/--num-classes come from it)")
    run = parser.add_argument_group("trainer")
    run.add_argument("--batch", type=int, default=16, help="images per optimizer step, all processes together")
    run.add_argument("--micro-batch", type=int, default=0,
                     help="images per process per forward pass (0: batch / world size, no accumulation)")
    run.add_argument("--deepspeed", default="", help="DeepSpeed JSON, e.g. ds_configs/zero2.json (empty: no ZeRO)")
    run.add_argument("--precision", default="auto", choices=["auto", "fp32", "amp-bf16", "bf16"],
                     help="auto is amp-bf16 on CUDA, fp32 on the CPU (as in npp train)")
    run.add_argument("--activation-checkpointing", action="store_true", help="recompute blocks in backward")
    run.add_argument("--compile", action="store_true", help="torch.compile the engine (compiled in warm-up)")
    run.add_argument("--num-workers", type=int, default=0,
                     help="schedule mode: DataLoader workers of each run (0: the 2-core CPU runs keep "
                          "both cores for the model; memmap reads of codes are negligible)")
    run.add_argument("--seed", type=int, default=0, help="seed of the weights, codes and data order")
    timing = parser.add_argument_group("timing")
    timing.add_argument("--steps", type=int, default=10, help="stages/fit: timed steps per stage")
    timing.add_argument("--warmup", type=int, default=3, help="stages/fit: untimed steps before timing")
    timing.add_argument("--patch-sizes", type=int, nargs="+", default=None,
                        help="stages mode: the patch sides to time, e.g. 2 1 (default: every side "
                             "whose coarse grid is at least 2×2); fewer stages, fewer compilations")
    timing.add_argument("--peak-tflops", type=float, default=989.0,
                        help="per-GPU peak for MFU (H100/H200 SXM dense bf16: 989, A100: 312)")
    schedule = parser.add_argument_group("schedule mode")
    schedule.add_argument("--total-steps", type=int, default=40, help="optimizer steps of each run")
    schedule.add_argument("--levels", type=int, default=2, help="#L of the NPP run")
    schedule.add_argument("--segment-factor", type=float, default=0.5, help="λ of the NPP run")
    schedule.add_argument("--repeats", type=int, default=1, help="NTP/NPP pairs, run alternately")
    fit = parser.add_argument_group("fit mode")
    fit.add_argument("--min-micro-batch", type=int, default=1, help="first micro-batch tried")
    fit.add_argument("--max-micro-batch", type=int, default=None,
                     help="last micro-batch tried (default: 512 on CUDA, 8 on the CPU, where nothing "
                          "runs out of memory)")
    out = parser.add_argument_group("output")
    out.add_argument("--workdir", default="",
                     help="folder for the codes and run directories (default: a temporary one, removed "
                          "at the end; give one that all ranks share under a launcher)")
    out.add_argument("--json", metavar="PATH", help="also write the results to this JSON file")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed launcher
    args = parser.parse_args(argv)
    if min(args.batch, args.steps, args.total_steps, args.repeats, args.images, args.min_micro_batch) < 1 \
            or args.warmup < 0 or args.micro_batch < 0:
        parser.error("--batch, --steps, --total-steps, --repeats, --images and --min-micro-batch must be ≥ 1; "
                     "--warmup and --micro-batch ≥ 0")
    if args.mode == "fit" and args.warmup + args.steps < 2:
        # Adam's moments are allocated by the first optimizer step: only a later step sees all the state.
        parser.error("fit needs --warmup + --steps ≥ 2")
    if world_size() > 1 and not args.workdir:
        parser.error("under a launcher every rank needs the same folder: give --workdir")
    if args.max_micro_batch is None:
        args.max_micro_batch = 512 if torch.cuda.is_available() else 8
    return args


# --------------------------------------------------------------------------------------------
# Synthetic codes, written by the extraction code itself
# --------------------------------------------------------------------------------------------

def synthetic_codes(workdir: Path, args: argparse.Namespace) -> str:
    """An `npp extract` folder of grid×grid codes: a random one-level VQ (no downsampling) encodes
    grid×grid synthetic images, so the codes come without any image-sized work."""
    torch.manual_seed(args.seed)
    vq = npp.VQModel(VQConfig(image_size=args.grid, base_channels=32, ch_mult=(1,), num_res_blocks=1,
                              z_channels=32, codebook_size=args.vocab, codebook_dim=8))
    folder = workdir / f"codes-grid{args.grid}-vocab{args.vocab}-classes{args.num_classes}-n{args.images}"
    source = SyntheticImages(args.images, args.grid, args.grid, args.num_classes, args.seed)
    extract_codes(source, vq, folder, CropConfig("none", size=args.grid), batch_size=256, progress=False)
    return str(folder)


# --------------------------------------------------------------------------------------------
# Building a trainer and feeding it
# --------------------------------------------------------------------------------------------

def world_size() -> int:
    """Processes the launcher started (1 without one); known before any trainer joins them."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def model_config(data: str, args: argparse.Namespace) -> ModelConfig:
    """The preset on this data (vocabulary, classes and grid come from its manifest, as in the trainer)."""
    codes = open_data(data, args.seed)
    return ModelConfig.preset(args.preset, vocab_size=codes.vocab_size, num_classes=codes.num_classes,
                              grid=codes.grid)


def train_config(args: argparse.Namespace, data: str, runs_dir: Path, name: str, schedule: ScheduleConfig,
                 *, batch: int, micro: int) -> TrainConfig:
    """The run config every mode shares; checkpoints, TensorBoard and the progress bar off, and a
    metrics row per step (the schedule mode times each step by its row)."""
    return TrainConfig(name=name, runs_dir=str(runs_dir), data=data, model=args.preset, schedule=schedule,
                       batch_size=batch, micro_batch_size=micro, precision=args.precision,
                       activation_checkpointing=args.activation_checkpointing, compile=args.compile,
                       deepspeed=args.deepspeed, seed=args.seed, num_workers=args.num_workers,
                       log_every=1, ckpt_every=10**9, keep_last=1, tensorboard=False, progress=False)


def stage_batches(trainer, stage, steps: int) -> list[list[tuple[torch.Tensor, torch.Tensor]]]:
    """This rank's micro-batches of the first `steps` steps of `stage`, in the trainer's own data order,
    read before any timing (data time excluded)."""
    loader = micro_batches(trainer.data, trainer.order, stage.start, stage.start + steps, rank=trainer.rank,
                           world=trainer.world, micro=trainer.micro, num_workers=0,
                           pin_memory=trainer.device.type == "cuda")
    return [[next(loader) for _ in range(trainer.accum)] for _ in range(steps)]


def time_stage(trainer, stage, warmup: int, steps: int, batch: int, peak_tflops: float) -> dict[str, Any]:
    """Run `warmup` then `steps` optimizer steps inside `stage`; their wall time and peak memory.

    Timed as the trainer runs: the steps are queued back to back and their losses read in one all-reduce
    after the last (Trainer.synchronise), which waits for the GPU. So the figure is the mean step of the
    window; its min and max are that mean too.
    """
    needed = warmup + steps
    if stage.steps < needed:
        raise ValueError(f"stage {stage.index} has {stage.steps} steps, {needed} needed")
    batches = stage_batches(trainer, stage, needed)
    reset_peak_memory(trainer.device)
    trainer.synchronise([(stage.start + i, trainer.train_step(stage.start + i, batches[i])) for i in range(warmup)]
                        or [(stage.start, torch.zeros((), device=trainer.device))])
    started = time.perf_counter()
    pending = [(stage.start + i, trainer.train_step(stage.start + i, batches[i])) for i in range(warmup, needed)]
    last_loss = trainer.synchronise(pending)
    seconds = (time.perf_counter() - started) / steps
    row = {"stage": stage.index, **step_figures(trainer.model_config, stage.patch_size, batch, [seconds] * steps),
           "last_loss": last_loss, **peak_memory(trainer.device)}
    if trainer.device.type == "cuda":
        add_mfu(row, peak_tflops, trainer.world)
    return row


def release(trainer) -> None:
    """Free a trainer's engine, model and optimizer state but keep the process group for the next one
    (Trainer.close would end it). Also collects what an out-of-memory error left behind."""
    if trainer is not None:
        trainer.engine.destroy()  # removes ZeRO's gradient hooks, which reference the optimizer
        del trainer.engine, trainer.optimizer
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def is_out_of_memory(err: BaseException) -> bool:
    # Allocation failures inside cuBLAS or NCCL arrive as plain RuntimeErrors.
    text = str(err)
    return isinstance(err, torch.OutOfMemoryError) or (
        isinstance(err, RuntimeError) and ("out of memory" in text or "CUBLAS_STATUS_ALLOC_FAILED" in text))


# --------------------------------------------------------------------------------------------
# Mode: stages
# --------------------------------------------------------------------------------------------

def measure_stages(args: argparse.Namespace, data: str, runs_dir: Path, say) -> dict[str, Any]:
    from npp.train import Trainer

    sides = patch_sides(model_config(data, args).grid)
    if args.patch_sizes:
        unknown = sorted(set(args.patch_sizes) - set(sides))
        if unknown:
            raise SystemExit(f"--patch-sizes {unknown}: choose among {sides}")
        sides = sorted(set(args.patch_sizes) | {1}, reverse=True)  # a schedule always ends with NTP
    per_stage = args.warmup + args.steps
    # λ = ½ over len(sides) levels: the first (shortest) stage has exactly per_stage steps.
    schedule = ScheduleConfig(total_steps=per_stage * 2 ** (len(sides) - 1), levels=len(sides),
                              segment_factor=0.5, stage_patch_sizes=sides, lr=1e-4)
    trainer = Trainer(train_config(args, data, runs_dir, "stages", schedule, batch=args.batch,
                                   micro=args.micro_batch), resume=False)
    say(trainer.summary())
    say(f"{args.warmup} warm-up + {args.steps} timed steps per stage\n")
    rows = [time_stage(trainer, stage, args.warmup, args.steps, args.batch, args.peak_tflops)
            for stage in trainer.stages]
    compare_with_ntp(rows)
    info = {"num_params": sum(p.numel() for p in trainer.engine.module.parameters()),
            "zero_stage": int(trainer.plan.zero), "precision": trainer.plan.precision, "micro_batch": trainer.micro,
            "accumulation": trainer.accum}
    release(trainer)
    return {**info, "stages": rows}


# --------------------------------------------------------------------------------------------
# Mode: schedule
# --------------------------------------------------------------------------------------------

def run_training(args: argparse.Namespace, data: str, runs_dir: Path, name: str, schedule: ScheduleConfig
                 ) -> list[dict]:
    """One whole run in a training process of its own, as every run is started; its metrics rows. What
    it printed goes to runs_dir/<name>.log."""
    config = train_config(args, data, runs_dir, name, schedule, batch=args.batch, micro=args.micro_batch)
    output: list[str] = []
    code = launch(config, extra=["--no-resume"], echo=output.append)
    log = runs_dir / f"{name}.log"
    log.write_text("".join(output))
    if code != 0:
        raise RuntimeError(f"training {name} failed ({code}); the end of {log}:\n{''.join(output)[-3000:]}")
    return RunDir(config.run_dir).train_rows()


def loop_times(rows: list[dict], batch: int) -> dict[str, Any]:
    """Wall time of the loop from the end of step 1 to the end of the last step, and what it holds.

    With log_every = 1 each row's imgs_per_s is batch / (that step's train_step seconds), so the
    sum of step times separates compute from what else the loop does (the stage-end checkpoint,
    the data loader). The median step time of each stage ignores the bursts that other processes
    on a shared machine add to a few steps.
    """
    step_s = [batch / row["imgs_per_s"] for row in rows]
    per_side: dict[int, list[float]] = {}
    for row, seconds in zip(rows[1:], step_s[1:]):
        per_side.setdefault(row["patch_size"], []).append(seconds)
    loop_s = rows[-1]["time"] - rows[0]["time"]
    steps_s = sum(step_s[1:])
    return {"loop_s": loop_s, "steps_s": steps_s, "other_s": loop_s - steps_s,
            "step_ms_by_patch": {p: 1e3 * statistics.mean(s) for p, s in sorted(per_side.items(), reverse=True)},
            "median_ms_by_patch": {p: 1e3 * statistics.median(s) for p, s in sorted(per_side.items(), reverse=True)}}


def median_step_ratio(ntp: dict[str, Any], nxp: dict[str, Any], stages, total_steps: int) -> float:
    """NPP/NTP compute time with every step priced at its stage's median step time."""
    npp_ms = sum(stage.steps * nxp["median_ms_by_patch"][stage.patch_size] for stage in stages)
    return npp_ms / (total_steps * ntp["median_ms_by_patch"][1])


def measure_schedule(args: argparse.Namespace, data: str, runs_dir: Path, say) -> dict[str, Any]:
    model = model_config(data, args)
    npp_schedule = ScheduleConfig(total_steps=args.total_steps, levels=args.levels,
                                  segment_factor=args.segment_factor)
    ntp_schedule = ScheduleConfig(total_steps=args.total_steps, levels=1)
    stages = plan_stages(npp_schedule, grid=model.grid)
    flops_ratio = relative_cost(npp_schedule, model)
    position_ratio = relative_cost(npp_schedule)
    say(f"GPT-{args.preset}, grid {model.grid}×{model.grid}, batch {args.batch}, {args.total_steps} steps; NPP "
        f"stages: " + ", ".join(f"{s.patch_size}×{s.patch_size} steps {s.start}–{s.end}" for s in stages))
    say(f"bounds: {position_ratio:.3f} in sequence positions, {flops_ratio:.3f} in model FLOPs\n")
    pairs = []
    for repeat in range(args.repeats):
        ntp = loop_times(run_training(args, data, runs_dir, f"ntp-{repeat}", ntp_schedule), args.batch)
        nxp = loop_times(run_training(args, data, runs_dir, f"npp-{repeat}", npp_schedule), args.batch)
        pair = {"ntp": ntp, "npp": nxp, "ratio": nxp["loop_s"] / ntp["loop_s"],
                "ratio_steps_only": nxp["steps_s"] / ntp["steps_s"],
                "ratio_median_steps": median_step_ratio(ntp, nxp, stages, args.total_steps)}
        pairs.append(pair)
        say(f"pair {repeat + 1}/{args.repeats}: NTP {ntp['loop_s']:.1f} s, NPP {nxp['loop_s']:.1f} s, "
            f"ratio {pair['ratio']:.3f}", flush=True)
    ratios = [p["ratio"] for p in pairs]
    robust = [p["ratio_median_steps"] for p in pairs]
    return {"total_steps": args.total_steps, "levels": args.levels, "segment_factor": args.segment_factor,
            "grid": model.grid, "stages": [[s.patch_size, s.start, s.end] for s in stages],
            "flops_ratio": flops_ratio, "position_ratio": position_ratio, "pairs": pairs,
            "ratio_median": statistics.median(ratios), "ratio_min": min(ratios), "ratio_max": max(ratios),
            "median_steps_ratio_median": statistics.median(robust), "median_steps_ratio_min": min(robust),
            "median_steps_ratio_max": max(robust)}


def print_schedule(result: dict[str, Any], say) -> None:
    sides = [side for side, _, _ in result["stages"]]
    header = ["pair", "NTP loop s", "NPP loop s", "NPP/NTP", "steps only", "median steps", "NTP ms/step",
              *[f"NPP {p}×{p} ms/step" for p in sides], "NPP other s"]
    rows = []
    for i, pair in enumerate(result["pairs"], 1):
        ntp, nxp = pair["ntp"], pair["npp"]
        rows.append([f"{i}", f"{ntp['loop_s']:.1f}", f"{nxp['loop_s']:.1f}", f"{pair['ratio']:.3f}",
                     f"{pair['ratio_steps_only']:.3f}", f"{pair['ratio_median_steps']:.3f}",
                     f"{ntp['step_ms_by_patch'][1]:.0f}",
                     *[f"{nxp['step_ms_by_patch'].get(p, float('nan')):.0f}" for p in sides],
                     f"{nxp['other_s']:.1f}"])
    say(markdown_table(header, rows))
    say(f"\nNPP/NTP wall time: median {result['ratio_median']:.3f} (min {result['ratio_min']:.3f}, "
        f"max {result['ratio_max']:.3f}) over {len(result['pairs'])} pair(s); with each step at its "
        f"stage's median: {result['median_steps_ratio_median']:.3f} ({result['median_steps_ratio_min']:.3f}–"
        f"{result['median_steps_ratio_max']:.3f}); model FLOPs ratio {result['flops_ratio']:.3f}; "
        f"position-count bound {result['position_ratio']:.3f}")


# --------------------------------------------------------------------------------------------
# Mode: fit
# --------------------------------------------------------------------------------------------

def try_micro_batch(args: argparse.Namespace, data: str, runs_dir: Path, micro: int) -> dict | None:
    """Build a trainer for micro-batch `micro` and time NTP steps (the stage that needs the most memory);
    None when CUDA runs out of memory. Memory is given back either way."""
    from npp.train import Trainer

    schedule = ScheduleConfig(total_steps=args.warmup + args.steps, levels=1)
    trainer = None
    try:
        # One micro-batch per process and step: the batch is micro × world, no accumulation.
        trainer = Trainer(train_config(args, data, runs_dir, f"fit-{micro}", schedule, batch=micro * world_size(),
                                       micro=micro), resume=False)
        row = time_stage(trainer, trainer.stages[-1], args.warmup, args.steps, micro * trainer.world,
                         args.peak_tflops)
    except Exception as err:  # only out-of-memory is expected; anything else re-raises
        if not is_out_of_memory(err):
            raise
        row = None
    # Outside the except block the traceback, and with it every frame's tensors, is already gone.
    release(trainer)
    return row


def measure_fit(args: argparse.Namespace, data: str, runs_dir: Path, say) -> dict[str, Any]:
    """Double the micro-batch until out of memory; every size that fits is timed on the way."""
    tries = []
    micro = args.min_micro_batch
    while micro <= args.max_micro_batch:
        started = time.perf_counter()
        row = try_micro_batch(args, data, runs_dir, micro)
        seconds = time.perf_counter() - started  # building the engine dominates for large models
        tries.append({"micro_batch": micro, "fits": row is not None, "seconds": seconds, **(row or {})})
        peak = "" if row is None or "peak_mem_gib" not in row else f", peak {row['peak_mem_gib']:.2f} GiB"
        rate = "" if row is None else f", {row['images_per_s']:,.1f} imgs/s"
        say(f"micro-batch {micro}: {'fits' if row else 'out of memory'}{peak}{rate} ({seconds:.0f} s)", flush=True)
        if row is None:
            break
        micro *= 2
    fitting = [t for t in tries if t["fits"]]
    return {"tries": tries, "largest": fitting[-1]["micro_batch"] if fitting else None,
            "capped": bool(tries) and tries[-1]["fits"]}


def print_fit(result: dict[str, Any], say, max_micro: int) -> None:
    cuda = any("mfu" in t for t in result["tries"])
    header = ["micro-batch", "fits", "step ms (min–max)", "imgs/s", "TFLOP/s"] + (["MFU", "peak GiB"] if cuda else [])
    rows = []
    for t in result["tries"]:
        if not t["fits"]:
            rows.append([f"{t['micro_batch']}", "out of memory"] + ["–"] * (len(header) - 2))
            continue
        cells = [f"{t['micro_batch']}", "yes", f"{t['step_ms']:.0f} ({t['step_ms_min']:.0f}–{t['step_ms_max']:.0f})",
                 f"{t['images_per_s']:,.1f}", f"{t['tflops_per_s']:.1f}"]
        rows.append(cells + ([f"{t['mfu']:.1%}", f"{t['peak_mem_gib']:.2f}"] if cuda else []))
    say(markdown_table(header, rows))
    if result["largest"] is None:
        say("\nnot even the first micro-batch fits")
        return
    limit = f" (the cap --max-micro-batch {max_micro}: more may fit)" if result["capped"] else ""
    say(f"\nlargest micro-batch that fits: {result['largest']}{limit}")


# --------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------

def measure(args: argparse.Namespace, say) -> dict[str, Any]:
    """The mode's figures, on the given data or on synthetic codes in the work folder."""
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="npp-train-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        data = args.data or synthetic_codes(workdir, args)
        runs_dir = workdir / "runs"
        if args.mode == "schedule":
            runs_dir.mkdir(parents=True, exist_ok=True)
            return measure_schedule(args, data, runs_dir, say)
        if args.mode == "stages":
            return measure_stages(args, data, runs_dir, say)
        return measure_fit(args, data, runs_dir, say)
    finally:
        if torch.distributed.is_initialized():  # the trainers in this process share one group
            torch.distributed.destroy_process_group()
        if not args.workdir and is_rank0():
            shutil.rmtree(workdir, ignore_errors=True)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    rank0 = is_rank0()
    load_before = round(os.getloadavg()[0], 2)  # on a shared machine, how busy it was decides the noise

    def say(text: str = "", flush: bool = False) -> None:
        if rank0:
            print(text, flush=flush)

    result = {"mode": args.mode, **measure(args, say)}
    # After the trainer: DeepSpeed may have changed the thread count, and the world is known.
    machine = {**describe_machine(torch.device("cuda" if torch.cuda.is_available() else "cpu")),
               "world_size": world_size(), "load_before": load_before}
    say()
    say(f"machine: {machine_line(machine)}; world size {machine['world_size']}, load average {load_before} "
        f"before (1 min)")
    say(f"command: {command_line()}\n")
    if args.mode == "stages":
        say(levels_table(result["stages"]))
    elif args.mode == "schedule":
        print_schedule(result, say)
    else:
        print_fit(result, say, args.max_micro_batch)
    if args.json and rank0:
        write_result(args.json, args, machine, result)
    return result


if __name__ == "__main__":
    main()
