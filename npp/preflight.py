"""Will this run fit? A memory estimate per process, checked before any data is read or model is built.

The estimate adds what a training process holds (docs/method.md §9 and DeepSpeed's ZeRO partitioning):

    weights        4 B/param in fp32 and amp-bf16 (fp32 master weights), 2 in DeepSpeed's bf16 mode;
                   ZeRO-3 shards them over the processes
    gradients      the weights' dtype; ZeRO-2 and -3 shard them
    optimizer      AdamW's two fp32 moments (8 B/param), plus the fp32 master copy DeepSpeed's ZeRO keeps
                   of its shard (4); ZeRO-1 and up shard it, offload moves it to the host
    activations    what the backward pass needs, at the micro-batch, for the stage with the longest
                   sequence (next-token prediction): every layer's saved tensors, or with activation
                   checkpointing each layer's input plus one layer being recomputed
    loss           the logits' softmax and its gradient (fp32, vocabulary-wide at every position)

and takes the larger of two moments: the forward/backward pass (weights, gradients, optimizer state,
activations, loss) and the optimizer step (weights, gradients, optimizer state and the step's own
temporaries). The per-token activation constants were measured with saved-tensor hooks on this model
(tests/test_preflight.py keeps them true); the totals were checked against the peaks measured on an
H200 in docs/benchmarks.md (docs/benchmarks.md, "Memory preflight").
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from npp.config import ModelConfig
from npp.errors import ConfigError

if TYPE_CHECKING:
    from npp.plan import RunPlan

GiB = 2**30

# Bytes saved for the backward pass per token, measured with torch.autograd.graph.saved_tensors_hooks on
# this model with dropout on (tests/test_preflight.py measures them again): per layer, multiples of the
# width D and of the SwiGLU hidden width H; once, a multiple of D (embeddings, final norm, head input).
ACTIVATION_BYTES = {  # precision -> (per D per layer, per H per layer, per D once)
    "fp32": (56.25, 16.0, 15.5),
    "amp-bf16": (38.25, 8.0, 13.5),
    "bf16": (32.25, 8.0, 9.5),
}
RESIDUAL_BYTES = {"fp32": 4, "amp-bf16": 4, "bf16": 2}
"""Bytes of the residual stream per element: what activation checkpointing keeps of every layer."""
LOSS_BYTES_PER_LOGIT = {"fp32": 8.0, "amp-bf16": 10.0, "bf16": 10.0}
"""Per position and vocabulary entry: the fp32 log-softmax kept for the backward (4), and at the loss's
backward the fp32 gradient of the logits (4) and its half-precision cast (2)."""
STEP_BYTES_PER_PARAM = {"fp32": 0.0, "amp-bf16": 0.0, "bf16": 6.0}
"""The optimizer step's own temporaries: in DeepSpeed's bf16 mode an fp32 copy of the gradient shard and
reduce buckets (measured: 22 B/param at the step against 16 in the state, XXL and 2B, ZeRO-2, H200)."""
RESERVE_BYTES = {"cuda": 1.5 * GiB, "cpu": 2.0 * GiB}
"""Not available to tensors: the CUDA context and allocator slack; on the host, the interpreter, torch,
DeepSpeed and the data loader."""


@dataclass(frozen=True)
class Plan:
    """How one training process holds a model: what the estimate depends on."""

    model: ModelConfig
    micro_batch: int
    world: int = 1
    zero_stage: int = 0
    offload: bool = False
    precision: str = "fp32"
    checkpointing: bool = False
    device: str = "cuda"


@dataclass(frozen=True)
class Estimate:
    weights: float
    gradients: float
    optimizer: float
    activations: float
    loss: float
    step: float
    """Temporaries of the optimizer step."""
    host: float = 0.0
    """Optimizer state offloaded to the host (not counted on the GPU)."""

    @property
    def peak(self) -> float:
        state = self.weights + self.gradients + self.optimizer
        return max(state + self.activations + self.loss, state + self.step)

    def parts(self) -> str:
        shown = [("weights", self.weights), ("gradients", self.gradients), ("optimizer", self.optimizer),
                 ("activations", self.activations), ("loss", self.loss)]
        return ", ".join(f"{name} {value / GiB:.1f}" for name, value in shown)


def parameters(model: ModelConfig) -> int:
    """Every parameter: the matmuls (head included), the token and class tables, the norms."""
    embeddings = (model.vocab_size + model.num_classes + 1) * model.dim
    norms = (2 * model.n_layer + 1) * model.dim
    return model.matmul_params() + embeddings + norms


def estimate(plan: Plan) -> Estimate:
    """The peak memory of one training process under `plan`, in bytes."""
    m, P, W = plan.model, parameters(plan.model), plan.world
    shard = {name: W if plan.zero_stage >= stage else 1 for name, stage in (("optimizer", 1), ("gradients", 2),
                                                                          ("weights", 3))}
    low = 2 if plan.precision == "bf16" else 4
    weights = low * P / shard["weights"]
    gradients = low * P / shard["gradients"]
    # Adam's moments, and the fp32 master copy (bf16 mode) or the fp32 flat partition (ZeRO) beside them.
    master = 4 if plan.precision == "bf16" or plan.zero_stage >= 1 else 0
    optimizer = (8 + master) * P / shard["optimizer"]
    step = STEP_BYTES_PER_PARAM[plan.precision] * P / shard["optimizer"]
    host = 0.0
    if plan.offload:
        host, optimizer, step = optimizer + step, 0.0, 0.0
    if plan.precision == "amp-bf16":
        weights += 2 * P / shard["weights"]  # autocast's bf16 copies of the weights live through the backward

    tokens = plan.micro_batch * m.seq_len
    per_D, per_H, once = ACTIVATION_BYTES[plan.precision]
    layer = tokens * (per_D * m.dim + per_H * m.hidden_dim)
    # With checkpointing every layer keeps its input and one layer at a time is recomputed in full.
    layers = tokens * m.n_layer * m.dim * RESIDUAL_BYTES[plan.precision] + layer if plan.checkpointing \
        else m.n_layer * layer
    activations = layers + tokens * once * m.dim
    loss = tokens * m.vocab_size * LOSS_BYTES_PER_LOGIT[plan.precision]
    return Estimate(weights, gradients, optimizer, activations, loss, step, host)


def available(device: str) -> float:
    """Bytes one process can use: a GPU's memory, or the host's available memory, less a reserve."""
    if device == "cuda":
        import torch

        total = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
    else:
        total = _host_available()
    return total - RESERVE_BYTES[device]


def _host_available() -> float:
    with open("/proc/meminfo") as f:
        fields = dict(line.split(":", 1) for line in f)
    return int(fields["MemAvailable"].split()[0]) * 1024


# ------------------------------------------------------------------------------------------------
# The check, and the fixes it proposes
# ------------------------------------------------------------------------------------------------

def fixes(plan: Plan, budget: float, batch: int) -> list[str]:
    """Changes that would make the run fit `budget` bytes per process, each checked with the estimate."""
    found = []
    fits = lambda p: estimate(p).peak * (p.world if p.device == "cpu" else 1) <= budget  # noqa: E731
    micro = plan.micro_batch
    while micro > 1 and not fits(replace(plan, micro_batch=micro)):
        micro //= 2
    if micro < plan.micro_batch and fits(replace(plan, micro_batch=micro)) and (batch // plan.world) % micro == 0:
        found.append(f"--micro-batch-size {micro} (gradient accumulation keeps the global batch)")
    if not plan.checkpointing and fits(replace(plan, checkpointing=True)):
        found.append("--activation-checkpointing")
    if plan.device == "cuda":
        if plan.zero_stage < 3 and plan.world > 1 and fits(replace(plan, zero_stage=3, checkpointing=True)):
            found.append("--deepspeed ds_configs/zero3.json --activation-checkpointing")
        if not plan.offload and fits(replace(plan, zero_stage=max(plan.zero_stage, 2), offload=True, checkpointing=True)):
            found.append("--deepspeed ds_configs/zero2_offload.json --activation-checkpointing")
        gpus = next((w for w in (2, 4, 8, 16, 32, 64, 128) if w > plan.world
                     and fits(replace(plan, world=w, zero_stage=3, checkpointing=True, micro_batch=max(1, micro)))), None)
        if gpus:
            found.append(f"{gpus} GPUs with ds_configs/zero3.json and --activation-checkpointing")
    else:
        gpu = replace(plan, device="cuda", world=1, zero_stage=2, precision="amp-bf16", checkpointing=True)
        found.append(f"a GPU (one needs ≈ {estimate(gpu).peak / GiB:.0f} GiB with ZeRO-2 and activation checkpointing)")
    return found


def check_run(plan: RunPlan, budget: float | None = None) -> Estimate:
    """Refuse a run that cannot fit this machine, before any data is read or model built (one line)."""
    return check_fits(plan.footprint, plan.config.batch_size, budget)


def check_fits(plan: Plan, batch: int, budget: float | None = None) -> Estimate:
    """The estimate when the run fits; otherwise a ConfigError naming the estimate, what is available and
    the fixes that fit. On the CPU the processes of a launcher share the host's memory."""
    budget = available(plan.device) if budget is None else budget
    result = estimate(plan)
    need = result.peak * (plan.world if plan.device == "cpu" else 1)
    if need > budget:
        where = "per GPU" if plan.device == "cuda" else (f"for {plan.world} processes" if plan.world > 1 else "")
        options = fixes(plan, budget, batch)
        raise ConfigError(
            f"this run needs ≈ {need / GiB:.1f} GiB {where} ({result.parts()} GiB; micro-batch {plan.micro_batch}, "
            f"{plan.precision}, ZeRO-{plan.zero_stage}{', activation checkpointing' if plan.checkpointing else ''}) "
            f"but {'the GPU has' if plan.device == 'cuda' else 'the host has'} {budget / GiB:.1f} GiB available: "
            + ("try " + "; or ".join(options) if options else "use a smaller model preset or more memory"))
    return result
