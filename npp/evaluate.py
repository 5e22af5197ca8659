"""Evaluation: reproducible sampling for metrics, then FID, IS, precision/recall and KID (npp.fidelity).

    npp evaluate runs/quickstart-npp --num-samples 10000                 # domain FID on the embedded data
    npp evaluate export/ --reference imagenet/val --inception-weights pt_inception.pth --export-npz
    torchrun --nproc_per_node 8 -m npp.cli evaluate runs/B-npp --reference imagenet/val ...

Sample i is drawn with its own generator seeded base_seed + i, so the images do not depend on how
the work is split over processes or restarts: batch k (samples k·b … k·b + b − 1) goes to rank
k mod W, its PNGs are written atomically, and a rerun skips the batches already on disk. A PNG is reused
only if it says (in its own text chunks) that the same weights, tokenizer, sampler, seeds and batch drew
it; a sample folder holding another model's samples is moved aside, never scored or deleted. Rank 0
then computes the metrics and writes results.json beside the samples, with everything a number
needs to be trusted (torch-fidelity version, feature extractor and weights hash, reference
identity and size, sampler settings, seeds, model identity).

Neighbours: npp.protocol (the CFG scale and scoring size a model gets when no flag says otherwise),
npp.sample_folder (a sample folder's provenance, claiming it, reading it back), npp.fidelity (the metrics).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from npp.config import PAPER_SAMPLER, SamplerConfig
from npp.distributed import Ranks
from npp.errors import check, check_device, is_int, require
from npp.files import atomic_path, dump_json
from npp.fidelity import (EMBEDDED_CLASSIFIER, INCEPTION_EXTRACTOR, METRICS, MNIST_EXTRACTOR, Reference,
                          check_image_size, class_accuracy, fidelity_metrics, resolve_extractor, resolve_reference)
from npp.model import GPT
from npp.pipeline import Pipeline
from npp.protocol import LLAMAGEN_FID_CFG, PAPER_PROTOCOL, Protocol, default_protocol, default_sampler
from npp.runs import RunDir
from npp.sample_folder import (BATCH_CHUNK, KEY_CHUNK, batch_tag, claim_results, claim_samples, drawn_by,
                               png_path, read_samples, samples_key)
from npp.sampling import sample_generators
from npp.threads import check_threads, use_threads
from npp.tokenizer import VQModel, to_uint8

LABEL_MODES = ("balanced", "random")


@dataclass
class EvalConfig:
    """What to sample and what to compare it with; every field is recorded in results.json."""

    num_samples: int = 10_000
    """Number of generated images (the paper uses 50,000 for ImageNet)."""
    batch_size: int = 100
    """Samples per generation batch. Part of the sampling recipe: the same value gives the same images."""
    base_seed: int = 0
    """Sample i is drawn with a generator seeded base_seed + i."""
    labels: str = "balanced"
    """'balanced': sample i asks for class i mod C; 'random': a class drawn from sample i's generator."""
    sampler: SamplerConfig = PAPER_SAMPLER
    """How tokens are drawn (CFG scale and interval, temperature, top-k, top-p); the paper's by default."""
    reference: str = "auto"
    """'mnist-test' or 'mnist-train' (the embedded data), an image folder, an .npz with reference
    images (arr_0, as in the ADM evaluator's batches) or FID statistics (mu, sigma; FID only), or
    'auto': the embedded test split for runs on the embedded data."""
    feature_extractor: str = "auto"
    """'npp-mnist-classifier' (domain metrics), 'inception-v3-compat' (standard FID), or 'auto':
    the classifier for the embedded data, Inception otherwise."""
    inception_weights: str | None = None
    """Path of torch-fidelity's Inception weights (weights-inception-2015-12-05-6726825d.pth); by
    default the torch hub cache, where torch-fidelity downloads them."""
    metrics: tuple[str, ...] = METRICS
    """Which of fid, isc (Inception score), prc (precision/recall, k = 3) and kid to compute."""
    kid_subset_size: int = 1000
    """KID subset size; lowered to the number of images when there are fewer."""
    save_png: bool = True
    """Write every sample as a PNG (needed to resume and to shard); off keeps them in memory."""
    export_npz: bool = False
    """Also write samples.npz with arr_0 (N×H×W×3 uint8), the batch the OpenAI ADM evaluator reads."""
    eval_image_size: int = 0
    """Resize every sample to this many pixels a side (bicubic) before the metrics, the PNGs and the npz,
    as LlamaGen's --image-size-eval does (its 384-px models are scored at 256); 0 keeps the model's size."""
    device: str = "auto"
    """'cpu', 'cuda' (this rank's GPU under a launcher) or 'auto'."""
    progress: bool = True
    """Show progress bars."""
    threads: int | None = None
    """CPU threads for torch's operators; results.json records the count in force, since another count
    changes the numbers. Default: the count the process would use anyway (OMP_NUM_THREADS if set, else
    torch's), so that a command line or environment that worked before computes what it did."""

    def __post_init__(self) -> None:
        if isinstance(self.sampler, dict):
            self.sampler = SamplerConfig.from_dict(self.sampler)
        self.metrics = tuple(self.metrics)
        check(is_int(self.eval_image_size) and self.eval_image_size >= 0,
              f"EvalConfig.eval_image_size={self.eval_image_size!r}: use a size in pixels, or 0 for the model's own")
        for name in ("num_samples", "batch_size", "kid_subset_size"):
            value = getattr(self, name)
            check(is_int(value) and value > 0, f"EvalConfig.{name}={value!r}: use a positive whole number")
        # FID needs a covariance and precision/recall its k = 3 nearest neighbours: fail before sampling.
        check(self.num_samples >= (4 if "prc" in self.metrics else 2),
              f"EvalConfig.num_samples={self.num_samples}: the metrics need at least "
              f"{4 if 'prc' in self.metrics else 2} samples (thousands for a useful FID)")
        check(is_int(self.base_seed) and self.base_seed >= 0, f"EvalConfig.base_seed={self.base_seed!r}: use a whole number ≥ 0")
        check(self.labels in LABEL_MODES, f"EvalConfig.labels={self.labels!r}: use 'balanced' or 'random'")
        check(self.feature_extractor in ("auto", MNIST_EXTRACTOR, INCEPTION_EXTRACTOR),
              f"EvalConfig.feature_extractor={self.feature_extractor!r}: use 'auto', "
              f"'{MNIST_EXTRACTOR}' or '{INCEPTION_EXTRACTOR}'")
        unknown = sorted(set(self.metrics) - set(METRICS))
        check(not unknown and self.metrics, f"EvalConfig.metrics={list(self.metrics)}: choose from {list(METRICS)}")
        check(self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:"),
              f"EvalConfig.device={self.device!r}: use 'auto', 'cpu' or 'cuda'")
        check_threads(self.threads, "EvalConfig.threads")

    def image_settings(self) -> dict[str, Any]:
        """The settings that decide the images (and so name the sample folder)."""
        resize = {"eval_image_size": self.eval_image_size} if self.eval_image_size else {}
        return {"num_samples": self.num_samples, "batch_size": self.batch_size, "base_seed": self.base_seed,
                "labels": self.labels, **self.sampler.to_dict(), **resize}

    def folder_name(self) -> str:
        s = self.sampler
        name = (f"n{self.num_samples}-seed{self.base_seed}-{self.labels}-cfg{s.cfg_scale:g}"
                f"-i{s.cfg_interval}-t{s.temperature:g}-k{s.top_k}-p{s.top_p:g}-b{self.batch_size}")
        # Knobs of a SamplerConfig subclass also decide the images: they name the folder too.
        extra = [f.name for f in dataclasses.fields(s) if f.name not in {g.name for g in dataclasses.fields(SamplerConfig)}]
        resize = f"-e{self.eval_image_size}" if self.eval_image_size else ""  # absent: older folders keep their names
        return name + "".join(f"-{key}{getattr(s, key)}" for key in extra) + resize

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "metrics": list(self.metrics)}


