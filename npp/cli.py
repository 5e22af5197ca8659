"""The `npp` command. Each sub-command is a thin wrapper over the library.

    npp convert c2i_B_256.pt out/gpt-b       # LlamaGen/NPP .pt -> safetensors + config.json
    npp extract imagenet/train codes/in256 --tokenizer vq_ds16_c2i.pt   # images -> VQ codes
    npp tokenizer train --preset mnist-8x8 --out runs/vq-8x8             # a small VQ tokenizer on MNIST
    npp classifier train --out runs/mnist-classifier                     # the MNIST judge / FID features
    npp train --name npp-tiny --model tiny --schedule.levels 2           # NTP or NPP training (npp/train.py)
    npp export runs/npp-tiny                                             # safetensors from the latest checkpoint
    npp quickstart                                                       # the embedded data, an NTP and an NPP run
    npp evaluate runs/npp-tiny --num-samples 10000                       # FID, IS, precision/recall, KID
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shlex
import sys
import typing

import torch

from npp.classifier import ClassifierTrainConfig, train_classifier
from npp.config import VQ_PRESETS, ConfigError, field_docs
from npp.data import CROP_MODES, MNIST_SIZE, CropConfig, DataError, MnistSource
from npp.model import GPT
from npp.tokenizer_train import TokenizerTrainConfig, train_tokenizer
from npp.weights import CheckpointError


def _convert(args: argparse.Namespace) -> None:
    model = GPT.from_llamagen(args.checkpoint, n_head=args.n_head, grid=args.grid)
    model.save_pretrained(args.output)
    c = model.config
    print(f"{args.checkpoint} -> {args.output}: {model.num_params() / 1e6:.1f}M parameters, "
          f"{c.n_layer} layers × {c.n_head} heads × {c.dim}, vocab {c.vocab_size}, "
          f"{c.num_classes} classes, {c.grid}×{c.grid} grid")


def _extract(args: argparse.Namespace) -> None:
    from npp.extract import extract_codes, load_tokenizer, open_source

    architecture = {name: getattr(args, name) for name in _VQ_ARCHITECTURE if getattr(args, name) is not None}
    if "ch_mult" in architecture:
        architecture["ch_mult"] = tuple(architecture["ch_mult"])
    vq = load_tokenizer(args.tokenizer, preset=args.vq_preset, **architecture)
    source = open_source(args.source)
    digits = isinstance(source, MnistSource)
    # The digits are already 32×32: by default they are encoded as they are, one variant each.
    mode = args.crop or ("none" if digits else "ten-crop")
    size = args.image_size or (MNIST_SIZE if digits and mode == "none" else vq.config.image_size)
    crops = CropConfig(mode, size=size, ranges=tuple(args.crop_ranges) if args.crop_ranges else None)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    report = extract_codes(source, vq, args.output, crops, batch_size=args.batch_size, device=device,
                           num_workers=args.workers, progress=not args.no_progress,
                           tokenizer_path=args.tokenizer)
    if os.environ.get("RANK", "0") == "0":  # one summary, not one per rank
        print(report.summary())


# VQConfig fields a LlamaGen .pt needs to be described by (our folders carry their config.json).
_VQ_ARCHITECTURE = ("base_channels", "ch_mult", "num_res_blocks", "z_channels", "codebook_size", "codebook_dim")


def _add_extract(commands) -> None:
    extract = commands.add_parser(
        "extract", help="encode a data set's images into VQ codes (memory-mapped .npy, resumable)",
        description="Encode every crop variant of every image into VQ codes: codes.npy (N, crops, h·w), "
                    "labels.npy (-1 marks an unreadable image), manifest.json. Rerun the same command to "
                    "resume; under torchrun/deepspeed every rank takes its share.")
    extract.add_argument("source", help="an ImageFolder root (<root>/<class>/<image>), or mnist, mnist:train, "
                                        "mnist:test for the embedded digits")
    extract.add_argument("output", help="folder for codes.npy, labels.npy, manifest.json (new, empty, or "
                                        "an interrupted extraction to resume)")
    extract.add_argument("--tokenizer", required=True,
                         help="folder written by VQModel.save_pretrained, or a LlamaGen VQ .pt")
    crops = extract.add_argument_group("crops")
    crops.add_argument("--crop", choices=CROP_MODES, default=None,
                       help="crop variants per image (default: ten-crop for folders, none for mnist)")
    crops.add_argument("--crop-ranges", type=float, nargs="+", metavar="R", default=None,
                       help="ten-crop: centre-crop to size·R first, for each R (default: 1.1 1.05)")
    crops.add_argument("--image-size", type=int, default=None,
                       help="side of every crop in pixels (default: the tokenizer's image_size; 32 for mnist)")
    run = extract.add_argument_group("run")
    run.add_argument("--batch-size", type=int, default=8,
                     help="images per batch; a batch encodes batch-size × crops views")
    run.add_argument("--device", default=None,
                     help="torch device (default: cuda if available, else cpu); under a launcher 'cuda' "
                          "means cuda:LOCAL_RANK")
    run.add_argument("--workers", type=int, default=4, help="DataLoader processes that decode and crop "
                                                            "images (0: the main process)")
    run.add_argument("--no-progress", action="store_true", help="no progress bar")
    arch = extract.add_argument_group("tokenizer architecture (LlamaGen .pt only; a folder has its config)")
    arch.add_argument("--vq-preset", choices=list(VQ_PRESETS), default=None,
                      help="architecture of the .pt (default: llamagen-vq16); the flags below override it")
    arch.add_argument("--base-channels", type=int, default=None)
    arch.add_argument("--ch-mult", type=int, nargs="+", default=None, metavar="M")
    arch.add_argument("--num-res-blocks", type=int, default=None)
    arch.add_argument("--z-channels", type=int, default=None)
    arch.add_argument("--codebook-size", type=int, default=None)
    arch.add_argument("--codebook-dim", type=int, default=None)
    extract.set_defaults(run=_extract)


# ---- training commands: one flag per config field, its docstring as the help -------------------

def _add_config_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    """--kebab-case flags for the scalar and tuple fields of a config dataclass (nested configs keep defaults)."""
    docs, hints = field_docs(cls), typing.get_type_hints(cls)
    group = parser.add_argument_group(f"{cls.__name__} (defaults are the shipped recipe)")
    for field in dataclasses.fields(cls):
        kind = hints[field.name]
        if dataclasses.is_dataclass(kind):
            continue
        default = field.default if field.default is not dataclasses.MISSING else field.default_factory()
        if kind is bool:
            options = dict(action=argparse.BooleanOptionalAction)
        elif typing.get_origin(kind) is tuple:
            options = dict(type=typing.get_args(kind)[0], nargs=len(typing.get_args(kind)), metavar="X")
        else:
            options = dict(type=kind)
        help_text = docs.get(field.name, "").replace("%", "%%")
        group.add_argument(f"--{field.name.replace('_', '-')}", dest=field.name, default=default,
                           help=f"{help_text} (default: {default})", **options)


def _config_from_args(cls: type, args: argparse.Namespace):
    return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)})


def _tokenizer_train(args: argparse.Namespace) -> None:
    _, metrics = train_tokenizer(_config_from_args(TokenizerTrainConfig, args), args.out, resume=args.resume,
                                 command=args.command_line)
    test = metrics["test"]
    judged = (f", classifier recognises {test['recon_classifier_accuracy']:.2%} of reconstructions"
              if "recon_classifier_accuracy" in test else "")
    print(f"{args.out}: {metrics['steps']} steps in {metrics['wall_time_s']:.0f} s; on {test['images']} test "
          f"digits MSE {test['recon_mse']:.4f} ({test['psnr_db']:.1f} dB), codebook usage "
          f"{test['codebook_usage']:.1%}, perplexity {test['perplexity']:.0f}{judged}")


def _classifier_train(args: argparse.Namespace) -> None:
    _, metrics = train_classifier(_config_from_args(ClassifierTrainConfig, args), args.out,
                                  command=args.command_line)
    print(f"{args.out}: test accuracy {metrics['test_accuracy']:.2%} on {metrics['test_images']} digits, "
          f"{metrics['wall_time_s']:.0f} s")


def _add_training(commands) -> None:
    tokenizer = commands.add_parser("tokenizer", help="VQ tokenizers: train a small one on the embedded MNIST")
    train = tokenizer.add_subparsers(dest="action", required=True).add_parser(
        "train", help="train a VQ tokenizer preset on the embedded MNIST",
        description="Train a VQ tokenizer on the embedded MNIST (L2 + codebook + commitment loss, dead-code "
                    "re-seeding). Writes metrics.jsonl and checkpoints/latest.pt while training, and "
                    "model.safetensors, config.json, metrics.json at the end.")
    train.add_argument("--out", required=True, help="run folder (new, or one to --resume)")
    train.add_argument("--resume", action="store_true",
                       help="continue from OUT/checkpoints/latest.pt (the result equals an uninterrupted run)")
    _add_config_arguments(train, TokenizerTrainConfig)
    train.set_defaults(run=_tokenizer_train)

    classifier = commands.add_parser("classifier", help="the MNIST classifier that judges reconstructions and "
                                                        "gives domain FID features")
    train = classifier.add_subparsers(dest="action", required=True).add_parser(
        "train", help="train the MNIST CNN classifier",
        description="Train the MNIST classifier on the embedded digits; writes model.safetensors, "
                    "config.json and metrics.json (test accuracy, command, machine, wall time).")
    train.add_argument("--out", required=True, help="folder for the weights and metrics.json")
    _add_config_arguments(train, ClassifierTrainConfig)
    train.set_defaults(run=_classifier_train)


def _export(args: argparse.Namespace) -> None:
    from npp.train import TrainingError, export_run

    try:
        folder = export_run(args.run_dir)
    except (TrainingError, FileNotFoundError) as err:
        raise ConfigError(str(err)) from None
    print(f"{args.run_dir} -> {folder}")


# These hand their arguments to their own parsers (npp/train.py, npp/quickstart.py, npp/evaluate.py).
_DELEGATED = {"train": "npp.train", "quickstart": "npp.quickstart", "evaluate": "npp.evaluate"}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="npp", description="Next Patch Prediction workbench")
    commands = parser.add_subparsers(dest="command", required=True)

    convert = commands.add_parser("convert", help="convert a LlamaGen/NPP GPT .pt checkpoint to safetensors")
    convert.add_argument("checkpoint", help="path of the .pt file (state dict under model/module/state_dict, or bare)")
    convert.add_argument("output", help="folder to write model.safetensors and config.json into")
    convert.add_argument("--n-head", type=int, default=None, help="attention heads (default: width // 64)")
    convert.add_argument("--grid", type=int, default=None, help="token grid side (default: 16, i.e. 256 px with VQ-16)")
    convert.set_defaults(run=_convert)
    _add_extract(commands)
    _add_training(commands)
    commands.add_parser("train", add_help=False,
                        help="train a GPT with NTP or an NPP schedule (npp train --help; same as npp/train.py)")
    export = commands.add_parser("export", help="write runs/<name>/export from the run's latest checkpoint")
    export.add_argument("run_dir", help="the run directory, e.g. runs/quickstart-npp")
    export.set_defaults(run=_export)
    commands.add_parser("quickstart", add_help=False, help="the embedded data, an NTP and an NPP run, samples")
    commands.add_parser("evaluate", add_help=False,
                        help="sample a run and measure FID, IS, precision/recall, KID (npp evaluate --help)")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in _DELEGATED:
        import importlib

        return importlib.import_module(_DELEGATED[argv[0]]).main(argv[1:])
    args = build_parser().parse_args(argv)
    args.command_line = shlex.join(["npp", *argv])  # for metrics.json
    try:
        args.run(args)
    except (ConfigError, CheckpointError, DataError) as err:
        print(f"npp {args.command}: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
