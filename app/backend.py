"""What the demo does, without the UI: find models, load them, sample two of them in turns, measure.

The app only reads run directories (npp.runs) and checkpoints, each loaded as an npp.Pipeline;
nothing here imports gradio, so the tests drive it in-process and the UI in app/demo.py stays a thin
layer of widgets.

    backend = Backend(find_sources("runs"), device="auto")
    left, right = backend.load("quickstart-ntp"), backend.load("quickstart-npp")
    settings = Settings(class_index=7, num_images=4, seed=0, sampler=PAPER_SAMPLER).validated()
    for frames in stream([left, right], settings):   # one round per token row, the sides in turn
        ...                                          # frames[i].images_BHW3 fills row by row
"""

from __future__ import annotations

import itertools
import json
import math
import re
import resource
import sys
import threading
import time
import traceback
import weakref
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch

from npp.config import PAPER_SAMPLER, SamplerConfig
from npp.errors import CheckpointError, ConfigError, DataError, is_number
from npp.protocol import PAPER_PROTOCOL, Protocol, default_sampler, pipeline_protocol
from npp.model import GPT
from npp.pipeline import Pipeline
from npp.runs import RunDir
from npp.sampling import STEPPED_THREAD, SteppedSampler, sample_generators
from npp.weights import FOREIGN_CHECKPOINT_CLASSES, safe_load

MAX_IMAGES = 16
"""Images per side and request: enough to compare, small enough that one request cannot hog the queue."""
MAX_SEED = 2**31 - 1
"""Seeds stay below 2³¹ so that the browser's numbers hold them exactly."""
WARM_ROWS = 2
"""Token rows each model samples, untimed, before its first timed row at a batch size: the first row pays
the prefill, the second the steady step; together they load every kernel and buffer the timed rows use."""
SAMPLER_THREAD = STEPPED_THREAD
"""Name of the worker threads that sample (Pipeline.stepped), so a test can see that none is left behind."""
DIGITS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


class LoadError(Exception):
    """A model that cannot be loaded; the message is meant for the person using the app."""


# ------------------------------------------------------------------------------------------------
# What can be sampled
# ------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Source:
    """An exported run (runs/<name>, with export/model.safetensors) or a LlamaGen/NPP .pt checkpoint."""

    name: str
    path: Path
    kind: str
    """'run' or 'checkpoint'."""

    @property
    def run(self) -> RunDir | None:
        return RunDir(self.path) if self.kind == "run" else None


def find_sources(runs_dir: str | Path | None, checkpoints: Sequence[str | Path] = (),
                 warn: Callable[[str], None] | None = None) -> list[Source]:
    """Every exported run under runs_dir (sorted by name), then the checkpoints as given.

    Runs without export/ (still training, or tokenizer runs) are not models the app can sample. A run
    whose metrics.jsonl is malformed is left out with one warning line (its curves and the default pair
    read that file, and one bad run must not stop the app); `warn` prints it (stderr by default).
    """
    warn = warn or _warn
    sources = []
    if runs_dir is not None and Path(runs_dir).is_dir():
        for folder in sorted(Path(runs_dir).iterdir()):
            if not RunDir(folder).exported:
                continue
            try:
                run_rows(RunDir(folder))
            except DataError as err:
                warn(f"run {folder.name} skipped: {err}")
                continue
            sources.append(Source(folder.name, folder, "run"))
    for path in dict.fromkeys(map(Path, checkpoints)):
        sources.append(Source(unique_name(path, {s.name for s in sources}), path, "checkpoint"))
    return sources


def _warn(message: str) -> None:
    print(f"app: warning: {message}", file=sys.stderr, flush=True)


ROW_NUMBERS = ("step", "stage", "patch_size", "loss", "lr", "tokens_seen", "flops_seen", "imgs_per_s", "time",
               "fid", "is", "precision", "recall", "kid", "class_accuracy")
"""Fields of a metrics row that must be numbers when present: the app compares and plots them."""
TRAIN_ROW_NEEDS = ("step", "patch_size", "loss", "tokens_seen", "flops_seen")
"""What every training row must have: the curves plot loss against FLOPs and mark each patch-size switch
with its step, FLOPs and tokens."""


