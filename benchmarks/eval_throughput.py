"""Evaluation speed: samples/s of generation (with CFG, KV cache) and of feature extraction.

    python benchmarks/eval_throughput.py generate --preset tiny --grid 8 --vocab 256 --num-classes 10
    python benchmarks/eval_throughput.py features --extractor npp-mnist-classifier
    python benchmarks/eval_throughput.py features --extractor inception-v3-compat --image-size 256
    python benchmarks/eval_throughput.py full --preset B --num-samples 50000 --cfg-scale 2.0    # one GPU

`generate` times npp.generate with per-sample generators (as npp evaluate draws them) on a randomly
initialised GPT of the preset: speed depends on shapes, not on weights. `features` times the
torch-fidelity extractor on random uint8 images (Inception with random weights unless
--inception-weights is given: the arithmetic is the same). `full` times a whole evaluation of a random
GPT with the LlamaGen VQ-16 architecture (random weights): generation, decoding, Inception features of
the samples, FID against random reference statistics; it needs a GPU to finish in minutes.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import torch

import npp
from npp.evaluate import INCEPTION_EXTRACTOR, MNIST_EXTRACTOR, register_mnist_extractor, sample_generators


def machine() -> str:
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu"
    return (f"torch {torch.__version__}, {device}, {torch.get_num_threads()} threads, "
            f"load average {os.getloadavg()[0]:.1f}")


def timed(fn, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        started = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        out.append(time.perf_counter() - started)
    return out


def random_gpt(args: argparse.Namespace, device: torch.device) -> npp.GPT:
    config = npp.ModelConfig.preset(args.preset, vocab_size=args.vocab, num_classes=args.num_classes, grid=args.grid)
    model = npp.GPT(config).to(device).eval()
    torch.nn.init.normal_(model.output.weight, std=0.02)  # the zero-initialised head would sample uniformly
    if device.type == "cuda":
        model = model.to(torch.bfloat16)
    return model


def bench_generate(args: argparse.Namespace, device: torch.device) -> dict:
    model = random_gpt(args, device)
    labels = torch.arange(args.batch) % args.num_classes

    def run():
        npp.generate(model, labels, cfg_scale=args.cfg_scale, generator=sample_generators(range(args.batch), 0, device))

    run()  # warm-up
    seconds = timed(run, args.repeats)
    best = min(seconds)
    return {"what": "generate", "preset": args.preset, "grid": args.grid, "batch": args.batch,
            "cfg_scale": args.cfg_scale, "params": model.num_params(), "seconds": seconds,
            "samples_per_s": args.batch / best, "tokens_per_s": args.batch * args.grid ** 2 / best}


def bench_features(args: argparse.Namespace, device: torch.device) -> dict:
    from torch_fidelity.utils import create_feature_extractor

    if args.extractor == MNIST_EXTRACTOR:
        register_mnist_extractor()
        extractor = create_feature_extractor(MNIST_EXTRACTOR, ["features"], cuda=device.type == "cuda")
    else:
        weights = args.inception_weights
        if weights is None:
            weights = "/tmp/random-inception.pth"
            _random_inception(weights)
        extractor = create_feature_extractor(INCEPTION_EXTRACTOR, ["2048"], cuda=device.type == "cuda",
                                             feature_extractor_weights_path=weights)
    images = torch.randint(0, 256, (args.batch, 3, args.image_size, args.image_size), dtype=torch.uint8,
                           device=device)
    with torch.no_grad():
        extractor(images)
        seconds = timed(lambda: extractor(images), args.repeats)
    return {"what": "features", "extractor": args.extractor, "image_size": args.image_size, "batch": args.batch,
            "seconds": seconds, "samples_per_s": args.batch / min(seconds)}


def _random_inception(path: str) -> None:
    from torch_fidelity import feature_extractor_inceptionv3 as inception

    cls = inception.FeatureExtractorInceptionV3
    original_load, original_url = cls.load_state_dict, inception.load_state_dict_from_url
    cls.load_state_dict, inception.load_state_dict_from_url = (lambda self, state: None), (lambda *a, **k: {})
    try:
        torch.save(cls(INCEPTION_EXTRACTOR, ["2048"]).state_dict(), path)
    finally:
        cls.load_state_dict, inception.load_state_dict_from_url = original_load, original_url


def bench_full(args: argparse.Namespace, device: torch.device) -> dict:
    """Generation + VQ-16 decoding + Inception features + FID for num_samples, random weights."""
    from torch_fidelity.utils import create_feature_extractor

    from npp.tokenizer import to_uint8

    model = random_gpt(args, device)
    vq = npp.VQModel(npp.VQConfig.preset("llamagen-vq16")).to(device).eval()
    weights = args.inception_weights or "/tmp/random-inception.pth"
    if args.inception_weights is None:
        _random_inception(weights)
    extractor = create_feature_extractor(INCEPTION_EXTRACTOR, ["2048"], cuda=device.type == "cuda",
                                         feature_extractor_weights_path=weights)
    phases = {"generate": 0.0, "decode": 0.0, "features": 0.0}
    features = []
    for start in range(0, args.num_samples, args.batch):
        indices = range(start, min(args.num_samples, start + args.batch))
        labels = torch.tensor([i % args.num_classes for i in indices])
        t0 = time.perf_counter()
        tokens = npp.generate(model, labels, cfg_scale=args.cfg_scale,
                              generator=sample_generators(indices, 0, device))
        torch.cuda.synchronize() if device.type == "cuda" else None
        t1 = time.perf_counter()
        with torch.no_grad(), torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda"):
            images = to_uint8(vq.decode(tokens.view(-1, args.grid, args.grid)))
        torch.cuda.synchronize() if device.type == "cuda" else None
        t2 = time.perf_counter()
        with torch.no_grad():
            features.append(extractor(images.permute(0, 3, 1, 2).contiguous())[0].double().cpu())
        t3 = time.perf_counter()
        phases["generate"] += t1 - t0
        phases["decode"] += t2 - t1
        phases["features"] += t3 - t2
    from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric

    t0 = time.perf_counter()
    stats = fid_features_to_statistics(torch.cat(features))
    fid_statistics_to_metric(stats, stats, verbose=False)
    phases["fid"] = time.perf_counter() - t0
    return {"what": "full", "preset": args.preset, "num_samples": args.num_samples, "batch": args.batch,
            "cfg_scale": args.cfg_scale, "seconds": phases, "total_s": sum(phases.values())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=["generate", "features", "full"])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--grid", type=int, default=16)
    parser.add_argument("--vocab", type=int, default=16384)
    parser.add_argument("--num-classes", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--cfg-scale", type=float, default=2.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--extractor", default=MNIST_EXTRACTOR, choices=[MNIST_EXTRACTOR, INCEPTION_EXTRACTOR])
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--inception-weights", default=None)
    parser.add_argument("--num-samples", type=int, default=50_000)
    parser.add_argument("--json", default=None, help="also write the result here")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    print(machine())
    result = {"generate": bench_generate, "features": bench_features, "full": bench_full}[args.mode](args, device)
    result["machine"] = machine()
    print(json.dumps(result, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
