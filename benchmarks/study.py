"""How NPP's gain over NTP moves with model size, training length and the recipe, over reproduce.py's runs.

    python benchmarks/study.py          # after the study's REPRODUCE_ARGS commands (README, "Results")

It trains nothing: it reads the finished runs of the reproduce.py commands listed in STUDY below from
--runs-dir, pairs every NPP run with the NTP run of the same seed (same initial weights and data order),
and writes docs/results/study/: results.json (every run's per-seed numbers, the paired differences with
their 95% intervals and sign counts, the commands, the cost), results.md (the tables) and
scale_ladder.png (the gains against parameter count, with their intervals). A comparison whose runs are
not all there yet is listed as missing rather than drawn from fewer seeds.
"""

from __future__ import annotations

import argparse
import json
import statistics
from dataclasses import dataclass
from pathlib import Path

import plotly.graph_objects as go

from npp import viz
from npp.config import ModelConfig, TrainConfig
from npp.preflight import parameters
from npp.runs import RunDir

from analysis import Paired, paired, relative, spread

ROOT = Path(__file__).resolve().parents[1]
FINAL_SAMPLES = 2000


@dataclass(frozen=True)
class Rung:
    """One set of runs: a model width and a length, the arms trained and the seeds."""

    name: str
    width: int
    steps: int
    seeds: tuple[int, ...]
    arms: tuple[str, ...]
    command: str

    def model_part(self) -> str:
        return "tiny" if self.width == 192 else f"tiny-w{self.width}"

    def run(self, runs_dir: Path, arm: str, seed: int) -> RunDir:
        return RunDir(runs_dir / f"mnist-8x8-{self.model_part()}-{self.steps}steps-{arm}-s{seed}")


R = "python benchmarks/reproduce.py"
STUDY = (
    Rung("quickstart size", 192, 1200, (0, 1, 2), ("ntp", "l2", "ntp-l2-budget"), "make reproduce"),
    Rung("quickstart size, 8 seeds", 192, 1200, tuple(range(8)), ("ntp", "l2", "ntp-l2-budget"),
         f"{R} --schedules l2 ntp-l2-budget --seeds 0 1 2 3 4 5 6 7"),
    Rung("quickstart size, #L3", 192, 1200, (0, 1, 2), ("ntp", "l3", "ntp-l3-budget"),
         f"{R} --schedules l3 ntp-l3-budget --seeds 0 1 2"),
    Rung("0.49M parameters", 96, 1200, (0, 1, 2, 3), ("ntp", "l2", "ntp-l2-budget"),
         f"{R} --width 96 --schedules l2 ntp-l2-budget --seeds 0 1 2 3"),
    Rung("5.7M parameters", 320, 1200, (0, 1, 2, 3), ("ntp", "l2", "ntp-l2-budget"),
         f"{R} --width 320 --schedules l2 ntp-l2-budget --seeds 0 1 2 3"),
    Rung("4× the steps", 192, 4800, (0, 1, 2), ("ntp", "l2", "ntp-l2-budget"),
         f"{R} --steps 4800 --eval-every 1200 --schedules l2 ntp-l2-budget --seeds 0 1 2"),
    Rung("paper-shaped recipe", 192, 1200, (0, 1, 2, 3), ("ntp-paper-shaped", "l2-paper-shaped"),
         f"{R} --schedules l2-paper-shaped --seeds 0 1 2 3"),
)
"""The study's sets of runs. The sets share runs (the 8-seed set holds the default's three), so only
the runs a set adds cost anything."""
METRICS = ("fid", "class_accuracy", "precision", "recall", "is")


def read_run(run: RunDir) -> dict | None:
    """A finished run's final evaluation (FINAL_SAMPLES samples), last loss, FLOPs and parameters; None if
    it is not finished or not evaluated yet."""
    results = sorted(run.path.glob(f"eval/n{FINAL_SAMPLES}-*/results.json"))
    if not run.exported or not results:
        return None
    rows = run.train_rows()
    config = TrainConfig.from_dict(run.read_config())
    model = ModelConfig.preset(config.model, vocab_size=256, num_classes=10, grid=8, **config.model_overrides)
    return {"name": run.path.name, "metrics": json.loads(results[-1].read_text())["metrics"],
            "final_loss": rows[-1]["loss"], "flops": rows[-1]["flops_seen"], "steps": rows[-1]["step"],
            "parameters": parameters(model)}


def compare(rung: Rung, runs_dir: Path) -> dict:
    """Every arm of a rung seed by seed, and each NPP arm against its NTP baselines."""
    runs = {arm: [read_run(rung.run(runs_dir, arm, seed)) for seed in rung.seeds] for arm in rung.arms}
    missing = [rung.run(runs_dir, arm, seed).path.name for arm in rung.arms for seed, r in zip(rung.seeds, runs[arm])
               if r is None]
    out = {"rung": rung.name, "width": rung.width, "steps": rung.steps, "seeds": list(rung.seeds),
           "command": rung.command, "missing": missing}
    if missing:
        return out
    out["parameters"] = runs[rung.arms[0]][0]["parameters"]
    out["runs"] = {arm: [{k: r[k] for k in ("name", "metrics", "final_loss", "flops", "steps")} for r in rs]
                   for arm, rs in runs.items()}
    ntp, npp_arm = rung.arms[0], rung.arms[1]
    value = lambda arm, key: [r["metrics"][key] if key in r["metrics"] else r[key] for r in runs[arm]]  # noqa: E731
    out["same_step"] = {key: paired(value(npp_arm, key), value(ntp, key)).to_dict()
                        for key in (*METRICS, "final_loss")}
    out["same_step"]["fid_relative"] = relative(value(npp_arm, "fid"), value(ntp, "fid")).to_dict()
    out["flops_ratio"] = statistics.fmean(r["flops"] / b["flops"] for r, b in zip(runs[npp_arm], runs[ntp]))
    if len(rung.arms) > 2:  # NTP trained for the NPP arm's budget: the fair equal-cost comparison
        budget = rung.arms[2]
        out["equal_budget"] = {"fid": paired(value(npp_arm, "fid"), value(budget, "fid")).to_dict(),
                               "fid_relative": relative(value(npp_arm, "fid"), value(budget, "fid")).to_dict(),
                               "class_accuracy": paired(value(npp_arm, "class_accuracy"),
                                                        value(budget, "class_accuracy")).to_dict()}
        out["budget_flops_ratio"] = statistics.fmean(r["flops"] / b["flops"]
                                                     for r, b in zip(runs[npp_arm], runs[budget]))
    return out


