"""Does next-patch prediction beat next-token prediction at lower cost? NTP and NPP on the embedded data.

    make reproduce                  # the default: 8×8 grid, #L2 and #L3 λ½, 3 seeds (~50 min on 2 cores)
    python benchmarks/reproduce.py --data mnist-16x16 --steps 600 --eval-every 200 --eval-samples 250 \
        --final-samples 1000 --seeds 0 1                              # the 16×16 grid (~65 min on 2 cores)
    python benchmarks/reproduce.py --schedules l2 l2-peak-switch l2-centre-rope l2-no-rewarm --seeds 0 1
    python benchmarks/reproduce.py --schedules l2 l3 l2-2/3 --seeds 0 1 2 3 4
    python benchmarks/reproduce.py --model B --steps 20000 --batch 256 --eval-samples 5000   # on a GPU

For every data set, seed and schedule it trains one run with the same steps, batch and learning rate
(`python -m npp.train`, the schedule being the only difference), evaluating every `--eval-every` steps
(FID, IS, precision/recall, class accuracy on `--eval-samples` samples against the test digits, with
the MNIST classifier's features: domain metrics, not comparable to ImageNet FID). It then compares
each NPP schedule with NTP at matched points:

- same step: the evaluation of both finished runs on `--final-samples` samples (same steps, same images
  seen, same sampling seeds);
- same FLOPs: the NPP run's last periodic evaluation against NTP's periodic curve interpolated at the
  NPP run's total training FLOPs (both on `--eval-samples` samples: FID depends on the sample count).

Outputs in `--out` (default docs/results/<data>): results.json (every run, every number), results.md
(the quality and cost tables), fid_vs_step.png / fid_vs_flops.png (and .html); with `--readme` the
README's block for that folder (<!-- results:<folder>:begin --> … end) is replaced by results.md.
Finished runs are reused (their wall time is kept in the run folder), so an interrupted reproduction
resumes and a rerun with new tables costs nothing.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import plotly.graph_objects as go
import torch

from npp import viz
from npp.config import ScheduleConfig, TrainConfig
from npp.evaluate import EvalConfig, evaluate
from npp.files import dump_json
from npp.quickstart import quickstart_config
from npp.runs import RunDir, launch
from npp.schedule import relative_cost

from common import command_line, describe_machine, machine_line

ROOT = Path(__file__).resolve().parents[1]


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


ARMS = {
    # the paper's schedules (REFERENCE §3)
    "ntp": Arm("NTP", 1),
    "l2": Arm("NPP #L2 λ½", 2),
    "l3": Arm("NPP #L3 λ½", 3),
    "l2-2/3": Arm("NPP #L2 λ⅔", 2, 2 / 3),
    # #L2 λ½ with one choice of the recipe changed: hypotheses for a gap to the paper
    "l2-no-rewarm": Arm("#L2 λ½, no warm-up at the switch", 2, schedule={"warmup_every_stage": False}),
    "l2-peak-switch": Arm("#L2 λ½, peak LR through the switch", 2,
                          schedule={"warmup_every_stage": False, "decay_every_stage": False}),
    "l2-centre-rope": Arm("#L2 λ½, patch RoPE at patch centres", 2, model={"patch_positions": "centre"}),
    # NTP with the training budget of #L2 λ½: its own warm-up and decay fit in the shorter run
    "ntp-l2-budget": Arm("NTP for #L2 λ½'s budget (0.625× steps)", 1, budget_of="l2"),
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


def run_config(args: argparse.Namespace, data: str, schedule: str, seed: int) -> TrainConfig:
    """The quickstart recipe (npp.recipes) with this data, schedule, seed and size."""
    base = quickstart_config("quickstart-ntp", str(args.runs_dir))
    arm = ARMS[schedule]
    # The quickstart's overrides shrink the tiny preset for a CPU; another preset is taken as it is.
    overrides = base.model_overrides if args.model == "tiny" else {}
    return dataclasses.replace(
        base, name=f"{data}-{args.model}-{args.steps}steps-{schedule.replace('/', '_')}-s{seed}", data=data,
        seed=seed, model=args.model, model_overrides={**overrides, **arm.model}, batch_size=args.batch,
        eval_every=args.eval_every, eval_samples=args.eval_samples, progress=False,
        ckpt_every=max(args.steps // 4, 1), log_every=10,
        schedule=dataclasses.replace(base.schedule, total_steps=arm_steps(arm, args.steps), lr=args.lr,
                                     warmup_steps=max(args.steps // 20, 1), levels=arm.levels,
                                     segment_factor=arm.segment_factor, **arm.schedule))


def train(config: TrainConfig) -> float | None:
    """Train a run in a process of its own unless it already finished as `config` says; its wall time in
    seconds (None if unknown). The trainer refuses to resume a run folder trained with other settings."""
    run = RunDir(config.run_dir)
    wall = run.path / WALL_FILE
    if run.is_finished(config):
        return json.loads(wall.read_text())["wall_s"] if wall.is_file() else None
    started = time.perf_counter()
    if launch(config) != 0:
        raise SystemExit(f"training {run.path} failed: the lines above say why")
    seconds = time.perf_counter() - started
    dump_json({"wall_s": seconds}, wall)
    return seconds


def final_evaluation(config: TrainConfig, samples: int) -> dict[str, float]:
    """Metrics of the finished run on `samples` samples (sample i drawn with seed i in every run, so runs
    are compared on the same random numbers); kept in the run folder and reused."""
    settings = EvalConfig(num_samples=samples, batch_size=100, sampler=config.eval_sampler,
                          metrics=("fid", "isc", "prc"), save_png=False, progress=False)
    results = Path(config.run_dir) / "eval" / settings.folder_name() / "results.json"
    if not results.is_file():
        evaluate(config.run_dir, settings)
    return json.loads(results.read_text())["metrics"]


def summarise(run: RunDir, seconds: float | None, final: dict[str, float] | None) -> dict:
    """Final metrics (`final`, else the last periodic evaluation), the FID curve, FLOPs and wall time."""
    rows, evals = run.train_rows(), run.eval_rows()
    # The training loop's own time: first to last metrics row (start-up and export excluded), less the
    # periodic evaluations, whose number differs between schedules (one at every stage end).
    loop_s = None
    if len(rows) > 1:
        inside = [r["eval_seconds"] for r in evals if rows[0]["time"] < r["time"] < rows[-1]["time"]]
        loop_s = rows[-1]["time"] - rows[0]["time"] - sum(inside)
    return {"name": run.path.name, "flops": rows[-1]["flops_seen"], "steps": rows[-1]["step"],
            "final_loss": rows[-1]["loss"], "wall_s": seconds, "loop_s": loop_s,
            "final": {k: (final or evals[-1])[k] for k in METRICS if k in (final or evals[-1])},
            "curve": [{"step": r["step"], "flops": r["flops_seen"], **{k: r[k] for k in METRICS if k in r}}
                      for r in evals]}


def at_flops(curve: list[dict], flops: float, metric: str) -> float:
    """A run's metric interpolated at a FLOP count (its curve is monotone in FLOPs)."""
    xs = [p["flops"] for p in curve]
    return float(np.interp(flops, xs, [p[metric] for p in curve]))


