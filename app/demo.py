"""NTP vs NPP side by side in the browser: both models draw the same class with the same seeds.

    python app/demo.py                                   # the exported runs under runs/
    python app/demo.py --checkpoint c2i_B_256.pt npp_B.pt --tokenizer vq_ds16_c2i.pt
    make app

Binds 127.0.0.1 unless --host says otherwise. The logic lives in app/sources.py (what can be sampled),
app/backend.py (loading) and app/turns.py (sampling in turns), the request handlers in app/handlers.py and the
middleware in front of Gradio in app/guard.py; this file lays out the page and is the command line.
"""

from __future__ import annotations

import argparse
import dataclasses
import errno
import os
import socket
import sys
import typing
from pathlib import Path

# Before gradio is imported: it reads this at import time, and the demo has no business phoning home.
os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"

import gradio as gr  # noqa: E402
import torch  # noqa: E402
from gradio.utils import get_upload_folder as gradio_upload_folder  # noqa: E402
from starlette.middleware import Middleware  # noqa: E402

from npp.config import SamplerConfig  # noqa: E402
from npp.flags import field_docs  # noqa: E402
from npp.threads import THREADS_DOC, use_threads  # noqa: E402

if __package__:  # imported as app.demo (python -m app.demo)
    from app.backend import Backend, checkpoint_problem  # noqa: E402
    from app.guard import ServerGuard, UploadLedger  # noqa: E402
    from app.handlers import (MAX_WAIT_S, QUEUE_SIZE, class_choices, load_sides, make_describe,  # noqa: E402
                              make_generate, sampler_defaults)
    from app.sources import Source, default_pair, find_sources  # noqa: E402
    from app.turns import MAX_IMAGES, MAX_SEED  # noqa: E402
else:  # run as a script: python app/demo.py puts app/ first on the import path
    from backend import Backend, checkpoint_problem  # noqa: E402
    from guard import ServerGuard, UploadLedger  # noqa: E402
    from handlers import (MAX_WAIT_S, QUEUE_SIZE, class_choices, load_sides, make_describe,  # noqa: E402
                          make_generate, sampler_defaults)
    from sources import Source, default_pair, find_sources  # noqa: E402
    from turns import MAX_IMAGES, MAX_SEED  # noqa: E402

UPLOAD_BUDGET = 4 * 2**20
"""Bytes of uploads held at once. The page takes no files, yet Gradio serves its upload route: this bounds
what anyone who reaches the app can store on the server's disk."""
UPLOAD_TTL_S = 600
"""An upload older than this is deleted when the next upload comes (nothing in the app reads one; Gradio's
own hourly clean-up removes the rest)."""


def intro(queue_size: int, max_wait_s: float) -> str:
    """The text at the top of the page: what is compared, and how many requests wait how long."""
    return ("Both panels sample the **same class with the same seeds** (image i uses seed + i) and the same "
            "sampler; NPP changes only training, so both draw one token at a time, in turns, row by row, and two "
            "models of the same size sample at the same speed (both models are warmed up before the first timed "
            "row, and the speed leaves out each side's first row). One request samples at a time; at most "
            f"{queue_size} wait (more are told the app is busy), and a request that waited over "
            f"{max_wait_s:g} s is dropped with a message rather than answered late.")


def sampler_widgets(sampler: type[SamplerConfig], defaults: SamplerConfig) -> list[gr.Number]:
    """One number box per field of the sampler class, in field order: labelled by the field's docstring,
    set to `defaults` (the shown model's own). A field added to the class gets its box here with no other
    change."""
    docs, hints = field_docs(sampler), typing.get_type_hints(sampler)
    widgets = []
    for field in dataclasses.fields(sampler):
        if hints[field.name] not in (int, float):
            raise TypeError(f"{sampler.__name__}.{field.name} is {hints[field.name]}: the app draws number "
                            f"boxes, for int and float fields only")
        widgets.append(gr.Number(getattr(defaults, field.name), label=docs.get(field.name, field.name),
                                 precision=0 if hints[field.name] is int else None, elem_id=f"sampler-{field.name}"))
    return widgets


