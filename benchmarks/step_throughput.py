"""Training-step throughput of next-token prediction and of every next-patch level.

A training step is exactly what the trainer does at one stage of the coarse-to-fine schedule:

    logits = model(tokens_BL, labels_B, patch_size=p)          # N = (grid / p)² positions
    loss = npp.next_patch_loss(logits, tokens_BL, patch_size=p)
    loss.backward(); optimizer.step(); optimizer.zero_grad()   # AdamW (fused on CUDA)

Every level sees the same images per step (batch × grid² image tokens), as in the paper, so the
speed-up of a p×p level over NTP (p = 1) is the saving NPP buys in that stage. Levels are p = …, 4,
2, 1 while the coarse grid grid/p is at least 2 (a 1×1 coarse grid would be a single position).
Tokens and labels are random (fixed seed); FLOPs are the model's own count
(``ModelConfig.flops_per_sample(p) × batch``: 6·N_matmul·S + 12·n_layer·dim·S², docs/method.md §9). Each
step is timed on its own (the device synchronised around it), as the trainer, which reads every
step's loss, runs them.

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

import torch

import npp

from common import (add_mfu, autocast, compare_with_ntp, describe_machine, levels_table, machine_line, patch_sides,
                    peak_memory, reset_peak_memory, step_figures, timed, write_result)


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


def training_step(model: npp.GPT, args: argparse.Namespace, device: torch.device):
    """step(tokens_BL, labels_B, patch_size) -> loss: forward, next-patch loss, backward, AdamW, as the trainer."""
    # dynamic=False: one specialised graph per patch size, compiled during that level's warm-up.
    forward = torch.compile(model, dynamic=False) if args.compile else model
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.05,
                                  fused=device.type == "cuda")

    def step(tokens_BL: torch.Tensor, labels_B: torch.Tensor, patch_size: int) -> torch.Tensor:
        with autocast(device, args.dtype):
            logits_BNV = forward(tokens_BL, labels_B, patch_size=patch_size)
        loss = npp.next_patch_loss(logits_BNV, tokens_BL, patch_size=patch_size)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    return step


def time_level(step, config: npp.ModelConfig, patch_size: int, tokens_BL: torch.Tensor, labels_B: torch.Tensor,
               args: argparse.Namespace, device: torch.device) -> dict:
    """Warm up, then time args.steps training steps at one patch size."""
    reset_peak_memory(device)
    seconds, loss = timed(lambda: step(tokens_BL, labels_B, patch_size), device, warmup=args.warmup,
                          repeats=args.steps)
    row = {**step_figures(config, patch_size, args.batch, seconds), "final_loss": loss.item(), **peak_memory(device)}
    if device.type == "cuda":
        add_mfu(row, args.peak_tflops)
    return row


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    device = torch.device(args.device)
    torch.manual_seed(args.seed)

    config = npp.ModelConfig.preset(args.preset, vocab_size=args.vocab, num_classes=args.num_classes,
                                    grid=args.grid)
    model = npp.GPT(config).to(device).train()
    model.activation_checkpointing = args.activation_checkpointing
    step = training_step(model, args, device)

    generator = torch.Generator().manual_seed(args.seed)
    tokens_BL = torch.randint(0, args.vocab, (args.batch, args.grid**2), generator=generator).to(device)
    labels_B = torch.randint(0, args.num_classes, (args.batch,), generator=generator).to(device)

    machine = describe_machine(device)
    print(f"GPT-{args.preset}: {model.num_params() / 1e6:.2f}M params "
          f"({config.n_layer} layers, dim {config.dim}), grid {args.grid}x{args.grid}, vocab {args.vocab}, "
          f"{args.num_classes} classes")
    print(f"batch {args.batch}, {args.dtype}{', compiled' if args.compile else ''}"
          f"{', activation checkpointing' if args.activation_checkpointing else ''}; "
          f"{args.warmup} warm-up + {args.steps} timed steps per level")
    print(f"machine: {machine_line(machine)}")
    print()

    rows = [time_level(step, config, p, tokens_BL, labels_B, args, device) for p in patch_sides(args.grid)]
    compare_with_ntp(rows)
    print(levels_table(rows))
    print()
    ntp = rows[-1]
    for r in rows[:-1]:
        print(f"{r['patch_size']}x{r['patch_size']} step is {r['speedup_vs_ntp']:.2f}x faster than NTP "
              f"(sequence {ntp['positions'] // r['positions']}x shorter, "
              f"{ntp['flops_per_step'] / r['flops_per_step']:.2f}x fewer model FLOPs)")

    result = {"num_params": model.num_params(), "levels": rows}
    if args.json:
        write_result(args.json, args, machine, result)
    return result


if __name__ == "__main__":
    main()