def run_rows(run: RunDir) -> list[dict[str, Any]]:
    """The run's metrics rows, each checked for what the app reads from it; a DataError names the first bad
    line and the fix. As in RunDir.read_metrics, a torn last line (a crash mid-write) is ignored; a bad line
    before it is damage, not a crash."""
    if not run.metrics.is_file():
        return []
    try:
        lines = run.metrics.read_bytes().decode("utf-8").splitlines()
    except (UnicodeDecodeError, OSError) as err:
        raise DataError(f"metrics.jsonl cannot be read ({type(err).__name__}): remove or repair it") from None
    rows = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            if number == len(lines):
                break
            raise DataError(f"metrics.jsonl line {number} is not JSON: remove or repair that line") from None
        if (problem := row_problem(row)) is not None:
            raise DataError(f"metrics.jsonl line {number} {problem}: remove or repair that line")
        rows.append(row)
    return rows


def row_problem(row: Any) -> str | None:
    """What is wrong with one metrics row for the app, or None."""
    if not isinstance(row, dict):
        return f"is {type(row).__name__}, not a JSON object"
    wrong = [key for key in ROW_NUMBERS if key in row and not is_number(row[key])]
    if wrong:
        return f"has {wrong[0]}={row[wrong[0]]!r}, not a number"
    missing = [key for key in TRAIN_ROW_NEEDS if key not in row] if not row.get("eval") else []
    if missing:
        return f"(a training row) lacks {', '.join(missing)}"
    if not row.get("eval") or "flops_seen" in row:
        return None
    return "(an evaluation row) lacks flops_seen"


def unique_name(path: Path, taken: set[str]) -> str:
    """The file's name, with as many of its folders as make it unique: users see names, and the folders
    above them are the server's business."""
    parts = path.parts[1:] if path.anchor else path.parts
    for depth in range(1, len(parts) + 1):
        if (name := "/".join(parts[-depth:])) not in taken:
            return name
    return next(name for k in itertools.count(2) if (name := f"{path.name} ({k})") not in taken)


def checkpoint_problem(path: Path) -> str | None:
    """Why a .pt file cannot be read as a checkpoint, or None. Cheap even for a large one: a weights-only
    load that memory-maps the zip format reads little more than the index."""
    try:
        safe_load(path, allow=FOREIGN_CHECKPOINT_CLASSES)  # LlamaGen's files hold their training arguments
    except Exception as err:  # noqa: BLE001 (a junk pickle can fail in ways safe_load does not translate)
        return _reason(err)
    return None


def patch_trained(run: RunDir) -> bool:
    """Whether a run trained on patches at some point (an NPP run), read from its metrics."""
    return any(row.get("patch_size", 1) > 1 for row in run_rows(run) if not row.get("eval"))


def default_pair(sources: Sequence[Source], loads: Callable[[str], bool]) -> tuple[str | None, str | None]:
    """(left, right), each the first candidate that `loads`: the quickstart pair, then NTP-trained runs on
    the left and NPP-trained runs on the right as their metrics tell, then any source (the right one
    different from the left, unless only one loads). When none loads, the first candidate still shows
    why in its panel."""
    names = [s.name for s in sources]
    if not names:
        return None, None
    npp_runs = [s.name for s in sources if s.run is not None and patch_trained(s.run)]
    ntp_runs = [s.name for s in sources if s.run is not None and s.name not in npp_runs]
    left = _first_loading(["quickstart-ntp", *ntp_runs, *names], names, loads)
    others = [name for name in ("quickstart-npp", *npp_runs, *names) if name != left]
    return left, _first_loading([*others, left], names, loads)


def _first_loading(preferred: Sequence[str], offered: Sequence[str], loads: Callable[[str], bool]) -> str:
    """The first name of `preferred` that is offered and loads, else the first offered one."""
    candidates = [name for name in dict.fromkeys(preferred) if name in offered]
    return next((name for name in candidates if loads(name)), candidates[0])


# ------------------------------------------------------------------------------------------------
# Loaded models
# ------------------------------------------------------------------------------------------------

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


# ------------------------------------------------------------------------------------------------
# Sampling settings
# ------------------------------------------------------------------------------------------------