# ------------------------------------------------------------------------------------------------
# Sampling: sample i depends on base_seed + i only
# ------------------------------------------------------------------------------------------------

def sample_labels(indices: Sequence[int], num_classes: int, mode: str,
                  generators: Sequence[torch.Generator]) -> torch.Tensor:
    """Balanced: class i mod C. Random: the first draw of sample i's own generator."""
    if mode == "balanced":
        return torch.tensor([i % num_classes for i in indices], dtype=torch.long)
    return torch.cat([torch.randint(num_classes, (1,), generator=g, device=g.device).cpu() for g in generators])


def draw_samples(pipe: Pipeline, indices: Sequence[int], config: EvalConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Decoded samples (B, H, W, 3) uint8 and their labels for the given sample indices."""
    generators = sample_generators(indices, config.base_seed, pipe.device)
    labels_B = sample_labels(indices, pipe.model.config.num_classes, config.labels, generators)
    if not config.eval_image_size or config.eval_image_size == pipe.image_size:
        return pipe(labels_B, config.sampler, generator=generators), labels_B
    codes_Bhw = pipe(labels_B, config.sampler, generator=generators, output="codes")
    with torch.no_grad():
        images_B3HW = pipe.vq.decode(codes_Bhw.to(pipe.vq.device))
    return to_uint8(resize_bicubic(images_B3HW, config.eval_image_size)), labels_B


def resize_bicubic(images_B3HW: torch.Tensor, side: int) -> torch.Tensor:
    """The decoder's [-1, 1] output resized to side × side as LlamaGen's sample_c2i_ddp.py does for
    --image-size-eval: torch's bicubic interpolation on the floats, before they are rounded to pixels."""
    return torch.nn.functional.interpolate(images_B3HW.float(), size=(side, side), mode="bicubic")


def draw_all(pipe: Pipeline, config: EvalConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Every sample in memory, batch by batch as sample_to_folder draws them: (N, H, W, 3) and (N,)."""
    indices = range(config.num_samples)
    chunks = [draw_samples(pipe, indices[k:k + config.batch_size], config)
              for k in range(0, config.num_samples, config.batch_size)]
    return torch.cat([c[0] for c in chunks]), torch.cat([c[1] for c in chunks])


# ------------------------------------------------------------------------------------------------
# Drawing into a sample folder (npp.sample_folder: what drew it, claiming it, reading it back)
# ------------------------------------------------------------------------------------------------

def samples_identity(pipe: Pipeline, config: EvalConfig) -> dict[str, Any]:
    """Everything sample i depends on besides i: the exact weights and tokenizer, and the sampling recipe."""
    return {"model_sha256": pipe.weights_sha256(), "tokenizer_fingerprint": pipe.tokenizer_fingerprint(),
            "num_classes": pipe.model.config.num_classes, "base_seed": config.base_seed, "labels": config.labels,
            "batch_size": config.batch_size, "sampler": config.sampler.to_dict(),
            "sampler_class": type(config.sampler).__name__,
            # only when resizing: the keys of folders drawn at the model's size stay what they were
            **({"eval_image_size": config.eval_image_size} if config.eval_image_size else {})}


def sample_to_folder(pipe: Pipeline, config: EvalConfig, folder: Path, *, rank: int = 0, world: int = 1,
                     on_batch: Callable[[int], None] | None = None) -> int:
    """This rank's batches (k ≡ rank mod world) as PNGs; batches already drawn by the same weights, tokenizer,
    sampler, seeds and batch are skipped (each PNG says what drew it). Returns samples drawn."""
    image = require("PIL.Image", "writing samples as PNG (or --no-save-png)")
    png_info = require("PIL.PngImagePlugin", "writing samples as PNG").PngInfo
    key = samples_key(samples_identity(pipe, config))
    folder.mkdir(parents=True, exist_ok=True)
    drawn = 0
    for k in range(rank, math.ceil(config.num_samples / config.batch_size), world):
        indices = range(k * config.batch_size, min(config.num_samples, (k + 1) * config.batch_size))
        batch = batch_tag(indices)
        if not all(drawn_by(png_path(folder, i), key, batch) for i in indices):
            images, _ = draw_samples(pipe, indices, config)
            info = png_info()
            info.add_text(KEY_CHUNK, key)
            info.add_text(BATCH_CHUNK, batch)
            for i, array in zip(indices, images.numpy()):
                with atomic_path(png_path(folder, i)) as tmp:  # a killed rank leaves no half-written sample
                    image.fromarray(array).save(tmp, format="PNG", pnginfo=info)
            drawn += len(indices)
        if on_batch is not None:
            on_batch(len(indices))
    return drawn


# ------------------------------------------------------------------------------------------------
# Metrics of a set of samples
# ------------------------------------------------------------------------------------------------

def score(samples: str | torch.Tensor, images_NHW3: torch.Tensor, labels_N: torch.Tensor, reference: Reference,
          config: EvalConfig, *, extractor: str, weights: Path | None, weights_sha256: str) -> dict[str, float]:
    """The configured torch-fidelity metrics, plus class accuracy where the MNIST judge applies."""
    from npp.data import MNIST_CLASSES

    metrics = fidelity_metrics(samples, reference, config.metrics, extractor=extractor, weights=weights,
                               weights_sha256=weights_sha256, kid_subset_size=config.kid_subset_size,
                               num_samples=len(images_NHW3), verbose=config.progress)
    if extractor == MNIST_EXTRACTOR and int(labels_N.max()) < len(MNIST_CLASSES):
        metrics["class_accuracy"] = class_accuracy(images_NHW3, labels_N)
    return metrics


class QuickEval:
    """The trainer's periodic evaluation: samples in memory, metrics, nothing written but the row.

    What can fail (weights file, reference, image size) is resolved when it is built, before training.
    """

    def __init__(self, config: EvalConfig, vq: VQModel, mnist: bool, grid: int):
        self.config, self.vq = config, vq
        self.extractor, self.weights, self.weights_sha = resolve_extractor(config.feature_extractor,
                                                                           config.inception_weights, mnist)
        self.reference = resolve_reference(config.reference, mnist)
        check_image_size(self.reference, config.eval_image_size or vq.config.downsample * grid)

    def __call__(self, model: GPT) -> tuple[dict[str, float], torch.Tensor, torch.Tensor]:
        """(metrics, images (N, H, W, 3) uint8, labels (N,)) of the model as it is now."""
        pipe = Pipeline(model, self.vq.to(model.tok_embeddings.weight.device))
        images, labels = draw_all(pipe, self.config)
        metrics = score(images, images, labels, self.reference, self.config, extractor=self.extractor,
                        weights=self.weights, weights_sha256=self.weights_sha)
        return metrics, images, labels


# ------------------------------------------------------------------------------------------------
# The whole evaluation
# ------------------------------------------------------------------------------------------------

def _device(config: EvalConfig, ranks: Ranks) -> torch.device:
    name = config.device
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    check_device(name)  # before loading anything: a missing GPU is said as such
    return ranks.device(name)


def evaluate(path: str | os.PathLike, config: EvalConfig, *, out: str | os.PathLike | None = None,
             tokenizer: str | None = None) -> dict[str, Any] | None:
    """Sample, measure and write results.json; returns the results on rank 0 (None on other ranks).

    Everything that can be wrong with the inputs (unknown run, missing weights, empty or mismatched
    reference) is found before the first sample is drawn.
    """
    config = dataclasses.replace(config, threads=use_threads(config.threads))  # before any work; recorded
    ranks = Ranks.join()
    try:
        pipe = Pipeline.from_run(path, tokenizer=tokenizer, device=_device(config, ranks))
        if out is None:  # results go into the run folder: not while a trainer or an export holds it
            RunDir(pipe.export.parent).refuse_if_training("npp evaluate")
        extractor, weights, weights_sha = resolve_extractor(config.feature_extractor, config.inception_weights,
                                                            pipe.on_embedded_data)
        reference = resolve_reference(config.reference, pipe.on_embedded_data)
        check_image_size(reference, config.eval_image_size or pipe.image_size)
        folder = Path(out) if out else pipe.export.parent / "eval" / config.folder_name()
        identity = samples_identity(pipe, config)
        key = samples_key(identity)
        if ranks.rank == 0:  # before any rank draws: the folder must hold this model's samples only
            claim_results(folder / "results.json", key)
            if config.save_png:
                claim_samples(folder / "samples", identity)
        ranks.barrier()
        started = time.perf_counter()
        if config.save_png:
            bar = require("tqdm.auto", "npp evaluate").tqdm(total=config.num_samples, desc="sampling", unit="img",
                                                            disable=not (config.progress and ranks.rank == 0))
            drawn = sample_to_folder(pipe, config, folder / "samples", rank=ranks.rank, world=ranks.world,
                                     on_batch=lambda n: bar.update(n * ranks.world))
            bar.close()
            ranks.barrier()
            drawn = ranks.total(drawn)
            in_memory = None
        else:
            check(ranks.world == 1, "EvalConfig.save_png=False keeps samples in memory: run it in one process")
            in_memory = draw_all(pipe, config)
            drawn = config.num_samples
        sampling_seconds = time.perf_counter() - started
        # Every rank waits for rank 0's metrics, so a failure there is raised everywhere.
        results = ranks.on_rank0(lambda: _measure(pipe, config, folder, reference, extractor, weights,
                                                  weights_sha, drawn, sampling_seconds, in_memory, key))
        return results if ranks.rank == 0 else None
    finally:
        ranks.leave()


def _measure(pipe: Pipeline, config: EvalConfig, folder: Path, reference: Reference, extractor: str,
             weights: Path | None, weights_sha: str, drawn: int, sampling_seconds: float,
             in_memory: tuple[torch.Tensor, torch.Tensor] | None, key: str) -> dict[str, Any]:
    import torch_fidelity

    if in_memory is None:
        images = read_samples(folder / "samples", config.num_samples, key)
        indices = range(config.num_samples)
        labels = sample_labels(indices, pipe.model.config.num_classes, config.labels,
                               sample_generators(indices, config.base_seed))
    else:
        images, labels = in_memory
    started = time.perf_counter()
    # Exactly samples 0 … N − 1 are scored, never whatever else the folder holds.
    metrics = score(images, images, labels, reference, config, extractor=extractor, weights=weights,
                    weights_sha256=weights_sha)
    domain = extractor == MNIST_EXTRACTOR
    results = {
        "metrics": metrics,
        "note": ("domain metrics: features of the shipped MNIST classifier, not Inception; not comparable "
                 "to ImageNet FID" if domain else "Inception-v3 (torch-fidelity's inception-v3-compat) FID"),
        "num_samples": config.num_samples,
        "image_size": {"sampled": pipe.image_size, "evaluated": config.eval_image_size or pipe.image_size,
                       "resize": ("bicubic (torch, on the decoder's output)"
                                  if config.eval_image_size not in (0, pipe.image_size) else None)},
        "sampler": config.image_settings(),
        "seeds": f"sample i uses torch.Generator().manual_seed({config.base_seed} + i)",
        "feature_extractor": {"name": extractor, "weights": str(weights) if weights else str(EMBEDDED_CLASSIFIER),
                              "weights_sha256": weights_sha},
        "reference": reference.identity,
        "torch_fidelity": torch_fidelity.__version__,
        "torch": torch.__version__,
        "threads": config.threads,
        "model": pipe.identity(),
        "samples": str(folder / "samples") if config.save_png else None,
        "seconds": {"sampling": round(sampling_seconds, 2), "metrics": round(time.perf_counter() - started, 2)},
        "drawn_this_run": drawn,
        "reused": config.num_samples - drawn,
        "samples_key": key,
        "config": config.to_dict(),
    }
    folder.mkdir(parents=True, exist_ok=True)
    if config.export_npz:
        with atomic_path(folder / "samples.npz") as tmp:
            np.savez(tmp, arr_0=images.numpy())
        results["npz"] = str(folder / "samples.npz")
    results["results"] = str(folder / "results.json")
    dump_json(results, folder / "results.json")
    return results


# ------------------------------------------------------------------------------------------------
# Command line
# ------------------------------------------------------------------------------------------------

def protocol_line(protocol: Protocol, config: EvalConfig, args: argparse.Namespace) -> str:
    """One line: the CFG scale and scoring size in force, each with where it comes from."""
    from npp.flags import given

    cfg_from = "--cfg-scale" if "cfg_scale" in given(args, SamplerConfig) else protocol.source
    size_from = "--eval-image-size" if "eval_image_size" in given(args, EvalConfig) else protocol.source
    size = (f"resized to {config.eval_image_size} px (bicubic) before the metrics" if config.eval_image_size
            else "scored at the model's own size")
    return f"npp evaluate: CFG scale {config.sampler.cfg_scale:g} ({cfg_from}); {size} ({size_from})"


def build_parser(sampler: type[SamplerConfig] = SamplerConfig):
    """`npp evaluate`'s flags: EvalConfig's fields, the sampler's flattened (`--cfg-scale`). A SamplerConfig
    subclass brings its own knobs as flags."""
    from npp.flags import Parser, add_flags

    released = ", ".join(f"{name} {scale}" for name, scale in LLAMAGEN_FID_CFG.items())
    parser = Parser(prog="npp evaluate", description=__doc__.splitlines()[0], epilog=(
        f"Defaults of --cfg-scale and --eval-image-size, when not given: a released LlamaGen GPT (an export of "
        f"`npp convert`) is scored by LlamaGen's FID protocol (CFG {released}; its 384-px models resized to "
        f"256 px); a run by its recipe's CFG (its eval_sampler); the first line printed says which is in force."))
    parser.add_argument("path", help="a run directory (runs/<name>) or an export folder")
    parser.add_argument("--out", help="output folder (default: <run>/eval/<sampler settings>)")
    parser.add_argument("--tokenizer", help="tokenizer folder or LlamaGen VQ .pt (default: the export's tokenizer.json)")
    add_flags(parser, EvalConfig, exclude=["sampler"])
    add_flags(parser, sampler, defaults=PAPER_SAMPLER if sampler is SamplerConfig else sampler(
        **PAPER_SAMPLER.to_dict()))
    return parser


def config_from_args(args, sampler: type[SamplerConfig] = SamplerConfig,
                     protocol: Protocol | None = None) -> EvalConfig:
    """The flags given, over the protocol's defaults (default_protocol), over the paper's sampler."""
    from npp.flags import given

    defaults = protocol or PAPER_PROTOCOL
    knobs = {**default_sampler(defaults, sampler).to_dict(), **given(args, sampler)}
    settings = {"eval_image_size": defaults.eval_image_size, **given(args, EvalConfig, exclude=["sampler"])}
    return EvalConfig(**settings, sampler=sampler(**knobs))


def main(argv: list[str] | None = None) -> int:
    from npp.flags import run_command

    args = build_parser().parse_args(argv)

    def body() -> int:
        protocol = default_protocol(args.path)
        config = config_from_args(args, protocol=protocol)
        if os.environ.get("RANK", "0") == "0":  # once, not once per process under a launcher
            print(protocol_line(protocol, config, args), flush=True)
        results = evaluate(args.path, config, out=args.out, tokenizer=args.tokenizer)
        if results is not None:
            shown = ", ".join(f"{k} {v:.4g}" for k, v in results["metrics"].items())
            print(f"{shown}\n{results['note']}\nsamples: {results['num_samples']} scored, {results['drawn_this_run']} "
                  f"drawn now, {results['reused']} reused\nresults: {results['results']}")
        return 0

    return run_command("npp evaluate", body)


if __name__ == "__main__":
    sys.exit(main())
