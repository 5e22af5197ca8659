"""Loading what the app samples: the few models kept loaded, what their panels say, and messages that
name the model and never the server's paths.

The app only reads run directories (npp.runs) and checkpoints, each loaded as an npp.Pipeline;
nothing here imports gradio, so the tests drive it in-process and the UI in app/demo.py stays a thin
layer of widgets (sources.py finds the models, turns.py samples two of them in turns).

    backend = Backend(find_sources("runs"), device="auto")
    left, right = backend.load("quickstart-ntp"), backend.load("quickstart-npp")
"""

from __future__ import annotations

import re
import sys
import threading
import traceback
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from npp.config import SamplerConfig
from npp.errors import CheckpointError, ConfigError, DataError
from npp.protocol import Protocol, default_sampler, pipeline_protocol
from npp.pipeline import Pipeline
from npp.weights import FOREIGN_CHECKPOINT_CLASSES, safe_load

if __package__:  # imported as app.backend
    from app.sources import Source, run_rows
else:  # python app/demo.py: app/ is first on the import path
    from sources import Source, run_rows

DIGITS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


class LoadError(Exception):
    """A model that cannot be loaded; the message is meant for the person using the app."""


def checkpoint_problem(path: Path) -> str | None:
    """Why a .pt file cannot be read as a checkpoint, or None. Cheap even for a large one: a weights-only
    load that memory-maps the zip format reads little more than the index."""
    try:
        safe_load(path, allow=FOREIGN_CHECKPOINT_CLASSES)  # LlamaGen's files hold their training arguments
    except Exception as err:  # noqa: BLE001 (a junk pickle can fail in ways safe_load does not translate)
        return _reason(err)
    return None


def imagenet_classes() -> list[str] | None:
    """ImageNet-1k class names from torchvision's weight metadata (no download), or None."""
    try:
        from torchvision.models import ResNet50_Weights
    except ImportError:
        return None
    return list(ResNet50_Weights.IMAGENET1K_V1.meta["categories"])


def class_names(num_classes: int, mnist: bool) -> tuple[list[str], bool]:
    """Names for the class dropdown, and whether they are real names rather than 'class k'."""
    if mnist and num_classes == len(DIGITS):
        return [f"{d} – {name}" for d, name in enumerate(DIGITS)], True
    if num_classes == 1000 and (names := imagenet_classes()) is not None:
        return [f"{i} – {name}" for i, name in enumerate(names)], True
    return [f"class {i}" for i in range(num_classes)], False


@dataclass
class Loaded:
    """A model ready to sample, with what the app shows about it."""

    source: Source
    pipe: Pipeline
    class_names: list[str]
    named: bool
    """Whether class_names are real names (digits, ImageNet) rather than 'class k'."""
    train_flops: float | None
    """Total training FLOPs from the run's last metrics row; None for .pt checkpoints."""
    protocol: Protocol
    """Its own sampling defaults, those `npp evaluate` uses: LlamaGen's FID CFG for a released LlamaGen GPT, the
    recipe's for a run of ours, else the paper's."""

    @classmethod
    def from_pipeline(cls, source: Source, pipe: Pipeline, train_flops: float | None) -> Loaded:
        names, named = class_names(pipe.model.config.num_classes, pipe.on_embedded_data)
        return cls(source, pipe, names, named, train_flops, pipeline_protocol(pipe))

    def describe(self) -> str:
        """Markdown for the model's panel; for a .pt checkpoint, a second line says what was inferred about its
        architecture and from where (the file's name, never its folders)."""
        c = self.pipe.model.config
        facts = (f"**{self.source.name}** ({self.source.kind}) · {format_count(self.pipe.model.num_params())} "
                 f"parameters · {c.grid}×{c.grid} tokens, {c.vocab_size} codes, {c.num_classes} classes · "
                 f"{self.pipe.image_size}×{self.pipe.image_size} px · training {format_flops(self.train_flops)} · "
                 f"{self.pipe.device}")
        inferred = self.pipe.model.inferred
        return facts if inferred is None else f"{facts}\n\nInferred: {_markdown_literal(inferred)}"

    def sampler_defaults(self, sampler: type[SamplerConfig] = SamplerConfig) -> SamplerConfig:
        """The Advanced boxes' values for this model: its own defaults (see `protocol`)."""
        return default_sampler(self.protocol, sampler)

    def defaults_text(self) -> str:
        """Which default is in force and why, without the server's folders."""
        return f"CFG {self.protocol.cfg_scale:g} from {hide_paths(self.protocol.source)}"


