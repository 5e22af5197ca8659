"""NTP vs NPP side by side in the browser: both models draw the same class with the same seeds.

    python app/demo.py                                   # the exported runs under runs/
    python app/demo.py --checkpoint c2i_B_256.pt npp_B.pt --tokenizer vq_ds16_c2i.pt
    make app

Binds 127.0.0.1 unless --host says otherwise. The logic lives in app/backend.py; this file is the UI.
"""

from __future__ import annotations

import argparse
import dataclasses
import errno
import json
import os
import random
import socket
import sys
import time
import typing
import urllib.parse
from pathlib import Path
from typing import Any, Callable, Iterator

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
    from app.backend import (MAX_IMAGES, MAX_SEED, Backend, Frame, LoadError, Loaded, Settings, Source,  # noqa: E402
                             advanced_label, checkpoint_problem, default_pair, find_sources, hide_paths,
                             paper_sampler, parse_class, shared_classes, stream, training_plots)
else:  # run as a script: python app/demo.py puts app/ first on the import path
    from backend import (MAX_IMAGES, MAX_SEED, Backend, Frame, LoadError, Loaded, Settings, Source,  # noqa: E402
                         advanced_label, checkpoint_problem, default_pair, find_sources, hide_paths,
                         paper_sampler, parse_class, shared_classes, stream, training_plots)

QUEUE_SIZE = 32
"""Requests waiting beyond this are turned away with a message rather than piling up."""
MAX_WAIT_S = 120
"""A request that waited longer than this for its turn is dropped with a message when its turn comes: served
minutes later, its answer would reach a page its user has long left (or pressed again)."""
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


ARRIVAL = "npp.arrival"
"""The ASGI scope key under which ServerGuard stamps when a request reached the server."""


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


# ------------------------------------------------------------------------------------------------
# In front of Gradio: uploads held within a budget and never answered with a server path; arrival times
# ------------------------------------------------------------------------------------------------

class UploadLedger:
    """The uploads Gradio has stored for us: their bytes stay within `budget`, each is deleted `ttl_s` after it
    came (nothing in this app reads an upload), and those refused are deleted at once."""

    def __init__(self, folder: Path, budget: int, ttl_s: float):
        self.folder, self.budget, self.ttl_s = folder, budget, ttl_s
        self._held: dict[Path, tuple[int, float]] = {}
        """path → (bytes, monotonic time it came)."""

    @property
    def held(self) -> int:
        return sum(size for size, _ in self._held.values())

    def prune(self) -> None:
        """Forget uploads Gradio's cache clean-up removed; delete those past their time."""
        now = time.monotonic()
        for path, (_, came) in list(self._held.items()):
            if not path.exists():
                del self._held[path]
            elif now - came > self.ttl_s:
                self.delete(path)

    def room(self) -> int:
        self.prune()
        return self.budget - self.held

    def admit(self, paths: list[Path]) -> bool:
        """Keep the new files when they fit the budget, else delete them; whether they were kept."""
        new = [p for p in dict.fromkeys(paths) if p not in self._held and self._inside(p) and p.is_file()]
        sizes = [p.stat().st_size for p in new]
        if self.held + sum(sizes) > self.budget:
            for path in new:
                self.delete(path)
            return False
        now = time.monotonic()
        self._held.update({p: (size, now) for p, size in zip(new, sizes)})
        return True

    def delete(self, path: Path) -> None:
        """Remove an upload and its folder (Gradio puts each in a folder named by its hash) when empty."""
        self._held.pop(path, None)
        if not self._inside(path):
            return
        path.unlink(missing_ok=True)
        try:
            path.parent.rmdir()
        except OSError:  # other files still in it
            pass

    def _inside(self, path: Path) -> bool:
        """Only files under Gradio's upload folder are ever deleted, whatever a reply said."""
        return path.resolve().is_relative_to(self.folder.resolve())

    def describe(self) -> str:
        return (f"this app holds at most {self.budget / 2**20:g} MB of uploads ({self.held / 2**20:.1f} MB "
                f"held now) and reads none of them: try again in {self.ttl_s / 60:g} minutes")


FILES_ALIAS = "/app-files"
"""What replies say instead of Gradio's temporary folder: the images a request draws are files there, and
Gradio names each by its absolute path (in "path" and in its /file= URL)."""
TEXT_TYPES = (b"json", b"text/", b"javascript")
"""Content types whose bodies may name the temporary folder (JSON replies, event streams, the page)."""


