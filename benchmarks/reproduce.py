"""Does next-patch prediction beat next-token prediction at lower cost? NTP and NPP on the embedded data.

    make reproduce          # the default: 8×8 grid, NTP, #L2 λ½ and NTP for #L2's budget, seeds 0–2
    make reproduce REPRODUCE_ARGS="--width 96 --seeds 0 1 2 3 --out docs/results/study/w96"   # a smaller model
    python benchmarks/reproduce.py --schedules l2 l3 ntp-l2-budget ntp-l3-budget --seeds 0 1 2 --out docs/results/l3
    python benchmarks/reproduce.py --model B --steps 20000 --batch 256 --eval-samples 5000 --out docs/results/b

For every data set, seed and arm it trains one run (`python -m npp.train`; the quickstart's recipe, the
arm's schedule or recipe change the only difference), evaluating every `--eval-every` steps, and when it
has finished on `--final-samples` samples (FID, IS, precision/recall, class accuracy against the test
digits, with the MNIST classifier's features: domain metrics, not comparable to ImageNet FID; sample i
drawn with seed i in every run). It then pairs runs by seed (same initial weights, same data order) and
compares each NPP arm with NTP:

- same step: NTP trained for the same steps on the same images;
- same FLOPs: NTP trained for as many FLOPs as the NPP run (`ntp-l2-budget`: 0.625× the steps, with its
  own warm-up and decay), where that arm was asked for.

Each comparison is the per-seed difference, its mean with a 95% Student-t interval and the sign count
(benchmarks/analysis.py). Outputs in `--out` (default docs/results/<data>; a folder another set of
runs wrote is refused before any training): results.json (every run, every per-seed number, the paired
comparisons, the command, its settings and the cost), results.md (the tables),
fid_vs_step.png / fid_vs_flops.png (and .html, the periodic evaluations); with `--readme` the
block for that folder on the results page, docs/results/README.md (<!-- results:<folder>:begin --> … end),
is replaced by results.md. Finished runs
are reused (their wall time is kept in the run folder), so an interrupted reproduction resumes and a
rerun with new tables costs nothing. benchmarks/study.py reads the study's sets (one command each).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import plotly.graph_objects as go
import torch

from npp import viz
from npp.config import ModelConfig, ScheduleConfig, TrainConfig
from npp.evaluate import EvalConfig
from npp.files import dump_json
from npp.preflight import parameters
from npp.quickstart import quickstart_config
from npp.runs import RunDir, launch
from npp.schedule import relative_cost

from analysis import Paired, paired, spread
from common import command_line, describe_machine, machine_line

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART_WIDTH = 192
"""The width of the quickstart's tiny GPT (4 layers, 1.87M parameters): the top of the scale ladder."""


@dataclass(frozen=True)
class Arm:
    """One way of training that is compared with NTP: a schedule and any change to the recipe."""

    label: str
    levels: int
    segment_factor: float = 0.5
    schedule: dict = field(default_factory=dict)
    """ScheduleConfig fields changed from the paper's recipe."""
    model: dict = field(default_factory=dict)
    """ModelConfig fields changed from the preset."""
    budget_of: str | None = None
    """Train for fewer steps: as many as this arm's cost relative to NTP (in sequence positions) allows."""
    baseline: str = "ntp"
    """The NTP arm it is compared with at the same step (the same recipe, next-token prediction); an NTP arm
    of its own recipe names itself."""


# The paper's recipe shape scaled to a 1,200-step CPU run (docs/method.md §10, docs/recipes.md): dropouts 0.1,
# every stage warmed up and decayed over its last 20% to a tenth of the peak. The peak LR stays the CPU
# recipe's 2e-3: the paper's 1e-4 is tuned for 300 epochs and barely moves a model in 0.64 of an epoch.
PAPER_SHAPED_MODEL = {"token_dropout": 0.1, "resid_dropout": 0.1, "ffn_dropout": 0.1}
PAPER_SHAPED_SCHEDULE = {"decay_fraction": 0.2, "end_lr": 2e-4}

