"""The trainer: one loop, the DeepSpeed engine everywhere, NTP or a coarse-to-fine NPP schedule.

Launch it the same way at every scale:

    # one process, CPU or one GPU (the embedded MNIST codes, a tiny model)
    npp train --name npp-tiny --model tiny --schedule.levels 2 --schedule.total_steps 2000
    python -m npp.train --config my_run.json --batch_size 128

    # several GPUs on one machine: the DeepSpeed launcher (or torchrun) and a ZeRO config
    deepspeed --num_gpus 8 npp/train.py --deepspeed ds_configs/zero2.json --config gpt_l.json

    # several machines: a hostfile ("node1 slots=8" per line), the same command on the first node
    deepspeed --hostfile hostfile --master_addr node1 npp/train.py --deepspeed ds_configs/zero3.json --config gpt_xxl.json

    torchrun --nproc_per_node 8 npp/train.py --deepspeed ds_configs/zero2.json --config gpt_l.json

Every option is a TrainConfig field (`--key value`, dotted for the schedule: `--schedule.levels 3`);
`--config` reads a JSON file first and flags override it. A run resumes from its latest checkpoint
unless `--no-resume` is given.

Determinism: the data order, the crop choice and every dropout mask are functions of (seed, step,
rank), so a resumed run continues exactly where the interrupted one was, without replaying data.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import math
import os
import shutil
import signal
import socket
import sys
import time
from contextlib import closing, nullcontext
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from npp.config import ConfigError, ModelConfig, ScheduleConfig, TrainConfig, cache_dir, dump_json, field_docs
from npp.data import CodeDataset
from npp.extract import mnist_codes
from npp.images import image_grid, save_png
from npp.model import GPT
from npp.patching import next_patch_loss
from npp.runs import RunDir
from npp.schedule import lr_at, plan_stages, stage_at
from npp.tokenizer_train import EMBEDDED_TOKENIZERS, load_embedded_tokenizer


class TrainingError(RuntimeError):
    """Training cannot go on (a non-finite loss, …); the message says why and what was kept."""


# --------------------------------------------------------------------------------------------
# Processes
# --------------------------------------------------------------------------------------------

def _free_port() -> int:
    with closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed() -> tuple[int, int, torch.device]:
    """Start torch.distributed through DeepSpeed; a plain `python` start becomes a world of one."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # must precede the deepspeed import
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=os.environ.get("MASTER_PORT", str(_free_port())))
    import deepspeed

    deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local)
        return rank, world, torch.device("cuda", local)
    return rank, world, torch.device("cpu")


# --------------------------------------------------------------------------------------------
# Data order
# --------------------------------------------------------------------------------------------

class GlobalOrder:
    """Which items each step trains on: sample k of the run (k = step · batch + j) is item
    perm_e[k mod N] of epoch e = k // N, with perm_e a permutation seeded by (seed, e).

    A pure function of the step, the same for any number of processes: rank r of W takes the r-th
    W-th of every global batch. Resuming needs nothing but the step.
    """

    def __init__(self, num_items: int, batch_size: int, seed: int):
        self.num_items, self.batch_size, self.seed = num_items, batch_size, seed
        self._perm: tuple[int, np.ndarray] | None = None

    def permutation(self, epoch: int) -> np.ndarray:
        if self._perm is None or self._perm[0] != epoch:
            self._perm = (epoch, np.random.default_rng((self.seed, epoch)).permutation(self.num_items))
        return self._perm[1]

    def items(self, step: int, rank: int = 0, world: int = 1) -> list[tuple[int, int]]:
        """(item index, epoch) pairs of this rank's share of the global batch of `step`."""
        share = self.batch_size // world
        first = step * self.batch_size + rank * share
        pairs = []
        for k in range(first, first + share):
            epoch = k // self.num_items
            pairs.append((int(self.permutation(epoch)[k % self.num_items]), epoch))
        return pairs


