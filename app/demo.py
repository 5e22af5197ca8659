"""NTP vs NPP side by side in the browser: both models draw the same class with the same seeds.

    python app/demo.py                                   # the exported runs under runs/
    python app/demo.py --checkpoint c2i_B_256.pt npp_B.pt --tokenizer vq_ds16_c2i.pt
    make app

Binds 127.0.0.1 unless --host says otherwise. The logic lives in app/backend.py; this file is the UI.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import random
import sys
import typing
from pathlib import Path
from typing import Any, Iterator

# Before gradio is imported: it reads this at import time, and the demo has no business phoning home.
os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"

import gradio as gr  # noqa: E402
import torch  # noqa: E402

from npp.config import SamplerConfig  # noqa: E402
from npp.flags import field_docs  # noqa: E402

if __package__:  # imported as app.demo (python -m app.demo)
    from app.backend import (MAX_IMAGES, MAX_SEED, Backend, Frame, LoadError, Loaded, Settings, Source,  # noqa: E402
                             checkpoint_problem, default_pair, find_sources, paper_sampler, parse_class,
                             shared_classes, stream, training_plots)
else:  # run as a script: python app/demo.py puts app/ first on the import path
    from backend import (MAX_IMAGES, MAX_SEED, Backend, Frame, LoadError, Loaded, Settings, Source,  # noqa: E402
                         checkpoint_problem, default_pair, find_sources, paper_sampler, parse_class, shared_classes,
                         stream, training_plots)

QUEUE_SIZE = 32
"""Requests waiting beyond this are turned away with a message rather than piling up."""
INTRO = ("Both panels sample the **same class with the same seeds** (image i uses seed + i) and the same "
         "sampler; NPP changes only training, so both draw one token at a time, in turns, row by row, and two "
         "models of the same size sample at the same speed (shown after each side's first row, which pays "
         "one-time warm-ups).")


def load_sides(backend: Backend, names: list[str | None]) -> tuple[list[Loaded | None], list[str]]:
    """Each side's model, or None with the reason in its message (the other side still works)."""
    loaded, messages = [], []
    for name in names:
        if not name:
            loaded.append(None)
            messages.append("No model chosen.")
            continue
        try:
            side = backend.load(name)
            loaded.append(side)
            messages.append(side.describe())
        except LoadError as err:
            loaded.append(None)
            messages.append(f"⚠️ {err}")
    return loaded, messages


def class_choices(sides: list[Loaded | None], current: Any) -> dict[str, Any]:
    """The class dropdown for the loaded models, keeping the chosen class when it is still offered."""
    present = [s for s in sides if s is not None]
    if not present:
        return gr.update(choices=[], value=None)
    names = shared_classes(present)
    try:
        value = names[parse_class(current, names)]
    except ValueError:
        value = names[0]
    return gr.update(choices=names, value=value)


def make_describe(backend: Backend):
    """The handler run on page load and when a model is chosen: model facts, classes, training curves."""

    def describe(left: str | None, right: str | None, current_class: Any):
        sides, messages = load_sides(backend, [left, right])
        for message in messages:
            if message.startswith("⚠️"):
                gr.Warning(message.removeprefix("⚠️ "))
        loss, fid, note = training_plots({"left": backend.sources.get(left or ""),
                                          "right": backend.sources.get(right or "")})
        return messages[0], messages[1], class_choices(sides, current_class), loss, fid, note

    return describe


def gallery(frame: Frame | None, caption: str) -> list[tuple[Any, str]]:
    return [] if frame is None else [(image, caption) for image in frame.images_BHW3]


def sampler_widgets(sampler: type[SamplerConfig]) -> list[gr.Number]:
    """One number box per field of the sampler class, in field order: labelled by the field's docstring,
    set to the paper's value. A field added to the class gets its box here with no other change."""
    docs, defaults, hints = field_docs(sampler), paper_sampler(sampler), typing.get_type_hints(sampler)
    widgets = []
    for field in dataclasses.fields(sampler):
        if hints[field.name] not in (int, float):
            raise TypeError(f"{sampler.__name__}.{field.name} is {hints[field.name]}: the app draws number "
                            f"boxes, for int and float fields only")
        widgets.append(gr.Number(getattr(defaults, field.name), label=docs.get(field.name, field.name),
                                 precision=0 if hints[field.name] is int else None, elem_id=f"sampler-{field.name}"))
    return widgets