def _markdown_literal(text: str) -> str:
    """`text` shown as written: file names such as c2i_B_384.pt hold markdown's emphasis marks."""
    return "".join(f"\\{ch}" if ch in "\\`*_[]<>#|" else ch for ch in text)


def advanced_label(shown: Loaded | None, other: Loaded | None) -> str:
    """The Advanced panel's title: whose defaults its boxes hold and where they come from; the other side's own
    CFG when it differs (both sides sample with one sampler)."""
    if shown is None:
        return "Advanced (the paper's defaults)"
    label = f"Advanced (defaults of {shown.source.name}: {shown.defaults_text()}"
    if other is not None and other.protocol.cfg_scale != shown.protocol.cfg_scale:
        label += f"; {other.source.name}'s own: {other.defaults_text()}"
    return label + ")"


def format_count(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.3g}{unit}"
    return str(n)


def format_flops(flops: float | None) -> str:
    if flops is None:
        return "FLOPs unknown (.pt checkpoint, no training log)"
    for unit, size in (("EFLOPs", 1e18), ("PFLOPs", 1e15), ("TFLOPs", 1e12), ("GFLOPs", 1e9)):
        if flops >= size:
            return f"{flops / size:.3g} {unit}"
    return f"{flops:.3g} FLOPs"


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


class Backend:
    """The sources the app offers, and the few models loaded from them (most recently used first)."""

    def __init__(self, sources: Sequence[Source], *, tokenizer: str | Path | None = None, device: str = "auto",
                 keep: int = 2):
        self.sources = {s.name: s for s in sources}
        self.tokenizer = tokenizer
        self.device = pick_device(device)
        self.keep = keep
        """Models kept loaded: the two on screen; more would only fill GPU memory with large models."""
        self._cache: OrderedDict[str, Loaded] = OrderedDict()
        self._lock = threading.Lock()
        self._reported: set[str] = set()

    @property
    def names(self) -> list[str]:
        return list(self.sources)

    def load(self, name: str) -> Loaded:
        """The named model, loaded once; any failure becomes a LoadError with a readable message that names
        the model and no path of the server (the full error goes to stderr)."""
        with self._lock:
            if name in self._cache:
                self._cache.move_to_end(name)
                return self._cache[name]
            source = self.sources.get(name)
            if source is None:
                raise LoadError(f"no model named {name!r}: choose one of {', '.join(self.sources) or '(none found)'}")
            while len(self._cache) >= self.keep:  # make room first: three large models may not fit the GPU
                self._cache.popitem(last=False)
            try:
                loaded = self._load(source)
            except Exception as err:  # noqa: BLE001 (any failure is shown as a message, not a traceback)
                # Our own errors name their fix; anything else on a run is most likely a damaged file.
                hint = (f"; if its export is damaged, write it again with `npp export {source.path}`"
                        if source.kind == "run" and not isinstance(err, (ConfigError, CheckpointError)) else "")
                reason = f"{_reason(err)}{hint}"
                self._report(f"could not load {source.name} ({source.path}): {reason}", err)
                raise LoadError(f"could not load {source.name}: {redact(reason, source)}") from None
            self._cache[name] = loaded
            return loaded

    def loads(self, name: str) -> bool:
        """Whether the named model loads (it stays loaded when it does)."""
        try:
            self.load(name)
        except LoadError:
            return False
        return True

    def _report(self, message: str, err: Exception) -> None:
        """The full error on the server's console, once: every request loads both sides again, and a
        broken model must not fill the log."""
        if message in self._reported:
            return
        self._reported.add(message)
        print(f"app: {message}", file=sys.stderr, flush=True)
        if not _ours(err):  # a bug or a damaged file: where it failed is what the operator needs
            traceback.print_exception(err, file=sys.stderr)

    def _load(self, source: Source) -> Loaded:
        if source.kind == "run":
            return self._load_run(source)
        if self.tokenizer is None:
            raise LoadError("a .pt checkpoint needs its tokenizer: start the app with --tokenizer PATH")
        pipe = Pipeline.from_llamagen(source.path, self.tokenizer, device=self.device)
        return Loaded.from_pipeline(source, pipe, None)

    def _load_run(self, source: Source) -> Loaded:
        """A run with the tokenizer its export names; --tokenizer only stands in when that one cannot be
        found (codes extracted on another machine), and its fingerprint must still match."""
        try:
            pipe = Pipeline.from_run(source.path, device=self.device)
        except (ConfigError, CheckpointError):
            if self.tokenizer is None:
                raise
            pipe = Pipeline.from_run(source.path, tokenizer=self.tokenizer, device=self.device)
        try:
            rows = [row for row in run_rows(source.run) if not row.get("eval")]
        except DataError:  # damaged since start-up: the model still samples, its cost is unknown
            rows = []
        return Loaded.from_pipeline(source, pipe, rows[-1].get("flops_seen") if rows else None)


