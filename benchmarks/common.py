"""What the benchmarks share: the record kept beside every figure (machine, command, package versions),
timing on a device, the figures of a training step at each patch level, and synthetic images.

The benchmarks run as `python benchmarks/<name>.py` from the repository root; Python puts the script's
folder first on sys.path, so they import this module as `common`.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import platform
import shlex
import statistics
import sys
import time
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch
from PIL import Image

from npp.config import ModelConfig
from npp.files import dump_json

# --------------------------------------------------------------------------------------------
# The record: where and how a figure was measured
# --------------------------------------------------------------------------------------------


def package_version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "absent"


def cpu_name() -> str:
    """The CPU's model name (on Linux platform.processor() is often only the architecture)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def describe_machine(device: torch.device) -> dict[str, Any]:
    """The machine as the figures depend on it. The load average is there because on a shared
    machine how busy the other processes kept it decides the noise."""
    machine = {"date": time.strftime("%Y-%m-%d"), "python": platform.python_version(), "torch": torch.__version__,
               "deepspeed": package_version("deepspeed"), "cpu": cpu_name(), "cpu_cores": os.cpu_count(),
               "torch_threads": torch.get_num_threads(), "load_avg_1m": round(os.getloadavg()[0], 2)}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        machine.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1),
                       gpus_visible=torch.cuda.device_count())
    return machine


def machine_line(machine: dict[str, Any]) -> str:
    where = f"{machine['gpu']} ({machine['gpu_memory_gib']} GiB)" if "gpu" in machine else f"CPU {machine['cpu']}"
    return (f"{where}, {machine['cpu_cores']} CPU cores, torch {machine['torch']} ({machine['torch_threads']} "
            f"threads), deepspeed {machine['deepspeed']}, load average {machine['load_avg_1m']} (1 min), "
            f"{machine['date']}")


def command_line(drop: Iterable[str] = ()) -> str:
    """This process's command as typed from the repository root, without the arguments in `drop`."""
    dropped = set(drop)
    return shlex.join(["python", *(arg for arg in sys.argv if arg not in dropped)])


def write_result(path: str, args: argparse.Namespace, machine: dict[str, Any], result: dict[str, Any]) -> None:
    """The figures as JSON, with the command, its arguments and the machine that produced them."""
    dump_json({"command": command_line(), "args": vars(args), "machine": machine, **result}, path)
    print(f"wrote {path}")


# --------------------------------------------------------------------------------------------
# Timing on a device
# --------------------------------------------------------------------------------------------


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def autocast(device: torch.device, dtype: str) -> AbstractContextManager:
    """bf16 autocast (the weights stay in their own dtype), or nothing for fp32."""
    return torch.autocast(device.type, dtype=torch.bfloat16) if dtype == "bf16" else nullcontext()


def timed(fn: Callable[[], Any], device: torch.device, *, warmup: int, repeats: int) -> tuple[list[float], Any]:
    """Seconds of each of `repeats` calls of fn after `warmup` untimed ones (compilation, allocator, caches),
    and what the last call returned. The device is synchronised around every call, so each time holds
    that call's GPU work and nothing of its neighbours'."""
    for _ in range(warmup):
        fn()
    seconds, out = [], None
    for _ in range(repeats):
        synchronize(device)
        started = time.perf_counter()
        out = fn()
        synchronize(device)
        seconds.append(time.perf_counter() - started)
    return seconds, out


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device: torch.device) -> dict[str, float]:
    """Peak CUDA memory since reset_peak_memory (nothing on the CPU, which does not count it)."""
    if device.type != "cuda":
        return {}
    return {"peak_mem_gib": torch.cuda.max_memory_allocated(device) / 2**30,
            "peak_reserved_gib": torch.cuda.max_memory_reserved(device) / 2**30}


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    """A table to paste into docs/benchmarks.md."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(cells) + " |" for cells in rows])


# --------------------------------------------------------------------------------------------
# A training step at each patch level
# --------------------------------------------------------------------------------------------


def patch_sides(grid: int) -> list[int]:
    """Patch sides worth timing, coarse to fine: 2^k while the coarse grid is at least 2×2 (a 1×1 grid
    would be a single position), down to 1, next-token prediction."""
    return [p for p in reversed(ModelConfig(grid=grid).patch_sizes()) if grid // p >= 2]


def step_figures(model: ModelConfig, patch_size: int, batch: int, seconds: Sequence[float]) -> dict[str, Any]:
    """Rates of optimizer steps of `batch` images at one patch side, from the wall time of each step.

    Every side covers the same grid² image tokens per image, so tokens/s counts those, not positions.
    FLOPs are the model's own count (6·N_matmul·S + 12·n_layer·dim·S², docs/method.md §9); recomputation
    under activation checkpointing is not counted, as is usual for MFU.
    """
    step_s = statistics.mean(seconds)
    flops = model.flops_per_sample(patch_size) * batch
    return {"patch_size": patch_size, "positions": (model.grid // patch_size) ** 2, "step_ms": 1e3 * step_s,
            "step_ms_median": 1e3 * statistics.median(seconds), "step_ms_min": 1e3 * min(seconds),
            "step_ms_max": 1e3 * max(seconds), "images_per_s": batch / step_s,
            "tokens_per_s": batch * model.seq_len / step_s, "flops_per_step": flops,
            "tflops_per_s": flops / step_s / 1e12}


def add_mfu(row: dict[str, Any], peak_tflops: float, world: int = 1) -> None:
    """Model FLOP utilisation: the TFLOP/s of one GPU over its peak."""
    row["mfu"] = row["tflops_per_s"] / world / peak_tflops


def compare_with_ntp(rows: list[dict[str, Any]]) -> None:
    """Each level's speed-up over next-token prediction (the row of patch side 1)."""
    ntp = next(row for row in rows if row["patch_size"] == 1)
    for row in rows:
        row["speedup_vs_ntp"] = ntp["step_ms"] / row["step_ms"]


