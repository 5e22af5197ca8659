"""Which thread count should a CPU run use? The quickstart's training speed at each thread count, alone and
beside one busy process.

    python benchmarks/threads.py                       # 1 and 2 threads, alone and beside one busy process
    python benchmarks/threads.py --threads 1 2 4 --steps 200 --out /tmp/threads.json

A thread count is good when it is fast alone *and* degrades gracefully when something else runs: a machine
that trains two runs at once, or a test suite beside a run, is the normal case on a laptop. Each case trains
the quickstart's recipe (tiny GPT, 8×8 tokens of the embedded MNIST, batch 32) for --steps steps in a
training process of its own (`npp.runs.launch`, as every run is started) with OMP_NUM_THREADS set, and reads
the speed from its metrics.jsonl: the median images/s of the rows after the first --skip steps (start-up and
warm-up excluded). "Beside a busy process" starts, for the whole run, one process that keeps one core busy
with single-thread matrix products (what another one-thread training does to the cores).

The rule applied to choose a default (issue 24): alone within 10% of the fastest setting, and at least half
its own alone speed beside the busy process; among those, the fastest beside the busy process. The table,
the rule's verdict per setting and the machine go to --out (JSON) and stdout (markdown, for
docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from npp.quickstart import quickstart_config
from npp.runs import RunDir, launch

from common import command_line, describe_machine, machine_line, markdown_table

BUSY = ("import torch\ntorch.set_num_threads(1)\na = torch.randn(256, 256)\n"
        "while True:\n    a = (a @ a).tanh()\n")
"""One core kept busy the way a one-thread training keeps it: small single-thread matrix products."""


def speed(runs_dir: Path, threads: int, steps: int, skip: int, busy: bool) -> float:
    """Median images/s of the quickstart recipe trained `steps` steps with `threads` threads."""
    config = quickstart_config("quickstart-ntp", str(runs_dir))
    name = f"threads{threads}-{'busy' if busy else 'alone'}"
    config = dataclasses.replace(config, name=name, log_every=10, eval_every=0, progress=False,
                                 schedule=dataclasses.replace(config.schedule, total_steps=steps))
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "DS_ACCELERATOR": "cpu"}
    competitor = subprocess.Popen([sys.executable, "-c", BUSY]) if busy else None
    try:
        with open(runs_dir / f"{name}.log", "w") as log:
            code = launch(config, echo=log.write, env=env)
    finally:
        if competitor is not None:
            competitor.kill()
            competitor.wait()
    if code != 0:
        raise SystemExit(f"training with {threads} thread(s) failed: see {runs_dir / (name + '.log')}")
    rows = [r["imgs_per_s"] for r in RunDir(runs_dir / name).train_rows() if r["step"] > skip]
    return statistics.median(rows)


def choose(table: dict[int, dict[str, float]]) -> dict[int, dict[str, object]]:
    """Each setting against the rule: alone within 10% of the fastest, and beside a busy process at least
    half its own alone speed."""
    fastest = max(row["alone"] for row in table.values())
    verdicts = {}
    for threads, row in table.items():
        near = row["alone"] >= 0.9 * fastest
        robust = row["busy"] >= 0.5 * row["alone"]
        verdicts[threads] = {"within_10pct_alone": near, "half_speed_when_busy": robust, "passes": near and robust}
    return verdicts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--steps", type=int, default=200, help="training steps per case")
    parser.add_argument("--skip", type=int, default=40, help="steps left out of the median (start-up, warm-up)")
    parser.add_argument("--out", type=Path, help="JSON record of the table")
    args = parser.parse_args()
    if args.skip >= args.steps:
        parser.error(f"--skip {args.skip} leaves no step of --steps {args.steps} to time: skip fewer")
    with tempfile.TemporaryDirectory(prefix="npp-threads-") as tmp:
        table = {t: {"alone": speed(Path(tmp), t, args.steps, args.skip, busy=False),
                     "busy": speed(Path(tmp), t, args.steps, args.skip, busy=True)} for t in args.threads}
    verdicts = choose(table)
    passing = [t for t in table if verdicts[t]["passes"]]
    chosen = max(passing, key=lambda t: table[t]["busy"]) if passing else None
    machine = describe_machine(torch.device("cpu"))
    rows = [[str(t), f"{table[t]['alone']:.0f}", f"{table[t]['busy']:.0f}",
             f"{table[t]['busy'] / table[t]['alone']:.2f}", "yes" if verdicts[t]["passes"] else "no"] for t in table]
    print(f"`{command_line()}` — {machine_line(machine)}\n")
    print(markdown_table(["threads", "imgs/s alone", "imgs/s beside one busy process", "busy / alone",
                          "meets the rule"], rows))
    print(f"\nchosen: {chosen if chosen is not None else 'none meets the rule'}")
    if args.out:
        args.out.write_text(json.dumps({"command": command_line(), "machine": machine, "steps": args.steps,
                                        "skip": args.skip, "table": table, "verdicts": verdicts,
                                        "chosen": chosen}, indent=1))


if __name__ == "__main__":
    main()
