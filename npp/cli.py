"""The `npp` command. Each sub-command is a thin wrapper over the library.

    npp convert c2i_B_256.pt out/gpt-b       # LlamaGen/NPP .pt -> safetensors + config.json
"""

from __future__ import annotations

import argparse
import sys

from npp.config import ConfigError
from npp.model import GPT
from npp.weights import CheckpointError


def _convert(args: argparse.Namespace) -> None:
    model = GPT.from_llamagen(args.checkpoint, n_head=args.n_head, grid=args.grid)
    model.save_pretrained(args.output)
    c = model.config
    print(f"{args.checkpoint} -> {args.output}: {model.num_params() / 1e6:.1f}M parameters, "
          f"{c.n_layer} layers × {c.n_head} heads × {c.dim}, vocab {c.vocab_size}, "
          f"{c.num_classes} classes, {c.grid}×{c.grid} grid")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="npp", description="Next Patch Prediction workbench")
    commands = parser.add_subparsers(dest="command", required=True)

    convert = commands.add_parser("convert", help="convert a LlamaGen/NPP GPT .pt checkpoint to safetensors")
    convert.add_argument("checkpoint", help="path of the .pt file (state dict under model/module/state_dict, or bare)")
    convert.add_argument("output", help="folder to write model.safetensors and config.json into")
    convert.add_argument("--n-head", type=int, default=None, help="attention heads (default: width // 64)")
    convert.add_argument("--grid", type=int, default=None, help="token grid side (default: 16, i.e. 256 px with VQ-16)")
    convert.set_defaults(run=_convert)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except (ConfigError, CheckpointError) as err:
        print(f"npp {args.command}: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