def paper_sampler(cls: type[SamplerConfig] = SamplerConfig) -> SamplerConfig:
    """The sampler of class `cls` when no model says otherwise: the paper's values, and the class's own
    defaults for the fields it adds."""
    return default_sampler(PAPER_PROTOCOL, cls)


@dataclass
class Settings:
    """One request: the same labels, seeds and sampler for both sides.

    The sampler checks its own values when it is built (SamplerConfig raises a ConfigError, a
    ValueError); this class checks the rest.
    """

    class_index: int
    num_images: int = 4
    seed: int = 0
    """Image i is drawn with its own generator seeded seed + i, as npp evaluate does."""
    sampler: SamplerConfig = PAPER_SAMPLER

    def validated(self) -> Settings:
        """Whole numbers in range (browsers send 2.0 for 2); one message lists every fix."""
        problems = []
        for name, low, high in (("num_images", 1, MAX_IMAGES), ("seed", 0, MAX_SEED), ("class_index", 0, None)):
            value = getattr(self, name)
            if not _is_int(value) or value < low or (high is not None and value > high):
                bounds = f"{low} … {high}" if high is not None else f"≥ {low}"
                problems.append(f"{name}={value!r}: use a whole number {bounds}")
            else:
                setattr(self, name, int(value))
        if problems:
            raise ValueError("; ".join(problems))
        return self


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) \
        and float(value).is_integer()


# ------------------------------------------------------------------------------------------------
# Two models in turns
# ------------------------------------------------------------------------------------------------

_WARMED: weakref.WeakKeyDictionary[GPT, set[int]] = weakref.WeakKeyDictionary()
"""The batch sizes each loaded model has sampled since it was loaded: those need no warm-up again (a model
evicted and loaded again is a new object, warmed again)."""


def needs_warm_up(model: GPT, batch: int) -> bool:
    """Whether this model has not yet sampled this batch size in this process (and mark it as done)."""
    done = _WARMED.setdefault(model, set())
    fresh = batch not in done
    done.add(batch)
    return fresh


@dataclass
class Frame:
    """Where one side stands: its images so far and what its turns have cost."""

    side: Loaded
    images_BHW3: np.ndarray
    rows: int = 0
    done: bool = False
    sampling_s: float = 0.0
    """Time in its own sampling turns (the other side's turns excluded)."""
    decoding_s: float = 0.0
    """Time decoding its previews and final images."""
    peak_bytes: int | None = None
    """CUDA max_memory_allocated over its turns (both models resident); None on the CPU."""
    tokens: int = 0
    """Tokens sampled so far, over all its images."""
    first_row_s: float = 0.0
    """Its first turn's sampling time: it pays one-time costs (the KV cache, the first calls of each kernel,
    the thread pool), the more so on the side that samples first."""
    first_row_tokens: int = 0

    @property
    def wall_s(self) -> float:
        return self.sampling_s + self.decoding_s

    @property
    def tokens_per_s(self) -> float:
        """The speed after the first row: two models of the same architecture and sampler sample at the same
        speed (NPP changes training only), whichever side goes first."""
        steady_s = self.sampling_s - self.first_row_s
        if steady_s <= 0:  # one row in all: nothing but the first
            return self.tokens / self.sampling_s if self.sampling_s > 0 else float("inf")
        return (self.tokens - self.first_row_tokens) / steady_s

    def stats(self, settings: Settings) -> str:
        """The line under a gallery: progress while sampling, cost and model facts when done."""
        grid = self.side.pipe.grid
        if not self.done:
            return f"**{self.side.source.name}**: row {self.rows}/{grid} · {self.wall_s:.2f} s so far"
        return (f"**{self.side.source.name}** · {settings.num_images} images · wall time {self.wall_s:.2f} s "
                f"(sampling {self.sampling_s:.2f} s, previews and decoding {self.decoding_s:.2f} s) · "
                f"{self.tokens_per_s:,.0f} tokens/s after the first row · {memory_text(self.peak_bytes)} · "
                f"{format_count(self.side.pipe.model.num_params())} parameters · "
                f"training {format_flops(self.side.train_flops)}")


