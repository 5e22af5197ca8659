"""Two models sampled in turns, one token row per side and round, with what each side's turns cost.

    settings = Settings(class_index=7, num_images=4, seed=0, sampler=PAPER_SAMPLER).validated()
    for frames in stream([left, right], settings):   # left, right: backend.load(...)
        ...                                          # frames[i].images_BHW3 fills row by row
"""

from __future__ import annotations

import itertools
import math
import resource
import sys
import time
import weakref
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import numpy as np
import torch

from npp.config import PAPER_SAMPLER, SamplerConfig
from npp.protocol import PAPER_PROTOCOL, default_sampler
from npp.model import GPT
from npp.sampling import STEPPED_THREAD, SteppedSampler, sample_generators

if __package__:  # imported as app.turns
    from app.backend import Loaded, format_count, format_flops
else:  # python app/demo.py: app/ is first on the import path
    from backend import Loaded, format_count, format_flops

MAX_IMAGES = 16
"""Images per side and request: enough to compare, small enough that one request cannot hog the queue."""
MAX_SEED = 2**31 - 1
"""Seeds stay below 2³¹ so that the browser's numbers hold them exactly."""
WARM_ROWS = 2
"""Token rows each model samples, untimed, before its first timed row at a batch size: the first row pays
the prefill, the second the steady step; together they load every kernel and buffer the timed rows use."""
SAMPLER_THREAD = STEPPED_THREAD
"""Name of the worker threads that sample (Pipeline.stepped), so a test can see that none is left behind."""


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