def spread(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.3g}"
    return f"{statistics.mean(values):.3g} ± {statistics.stdev(values):.2g}"


def compare(runs: dict[tuple[str, str, int], dict], data_sets: list[str], schedules: list[str],
            seeds: list[int]) -> list[dict]:
    """One row per (data, schedule): quality at the same step and at the same FLOPs, and cost."""
    rows = []
    for data in data_sets:
        for schedule in ["ntp", *schedules]:
            per_seed = [(runs[(data, "ntp", s)], runs[(data, schedule, s)]) for s in seeds]
            row = {"data": data, "schedule": ARMS[schedule].label, "seeds": len(seeds)}
            for metric in METRICS:
                row[f"{metric}"] = [b["final"][metric] for _, b in per_seed]
                if schedule != "ntp":
                    row[f"{metric}_periodic"] = [b["curve"][-1][metric] for _, b in per_seed]
                    row[f"ntp_{metric}_same_flops"] = [at_flops(a["curve"], b["flops"], metric) for a, b in per_seed]
            row["fid_minus_ntp"] = [b["final"]["fid"] - a["final"]["fid"] for a, b in per_seed]
            row["flops"] = [b["flops"] for _, b in per_seed]
            row["flops_ratio"] = [b["flops"] / a["flops"] for a, b in per_seed]
            row["loop_s"] = [b["loop_s"] for _, b in per_seed]
            row["wall_ratio"] = [b["loop_s"] / a["loop_s"] for a, b in per_seed if a["loop_s"] and b["loop_s"]]
            row["wall_s"] = [b["wall_s"] for _, b in per_seed if b["wall_s"]]
            rows.append(row)
    return rows


