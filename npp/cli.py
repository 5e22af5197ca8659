"""The `npp` command. Each sub-command is a thin wrapper over the library.

    npp convert c2i_B_256.pt out/gpt-b       # LlamaGen/NPP .pt -> safetensors + config.json
    npp extract imagenet/train codes/in256 --tokenizer vq_ds16_c2i.pt   # images -> VQ codes
    npp tokenizer train --preset mnist-8x8 --out runs/vq-8x8             # a small VQ tokenizer on MNIST
    npp classifier train --out runs/mnist-classifier                     # the MNIST judge / FID features
    npp train --name npp-tiny --model tiny --schedule.levels 2           # NTP or NPP training (npp/train.py)
    npp export runs/npp-tiny                                             # safetensors from the latest checkpoint
    npp quickstart                                                       # the embedded data, an NTP and an NPP run
    npp evaluate runs/npp-tiny --num-samples 10000                       # FID, IS, precision/recall, KID

A sub-command's parser (and what it imports) is built only when that sub-command runs, so `npp convert`
works with the core install and a command whose extra is missing says which one to install.
"""

from __future__ import annotations

import argparse
import importlib
import shlex
import sys
from typing import Callable

from npp.errors import check_device
from npp.flags import Parser, add_flags, fail, given, run_command

# VQConfig fields a LlamaGen .pt needs to be described by (our folders carry their config.json).
VQ_ARCHITECTURE = ("base_channels", "ch_mult", "num_res_blocks", "z_channels", "codebook_size", "codebook_dim")


# ------------------------------------------------------------------------------------------------
# The sub-commands defined here (train, evaluate and quickstart have their modules' own main)
# ------------------------------------------------------------------------------------------------

def convert(argv: list[str]) -> int:
    parser = Parser(prog="npp convert", description="Convert a LlamaGen/NPP GPT .pt checkpoint to our format "
                                                    "(model.safetensors + config.json).")
    parser.add_argument("checkpoint", help="path of the .pt file (state dict under model/module/state_dict, or bare)")
    parser.add_argument("output", help="folder to write model.safetensors and config.json into")
    parser.add_argument("--n-head", type=int, default=None,
                        help="attention heads (default: LlamaGen's preset for the file's layers and width; asked "
                             "for when none matches)")
    parser.add_argument("--grid", type=int, default=None,
                        help="token grid side (default: image_size // downsample_size from the file's stored "
                             "training args, else its name's _256/_384/_512 ÷ 16; asked for when neither says)")
    parser.add_argument("--image-size", type=int, default=None,
                        help="image size in pixels, instead of --grid (grid = image size ÷ the downsampling, 16 "
                             "for LlamaGen's VQ-16)")
    args = parser.parse_args(argv)
    if args.grid is not None and args.image_size is not None:
        parser.error("give --grid or --image-size, not both")

    def body() -> None:
        from npp.model import GPT

        model = GPT.from_llamagen(args.checkpoint, n_head=args.n_head, grid=args.grid, image_size=args.image_size)
        print(model.inferred, flush=True)
        model.save_pretrained(args.output, inferred=model.inferred)
        c = model.config
        print(f"{args.checkpoint} -> {args.output}: {model.num_params() / 1e6:.1f}M parameters, "
              f"{c.n_layer} layers × {c.n_head} heads × {c.dim}, vocab {c.vocab_size}, "
              f"{c.num_classes} classes, {c.grid}×{c.grid} grid")

    return run_command("npp convert", body)


