"""Evaluation speed: samples/s of generation (with CFG, KV cache) and of feature extraction.

    python benchmarks/eval_throughput.py generate --preset tiny --grid 8 --vocab 256 --num-classes 10
    python benchmarks/eval_throughput.py features --extractor npp-mnist-classifier
    python benchmarks/eval_throughput.py features --extractor inception-v3-compat --image-size 256
    python benchmarks/eval_throughput.py full --preset B --num-samples 50000 --cfg-scale 2.0    # one GPU

`generate` times npp.generate with per-sample generators (as npp evaluate draws them) on a randomly
initialised GPT of the preset: speed depends on shapes, not on weights. `features` times the
torch-fidelity extractor on random uint8 images (Inception with random weights unless
--inception-weights is given: the arithmetic is the same). `full` times a whole evaluation of a random
GPT with the LlamaGen VQ-16 architecture (random weights), phase by phase: generation and decoding by
npp.Pipeline, Inception features of the samples, FID against random reference statistics; it needs a
GPU to finish in minutes. The sampler flags are those of `npp evaluate` (default: the paper's, CFG 2.0).
On CUDA the GPT runs in bf16 and the tokenizer decodes under bf16 autocast.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch

import npp
from npp.config import PAPER_SAMPLER, SamplerConfig
from npp.evaluate import sample_labels
from npp.sampling import sample_generators
from npp.fidelity import INCEPTION_EXTRACTOR, MNIST_EXTRACTOR, register_mnist_extractor
from npp.flags import add_flags, given

from common import autocast, describe_machine, machine_line, synchronize, timed, write_result

FID_FEATURES = {MNIST_EXTRACTOR: "features", INCEPTION_EXTRACTOR: "2048"}
"""The features each extractor gives FID."""


def sampler_from(args: argparse.Namespace) -> SamplerConfig:
    """The paper's sampler with the sampler flags that were given."""
    return SamplerConfig(**{**PAPER_SAMPLER.to_dict(), **given(args, SamplerConfig)})


def random_gpt(args: argparse.Namespace, device: torch.device) -> npp.GPT:
    config = npp.ModelConfig.preset(args.preset, vocab_size=args.vocab, num_classes=args.num_classes, grid=args.grid)
    model = npp.GPT(config).to(device).eval()
    torch.nn.init.normal_(model.output.weight, std=0.02)  # the zero-initialised head would sample uniformly
    if device.type == "cuda":
        model = model.to(torch.bfloat16)
    return model


def random_inception(path: Path) -> Path:
    """torch-fidelity's Inception with random weights, saved to `path` (its constructor loads weights from
    a file and would otherwise download the real ones)."""
    from torch_fidelity import feature_extractor_inceptionv3 as inception

    cls = inception.FeatureExtractorInceptionV3
    original_load, original_url = cls.load_state_dict, inception.load_state_dict_from_url
    cls.load_state_dict, inception.load_state_dict_from_url = (lambda self, state: None), (lambda *a, **k: {})
    try:
        torch.save(cls(INCEPTION_EXTRACTOR, ["2048"]).state_dict(), path)
    finally:
        cls.load_state_dict, inception.load_state_dict_from_url = original_load, original_url
    return path


def feature_extractor(name: str, weights: str | None, device: torch.device) -> torch.nn.Module:
    """torch-fidelity's extractor `name` giving FID's features; Inception gets random weights unless
    `weights` names a file."""
    from torch_fidelity.utils import create_feature_extractor

    if name == MNIST_EXTRACTOR:
        register_mnist_extractor()
    with tempfile.TemporaryDirectory(prefix="npp-eval-bench-") as scratch:  # read once, by the constructor
        if name == INCEPTION_EXTRACTOR and weights is None:
            weights = str(random_inception(Path(scratch) / "random-inception.pth"))
        return create_feature_extractor(name, [FID_FEATURES[name]], cuda=device.type == "cuda",
                                        feature_extractor_weights_path=weights)


