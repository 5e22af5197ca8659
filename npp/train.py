"""The trainer: one loop, the DeepSpeed engine everywhere, NTP or a coarse-to-fine NPP schedule.

Launch it the same way at every scale:

    # one process, CPU or one GPU (the embedded MNIST codes, a tiny model)
    npp train --name npp-tiny --model tiny --schedule.levels 2 --schedule.total-steps 2000
    python -m npp.train --config my_run.json --batch-size 128

    # several GPUs on one machine: the DeepSpeed launcher (or torchrun) and a ZeRO config
    deepspeed --num_gpus 8 npp/train.py --deepspeed ds_configs/zero2.json --config gpt_l.json

    # several machines: a hostfile ("node1 slots=8" per line), the same command on the first node
    deepspeed --hostfile hostfile --master_addr node1 npp/train.py --deepspeed ds_configs/zero3.json --config gpt_xxl.json

    torchrun --nproc_per_node 8 npp/train.py --deepspeed ds_configs/zero2.json --config gpt_l.json

Every option is a TrainConfig field (`--field-name value`, dotted for the schedule:
`--schedule.levels 3`); `--config` reads a JSON file first and flags override it. A run resumes from
its latest checkpoint unless `--no-resume` is given.

Determinism: the data order, the crop choice and every dropout mask are functions of (seed, step,
rank), so a resumed run continues exactly where the interrupted one was, without replaying data.
Neighbours: npp.plan (the run resolved once: config, stages, precision, DeepSpeed JSON), npp.batches
(data order), npp.checkpoints (writing, resuming, export), npp.trainlog (metrics rows, TensorBoard, progress bar).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import gc
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

from npp.batches import GlobalOrder, micro_batches, open_data
from npp.checkpoints import CheckpointMeta, Checkpointer
from npp.config import TrainConfig
from npp.distributed import init_distributed
from npp.errors import USER_ERRORS, TrainingError, check, require
from npp.flags import Parser, add_flags, fail, given, overlay, read_config_file
from npp.model import GPT
from npp.patching import next_patch_loss
from npp.periodic_eval import PeriodicEval
from npp.plan import RunPlan, plan_run
from npp.preflight import check_run
from npp.runs import RunDir, check_run_folder
from npp.schedule import lr_at, stage_at
from npp.stopping import StopRequest, end_lone_process_on_sigterm
from npp.threads import use_threads
from npp.trainfolder import lock_run, resumed_experiment, start_afresh
from npp.trainlog import MetricsLogger


def build_optimizer(model: GPT, config: TrainConfig, *, offload: bool) -> torch.optim.Optimizer:
    """AdamW with weight decay on the matrices only (not on norms, biases or other vectors)."""
    groups = [{"params": [p for p in model.parameters() if p.dim() >= 2], "weight_decay": config.weight_decay},
              {"params": [p for p in model.parameters() if p.dim() < 2], "weight_decay": 0.0}]
    if offload:
        # With the optimizer state on the host, DeepSpeed steps it with its vectorised CPU Adam.
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(groups, lr=config.schedule.lr, betas=config.betas, adamw_mode=True)
    # The fused kernel on the CPU too: one pass over the parameters instead of a loop of small ops.
    return torch.optim.AdamW(groups, lr=config.schedule.lr, betas=config.betas, fused=True)


class Trainer:
    """Builds the model, data and DeepSpeed engine of a run's plan (or config); `train()` runs it to the end."""

    def __init__(self, run: RunPlan | TrainConfig, *, resume: bool = True):
        plan = run if isinstance(run, RunPlan) else RunPlan.of(run)
        # Before any work, and recorded as the count in force: config.json and every metrics row carry it.
        config = dataclasses.replace(plan.config, threads=use_threads(plan.config.threads))
        self.plan = dataclasses.replace(plan, config=config)
        self.config, self.model_config, self.stages = config, plan.model, plan.stages
        self.run = RunDir(config.run_dir)
        self.rank, self.world, self.device = init_distributed()
        check(self.world == plan.world and self.device.type == plan.device,
              f"the run was planned for {plan.world} process(es) on {plan.device}, not the {self.world} on "
              f"{self.device.type} started: resolve its RunPlan under the launcher that runs it")
        self.stop = StopRequest()
        self._lock = lock_run(self.run, self.rank, self._everywhere)
        try:
            self._build(config, resume)
        except BaseException:
            self._unlock()  # a run refused here leaves no folder: the lock removes the empty ones it made
            raise

    def _build(self, config: TrainConfig, resume: bool) -> None:
        """Everything but the lock: done while holding it, so a second trainer changes nothing here."""
        if self.device.type == "cuda":  # the authors train with TF32 matmuls under autocast
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        # The plan checked everything that can be refused from the data's manifest; the codes are read below.
        self.tokenizer = self.plan.data.tokenizer
        # A model trained on codes no tokenizer can decode would be found out only at evaluation, hours later.
        elsewhere = self.tokenizer.check_decodes()
        if elsewhere and self.rank == 0:
            print(f"npp train: warning: {elsewhere}", file=sys.stderr, flush=True)
        self.ds_config = self.plan.engine_config()
        self.start_step, self.tokens_seen, self.flops_seen = 0, 0, 0.0
        resume_tag = self.run.latest_tag() if resume else None
        self.experiment = config.experiment_id() if resume_tag is None else resumed_experiment(self.run, config)
        self.periodic_eval = PeriodicEval(config, self.tokenizer, self.model_config, self.run, rank=self.rank,
                                          device=self.device, zero=self.plan.zero) if config.eval_every else None
        self.data = open_data(config.data, config.seed)
        self.order = GlobalOrder(len(self.data), config.batch_size, config.seed)
        if resume_tag is None:  # a new run, a run started again, or one that died before its first checkpoint
            if self.rank == 0:
                start_afresh(self.run, self.config)
            torch.distributed.barrier()
        else:
            self._prepare_resume()
        self._build_engine()
        if resume_tag is not None:
            self._resume()

    def _unlock(self) -> None:
        if getattr(self, "_lock", None) is not None:
            self._lock.release()
            self._lock = None

    # ---- building ------------------------------------------------------------------------

    def _build_engine(self) -> None:
        import deepspeed

        torch.manual_seed(self.config.seed)
        model = GPT(self.model_config)
        model.activation_checkpointing = self.config.activation_checkpointing
        optimizer = build_optimizer(model, self.config, offload=self.plan.offload)
        self.engine, self.optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer,
                                                                 config=self.ds_config)
        self.micro = self.engine.train_micro_batch_size_per_gpu()
        self.accum = self.engine.gradient_accumulation_steps()
        if self.plan.compile:
            self.engine.compile()
        self.ema: dict[str, torch.Tensor] | None = None
        if self.config.ema_decay:
            self.ema = {k: v.detach().float().clone() for k, v in self.engine.module.state_dict().items()}

    # ---- one step --------------------------------------------------------------------------

    def train_step(self, step: int, micro_batches: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """One optimizer step over this rank's micro-batches; returns this rank's mean loss as a tensor,
        not read back: the loop reads losses in one all-reduce every few steps (see `synchronise`), so the
        host keeps queueing work while the GPU computes."""
        stage = stage_at(self.stages, step)
        lr = lr_at(self.config.schedule, self.stages, step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        # Dropout and class-label drop draw from a generator seeded by (seed, step, rank).
        torch.manual_seed(int(np.random.SeedSequence((self.config.seed, step, self.rank)).generate_state(1)[0]))
        total = torch.zeros((), device=self.device)
        for tokens_BL, labels_B in micro_batches:
            tokens_BL, labels_B = tokens_BL.to(self.device), labels_B.to(self.device)
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.plan.precision == "amp-bf16"):
                logits_BNV = self.engine(tokens_BL, labels_B, patch_size=stage.patch_size)
                loss = next_patch_loss(logits_BNV, tokens_BL, stage.patch_size)
            self.engine.backward(loss)
            self.engine.step()
            total += loss.detach().float()
        if self.ema is not None:
            self._update_ema()
        self.tokens_seen += self.config.batch_size * self.model_config.seq_len
        self.flops_seen += self.config.batch_size * self.plan.flops_per_image[stage.index]
        return total / len(micro_batches)

    def synchronise(self, losses: list[tuple[int, torch.Tensor]]) -> float:
        """One all-reduce for the steps since the last one: their losses averaged over ranks, and the stop
        request (a signal seen by any rank). Raises on the first non-finite loss; returns the last loss."""
        stop = torch.tensor([float(self.stop.signum is not None)], device=self.device)
        values = torch.cat([torch.stack([loss for _, loss in losses]), stop])
        torch.distributed.all_reduce(values)
        *means, stopping = (values / torch.tensor([self.world] * len(losses) + [1.0], device=self.device)).tolist()
        self._stop_everywhere = stopping > 0
        for (step, _), value in zip(losses, means):
            if not math.isfinite(value):
                stage = stage_at(self.stages, step)
                raise TrainingError(f"loss became {value} at step {step} (stage {stage.index}, {stage.patch_size}×"
                                    f"{stage.patch_size} patches, lr {lr_at(self.config.schedule, self.stages, step):.3g}); "
                                    f"the last good checkpoint {self.run.latest_tag() or '(none yet)'} is kept: lower "
                                    f"schedule.lr or raise schedule.warmup_steps, then resume")
        return means[-1]

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
            self.run.samples.mkdir(parents=True, exist_ok=True)
            print(self.summary(), flush=True)
        batches = micro_batches(self.data, self.order, self.start_step, schedule.total_steps, rank=self.rank,
                                world=self.world, micro=self.micro, num_workers=config.num_workers,
                                pin_memory=self.device.type == "cuda")
        logger = MetricsLogger(config, self.run, self.start_step) if self.rank == 0 else None
        self._stop_everywhere = False
        pending: list[tuple[int, torch.Tensor]] = []
        since = time.perf_counter()
        with self.stop:
            for step in range(self.start_step, schedule.total_steps):
                pending.append((step, self.train_step(step, [next(batches) for _ in range(self.accum)])))
                done = step + 1
                stage = stage_at(self.stages, step)
                at_stage_end = done == stage.end
                log = done % config.log_every == 0 or at_stage_end
                save = done % config.ckpt_every == 0 or at_stage_end
                evaluate = self.periodic_eval is not None and (done % config.eval_every == 0 or at_stage_end)
                if logger is not None:
                    logger.advance(1)
                if not (log or save or evaluate):
                    continue
                loss = self.synchronise(pending)
                if logger is not None and log:
                    peak = torch.cuda.max_memory_allocated(self.device) if self.device.type == "cuda" else None
                    logger.steps(done, stage, loss, lr_at(schedule, self.stages, step), self.tokens_seen,
                                 self.flops_seen, steps=len(pending), seconds=time.perf_counter() - since,
                                 peak_memory=peak)
                pending, since = [], time.perf_counter()
                if self._stop_everywhere:
                    self.save_checkpoint(done)
                    if logger is not None:
                        logger.close()
                        print(f"stopped by a signal at step {done}; checkpoint saved. Resume with the "
                              f"same command.", flush=True)
                    return None
                if save:
                    self.save_checkpoint(done)
                if evaluate:
                    result = self.periodic_eval(self.engine.module, done)
                    if logger is not None and result is not None:
                        logger.evaluation(done, stage, result.metrics, self.tokens_seen, self.flops_seen,
                                          result.seconds, result.grid)
        if logger is not None:
            logger.close()
        return self.export()

    def summary(self) -> str:
        return self.plan.summary(params=sum(p.numel() for p in self.engine.module.parameters()),
                                 images=len(self.data), variants=self.data.num_variants, start_step=self.start_step)

    # ---- checkpoints (written, chosen and read by the Checkpointer) ---------------------------

    @functools.cached_property
    def checkpoints(self) -> Checkpointer:
        return Checkpointer(self.run, "npp train", rank=self.rank, agree=self._everywhere)

    def save_checkpoint(self, step: int) -> None:
        """Checkpoint this step on every rank; `latest` then names it, and older ones beyond keep_last go
        (stage ends stay)."""
        meta = CheckpointMeta(step=step, world_size=self.world, zero_stage=int(self.plan.zero),
                              stage=stage_at(self.stages, max(step - 1, 0)).index, model=self.model_config,
                              tokenizer=self.tokenizer, tokens_seen=self.tokens_seen, flops_seen=self.flops_seen,
                              experiment=self.experiment)
        self.checkpoints.save(self.engine, meta, ema=self.ema, keep_last=self.config.keep_last,
                              keep={RunDir.tag(s.end) for s in self.stages})
        torch.distributed.barrier()

    def _prepare_resume(self) -> None:
        """Before the engine exists: a checkpoint of another number of processes is loaded re-sharded
        (DeepSpeed's universal checkpoint, chosen at init)."""
        self._resume_universal = self.checkpoints.resume_needs_resharding(self.experiment, self.world)
        if self._resume_universal:
            self.ds_config["checkpoint"] = {"load_universal": True}

    def _resume(self) -> None:
        """Continue from the newest checkpoint that loads: its step, counters and EMA; the metrics logged
        after it are dropped, so no step is logged twice."""
        resumed = self.checkpoints.resume(self.engine, universal=self._resume_universal, with_ema=self.ema is not None)
        meta = resumed.meta
        self.start_step, self.tokens_seen, self.flops_seen = meta["step"], meta["tokens_seen"], meta["flops_seen"]
        if resumed.ema is not None:
            self.ema = {k: v.to(self.device) for k, v in resumed.ema.items()}
        if self.rank == 0:
            self.run.truncate_metrics(self.start_step)

    def _everywhere(self, ok: bool) -> bool:
        """Whether `ok` holds on every rank (one all-reduce)."""
        flag = torch.tensor([float(ok)], device=self.device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
        return bool(flag.item())

    # ---- export ----------------------------------------------------------------------------

    def export(self) -> Path:
        """Write runs/<name>/export (the EMA weights when EMA is on) from the latest checkpoint."""
        torch.distributed.barrier()
        if self.rank == 0:
            self.checkpoints.export()
        torch.distributed.barrier()
        return self.run.export

    def close(self) -> None:
        self._unlock()
        del self.engine, self.optimizer
        gc.collect()
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------

def build_parser() -> Parser:
    parser = Parser(prog="npp train", description="Train a GPT with next-token or next-patch prediction. Every "
                    "TrainConfig field is a flag; a JSON --config is read first and flags override it.")
    parser.add_argument("--config", help="JSON file with TrainConfig fields (schedule as a nested object)")
    parser.add_argument("--recipe", default="auto", help="the recipe the values not given come from: auto "
                        "(quickstart for debug and tiny, paper for B and larger), paper, llamagen, quickstart, or "
                        "none (TrainConfig's defaults); see docs/recipes.md")
    parser.add_argument("--no-resume", action="store_true", help="start again even if the run has checkpoints")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    add_flags(parser, TrainConfig, exclude=["recipe"])  # --recipe above chooses it, and records it
    return parser


def plan_from_args(args: argparse.Namespace) -> RunPlan:
    data = read_config_file(args.config, TrainConfig) if args.config else {}
    return plan_run(overlay(TrainConfig, data, given(args, TrainConfig, exclude=["recipe"])), args.recipe)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    end_lone_process_on_sigterm()  # the training loop stops at a checkpoint instead
    try:
        plan = plan_from_args(args)  # fails on an impossible schedule or data before any process starts
        check_run(plan)  # and on a run that cannot fit this machine
        check_run_folder(plan.config)  # and on a runs folder that is a file or read-only
        require("deepspeed", "npp train")
        trainer = Trainer(plan, resume=not args.no_resume)
    except USER_ERRORS as err:
        return fail("npp train", err)
    try:
        export = trainer.train()
    except TrainingError as err:
        if trainer.rank == 0:
            fail("npp train", err)
        trainer.close()
        return 2
    if trainer.rank == 0 and export is not None:
        print(f"done: {plan.config.run_dir} (export: {export})", flush=True)
    stopped = trainer.stop.signum
    trainer.close()
    return 128 + stopped if stopped else 0


if __name__ == "__main__":
    sys.exit(main())
