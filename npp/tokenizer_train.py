"""Training small VQ tokenizers (the MNIST presets) on the embedded data, and the shipped ones.

    config = TokenizerTrainConfig(preset="mnist-8x8", steps=2000)
    model, metrics = train_tokenizer(config, "runs/vq-8x8")            # `npp tokenizer train ...`
    vq = npp.tokenizer.load_embedded_tokenizer("mnist-8x8")            # the weights in npp/assets

Loss: L2 reconstruction (optionally + L1) + the quantizer's codebook and commitment terms. A code
that the encoder stops choosing gets no gradient and stays dead for good, so the trainer keeps an
EMA of how often each code is chosen and, every few steps, moves codes that have gone unused onto
random recent encoder outputs (unit vectors, like the normalised codebook).

Everything random is a function of (seed, step), and a checkpoint holds the rest of the state (model,
optimizer, usage EMA, torch RNG, step), so a resumed run is bit-for-bit the uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from npp.classifier import MnistClassifier, load_mnist_classifier, predict, run_record
from npp.config import VQ_PRESETS, VQConfig
from npp.data import mnist_images, to_unit_range
from npp.errors import check, is_int
from npp.files import dump_json
from npp.tokenizer import Quantized, VQModel
from npp.weights import safe_load


@dataclass
class TokenizerTrainConfig:
    """How to train a VQ tokenizer on the embedded MNIST; defaults are the shipped mnist-8x8 recipe."""

    preset: str = "mnist-8x8"
    """Architecture: a name in npp.config.VQ_PRESETS (mnist-8x8, mnist-16x16, …)."""
    steps: int = 1000
    """Optimizer steps."""
    batch_size: int = 64
    """Images per step."""
    lr: float = 2e-3
    """Peak learning rate (AdamW), reached after warmup_steps and decayed by a cosine to end_lr."""
    end_lr: float = 2e-4
    """Learning rate at the last step."""
    warmup_steps: int = 100
    """Linear warm-up from 0 to lr."""
    betas: tuple[float, float] = (0.9, 0.99)
    """Adam's (β1, β2)."""
    weight_decay: float = 0.0
    """Decoupled weight decay (AdamW) on conv weights; the codebook, biases and norms are never decayed."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this value; 0 turns clipping off."""
    l1_weight: float = 0.0
    """Weight of an extra L1 reconstruction term (sharper strokes than L2 alone); 0 turns it off."""
    usage_decay: float = 0.99
    """Decay of the per-code EMA of assignment frequencies; 1/(1 - decay) steps is its memory."""
    dead_threshold: float = 0.03
    """A code is dead when its EMA frequency is below dead_threshold × the uniform share 1/codebook_size."""
    reseed_every: int = 50
    """Every this many steps, move dead codes onto random encoder outputs of the batch; 0 turns it off."""
    log_every: int = 50
    """Write a training row (losses, lr, usage, perplexity, speed) to metrics.jsonl this often."""
    eval_every: int = 250
    """Evaluate on the first eval_images test digits this often (a row in metrics.jsonl); 0 = only at the end."""
    eval_images: int = 1000
    """Test digits in the periodic evaluations."""
    test_images: int = 0
    """Test digits in the final evaluation written to metrics.json; 0 uses all 10,000."""
    ckpt_every: int = 250
    """Write the resumable checkpoint this often (and always at the end); 0 = only at the end."""
    train_images: int = 0
    """Train on the first this-many training digits (tests, quick checks); 0 uses all of them."""
    classifier: str = "embedded"
    """Judge of the final reconstructions: 'embedded' (the shipped classifier), a folder written by
    `npp classifier train`, or 'none'; its accuracy on the reconstructed test digits goes into metrics.json."""
    seed: int = 0
    """Seeds the initialisation, the data order and the re-seeding draws."""
    device: str = "cpu"
    """Torch device (cpu, cuda, cuda:1, mps)."""
    progress: bool = True
    """Show a tqdm bar with the loss, the batch's codebook usage and perplexity."""

    def __post_init__(self) -> None:
        self.betas = tuple(self.betas)
        check(self.preset in VQ_PRESETS, f"TokenizerTrainConfig.preset={self.preset!r}: choose one of "
                                          f"{', '.join(VQ_PRESETS)}")
        for name in ("steps", "batch_size"):
            value = getattr(self, name)
            check(is_int(value) and value > 0,
                   f"TokenizerTrainConfig.{name}={value!r}: must be a positive integer")
        for name in ("warmup_steps", "reseed_every", "log_every", "eval_every", "ckpt_every", "train_images",
                     "test_images"):
            value = getattr(self, name)
            check(is_int(value) and value >= 0,
                   f"TokenizerTrainConfig.{name}={value!r}: must be a non-negative integer")
        check(self.warmup_steps < self.steps, f"TokenizerTrainConfig.warmup_steps={self.warmup_steps}: must be "
                                               f"less than steps={self.steps}")
        check(self.lr > 0, f"TokenizerTrainConfig.lr={self.lr}: must be positive, e.g. 2e-3")
        check(0 <= self.end_lr <= self.lr, f"TokenizerTrainConfig.end_lr={self.end_lr}: must lie in [0, lr={self.lr}]")
        check(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas),
               f"TokenizerTrainConfig.betas={self.betas}: give two values in [0, 1), e.g. (0.9, 0.99)")
        for name in ("weight_decay", "grad_clip", "l1_weight"):
            check(getattr(self, name) >= 0, f"TokenizerTrainConfig.{name}={getattr(self, name)}: must be ≥ 0 "
                                             f"(0 turns it off)")
        check(0 < self.usage_decay < 1, f"TokenizerTrainConfig.usage_decay={self.usage_decay}: must lie in (0, 1), "
                                         f"e.g. 0.99")
        check(0 < self.dead_threshold < 1,
               f"TokenizerTrainConfig.dead_threshold={self.dead_threshold}: must lie in (0, 1) (a fraction of "
               f"the uniform share), e.g. 0.03")
        check(is_int(self.eval_images) and self.eval_images > 0,
               f"TokenizerTrainConfig.eval_images={self.eval_images!r}: must be a positive integer")

    @property
    def vq(self) -> VQConfig:
        return VQConfig.preset(self.preset)

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "betas": list(self.betas)}


