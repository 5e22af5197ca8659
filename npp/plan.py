"""A run resolved once: the flags, the recipe and the data's facts become one frozen RunPlan.

What the preflight, the Trainer, its start-up summary and the train notebook need before any code is read
or any model built is worked out here, once, and only read after: the run config (the recipe's values with
the flags on top, lengths in epochs made steps with the data set's size), the data's facts, the model's
architecture, the stages, the precision on this device, the DeepSpeed JSON with its "auto" values filled,
the ZeRO stage, and how one process holds the model (what the memory estimate reads).

    plan = plan_run({"model": "tiny", "schedule": {"levels": 2}}, "auto")   # flags, recipe → plan
    check_run(plan)                                                           # npp.preflight: will it fit?
    Trainer(plan).train()                                                     # npp.train
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Mapping

from npp.config import ModelConfig, TrainConfig
from npp.codes import read_manifest
from npp.data import MNIST_CLASSES, MNIST_SIZE, mnist_count
from npp.distributed import ZeroStage, deepspeed_config, offloads_optimizer, zero_stage
from npp.errors import ConfigError, check
from npp.preflight import Estimate, Plan, estimate
from npp.recipes import resolve
from npp.schedule import Stage, plan_stages
from npp.tokenizer import EMBEDDED_TOKENIZERS
from npp.tokenref import TokenizerRef


@dataclass(frozen=True)
class DataFacts:
    """What a run needs to know of its data before reading any of it: the model's shape (grid,
    vocabulary, classes), the data set's size (for lengths in epochs) and the tokenizer reference."""

    count: int
    grid: int
    vocab_size: int
    num_classes: int
    tokenizer: TokenizerRef
    """Which tokenizer decodes the codes: kept in every checkpoint, written as the export's tokenizer.json."""


def data_facts(spec: str) -> DataFacts:
    """The facts of a data spec, from the manifest of an `npp extract` folder, or for an embedded data set
    from its shipped tokenizer and the idx header: nothing is extracted or loaded."""
    if spec in EMBEDDED_TOKENIZERS:
        tokenizer = TokenizerRef.shipped(spec)
        return DataFacts(mnist_count("train"), MNIST_SIZE // tokenizer.config.downsample,
                         tokenizer.config.codebook_size, len(MNIST_CLASSES), tokenizer)
    if not os.path.isdir(spec):
        raise ConfigError(f"TrainConfig.data={spec!r} is neither an embedded data set "
                          f"({', '.join(EMBEDDED_TOKENIZERS)}) nor a folder: give a folder written by npp extract")
    manifest = read_manifest(spec)
    return DataFacts(manifest["valid"], manifest["grid"][0], manifest["vocab_size"], len(manifest["classes"]),
                     TokenizerRef.of_data(spec, manifest))


def model_for(config: TrainConfig, facts: DataFacts) -> ModelConfig:
    """The architecture a run trains: its preset and overrides, with the data's grid, vocabulary and classes."""
    return ModelConfig.preset(config.model, vocab_size=facts.vocab_size, num_classes=facts.num_classes,
                              grid=facts.grid, **config.model_overrides)


def precision_on(config: TrainConfig, device: str) -> str:
    """The precision a run trains with on a device type ("cuda" or "cpu"): fp32; amp-bf16, torch autocast
    bf16 over fp32 weights, gradients and residual stream (the authors'); or bf16, DeepSpeed's bf16 mode."""
    if config.precision == "auto":
        return "amp-bf16" if device == "cuda" else "fp32"
    check(not (config.precision == "bf16" and device != "cuda"),
          "TrainConfig.precision='bf16' (DeepSpeed's bf16 mode) needs a GPU: use amp-bf16, fp32 or auto on the CPU")
    return config.precision