def build_demo(backend: Backend, sampler: type[SamplerConfig] = SamplerConfig, *, queue_size: int = QUEUE_SIZE,
               max_wait_s: float = MAX_WAIT_S) -> gr.Blocks:
    """The page: two model panels over shared controls, streaming galleries, and a Training tab.

    The "Advanced" boxes are the fields of `sampler` (a SamplerConfig subclass adds its own). The queue's
    bounds are the caller's to set (demo.queue); the page states them and the handler keeps the wait one."""
    # Choosing the pair loads it, which makes the first page ready at once (and its classes known).
    left_default, right_default = default_pair(list(backend.sources.values()), backend.loads)
    default_sides, _ = load_sides(backend, [left_default, right_default])
    first_classes = class_choices(default_sides, None)
    advanced_title, defaults = sampler_defaults(default_sides, 0, sampler)
    with gr.Blocks(title="NTP vs NPP", delete_cache=(3600, 3600)) as demo:
        gr.Markdown(f"# Next-token vs next-patch prediction\n{intro(queue_size, max_wait_s)}", elem_id="intro")
        with gr.Row():
            with gr.Column():
                left = gr.Dropdown(backend.names, value=left_default, label="Left: an NTP model", elem_id="left-model")
                left_info = gr.Markdown(elem_id="left-info")
            with gr.Column():
                right = gr.Dropdown(backend.names, value=right_default, label="Right: an NPP model",
                                    elem_id="right-model")
                right_info = gr.Markdown(elem_id="right-info")
        with gr.Tab("Generate"):
            with gr.Row():
                # Custom values are allowed so that one can type "17" or a name; generate() checks the range.
                class_box = gr.Dropdown(first_classes["choices"], value=first_classes["value"],
                                        label="Class (type to search)", filterable=True, allow_custom_value=True,
                                        elem_id="class")
                num_images = gr.Slider(1, MAX_IMAGES, value=4, step=1, label="Images per side", elem_id="num-images")
                seed = gr.Number(0, precision=0, minimum=0, maximum=MAX_SEED, label="Seed", elem_id="seed")
                randomize = gr.Checkbox(False, label="New random seed each time", elem_id="randomize")
            with gr.Accordion(advanced_title, open=False, elem_id="advanced") as advanced:
                with gr.Row():
                    knobs = sampler_widgets(sampler, defaults)
            button = gr.Button("Generate", variant="primary", elem_id="generate")
            status = gr.Markdown(elem_id="status")
            with gr.Row():
                with gr.Column():
                    left_gallery = gr.Gallery(label="Left", format="png", columns=4, elem_id="left-gallery")
                    left_stats = gr.Markdown(elem_id="left-stats")
                with gr.Column():
                    right_gallery = gr.Gallery(label="Right", format="png", columns=4, elem_id="right-gallery")
                    right_stats = gr.Markdown(elem_id="right-stats")
        with gr.Tab("Training"):
            gr.Markdown("Training loss and FID of the two selected runs against training FLOPs; dotted lines "
                        "mark the patch-size switches.")
            loss_plot = gr.Plot(label="Loss vs training FLOPs")
            fid_plot = gr.Plot(label="FID vs training FLOPs")
            training_note = gr.Markdown()

        # Loading and sampling share one concurrency slot: a model is never swapped out mid-sampling,
        # and a large model never loads while another request holds the GPU.
        # A model just chosen brings its own sampling defaults into the Advanced boxes.
        describe = dict(inputs=[left, right, class_box], concurrency_id="models",
                        outputs=[left_info, right_info, class_box, loss_plot, fid_plot, training_note, advanced,
                                 *knobs])
        demo.load(make_describe(backend, sampler, 0), **describe, api_name="describe")
        left.change(make_describe(backend, sampler, 0), **describe, api_visibility="private")
        right.change(make_describe(backend, sampler, 1), **describe, api_visibility="private")
        button.click(make_generate(backend, sampler, max_wait_s, queue_size),
                     inputs=[left, right, class_box, num_images, seed, randomize, *knobs],
                     outputs=[left_gallery, right_gallery, left_stats, right_stats, seed, status],
                     api_name="generate", concurrency_id="models")
    return demo


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", default="runs", help="folder of run directories; those with export/ are offered")
    parser.add_argument("--checkpoint", nargs="+", action="extend", default=[], metavar="PATH",
                        help="LlamaGen/NPP .pt checkpoints to offer as well (needs --tokenizer); each draws at its "
                             "own size, as its stored training arguments or its name say (c2i_XL_384.pt: 384 px)")
    parser.add_argument("--tokenizer", help="tokenizer folder or LlamaGen VQ .pt for the checkpoints")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                        help="where the models run (auto: cuda when available)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0 exposes the app to the network)")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--queue-size", type=int, default=QUEUE_SIZE,
                        help="requests that may wait for their turn; more are told the app is busy")
    parser.add_argument("--max-wait", type=float, default=MAX_WAIT_S, metavar="SECONDS",
                        help="a request that waited longer for its turn is dropped with a message")
    parser.add_argument("--threads", type=int, default=None, metavar="N", help=THREADS_DOC)
    return parser