# --------------------------------------------------------------------------------------------
# Codebook usage
# --------------------------------------------------------------------------------------------

def code_histogram(codes: torch.Tensor, codebook_size: int) -> torch.Tensor:
    """Assignment counts per code (codebook_size,), int64, on the CPU."""
    return torch.bincount(codes.flatten().cpu(), minlength=codebook_size)


def usage_and_perplexity(counts_V: torch.Tensor) -> tuple[float, float]:
    """Fraction of codes used at least once, and exp(entropy) of the assignment distribution."""
    p_V = counts_V.double() / counts_V.sum().clamp(min=1)
    entropy = -(p_V[p_V > 0] * p_V[p_V > 0].log()).sum()
    return (counts_V > 0).double().mean().item(), entropy.exp().item()


class CodeUsage:
    """EMA of each code's share of the assignments: finds the codes nobody has chosen for a while."""

    def __init__(self, codebook_size: int, decay: float, dead_threshold: float):
        self.decay = decay
        self.dead_level = dead_threshold / codebook_size
        # Starting from the uniform share gives every code ~log(1/threshold)/(1-decay) steps to be chosen.
        self.frequency_V = torch.full((codebook_size,), 1.0 / codebook_size, dtype=torch.float64)

    def update(self, counts_V: torch.Tensor) -> None:
        share_V = counts_V.double() / counts_V.sum().clamp(min=1)
        self.frequency_V.mul_(self.decay).add_(share_V, alpha=1 - self.decay)

    def dead(self) -> torch.Tensor:
        """Indices of the dead codes."""
        return (self.frequency_V < self.dead_level).nonzero().flatten()

    def revive(self, codes: torch.Tensor) -> None:
        """A re-seeded code starts again from the uniform share, so it is not re-seeded at once."""
        self.frequency_V[codes] = 1.0 / len(self.frequency_V)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"frequency_V": self.frequency_V.clone()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.frequency_V.copy_(state["frequency_V"])


@torch.no_grad()
def reseed_codes(model: VQModel, optimizer: torch.optim.Optimizer, codes: torch.Tensor, z_NC: torch.Tensor,
                 generator: torch.Generator) -> None:
    """Move the given codes onto random rows of z_NC (normalised encoder outputs), distinct ones while
    there are at least as many rows as codes.

    Their Adam moments are zeroed too: they belonged to a code that no longer exists.
    """
    weight_VC = model.quantize.embedding.weight
    replace = len(codes) > len(z_NC)
    rows = torch.multinomial(torch.ones(len(z_NC)), len(codes), replacement=replace, generator=generator)
    weight_VC[codes.to(weight_VC.device)] = z_NC[rows.to(z_NC.device)].to(weight_VC.dtype)
    for moment in optimizer.state.get(weight_VC, {}).values():
        if torch.is_tensor(moment) and moment.shape == weight_VC.shape:
            moment[codes.to(moment.device)] = 0


