"""The study: how NPP's gain over NTP moves with model size, seeds, training length and the recipe.

    make reproduce REPRODUCE_ARGS="..."   # each set in SETS (docs/results/README.md lists the commands)
    python benchmarks/study.py            # trains nothing: reads the sets' results folders

Every set is one benchmarks/reproduce.py command with a results folder of its own; finished runs are
shared between sets (the 8-seed set holds the 0.49M set's four), so only the runs a set adds cost
anything. This script reads the sets' results.json files (every run's per-seed numbers), pairs every
#L2 λ½ run with the NTP run of its seed (same initial weights and data order) and writes
docs/results/study/: results.json (the sets' per-seed numbers, every paired difference with its 95%
interval and sign count, the trends, the commands, the cost), results.md (the tables) and
scale_ladder.png/.html. Five readings, and the family they form:

- scale ladder: #L2 − NTP at the same step and at the same FLOPs against parameter count (three sizes,
  four seeds each), and the least-squares trend of every seed's relative FID change on log10 parameters;
- eight seeds: the same-step comparison at 0.49M on seeds 0–7;
- length: the same-step change at 1× and 4× the steps, and its per-seed difference between the two;
- recipe: #L2's same-step change under the paper-shaped recipe minus under ours, seed by seed;
- preregistered: the one decisive set (docs/results/study/w96-9600-steps/preregistration.md), its primary
  endpoint with the t, sign and Wilcoxon tests, and its exploratory same-step curve at 1×, 2×, 4× and 8×;
- family: every paired FID comparison the results page shows, each once, with its raw p and its Holm-adjusted
  p over the family. Only an adjusted p below 0.05 is called better or worse; a raw interval that excludes
  zero without surviving the adjustment is "suggestive".

A set whose folder is absent, or was written with other settings, is listed as missing with its command:
nothing is drawn from fewer seeds than the set names.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import statistics
from dataclasses import dataclass
from pathlib import Path

import plotly.graph_objects as go

from npp import viz
from npp.config import ScheduleConfig
from npp.schedule import plan_stages

from analysis import Paired, holm, paired, relative, spread, trend
from reproduce import RESULTS_PAGE, make_parser, settings, update_readme

ROOT = Path(__file__).resolve().parents[1]
STUDY_DIR = "docs/results/study"


@dataclass(frozen=True)
class StudySet:
    """One reproduce.py command and the folder it writes."""

    name: str
    args: str
    """REPRODUCE_ARGS without --out."""
    out: str

    @property
    def command(self) -> str:
        return f'make reproduce REPRODUCE_ARGS="{self.args} --out {self.out}"' if self.args else "make reproduce"

    def settings(self) -> dict:
        return settings(make_parser().parse_args([*shlex.split(self.args), "--out", self.out]))

    def load(self, root: Path) -> dict | None:
        """The set's results.json, or None when it is not there or other settings wrote it."""
        found = root / self.out / "results.json"
        if not found.is_file():
            return None
        results = json.loads(found.read_text())
        return results if results.get("settings") == self.settings() else None


DEFAULT = StudySet("default (make reproduce), 1.87M, seeds 0–2", "", "docs/results/mnist-8x8")
W48 = StudySet("0.21M parameters", "--width 48 --seeds 0 1 2 3", f"{STUDY_DIR}/w48")
W96 = StudySet("0.49M parameters", "--width 96 --seeds 0 1 2 3", f"{STUDY_DIR}/w96")
W192 = StudySet("1.87M parameters (the quickstart's size)", "--seeds 0 1 2 3", f"{STUDY_DIR}/w192")
EIGHT_SEEDS = StudySet("0.49M, 8 seeds", "--width 96 --schedules l2 --seeds 0 1 2 3 4 5 6 7",
                       f"{STUDY_DIR}/w96-8-seeds")
LONGER = StudySet("0.49M, 4× the steps",
                  "--width 96 --steps 4800 --eval-every 1200 --schedules l2 --seeds 0 1 2 3 4 5",
                  f"{STUDY_DIR}/w96-4800-steps")
PAPER_SHAPED = StudySet("0.49M, paper-shaped recipe", "--width 96 --schedules l2-paper-shaped --seeds 0 1 2 3",
                        f"{STUDY_DIR}/w96-paper-shaped")
PREREGISTERED = StudySet("0.49M, 8× the steps, preregistered (seeds 6–13)",
                         "--width 96 --steps 9600 --eval-every 1200 --schedules l2 --seeds 6 7 8 9 10 11 12 13",
                         f"{STUDY_DIR}/w96-9600-steps")