def port_problem(host: str, port: int) -> str | None:
    """Why the app cannot listen on host:port, or None; checked before the models load, so a second app on
    a taken port says so at once instead of failing in Gradio's launch with a traceback."""
    if not 0 < port < 65536:
        return f"--port {port} is not a port number: use 1 … 65535"
    try:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds: a closing socket is fine
            probe.bind((host, port))
    except OSError as err:
        if err.errno == errno.EADDRINUSE:
            return f"port {port} on {host} is already in use (another app, or this one still running): " \
                   f"choose a free one with --port, e.g. --port {port + 1}"
        return f"cannot listen on {host} port {port} ({err.strerror or err}): check --host and --port"
    return None


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.queue_size < 1 or not args.max_wait > 0:
        print("app/demo.py: error: --queue-size must be ≥ 1 and --max-wait > 0 seconds", file=sys.stderr)
        return 2
    if args.threads is not None and args.threads < 1:
        print(f"app/demo.py: error: --threads {args.threads}: give a whole number of threads ≥ 1 (or leave it out "
              f"for the process's default)", file=sys.stderr)
        return 2
    use_threads(args.threads)
    if problem := port_problem(args.host, args.port):
        print(f"app/demo.py: error: {problem}", file=sys.stderr)
        return 2
    missing = [p for p in [*args.checkpoint, *([args.tokenizer] if args.tokenizer else [])] if not Path(p).exists()]
    if missing:
        print(f"app/demo.py: error: no such file: {', '.join(missing)}", file=sys.stderr)
        return 2
    if args.checkpoint and not args.tokenizer:
        print("app/demo.py: error: --checkpoint needs --tokenizer (the folder or LlamaGen VQ .pt that decodes "
              "its codes)", file=sys.stderr)
        return 2
    if args.device == "cuda" and not torch.cuda.is_available():
        print("app/demo.py: error: --device cuda but torch sees no GPU: use --device cpu (or auto)", file=sys.stderr)
        return 2
    sources = find_sources(args.runs, args.checkpoint, warn=warn)
    if not sources:
        print(f"app/demo.py: error: no exported runs under {args.runs} and no --checkpoint: train the quickstart "
              f"pair (make quickstart) or pass --checkpoint PATH --tokenizer PATH", file=sys.stderr)
        return 2
    warn_unloadable(sources)
    backend = Backend(sources, tokenizer=args.tokenizer, device=args.device)
    print(f"models on {backend.device}: {', '.join(backend.names)}", flush=True)
    demo = build_demo(backend, queue_size=args.queue_size, max_wait_s=args.max_wait)
    demo.queue(max_size=args.queue_size, default_concurrency_limit=1)
    # The page asks for no file, yet Gradio serves its upload route anyway: without a limit, anyone who
    # reaches the app could fill the server's disk through it (1 MB a file here, UPLOAD_BUDGET in all).
    guard = Middleware(ServerGuard, uploads=UploadLedger(Path(gradio_upload_folder()), UPLOAD_BUDGET, UPLOAD_TTL_S))
    try:
        demo.launch(server_name=args.host, server_port=args.port, show_error=False, max_file_size="1mb",
                    app_kwargs={"middleware": [guard]})
    except OSError as err:  # taken between our check and Gradio's bind
        if "Cannot find empty port" not in str(err):
            raise
        print(f"app/demo.py: error: port {args.port} on {args.host} is already in use: choose a free one with "
              f"--port", file=sys.stderr)
        return 2
    return 0


def warn(message: str) -> None:
    print(f"app/demo.py: warning: {message}", file=sys.stderr, flush=True)


def warn_unloadable(sources: list[Source]) -> None:
    """One line per --checkpoint that cannot be read: the operator hears at start-up, not from a user."""
    for source in sources:
        if source.kind == "checkpoint" and (problem := checkpoint_problem(source.path)):
            warn(f"{source.name} cannot be loaded: {problem}")


if __name__ == "__main__":
    sys.exit(main())
