"""Code-extraction throughput: decode + crop + encode, and the encoder alone, on one device.

Two timings for one tokenizer preset with random weights (speed does not depend on the weights):

    pipeline   npp.extract.extract_codes end to end into a temporary folder: read and decode each
               image, crop its variants (CropConfig), encode them, write the memmaps. The images are
               the embedded MNIST digits for 32 px presets, otherwise synthetic 500×375 JPEGs (the
               typical ImageNet size), written before timing starts.
    encode     VQModel.encode alone on random images already on the device, batch × crops at a time.

A projection for ImageNet (1,281,167 images × 10 crops, one crop range of LlamaGen's protocol; their
two ranges double it) follows from the measured encode rate.

Usage (from the repository root, with npp installed in the environment):

    # CPU, small settings
    python benchmarks/extract_throughput.py --preset mnist-8x8 --images 2048 --batch 256
    python benchmarks/extract_throughput.py --preset llamagen-vq16 --crop-ranges 1.1 --images 2 --batch 1

    # one GPU, LlamaGen VQ-16 at 256 px with its 20 ten-crop variants
    python benchmarks/extract_throughput.py --preset llamagen-vq16 --device cuda --dtype bf16 --batch 16 --images 512

Record the figures with the machine, the date and the exact command.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import torch

import npp
from npp.config import VQ_PRESETS
from npp.crops import CROP_MODES, CropConfig
from npp.data import MNIST_SIZE, ImageFolderSource, ImageSource, MnistSource
from npp.extract import extract_codes

from common import (SyntheticImages, autocast, describe_machine, machine_line, markdown_table, synchronize, timed,
                    write_image_folder, write_result)

IMAGENET_IMAGES = 1_281_167
IMAGENET_CROPS = 10
IMAGENET_LIKE = (500, 375)
"""The typical ImageNet photograph's width and height."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Images/s of code extraction and of the encoder alone.",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--preset", default="mnist-8x8", choices=list(VQ_PRESETS), help="tokenizer architecture")
    parser.add_argument("--crop", choices=CROP_MODES, default=None,
                        help="crop variants (default: none for 32 px presets, ten-crop otherwise)")
    parser.add_argument("--crop-ranges", type=float, nargs="+", default=None,
                        help="ten-crop ranges (default: LlamaGen's 1.1 1.05)")
    parser.add_argument("--images", type=int, default=256, help="images extracted in the timed pipeline run")
    parser.add_argument("--batch", type=int, default=16, help="images per batch (each gives `crops` views)")
    parser.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1),
                        help="DataLoader processes decoding and cropping in the pipeline")
    parser.add_argument("--steps", type=int, default=3, help="timed encode batches")
    parser.add_argument("--warmup", type=int, default=1, help="untimed encode batches first")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32",
                        help="fp32, or bf16 autocast on CUDA (code matching stays fp32)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the weights and the synthetic images")
    parser.add_argument("--json", metavar="PATH", help="also write the results to this JSON file")
    args = parser.parse_args(argv)
    if min(args.images, args.batch, args.steps) < 1 or args.warmup < 0 or args.workers < 0:
        parser.error("--images, --batch and --steps must be ≥ 1, --warmup and --workers ≥ 0")
    if args.dtype == "bf16" and not args.device.startswith("cuda"):
        parser.error("--dtype bf16 is for CUDA devices")
    return args


def rate(per_s: float) -> str:
    """Three significant figures at any scale (a CPU encodes VQ-16 crops at well under one per second)."""
    return f"{per_s:.1f}" if per_s >= 100 else f"{per_s:.3g}"