SETS = (DEFAULT, W48, W96, W192, EIGHT_SEEDS, LONGER, PAPER_SHAPED, PREREGISTERED)
"""The study's commands in the order the results page gives them (and in which they add runs)."""
LADDER = (W48, W96, W192)
EARLIER = ("docs/results/mnist-8x8-l2-l3", "docs/results/mnist-16x16")
"""Results folders of the earlier sets the results page still shows (two-thread runs of 2026-11-23); their
comparisons join the page's family. The recipe and RoPE folders paired one-thread arms with two-thread runs
and are not shown (the thread count changes a seed's FID)."""
METRICS = ("fid", "class_accuracy", "recall", "final_loss")
CURVE_STEPS = (1200, 2400, 4800, 9600)
"""The preregistered set's exploratory looks: 1×, 2×, 4× and 8× the default length (periodic evaluations)."""


# --------------------------------------------------------------------------------------------
# Reading a set
# --------------------------------------------------------------------------------------------

def arm_row(results: dict, arm: str) -> dict:
    return next(r for r in results["rows"] if r["arm"] == arm)


def values(results: dict, arm: str, key: str, seeds: list[int] | None = None) -> list[float]:
    """A metric of an arm's runs in seed order; `seeds` keeps only those seeds."""
    found = arm_row(results, arm)[key]
    if seeds is None:
        return found
    return [v for s, v in zip(results["settings"]["seeds"], found) if s in seeds]


def versus(results: dict, arm: str, against: str, seeds: list[int] | None = None) -> dict[str, Paired]:
    """arm − against, seed by seed: every metric, and FID relative to the baseline's."""
    out = {key: paired(values(results, arm, key, seeds), values(results, against, key, seeds)) for key in METRICS}
    out["fid_relative"] = relative(values(results, arm, "fid", seeds), values(results, against, "fid", seeds))
    return out


def summary(results: dict, npp_arm: str, ntp: str, budget: str | None = None,
            seeds: list[int] | None = None) -> dict:
    """One set's comparison: the arms' FIDs, same step, and same FLOPs where the budget arm ran."""
    out = {"seeds": seeds or results["settings"]["seeds"], "parameters": arm_row(results, ntp).get("parameters"),
           "fid": {arm: values(results, arm, "fid", seeds) for arm in (ntp, npp_arm, budget) if arm},
           "same_step": versus(results, npp_arm, ntp, seeds)}
    if budget:
        out["same_flops"] = versus(results, npp_arm, budget, seeds)
    return out


# --------------------------------------------------------------------------------------------
# The four readings
# --------------------------------------------------------------------------------------------

def ladder(loaded: dict[StudySet, dict]) -> dict:
    """Same-step and same-FLOPs changes per size, and their trend on log10(parameters) over every seed."""
    rungs = [summary(loaded[s], "l2", "ntp", "ntp-l2-budget") | {"set": s.name} for s in LADDER]
    trends = {}
    for kind in ("same_step", "same_flops"):
        xs = [math.log10(r["parameters"]) for r in rungs for _ in r["seeds"]]
        ys = [d for r in rungs for d in r[kind]["fid_relative"].diffs]
        trends[kind] = trend(xs, ys)
    # The same line through the three sizes' means: three points, one degree of freedom, the honest width
    # of a size trend that rests on three sizes (the per-seed fit treats twelve seeds as twelve sizes' worth).
    means = trend([math.log10(r["parameters"]) for r in rungs],
                  [statistics.fmean(r["same_step"]["fid_relative"].diffs) for r in rungs])
    return {"rungs": rungs, "trend": trends, "trend_of_means": {"same_step": means}}


def correlation(results: dict, arm: str, against: str) -> float | None:
    """Pearson's r between the two arms' FIDs across seeds (None where an arm did not vary): pairing by seed
    sharpens a comparison only where it is positive."""
    a, b = values(results, arm, "fid"), values(results, against, "fid")
    if len(set(a)) < 2 or len(set(b)) < 2:
        return None
    return statistics.correlation(a, b)


def change_per_seed(before: dict, after: dict) -> dict[str, Paired]:
    """after − before of two summaries' same-step FID differences, seed by seed (a difference of differences)."""
    return {key: Paired(tuple(b - a for a, b in zip(before["same_step"][key].diffs, after["same_step"][key].diffs)))
            for key in ("fid", "fid_relative")}