ARMS = {
    # the paper's schedules (docs/method.md §3)
    "ntp": Arm("NTP", 1),
    "l2": Arm("NPP #L2 λ½", 2),
    "l3": Arm("NPP #L3 λ½", 3),
    "l2-2/3": Arm("NPP #L2 λ⅔", 2, 2 / 3),
    # #L2 λ½ with one choice of the recipe changed: hypotheses for a gap to the paper
    "l2-no-rewarm": Arm("#L2 λ½, no warm-up at the switch", 2, schedule={"warmup_every_stage": False}),
    "l2-peak-switch": Arm("#L2 λ½, peak LR through the switch", 2,
                          schedule={"warmup_every_stage": False, "decay_every_stage": False}),
    "l2-centre-rope": Arm("#L2 λ½, patch RoPE at patch centres", 2, model={"patch_positions": "centre"}),
    # NTP with the training budget of an NPP schedule: its own warm-up and decay fit in the shorter run
    "ntp-l2-budget": Arm("NTP for #L2 λ½'s budget (0.625× steps)", 1, budget_of="l2"),
    "ntp-l3-budget": Arm("NTP for #L3 λ½'s budget (0.578× steps)", 1, budget_of="l3"),
    # the recipe question: NTP and #L2 under the paper-shaped recipe
    "ntp-paper-shaped": Arm("NTP, paper-shaped recipe", 1, schedule=PAPER_SHAPED_SCHEDULE, model=PAPER_SHAPED_MODEL,
                            baseline="ntp-paper-shaped"),
    "l2-paper-shaped": Arm("NPP #L2 λ½, paper-shaped recipe", 2, schedule=PAPER_SHAPED_SCHEDULE,
                           model=PAPER_SHAPED_MODEL, baseline="ntp-paper-shaped"),
}
METRICS = ("fid", "is", "precision", "recall", "class_accuracy")
WALL_FILE = "reproduce_wall.json"  # written into each run folder once its training process ends


def arm_steps(arm: Arm, steps: int) -> int:
    """The arm's training steps: `steps`, or as many as the budget of the arm it is matched with allows."""
    if not arm.budget_of:
        return steps
    other = ARMS[arm.budget_of]
    return round(steps * relative_cost(ScheduleConfig(total_steps=steps, levels=other.levels,
                                                      segment_factor=other.segment_factor)))


def model_name(args: argparse.Namespace) -> str:
    """The model part of a run's name: the preset, and the width when it is not the quickstart's."""
    return args.model if args.width in (None, QUICKSTART_WIDTH) else f"{args.model}-w{args.width}"


