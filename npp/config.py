"""Typed, validated configuration.

Every field documents itself; ``__post_init__`` rejects bad values with one line that names the
field and the fix, so a broken run fails before any weight is allocated.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from npp.errors import ConfigError, check, is_int, is_number, known_fields
from npp.identity import RUN_NAME_MAX, run_name_problem, same_data
from npp.threads import check_threads
from npp.tokenizer_config import VQ_PRESETS, VQConfig  # noqa: F401 (npp.config names every config)


def tiles(patch_size: int, grid: int | None = None) -> bool:
    """The one rule of patch sides: p×p patches tile a grid×grid token grid when p is a power of two (1
    included) that divides grid; without a grid, whether p could tile one."""
    return is_int(patch_size) and patch_size > 0 and patch_size & (patch_size - 1) == 0 \
        and (grid is None or grid % patch_size == 0)


def tiling_patch_sizes(grid: int) -> list[int]:
    """Every patch side that tiles a grid×grid token grid, finest first."""
    return [p for p in (2**i for i in range(grid.bit_length())) if tiles(p, grid)]


def check_patch_size(patch_size: int, grid: int) -> None:
    """A ConfigError (a ValueError) naming the sides that would do, unless p×p patches tile the grid."""
    if not tiles(patch_size, grid):
        raise ConfigError(f"patch_size={patch_size!r} does not tile the {grid}×{grid} grid: "
                          f"use one of {tiling_patch_sizes(grid)}")


# name -> (n_layer, n_head, dim). B..XXL and 3B are LlamaGen's; 2B is ours (docs/method.md §2).
MODEL_PRESETS: dict[str, tuple[int, int, int]] = {
    "debug": (2, 2, 64),
    "tiny": (6, 4, 256),
    "B": (12, 12, 768),
    "L": (24, 16, 1024),
    "XL": (36, 20, 1280),
    "XXL": (48, 24, 1536),
    "2B": (36, 32, 2048),
    "3B": (24, 32, 3200),
}


@dataclass
class ModelConfig:
    """Architecture of a class-conditional LlamaGen GPT. Defaults are GPT-B on ImageNet VQ-16."""

    vocab_size: int = 16384
    """Number of VQ codes (the tokenizer's codebook size)."""
    num_classes: int = 1000
    """Number of class labels; the class table gets one extra row, the null class used by CFG."""
    grid: int = 16
    """Side of the square token grid; a sequence holds grid² image tokens."""
    n_layer: int = 12
    """Number of transformer blocks."""
    n_head: int = 12
    """Number of query heads; head_dim = dim // n_head."""
    dim: int = 768
    """Width of the residual stream."""
    n_kv_head: int | None = None
    """Key/value heads for grouped-query attention; None means n_head (plain multi-head)."""
    ffn_dim: int | None = None
    """SwiGLU hidden width; None means LlamaGen's rule, int(8·dim/3) rounded up to multiple_of."""
    multiple_of: int = 256
    """Rounding of the default SwiGLU hidden width."""
    rope_base: float = 10000.0
    """Base of the rotary frequencies."""
    patch_positions: str = "coarse"
    """RoPE positions of patches in a patch stage: "coarse", integer coordinates on the (grid/p)² patch
    grid (NPP's code); "centre", each patch at its centre on the token grid, p·i + (p-1)/2, so that a
    coordinate names the same place in every stage. Next-token prediction (p = 1) is the same in both."""
    norm_eps: float = 1e-5
    """RMSNorm epsilon."""
    init_std: float = 0.02
    """Standard deviation of the normal init of every Linear and Embedding (the head is zeroed)."""
    token_dropout: float = 0.1
    """Dropout on the input sequence (class token and image embeddings)."""
    attn_dropout: float = 0.0
    """Dropout on attention probabilities (LlamaGen's code uses 0, its paper says 0.1)."""
    resid_dropout: float = 0.1
    """Dropout on the attention output projection."""
    ffn_dropout: float = 0.1
    """Dropout on the feed-forward output."""
    class_dropout: float = 0.1
    """Probability that a training label is replaced by the null class (enables CFG)."""

    def __post_init__(self) -> None:
        for name in ("vocab_size", "num_classes", "grid", "n_layer", "n_head", "dim", "multiple_of"):
            value = getattr(self, name)
            check(is_int(value) and value > 0,
                   f"ModelConfig.{name}={value!r}: must be a positive integer")
        check(self.dim % self.n_head == 0,
               f"ModelConfig.dim={self.dim} is not divisible by n_head={self.n_head}: "
               f"choose n_head among the divisors of {self.dim}")
        check(self.head_dim % 4 == 0,
               f"ModelConfig: head_dim={self.head_dim} (dim/n_head) must be a multiple of 4 for "
               f"2-D RoPE (two halves of rotary pairs); change dim or n_head")
        if self.n_kv_head is not None:
            check(is_int(self.n_kv_head) and self.n_kv_head > 0 and self.n_head % self.n_kv_head == 0,
                   f"ModelConfig.n_kv_head={self.n_kv_head} must divide n_head={self.n_head}; "
                   f"use a divisor of n_head, or None for multi-head attention")
        if self.ffn_dim is not None:
            check(is_int(self.ffn_dim) and self.ffn_dim > 0, f"ModelConfig.ffn_dim={self.ffn_dim}: must be positive or None")
        for name in ("token_dropout", "attn_dropout", "resid_dropout", "ffn_dropout", "class_dropout"):
            value = getattr(self, name)
            check(is_number(value) and 0.0 <= value < 1.0, f"ModelConfig.{name}={value!r}: must be a number in [0, 1)")
        check(is_number(self.rope_base) and self.rope_base > 0, f"ModelConfig.rope_base={self.rope_base}: must be positive")
        check(is_number(self.norm_eps) and self.norm_eps > 0, f"ModelConfig.norm_eps={self.norm_eps!r}: must be positive")
        check(is_number(self.init_std) and self.init_std > 0, f"ModelConfig.init_std={self.init_std!r}: must be positive")
        check(self.patch_positions in ("coarse", "centre"),
               f"ModelConfig.patch_positions={self.patch_positions!r}: must be \"coarse\" (the paper's) or "
               f"\"centre\"")

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> "ModelConfig":
        """A named architecture (debug, tiny, B, L, XL, XXL, 2B, 3B) with any field overridden."""
        if name not in MODEL_PRESETS:
            raise ConfigError(f"unknown model preset {name!r}: choose one of {', '.join(MODEL_PRESETS)}")
        n_layer, n_head, dim = MODEL_PRESETS[name]
        return cls(**{"n_layer": n_layer, "n_head": n_head, "dim": dim, **overrides})

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_head

    @property
    def kv_heads(self) -> int:
        return self.n_kv_head or self.n_head

    @property
    def hidden_dim(self) -> int:
        """SwiGLU hidden width actually used."""
        if self.ffn_dim is not None:
            return self.ffn_dim
        hidden = int(2 * 4 * self.dim / 3)
        return -(-hidden // self.multiple_of) * self.multiple_of

    @property
    def seq_len(self) -> int:
        return self.grid * self.grid

    def patch_sizes(self) -> list[int]:
        """Every valid patch side for this grid: the powers of two that divide it."""
        return tiling_patch_sizes(self.grid)

    def check_patch_size(self, patch_size: int) -> None:
        check_patch_size(patch_size, self.grid)

    def matmul_params(self) -> int:
        """Weights of every matmul, the head included and the embedding tables excluded."""
        D = self.dim
        per_layer = D * (self.n_head + 2 * self.kv_heads) * self.head_dim + D * D + 3 * D * self.hidden_dim
        return self.n_layer * per_layer + D * self.vocab_size

    def flops_per_sample(self, patch_size: int = 1) -> float:
        """Training FLOPs for one image: 6·N_matmul·S + 12·n_layer·dim·S², S = (grid/p)² (docs/method.md §9)."""
        self.check_patch_size(patch_size)
        seq = (self.grid // patch_size) ** 2
        return 6.0 * self.matmul_params() * seq + 12.0 * self.n_layer * self.dim * seq**2

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ModelConfig":
        return cls(**known_fields(cls, data))


@dataclass
class ScheduleConfig:
    """The coarse-to-fine plan: patch levels, their lengths, and the learning rate in each stage.

    Stage sides are 2^(levels-1), …, 2, 1 and cumulative stage ends are total_steps·λ^i for
    i = levels-1 … 0, so the last stage is always plain next-token prediction (docs/method.md §3).
    """

    total_steps: int = 1000
    """Optimizer steps in the whole run, all stages together."""
    levels: int = 2
    """Number of patch levels #L; 1 is a plain NTP run, 2 is the paper's default (2×2 then 1×1)."""
    segment_factor: float = 0.5
    """λ: each stage but the last ends at total_steps·λ^i; the paper's default is 1/2."""
    lr: float = 1e-4
    """Peak learning rate of every stage."""
    end_lr: float = 1e-5
    """Learning rate reached at the end of each stage's decay."""
    warmup_steps: int = 0
    """Linear warm-up from 0 at the start of every stage (the paper warms up each stage)."""
    decay_fraction: float = 0.2
    """Fraction of each stage, at its end, over which the LR decays linearly to end_lr."""
    warmup_every_stage: bool = True
    """Warm up again at the start of every stage (the paper); False: only the first stage warms up, and
    later stages start at the peak LR."""
    decay_every_stage: bool = True
    """Decay at the end of every stage (the paper); False: only the final stage decays, so the LR is at
    its peak when the patches shrink."""
    stage_patch_sizes: list[int] = field(default_factory=list)
    """Explicit patch sides per stage (e.g. [4, 2, 1]); empty means the powers of two from levels."""

    def __post_init__(self) -> None:
        check(is_int(self.total_steps) and self.total_steps > 0,
               f"ScheduleConfig.total_steps={self.total_steps!r}: must be a positive integer")
        check(is_int(self.levels) and self.levels >= 1,
               f"ScheduleConfig.levels={self.levels!r}: must be ≥ 1 (1 = plain next-token prediction)")
        if self.levels > 1:
            check(is_number(self.segment_factor) and 0.0 < self.segment_factor < 1.0,
                   f"ScheduleConfig.segment_factor={self.segment_factor}: λ must lie in (0, 1), "
                   f"e.g. 0.5 (the paper's default)")
        check(is_number(self.lr) and math.isfinite(self.lr) and self.lr > 0,
              f"ScheduleConfig.lr={self.lr!r}: must be a positive number")
        check(is_number(self.end_lr) and 0 <= self.end_lr <= self.lr,
               f"ScheduleConfig.end_lr={self.end_lr}: must lie in [0, lr={self.lr}]")
        check(is_int(self.warmup_steps) and self.warmup_steps >= 0,
               f"ScheduleConfig.warmup_steps={self.warmup_steps!r}: must be a non-negative integer")
        check(is_number(self.decay_fraction) and 0.0 <= self.decay_fraction <= 1.0,
               f"ScheduleConfig.decay_fraction={self.decay_fraction}: must lie in [0, 1]")
        for name in ("warmup_every_stage", "decay_every_stage"):
            check(isinstance(getattr(self, name), bool), f"ScheduleConfig.{name}={getattr(self, name)!r}: use true or false")
        check(isinstance(self.stage_patch_sizes, (list, tuple)),
              f"ScheduleConfig.stage_patch_sizes={self.stage_patch_sizes!r}: give a list such as [4, 2, 1]")
        self.stage_patch_sizes = list(self.stage_patch_sizes)
        if self.stage_patch_sizes:
            sides = self.stage_patch_sizes
            check(len(sides) == self.levels,
                   f"ScheduleConfig.stage_patch_sizes={sides} has {len(sides)} entries but "
                   f"levels={self.levels}: give one side per level or leave it empty")
            check(all(tiles(p) for p in sides) and sides[-1] == 1
                   and all(a > b for a, b in zip(sides, sides[1:])),
                   f"ScheduleConfig.stage_patch_sizes={sides}: sides must be decreasing powers of two "
                   f"ending with 1 (the final stage is next-token prediction)")

    @property
    def patch_sizes(self) -> list[int]:
        """Patch side of each stage, coarse to fine."""
        if self.stage_patch_sizes:
            return list(self.stage_patch_sizes)
        return [2 ** (self.levels - 1 - i) for i in range(self.levels)]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ScheduleConfig":
        return cls(**known_fields(cls, data))


@dataclass(frozen=True)
class SamplerConfig:
    """How tokens are drawn. The defaults are plain sampling (no guidance, no filtering); the paper's
    FID protocol adds guidance (PAPER_SAMPLER, and the recipes' per-model CFG scale)."""

    cfg_scale: float = 1.0
    """Classifier-free guidance scale: logits = uncond + s·(cond − uncond); ≤ 1 turns guidance off."""
    cfg_interval: int = -1
    """Guide only the first cfg_interval + 2 tokens, as in LlamaGen; -1 guides every token."""
    temperature: float = 1.0
    """Softmax temperature; near 0 is greedy."""
    top_k: int = 0
    """Keep the k most likely tokens (0: all)."""
    top_p: float = 1.0
    """Nucleus sampling: keep the most likely tokens that hold this much probability (1.0: all)."""

    def __post_init__(self) -> None:
        for name, ok, fix in [
            ("cfg_scale", is_number(self.cfg_scale) and math.isfinite(self.cfg_scale) and self.cfg_scale >= 0,
             "use a finite value ≥ 0 (≤ 1 turns guidance off; the paper uses 1.65–2.0)"),
            ("cfg_interval", is_int(self.cfg_interval) and self.cfg_interval >= -1,
             "use -1 (guide every token) or a whole number of tokens ≥ 0"),
            ("temperature", is_number(self.temperature) and math.isfinite(self.temperature) and self.temperature >= 0,
             "use a finite value ≥ 0 (1.0 is the paper's)"),
            ("top_k", is_int(self.top_k) and self.top_k >= 0, "use 0 (off) or a whole number of tokens > 0"),
            ("top_p", is_number(self.top_p) and 0.0 < self.top_p <= 1.0, "use a value in (0, 1] (1.0 is off)"),
        ]:
            check(ok, f"SamplerConfig.{name}={getattr(self, name)!r}: {fix}")

    @property
    def guided(self) -> bool:
        return self.cfg_scale > 1.0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "SamplerConfig":
        return cls(**known_fields(cls, data))


PAPER_SAMPLER = SamplerConfig(cfg_scale=2.0)
"""The paper's FID sampler for GPT-B (docs/method.md §4): CFG 2.0, no top-k or top-p, temperature 1; the
default of evaluation, the trainer's periodic evaluation and the app."""


def cache_dir() -> Path:
    """Where npp keeps what it derives once and reuses (embedded codes, reference statistics):
    $NPP_CACHE, or ~/.cache/npp."""
    return Path(os.environ.get("NPP_CACHE") or Path.home() / ".cache" / "npp")


def _shorten(text: str, keep: int = 40) -> str:
    return text if len(text) <= keep else text[:keep] + "…"


PRECISIONS = ("auto", "fp32", "amp-bf16", "bf16")


@dataclass
class TrainConfig:
    """Everything that defines a training run; saved as runs/<name>/config.json and enough to resume.

    Batch sizes count images. The global batch stays the same in every stage of the schedule (as in
    the paper), so a p×p stage sees the same images per step as NTP with p² times fewer positions.
    """

    name: str = "run"
    """Run name; the run directory is runs_dir/name."""
    recipe: str = ""
    """The recipe the run's values came from (npp.recipes; `npp train --recipe`), kept as a record."""
    runs_dir: str = "runs"
    """Folder that holds run directories."""
    data: str = "mnist-8x8"
    """Training codes: an embedded data set (mnist-8x8, mnist-16x16) or a folder written by `npp extract`."""
    model: str = "tiny"
    """Model preset (debug, tiny, B, L, XL, XXL, 2B, 3B); vocabulary, classes and grid come from the data."""
    model_overrides: dict[str, Any] = field(default_factory=dict)
    """ModelConfig fields that replace the preset's, e.g. {"resid_dropout": 0.0}."""
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    """Steps, patch levels, segment factor and learning rate of every stage."""
    batch_size: int = 64
    """Images per optimizer step, all processes together."""
    micro_batch_size: int = 0
    """Images per process per forward pass; 0 means batch_size / world size (no accumulation)."""
    weight_decay: float = 0.05
    """AdamW weight decay, applied only to tensors with ≥ 2 dimensions."""
    betas: tuple[float, float] = (0.9, 0.95)
    """AdamW betas."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this value; 0 turns clipping off."""
    precision: str = "auto"
    """amp-bf16: torch autocast bf16 over fp32 weights, gradients and optimizer state (the authors');
    bf16: DeepSpeed's bf16 mode (bf16 weights and gradients, an fp32 master copy in the optimizer: less
    memory on several GPUs, a coarser gradient sum); fp32; auto: amp-bf16 on a GPU, fp32 on the CPU."""
    ema_decay: float = 0.0
    """Decay of an exponential moving average of the weights; 0 keeps none (the export then uses the
    trained weights, otherwise the average)."""
    activation_checkpointing: bool = False
    """Recompute each block in the backward pass: less activation memory, ~30% more compute."""
    compile: bool | None = None
    """torch.compile the model, once per stage (a stage changes the sequence length); None (the default):
    on a GPU, where it pays for itself, and not on the CPU, where compiling costs more than it saves."""
    deepspeed: str = ""
    """DeepSpeed JSON (ds_configs/zero2.json, …); its "auto" values come from this config. Empty: no ZeRO."""
    seed: int = 0
    """Seed of the weights, the data order, the crop choice and every dropout mask."""
    num_workers: int = 2
    """DataLoader worker processes per training process."""
    log_every: int = 10
    """Steps between metrics.jsonl rows (stage ends are always logged)."""
    ckpt_every: int = 500
    """Steps between checkpoints (stage ends and the end of the run always get one)."""
    keep_last: int = 2
    """Checkpoints to keep; older ones are deleted once a newer one is complete (stage ends are kept)."""
    tensorboard: bool = True
    """Also write TensorBoard events to runs/<name>/tensorboard."""
    wandb_project: str = ""
    """Log to this Weights & Biases project as well (empty: no wandb)."""
    progress: bool = True
    """Show a progress bar on rank 0."""
    threads: int | None = None
    """CPU threads for torch's operators, recorded in config.json and in every metrics row, since another
    count changes the numbers. Default: the count the process would use anyway (OMP_NUM_THREADS if set, else
    torch's), so that a command line or environment that worked before computes what it did."""
    eval_every: int = 0
    """Every this many steps, and at every stage end, sample eval_samples images and log FID, IS,
    precision, recall (and class accuracy on the embedded data) into metrics.jsonl, with a sample grid
    in samples/. 0 turns it off (the default: it costs time on big runs)."""
    eval_samples: int = 1000
    """Samples per periodic evaluation (a quick estimate: FID is biased upwards at small N)."""
    eval_sampler: SamplerConfig = PAPER_SAMPLER
    """How the periodic evaluation samples (CFG scale, interval, temperature, top-k, top-p)."""
    eval_reference: str = "auto"
    """Real images the periodic evaluation compares with: an image folder, mnist-test, or auto (the
    embedded test split for the embedded data; other data must name a folder)."""
    eval_inception_weights: str = ""
    """Inception weights file for the periodic evaluation of non-MNIST data (see npp evaluate)."""

    def __post_init__(self) -> None:
        if isinstance(self.schedule, dict):
            self.schedule = ScheduleConfig.from_dict(self.schedule)
        if isinstance(self.eval_sampler, dict):
            self.eval_sampler = SamplerConfig.from_dict(self.eval_sampler)
        check(isinstance(self.schedule, ScheduleConfig), f"TrainConfig.schedule={self.schedule!r}: give an object "
                                                         f"of ScheduleConfig fields")
        check(isinstance(self.eval_sampler, SamplerConfig),
              f"TrainConfig.eval_sampler={self.eval_sampler!r}: give an object of SamplerConfig fields")
        for name in ("name", "recipe", "runs_dir", "data", "model", "precision", "deepspeed", "wandb_project",
                     "eval_reference", "eval_inception_weights"):
            check(isinstance(getattr(self, name), str), f"TrainConfig.{name}={getattr(self, name)!r}: must be a string")
        for name in ("runs_dir", "data", "deepspeed", "eval_reference", "eval_inception_weights"):
            check("\0" not in getattr(self, name), f"TrainConfig.{name} contains a NUL byte, which no path can "
                                                   f"hold: remove it")
        problem = run_name_problem(self.name)
        check(problem is None, f"TrainConfig.name={_shorten(self.name)!r}: {problem}; give a plain folder name "
                               f"such as 'ntp-tiny' (one path component, at most {RUN_NAME_MAX} characters)")
        check(self.model in MODEL_PRESETS,
              f"TrainConfig.model={self.model!r}: choose one of {', '.join(MODEL_PRESETS)}")
        check(isinstance(self.model_overrides, dict),
              f"TrainConfig.model_overrides={self.model_overrides!r}: give a JSON object of ModelConfig fields, "
              f"e.g. {{\"resid_dropout\": 0.0}}")
        from_data = sorted({"vocab_size", "num_classes", "grid"} & set(self.model_overrides))
        check(not from_data, f"TrainConfig.model_overrides: {', '.join(from_data)} come(s) from the data's "
                             f"manifest and cannot be overridden; remove them (extract other codes instead)")
        known = {f.name for f in dataclasses.fields(ModelConfig)}
        unknown = sorted(set(self.model_overrides) - known)
        check(not unknown, f"TrainConfig.model_overrides: unknown ModelConfig field(s) {unknown}")
        ModelConfig.preset(self.model, **self.model_overrides)  # validates every overridden value now
        for name, low in (("batch_size", 1), ("micro_batch_size", 0), ("seed", 0), ("num_workers", 0),
                          ("log_every", 1), ("ckpt_every", 1), ("keep_last", 1), ("eval_every", 0),
                          ("eval_samples", 2)):
            value = getattr(self, name)
            check(is_int(value) and value >= low, f"TrainConfig.{name}={value!r}: must be a whole number ≥ {low}"
                  + (" (FID needs a covariance)" if name == "eval_samples" else ""))
        check(is_number(self.weight_decay) and self.weight_decay >= 0,
              f"TrainConfig.weight_decay={self.weight_decay!r}: must be a number ≥ 0")
        check(isinstance(self.betas, (list, tuple)) and len(self.betas) == 2
              and all(is_number(b) and 0 <= b < 1 for b in self.betas),
              f"TrainConfig.betas={self.betas!r}: give two values in [0, 1), e.g. 0.9 0.95")
        self.betas = tuple(self.betas)
        check(is_number(self.grad_clip) and self.grad_clip >= 0,
              f"TrainConfig.grad_clip={self.grad_clip!r}: must be ≥ 0 (0 = off)")
        check(self.precision in PRECISIONS,
              f"TrainConfig.precision={self.precision!r}: choose one of {', '.join(PRECISIONS)}")
        check(is_number(self.ema_decay) and 0.0 <= self.ema_decay < 1.0,
              f"TrainConfig.ema_decay={self.ema_decay!r}: must lie in [0, 1), e.g. 0.9999 (0 = off)")
        for name in ("activation_checkpointing", "tensorboard", "progress"):
            check(isinstance(getattr(self, name), bool), f"TrainConfig.{name}={getattr(self, name)!r}: use true or false")
        check_threads(self.threads, "TrainConfig.threads")
        check(self.compile in (True, False, None), f"TrainConfig.compile={self.compile!r}: use true, false or null (auto)")
        if self.deepspeed:
            check(os.path.isfile(self.deepspeed),
                  f"TrainConfig.deepspeed={self.deepspeed!r}: no such file; use one of ds_configs/*.json")

    @property
    def run_dir(self) -> str:
        return os.path.join(self.runs_dir, self.name)

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["betas"] = list(self.betas)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TrainConfig":
        check(isinstance(data, dict), f"a run config must be a JSON object of TrainConfig fields, got "
                                      f"{type(data).__name__}")
        if "eval_cfg_scale" in data:  # written before the sampler had a config of its own
            data = dict(data)
            data["eval_sampler"] = {**data.get("eval_sampler", {}), "cfg_scale": data.pop("eval_cfg_scale")}
        return cls(**known_fields(cls, data))

    def experiment_id(self) -> str:
        """A short hash of what the run computes (every field but the RESUMABLE ones): checkpoints carry it,
        so a checkpoint is never resumed into another experiment."""
        import hashlib
        import json

        fields = {k: v for k, v in self.to_dict().items() if k not in RESUMABLE}
        return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]

    def changes_from(self, saved: dict[str, Any]) -> list[str]:
        """Fields in which this config would train something else than the run saved as `saved` (its
        config.json). Read back through TrainConfig, so that fields added since it was saved take their
        defaults; how a run is observed, sharded or named may change between resumes (RESUMABLE)."""
        before = TrainConfig.from_dict(saved).to_dict()
        changed = sorted(k for k, v in self.to_dict().items() if k not in RESUMABLE and before.get(k) != v)
        if "data" in changed and same_data(before["data"], self.data):
            changed.remove("data")  # the same folder spelled otherwise (./codes/x/, a symlink), or a copy of it
        return changed


RESUMABLE = frozenset({"name", "recipe", "runs_dir", "deepspeed", "num_workers", "log_every", "ckpt_every", "keep_last",
                       "tensorboard", "wandb_project", "progress", "threads", "micro_batch_size", "activation_checkpointing",
                       "compile", "eval_every", "eval_samples", "eval_sampler", "eval_reference",
                       "eval_inception_weights"})
"""TrainConfig fields that may change when a run resumes: they change how it is observed, sharded or
named (a copied or renamed run directory resumes too), not what it computes. The thread count is here so
that runs recorded before it existed keep their experiment id; it changes the last digits, so every metrics
row records the count it was trained with."""
