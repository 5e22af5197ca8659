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
import os
import math
import signal
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch

from npp.batches import GlobalOrder, micro_batches, open_data
from npp.checkpoints import CheckpointMeta, Checkpointer
from npp.config import TrainConfig
from npp.distributed import ZeroStage, init_distributed
from npp.errors import USER_ERRORS, ConfigError, TrainingError, check, require
from npp.flags import Parser, add_flags, fail, given, overlay, read_config_file
from npp.model import GPT
from npp.patching import next_patch_loss
from npp.plan import RunPlan, plan_run
from npp.preflight import check_run
from npp.lock import RunLock
from npp.runs import RunDir, check_run_folder
from npp.schedule import Stage, lr_at, stage_at
from npp.threads import use_threads
from npp.trainlog import MetricsLogger


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
        self._lock = self._lock_run()
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
        self._check_tokenizer()
        self.ds_config = self.plan.engine_config()
        self.start_step, self.tokens_seen, self.flops_seen = 0, 0, 0.0
        resume_tag = self.run.latest_tag() if resume else None
        self.experiment = config.experiment_id()
        if resume_tag is not None:
            saved = self.run.read_config()
            changed = config.changes_from(saved)
            # The run's own identity: the same data spelled otherwise (./codes/x/, a symlink) is the same experiment.
            self.experiment = TrainConfig.from_dict(saved).experiment_id()
            if changed:
                raise ConfigError(f"{self.run.path} was started with other values of {', '.join(changed)}: resume "
                                  f"it unchanged, give a new --name, or pass --no-resume to start it again")
        self.quick_eval = self._build_quick_eval() if config.eval_every else None

        self.data = open_data(config.data, config.seed)
        self.order = GlobalOrder(len(self.data), config.batch_size, config.seed)
        if resume_tag is None:  # a new run, a run started again, or one that died before its first checkpoint
            if self.rank == 0:
                self._start_afresh()
            torch.distributed.barrier()
        if resume_tag is not None:
            self._prepare_resume()
        self._build_engine()
        if resume_tag is not None:
            self._resume()
        self._stop_signal: int | None = None

    # ---- the run's lock ------------------------------------------------------------------

    def _lock_run(self) -> RunLock | None:
        """Rank 0 takes RUN/.lock before anything in the folder is read or written (a second trainer on the
        folder is refused in one line naming the first); every rank learns whether it got it. Rank 0 then
        removes what an export interrupted by a kill left. Returns the lock rank 0 took (None elsewhere)."""
        lock, refusal = None, None
        if self.rank == 0:
            try:
                lock = self.run.lock()
                if not lock.acquire("npp train"):
                    lock = None  # this process holds it already (a Trainer before this one): it stays held
                self.run.remove_partial_exports("npp train")
            except TrainingError as err:
                refusal = err
        if not self._everywhere(refusal is None):
            raise refusal or TrainingError(f"{self.run.path} is in use by another process (rank 0 says which)")
        return lock

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
        groups = [{"params": [p for p in model.parameters() if p.dim() >= 2], "weight_decay": self.config.weight_decay},
                  {"params": [p for p in model.parameters() if p.dim() < 2], "weight_decay": 0.0}]
        if self.plan.offload:
            # With the optimizer state on the host, DeepSpeed steps it with its vectorised CPU Adam.
            from deepspeed.ops.adam import DeepSpeedCPUAdam

            optimizer = DeepSpeedCPUAdam(groups, lr=self.config.schedule.lr, betas=self.config.betas,
                                         adamw_mode=True)
        else:
            # The fused kernel on the CPU too: one pass over the parameters instead of a loop of small ops.
            optimizer = torch.optim.AdamW(groups, lr=self.config.schedule.lr, betas=self.config.betas, fused=True)
        self.engine, self.optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer,
                                                                 config=self.ds_config)
        self.micro = self.engine.train_micro_batch_size_per_gpu()
        self.accum = self.engine.gradient_accumulation_steps()
        if self.plan.compile:
            self.engine.compile()
        self.ema: dict[str, torch.Tensor] | None = None
        if self.config.ema_decay:
            self.ema = {k: v.detach().float().clone() for k, v in self.engine.module.state_dict().items()}

    def _check_tokenizer(self) -> None:
        """A model trained on codes no tokenizer can decode would be found out only at evaluation, hours later."""
        elsewhere = self.tokenizer.check_decodes()
        if elsewhere and self.rank == 0:
            print(f"npp train: warning: {elsewhere}", file=sys.stderr, flush=True)

    def _build_quick_eval(self) -> Any:
        """Resolved before the engine exists, so a missing reference or weights file fails at once."""
        from npp.evaluate import EvalConfig, QuickEval

        c = self.config
        settings = EvalConfig(num_samples=c.eval_samples, batch_size=min(c.eval_samples, 100),
                              sampler=c.eval_sampler, reference=c.eval_reference,
                              inception_weights=c.eval_inception_weights or None,
                              metrics=("fid", "isc", "prc"), save_png=False, progress=False)
        vq = self.tokenizer.load(where=f"TrainConfig.data={c.data!r}")
        return QuickEval(settings, vq.to(self.device).eval(), self.tokenizer.on_embedded_data, self.model_config.grid)

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
        stop = torch.tensor([float(self._stop_signal is not None)], device=self.device)
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
        previous = {signal.SIGINT: signal.getsignal(signal.SIGINT), signal.SIGTERM: signal.getsignal(signal.SIGTERM)}
        for sig in previous:
            signal.signal(sig, self._on_signal)
        self._stop_everywhere = False
        pending: list[tuple[int, torch.Tensor]] = []
        since = time.perf_counter()
        try:
            for step in range(self.start_step, schedule.total_steps):
                pending.append((step, self.train_step(step, [next(batches) for _ in range(self.accum)])))
                done = step + 1
                stage = stage_at(self.stages, step)
                at_stage_end = done == stage.end
                log = done % config.log_every == 0 or at_stage_end
                save = done % config.ckpt_every == 0 or at_stage_end
                evaluate = self.quick_eval is not None and (done % config.eval_every == 0 or at_stage_end)
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
                    self.evaluate_now(done, stage, logger)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        if logger is not None:
            logger.close()
        return self.export()

    def evaluate_now(self, step: int, stage: Stage, logger: MetricsLogger | None) -> None:
        """The periodic evaluation, on rank 0 while the others wait. Sampling draws from its own
        generators and leaves the training RNG alone, so a run with evaluations trains the same."""
        import deepspeed

        from npp.images import image_grid, save_png

        params = list(self.engine.module.parameters())
        # ZeRO-3 holds a shard of every weight per rank: gather them for the duration of the sampling.
        gathered = deepspeed.zero.GatheredParameters(params) if self.plan.zero == ZeroStage.WEIGHTS \
            else nullcontext()
        with gathered:
            if self.rank == 0:
                started = time.perf_counter()
                metrics, images, _ = self.quick_eval(self.engine.module)
                # Labels are balanced (sample i asks for class i mod C): with C ≤ 10 columns, one class each.
                columns = min(self.model_config.num_classes, 10)
                grid = save_png(image_grid(images[: 8 * columns], nrow=columns),
                                self.run.samples / f"{RunDir.tag(step)}.png")
                assert logger is not None
                logger.evaluation(step, stage, metrics, self.tokens_seen, self.flops_seen,
                                  time.perf_counter() - started, grid)
        torch.distributed.barrier()

    def _on_signal(self, signum: int, frame: Any) -> None:
        # Finish the step in flight, then checkpoint at the same step on every rank.
        self._stop_signal = signum

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

    def _start_afresh(self) -> None:
        """Write the run's config; what an earlier experiment left in the folder is moved aside first, so
        that no later resume can mistake its checkpoints for this run's (nothing is deleted)."""
        moved = self.run.set_aside()
        if moved is not None:
            print(f"npp train: starting {self.run.path} again; the files of its previous run are in {moved} "
                  f"(delete that folder when you no longer need them)", flush=True)
        self.run.write_config(self.config.to_dict())
        self.run.metrics.unlink(missing_ok=True)

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


def _end_on_signal(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if os.environ.get("WORLD_SIZE", "1") == "1":
        # Outside the training loop (which stops at a checkpoint instead), SIGTERM ends a lone process through
        # its `finally` blocks and exit hooks: the partial export is removed and the run's lock given back.
        # Not with several ranks: a rank waiting in a collective would never see the exception.
        signal.signal(signal.SIGTERM, _end_on_signal)
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
    stopped = trainer._stop_signal
    trainer.close()
    return 128 + stopped if stopped else 0


if __name__ == "__main__":
    sys.exit(main())