def make_generate(backend: Backend, sampler: type[SamplerConfig]):
    """The sampling handler (api_name 'generate'): validates, then streams both galleries row by row.

    Its last inputs are the sampler_widgets of `sampler`, one value per field in field order.
    """
    knobs = [field.name for field in dataclasses.fields(sampler)]

    def generate(left: str | None, right: str | None, class_value: Any, num_images: float, seed: float,
                 randomize: bool, *knob_values: float) -> Iterator[tuple[Any, ...]]:
        if randomize:
            seed = random.randint(0, MAX_SEED)
        sides, messages = load_sides(backend, [left, right])
        present = [s for s in sides if s is not None]
        if not present:
            raise gr.Error(" ".join(m.removeprefix("⚠️ ") for m in messages))
        for message in messages:
            if message.startswith("⚠️"):
                gr.Warning(message.removeprefix("⚠️ "))
        try:
            names = shared_classes(present)
            settings = Settings(parse_class(class_value, names), num_images, seed,
                                sampler(**dict(zip(knobs, knob_values, strict=True)))).validated()
        except ValueError as err:  # the sampler's own ConfigError included
            raise gr.Error(str(err)) from None
        caption = names[settings.class_index]
        status = (f"Class **{caption}**, {settings.num_images} images per side, seed {settings.seed} "
                  f"(image i uses seed {settings.seed} + i).")
        try:
            for frames in stream(present, settings):
                by_side = iter(frames)
                shown = [None if s is None else next(by_side) for s in sides]
                stats = [message if frame is None else frame.stats(settings) for frame, message in zip(shown, messages)]
                yield gallery(shown[0], caption), gallery(shown[1], caption), stats[0], stats[1], settings.seed, status
        except Exception as err:  # noqa: BLE001 (a readable message in the UI, never a traceback)
            raise gr.Error(f"sampling failed: {type(err).__name__}: {err}") from None

    return generate


def build_demo(backend: Backend, sampler: type[SamplerConfig] = SamplerConfig) -> gr.Blocks:
    """The page: two model panels over shared controls, streaming galleries, and a Training tab.

    The "Advanced" boxes are the fields of `sampler` (a SamplerConfig subclass adds its own)."""
    # Choosing the pair loads it, which makes the first page ready at once (and its classes known).
    left_default, right_default = default_pair(list(backend.sources.values()), backend.loads)
    default_sides, _ = load_sides(backend, [left_default, right_default])
    first_classes = class_choices(default_sides, None)
    with gr.Blocks(title="NTP vs NPP", delete_cache=(3600, 3600)) as demo:
        gr.Markdown(f"# Next-token vs next-patch prediction\n{INTRO}")
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
            with gr.Accordion("Advanced (the paper's defaults)", open=False):
                with gr.Row():
                    knobs = sampler_widgets(sampler)
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
        describe = dict(fn=make_describe(backend), inputs=[left, right, class_box],
                        outputs=[left_info, right_info, class_box, loss_plot, fid_plot, training_note],
                        concurrency_id="models")
        demo.load(**describe, api_name="describe")
        left.change(**describe, api_visibility="private")
        right.change(**describe, api_visibility="private")
        button.click(make_generate(backend, sampler),
                     inputs=[left, right, class_box, num_images, seed, randomize, *knobs],
                     outputs=[left_gallery, right_gallery, left_stats, right_stats, seed, status],
                     api_name="generate", concurrency_id="models")
    return demo


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", default="runs", help="folder of run directories; those with export/ are offered")
    parser.add_argument("--checkpoint", nargs="+", action="extend", default=[], metavar="PATH",
                        help="LlamaGen/NPP .pt checkpoints to offer as well (needs --tokenizer)")
    parser.add_argument("--tokenizer", help="tokenizer folder or LlamaGen VQ .pt for the checkpoints")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                        help="where the models run (auto: cuda when available)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0 exposes the app to the network)")
    parser.add_argument("--port", type=int, default=7860)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
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
    sources = find_sources(args.runs, args.checkpoint)
    if not sources:
        print(f"app/demo.py: error: no exported runs under {args.runs} and no --checkpoint: train the quickstart "
              f"pair (make quickstart) or pass --checkpoint PATH --tokenizer PATH", file=sys.stderr)
        return 2
    warn_unloadable(sources)
    backend = Backend(sources, tokenizer=args.tokenizer, device=args.device)
    print(f"models on {backend.device}: {', '.join(backend.names)}", flush=True)
    demo = build_demo(backend)
    demo.queue(max_size=QUEUE_SIZE, default_concurrency_limit=1)
    # The page asks for no file, yet Gradio serves its upload route anyway: without a limit, anyone who
    # reaches the app could fill the server's disk through it.
    demo.launch(server_name=args.host, server_port=args.port, show_error=False, max_file_size="1mb")
    return 0


def warn_unloadable(sources: list[Source]) -> None:
    """One line per --checkpoint that cannot be read: the operator hears at start-up, not from a user."""
    for source in sources:
        if source.kind == "checkpoint" and (problem := checkpoint_problem(source.path)):
            print(f"app/demo.py: warning: {source.name} cannot be loaded: {problem}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    sys.exit(main())
