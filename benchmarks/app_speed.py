"""Do two models of the same architecture show the same tokens/s in the app, whichever side samples first?

    python -m benchmarks.app_speed runs/quickstart-ntp runs/quickstart-npp --repeats 6   # from the repository root

NPP changes training only, so an NTP and an NPP model of one architecture and sampler sample at the same
speed; the app must show that. It loads both runs through the app's own Backend and streams requests as
the app does (one row per side and round, in turns), alternating which run is on the left (the side that
samples first and pays the one-time warm-ups), and reports each side's "tokens/s after the first row"
and the whole-sampling rate the app showed before (first row included), with the ratio of the two runs.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch

from app.backend import Backend
from app.sources import Source
from app.turns import Settings, stream
from benchmarks.common import describe_machine, machine_line


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs=2, type=Path, help="two run folders of the same architecture")
    parser.add_argument("--repeats", type=int, default=6, help="requests; the left side alternates")
    parser.add_argument("--images", type=int, default=4)
    args = parser.parse_args()

    sources = [Source(name=run.name, path=run.resolve(), kind="run") for run in args.runs]
    backend = Backend(sources, device="cpu")
    names = [s.name for s in sources]
    steady: dict[str, list[float]] = {n: [] for n in names}
    whole: dict[str, list[float]] = {n: [] for n in names}
    for repeat in range(args.repeats):
        order = names if repeat % 2 == 0 else names[::-1]
        sides = [backend.load(n) for n in order]
        *_, frames = stream(sides, Settings(class_index=repeat % 10, num_images=args.images, seed=repeat))
        for name, frame in zip(order, frames):
            steady[name].append(frame.tokens_per_s)
            whole[name].append(frame.tokens / frame.sampling_s)
        print(f"request {repeat}: " + ", ".join(f"{n} {f.tokens_per_s:,.0f} ({f.tokens / f.sampling_s:,.0f} with the "
                                                   f"first row)" for n, f in zip(order, frames)), flush=True)
    first, second = names
    ratio = [a / b for a, b in zip(steady[first], steady[second])]
    ratio_whole = [a / b for a, b in zip(whole[first], whole[second])]
    print(f"\n{machine_line(describe_machine(torch.device('cpu')))}; {args.repeats} requests of {args.images} images")
    for name in names:
        print(f"{name}: {statistics.median(steady[name]):,.0f} tokens/s after the first row (median; "
              f"{min(steady[name]):,.0f}–{max(steady[name]):,.0f}), {statistics.median(whole[name]):,.0f} "
              f"with it")
    print(f"{first} / {second}: {statistics.median(ratio):.3f} after the first row "
          f"({min(ratio):.3f}–{max(ratio):.3f}), {statistics.median(ratio_whole):.3f} with it "
          f"({min(ratio_whole):.3f}–{max(ratio_whole):.3f})")


if __name__ == "__main__":
    main()