def length(loaded: dict[StudySet, dict]) -> dict:
    """The same-step change at 1× and 4× the steps on the longer set's seeds, and 4× − 1× per seed."""
    seeds = loaded[LONGER]["settings"]["seeds"]
    short = summary(loaded[EIGHT_SEEDS], "l2", "ntp", seeds=seeds)
    long = summary(loaded[LONGER], "l2", "ntp")
    return {"1x": short, "4x": long, "4x_minus_1x": change_per_seed(short, long)}


def recipe(loaded: dict[StudySet, dict]) -> dict:
    """#L2's same-step change under the paper-shaped recipe and under ours, and their per-seed difference."""
    ours = summary(loaded[W96], "l2", "ntp")
    shaped = summary(loaded[PAPER_SHAPED], "l2-paper-shaped", "ntp-paper-shaped")
    ntp_change = paired(values(loaded[PAPER_SHAPED], "ntp-paper-shaped", "fid"), values(loaded[W96], "ntp", "fid"))
    return {"ours": ours, "paper_shaped": shaped, "paper_shaped_minus_ours": change_per_seed(ours, shaped),
            "ntp_paper_shaped_minus_ours": ntp_change}


def curve_fid(results: dict, arm: str, step: int) -> list[float]:
    """The periodic evaluation's FID of an arm's runs at `step`, in seed order."""
    found = []
    for seed in results["settings"]["seeds"]:
        run = next(r for key, r in results["runs"].items() if key.split("/")[1:] == [arm, str(seed)])
        found.append(next(point["fid"] for point in run["curve"] if point["step"] == step))
    return found


def patch_stage_end(results: dict) -> int:
    """The step at which the set's #L2 λ½ runs switch to next-token prediction."""
    steps = results["settings"]["steps"]
    return plan_stages(ScheduleConfig(total_steps=steps, levels=2, segment_factor=0.5))[-1].start


def preregistered(loaded: dict[StudySet, dict]) -> dict:
    """The primary endpoint (same-step FID at the end, 2,000 samples) and the exploratory curve (500 samples).

    A look at or before the end of #L2's patch stage samples, token by token, a model that has so far learned
    only patches: its FID (in the thousands) says nothing about the question, so such a look is shown marked
    and kept out of the family of comparisons."""
    results = loaded[PREREGISTERED]
    out = summary(results, "l2", "ntp")
    switch = patch_stage_end(results)
    out["curve"] = {step: {"fid": paired(curve_fid(results, "l2", step), curve_fid(results, "ntp", step)),
                           "fid_relative": relative(curve_fid(results, "l2", step), curve_fid(results, "ntp", step)),
                           "in_patch_stage": step <= switch}
                    for step in CURVE_STEPS}
    return out


def cost(loaded: dict[StudySet, dict]) -> list[dict]:
    """Each set's runs, the runs it adds to the sets before it, and those runs' training-process minutes."""
    seen: set[str] = set()
    out = []
    for s in SETS:
        if s not in loaded:
            out.append({"set": s.name, "command": s.command, "missing": True})
            continue
        runs = {r["name"]: r.get("wall_s") for r in loaded[s]["runs"].values()}
        added = [name for name in runs if name not in seen]
        seen.update(runs)
        walls = [runs[name] for name in added]
        out.append({"set": s.name, "command": s.command, "runs": len(runs), "adds": len(added),
                    "added_training_min": sum(walls) / 60 if all(walls) else None})
    return out