def _reason(err: Exception) -> str:
    """An exception's message in one paragraph, its type when the message alone says too little."""
    text = " ".join(str(err).split())[:400] or type(err).__name__
    return text if _ours(err) else f"{type(err).__name__}: {text}"


def _ours(err: Exception) -> bool:
    """Whether the error's message alone says what is wrong."""
    return isinstance(err, (LoadError, ConfigError, CheckpointError, FileNotFoundError))


_PART = r"[^\s/'\"`()<>\[\]{},;:]+"
_ABSOLUTE_PATH = re.compile(rf"(?<![\w.:/~-])/(?:{_PART}(?: {_PART})*/)*({_PART})")
"""A POSIX absolute path (not a URL, a fraction or a relative path), its last part captured. Its folders
may hold single spaces ("/home/me/Secret Projects/client-acme/x.pt"): a folder ends at a slash, so a
space inside one cannot be the end of the path; the last part ends at the first space."""


def redact(text: str, source: Source) -> str:
    """`text` without the server's paths: the source's own path becomes its name and any other absolute path
    its last part. A remote user learns what is wrong, not how the server's disk is laid out."""
    spellings = {str(source.path), str(source.path.absolute()), str(source.path.resolve())}
    for spelling in sorted(spellings, key=len, reverse=True):  # the longest first: the others are inside it
        text = text.replace(spelling, source.name)
    return hide_paths(text)


def hide_paths(text: str) -> str:
    """`text` with every absolute path cut to its last part (a file's name says what; its folders, where)."""
    return _ABSOLUTE_PATH.sub(r"\1", text)


def shared_classes(sides: Sequence[Loaded]) -> list[str]:
    """The classes every side knows (both sample the same labels), named by a side that has names."""
    n = min(s.pipe.model.config.num_classes for s in sides)
    namer = next((s for s in sides if s.named), sides[0])
    return namer.class_names[:n]


def parse_class(value: Any, names: Sequence[str]) -> int:
    """A class index from a dropdown value: '7 – seven', 'class 7', '7', 7 or the bare name 'seven'."""
    text = str(value).strip()
    head = text.removeprefix("class ").split("–")[0].strip()
    index = int(head) if head.isdigit() else next(
        (i for i, name in enumerate(names) if name.split("–")[-1].strip().lower() == text.lower()), None)
    if index is None or not 0 <= index < len(names):
        raise ValueError(f"class {text!r} is not one of the {len(names)} classes both models know: "
                         f"pick one from the list (0 … {len(names) - 1})")
    return index
