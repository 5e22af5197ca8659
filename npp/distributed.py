"""Processes: where this one stands among the ranks, and the DeepSpeed configuration of a run.

Two kinds of work run on several processes. Training starts torch.distributed through DeepSpeed
(`init_distributed`; a plain `python` start becomes a world of one) and fills the user's ZeRO JSON
from the run config (`deepspeed_config`). Extraction and evaluation only need barriers and small
broadcasts between the ranks a launcher (torchrun, deepspeed) started: `Ranks`, over gloo.
DeepSpeed is imported only inside the functions that need it.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
from contextlib import closing
from dataclasses import dataclass
from enum import IntEnum
from pathlib import Path
from typing import Any, Callable, Mapping

import torch

from npp.config import TrainConfig
from npp.errors import ConfigError, check, require


def free_port() -> int:
    with closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def is_rank0() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def init_distributed() -> tuple[int, int, torch.device]:
    """Start torch.distributed through DeepSpeed; a plain `python` start becomes a world of one.

    Returns (rank, world size, this rank's device).
    """
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # must precede the deepspeed import
        # A CUDA toolkit without a GPU makes torch warn on DeepSpeed's import that it found no CUDA runtime:
        # true, expected here, and the one line a user would read before our own messages.
        logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    # DeepSpeed compiles a C++ op at start-up (its CPU all-reduce) with the first `ninja` on PATH and keeps it
    # in ~/.cache/torch_extensions; a different ninja version (a system one, or an activated environment's)
    # rebuilds it every time the other starts, minutes each. This environment's own ninja goes first.
    os.environ["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=os.environ.get("MASTER_PORT", str(free_port())))
    deepspeed = require("deepspeed", "training")
    if not torch.distributed.is_initialized():
        deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local)
        return rank, world, torch.device("cuda", local)
    return rank, world, torch.device("cpu")


# ------------------------------------------------------------------------------------------------
# DeepSpeed configuration
# ------------------------------------------------------------------------------------------------

def deepspeed_config(config: TrainConfig, world: int, bf16: bool) -> dict[str, Any]:
    """The user's DeepSpeed JSON with its "auto" values filled from the run config."""
    micro = config.micro_batch_size or config.batch_size // world
    if micro == 0 or config.batch_size % (micro * world):
        raise ConfigError(f"TrainConfig.batch_size={config.batch_size} is not a multiple of "
                          f"micro_batch_size={micro} × {world} processes: change one of them")
    filled = {"train_batch_size": config.batch_size, "train_micro_batch_size_per_gpu": micro,
              "gradient_accumulation_steps": config.batch_size // (micro * world),
              "gradient_clipping": config.grad_clip, "steps_per_print": 10**12,
              "bf16": {"enabled": bf16}, "zero_optimization": {"stage": 0}}
    if not config.deepspeed:
        return filled
    try:
        user = json.loads(Path(config.deepspeed).read_text())
    except json.JSONDecodeError as err:
        raise ConfigError(f"{config.deepspeed} is not valid JSON ({err}): fix it or use one of ds_configs/*.json") from None
    if not isinstance(user, dict):
        raise ConfigError(f"{config.deepspeed} holds a JSON {type(user).__name__}, not an object of DeepSpeed settings")

    def merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
        out = dict(base)
        for key, value in override.items():
            if isinstance(value, dict) and isinstance(base.get(key), dict):
                out[key] = merge(base[key], value)
            elif value != "auto":
                out[key] = value
        return out

    merged = merge(filled, user)
    for key in ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps"):
        if merged[key] != filled[key]:
            raise ConfigError(f"{config.deepspeed}: {key}={merged[key]} disagrees with the run config "
                              f"({filled[key]}); set it to \"auto\" and use --batch-size/--micro-batch-size")
    for key in ("optimizer", "scheduler"):
        if key in merged:
            raise ConfigError(f"{config.deepspeed}: remove the {key!r} section; npp builds AdamW and "
                              f"drives the per-stage learning rate itself")
    return merged


class ZeroStage(IntEnum):
    """What ZeRO shards over the processes; each stage shards what the one before it does, and more."""

    OFF = 0
    OPTIMIZER = 1
    GRADIENTS = 2
    WEIGHTS = 3


def zero_stage(ds_config: Mapping[str, Any]) -> ZeroStage:
    """The ZeRO stage of a DeepSpeed dict (read once, by npp.plan)."""
    stage = ds_config.get("zero_optimization", {}).get("stage", 0)
    check(stage in list(ZeroStage), f"zero_optimization.stage={stage!r}: use 0, 1, 2 or 3 (ds_configs/*.json)")
    return ZeroStage(stage)


def offloads_optimizer(ds_config: Mapping[str, Any]) -> bool:
    offload = ds_config.get("zero_optimization", {}).get("offload_optimizer") or {}
    return offload.get("device", "none") in ("cpu", "nvme")


# ------------------------------------------------------------------------------------------------
# Ranks of extraction and evaluation
# ------------------------------------------------------------------------------------------------

@dataclass
class Ranks:
    """This process's place among the processes a launcher started; a single process needs no set-up."""

    rank: int = 0
    world: int = 1
    group: Any = None
    owns_process_group: bool = False

    @classmethod
    def join(cls) -> "Ranks":
        """Read the launcher's RANK/WORLD_SIZE; with several ranks, talk over a gloo group (CPU)."""
        if int(os.environ.get("WORLD_SIZE", "1")) == 1:
            return cls()
        import torch.distributed as dist

        owns = not dist.is_initialized()
        if owns:
            dist.init_process_group("gloo")
        # Barriers and small broadcasts only: gloo works whatever the caller's default backend is.
        group = dist.group.WORLD if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")
        return cls(dist.get_rank(), dist.get_world_size(), group, owns)

    def barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier(group=self.group)

    def total(self, value: int) -> int:
        """Sum of an integer over all ranks."""
        if self.world == 1:
            return value
        tensor = torch.tensor([value], dtype=torch.int64)
        torch.distributed.all_reduce(tensor, group=self.group)
        return int(tensor.item())

    def on_rank0(self, fn: Callable[[], Any]) -> Any:
        """Run fn on rank 0 only; every rank returns its result, or raises its error (no rank hangs)."""
        if self.world == 1:
            return fn()
        outcome: list[Any] = [None]
        if self.rank == 0:
            try:
                outcome = [(True, fn())]
            except Exception as err:  # noqa: BLE001 (any failure must reach the other ranks)
                outcome = [(False, err)]
        torch.distributed.broadcast_object_list(outcome, src=0, group=self.group)
        ok, value = outcome[0]
        if not ok:
            raise value
        return value

    def device(self, name: str | torch.device) -> torch.device:
        """'cuda' without an index means this rank's GPU (LOCAL_RANK) under a launcher."""
        device = torch.device(name)
        if device.type == "cuda" and device.index is None and self.world > 1:
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        return device

    def leave(self) -> None:
        if self.owns_process_group:
            torch.distributed.destroy_process_group()
