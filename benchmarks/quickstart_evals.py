"""What the quickstart's periodic evaluations add to its time: the quickstart pair trained twice, with the
recipe's evaluations and without them.

    python benchmarks/quickstart_evals.py --out /tmp/quickstart-evals.json   # the 1,200-step pair twice: ~20 min on 2 cores
    python benchmarks/quickstart_evals.py --steps 8 --eval-samples 20        # smoke: the script end to end in a minute

Each run is the quickstart's own config (npp.quickstart.quickstart_config: the quickstart recipe, tiny GPT,
embedded 8×8 MNIST), trained in a process of its own (`npp.runs.launch`, as `make quickstart` trains it) with
the process's thread settings, one run at a time; the only difference between the two of a pair is
`eval_every` (0: none), and the two take turns going first. Timed is the training process, start to end, as the quickstart prints it; the
evaluation rows say how long their own evaluations took. The evaluations are resumable settings (the run's
experiment id is the same) and sampling draws from its own generators, so the two runs of a pair must end
with the same weights: the script checks it. Run it on an otherwise idle machine; the table (markdown, for
docs/benchmarks.md) goes to stdout, the figures with the machine to --out (JSON).

--steps shortens every run (the evaluations then fall at the same fractions: its quarters and stage ends).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from npp.config import TrainConfig
from npp.quickstart import QUICKSTART_RUNS, quickstart_config
from npp.runs import RunDir, launch

from common import command_line, describe_machine, machine_line, markdown_table


def shortened(config: TrainConfig, steps: int | None, eval_samples: int | None) -> TrainConfig:
    """The quickstart's config at `steps` steps, evaluated at the same fractions of the run."""
    if steps is not None:
        quarters = config.schedule.total_steps // config.eval_every
        if steps % quarters:
            raise SystemExit(f"--steps {steps}: give a multiple of {quarters}, so the evaluations fall where the "
                             f"quickstart's do")
        config = dataclasses.replace(config, eval_every=steps // quarters,
                                     schedule=dataclasses.replace(config.schedule, total_steps=steps))
    if eval_samples is not None:
        config = dataclasses.replace(config, eval_samples=eval_samples)
    return dataclasses.replace(config, progress=False)


def train(config: TrainConfig, log: Path) -> float:
    """Seconds of the training process, start to end."""
    started = time.perf_counter()
    with open(log, "w") as out:
        code = launch(config, echo=out.write, env={**os.environ, "DS_ACCELERATOR": "cpu"})
    if code != 0:
        raise SystemExit(f"training {config.run_dir} failed: see {log}")
    return time.perf_counter() - started


def same_weights(a: RunDir, b: RunDir) -> bool:
    first, second = (load_file(run.export / "model.safetensors") for run in (a, b))
    return first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


def measure(name: str, root: Path, steps: int | None, eval_samples: int | None, *,
            evaluated_first: bool) -> dict[str, object]:
    """One run of the pair without and with evaluations, in folders of their own; the one trained second
    finds warmer caches, so the pair's two runs take turns going first."""
    evaluated = shortened(quickstart_config(name, str(root / "with")), steps, eval_samples)
    plain = dataclasses.replace(evaluated, runs_dir=str(root / "without"), eval_every=0)
    assert plain.experiment_id() == evaluated.experiment_id()
    cases = {"with": evaluated, "without": plain}
    seconds = {case: train(cases[case], root / f"{name}-{case}.log")
               for case in (("with", "without") if evaluated_first else ("without", "with"))}
    rows = RunDir(evaluated.run_dir).eval_rows()
    return {"steps": evaluated.schedule.total_steps, "eval_every": evaluated.eval_every,
            "eval_samples": evaluated.eval_samples, "seconds_without": seconds["without"],
            "seconds_with": seconds["with"], "evaluations": len(rows),
            "eval_seconds": sum(row["eval_seconds"] for row in rows),
            "same_weights": same_weights(RunDir(plain.run_dir), RunDir(evaluated.run_dir))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, help="shorten every run to this many steps (default: the quickstart's)")
    parser.add_argument("--eval-samples", type=int, help="samples per evaluation (default: the quickstart's)")
    parser.add_argument("--out", type=Path, help="JSON record of the figures")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="npp-quickstart-evals-") as tmp:
        table = {name: measure(name, Path(tmp), args.steps, args.eval_samples, evaluated_first=i % 2 == 1)
                 for i, name in enumerate(QUICKSTART_RUNS)}
    machine = describe_machine(torch.device("cpu"))
    rows = [[name, f"{m['steps']}", f"{m['evaluations']} × {m['eval_samples']}", f"{m['seconds_without'] / 60:.2f}",
             f"{m['seconds_with'] / 60:.2f}", f"{(m['seconds_with'] - m['seconds_without']) / 60:+.2f} "
             f"({m['seconds_with'] / m['seconds_without'] - 1:+.0%})", f"{m['eval_seconds'] / 60:.2f}",
             "yes" if m["same_weights"] else "NO"] for name, m in table.items()]
    print(f"`{command_line()}` — {machine_line(machine)}\n")
    print(markdown_table(["run", "steps", "evaluations × samples", "min without", "min with", "added",
                          "min inside the evaluations", "same weights"], rows))
    total = {key: sum(m[key] for m in table.values()) for key in ("seconds_without", "seconds_with")}
    print(f"\nthe pair: {total['seconds_without'] / 60:.2f} min without, {total['seconds_with'] / 60:.2f} min with "
          f"({total['seconds_with'] / total['seconds_without'] - 1:+.0%})")
    if args.out:
        args.out.write_text(json.dumps({"command": command_line(), "machine": machine, "table": table}, indent=1))
    if not all(m["same_weights"] for m in table.values()):
        raise SystemExit("the runs with and without evaluations ended with different weights")


if __name__ == "__main__":
    main()