def markdown(rows: list[dict], header: str) -> str:
    """The quality table (with the cost ratios beside it) and the training-cost table."""
    lines = [header, "",
             "| data | schedule | seeds | FID ↓ (same step) | FID − NTP's, same seed | FID at the same FLOPs: run vs "
             "NTP | IS ↑ | precision | recall | class acc. | FLOPs vs NTP | wall time vs NTP |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        same_flops = (f"{spread(r['fid_periodic'])} vs {spread(r['ntp_fid_same_flops'])}"
                      if "ntp_fid_same_flops" in r else "—")
        delta = spread(r["fid_minus_ntp"]) if "ntp_fid_same_flops" in r else "—"
        lines.append(f"| {r['data']} | {r['schedule']} | {r['seeds']} | {spread(r['fid'])} | {delta} | {same_flops} | "
                     f"{spread(r['is'])} | {spread(r['precision'])} | {spread(r['recall'])} | "
                     f"{spread(r['class_accuracy'])} | {spread(r['flops_ratio'])} | "
                     f"{spread(r['wall_ratio']) if r['wall_ratio'] else '—'} |")
    lines += ["", "Mean ± standard deviation over seeds. Domain metrics (MNIST classifier features against "
              "the 10,000 test digits), not comparable to ImageNet FID. \"Same step\": every run trained the same "
              "steps on the same images, evaluated when finished; all columns but \"same FLOPs\" are from that "
              "evaluation. \"FID − NTP's\": the difference to the NTP run of the same seed (same initial "
              "weights and data order), which removes part of the seed-to-seed spread. \"Same FLOPs\": the run's last periodic evaluation against the NTP run's periodic FID "
              "curve interpolated at this run's total training FLOPs (both on fewer samples, hence higher FIDs).", "",
              "Training cost per run:", "",
              "| data | schedule | training FLOPs (TFLOP) | training loop (min) | whole run (min) | FLOPs vs NTP "
              "| loop time vs NTP |",
              "|---|---|---|---|---|---|---|"]
    for r in rows:
        minutes = lambda seconds: [s / 60 for s in seconds]  # noqa: E731
        lines.append(f"| {r['data']} | {r['schedule']} | {spread([f / 1e12 for f in r['flops']])} | "
                     f"{spread(minutes(r['loop_s'])) if all(r['loop_s']) else '—'} | "
                     f"{spread(minutes(r['wall_s'])) if r['wall_s'] else '—'} | {spread(r['flops_ratio'])} | "
                     f"{spread(r['wall_ratio']) if r['wall_ratio'] else '—'} |")
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
        fig.write_html(out / f"fid_vs_{x}.html", include_plotlyjs="cdn")
        png = viz.save_png(fig, out / f"fid_vs_{x}.png", width=1000, height=520)
        written += [p for p in (png, out / f"fid_vs_{x}.html") if p]
    return written


def readme_block(block: str) -> tuple[str, str]:
    """The README's text before and after its block named `block` (the results folder's name)."""
    begin, end = f"<!-- results:{block}:begin -->", f"<!-- results:{block}:end -->"
    text = (ROOT / "README.md").read_text()
    if begin not in text or end not in text:
        raise SystemExit(f"README.md has no {begin} … {end} block: add one where the table belongs, "
                         f"or drop --readme")
    head, rest = text.split(begin, 1)
    return head + begin, end + rest.split(end, 1)[1]


def update_readme(table: str, block: str) -> None:
    head, tail = readme_block(block)
    (ROOT / "README.md").write_text(f"{head}\n{table}\n{tail}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", nargs="+", default=["mnist-8x8"], help="mnist-8x8 and/or mnist-16x16")
    parser.add_argument("--schedules", nargs="+", default=["l2", "l3"], choices=[a for a in ARMS if a != "ntp"],
                        help="NPP schedules (and #L2 variants) compared with NTP, which always runs")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--model", default="tiny", help="preset; tiny uses the quickstart's overrides")
    parser.add_argument("--steps", type=int, default=1200)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--eval-every", type=int, default=300)
    parser.add_argument("--eval-samples", type=int, default=500, help="samples of each periodic evaluation")
    parser.add_argument("--final-samples", type=int, default=2000,
                        help="samples of the evaluation of each finished run (0: use the last periodic one)")
    parser.add_argument("--runs-dir", type=Path, default=ROOT / "runs" / "reproduce")
    parser.add_argument("--out", type=Path, help="results folder (default: docs/results/<data>)")
    parser.add_argument("--readme", action="store_true",
                        help="replace the README's block for the results folder with the new tables")
    args = parser.parse_args()
    if args.eval_every <= 0 or args.steps % args.eval_every:
        parser.error(f"--eval-every {args.eval_every} must divide --steps {args.steps}, so that the final step "
                     f"is evaluated")
    args.out = args.out or ROOT / "docs" / "results" / "+".join(args.data)
    if args.readme:
        readme_block(args.out.name)  # before hours of training, not after
    configs = {(d, s, seed): run_config(args, d, s, seed)
               for d in args.data for s in ["ntp", *args.schedules] for seed in args.seeds}
    runs = {}
    for key, config in configs.items():
        print(f"== {config.name} ({len(runs) + 1}/{len(configs)})", flush=True)
        seconds = train(config)
        final = final_evaluation(config, args.final_samples) if args.final_samples else None
        runs[key] = summarise(RunDir(config.run_dir), seconds, final)
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
    (args.out / "results.json").write_text(json.dumps({"command": command, "machine": machine, "rows": rows,
                                                       "runs": {"/".join(map(str, k)): v for k, v in runs.items()}},
                                                      indent=1))
    (args.out / "results.md").write_text(table + "\n")
    written = plots(runs, args.out)
    if args.readme:
        update_readme(table, args.out.name)
    print(table)
    print("\n".join(str(p) for p in written))


if __name__ == "__main__":
    main()