def family(found: dict, loaded: dict[StudySet, dict]) -> list[dict]:
    """Every paired FID comparison the results page shows, each once (the same seeds' differences are one
    test however many tables show them), with its raw p (Student's t) and its Holm-adjusted p over them all."""
    named: list[tuple[str, Paired]] = []
    for folder, results in found.get("earlier", {}).items():
        seeds = results["settings"]["seeds"]
        for c in results["comparisons"]:
            named.append((f"{Path(folder).name}, seeds {', '.join(map(str, seeds))}: {c['schedule']} − {c['against']}",
                          Paired(tuple(c["fid"]["diffs"]))))
    if DEFAULT in loaded:
        for c in loaded[DEFAULT]["comparisons"]:
            named.append((f"1.87M, 1,200 steps, seeds 0–2 (make reproduce): #L2 − {c['against']}",
                          Paired(tuple(c["fid"]["diffs"]))))
    for r in found.get("ladder", {}).get("rungs", []):
        named += [(f"{r['set']}, 1,200 steps: #L2 − NTP, same step", r["same_step"]["fid"]),
                  (f"{r['set']}, 1,200 steps: #L2 − NTP for its budget, same FLOPs", r["same_flops"]["fid"])]
    if "eight_seeds" in found:
        named.append(("0.49M, 1,200 steps, seeds 0–7: #L2 − NTP, same step", found["eight_seeds"]["same_step"]["fid"]))
    if "length" in found:
        g = found["length"]
        named += [("0.49M, 1,200 steps, seeds 0–5: #L2 − NTP, same step", g["1x"]["same_step"]["fid"]),
                  ("0.49M, 4,800 steps, seeds 0–5: #L2 − NTP, same step", g["4x"]["same_step"]["fid"]),
                  ("0.49M, seeds 0–5: (#L2 − NTP) at 4,800 − at 1,200 steps", g["4x_minus_1x"]["fid"])]
    if "recipe" in found:
        g = found["recipe"]
        named += [("0.49M, paper-shaped recipe: #L2 − NTP, same step", g["paper_shaped"]["same_step"]["fid"]),
                  ("0.49M: (#L2 − NTP) paper-shaped − ours", g["paper_shaped_minus_ours"]["fid"]),
                  ("0.49M: NTP paper-shaped − NTP ours", g["ntp_paper_shaped_minus_ours"])]
    if "preregistered" in found:
        g = found["preregistered"]
        named.append((f"{PRIMARY}: 0.49M, 9,600 steps, seeds 6–13: #L2 − NTP, same step",
                      g["same_step"]["fid"]))
        named += [(f"0.49M, seeds 6–13, exploratory look at step {step:,} (500 samples): #L2 − NTP",
                   g["curve"][step]["fid"]) for step in CURVE_STEPS[:-1] if not g["curve"][step]["in_patch_stage"]]
    once = list({p.diffs: (name, p) for name, p in reversed(named)}.values())[::-1]  # first name kept
    adjusted = holm([p.p_value for _, p in once])
    return [{"comparison": name, "paired": p, "p": p.p_value, "p_holm": q, "verdict": verdict(p, q)}
            for (name, p), q in zip(once, adjusted)]


def verdict(p: Paired, p_holm: float) -> str:
    """'better'/'worse' only when the comparison survives the page's Holm adjustment; 'suggestive' when only
    its own interval excludes zero."""
    if p_holm < 0.05:
        return "better" if p.mean < 0 else "worse"
    return "suggestive" if p.excludes_zero() else "not significant"


# --------------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------------

def as_json(value):
    """Paired and Trend results as dictionaries, everything else as it is."""
    if hasattr(value, "to_dict"):
        return value.to_dict()
    if isinstance(value, dict):
        return {str(k): as_json(v) for k, v in value.items()}
    if isinstance(value, list):
        return [as_json(v) for v in value]
    return value


def percent(x: float) -> str:
    """Whole percents, or one decimal where that would round a change to zero."""
    shown = f"{x:+.0%}"
    return f"{x:+.1%}" if shown in ("+0%", "-0%") else shown


def pct(p: Paired) -> str:
    low, high = p.interval
    return f"{percent(p.mean)} [{percent(low)}, {percent(high)}]"


def line(cells: list) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def comparison_cells(readings: dict, c: dict, kind: str = "same_step") -> list[str]:
    return [f"{c[kind]['fid'].shown()} ({judged(readings, c[kind]['fid'])})", pct(c[kind]["fid_relative"])]


def judged(readings: dict, p: Paired) -> str:
    """The comparison's reading after the page's Holm adjustment, with raw and adjusted p (`readings`: the
    family's entries by their differences)."""
    entry = readings.get(p.diffs)
    if entry is None:
        return p.verdict()
    return f"{entry['verdict']}; p {entry['p']:.2g}, Holm {entry['p_holm']:.2g}"


def domain_cells(c: dict) -> list[str]:
    return [c["same_step"][k].shown(2) for k in ("class_accuracy", "recall", "final_loss")]