@contextmanager
def phase(seconds: dict[str, float], name: str, device: torch.device) -> Iterator[None]:
    """Add the wall time of the block, its GPU work included, to seconds[name]."""
    synchronize(device)
    started = time.perf_counter()
    yield
    synchronize(device)
    seconds[name] = seconds.get(name, 0.0) + time.perf_counter() - started


def bench_generate(args: argparse.Namespace, device: torch.device) -> dict:
    model, sampler = random_gpt(args, device), sampler_from(args)
    labels = torch.arange(args.batch) % args.num_classes

    def run():
        npp.generate(model, labels, sampler, generator=sample_generators(range(args.batch), 0, device))

    seconds, _ = timed(run, device, warmup=1, repeats=args.repeats)
    best = min(seconds)
    return {"what": "generate", "preset": args.preset, "grid": args.grid, "batch": args.batch,
            "sampler": sampler.to_dict(), "params": model.num_params(), "seconds": seconds,
            "samples_per_s": args.batch / best, "tokens_per_s": args.batch * args.grid ** 2 / best}


def bench_features(args: argparse.Namespace, device: torch.device) -> dict:
    extractor = feature_extractor(args.extractor, args.inception_weights, device)
    images = torch.randint(0, 256, (args.batch, 3, args.image_size, args.image_size), dtype=torch.uint8,
                           device=device)
    with torch.no_grad():
        seconds, _ = timed(lambda: extractor(images), device, warmup=1, repeats=args.repeats)
    return {"what": "features", "extractor": args.extractor, "image_size": args.image_size, "batch": args.batch,
            "seconds": seconds, "samples_per_s": args.batch / min(seconds)}


def bench_full(args: argparse.Namespace, device: torch.device) -> dict:
    """Generation + VQ-16 decoding + Inception features + FID for num_samples, random weights."""
    from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric

    sampler = sampler_from(args)
    pipe = npp.Pipeline(random_gpt(args, device), npp.VQModel(npp.VQConfig.preset("llamagen-vq16")).to(device))
    extractor = feature_extractor(INCEPTION_EXTRACTOR, args.inception_weights, device)
    seconds: dict[str, float] = {}
    features = []
    for start in range(0, args.num_samples, args.batch):
        indices = range(start, min(args.num_samples, start + args.batch))
        generators = sample_generators(indices, 0, device)
        labels = sample_labels(indices, args.num_classes, "balanced", generators)
        with phase(seconds, "generate", device):
            codes = pipe(labels, sampler, generator=generators, output="codes")
        with phase(seconds, "decode", device), autocast(device, "bf16" if device.type == "cuda" else "fp32"):
            images = pipe.decode(codes)
        with phase(seconds, "features", device), torch.no_grad():
            features.append(extractor(images.permute(0, 3, 1, 2).contiguous().to(device))[0].double().cpu())
    with phase(seconds, "fid", device):
        stats = fid_features_to_statistics(torch.cat(features))
        fid_statistics_to_metric(stats, stats, verbose=False)
    return {"what": "full", "preset": args.preset, "num_samples": args.num_samples, "batch": args.batch,
            "sampler": sampler.to_dict(), "seconds": seconds, "total_s": sum(seconds.values())}


MODES = {"generate": bench_generate, "features": bench_features, "full": bench_full}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=list(MODES))
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--grid", type=int, default=16)
    parser.add_argument("--vocab", type=int, default=16384)
    parser.add_argument("--num-classes", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--extractor", default=MNIST_EXTRACTOR, choices=list(FID_FEATURES))
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--inception-weights", default=None)
    parser.add_argument("--num-samples", type=int, default=50_000)
    parser.add_argument("--json", default=None, help="also write the result here")
    add_flags(parser, SamplerConfig, defaults=PAPER_SAMPLER)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    machine = describe_machine(device)
    print(f"machine: {machine_line(machine)}")
    result = MODES[args.mode](args, device)
    print(json.dumps(result, indent=1))
    if args.json:
        write_result(args.json, args, machine, result)


if __name__ == "__main__":
    main()