def as_paired(record: dict) -> Paired:
    return Paired(tuple(record["diffs"]))


def markdown(results: list[dict]) -> str:
    lines = ["| set | parameters | steps | seeds | NTP FID | NPP FID | NPP − NTP, same step: FID, 95% CI, seeds lower "
             "| relative | NPP − NTP at NPP's budget: FID, 95% CI | relative | class acc. NPP − NTP | final loss "
             "NPP − NTP | recall NPP − NTP |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        if r["missing"]:
            lines.append(f"| {r['rung']} | | {r['steps']} | {len(r['seeds'])} | missing: {len(r['missing'])} runs "
                         f"| | | | | | | | |")
            continue
        ntp, npp_arm = list(r["runs"])[:2]
        fid = lambda arm: [x["metrics"]["fid"] for x in r["runs"][arm]]  # noqa: E731
        same, rel = as_paired(r["same_step"]["fid"]), as_paired(r["same_step"]["fid_relative"])
        budget = (as_paired(r["equal_budget"]["fid"]).shown(), as_paired(r["equal_budget"]["fid_relative"]).shown(2)) \
            if "equal_budget" in r else ("—", "—")
        lines.append(f"| {r['rung']} | {r['parameters'] / 1e6:.2f}M | {r['steps']} | {len(r['seeds'])} | "
                     f"{spread(fid(ntp))} | {spread(fid(npp_arm))} | {same.shown()} ({same.verdict()}) | "
                     f"{rel.mean:+.0%} [{rel.interval[0]:+.0%}, {rel.interval[1]:+.0%}] | {budget[0]} | "
                     f"{budget[1]} | {as_paired(r['same_step']['class_accuracy']).shown(2)} | "
                     f"{as_paired(r['same_step']['final_loss']).shown(2)} | "
                     f"{as_paired(r['same_step']['recall']).shown(2)} |")
    lines += ["", "Differences are paired by seed (same initial weights and data order), NPP minus its NTP "
              "baseline: negative FID differences favour NPP. The interval is Student's t at 95% over the seeds; "
              "\"seeds lower\" counts the seeds where NPP's FID was lower. \"At NPP's budget\": against an NTP run "
              "trained for as many FLOPs as the NPP run (its own warm-up and decay in 0.625× the steps). Domain "
              f"metrics on {FINAL_SAMPLES} samples against the 10,000 test digits (MNIST classifier features), "
              "with the same sampling seeds for every run."]
    return "\n".join(lines)


def ladder_figure(results: list[dict]) -> go.Figure:
    """The relative FID gain of #L2 against parameter count, same step and equal budget, with 95% intervals."""
    complete = [r for r in results if not r["missing"] and r["steps"] == 1200 and "equal_budget" in r
                and list(r["runs"])[1] == "l2"]
    # One point per model size: the set with the most seeds (the 8-seed set holds the default's three).
    ladder = sorted({r["width"]: r for r in sorted(complete, key=lambda r: len(r["seeds"]))}.values(),
                    key=lambda r: r["parameters"])
    fig = go.Figure()
    for key, label, color in (("same_step", "same step", viz.PALETTE[1]),
                              ("equal_budget", "at NPP's budget (NTP trained for as many FLOPs)", viz.PALETTE[2])):
        points = [as_paired(r[key]["fid_relative"]) for r in ladder]
        fig.add_trace(go.Scatter(
            x=[r["parameters"] for r in ladder], y=[100 * p.mean for p in points], mode="lines+markers", name=label,
            line={"color": color}, error_y={"type": "data", "symmetric": False,
                                           "array": [100 * (p.interval[1] - p.mean) for p in points],
                                           "arrayminus": [100 * (p.mean - p.interval[0]) for p in points]},
            hovertext=[f"{r['rung']}, {len(r['seeds'])} seeds" for r in ladder]))
    fig.add_hline(y=0, line={"color": "grey", "dash": "dot"})
    fig.update_layout(title="NPP #L2 λ½ against NTP: FID change by model size (8×8 tokens, 1,200 steps)",
                      xaxis={"title": "parameters", "type": "log"},
                      yaxis={"title": "FID change, % of NTP's (negative: NPP better), 95% CI"},
                      template="plotly_white", legend={"orientation": "h", "y": -0.25}, height=480)
    return fig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs-dir", type=Path, default=ROOT / "runs" / "reproduce")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "results" / "study")
    args = parser.parse_args()
    results = [compare(rung, args.runs_dir) for rung in STUDY]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps({"study": results, "final_samples": FINAL_SAMPLES}, indent=1))
    table = markdown(results)
    (args.out / "results.md").write_text(table + "\n")
    fig = ladder_figure(results)
    fig.write_html(args.out / "scale_ladder.html", include_plotlyjs="cdn")
    viz.save_png(fig, args.out / "scale_ladder.png", width=900, height=480)
    print(table)


if __name__ == "__main__":
    main()