def markdown(found: dict) -> str:
    readings = {entry["paired"].diffs: entry for entry in found.get("family", [])}
    lines = []
    if "ladder" in found:
        lines += ["**Scale ladder** (8×8 tokens, 1,200 steps of 32 images, the CPU recipe; #L2 λ½ − NTP, "
                  "paired by seed):", "", line(["parameters", "seeds", "NTP FID", "#L2 FID", "NTP-for-budget FID",
                            "same step: FID [95% CI], seeds lower", "relative", "same FLOPs: FID [95% CI], seeds lower",
                            "relative", "class acc. (same step)", "recall (same step)", "final loss (same step)"]),
                  line(["---"] * 12)]
        for r in found["ladder"]["rungs"]:
            lines.append(line([f"{r['parameters'] / 1e6:.2f}M", len(r["seeds"]),
                               *(spread(r["fid"][a]) for a in r["fid"]), *comparison_cells(readings, r),
                               *comparison_cells(readings, r, "same_flops"), *domain_cells(r)]))
        for kind, label in (("same_step", "same step"), ("same_flops", "same FLOPs")):
            t = found["ladder"]["trend"][kind]
            low, high = t.interval
            lines.append(f"\nTrend, {label}: the relative FID change moves by {100 * t.slope:+.0f} percentage points "
                         f"per 10× parameters [{100 * low:+.0f}, {100 * high:+.0f}] (least squares over all {t.n} "
                         f"seeds' points against log10 parameters, Student's t with {t.n - 2} degrees of freedom).")
        means = found["ladder"]["trend_of_means"]["same_step"]
        low, high = means.interval
        lines.append(f"\nThe same-step trend through the {means.n} sizes' means instead: {100 * means.slope:+.0f} "
                     f"percentage points per 10× parameters [{100 * low:+.0f}, {100 * high:+.0f}] ({means.n - 2} "
                     "degree(s) of freedom). Size is also confounded with training progress: every size trains the "
                     "same 1,200 steps, and a larger model is further along its curve by then.")
    if "eight_seeds" in found:
        e = found["eight_seeds"]
        lines += ["", "**Eight seeds** (0.49M, 1,200 steps):", "",
                  line(["seeds", "NTP FID", "#L2 FID", "same step: FID [95% CI], seeds lower", "relative",
                        "class acc.", "recall", "final loss"]), line(["---"] * 8),
                  line([len(e["seeds"]), *(spread(v) for v in e["fid"].values()), *comparison_cells(readings, e),
                        *domain_cells(e)]),
                  "", correlation_sentence(e["fid_correlation"])]
    if "length" in found:
        g = found["length"]
        lines += ["", f"**Training length** (0.49M, seeds {', '.join(map(str, g['4x']['seeds']))}; same step):", "",
                  line(["steps", "NTP FID", "#L2 FID", "#L2 − NTP: FID [95% CI], seeds lower", "relative",
                        "class acc.", "recall", "final loss"]),
                  line(["---"] * 8)]
        for key, steps in (("1x", "1,200"), ("4x", "4,800")):
            lines.append(line([steps, *(spread(v) for v in g[key]["fid"].values()), *comparison_cells(readings, g[key]),
                               *domain_cells(g[key])]))
        change = g["4x_minus_1x"]
        lines.append(line(["4× − 1×", "", "", change["fid"].shown(), pct(change["fid_relative"]), "", "", ""]))
    if "recipe" in found:
        g = found["recipe"]
        lines += ["", "**Recipe** (0.49M, 1,200 steps, seeds 0–3; same step):", "",
                  line(["recipe", "NTP FID", "#L2 FID", "#L2 − NTP: FID [95% CI], seeds lower", "relative"]),
                  line(["---"] * 5)]
        for key, name in (("ours", "ours (CPU)"), ("paper_shaped", "paper-shaped")):
            lines.append(line([name, *(spread(v) for v in g[key]["fid"].values()), *comparison_cells(readings, g[key])]))
        change = g["paper_shaped_minus_ours"]
        lines.append(line(["paper-shaped − ours", g["ntp_paper_shaped_minus_ours"].shown(), "", change["fid"].shown(),
                           pct(change["fid_relative"])]))
    if "preregistered" in found:
        g = found["preregistered"]
        primary = g["same_step"]["fid"]
        lines += ["", "**Preregistered** (0.49M, 9,600 steps of 32 images, seeds 6–13; "
                  "docs/results/study/w96-9600-steps/preregistration.md): primary endpoint, #L2 λ½ − NTP at the "
                  "same step, 2,000 samples:", "",
                  line(["NTP FID", "#L2 FID", "#L2 − NTP: FID [95% CI], seeds lower", "relative", "t-test p",
                        "sign test p", "Wilcoxon p", "class acc.", "recall", "final loss"]), line(["---"] * 10),
                  line([*(spread(v) for v in g["fid"].values()), primary.shown(), pct(g["same_step"]["fid_relative"]),
                        f"{primary.p_value:.2g}", f"{primary.sign_p:.2g}", f"{primary.wilcoxon_p:.2g}",
                        *domain_cells(g)]),
                  "", "Exploratory (periodic evaluations of the same runs, 500 samples each; not part of the decision):",
                  "", line(["step", "× default length", "#L2 − NTP: FID [95% CI], seeds lower", "relative"]),
                  line(["---"] * 4)]
        for step in CURVE_STEPS:
            point = g["curve"][step]
            stage = " (#L2 still in its patch stage: not a comparison)" if point["in_patch_stage"] else ""
            lines.append(line([f"{step:,}{stage}", f"{step // 1200}×", point["fid"].shown(),
                               pct(point["fid_relative"])]))
    if found.get("family"):
        lines += ["", f"**Every FID comparison on the page** ({len(found['family'])}, each once; Holm's adjustment "
                  "over all of them):", "", line(["comparison", "FID difference [95% CI], seeds lower", "p (t-test)",
                                                  "p (Holm)", "reading"]), line(["---"] * 5)]
        lines += [line([e["comparison"], e["paired"].shown(), f"{e['p']:.2g}", f"{e['p_holm']:.2g}", e["verdict"]])
                  for e in found["family"]]
    lines += ["", "**The sets and their cost** (training processes of the runs each set adds; final evaluations "
              "excluded):", "", line(["set", "command", "runs", "adds", "training (min)"]), line(["---"] * 5)]
    for c in found["cost"]:
        if c.get("missing"):
            lines.append(line([c["set"], f"`{c['command']}`", "missing", "", ""]))
        else:
            minutes = "—" if c["added_training_min"] is None else f"{c['added_training_min']:.0f}"
            lines.append(line([c["set"], f"`{c['command']}`", c["runs"], c["adds"], minutes]))
    lines += ["", "Differences are paired by seed (same initial weights and data order), NPP minus NTP: negative FID "
              "differences favour NPP. Intervals: Student's t at 95% over the seeds; \"seeds lower\" counts the seeds "
              "where the first run's value was lower. Readings: better/worse only when the Holm-adjusted p over the "
              "page's family is below 0.05; \"suggestive\" when the comparison's own interval excludes zero but it "
              "does not survive the adjustment. Same FLOPs: against NTP trained for as many FLOPs as the #L2 run "
              "(0.625× the steps, its own warm-up and decay). Relative: the change as a fraction of the baseline's "
              "FID. Domain metrics on 2,000 samples against the 10,000 test digits (MNIST classifier features), "
              "the same sampling seeds for every run."]
    return "\n".join(lines)