def levels_table(rows: list[dict[str, Any]]) -> str:
    """One line per patch level; MFU and peak memory where they were measured (CUDA)."""
    cuda = "mfu" in rows[0]
    header = ["level", "N", "step ms (median, min–max)", "imgs/s", "tokens/s", "GFLOP/step", "TFLOP/s", "vs NTP"]
    lines = []
    for r in rows:
        p = r["patch_size"]
        cells = [f"{p}×{p}" + (" (NTP)" if p == 1 else ""), f"{r['positions']}",
                 f"{r['step_ms']:.1f} ({r['step_ms_median']:.1f}, {r['step_ms_min']:.1f}–{r['step_ms_max']:.1f})",
                 f"{r['images_per_s']:,.1f}", f"{r['tokens_per_s']:,.0f}", f"{r['flops_per_step'] / 1e9:,.1f}",
                 f"{r['tflops_per_s']:.3f}", f"{r['speedup_vs_ntp']:.2f}×"]
        lines.append(cells + ([f"{r['mfu']:.1%}", f"{r['peak_mem_gib']:.2f}"] if cuda else []))
    return markdown_table(header + (["MFU", "peak GiB"] if cuda else []), lines)


# --------------------------------------------------------------------------------------------
# Synthetic images
# --------------------------------------------------------------------------------------------


class SyntheticImages:
    """An `npp.data.ImageSource` of seeded photograph-like images: a smooth random colour field with some
    noise (pure noise would make JPEGs far larger and slower to decode than photographs), labels cycling
    over the classes. Image i depends only on (seed, i), so every rank of a launcher sees the same ones."""

    def __init__(self, count: int, width: int, height: int, num_classes: int, seed: int):
        self.size, self.seed = (width, height), seed
        self.classes = [f"class{i:04d}" for i in range(num_classes)]
        self.labels = np.arange(count, dtype=np.int64) % num_classes
        self.files = None

    def __len__(self) -> int:
        return len(self.labels)

    def name(self, index: int) -> str:
        return f"synthetic[{index}]"

    def open(self, index: int) -> Image.Image:
        rng = np.random.default_rng((self.seed, index))
        width, height = self.size
        field = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)).resize(self.size,
                                                                                        Image.Resampling.BICUBIC)
        pixels_HWC = np.asarray(field, dtype=np.int16) + rng.integers(-12, 13, (height, width, 3))
        return Image.fromarray(pixels_HWC.clip(0, 255).astype(np.uint8))

    def identity(self) -> dict[str, Any]:
        return {"kind": "synthetic", "count": len(self), "size": list(self.size), "classes": len(self.classes),
                "seed": self.seed}

    def describe(self) -> dict[str, Any]:
        return self.identity()


def write_image_folder(source: SyntheticImages, root: Path) -> Path:
    """The images as JPEGs in an ImageFolder tree (a sub-folder per class), as `npp extract` reads them."""
    for index in range(len(source)):
        folder = root / source.classes[source.labels[index]]
        folder.mkdir(parents=True, exist_ok=True)
        source.open(index).save(folder / f"{index:06d}.jpg", quality=90)
    return root