# --------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------

@torch.no_grad()
def evaluate_tokenizer(model: VQModel, images_uint8: torch.Tensor, labels: torch.Tensor | None = None,
                       classifier: MnistClassifier | None = None, batch_size: int = 100) -> dict[str, float]:
    """Reconstruction MSE (and PSNR) in [-1, 1] units, codebook usage and perplexity over all images,
    and, given a classifier and labels, the fraction of reconstructions it recognises."""
    was_training = model.training
    model.eval()
    V = model.config.codebook_size
    counts_V = torch.zeros(V, dtype=torch.int64)
    squared_error, correct = 0.0, 0
    for start in range(0, len(images_uint8), batch_size):
        images_B3HW = to_unit_range(images_uint8[start:start + batch_size]).to(model.device)
        codes_Bhw = model.encode(images_B3HW)
        recon_B3HW = model.decode(codes_Bhw)
        counts_V += code_histogram(codes_Bhw, V)
        squared_error += (recon_B3HW - images_B3HW).pow(2).mean(dim=(1, 2, 3)).sum().item()
        if classifier is not None and labels is not None:
            correct += (predict(classifier, recon_B3HW.clamp(-1, 1)) == labels[start:start + batch_size]).sum().item()
    model.train(was_training)
    mse = squared_error / len(images_uint8)
    usage, perplexity = usage_and_perplexity(counts_V)
    # Pixel range 2 ([-1, 1]): PSNR = 10·log10(2² / MSE).
    metrics = {"recon_mse": mse, "psnr_db": 10 * math.log10(4 / mse), "codebook_usage": usage,
               "perplexity": perplexity, "images": len(images_uint8)}
    if classifier is not None and labels is not None:
        metrics["recon_classifier_accuracy"] = correct / len(images_uint8)
    return metrics


def _judge(name: str, device: str) -> MnistClassifier | None:
    if name == "none":
        return None
    if name == "embedded":
        return load_mnist_classifier(device)
    return MnistClassifier.from_pretrained(name, device=device)


# --------------------------------------------------------------------------------------------
# The trainer
# --------------------------------------------------------------------------------------------

def _stream_seed(seed: int, stream: int, index: int) -> int:
    """A distinct, reproducible seed for each (purpose, epoch-or-step) pair."""
    return (seed * 1_000_003 + stream) * 1_000_003 + index


_DATA, _RESEED = 1, 2

# Settings that leave the trained weights unchanged: a resumed run may change them.
_NOT_IN_WEIGHTS = {"log_every", "eval_every", "eval_images", "test_images", "ckpt_every", "classifier",
                   "device", "progress"}


