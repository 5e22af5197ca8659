"""What the page does when asked: describe the chosen models (facts, classes, curves, their sampling defaults)
and generate (validate, then stream both galleries row by row). app/demo.py lays out the page and wires
these to its widgets; it imports gradio first, after setting gradio's environment.
"""

from __future__ import annotations

import dataclasses
import random
import time
from typing import Any, Iterator

import gradio as gr

from npp.config import SamplerConfig

if __package__:  # imported as app.handlers
    from app.backend import Backend, LoadError, Loaded, advanced_label, hide_paths, parse_class, shared_classes
    from app.guard import ARRIVAL
    from app.sources import training_plots
    from app.turns import MAX_SEED, Frame, Settings, paper_sampler, stream
else:  # python app/demo.py: app/ is first on the import path
    from backend import Backend, LoadError, Loaded, advanced_label, hide_paths, parse_class, shared_classes
    from guard import ARRIVAL
    from sources import training_plots
    from turns import MAX_SEED, Frame, Settings, paper_sampler, stream

QUEUE_SIZE = 32
"""Requests waiting beyond this are turned away with a message rather than piling up."""
MAX_WAIT_S = 120
"""A request that waited longer than this for its turn is dropped with a message when its turn comes: served
minutes later, its answer would reach a page its user has long left (or pressed again)."""


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


def make_describe(backend: Backend, sampler: type[SamplerConfig], chosen: int = 0):
    """The handler run on page load and when a model is chosen: model facts, classes, training curves, and the
    Advanced boxes set to the defaults of side `chosen` (0 left, 1 right: the model just chosen; the other
    side's when that one does not load), the panel's title saying whose they are."""

    def describe(left: str | None, right: str | None, current_class: Any):
        sides, messages = load_sides(backend, [left, right])
        for message in messages:
            if message.startswith("⚠️"):
                gr.Warning(message.removeprefix("⚠️ "))
        loss, fid, note = training_plots({"left": backend.sources.get(left or ""),
                                          "right": backend.sources.get(right or "")})
        label, defaults = sampler_defaults(sides, chosen, sampler)
        knobs = [gr.update(value=getattr(defaults, field.name)) for field in dataclasses.fields(sampler)]
        return (messages[0], messages[1], class_choices(sides, current_class), loss, fid, note,
                gr.update(label=label), *knobs)

    return describe


def sampler_defaults(sides: list[Loaded | None], chosen: int, sampler: type[SamplerConfig]
                     ) -> tuple[str, SamplerConfig]:
    """The Advanced panel's title and its boxes' values: the own defaults of side `chosen` (the other side's
    when that one did not load; the paper's when neither did)."""
    shown, other = sides[chosen], sides[1 - chosen]
    if shown is None:
        shown, other = other, None
    return advanced_label(shown, other), paper_sampler(sampler) if shown is None else shown.sampler_defaults(sampler)


def gallery(frame: Frame | None, caption: str) -> list[tuple[Any, str]]:
    return [] if frame is None else [(image, caption) for image in frame.images_BHW3]


def waited_s() -> float | None:
    """Seconds since the running event's request joined the queue; None outside a served request (a direct
    call in a test). Gradio hands the handler the queue/join request; ServerGuard stamped its arrival."""
    from gradio.context import LocalContext

    request = LocalContext.request.get(None)
    scope = getattr(getattr(request, "request", None), "scope", None) or {}
    return time.monotonic() - scope[ARRIVAL] if ARRIVAL in scope else None


def check_wait(max_wait_s: float, queue_size: int) -> None:
    """Drop a request that waited too long for its turn, saying why and what to do."""
    waited = waited_s()
    if waited is not None and waited > max_wait_s:
        raise gr.Error(f"dropped: this request waited {waited:.0f} s for its turn, longer than the {max_wait_s:g} s "
                       f"this app lets one wait (one request samples at a time, at most {queue_size} wait): "
                       f"press Generate again")


def make_generate(backend: Backend, sampler: type[SamplerConfig], max_wait_s: float = MAX_WAIT_S,
                  queue_size: int = QUEUE_SIZE):
    """The sampling handler (api_name 'generate'): validates, then streams both galleries row by row.

    Its last inputs are the sampler_widgets of `sampler`, one value per field in field order.
    """
    knobs = [field.name for field in dataclasses.fields(sampler)]

    def generate(left: str | None, right: str | None, class_value: Any, num_images: float, seed: float,
                 randomize: bool, *knob_values: float) -> Iterator[tuple[Any, ...]]:
        check_wait(max_wait_s, queue_size)
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
            raise gr.Error(f"sampling failed: {type(err).__name__}: {hide_paths(str(err))}") from None

    return generate