PRIMARY = "PREREGISTERED primary"


def summary_markdown(found: dict) -> str:
    """The README's one-screen summary: the comparisons that survive the page's Holm adjustment, the
    preregistered set's outcome in the words its preregistration fixed, and how many comparisons did not
    survive. Generated, so it cannot drift from the recorded numbers."""
    family = found.get("family", [])
    decided = [e for e in family if e["verdict"] in ("better", "worse") and not e["comparison"].startswith(PRIMARY)]
    lines = [line(["comparison (#L2 λ½ − NTP unless named)", "FID difference [95% CI], seeds lower", "p (Holm)",
                   "reading"]), line(["---"] * 4)]
    lines += [line([e["comparison"], e["paired"].shown(), f"{e['p_holm']:.2g}", e["verdict"]]) for e in decided]
    primary = found.get("preregistered", {}).get("same_step", {}).get("fid")
    if primary is not None:
        lines.append(line(["**preregistered**: 0.49M, 9,600 steps, seeds 6–13, same step", primary.shown(),
                           f"{primary.p_value:.2g} (its own test)", preregistered_reading(primary)]))
    lines += ["", f"Decided: {len(decided)} of the {len(family)} paired FID comparisons on the results page survive "
              f"Holm's adjustment (p below 0.05 over all {len(family)}); the other {len(family) - len(decided)} are "
              "suggestive or not significant, with their intervals in docs/results/README.md. The decided ones: domain "
              "FID (MNIST classifier features), 2,000 samples per run, one thread per run."]
    if primary is None:
        lines.append("The preregistered decisive set (0.49M, NTP against #L2 λ½ at 9,600 steps, seeds 6–13; "
                     "docs/results/study/w96-9600-steps/preregistration.md) has not finished: not measured yet.")
    else:
        relative_to_ntp = found["preregistered"]["same_step"]["fid_relative"]
        lines.append(f"Preregistered (0.49M, 9,600 steps, eight seeds): {preregistered_sentence(primary, relative_to_ntp)}")
    return "\n".join(lines)