def extract(argv: list[str]) -> int:
    import torch

    from npp.config import VQ_PRESETS, VQConfig
    from npp.crops import CROP_MODES, CropConfig
    from npp.data import MNIST_SIZE, MnistSource
    from npp.distributed import is_rank0
    from npp.extract import extract_codes, open_source
    from npp.tokenizer import load_tokenizer

    parser = Parser(prog="npp extract", description=(
        "Encode every crop variant of every image into VQ codes: codes.npy (N, crops, h·w), labels.npy (-1 marks "
        "an unreadable image), manifest.json. Rerun the same command to resume; under torchrun/deepspeed every "
        "rank takes its share."))
    parser.add_argument("source", help="an ImageFolder root (<root>/<class>/<image>), or mnist, mnist:train, "
                                       "mnist:test for the embedded digits")
    parser.add_argument("output", help="folder for codes.npy, labels.npy, manifest.json (new, empty, or "
                                       "an interrupted extraction to resume)")
    parser.add_argument("--tokenizer", required=True, help="folder written by VQModel.save_pretrained, or a LlamaGen VQ .pt")
    crops = parser.add_argument_group("crops")
    crops.add_argument("--crop", choices=CROP_MODES, default=None,
                       help="crop variants per image (default: ten-crop for folders, none for mnist)")
    crops.add_argument("--crop-ranges", type=float, nargs="+", metavar="R", default=None,
                       help="ten-crop: centre-crop to size·R first, for each R (default: 1.1 1.05)")
    crops.add_argument("--image-size", type=int, default=None,
                       help="side of every crop in pixels (default: the tokenizer's image_size; 32 for mnist)")
    run = parser.add_argument_group("run")
    run.add_argument("--batch-size", type=int, default=8, help="images per batch; a batch encodes batch-size × crops views")
    run.add_argument("--device", default=None, help="torch device, or auto (default: cuda if available, else cpu); under a "
                                                    "launcher 'cuda' means cuda:LOCAL_RANK")
    run.add_argument("--workers", type=int, default=2, help="DataLoader processes that decode and crop images "
                                                            "(0: the main process)")
    run.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--vq-preset", choices=list(VQ_PRESETS), default=None,
                        help="architecture of a LlamaGen .pt (default: llamagen-vq16); the flags below override it")
    not_architecture = [f for f in VQConfig.__dataclass_fields__ if f not in VQ_ARCHITECTURE]
    add_flags(parser, VQConfig, exclude=not_architecture)
    args = parser.parse_args(argv)

    def body() -> None:
        if args.device not in (None, "auto"):
            check_device(args.device)  # before the tokenizer is read onto it
        vq = load_tokenizer(args.tokenizer, preset=args.vq_preset, **given(args, VQConfig, exclude=not_architecture))
        source = open_source(args.source)
        digits = isinstance(source, MnistSource)
        # The digits are already 32×32: by default they are encoded as they are, one variant each.
        mode = args.crop or ("none" if digits else "ten-crop")
        size = args.image_size or (MNIST_SIZE if digits and mode == "none" else vq.config.image_size)
        crops = CropConfig(mode, size=size, ranges=tuple(args.crop_ranges) if args.crop_ranges else None)
        auto = args.device in (None, "auto")
        device = ("cuda" if torch.cuda.is_available() else "cpu") if auto else args.device
        report = extract_codes(source, vq, args.output, crops, batch_size=args.batch_size, device=device,
                               num_workers=args.workers, progress=not args.no_progress, tokenizer_path=args.tokenizer)
        if is_rank0():  # one summary, not one per rank
            print(report.summary())

    return run_command("npp extract", body)


def tokenizer(argv: list[str]) -> int:
    from npp.tokenizer_train import TokenizerTrainConfig, train_tokenizer

    parser = _train_parser("npp tokenizer train", TokenizerTrainConfig, (
        "Train a VQ tokenizer on the embedded MNIST (L2 + codebook + commitment loss, dead-code re-seeding). Writes "
        "metrics.jsonl and checkpoints/latest.pt while training, and model.safetensors, config.json, metrics.json "
        "at the end."))
    parser.add_argument("--resume", action="store_true",
                        help="continue from OUT/checkpoints/latest.pt (the result equals an uninterrupted run)")
    args = parser.parse_args(argv[1:] if argv[:1] == ["train"] else ["--help"])

    def body() -> None:
        config = TokenizerTrainConfig(**given(args, TokenizerTrainConfig))
        check_device(config.device, auto=False)  # the config's default when --device is not given
        _, metrics = train_tokenizer(config, args.out,
                                     resume=args.resume, command=shlex.join(["npp", "tokenizer", *argv]))
        test = metrics["test"]
        judged = (f", classifier recognises {test['recon_classifier_accuracy']:.2%} of reconstructions"
                  if "recon_classifier_accuracy" in test else "")
        print(f"{args.out}: {metrics['steps']} steps in {metrics['wall_time_s']:.0f} s; on {test['images']} test "
              f"digits MSE {test['recon_mse']:.4f} ({test['psnr_db']:.1f} dB), codebook usage "
              f"{test['codebook_usage']:.1%}, perplexity {test['perplexity']:.0f}{judged}")

    return run_command("npp tokenizer train", body)