class _StepBatches(torch.utils.data.Sampler):
    """Micro-batches of (index, epoch) pairs from start_step to the end of the run."""

    def __init__(self, order: GlobalOrder, start: int, end: int, rank: int, world: int, micro: int):
        self.order, self.start, self.end = order, start, end
        self.rank, self.world, self.micro = rank, world, micro

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for step in range(self.start, self.end):
            pairs = self.order.items(step, self.rank, self.world)
            for i in range(0, len(pairs), self.micro):
                yield pairs[i:i + self.micro]

    def __len__(self) -> int:
        return (self.end - self.start) * (self.order.batch_size // self.world // self.micro)


def _is_rank0() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def open_data(spec: str, seed: int) -> CodeDataset:
    """An embedded data set by name (its codes extracted once into the cache) or an `npp extract` folder."""
    if spec in EMBEDDED_TOKENIZERS:
        # Extracted once (all ranks share the work), then read from the cache by every later run.
        directory = mnist_codes(load_embedded_tokenizer(spec), cache_dir() / "codes", "train",
                                progress=_is_rank0()).directory
    elif os.path.isdir(spec):
        directory = spec
    else:
        raise ConfigError(f"TrainConfig.data={spec!r} is neither an embedded data set "
                          f"({', '.join(EMBEDDED_TOKENIZERS)}) nor a folder: give a folder written by npp extract")
    return CodeDataset(directory, seed=seed)


# --------------------------------------------------------------------------------------------
# DeepSpeed configuration
# --------------------------------------------------------------------------------------------

def deepspeed_config(config: TrainConfig, world: int, bf16: bool) -> dict[str, Any]:
    """The user's DeepSpeed JSON with its "auto" values filled from the run config."""
    micro = config.micro_batch_size or config.batch_size // world
    if config.batch_size % (micro * world):
        raise ConfigError(f"TrainConfig.batch_size={config.batch_size} is not a multiple of "
                          f"micro_batch_size={micro} × {world} processes: change one of them")
    filled = {"train_batch_size": config.batch_size, "train_micro_batch_size_per_gpu": micro,
              "gradient_accumulation_steps": config.batch_size // (micro * world),
              "gradient_clipping": config.grad_clip, "steps_per_print": 10**12,
              "bf16": {"enabled": bf16}, "zero_optimization": {"stage": 0}}
    if not config.deepspeed:
        return filled
    user = json.loads(Path(config.deepspeed).read_text())

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
                              f"({filled[key]}); set it to \"auto\" and use --batch_size/--micro_batch_size")
    for key in ("optimizer", "scheduler"):
        if key in merged:
            raise ConfigError(f"{config.deepspeed}: remove the {key!r} section; npp builds AdamW and "
                              f"drives the per-stage learning rate itself")
    return merged


def zero_stage(ds_config: dict[str, Any]) -> int:
    return int(ds_config.get("zero_optimization", {}).get("stage", 0))


def offloads_optimizer(ds_config: dict[str, Any]) -> bool:
    offload = ds_config.get("zero_optimization", {}).get("offload_optimizer") or {}
    return offload.get("device", "none") in ("cpu", "nvme")


# --------------------------------------------------------------------------------------------
# The trainer
# --------------------------------------------------------------------------------------------

