"""Ordinary next-token sampling with classifier-free guidance and a KV cache (REFERENCE §5).

NPP changes only training: every model, whatever its schedule, samples one token at a time here.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F

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
    *,
    cfg_scale: float = 1.0,
    cfg_interval: int = -1,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: torch.Generator | Sequence[torch.Generator] | None = None,
    progress: bool = False,
    callback: StepCallback | None = None,
) -> torch.Tensor:
    """Sample grid² tokens per label; returns tokens_BL (int64, row-major grid order).

    cfg_scale > 1 doubles the batch with the null class and mixes uncond + s·(cond − uncond).
    cfg_interval ≥ 0 stops guidance after the first cfg_interval + 2 tokens, as in LlamaGen
    (-1 guides every token). A torch.Generator makes the draw reproducible; a list of them, one
    per label, makes every sample reproducible on its own, whatever batch it is drawn in.
    progress shows a tqdm bar; callback(step, tokens_BT) streams partial results.
    """
    config = model.config
    labels_B = labels_B.to(model.tok_embeddings.weight.device).long()
    if labels_B.dim() != 1:
        raise ValueError(f"labels_B must be 1-D (one class per image), got shape {tuple(labels_B.shape)}")
    if labels_B.numel() and (labels_B.min() < 0 or labels_B.max() > config.num_classes):
        raise ValueError(f"class labels must lie in [0, {config.num_classes}] "
                         f"({config.num_classes} is the null class), got {labels_B.tolist()}")
    for name, value, ok, fix in [
        ("temperature", temperature, temperature >= 0, "use a value ≥ 0 (1.0 is the paper's)"),
        ("top_k", top_k, isinstance(top_k, int) and top_k >= 0, "use 0 (off) or a positive int"),
        ("top_p", top_p, 0.0 < top_p <= 1.0, "use a value in (0, 1] (1.0 is off)"),
        ("cfg_scale", cfg_scale, cfg_scale >= 0, "use a value ≥ 0 (≤ 1 turns guidance off)"),
        ("cfg_interval", cfg_interval, isinstance(cfg_interval, int) and cfg_interval >= -1,
         "use -1 (guide every token) or a token count ≥ 0"),
    ]:
        if not ok:
            raise ValueError(f"{name}={value!r}: {fix}")

    B, L = labels_B.shape[0], config.seq_len
    guided = cfg_scale > 1.0
    if guided:
        labels_B = torch.cat([labels_B, torch.full_like(labels_B, config.num_classes)])
    uniforms_BL = draw_uniforms(B, L, generator, labels_B.device)
    tokens_BL = torch.empty(B, L, dtype=torch.long, device=labels_B.device)
    steps = range(L)
    if progress:
        from tqdm.auto import tqdm

        steps = tqdm(steps, desc="sampling", unit="tok", leave=False)

    was_training = model.training
    model.eval()
    try:
        cache = model.new_cache(labels_B.shape[0])
        for step in steps:
            if step == 0:
                logits = model.decode(cache, 0, labels_B=labels_B)[:, -1]
            else:
                previous = tokens_BL[:, step - 1:step]
                inputs = torch.cat([previous, previous]) if guided else previous
                logits = model.decode(cache, step, tokens_BS=inputs)[:, -1]
            if guided:
                cond_BV, uncond_BV = logits.chunk(2)
                if cfg_interval == -1 or step <= cfg_interval + 1:
                    logits = uncond_BV + cfg_scale * (cond_BV - uncond_BV)
                else:
                    logits = cond_BV
            tokens_BL[:, step] = sample_token(logits, uniforms_BL[:, step], temperature=temperature,
                                              top_k=top_k, top_p=top_p)
            if callback is not None:
                callback(step, tokens_BL[:, :step + 1])
    finally:
        model.train(was_training)
    return tokens_BL