class ServerGuard:
    """ASGI middleware in front of Gradio's routes.

    Every request gets its arrival time in its scope (the sampling handler drops a request that waited too
    long). An upload must say its length and fit what the UploadLedger has room for; what Gradio stored
    is admitted or deleted, and the reply names each file by its base name only. Every other reply says
    FILES_ALIAS for Gradio's temporary folder, and a /file= request for the alias is served from the real
    folder: the absolute path tells a remote user how the server's disk is laid out (a GRADIO_TEMP_DIR in
    "/home/me/Secret Projects/client-acme/" would name a client).
    """

    def __init__(self, app, uploads: UploadLedger):
        self.app, self.uploads = app, uploads
        folders = {str(uploads.folder), str(uploads.folder.resolve())}
        spellings = {form for folder in folders for form in (folder, urllib.parse.quote(folder, safe="/"))}
        self._real = str(uploads.folder)
        self._spellings = [form.encode() for form in sorted(spellings, key=len, reverse=True)]

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        scope[ARRIVAL] = time.monotonic()
        if scope["method"] == "POST" and scope["path"].rstrip("/").endswith("/gradio_api/upload"):
            return await self._upload(scope, receive, send)
        self._unalias(scope)
        return await self.app(scope, receive, SendWithout(send, self._hide))

    def _unalias(self, scope) -> None:
        """/gradio_api/file=/app-files/… is the file /real/folder/…."""
        head, sep, tail = scope["path"].partition("/file=" + FILES_ALIAS + "/")
        if sep:
            scope["path"] = f"{head}/file={self._real}/{tail}"
            scope["raw_path"] = urllib.parse.quote(scope["path"], safe="/=:").encode()

    def _hide(self, body: bytes) -> bytes:
        for spelling in self._spellings:
            body = body.replace(spelling, FILES_ALIAS.encode())
        return body

    async def _upload(self, scope, receive, send) -> None:
        length = dict(scope["headers"]).get(b"content-length", b"")
        if not length.isdigit():
            return await _plain(send, 411, "upload refused: send its Content-Length")
        if int(length) > self.uploads.room():
            return await _plain(send, 413, f"upload refused: {self.uploads.describe()}")
        start, body = {}, []

        async def capture(message) -> None:
            if message["type"] == "http.response.start":
                start.update(message)
            else:
                body.append(message.get("body", b""))

        await self.app(scope, receive, capture)
        if start.get("status") != 200:
            return await _plain(send, start.get("status", 500), b"".join(body).decode("utf-8", "replace"))
        stored = [Path(p) for p in json.loads(b"".join(body))]
        if not self.uploads.admit(stored):
            return await _plain(send, 413, f"upload refused and deleted: {self.uploads.describe()}")
        return await _json(send, 200, [p.name for p in stored])


class SendWithout:
    """An ASGI `send` that passes text bodies through `hide`: whole (with their Content-Length set again)
    when the length was declared, chunk by chunk when streamed (one event-stream message a chunk)."""

    def __init__(self, send, hide: Callable[[bytes], bytes]):
        self.send, self.hide = send, hide
        self.start: dict | None = None
        self.rewrite, self.held = False, []

    async def __call__(self, message) -> None:
        if message["type"] == "http.response.start":
            headers = dict(message.get("headers", []))
            self.rewrite = any(t in headers.get(b"content-type", b"") for t in TEXT_TYPES) \
                and b"content-encoding" not in headers
            if self.rewrite and b"content-length" in headers:
                self.start = message  # sent with the body, once its new length is known
                return
            return await self.send(message)
        if message["type"] != "http.response.body" or not self.rewrite:
            return await self.send(message)
        if self.start is None:
            return await self.send({**message, "body": self.hide(message.get("body", b""))})
        self.held.append(message.get("body", b""))
        if message.get("more_body", False):
            return
        body = self.hide(b"".join(self.held))
        headers = [(k, v) for k, v in self.start.get("headers", []) if k != b"content-length"]
        await self.send({**self.start, "headers": [*headers, (b"content-length", str(len(body)).encode())]})
        await self.send({"type": "http.response.body", "body": body})


async def _plain(send, status: int, text: str) -> None:
    await _respond(send, status, text.encode(), b"text/plain; charset=utf-8")


async def _json(send, status: int, value: Any) -> None:
    await _respond(send, status, json.dumps(value).encode(), b"application/json")


async def _respond(send, status: int, body: bytes, content_type: bytes) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", content_type), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


if __name__ == "__main__":
    sys.exit(main())