def memory_text(peak_bytes: int | None) -> str:
    """Peak GPU memory when measured; on the CPU only the process's lifetime RSS peak exists, said as such."""
    if peak_bytes is not None:
        return f"peak GPU memory {peak_bytes / 2**30:.2f} GiB (both models resident)"
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
    return f"peak memory n/a on CPU (whole app's peak RSS {rss / 2**20:,.0f} MiB)"


def stream(sides: Sequence[Loaded], settings: Settings) -> Iterator[list[Frame]]:
    """Sample every side with the same labels and seeds, one token row per side and round, in turns (who
    goes first alternating from round to round).

    Yields the frames after every round, so viewers watch both models draw; the last yield has
    every side done. Closing the iterator (a cancelled request) stops the worker threads. A model's
    first request at a batch size first samples WARM_ROWS rows untimed, every side before any side's
    first timed row: otherwise the side that goes first pays the process's one-time costs (kernels
    loaded, buffers grown) in its timed rows and two equal models show different speeds.
    """
    frames = [Frame(s, np.zeros((settings.num_images, s.pipe.image_size, s.pipe.image_size, 3), dtype=np.uint8))
              for s in sides]
    labels_B = torch.full((settings.num_images,), settings.class_index, dtype=torch.long)
    samplers = []
    try:
        for s in sides:
            generators = sample_generators(range(settings.num_images), settings.seed, s.pipe.device)
            warm = WARM_ROWS if needs_warm_up(s.pipe.model, settings.num_images) else 0
            samplers.append(s.pipe.stepped(labels_B, settings.sampler, generator=generators, warm_rows=warm))
        for sampler in samplers:
            sampler.ready.wait()
        for round_ in itertools.count():
            if all(f.done for f in frames):
                break
            # Who goes first alternates: the work each yield sets off (the previews encoded, the browser
            # fetching them from this process) lands on the round's first turn, so always one side would
            # take it and show the slower speed.
            order = list(zip(frames, samplers))
            for frame, sampler in order if round_ % 2 == 0 else order[::-1]:
                if not frame.done:
                    _turn(frame, sampler)
            yield frames
    finally:
        for sampler in samplers:
            sampler.close()


def _turn(frame: Frame, sampler: SteppedSampler) -> None:
    """One row of one side: sample it, decode the preview, account time and memory to this side."""
    device = frame.side.pipe.device
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    started = time.perf_counter()
    tokens_BT = sampler.advance()  # the copy to the CPU inside waits for the GPU, so the clock is honest
    sampled = time.perf_counter()
    frame.images_BHW3 = frame.side.pipe.decode_rows(tokens_BT)
    frame.sampling_s += sampled - started
    frame.decoding_s += time.perf_counter() - sampled
    if frame.rows == 0:
        frame.first_row_s, frame.first_row_tokens = sampled - started, tokens_BT.numel()
    frame.rows = tokens_BT.shape[1] // frame.side.pipe.grid
    frame.tokens, frame.done = tokens_BT.numel(), sampler.done
    if cuda:
        frame.peak_bytes = max(frame.peak_bytes or 0, torch.cuda.max_memory_allocated(device))


# ------------------------------------------------------------------------------------------------
# Training curves
# ------------------------------------------------------------------------------------------------

def training_plots(sides: dict[str, Source | None]) -> tuple[Any, Any, str]:
    """(loss vs FLOPs, FID vs FLOPs, note) for the selected runs; .pt checkpoints have no curves."""
    from npp.viz import eval_figure, training_figure

    runs, notes = {}, [f"{s.name} is a .pt checkpoint: no training log." for s in sides.values()
                       if s is not None and s.run is None]
    for panel, s in sides.items():
        if s is None or s.run is None:
            continue
        try:
            runs[f"{s.name} ({panel})"] = run_rows(s.run)
        except DataError as err:  # damaged since start-up: say so instead of drawing half a curve
            notes.append(f"{s.name}: no curves, its {err}.")
    if runs and not any(row.get("eval") for rows in runs.values() for row in rows):
        notes.append("No evaluation rows yet: train with `--eval_every K` to get FID curves.")
    return training_figure(runs, "loss", x="flops"), eval_figure(runs, "fid", x="flops"), " ".join(notes)
