"""Ordinary next-token sampling with classifier-free guidance and a KV cache (docs/method.md §5).

NPP changes only training: every model, whatever its schedule, samples one token at a time here.
Every sampling knob lives in one typed, validated `SamplerConfig`; evaluation, the trainer's periodic
evaluation, the app's "Advanced" widgets and `npp evaluate`'s flags are all built from its fields.
`SteppedSampler` runs the same loop paused every few tokens (Pipeline.stepped: row by row), so that two
models can draw in turns.
"""

from __future__ import annotations

import dataclasses
import queue
import threading
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F

from npp.config import SamplerConfig
from npp.errors import check, require
from npp.model import GPT


StepCallback = Callable[[int, torch.Tensor], None]
"""Called after each sampled token as callback(step, tokens_BT) with the T = step + 1 tokens so far."""


def filter_logits(logits_BV: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Set logits outside the top-k and outside the top-p nucleus to -inf (top-k first).

    The nucleus keeps the smallest set of most likely tokens whose probability reaches top_p; the
    most likely token always stays.
    """
    if top_k > 0:
        kth_B1 = torch.topk(logits_BV, min(top_k, logits_BV.shape[-1]), dim=-1).values[:, -1:]
        logits_BV = logits_BV.masked_fill(logits_BV < kth_B1, float("-inf"))
    if top_p < 1.0:
        sorted_BV, order_BV = torch.sort(logits_BV, dim=-1, descending=True)
        probs_BV = sorted_BV.softmax(dim=-1)
        mass_before_BV = probs_BV.cumsum(dim=-1) - probs_BV
        drop_sorted_BV = mass_before_BV > top_p
        drop_BV = drop_sorted_BV.scatter(-1, order_BV, drop_sorted_BV)
        logits_BV = logits_BV.masked_fill(drop_BV, float("-inf"))
    return logits_BV


def sample_generators(indices: Sequence[int], base_seed: int, device: torch.device | str = "cpu"
                      ) -> list[torch.Generator]:
    """One generator per sample, seeded base_seed + i: sample i is the same image in every batch, on
    every rank and after every restart (the evaluation's and the app's seeding)."""
    return [torch.Generator(device).manual_seed(base_seed + i) for i in indices]


def draw_uniforms(B: int, L: int, generator: torch.Generator | Sequence[torch.Generator] | None,
                  device: torch.device) -> torch.Tensor:
    """The B×L uniforms that pick every token, drawn before sampling starts.

    A list of generators gives each row its own stream (the diffusers convention): a sample then
    depends only on its own generator, not on its batch-mates or on how a job was split.
    """
    if isinstance(generator, Sequence):
        if len(generator) != B:
            raise ValueError(f"got {len(generator)} generators for {B} labels: give one per label, or one in all")
        rows = [torch.rand(L, generator=g, device=g.device).to(device) for g in generator]
        return torch.stack(rows) if rows else torch.empty(0, L, device=device)
    on = device if generator is None else generator.device
    return torch.rand(B, L, generator=generator, device=on).to(device)


def sample_token(logits_BV: torch.Tensor, uniform_B: torch.Tensor, *, temperature: float = 1.0,
                 top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """One token per row: temperature, then top-k/top-p, then inverse-CDF sampling at uniform_B.

    Filtered tokens have zero probability, a flat step of the CDF that no uniform can land in.
    """
    # LlamaGen clamps the temperature instead of special-casing 0: near-zero means greedy.
    logits_BV = filter_logits(logits_BV.float() / max(temperature, 1e-5), top_k, top_p)
    cdf_BV = F.softmax(logits_BV, dim=-1).cumsum(dim=-1)
    at_B1 = uniform_B.to(cdf_BV.dtype)[:, None] * cdf_BV[:, -1:]
    return torch.searchsorted(cdf_BV, at_B1, right=True).clamp_(max=logits_BV.shape[-1] - 1)[:, 0]


@torch.no_grad()
def generate(
    model: GPT,
    labels_B: torch.Tensor,
    sampler: SamplerConfig | None = None,
    *,
    generator: torch.Generator | Sequence[torch.Generator] | None = None,
    progress: bool = False,
    callback: StepCallback | None = None,
    **knobs: Any,
) -> torch.Tensor:
    """Sample grid² tokens per label; returns tokens_BL (int64, row-major grid order).

    `sampler` holds the knobs (default: SamplerConfig(), plain sampling); each can also be given as a
    keyword (`cfg_scale=2.0, cfg_interval=-1, temperature=1.0, top_k=0, top_p=1.0`), which replaces the
    sampler's value. cfg_scale > 1 doubles the batch with the null class and mixes
    uncond + s·(cond − uncond). A torch.Generator makes the draw reproducible; a list of them, one per
    label, makes every sample reproducible on its own, whatever batch it is drawn in. progress shows a
    tqdm bar; callback(step, tokens_BT) streams partial results.
    """
    sampler = sampler or SamplerConfig()
    if knobs:
        known = {f.name for f in dataclasses.fields(sampler)}
        check(set(knobs) <= known, f"generate() got unknown sampling argument(s) {sorted(set(knobs) - known)}: "
                                   f"choose from {sorted(known)}")
        sampler = dataclasses.replace(sampler, **knobs)
    config = model.config
    labels_B = _checked_labels(labels_B, config.num_classes).to(model.tok_embeddings.weight.device)

    B, L = labels_B.shape[0], config.seq_len
    if sampler.guided:
        labels_B = torch.cat([labels_B, torch.full_like(labels_B, config.num_classes)])
    uniforms_BL = draw_uniforms(B, L, generator, labels_B.device)
    tokens_BL = torch.empty(B, L, dtype=torch.long, device=labels_B.device)
    steps = range(L)
    if progress:
        steps = require("tqdm.auto", "a progress bar").tqdm(steps, desc="sampling", unit="tok", leave=False)

    was_training = model.training
    model.eval()
    try:
        cache = model.new_cache(labels_B.shape[0])
        for step in steps:
            if step == 0:
                logits = model.decode(cache, 0, labels_B=labels_B)[:, -1]
            else:
                previous = tokens_BL[:, step - 1:step]
                inputs = torch.cat([previous, previous]) if sampler.guided else previous
                logits = model.decode(cache, step, tokens_BS=inputs)[:, -1]
            if sampler.guided:
                cond_BV, uncond_BV = logits.chunk(2)
                if sampler.cfg_interval == -1 or step <= sampler.cfg_interval + 1:
                    logits = uncond_BV + sampler.cfg_scale * (cond_BV - uncond_BV)
                else:
                    logits = cond_BV
            tokens_BL[:, step] = sample_token(logits, uniforms_BL[:, step], temperature=sampler.temperature,
                                              top_k=sampler.top_k, top_p=sampler.top_p)
            if callback is not None:
                callback(step, tokens_BL[:, :step + 1])
    finally:
        model.train(was_training)
    return tokens_BL


def _checked_labels(labels_B: Any, num_classes: int) -> torch.Tensor:
    """Class ids as a 1-D int64 tensor, or a one-line error: 2.7 is not a class, nor is an empty batch."""
    labels = torch.as_tensor(labels_B)
    check(labels.dim() == 1, f"labels_B must be 1-D (one class per image), got shape {tuple(labels.shape)}")
    check(labels.numel() > 0, "labels_B is empty: give at least one class label")
    check(not labels.is_floating_point() and not labels.is_complex() and labels.dtype != torch.bool,
          f"class labels must be integers, got {labels.dtype} values {labels.tolist()[:8]}")
    labels = labels.long()
    check(int(labels.min()) >= 0 and int(labels.max()) <= num_classes,
          f"class labels must lie in [0, {num_classes}] ({num_classes} is the null class), got {labels.tolist()[:8]}")
    return labels


# ------------------------------------------------------------------------------------------------
# The same loop, paused: two models drawing in turns
# ------------------------------------------------------------------------------------------------

STEPPED_THREAD = "npp-stepped-sampler"
"""Name of the worker threads of SteppedSampler, so that a caller can see that none is left behind."""


class SteppedSampler:
    """`generate` in a worker thread that pauses after every `every` tokens until told to go on.

    generate() is one loop with a callback; pausing inside the callback lets two models take turns
    (row by row: Pipeline.stepped) without a second sampling loop to keep equal to the real one.
    """

    _CANCEL = object()

    def __init__(self, model: GPT, labels_B: torch.Tensor, sampler: SamplerConfig,
                 generators: list[torch.Generator], every: int, warm_rows: int = 0):
        check(len(generators) > 0, "SteppedSampler needs one generator per label (sample_generators)")
        self.every, self.length, self.done = every, model.config.seq_len, False
        self.warm_rows = warm_rows
        """Rows sampled first, untimed and discarded, with generators of their own (the request's stay
        untouched), so that one-time costs land before the first timed row."""
        self.ready = threading.Event()
        """Set once the warm-up is over (or failed: the failure is then the first `advance`'s)."""
        self._go: queue.Queue[object] = queue.Queue()
        self._out: queue.Queue[tuple[str, Any]] = queue.Queue()
        self._thread = threading.Thread(target=self._run, args=(model, labels_B, sampler, generators), daemon=True,
                                        name=STEPPED_THREAD)
        self._thread.start()

    def _run(self, model: GPT, labels_B: torch.Tensor, sampler: SamplerConfig,
             generators: list[torch.Generator]) -> None:
        try:
            try:
                self._warm_up(model, labels_B, sampler, generators[0].device)
            finally:
                self.ready.set()
            self._wait()
            tokens_BL = generate(model, labels_B, sampler, generator=generators, callback=self._pause)
            self._out.put(("done", tokens_BL.cpu()))
        except _Cancelled:
            pass
        except BaseException as err:  # noqa: BLE001 (handed to the caller, which raises it)
            self._out.put(("error", err))

    def _warm_up(self, model: GPT, labels_B: torch.Tensor, sampler: SamplerConfig, device: torch.device) -> None:
        """Sample warm_rows rows in this thread and throw them away (a warm-up's failure is the real run's)."""
        if self.warm_rows <= 0:
            return
        tokens = min(self.warm_rows * self.every, self.length)

        def stop(step: int, tokens_BT: torch.Tensor) -> None:
            if step + 1 >= tokens:
                raise _WarmedUp

        try:
            generate(model, labels_B, sampler, generator=sample_generators(range(len(labels_B)), 0, device),
                     callback=stop)
        except _WarmedUp:
            pass

    def _pause(self, step: int, tokens_BT: torch.Tensor) -> None:
        if (step + 1) % self.every == 0 and step + 1 < self.length:
            self._out.put(("partial", tokens_BT.cpu()))
            self._wait()

    def _wait(self) -> None:
        if self._go.get() is self._CANCEL:
            raise _Cancelled

    def advance(self) -> torch.Tensor:
        """Sample the next `every` tokens (the rest, at the end); returns every token so far, (B, T) on the CPU."""
        if self.done:
            raise RuntimeError("this sampler has finished")
        self._go.put(True)
        kind, payload = self._out.get()
        if kind == "error":
            self.done = True
            raise payload
        self.done = kind == "done"
        return payload

    def close(self) -> None:
        """Stop a sampler that is waiting for its turn (the request was cancelled); finished ones just end."""
        if not self.done:
            self.done = True
            self._go.put(self._CANCEL)
        self._thread.join(timeout=5)


class _Cancelled(Exception):
    pass


class _WarmedUp(Exception):
    pass