def classifier(argv: list[str]) -> int:
    from npp.classifier import ClassifierTrainConfig, train_classifier

    parser = _train_parser("npp classifier train", ClassifierTrainConfig, (
        "Train the MNIST classifier on the embedded digits; writes model.safetensors, config.json and metrics.json "
        "(test accuracy, command, machine, wall time)."))
    args = parser.parse_args(argv[1:] if argv[:1] == ["train"] else ["--help"])

    def body() -> None:
        config = ClassifierTrainConfig(**given(args, ClassifierTrainConfig))
        check_device(config.device, auto=False)  # the config's default when --device is not given
        _, metrics = train_classifier(config, args.out,
                                      command=shlex.join(["npp", "classifier", *argv]))
        print(f"{args.out}: test accuracy {metrics['test_accuracy']:.2%} on {metrics['test_images']} digits, "
              f"{metrics['wall_time_s']:.0f} s")

    return run_command("npp classifier train", body)


def _train_parser(prog: str, config: type, description: str) -> Parser:
    parser = Parser(prog=prog, description=description)
    parser.add_argument("--out", required=True, help="run folder (new, or one to --resume)")
    add_flags(parser, config)
    return parser


def export(argv: list[str]) -> int:
    parser = Parser(prog="npp export", description="Write runs/<name>/export (model.safetensors, config.json, "
                                                   "tokenizer.json) from the run's latest checkpoint.")
    parser.add_argument("run_dir", help="the run directory, e.g. runs/quickstart-npp")
    args = parser.parse_args(argv)

    def body() -> None:
        from npp.checkpoints import export_run

        print(f"{args.run_dir} -> {export_run(args.run_dir)}")

    return run_command("npp export", body)


def _module_main(module: str) -> Callable[[list[str]], int]:
    return lambda argv: importlib.import_module(module).main(argv)


# name -> (what it does, the extra it needs, its entry point)
COMMANDS: dict[str, tuple[str, str, Callable[[list[str]], int]]] = {
    "convert": ("convert a LlamaGen/NPP GPT .pt checkpoint to safetensors", "", convert),
    "extract": ("encode a data set's images into VQ codes (memory-mapped, resumable)", "train", extract),
    "tokenizer": ("train a small VQ tokenizer on the embedded MNIST (npp tokenizer train)", "train", tokenizer),
    "classifier": ("train the MNIST classifier that judges samples (npp classifier train)", "train", classifier),
    "train": ("train a GPT with NTP or an NPP schedule (same as npp/train.py)", "train", _module_main("npp.train")),
    "export": ("write runs/<name>/export from the run's latest checkpoint", "train", export),
    "evaluate": ("sample a run and measure FID, IS, precision/recall, KID", "eval", _module_main("npp.evaluate")),
    "quickstart": ("the embedded data, an NTP and an NPP run, samples", "train,eval", _module_main("npp.quickstart")),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: npp COMMAND [options]   (npp COMMAND --help for its options)", "",
             "Next Patch Prediction workbench. Commands:"]
    lines += [f"  {name:<{width}}  {what}" for name, (what, _, _) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        return fail("npp", argparse.ArgumentError(None, f"unknown command {name!r}: choose one of {', '.join(COMMANDS)}"))
    _, extra, entry = COMMANDS[name]
    try:
        return entry(rest)
    except ModuleNotFoundError as err:  # a dependency of an extra that is not installed
        missing = (err.name or "").split(".")[0]
        if missing in ("", "npp"):
            raise
        return fail(f"npp {name}", ImportError(f"needs {missing}, which is not installed: "
                                                f"pip install \"npp[{extra or 'all'}]\""))


if __name__ == "__main__":
    sys.exit(main())