def run_config(args: argparse.Namespace, data: str, schedule: str, seed: int) -> TrainConfig:
    """The quickstart recipe (npp.recipes) with this data, schedule, seed and size."""
    base = quickstart_config("quickstart-ntp", str(args.runs_dir))
    arm = ARMS[schedule]
    # The quickstart's overrides shrink the tiny preset for a CPU; another preset is taken as it is.
    overrides = base.model_overrides if args.model == "tiny" else {}
    if args.width is not None:
        overrides = {**overrides, "dim": args.width}
    return dataclasses.replace(
        base, name=f"{data}-{model_name(args)}-{args.steps}steps-{schedule.replace('/', '_')}-s{seed}", data=data,
        seed=seed, model=args.model, model_overrides={**overrides, **arm.model}, batch_size=args.batch,
        eval_every=args.eval_every, eval_samples=args.eval_samples, progress=False, threads=args.threads,
        ckpt_every=max(args.steps // 4, 1), log_every=10,
        schedule=dataclasses.replace(base.schedule, total_steps=arm_steps(arm, args.steps), lr=args.lr,
                                     warmup_steps=max(args.steps // 20, 1), levels=arm.levels,
                                     segment_factor=arm.segment_factor, **arm.schedule))


def job_env(threads: int) -> dict[str, str]:
    """The jobs' environment: OMP_NUM_THREADS agrees with their --threads, for any OpenMP library besides
    torch's operators."""
    return {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1"}


def trained_threads(run: RunDir) -> int | None:
    """The thread count a finished run was trained with (every metrics row records it); None for a run
    trained before npp recorded it. A run resumed with another count has no single count: refused."""
    counts = {row.get("threads") for row in run.train_rows()}
    if len(counts) > 1:
        raise SystemExit(f"{run.path} was trained with several thread counts ({sorted(counts, key=str)}): its "
                         f"numbers pair with no run; delete the folder to train it again with one --threads")
    return counts.pop() if counts else None


def _threads_label(threads: int | None) -> str:
    return f"{threads} thread(s)" if threads is not None else "an unrecorded thread count (trained before npp recorded it)"


def check_threads(names: dict[tuple[str, str, int], str], threads: dict[tuple[str, str, int], int | None]) -> None:
    """Refuse to pair runs of one data set and seed (every comparison pairs two of them) that were trained with
    different thread counts: another count moves a seed's FID by far more than the differences measured.
    Unrecorded counts pair only with each other, so that sets trained before the count was recorded still
    regenerate while none of their runs is paired with a new one."""
    for key, count in threads.items():
        first = next(k for k in threads if k[0] == key[0] and k[2] == key[2])
        if threads[first] != count:
            raise SystemExit(f"cannot pair {names[first]} ({_threads_label(threads[first])}) with {names[key]} "
                             f"({_threads_label(count)}): train both with one --threads (delete the run folder "
                             f"of the other count), or give this set its own --runs-dir")


def eval_settings(config: TrainConfig, samples: int) -> EvalConfig:
    """The final evaluation: sample i drawn with seed i in every run, so runs are compared on the same random
    numbers."""
    return EvalConfig(num_samples=samples, batch_size=100, sampler=config.eval_sampler,
                      metrics=("fid", "isc", "prc"), save_png=False, progress=False)


def run_job(config: TrainConfig, samples: int) -> tuple[float | None, dict[str, float] | None]:
    """Train a run unless it already finished as `config` says, then evaluate it on `samples` samples unless
    that is on disk; each in a process of its own with its output in the run folder. Returns the training
    wall time (None if unknown) and the final metrics (None without a final evaluation)."""
    run = RunDir(config.run_dir)
    wall = run.path / WALL_FILE
    if not run.is_finished(config):
        run.path.mkdir(parents=True, exist_ok=True)
        started = time.perf_counter()
        with open(run.path / "train.log", "a") as log:
            code = launch(config, echo=lambda text: (log.write(text), log.flush()), env=job_env(config.threads))
        if code != 0:
            raise SystemExit(f"training {run.path} failed: see {run.path / 'train.log'}")
        dump_json({"wall_s": time.perf_counter() - started}, wall)
    final = None
    if samples:
        settings = eval_settings(config, samples)
        results = run.path / "eval" / settings.folder_name() / "results.json"
        if not results.is_file():
            flags = [f"--{k.replace('_', '-')}={v}" for k, v in settings.sampler.to_dict().items()]
            command = [sys.executable, "-m", "npp.evaluate", str(run.path), "--num-samples", str(samples),
                       "--batch-size", "100", "--metrics", "fid", "isc", "prc", "--no-save-png", "--no-progress",
                       "--threads", str(config.threads), *flags]
            done = subprocess.run(command, env=job_env(config.threads), capture_output=True, text=True)
            if done.returncode != 0:
                raise SystemExit(f"evaluating {run.path} failed: {done.stderr[-2000:]}")
        final = json.loads(results.read_text())["metrics"]
    seconds = json.loads(wall.read_text())["wall_s"] if wall.is_file() else None
    return seconds, final


def summarise(run: RunDir, seconds: float | None, final: dict[str, float] | None) -> dict:
    """Final metrics (`final`, else the last periodic evaluation), the FID curve, FLOPs and wall time."""
    rows, evals = run.train_rows(), run.eval_rows()
    # The training loop's own time: first to last metrics row (start-up and export excluded), less the
    # periodic evaluations, whose number differs between schedules (one at every stage end).
    loop_s = None
    if len(rows) > 1:
        inside = [r["eval_seconds"] for r in evals if rows[0]["time"] < r["time"] < rows[-1]["time"]]
        loop_s = rows[-1]["time"] - rows[0]["time"] - sum(inside)
    exported = json.loads((run.export / "config.json").read_text())
    model = ModelConfig.from_dict({k: v for k, v in exported.items() if k != "architecture"})
    return {"name": run.path.name, "parameters": parameters(model), "flops": rows[-1]["flops_seen"],
            "steps": rows[-1]["step"], "threads": trained_threads(run),
            "final_loss": rows[-1]["loss"], "wall_s": seconds, "loop_s": loop_s,
            "final": {k: (final or evals[-1])[k] for k in METRICS if k in (final or evals[-1])},
            "curve": [{"step": r["step"], "flops": r["flops_seen"], **{k: r[k] for k in METRICS if k in r}}
                      for r in evals]}


def compare(runs: dict[tuple[str, str, int], dict], data_sets: list[str], schedules: list[str],
            seeds: list[int]) -> list[dict]:
    """One row per (data, arm): every seed's final numbers and cost, in seed order; refused where the runs it
    pairs were trained with different thread counts."""
    check_threads({key: run.get("name", "/".join(map(str, key))) for key, run in runs.items()},
                  {key: run.get("threads") for key, run in runs.items()})
    rows = []
    for data in data_sets:
        for arm in arms_of(schedules):
            per_seed = [(runs[(data, ARMS[arm].baseline, s)], runs[(data, arm, s)]) for s in seeds]
            row = {"data": data, "arm": arm, "schedule": ARMS[arm].label, "seeds": len(seeds),
                   "parameters": per_seed[0][1].get("parameters")}
            for metric in METRICS:
                row[metric] = [b["final"][metric] for _, b in per_seed]
            row["final_loss"] = [b["final_loss"] for _, b in per_seed]
            row["flops"] = [b["flops"] for _, b in per_seed]
            row["flops_ratio"] = [b["flops"] / a["flops"] for a, b in per_seed]
            row["loop_s"] = [b["loop_s"] for _, b in per_seed]
            row["wall_ratio"] = [b["loop_s"] / a["loop_s"] for a, b in per_seed if a["loop_s"] and b["loop_s"]]
            row["wall_s"] = [b["wall_s"] for _, b in per_seed if b["wall_s"]]
            rows.append(row)
    return rows


def arms_of(schedules: list[str]) -> list[str]:
    """The arms the schedules need, each once: its NTP baseline, the arm whose budget it takes, itself."""
    return list(dict.fromkeys(a for s in schedules for a in (ARMS[s].baseline, ARMS[s].budget_of or s, s)))


def comparisons(rows: list[dict]) -> list[dict]:
    """Every NPP arm against NTP, seed by seed (same initial weights, same data order): at the same step, and
    at the same training FLOPs where the NTP arm trained for its budget ran too."""
    by_arm = {(r["data"], r["arm"]): r for r in rows}
    found = []
    for row in rows:
        if ARMS[row["arm"]].levels == 1:
            continue
        budget = next((a for a, arm in ARMS.items() if arm.budget_of == row["arm"]), None)
        for kind, other in (("same step", ARMS[row["arm"]].baseline), ("same FLOPs", budget)):
            against = by_arm.get((row["data"], other))
            if against is None:
                continue
            found.append({"data": row["data"], "arm": row["arm"], "schedule": row["schedule"], "kind": kind,
                          "against": against["schedule"], "seeds": row["seeds"],
                          **{key: paired(row[key], against[key]).to_dict() for key in (*METRICS, "final_loss")}})
    return found


def markdown(rows: list[dict], header: str) -> str:
    """The per-arm table (mean ± standard deviation over seeds), the paired comparisons with their
    intervals, and the training cost."""
    def line(cells: list) -> str:
        return "| " + " | ".join(str(c) for c in cells) + " |"

    lines = [header, "", line(["data", "schedule", "seeds", "FID ↓", "IS ↑", "precision", "recall", "class acc.",
                               "final loss", "FLOPs vs NTP"]), line(["---"] * 10)]
    lines += [line([r["data"], r["schedule"], r["seeds"], *(spread(r[m]) for m in METRICS), spread(r["final_loss"]),
                    spread(r["flops_ratio"])]) for r in rows]
    lines += ["", "Mean ± standard deviation over seeds, every run evaluated when finished. Domain metrics (MNIST "
              "classifier features against the 10,000 test digits), not comparable to ImageNet FID.", "",
              "Paired by seed, the run minus the run it is compared with:", "",
              line(["data", "schedule", "against", "seeds", "FID difference [95% CI], seeds lower", "FID",
                    "class acc. difference", "recall difference", "final-loss difference"]), line(["---"] * 9)]
    for c in comparisons(rows):
        fid = Paired(tuple(c["fid"]["diffs"]))
        lines.append(line([c["data"], c["schedule"], f"{c['against']} ({c['kind']})", c["seeds"], fid.shown(),
                           fid.verdict(), *(Paired(tuple(c[k]["diffs"])).shown(2)
                                            for k in ("class_accuracy", "recall", "final_loss"))]))
    lines += ["", "Two runs of one seed share their initial weights and data order, so their difference removes "
              "the seed's own luck. The interval is Student's t at 95% over the seeds (one seed: no interval); "
              "\"seeds lower\" counts the seeds whose difference is negative (for FID, the first run was better). "
              "Same step: both runs trained the same steps on the same images. Same FLOPs: against an NTP run "
              "trained for as many FLOPs as the NPP run, with its own warm-up and decay.", "",
              "Training cost per run:", "",
              line(["data", "schedule", "training FLOPs (TFLOP)", "training loop (min)", "whole run (min)",
                    "FLOPs vs NTP", "loop time vs NTP"]), line(["---"] * 7)]
    for r in rows:
        minutes = [s / 60 for s in r["loop_s"]] if all(r["loop_s"]) else None
        lines.append(line([r["data"], r["schedule"], spread([f / 1e12 for f in r["flops"]]),
                           spread(minutes) if minutes else "—",
                           spread([s / 60 for s in r["wall_s"]]) if r["wall_s"] else "—", spread(r["flops_ratio"]),
                           spread(r["wall_ratio"]) if r["wall_ratio"] else "—"]))
    lines += ["", "FLOPs: forward and backward of every optimizer step (model FLOPs, attention included). Training "
              "loop: first to last logged step, periodic evaluations excluded (NPP runs evaluate once more, at "
              "every stage end). Whole run: the training process, start-up, evaluations and export included."]
    return "\n".join(lines)


def plots(runs: dict[tuple[str, str, int], dict], out: Path) -> list[Path]:
    """FID against step and against FLOPs, one colour per schedule and one line per seed, log scale (a
    patch-stage model sampled token by token scores FID in the thousands), as PNG (kaleido) and HTML."""
    arms = list(dict.fromkeys(s for _, s, _ in runs))
    written = []
    for x, key in (("step", "step"), ("flops", "flops")):
        fig = go.Figure()
        for (data, schedule, seed), run in runs.items():
            color = viz.PALETTE[arms.index(schedule) % len(viz.PALETTE)]
            fig.add_trace(go.Scatter(
                x=[p[key] for p in run["curve"]], y=[p["fid"] for p in run["curve"]], mode="lines+markers",
                name=f"{ARMS[schedule].label} ({data})", legendgroup=f"{data}/{schedule}",
                showlegend=seed == min(s for d, a, s in runs if (d, a) == (data, schedule)),
                line={"color": color, "width": 1.5}, hovertext=f"seed {seed}"))
        fig.update_layout(title=f"domain FID (periodic evaluations) against {viz.X_AXES[x][1]}, every seed",
                          xaxis_title=viz.X_AXES[x][1], yaxis_title="FID ↓ (log scale)", yaxis_type="log",
                          template="plotly_white", legend={"orientation": "h", "y": -0.2}, height=520)
        fig.write_html(out / f"fid_vs_{x}.html", include_plotlyjs="cdn", div_id=f"fid_vs_{x}")  # reruns diff clean
        png = viz.save_figure_png(fig, out / f"fid_vs_{x}.png", width=1000, height=520)
        written += [p for p in (png, out / f"fid_vs_{x}.html") if p]
    return written


RESULTS_PAGE = ROOT / "docs" / "results" / "README.md"


def readme_block(block: str, page: Path = RESULTS_PAGE) -> tuple[str, str]:
    """The page's text before and after its block named `block` (a results folder's name, or one of study.py's)."""
    begin, end = f"<!-- results:{block}:begin -->", f"<!-- results:{block}:end -->"
    text = page.read_text()
    if begin not in text or end not in text:
        raise SystemExit(f"{page} has no {begin} … {end} block: add one where the "
                         f"table belongs, or drop --readme")
    head, rest = text.split(begin, 1)
    return head + begin, end + rest.split(end, 1)[1]


def update_readme(table: str, block: str, page: Path = RESULTS_PAGE) -> None:
    head, tail = readme_block(block, page)
    page.write_text(f"{head}\n{table}\n{tail}")


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", nargs="+", default=["mnist-8x8"], help="mnist-8x8 and/or mnist-16x16")
    parser.add_argument("--schedules", nargs="+", default=["l2", "ntp-l2-budget"],
                        choices=[a for a in ARMS if a != "ntp"],
                        help="NPP schedules (and #L2 variants) compared with NTP, which always runs")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--model", default="tiny", help="preset; tiny uses the quickstart's overrides")
    parser.add_argument("--width", type=int, default=None,
                        help="the model's width (dim), 4 heads: the scale ladder's 48, 96, 192 (the quickstart's, "
                             "1.87M parameters)")
    parser.add_argument("--steps", type=int, default=1200)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--eval-every", type=int, default=300)
    parser.add_argument("--eval-samples", type=int, default=500, help="samples of each periodic evaluation")
    parser.add_argument("--final-samples", type=int, default=2000,
                        help="samples of the evaluation of each finished run (0: use the last periodic one)")
    parser.add_argument("--runs-dir", type=Path, default=ROOT / "runs" / "reproduce")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1,
                        help="runs trained at once, --threads each (the numbers do not depend on it)")
    parser.add_argument("--threads", type=int, default=1,
                        help="CPU threads of every training and evaluation (npp's --threads, recorded in each run): "
                             "another count changes a seed's numbers, so runs of other counts are never paired. "
                             "Default 1: the numbers then do not depend on --jobs, and two one-thread processes use "
                             "2 cores better than one two-thread process for models this small")
    parser.add_argument("--out", type=Path, help="results folder (default: docs/results/<data>)")
    parser.add_argument("--readme", action="store_true",
                        help="replace the results page's block (docs/results/README.md) for the folder with the new tables")
    return parser


SETTINGS = ("data", "schedules", "seeds", "model", "width", "steps", "batch", "lr", "eval_every", "eval_samples",
            "final_samples")
"""The arguments that decide a results folder's numbers (--jobs, --runs-dir, --out and --readme do not)."""


def settings(args: argparse.Namespace) -> dict:
    return {key: getattr(args, key) for key in SETTINGS}


def check_out(args: argparse.Namespace) -> None:
    """Refuse, before any training, to overwrite a results folder that another set of runs wrote."""
    found = args.out / "results.json"
    if not found.is_file():
        return
    recorded = json.loads(found.read_text())
    if recorded.get("settings", settings(args)) != settings(args):
        raise SystemExit(f"{args.out} holds the results of `{recorded['command']}`: give this set its own "
                         f"folder with --out, or delete {args.out} to replace them")


def main() -> None:
    parser = make_parser()
    args = parser.parse_args()
    if args.eval_every <= 0 or args.steps % args.eval_every:
        parser.error(f"--eval-every {args.eval_every} must divide --steps {args.steps}, so that the final step "
                     f"is evaluated")
    args.out = args.out or ROOT / "docs" / "results" / "+".join(args.data)
    if args.threads < 1:
        parser.error(f"--threads {args.threads}: give a whole number of threads ≥ 1")
    check_out(args)  # before hours of training, not after
    if args.readme:
        readme_block(args.out.name)
    arms = arms_of(args.schedules)
    configs = {(d, a, seed): run_config(args, d, a, seed) for d in args.data for a in arms for seed in args.seeds}
    # Before hours of training: the runs reused as they are must have been trained with this set's count.
    reused = {key: RunDir(c.run_dir) for key, c in configs.items()}
    check_threads({key: c.name for key, c in configs.items()},
                  {key: trained_threads(run) if run.is_finished(configs[key]) else args.threads
                   for key, run in reused.items()})
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        # Seed by seed, so that a set stopped part way holds whole pairs, not every NTP run and no NPP one.
        by_seed = sorted(configs, key=lambda key: key[2])
        submitted = {key: pool.submit(run_job, configs[key], args.final_samples) for key in by_seed}
        jobs = {key: submitted[key] for key in configs}
        runs = {}
        for index, (key, job) in enumerate(jobs.items()):
            seconds, final = job.result()
            runs[key] = summarise(RunDir(configs[key].run_dir), seconds, final)
            print(f"== {configs[key].name} ({index + 1}/{len(configs)})", flush=True)
    rows = compare(runs, args.data, args.schedules, args.seeds)
    command = command_line(drop=["--readme"])
    machine = describe_machine(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    walls = [r["wall_s"] for r in runs.values()]
    total = f", {sum(walls) / 60:.0f} min of training processes in all" if all(walls) else ""
    header = (f"`{command}` — {machine_line(machine)}; {args.steps} steps of {args.batch} images, model "
              f"{args.model}, {args.eval_samples} samples per periodic evaluation, "
              f"{args.final_samples or args.eval_samples} for the final one{total}.")
    table = markdown(rows, header)
    args.out.mkdir(parents=True, exist_ok=True)
    recorded = {"command": command, "settings": settings(args), "machine": machine, "rows": rows,
                "comparisons": comparisons(rows), "runs": {"/".join(map(str, k)): v for k, v in runs.items()}}
    (args.out / "results.json").write_text(json.dumps(recorded, indent=1))
    (args.out / "results.md").write_text(table + "\n")
    written = plots(runs, args.out)
    if args.readme:
        update_readme(table, args.out.name)
    print(table)
    print("\n".join(str(p) for p in written))


if __name__ == "__main__":
    main()