def preregistered_reading(p: Paired) -> str:
    low, high = p.interval
    return "better" if high < 0 else "worse" if low > 0 else "not significant"


def preregistered_sentence(p: Paired, relative_to_ntp: Paired) -> str:
    """The decision rule's sentence for the outcome, with what the rule reports whatever the outcome: the
    difference relative to NTP's FID, the sign count and the rank-based tests
    (docs/results/study/w96-9600-steps/preregistration.md)."""
    low, high = p.interval
    reading = preregistered_reading(p)
    lower = sum(d < 0 for d in p.diffs)
    always = (f" Relative to NTP's FID: {pct(relative_to_ntp)}; #L2 lower on {lower} of {len(p.diffs)} seeds "
              f"(sign test p = {p.sign_p:.2g}, Wilcoxon p = {p.wilcoxon_p:.2g}).")
    if reading == "better":
        weaker = max(p.sign_p, p.wilcoxon_p)
        tail = "" if weaker < 0.05 else " The rank-based tests are weaker."
        return ("#L2 λ½ reaches a lower FID than NTP at the same step: the paper's same-step direction holds on "
                f"our data once NTP is trained for about five epochs ({p.shown()}).{tail}{always}")
    if reading == "worse":
        return ("#L2 λ½ is worse than NTP at the same step: on our data the paper's same-step gain does not appear "
                f"even after about five epochs ({p.shown()}); the 4× result is not confirmed.{always}")
    return (f"the same-step difference is not significant: mean {p.mean:+.3g} FID [{low:+.3g}, {high:+.3g}] (t-test "
            f"p = {p.p_value:.2g}), the range of effects the data leave open; the 4× result is not confirmed."
            f"{always}")


def quickstart_draws(found: dict, loaded: dict[StudySet, dict]) -> list[dict]:
    """Every recorded 2,000-sample evaluation of the quickstart's recipe (1.87M, 1,200 steps, NTP and #L2 λ½
    on one seed), each run once: the earlier two-thread set's seeds, then the one-thread sets'."""
    sources = [(found.get("earlier", {}).get(EARLIER[0]), "two threads")]
    sources += [(loaded.get(s), "one thread") for s in (DEFAULT, W192)]
    draws, seen = [], set()
    for results, threads in sources:
        if results is None:
            continue
        for seed in results["settings"]["seeds"]:
            runs = {arm: next(r for key, r in results["runs"].items() if key.split("/")[1:] == [arm, str(seed)])
                    for arm in ("ntp", "l2")}
            key = (threads, seed)
            if key not in seen:
                seen.add(key)
                draws.append({"seed": seed, "threads": threads, "ntp": runs["ntp"]["final"]["fid"],
                              "npp": runs["l2"]["final"]["fid"]})
    return draws


def draws_markdown(draws: list[dict]) -> str:
    """The README quickstart's sentence on what one draw is worth, generated from the recorded draws."""
    if not draws:
        return "No 2,000-sample draw of the quickstart's recipe is recorded here."
    gaps = [d["npp"] - d["ntp"] for d in draws]
    ntp, npp = [d["ntp"] for d in draws], [d["npp"] for d in draws]
    groups = [f"seeds {', '.join(str(d['seed']) for d in draws if d['threads'] == threads)} with {threads} per run"
              for threads in ("two threads", "one thread") if any(d["threads"] == threads for d in draws)]
    return (f"Over the {len(draws)} recorded 2,000-sample draws of this recipe ({'; '.join(groups)}), NTP scored "
            f"{min(ntp):.1f}–{max(ntp):.1f} and NPP {min(npp):.1f}–{max(npp):.1f}; NPP − NTP ranged from "
            f"{min(gaps):+.1f} to {max(gaps):+.1f}, NPP worse on {sum(g > 0 for g in gaps)} of {len(draws)}.")


def correlation_sentence(r: float | None) -> str:
    if r is None:
        return "Across the eight seeds one arm's FID did not vary: no correlation to report."
    shared = ("a seed that is good for one arm is good for the other, which pairing by seed removes" if r > 0 else
              "a seed that is good for one arm is not good for the other, so pairing by seed removes no shared seed "
              "effect here; the paired test stays valid, it is just not sharper than an unpaired one")
    return f"Across the eight seeds NTP's and #L2's FIDs are correlated at r = {r:+.2f} (Pearson): {shared}."