@dataclass(frozen=True)
class RunPlan:
    """One training run, resolved: read by the preflight, the Trainer, the summary and the notebook."""

    config: TrainConfig
    data: DataFacts
    model: ModelConfig
    stages: tuple[Stage, ...]
    world: int
    """Processes of the run (the launcher's WORLD_SIZE)."""
    device: str
    """"cuda" or "cpu": where every process trains."""
    precision: str
    """fp32, amp-bf16 or bf16: config.precision resolved for the device."""
    deepspeed: Mapping[str, Any]
    """The DeepSpeed JSON of config.deepspeed (read once) with its "auto" values filled from the config."""
    zero: ZeroStage
    offload: bool
    """Whether ZeRO keeps the optimizer state on the host (DeepSpeed then steps it with its CPU Adam)."""
    compile: bool
    """torch.compile the model: config.compile, or by default on a GPU only."""
    flops_per_image: Mapping[int, float]
    """Training FLOPs of one image in each stage, by stage index."""

    @classmethod
    def of(cls, config: TrainConfig, *, world: int | None = None, device: str | None = None,
           facts: DataFacts | None = None) -> "RunPlan":
        """The plan of a config: for `world` processes (default: the launcher's WORLD_SIZE, else 1) on
        `device` (default: a GPU if this machine has one). Raises ConfigError for a run that cannot start."""
        import torch

        world = world or int(os.environ.get("WORLD_SIZE", "1"))
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        check(config.batch_size % world == 0, f"TrainConfig.batch_size={config.batch_size} does not split over "
                                              f"{world} processes: use a multiple of {world}")
        facts = facts or data_facts(config.data)
        model = model_for(config, facts)
        stages = tuple(plan_stages(config.schedule, grid=facts.grid))
        precision = precision_on(config, device)
        ds = deepspeed_config(config, world, bf16=precision == "bf16")
        zero = zero_stage(ds)
        check(not (config.ema_decay and zero == ZeroStage.WEIGHTS), "TrainConfig.ema_decay needs full weights on "
              "every rank: use ZeRO-2 (ds_configs/zero2.json) or set ema_decay to 0 with ZeRO-3")
        return cls(config, facts, model, stages, world, device, precision, MappingProxyType(ds), zero,
                   offloads_optimizer(ds), config.compile if config.compile is not None else device == "cuda",
                   MappingProxyType({s.index: model.flops_per_sample(s.patch_size) for s in stages}))

    @property
    def micro_batch(self) -> int:
        return self.deepspeed["train_micro_batch_size_per_gpu"]

    @property
    def accumulation(self) -> int:
        return self.deepspeed["gradient_accumulation_steps"]

    @property
    def footprint(self) -> Plan:
        """How one process holds the model: what the memory estimate depends on."""
        return Plan(self.model, self.micro_batch, self.world, int(self.zero), self.offload, self.precision,
                    self.config.activation_checkpointing, self.device)

    def estimate(self) -> Estimate:
        """The peak memory of one training process (npp.preflight)."""
        return estimate(self.footprint)

    def engine_config(self) -> dict[str, Any]:
        """A copy of the DeepSpeed dict for deepspeed.initialize (a resume on another world adds a section)."""
        return copy.deepcopy(dict(self.deepspeed))

    def summary(self, *, params: int, images: int, variants: int, start_step: int) -> str:
        """The start-up lines of `npp train`: model, data, processes and precision, each stage's cost."""
        c, m = self.config, self.model
        lines = [f"npp train: {c.run_dir}",
                 f"  model {c.model}: {params / 1e6:.2f}M parameters ({m.n_layer} layers, dim {m.dim}, "
                 f"{m.n_head} heads), vocab {m.vocab_size}, {m.num_classes} classes, grid {m.grid}×{m.grid}",
                 f"  data {c.data}: {images} images × {variants} crop variants",
                 f"  {self.world} process(es) on {self.device}, {self.precision}, ZeRO stage {int(self.zero)}, "
                 f"batch {c.batch_size} = {self.micro_batch} × {self.accumulation} accumulation × {self.world}",
                 f"  model state ≈ {16 * params / 2**30 / (self.world if self.zero else 1):.2f} GiB "
                 f"per process (16 bytes/parameter, sharded by ZeRO)"]
        for s in self.stages:
            n = (m.grid // s.patch_size) ** 2
            lines.append(f"  stage {s.index}: steps {s.start}–{s.end}, {s.patch_size}×{s.patch_size} patches, "
                         f"{n} positions, {c.batch_size * n} tokens/step, "
                         f"{self.flops_per_image[s.index] * c.batch_size / 1e12:.3f} TFLOP/step")
        if start_step:
            lines.append(f"  resuming at step {start_step}")
        return "\n".join(lines)


def plan_run(given: dict[str, Any], recipe: str = "auto", *, world: int | None = None, device: str | None = None,
             facts: DataFacts | None = None) -> RunPlan:
    """Flags and a recipe → the run's plan. `given` holds a config file's fields and flags, nested as
    TrainConfig.from_dict takes them; the data's facts are read once (or passed in), for the recipe's
    lengths in epochs and for the model."""
    facts = facts or data_facts(given.get("data", TrainConfig().data))
    return RunPlan.of(resolve(given, recipe, data_size=facts.count), world=world, device=device, facts=facts)