class TokenizerTrainer:
    """Owns the model, optimizer and usage statistics; `train()` runs (or resumes) to config.steps.

    Files in `out`: metrics.jsonl (one row per log/eval step), checkpoints/latest.pt (resumable
    state, replaced atomically), and at the end model.safetensors + config.json + metrics.json.
    """

    def __init__(self, config: TokenizerTrainConfig, out: str | os.PathLike):
        self.config = config
        self.out = Path(out)
        torch.manual_seed(config.seed)
        self.model = VQModel(config.vq).to(config.device).train()
        self.codebook_size = self.model.config.codebook_size
        self.optimizer = self._build_optimizer()
        self.usage = CodeUsage(self.codebook_size, config.usage_decay, config.dead_threshold)
        self.step = 0
        self.elapsed_s = 0.0
        images, _ = mnist_images("train")
        self.train_images = images[:config.train_images] if config.train_images else images
        self._epoch_order: tuple[int, torch.Tensor] | None = None

    # ---- pieces of a step ---------------------------------------------------------------------

    def _build_optimizer(self) -> torch.optim.Optimizer:
        codebook = self.model.quantize.embedding.weight
        decayed = [p for p in self.model.parameters() if p.dim() == 4]
        rest = [p for p in self.model.parameters() if p.dim() != 4 and p is not codebook]
        return torch.optim.AdamW([{"params": decayed, "weight_decay": self.config.weight_decay},
                                  {"params": rest + [codebook], "weight_decay": 0.0}],
                                 lr=self.config.lr, betas=self.config.betas)

    def lr_at(self, step: int) -> float:
        """Linear warm-up, then a cosine from lr to end_lr over the remaining steps."""
        c = self.config
        if step < c.warmup_steps:
            return c.lr * (step + 1) / c.warmup_steps
        progress = (step - c.warmup_steps) / max(c.steps - c.warmup_steps - 1, 1)
        return c.end_lr + (c.lr - c.end_lr) * 0.5 * (1 + math.cos(math.pi * progress))

    def batch_indices(self, step: int) -> torch.Tensor:
        """Training images of a step: consecutive slices of one seeded permutation per epoch."""
        N, B = len(self.train_images), self.config.batch_size
        positions = torch.arange(step * B, (step + 1) * B)
        epochs = positions // N
        return torch.cat([self._epoch_permutation(int(e))[positions[epochs == e] % N] for e in epochs.unique()])

    def _epoch_permutation(self, epoch: int) -> torch.Tensor:
        if self._epoch_order is None or self._epoch_order[0] != epoch:
            generator = torch.Generator().manual_seed(_stream_seed(self.config.seed, _DATA, epoch))
            self._epoch_order = (epoch, torch.randperm(len(self.train_images), generator=generator))
        return self._epoch_order[1]

    def loss(self, images_B3HW: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor], Quantized]:
        """Total loss, its terms, and the quantizer's output."""
        recon_B3HW, quantized = self.model(images_B3HW)
        terms = {"recon_mse": F.mse_loss(recon_B3HW, images_B3HW),
                 "codebook_loss": quantized.codebook_loss, "commit_loss": quantized.commit_loss}
        if self.config.l1_weight:
            terms["recon_l1"] = F.l1_loss(recon_B3HW, images_B3HW)
        total = (terms["recon_mse"] + self.config.l1_weight * terms.get("recon_l1", 0.0)
                 + terms["codebook_loss"] + terms["commit_loss"])
        return total, terms, quantized

    def train_step(self) -> dict[str, float]:
        """One optimizer step on the batch of self.step, usage bookkeeping and, when due, re-seeding."""
        c = self.config
        images_B3HW = to_unit_range(self.train_images[self.batch_indices(self.step)]).to(c.device)
        lr = self.lr_at(self.step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        loss, terms, quantized = self.loss(images_B3HW)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if c.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), c.grad_clip)
        self.optimizer.step()

        counts_V = code_histogram(quantized.codes_Bhw, self.codebook_size)
        self.usage.update(counts_V)
        self.step += 1
        reseeded = self._reseed_dead(quantized.z_BhwC) if c.reseed_every and self.step % c.reseed_every == 0 else 0
        usage, perplexity = usage_and_perplexity(counts_V)
        return {"loss": loss.item(), **{k: v.item() for k, v in terms.items()}, "lr": lr,
                "batch_usage": usage, "perplexity": perplexity, "reseeded": reseeded}

    def _reseed_dead(self, z_BhwC: torch.Tensor) -> int:
        dead = self.usage.dead()
        if len(dead):
            generator = torch.Generator().manual_seed(_stream_seed(self.config.seed, _RESEED, self.step))
            reseed_codes(self.model, self.optimizer, dead, z_BhwC.flatten(0, 2), generator)
            self.usage.revive(dead)
        return len(dead)

    # ---- the loop ---------------------------------------------------------------------------

    def train(self, until: int | None = None) -> None:
        """Train from self.step to `until` (default: config.steps), logging and checkpointing on the way."""
        c = self.config
        until = c.steps if until is None else min(until, c.steps)
        bar = _progress(c.steps, self.step, c.progress)
        window_start, window_steps, reseeded = time.perf_counter(), 0, 0
        session_start = time.perf_counter()
        while self.step < until:
            row = self.train_step()
            window_steps += 1
            reseeded += row["reseeded"]
            bar.update()
            bar.set_postfix(loss=f"{row['loss']:.4f}", usage=f"{row['batch_usage']:.2f}",
                            ppl=f"{row['perplexity']:.0f}")
            if c.log_every and self.step % c.log_every == 0:
                speed = window_steps * c.batch_size / (time.perf_counter() - window_start)
                self._log({**row, "reseeded": reseeded, "alive": 1 - len(self.usage.dead()) / self.codebook_size,
                           "imgs_per_s": round(speed, 1)})
                window_start, window_steps, reseeded = time.perf_counter(), 0, 0
            if c.eval_every and self.step % c.eval_every == 0 and self.step < c.steps:
                self._log({"eval": self.evaluate(c.eval_images)})
            if (c.ckpt_every and self.step % c.ckpt_every == 0) or self.step == c.steps:
                self.elapsed_s += time.perf_counter() - session_start
                session_start = time.perf_counter()
                self.save_checkpoint()
        bar.close()
        self.elapsed_s += time.perf_counter() - session_start

    def evaluate(self, images: int | None = None, classifier: MnistClassifier | None = None) -> dict[str, float]:
        """Reconstruction and usage metrics on the first `images` test digits (default: all)."""
        test_images, test_labels = mnist_images("test")
        if images:
            test_images, test_labels = test_images[:images], test_labels[:images]
        return evaluate_tokenizer(self.model, test_images, test_labels, classifier)

    def _log(self, row: dict[str, Any]) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        with open(self.out / "metrics.jsonl", "a") as f:
            f.write(json.dumps({"step": self.step, **row}) + "\n")

    # ---- checkpoints ----------------------------------------------------------------------------

    @property
    def checkpoint_path(self) -> Path:
        return self.out / "checkpoints" / "latest.pt"

    def state_dict(self) -> dict[str, Any]:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "usage": self.usage.state_dict(), "step": self.step, "elapsed_s": self.elapsed_s,
                "torch_rng": torch.get_rng_state(), "config": self.config.to_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.usage.load_state_dict(state["usage"])
        self.step, self.elapsed_s = state["step"], state["elapsed_s"]
        torch.set_rng_state(state["torch_rng"])

    def save_checkpoint(self) -> Path:
        """Write checkpoints/latest.pt atomically: a crash mid-write leaves the previous one intact."""
        path = self.checkpoint_path
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".pt.tmp")
        torch.save(self.state_dict(), tmp)
        os.replace(tmp, path)
        return path

    def resume(self) -> bool:
        """Load the latest checkpoint if there is one; False (and an emptied log) when starting fresh."""
        if not self.checkpoint_path.is_file():
            self._truncate_log()
            return False
        state = safe_load(self.checkpoint_path, map_location=self.config.device)
        self._check_same_recipe(state["config"])
        self.load_state_dict(state)
        self._truncate_log()
        return True

    def _check_same_recipe(self, saved: dict[str, Any]) -> None:
        changed = sorted(k for k, v in self.config.to_dict().items()
                         if k not in _NOT_IN_WEIGHTS and saved.get(k) != v)
        now = self.config.to_dict()
        check(not changed, f"cannot resume {self.checkpoint_path}: it was trained with "
                            f"{', '.join(f'{k}={saved.get(k)!r} (not {now[k]!r})' for k in changed)}; "
                            f"pass the same settings or choose another --out")

    def _truncate_log(self) -> None:
        """Drop log rows written after the checkpoint, which the resumed run will write again."""
        log = self.out / "metrics.jsonl"
        if log.is_file():
            rows = [line for line in log.read_text().splitlines() if json.loads(line)["step"] <= self.step]
            log.write_text("".join(row + "\n" for row in rows))

    # ---- the end product ------------------------------------------------------------------------

    def finish(self, command: str | None = None) -> dict[str, Any]:
        """Evaluate on the test split, write model.safetensors, config.json and metrics.json (with `command`)."""
        c = self.config
        classifier = _judge(c.classifier, c.device)
        metrics = {"steps": self.step, "train_images": len(self.train_images),
                   "test": self.evaluate(c.test_images, classifier), "wall_time_s": round(self.elapsed_s, 1),
                   "parameters": self.model.num_params(), "fingerprint": self.model.fingerprint(),
                   **run_record(c.device, command), "config": c.to_dict()}
        self.model.eval().save_pretrained(self.out)
        dump_json(metrics, self.out / "metrics.json")
        self._log({"final": metrics["test"]})
        return metrics


def _progress(total: int, initial: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, disable=not enabled, dynamic_ncols=True, desc="tokenizer")


def train_tokenizer(config: TokenizerTrainConfig, out: str | os.PathLike, *, resume: bool = False,
                    command: str | None = None) -> tuple[VQModel, dict[str, Any]]:
    """Train (or, with resume, continue from out/checkpoints/latest.pt) and write the results into out.

    Returns the trained tokenizer (eval mode) and the final metrics (also in out/metrics.json, which
    records `command`, by default this process's command line).
    """
    trainer = TokenizerTrainer(config, out)
    if resume:
        trainer.resume()
    else:
        check(not (trainer.out / "metrics.jsonl").exists(),
               f"{trainer.out} already holds a run: pass --resume to continue it, or choose another --out")
    trainer.train()
    return trainer.model.eval(), trainer.finish(command)