def ladder_figure(found: dict) -> go.Figure:
    """The relative FID change of #L2 against parameter count, same step and same FLOPs, with 95% intervals."""
    rungs = found["ladder"]["rungs"]
    fig = go.Figure()
    for key, label, color in (("same_step", "same step", viz.PALETTE[1]),
                              ("same_flops", "same FLOPs (NTP trained for #L2's budget)", viz.PALETTE[2])):
        points = [r[key]["fid_relative"] for r in rungs]
        fig.add_trace(go.Scatter(
            x=[r["parameters"] for r in rungs], y=[100 * p.mean for p in points], mode="lines+markers", name=label,
            line={"color": color}, error_y={"type": "data", "symmetric": False,
                                           "array": [100 * (p.interval[1] - p.mean) for p in points],
                                           "arrayminus": [100 * (p.mean - p.interval[0]) for p in points]},
            hovertext=[f"{r['set']}, {len(r['seeds'])} seeds" for r in rungs]))
    fig.add_hline(y=0, line={"color": "grey", "dash": "dot"})
    fig.update_layout(title="NPP #L2 λ½ against NTP by model size (8×8 tokens, 1,200 steps, 4 seeds each)",
                      xaxis={"title": "parameters", "type": "log", "tickvals": [r["parameters"] for r in rungs],
                             "ticktext": [f"{r['parameters'] / 1e6:.2f}M" for r in rungs]},
                      yaxis={"title": "FID change, % of NTP's (negative: NPP better), 95% CI"},
                      template="plotly_white", legend={"orientation": "h", "y": -0.25}, height=480)
    return fig


def gather(root: Path) -> dict:
    """Every reading whose sets are all there, the sets' own numbers, and the cost table."""
    loaded = {s: r for s in SETS if (r := s.load(root)) is not None}
    found: dict = {"sets": [{"name": s.name, "command": s.command, "out": s.out, "missing": s not in loaded,
                             "rows": loaded[s]["rows"] if s in loaded else None} for s in SETS]}
    for key, needs, read in (("ladder", LADDER, ladder), ("eight_seeds", (EIGHT_SEEDS,), None),
                             ("length", (EIGHT_SEEDS, LONGER), length), ("recipe", (W96, PAPER_SHAPED), recipe),
                             ("preregistered", (PREREGISTERED,), preregistered)):
        if all(s in loaded for s in needs):
            found[key] = read(loaded) if read else summary(loaded[EIGHT_SEEDS], "l2", "ntp")
    if "eight_seeds" in found:
        found["eight_seeds"]["fid_correlation"] = correlation(loaded[EIGHT_SEEDS], "l2", "ntp")
    found["earlier"] = {folder: json.loads((root / folder / "results.json").read_text()) for folder in EARLIER
                        if (root / folder / "results.json").is_file()}
    found["family"] = family(found, loaded)
    found["quickstart_draws"] = quickstart_draws(found, loaded)
    found["cost"] = cost(loaded)
    return found


PAGE_BLOCKS = {"README.md": {"draws": "draws.md", "summary": "summary.md"},
               str(RESULTS_PAGE.relative_to(ROOT)): {"summary": "summary.md", "study": "results.md"}}
"""The generated blocks (<!-- results:NAME:begin --> … end) of each page under --root, and the study file each
shows. A root without the pages (a copy of the results folders alone) gets the study folder only."""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=ROOT, help="where the sets' results folders are")
    parser.add_argument("--no-pages", action="store_true",
                        help="write the study folder only, not its blocks in README.md and docs/results/README.md "
                             "under --root")
    args = parser.parse_args()
    found = gather(args.root)
    out = args.root / STUDY_DIR
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(as_json(found), indent=1))
    table = markdown(found)
    (out / "results.md").write_text(table + "\n")
    (out / "summary.md").write_text(summary_markdown(found) + "\n")
    (out / "draws.md").write_text(draws_markdown(found["quickstart_draws"]) + "\n")
    if "ladder" in found:
        fig = ladder_figure(found)
        fig.write_html(out / "scale_ladder.html", include_plotlyjs="cdn", div_id="scale_ladder")  # reruns diff clean
        viz.save_figure_png(fig, out / "scale_ladder.png", width=900, height=480)
    if not args.no_pages:
        for page, blocks in PAGE_BLOCKS.items():
            for block, name in blocks.items() if (args.root / page).is_file() else ():
                update_readme((out / name).read_text().rstrip("\n"), block, args.root / page)
    print(table)


if __name__ == "__main__":
    main()
