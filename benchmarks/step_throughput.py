"""Training-step throughput of next-token prediction and of every next-patch level.

A training step is exactly what the trainer does at one stage of the coarse-to-fine schedule:

    logits = model(tokens_BL, labels_B, patch_size=p)          # N = (grid / p)² positions
    loss = npp.next_patch_loss(logits, tokens_BL, patch_size=p)
    loss.backward(); optimizer.step(); optimizer.zero_grad()   # AdamW (fused on CUDA)

Every level sees the same images per step (batch × grid² image tokens), as in the paper, so the
speed-up of a p×p level over NTP (p = 1) is the saving NPP buys in that stage. Levels are p = 1, 2,
4, … while the coarse grid grid/p is at least 2 (a 1×1 coarse grid would be a single position).
Tokens and labels are random (fixed seed); FLOPs are the model's own count
(``GPT.flops_per_sample(p) × batch``: 6·N_matmul·S + 12·n_layer·dim·S², REFERENCE §9).

Usage (from the repository root, with npp installed in the environment):

    # CPU, tiny model: a couple of minutes on 2 cores
    python benchmarks/step_throughput.py --preset tiny --grid 16
    python benchmarks/step_throughput.py --preset tiny --grid 8 --json tiny_grid8.json

    # one GPU, LlamaGen-B on ImageNet VQ-16 codes
    python benchmarks/step_throughput.py --preset B --grid 16 --vocab 16384 --num-classes 1000 --batch 64 --dtype bf16

    # the same, compiled, with activation checkpointing, MFU against an A100 (312 TFLOP/s)
    python benchmarks/step_throughput.py --preset B --grid 16 --vocab 16384 --num-classes 1000 \\
        --batch 64 --dtype bf16 --compile --activation-checkpointing --peak-tflops 312

Record the figures in docs/benchmarks.md with the machine, the date and the exact command.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from contextlib import nullcontext

import torch

import npp


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Training steps/s and tokens/s of NTP and of every next-patch level.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--preset", default="tiny", choices=list(npp.config.MODEL_PRESETS),
                        help="model architecture preset")
    parser.add_argument("--grid", type=int, default=16, help="side of the token grid (grid² tokens per image)")
    parser.add_argument("--vocab", type=int, default=4096, help="codebook size (LlamaGen VQ-16: 16384)")
    parser.add_argument("--num-classes", type=int, default=10, help="number of class labels (ImageNet: 1000)")
    parser.add_argument("--batch", type=int, default=16, help="images per step, the same at every level")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per level")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per level before timing")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="torch device to run on")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32",
                        help="fp32, or bf16 autocast (weights and optimizer state stay fp32)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model (compiled in warm-up)")
    parser.add_argument("--activation-checkpointing", action="store_true",
                        help="recompute every block in the backward pass")
    parser.add_argument("--peak-tflops", type=float, default=989.0,
                        help="device peak for MFU on CUDA (H100 SXM dense bf16: 989, A100: 312)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the weights and of the random batch")
    parser.add_argument("--json", metavar="PATH", help="also write the results to this JSON file")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.warmup < 0 or args.batch < 1:
        parser.error("--steps and --batch must be ≥ 1, --warmup ≥ 0")
    return args


def patch_levels(config: npp.ModelConfig) -> list[int]:
    """Patch sides worth timing: 1 (NTP), 2, 4, … while the coarse grid is at least 2×2."""
    return [p for p in config.patch_sizes() if config.grid // p >= 2]


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def describe_device(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or platform.machine()
    return f"CPU {cpu}, torch threads {torch.get_num_threads()}"


def time_level(step, model: npp.GPT, patch_size: int, tokens_BL: torch.Tensor, labels_B: torch.Tensor,
               args: argparse.Namespace, device: torch.device) -> dict:
    """Warm up, then time args.steps training steps at one patch size."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    for _ in range(args.warmup):
        step(tokens_BL, labels_B, patch_size)
    synchronize(device)
    start = time.perf_counter()
    for _ in range(args.steps):
        loss = step(tokens_BL, labels_B, patch_size)
    synchronize(device)
    step_s = (time.perf_counter() - start) / args.steps

    flops_per_step = model.flops_per_sample(patch_size) * args.batch
    row = {
        "patch_size": patch_size,
        "seq_len": (args.grid // patch_size) ** 2,
        "step_ms": 1e3 * step_s,
        "steps_per_s": 1.0 / step_s,
        "images_per_s": args.batch / step_s,
        "tokens_per_s": args.batch * args.grid**2 / step_s,  # image tokens covered, not positions
        "flops_per_step": flops_per_step,
        "tflops_per_s": flops_per_step / step_s / 1e12,
        "final_loss": loss.item(),
    }
    if device.type == "cuda":
        row["mfu"] = row["tflops_per_s"] / args.peak_tflops
        row["peak_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    return row


def print_table(rows: list[dict], cuda: bool) -> None:
    columns = [("level", 6), ("N", 5), ("step ms", 9), ("steps/s", 8), ("images/s", 9),
               ("tokens/s", 10), ("GFLOP/step", 11), ("TFLOP/s", 8), ("vs NTP", 7)]
    if cuda:
        columns += [("MFU", 6), ("peak GiB", 9)]
    print("  ".join(f"{name:>{width}}" for name, width in columns))
    for r in rows:
        cells = [f"{r['patch_size']}x{r['patch_size']}", f"{r['seq_len']}", f"{r['step_ms']:.1f}",
                 f"{r['steps_per_s']:.2f}", f"{r['images_per_s']:.1f}", f"{r['tokens_per_s']:.0f}",
                 f"{r['flops_per_step'] / 1e9:.1f}", f"{r['tflops_per_s']:.3f}",
                 f"{r['speedup_vs_ntp']:.2f}x"]
        if cuda:
            cells += [f"{r['mfu']:.1%}", f"{r['peak_mem_gib']:.2f}"]
        print("  ".join(f"{cell:>{width}}" for cell, (_, width) in zip(cells, columns)))


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    torch.manual_seed(args.seed)

    config = npp.ModelConfig.preset(args.preset, vocab_size=args.vocab, num_classes=args.num_classes,
                                    grid=args.grid)
    model = npp.GPT(config).to(device).train()
    model.activation_checkpointing = args.activation_checkpointing
    # dynamic=False: one specialised graph per patch size, compiled during that level's warm-up.
    forward = torch.compile(model, dynamic=False) if args.compile else model
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.05,
                                  fused=cuda)

    def autocast():
        if args.dtype == "bf16":
            return torch.autocast(device.type, dtype=torch.bfloat16)
        return nullcontext()

    def step(tokens_BL: torch.Tensor, labels_B: torch.Tensor, patch_size: int) -> torch.Tensor:
        with autocast():
            logits_BNV = forward(tokens_BL, labels_B, patch_size=patch_size)
        loss = npp.next_patch_loss(logits_BNV, tokens_BL, patch_size=patch_size)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    generator = torch.Generator().manual_seed(args.seed)
    tokens_BL = torch.randint(0, args.vocab, (args.batch, args.grid**2), generator=generator).to(device)
    labels_B = torch.randint(0, args.num_classes, (args.batch,), generator=generator).to(device)

    where = describe_device(device)
    print(f"GPT-{args.preset}: {model.num_params() / 1e6:.2f}M params "
          f"({config.n_layer} layers, dim {config.dim}), grid {args.grid}x{args.grid}, vocab {args.vocab}, "
          f"{args.num_classes} classes")
    print(f"batch {args.batch}, {args.dtype}{', compiled' if args.compile else ''}"
          f"{', activation checkpointing' if args.activation_checkpointing else ''}; "
          f"{args.warmup} warm-up + {args.steps} timed steps per level")
    print(f"device: {where}; torch {torch.__version__}")
    print()

    rows = []
    for p in patch_levels(config):
        rows.append(time_level(step, model, p, tokens_BL, labels_B, args, device))
    for r in rows:
        r["speedup_vs_ntp"] = rows[0]["step_ms"] / r["step_ms"]
    print_table(rows, cuda)
    print()
    for r in rows[1:]:
        print(f"{r['patch_size']}x{r['patch_size']} step is {r['speedup_vs_ntp']:.2f}x faster than NTP "
              f"(sequence {rows[0]['seq_len'] // r['seq_len']}x shorter, "
              f"{rows[0]['flops_per_step'] / r['flops_per_step']:.2f}x fewer model FLOPs)")

    result = {
        "args": vars(args),
        "device": where,
        "torch": torch.__version__,
        "num_threads": torch.get_num_threads(),
        "num_params": model.num_params(),
        "levels": rows,
    }
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
            f.write("\n")
        print(f"wrote {args.json}")
    return result


if __name__ == "__main__":
    main()