class Trainer:
    """Builds the model, data and DeepSpeed engine of a run; `train()` runs it to the end."""

    def __init__(self, config: TrainConfig, *, resume: bool = True):
        self.config = config
        self.run = RunDir(config.run_dir)
        self.rank, self.world, self.device = init_distributed()
        if config.batch_size % self.world:
            raise ConfigError(f"TrainConfig.batch_size={config.batch_size} does not split over "
                              f"{self.world} processes: use a multiple of {self.world}")
        self.bf16 = config.precision == "bf16" or (config.precision == "auto" and self.device.type == "cuda")
        if self.bf16 and self.device.type != "cuda":
            raise ConfigError("TrainConfig.precision='bf16' needs a GPU: use 'fp32' or 'auto' on the CPU")

        self.data = open_data(config.data, config.seed)
        self.model_config = ModelConfig.preset(config.model, vocab_size=self.data.vocab_size,
                                               num_classes=self.data.num_classes, grid=self.data.grid,
                                               **config.model_overrides)
        self.stages = plan_stages(config.schedule, grid=self.data.grid)
        self.order = GlobalOrder(len(self.data), config.batch_size, config.seed)

        self.start_step = 0
        resume_tag = self.run.latest_tag() if resume else None
        if resume_tag is None and self.rank == 0:  # a new run, or one that died before its first checkpoint
            self.run.write_config(config.to_dict())
            if self.run.metrics.exists():
                self.run.metrics.unlink()
        self.ds_config = deepspeed_config(config, self.world, self.bf16)
        if config.ema_decay and zero_stage(self.ds_config) == 3:
            raise ConfigError("TrainConfig.ema_decay needs full weights on every rank: use ZeRO-2 "
                              "(ds_configs/zero2.json) or set ema_decay to 0 with ZeRO-3")
        if resume_tag is not None:
            _check_same_experiment(self.run, config)
            self._prepare_resume(resume_tag)
        self.quick_eval = self._build_quick_eval() if config.eval_every else None
        self._build_engine()
        if resume_tag is not None:
            self._load_checkpoint(resume_tag)
        self._stop_signal: int | None = None

    # ---- building ------------------------------------------------------------------------

    def _build_engine(self) -> None:
        import deepspeed

        torch.manual_seed(self.config.seed)
        model = GPT(self.model_config)
        model.activation_checkpointing = self.config.activation_checkpointing
        groups = [{"params": [p for p in model.parameters() if p.dim() >= 2], "weight_decay": self.config.weight_decay},
                  {"params": [p for p in model.parameters() if p.dim() < 2], "weight_decay": 0.0}]
        if offloads_optimizer(self.ds_config):
            # With the optimizer state on the host, DeepSpeed steps it with its vectorised CPU Adam.
            from deepspeed.ops.adam import DeepSpeedCPUAdam

            optimizer = DeepSpeedCPUAdam(groups, lr=self.config.schedule.lr, betas=self.config.betas,
                                         adamw_mode=True)
        else:
            optimizer = torch.optim.AdamW(groups, lr=self.config.schedule.lr, betas=self.config.betas,
                                          fused=self.device.type == "cuda")
        self.engine, self.optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer,
                                                                 config=self.ds_config)
        self.micro = self.engine.train_micro_batch_size_per_gpu()
        self.accum = self.engine.gradient_accumulation_steps()
        if self.config.compile:
            self.engine.compile()
        self.ema: dict[str, torch.Tensor] | None = None
        if self.config.ema_decay:
            self.ema = {k: v.detach().float().clone() for k, v in self.engine.module.state_dict().items()}

    def _build_quick_eval(self) -> Any:
        """Resolved before the engine exists, so a missing reference or weights file fails at once."""
        from npp.evaluate import EvalConfig, QuickEval, tokenizer_for, trained_on_mnist

        c = self.config
        settings = EvalConfig(num_samples=c.eval_samples, batch_size=min(c.eval_samples, 100),
                              cfg_scale=c.eval_cfg_scale, reference=c.eval_reference,
                              inception_weights=c.eval_inception_weights or None,
                              metrics=("fid", "isc", "prc"), save_png=False, progress=False)
        info = tokenizer_reference(c.data, self.data.manifest)
        vq = tokenizer_for(info, self.data.vocab_size, where=f"TrainConfig.data={c.data!r}")
        return QuickEval(settings, vq.to(self.device).eval(), trained_on_mnist(info), self.data.grid)

    # ---- one step --------------------------------------------------------------------------

    def train_step(self, step: int, micro_batches: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
        """One optimizer step over this rank's micro-batches; returns the loss averaged over ranks."""
        stage = stage_at(self.stages, step)
        lr = lr_at(self.config.schedule, self.stages, step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        # Dropout and class-label drop draw from a generator seeded by (seed, step, rank).
        torch.manual_seed(int(np.random.SeedSequence((self.config.seed, step, self.rank)).generate_state(1)[0]))
        total = torch.zeros((), device=self.device)
        for tokens_BL, labels_B in micro_batches:
            tokens_BL, labels_B = tokens_BL.to(self.device), labels_B.to(self.device)
            logits_BNV = self.engine(tokens_BL, labels_B, patch_size=stage.patch_size)
            loss = next_patch_loss(logits_BNV, tokens_BL, stage.patch_size)
            self.engine.backward(loss)
            self.engine.step()
            total += loss.detach().float()
        # One all-reduce carries the mean loss and the stop request (a signal seen by any rank).
        flags = torch.stack([total / len(micro_batches),
                             torch.tensor(float(self._stop_signal is not None), device=self.device)])
        torch.distributed.all_reduce(flags)
        loss_value = flags[0].item() / self.world
        self._stop_everywhere = flags[1].item() > 0
        if not math.isfinite(loss_value):
            last = self.run.latest_tag()
            raise TrainingError(f"loss became {loss_value} at step {step} (stage {stage.index}, "
                                f"{stage.patch_size}×{stage.patch_size} patches, lr {lr:.3g}); the last good "
                                f"checkpoint {last or '(none yet)'} is kept: lower schedule.lr or raise "
                                f"schedule.warmup_steps, then resume")
        if self.ema is not None:
            self._update_ema()
        return loss_value

    @torch.no_grad()
    def _update_ema(self) -> None:
        d = self.config.ema_decay
        for name, value in self.engine.module.state_dict().items():
            self.ema[name].mul_(d).add_(value.float(), alpha=1 - d)

    # ---- the loop --------------------------------------------------------------------------

    def train(self) -> Path | None:
        """Run from the current step to the end; returns the export folder (None if stopped early)."""
        config, schedule = self.config, self.config.schedule
        if self.rank == 0:
            self.run.path.mkdir(parents=True, exist_ok=True)
            self.run.samples.mkdir(exist_ok=True)
            print(self.summary(), flush=True)
        loader = torch.utils.data.DataLoader(
            _EpochItems(self.data),
            batch_sampler=_StepBatches(self.order, self.start_step, schedule.total_steps, self.rank,
                                       self.world, self.micro),
            num_workers=config.num_workers, pin_memory=self.device.type == "cuda")
        micro_batches = iter(loader)
        logger = _Logger(self) if self.rank == 0 else None
        previous = {signal.SIGINT: signal.getsignal(signal.SIGINT), signal.SIGTERM: signal.getsignal(signal.SIGTERM)}
        for sig in previous:
            signal.signal(sig, self._on_signal)
        self._stop_everywhere = False
        try:
            for step in range(self.start_step, schedule.total_steps):
                batch = [next(micro_batches) for _ in range(self.accum)]
                started = time.perf_counter()
                loss = self.train_step(step, batch)
                if logger is not None:
                    logger.step(step, loss, time.perf_counter() - started)
                done = step + 1
                at_stage_end = any(done == s.end for s in self.stages)
                if self._stop_everywhere:
                    self.save_checkpoint(done)
                    if logger is not None:
                        logger.close()
                        print(f"stopped by a signal at step {done}; checkpoint saved. Resume with the "
                              f"same command.", flush=True)
                    return None
                if done % config.ckpt_every == 0 or at_stage_end:
                    self.save_checkpoint(done)
                if self.quick_eval is not None and (done % config.eval_every == 0 or at_stage_end):
                    self.evaluate_now(done, logger)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        if logger is not None:
            logger.close()
        export = self.export()
        return export

    def evaluate_now(self, step: int, logger: _Logger | None) -> None:
        """The periodic evaluation, on rank 0 while the others wait. Sampling draws from its own
        generators and leaves the training RNG alone, so a run with evaluations trains the same."""
        import deepspeed

        params = list(self.engine.module.parameters())
        # ZeRO-3 holds a shard of every weight per rank: gather them for the duration of the sampling.
        gathered = deepspeed.zero.GatheredParameters(params) if zero_stage(self.ds_config) == 3 else nullcontext()
        with gathered:
            if self.rank == 0:
                started = time.perf_counter()
                metrics, images, labels = self.quick_eval(self.engine.module)
                # Labels are balanced (sample i asks for class i mod C): with C ≤ 10 columns, one class each.
                columns = min(self.model_config.num_classes, 10)
                grid = save_png(image_grid(images[: 8 * columns], nrow=columns),
                                self.run.samples / f"step-{step:08d}.png")
                assert logger is not None
                logger.evaluation(step, metrics, time.perf_counter() - started, grid)
        torch.distributed.barrier()

    def _on_signal(self, signum: int, frame: Any) -> None:
        # Finish the step in flight, then checkpoint at the same step on every rank.
        self._stop_signal = signum

    def summary(self) -> str:
        c, m = self.config, self.model_config
        params = sum(p.numel() for p in self.engine.module.parameters())
        lines = [f"npp train: {c.run_dir}",
                 f"  model {c.model}: {params / 1e6:.2f}M parameters ({m.n_layer} layers, dim {m.dim}, "
                 f"{m.n_head} heads), vocab {m.vocab_size}, {m.num_classes} classes, grid {m.grid}×{m.grid}",
                 f"  data {c.data}: {len(self.data)} images × {self.data.num_variants} crop variants",
                 f"  {self.world} process(es) on {self.device.type}, {'bf16' if self.bf16 else 'fp32'}, "
                 f"ZeRO stage {zero_stage(self.ds_config)}, batch {c.batch_size} = {self.micro} × "
                 f"{self.accum} accumulation × {self.world}",
                 f"  model state ≈ {16 * params / 2**30 / (self.world if zero_stage(self.ds_config) else 1):.2f} GiB "
                 f"per process (16 bytes/parameter, sharded by ZeRO)"]
        for s in self.stages:
            n = (m.grid // s.patch_size) ** 2
            lines.append(f"  stage {s.index}: steps {s.start}–{s.end}, {s.patch_size}×{s.patch_size} patches, "
                         f"{n} positions, {c.batch_size * n} tokens/step, "
                         f"{m.flops_per_sample(s.patch_size) * c.batch_size / 1e12:.3f} TFLOP/step")
        if self.start_step:
            lines.append(f"  resuming at step {self.start_step}")
        return "\n".join(lines)

    # ---- checkpoints -----------------------------------------------------------------------

    def save_checkpoint(self, step: int) -> None:
        """Write a checkpoint, then point `latest` at it; older ones beyond keep_last are removed."""
        tag = f"step-{step:08d}"
        self.run.checkpoints.mkdir(parents=True, exist_ok=True)
        # universal_checkpoint_info lets DeepSpeed's ds_to_universal re-shard this checkpoint for
        # another number of processes (no tensor parallelism here, so it holds only its version).
        from deepspeed.checkpoint.constants import (UNIVERSAL_CHECKPOINT_INFO, UNIVERSAL_CHECKPOINT_VERSION_KEY,
                                                    UNIVERSAL_CHECKPOINT_VERSION_VALUE)

        self.engine.save_checkpoint(str(self.run.checkpoints), tag=tag, save_latest=False, client_state={
            "step": step, UNIVERSAL_CHECKPOINT_INFO: {UNIVERSAL_CHECKPOINT_VERSION_KEY: UNIVERSAL_CHECKPOINT_VERSION_VALUE}})
        if self.rank == 0:
            folder = self.run.checkpoints / tag
            if self.ema is not None:
                from safetensors.torch import save_file

                save_file({k: v.contiguous().cpu() for k, v in self.ema.items()}, str(folder / "ema.safetensors"))
            dump_json({"step": step, "world_size": self.world, "zero_stage": zero_stage(self.ds_config),
                       "stage": stage_at(self.stages, max(step - 1, 0)).index}, folder / "meta.json")
            self.run.set_latest(tag)
            # Stage ends stay: they are the models each stage produced (a few at most).
            stage_ends = {f"step-{s.end:08d}" for s in self.stages}
            for old in self.run.checkpoint_tags()[:-self.config.keep_last]:
                if old not in stage_ends:
                    shutil.rmtree(self.run.checkpoints / old, ignore_errors=True)
        torch.distributed.barrier()

    def _prepare_resume(self, tag: str) -> None:
        meta = json.loads((self.run.checkpoints / tag / "meta.json").read_text())
        self._resume_universal = meta["world_size"] != self.world and meta["zero_stage"] > 0
        if self._resume_universal:
            universal = self.run.checkpoints / f"{tag}-universal"
            if self.rank == 0 and not universal.is_dir():
                _to_universal(self.run.checkpoints / tag, universal)
            torch.distributed.barrier()
            self.ds_config["checkpoint"] = {"load_universal": True}

    def _load_checkpoint(self, tag: str) -> None:
        load_tag = f"{tag}-universal" if self._resume_universal else tag
        _, client = self.engine.load_checkpoint(str(self.run.checkpoints), tag=load_tag,
                                                load_optimizer_states=True, load_lr_scheduler_states=False)
        if client is None:
            raise TrainingError(f"{self.run.checkpoints / tag} could not be loaded: delete that folder "
                                f"(the previous checkpoint is then used) or start with --no-resume")
        self.start_step = int(json.loads((self.run.checkpoints / tag / "meta.json").read_text())["step"])
        ema_file = self.run.checkpoints / tag / "ema.safetensors"
        if self.ema is not None and ema_file.is_file():
            from safetensors.torch import load_file

            self.ema = {k: v.to(self.device) for k, v in load_file(str(ema_file)).items()}
        if self.rank == 0:
            self.run.truncate_metrics(self.start_step)

    # ---- export ----------------------------------------------------------------------------

    def export(self) -> Path:
        """Write runs/<name>/export (the EMA weights when EMA is on) from the latest checkpoint."""
        torch.distributed.barrier()
        if self.rank == 0:
            export_run(self.run.path)
        torch.distributed.barrier()
        return self.run.export

    def close(self) -> None:
        del self.engine, self.optimizer
        gc.collect()
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


class _EpochItems(torch.utils.data.Dataset):
    """Serves (index, epoch) pairs: the epoch chooses the crop variant (see CodeDataset)."""

    def __init__(self, data: CodeDataset):
        self.data = data

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, pair: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        index, epoch = pair
        return self.data.item(index, epoch)


# How a run is observed and sharded may change between resumes; what it computes may not. The name is
# only the folder, so a copied or renamed run directory resumes too.
_RESUMABLE_CHANGES = {"name", "runs_dir", "deepspeed", "num_workers", "log_every", "ckpt_every", "keep_last",
                      "tensorboard", "wandb_project", "progress", "micro_batch_size", "activation_checkpointing",
                      "compile", "eval_every", "eval_samples", "eval_cfg_scale", "eval_reference",
                      "eval_inception_weights"}


def experiment_changes(saved: dict[str, Any], config: TrainConfig) -> list[str]:
    """Fields in which config would train something else than the run saved as `saved` (its config.json)."""
    # Read back through TrainConfig, so that fields added since the run was saved take their defaults.
    saved = TrainConfig.from_dict(saved).to_dict()
    return sorted(k for k, v in config.to_dict().items() if k not in _RESUMABLE_CHANGES and saved.get(k) != v)


def _check_same_experiment(run: RunDir, config: TrainConfig) -> None:
    changed = experiment_changes(run.read_config(), config)
    if changed:
        raise ConfigError(f"{run.path} was started with other values of {', '.join(changed)}: resume it "
                          f"unchanged, give a new --name, or pass --no-resume to start it again")


def _to_universal(source: Path, target: Path) -> None:
    """DeepSpeed's universal checkpoint: optimizer state by parameter, loadable at any world size."""
    from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    args = argparse.Namespace(input_folder=str(source), output_folder=str(tmp), num_extract_workers=1,
                              num_merge_workers=1, keep_temp_folder=False, strict=True,
                              inject_missing_state=False)
    ds_to_universal(args)
    os.replace(tmp, target)


# --------------------------------------------------------------------------------------------
# Logging
# --------------------------------------------------------------------------------------------

class _Logger:
    """metrics.jsonl rows, TensorBoard, optional wandb and the progress bar (rank 0 only)."""

    def __init__(self, trainer: Trainer):
        self.trainer = trainer
        c = trainer.config
        m = trainer.model_config
        self.stages = trainer.stages
        self.flops = {s.index: m.flops_per_sample(s.patch_size) for s in self.stages}
        rows = trainer.run.read_metrics()
        self.tokens_seen = rows[-1]["tokens_seen"] if rows else 0
        self.flops_seen = rows[-1]["flops_seen"] if rows else 0.0
        self.pending: list[dict[str, Any]] = []
        self.window: list[tuple[float, float]] = []
        self.tb = None
        if c.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(trainer.run.tensorboard), purge_step=trainer.start_step)
        self.wandb = None
        if c.wandb_project:
            import wandb

            self.wandb = wandb.init(project=c.wandb_project, name=c.name, config=c.to_dict(), resume="allow")
        self.bar = None
        if c.progress:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=c.schedule.total_steps, initial=trainer.start_step, unit="step",
                            dynamic_ncols=True)

    def step(self, step: int, loss: float, seconds: float) -> None:
        t, c = self.trainer, self.trainer.config
        stage = stage_at(self.stages, step)
        self.tokens_seen += c.batch_size * t.model_config.seq_len
        self.flops_seen += c.batch_size * self.flops[stage.index]
        self.window = (self.window + [(loss, seconds)])[-c.log_every:]
        imgs_per_s = c.batch_size * len(self.window) / sum(s for _, s in self.window)
        done = step + 1
        if done % c.log_every == 0 or done == stage.end:
            row = {"step": done, "stage": stage.index, "patch_size": stage.patch_size, "loss": loss,
                   "lr": lr_at(c.schedule, self.stages, step), "tokens_seen": self.tokens_seen,
                   "flops_seen": self.flops_seen, "imgs_per_s": imgs_per_s, "time": time.time()}
            t.run.append_metrics([row])
            if self.tb is not None:
                for key in ("loss", "lr", "imgs_per_s", "patch_size"):
                    self.tb.add_scalar(f"train/{key}", row[key], done)
                self.tb.add_scalar("train/loss_vs_gflops", loss, int(self.flops_seen / 1e9))
            if self.wandb is not None:
                self.wandb.log(row, step=done)
        if self.bar is not None:
            self.bar.set_postfix_str(f"stage {stage.index} ({stage.patch_size}×{stage.patch_size}) "
                                     f"loss {loss:.4f} {imgs_per_s:.0f} img/s", refresh=False)
            self.bar.update(1)

    def evaluation(self, step: int, metrics: dict[str, float], seconds: float, grid: Path) -> None:
        """An eval row: the metrics with the step's stage, tokens and FLOPs, for FID-vs-step/FLOPs curves."""
        t, c = self.trainer, self.trainer.config
        stage = stage_at(self.stages, step - 1)
        row = {"step": step, "stage": stage.index, "patch_size": stage.patch_size, "eval": True,
               **metrics, "eval_samples": c.eval_samples, "eval_cfg_scale": c.eval_cfg_scale,
               "tokens_seen": self.tokens_seen, "flops_seen": self.flops_seen, "eval_seconds": seconds,
               "samples": str(grid.relative_to(t.run.path)), "time": time.time()}
        t.run.append_metrics([row])
        if self.tb is not None:
            for key, value in metrics.items():
                self.tb.add_scalar(f"eval/{key}", value, step)
        if self.wandb is not None:
            self.wandb.log({f"eval/{k}": v for k, v in metrics.items()}, step=step)
        if self.bar is not None:
            shown = ", ".join(f"{k} {v:.3g}" for k, v in metrics.items() if k in ("fid", "is", "class_accuracy"))
            self.bar.write(f"step {step}: {shown} ({c.eval_samples} samples, {seconds:.0f} s) -> {grid}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


# --------------------------------------------------------------------------------------------
# Export (no engine needed: it reads the checkpoint files)
# --------------------------------------------------------------------------------------------

def tokenizer_reference(data: str, manifest: dict[str, Any]) -> dict[str, Any]:
    """What an export's tokenizer.json holds: the data spec, the source of the codes, and the
    tokenizer's fingerprint, path and config, so evaluation can decode without being told how."""
    return {"data": data, "source": manifest.get("source"), **manifest.get("tokenizer", {})}


def load_checkpoint_model(run_dir: str | os.PathLike, tag: str | None = None) -> GPT:
    """The model of one checkpoint of a run (default: the latest), in fp32 and eval mode: EMA weights
    when the run keeps them. Stage-end checkpoints are never pruned, so every stage can be sampled.

    ZeRO shards of any stage are consolidated from the files, so this works on a machine without
    the GPUs that trained the run.
    """
    run = RunDir(run_dir)
    config = TrainConfig.from_dict(run.read_config())
    tag = tag or run.latest_tag()
    if tag is None:
        raise TrainingError(f"{run.path} has no complete checkpoint yet: train it first "
                            f"(npp train --config {run.config})")
    folder = run.checkpoints / tag
    if tag not in run.checkpoint_tags():
        raise TrainingError(f"{folder} is not a complete checkpoint of {run.path}: choose one of "
                            f"{', '.join(run.checkpoint_tags()) or '(none yet)'}")
    if (folder / "ema.safetensors").is_file():
        from safetensors.torch import load_file

        state = load_file(str(folder / "ema.safetensors"))
    else:
        state = _consolidated_state(run.checkpoints, tag)
    data = open_data(config.data, config.seed)
    model_config = ModelConfig.preset(config.model, vocab_size=data.vocab_size, num_classes=data.num_classes,
                                      grid=data.grid, **config.model_overrides)
    with torch.device("meta"):
        model = GPT(model_config)
    from npp.weights import load_strict

    return load_strict(model, {k: v.float() for k, v in state.items()}, str(folder)).eval()


def export_run(run_dir: str | os.PathLike) -> Path:
    """runs/<name>/export from the latest checkpoint: fp32 weights (EMA when kept), config, tokenizer."""
    run = RunDir(run_dir)
    config = TrainConfig.from_dict(run.read_config())
    model = load_checkpoint_model(run.path)
    tag = run.latest_tag()
    folder = run.checkpoints / tag
    data = open_data(config.data, config.seed)
    tmp = run.path / ".export.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    dump_json(tokenizer_reference(config.data, data.manifest), tmp / "tokenizer.json")
    dump_json({"run": str(run.path), "checkpoint": tag, "ema": (folder / "ema.safetensors").is_file()},
              tmp / "source.json")
    shutil.rmtree(run.export, ignore_errors=True)
    os.replace(tmp, run.export)
    return run.export


def _consolidated_state(checkpoints: Path, tag: str) -> dict[str, torch.Tensor]:
    meta = json.loads((checkpoints / tag / "meta.json").read_text())
    if meta["zero_stage"] > 0:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        return get_fp32_state_dict_from_zero_checkpoint(str(checkpoints), tag=tag)
    model_states = torch.load(checkpoints / tag / "mp_rank_00_model_states.pt", map_location="cpu",
                              weights_only=False)
    return model_states["module"]


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------

def _flag_type(f: dataclasses.Field) -> Any:
    kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    if kind == "bool":
        return lambda s: s.lower() in ("1", "true", "yes", "on")
    if kind.startswith(("dict", "list", "tuple")):
        return json.loads
    return {"int": int, "float": float}.get(kind, str)


def _add_fields(parser: argparse.ArgumentParser, cls: type, prefix: str = "") -> None:
    """--field (or --field-name) per dataclass field, its docstring as help; values are parsed
    as the field's type (JSON for dicts, lists and tuples; true/false for booleans)."""
    docs = field_docs(cls)
    for f in dataclasses.fields(cls):
        if f.name == "schedule":
            _add_fields(parser, ScheduleConfig, "schedule.")
            continue
        name = prefix + f.name
        spellings = dict.fromkeys([f"--{name}", f"--{name.replace('_', '-')}"])
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        parser.add_argument(*spellings, dest=name, type=_flag_type(f), default=None, metavar="V",
                            help=f"{docs.get(f.name, '')} (default: {json.dumps(default)})".replace("%", "%%"))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="npp train", description="Train a GPT with next-token or next-patch prediction. Every "
        "TrainConfig field is a flag; a JSON --config is read first and flags override it.")
    parser.add_argument("--config", help="JSON file with TrainConfig fields (schedule as a nested object)")
    parser.add_argument("--no-resume", action="store_true", help="start again even if the run has checkpoints")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    _add_fields(parser, TrainConfig)
    return parser


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    data: dict[str, Any] = {}
    if args.config:
        if not os.path.isfile(args.config):
            raise ConfigError(f"--config {args.config}: no such file")
        data = json.loads(Path(args.config).read_text())
    schedule = dict(data.get("schedule", {}))
    for key, value in vars(args).items():
        if value is None or key in ("config", "no_resume", "local_rank"):
            continue
        if key.startswith("schedule."):
            schedule[key.split(".", 1)[1]] = value
        else:
            data[key] = value
    data["schedule"] = schedule
    try:
        data["schedule"] = ScheduleConfig(**schedule)
    except TypeError as err:
        raise ConfigError(f"schedule: {err}") from None
    return TrainConfig.from_dict(data)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        config = config_from_args(args)
        plan_stages(config.schedule)  # fail on an impossible schedule before any process starts
        trainer = Trainer(config, resume=not args.no_resume)
    except ConfigError as err:
        print(f"npp train: error: {err}", file=sys.stderr)
        return 2
    try:
        export = trainer.train()
    except TrainingError as err:
        if trainer.rank == 0:
            print(f"npp train: error: {err}", file=sys.stderr)
        trainer.close()
        return 1
    if trainer.rank == 0 and export is not None:
        print(f"done: {config.run_dir} (export: {export})", flush=True)
    stopped = trainer._stop_signal
    trainer.close()
    return 128 + stopped if stopped else 0


if __name__ == "__main__":
    sys.exit(main())