def sources(crops: CropConfig, args: argparse.Namespace, folder: Path) -> tuple[ImageSource, ImageSource]:
    """The images to time and a batch of others to warm up on: the embedded digits for 32 px
    tokenizers, otherwise photograph-sized JPEGs written into `folder` (before any timing)."""
    if crops.size == MNIST_SIZE:
        return MnistSource("train", limit=args.images), MnistSource("train", limit=args.batch)
    timed_images = SyntheticImages(args.images, *IMAGENET_LIKE, num_classes=10, seed=args.seed)
    warm_images = SyntheticImages(min(args.batch, args.images), *IMAGENET_LIKE, num_classes=10, seed=args.seed + 1)
    return (ImageFolderSource(write_image_folder(timed_images, folder / "images")),
            ImageFolderSource(write_image_folder(warm_images, folder / "warm")))


def time_pipeline(vq, crops, args, device) -> float:
    """Images/s of extract_codes end to end (after an untimed warm-up extraction of one batch)."""
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        source, warm = sources(crops, args, tmp)
        options = {"batch_size": args.batch, "device": device, "num_workers": args.workers, "progress": False}
        with autocast(device, args.dtype):
            extract_codes(warm, vq, tmp / "warm-codes", crops, **options)
            synchronize(device)
            start = time.perf_counter()
            extract_codes(source, vq, tmp / "codes", crops, **options)
            synchronize(device)
        return len(source) / (time.perf_counter() - start)


@torch.no_grad()
def time_encode(vq, crops, args, device) -> float:
    """Crops/s of VQModel.encode on batches of batch × crops random images on the device."""
    generator = torch.Generator().manual_seed(args.seed)
    images = torch.rand(args.batch * crops.num_variants, 3, crops.size, crops.size, generator=generator)
    images = (images * 2 - 1).to(device)
    with autocast(device, args.dtype):
        seconds, _ = timed(lambda: vq.encode(images), device, warmup=args.warmup, repeats=args.steps)
    return len(images) * len(seconds) / sum(seconds)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    config = npp.VQConfig.preset(args.preset)
    vq = npp.VQModel(config).to(device).eval()
    mode = args.crop or ("none" if config.image_size == MNIST_SIZE else "ten-crop")
    crops = CropConfig(mode, size=config.image_size, ranges=tuple(args.crop_ranges) if args.crop_ranges else None)

    machine = describe_machine(device)
    print(f"tokenizer {args.preset}: {vq.num_params() / 1e6:.1f}M parameters "
          f"({sum(p.numel() for p in vq.encoder.parameters()) / 1e6:.1f}M in the encoder), "
          f"{config.image_size} px → {config.grid}×{config.grid} codes; crops {mode} "
          f"({crops.num_variants} per image); {args.dtype}")
    print(f"machine: {machine_line(machine)}")
    print()

    pipeline_images_s = time_pipeline(vq, crops, args, device)
    encode_crops_s = time_encode(vq, crops, args, device)
    V = crops.num_variants
    rows = [("decode + crop + encode", pipeline_images_s, pipeline_images_s * V),
            ("encode only", encode_crops_s / V, encode_crops_s)]
    print(markdown_table(["stage", "tokenizer", "px", "crops/image", "batch (images)", "images/s", "crops/s"],
                         [[stage, args.preset, f"{config.image_size}", f"{V}", f"{args.batch}", rate(images_s),
                           rate(crops_s)] for stage, images_s, crops_s in rows]))
    hours = IMAGENET_IMAGES * IMAGENET_CROPS / encode_crops_s / 3600
    print()
    print(f"ImageNet projection ({IMAGENET_IMAGES:,} images × {IMAGENET_CROPS} crops of {config.image_size} px "
          f"at {rate(encode_crops_s)} encoded crops/s): {hours:,.1f} hours on this device ({hours / 24:,.2f} days)")

    result = {"crops": crops.to_dict(), "num_variants": V, "pipeline_images_per_s": pipeline_images_s,
              "encode_crops_per_s": encode_crops_s, "imagenet_10crop_hours": hours}
    if args.json:
        write_result(args.json, args, machine, result)
    return result


if __name__ == "__main__":
    main()
