"""benchmarks/study.py on made-up results folders with known answers: the ladder's trend, the length and
recipe readings, the cost of each set, and a set written by other settings treated as missing."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

import study

ROOT = Path(__file__).resolve().parents[1]


def write_set(root: Path, s: "study.StudySet", arms: dict[str, dict[str, list[float]]], parameters: int,
              wall_s: float = 60.0, curves: dict[str, dict[int, list[float]]] | None = None) -> None:
    """A results.json as reproduce.py writes it, with the given per-seed numbers for each arm (and the
    periodic evaluations' FIDs by arm and step, one per seed, where `curves` gives them)."""
    seeds = s.settings()["seeds"]
    rows = [{"arm": arm, "parameters": parameters, **numbers} for arm, numbers in arms.items()]
    runs = {f"mnist-8x8/{arm}/{seed}": {"name": f"{s.out}-{arm}-s{seed}", "wall_s": wall_s,
                                        "final": {"fid": arms[arm]["fid"][i]},
                                        "curve": [{"step": step, "fid": fids[i]}
                                                  for step, fids in (curves or {}).get(arm, {}).items()]}
            for arm in arms for i, seed in enumerate(seeds)}
    folder = root / s.out
    folder.mkdir(parents=True)
    (folder / "results.json").write_text(json.dumps({"command": s.command, "settings": s.settings(), "rows": rows,
                                                     "runs": runs}))


def arm(fid: list[float]) -> dict[str, list[float]]:
    n = len(fid)
    return {"fid": fid, "class_accuracy": [0.8] * n, "recall": [0.8] * n, "final_loss": [2.0] * n}


@pytest.fixture
def root(tmp_path):
    # Relative same-step changes −10%, −20%, −30% at 0.21M, 0.49M, 1.87M (every seed alike but one, so the
    # trend has a spread to measure), same FLOPs −50% everywhere.
    for s, params, gain in ((study.W48, 209_856, -0.1), (study.W96, 493_440, -0.2), (study.W192, 1_871_616, -0.3)):
        seeds = len(s.settings()["seeds"])
        npp = [100 * (1 + gain)] * seeds
        npp[0] += 2.0
        arms = {"ntp": arm([100.0] * seeds), "l2": arm(npp), "ntp-l2-budget": arm([2 * x for x in npp])}
        write_set(tmp_path, s, arms, params)
    write_set(tmp_path, study.EIGHT_SEEDS, {"ntp": arm([100.0] * 8), "l2": arm([90.0, 95.0, 85.0, 100.0] * 2)},
              493_440)
    # 4× the steps: NTP 50, #L2 as below, against the 8-seed set's 1× seeds 0–5 (90, 95, 85, 100, 90, 95 of 100).
    write_set(tmp_path, study.LONGER, {"ntp": arm([50.0] * 6), "l2": arm([40.0, 45.0, 35.0, 45.0, 50.0, 35.0])},
              493_440)
    write_set(tmp_path, study.PAPER_SHAPED, {"ntp-paper-shaped": arm([110.0] * 4),
                                             "l2-paper-shaped": arm([99.0, 99.0, 99.0, 99.0])}, 493_440)
    return tmp_path


def test_the_readings_pair_by_seed_and_fit_the_trend_over_every_seed(root):
    found = study.gather(root)
    rungs = found["ladder"]["rungs"]
    assert [r["parameters"] for r in rungs] == [209_856, 493_440, 1_871_616]
    assert rungs[1]["same_step"]["fid"].diffs == (-18.0, -20.0, -20.0, -20.0)
    assert rungs[1]["same_flops"]["fid_relative"].diffs == pytest.approx((-0.5,) * 4)
    # Twelve points, x = log10(parameters); y = −0.1, −0.2, −0.3 per size plus +0.02 on each seed 0.
    xs = [math.log10(p) for p in (209_856, 493_440, 1_871_616) for _ in range(4)]
    ys = [g + (0.02 if i == 0 else 0.0) for g in (-0.1, -0.2, -0.3) for i in range(4)]
    mx, my = sum(xs) / 12, sum(ys) / 12
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    same_step = found["ladder"]["trend"]["same_step"]
    assert same_step.n == 12 and same_step.slope == pytest.approx(slope) and same_step.interval[1] < 0
    assert found["ladder"]["trend"]["same_flops"].slope == pytest.approx(0.0, abs=1e-12)

    assert found["eight_seeds"]["same_step"]["fid"].diffs == (-10.0, -5.0, -15.0, 0.0) * 2
    length = found["length"]
    assert length["1x"]["same_step"]["fid"].diffs == (-10.0, -5.0, -15.0, 0.0, -10.0, -5.0)  # from the 8 seeds
    assert length["4x_minus_1x"]["fid"].diffs == (0.0, 0.0, 0.0, -5.0, 10.0, -10.0)  # (−10 − (−10), …)
    assert length["4x_minus_1x"]["fid_relative"].diffs == pytest.approx((-0.1, -0.05, -0.15, -0.1, 0.1, -0.25))
    recipe = found["recipe"]
    assert recipe["paper_shaped_minus_ours"]["fid"].diffs == (7.0, 9.0, 9.0, 9.0)  # −11 − (−18), −11 − (−20), …
    assert recipe["ntp_paper_shaped_minus_ours"].diffs == (10.0,) * 4

    table = study.markdown(found)
    # Holm over the family's 13 comparisons (its arithmetic is checked against analysis.holm below)
    assert len(found["family"]) == 13
    assert ("| 0.49M | 4 | 100 ± 0 | 80.5 ± 1 | 161 ± 2 | -19.5 [-21.1, -17.9], 4 of 4 lower "
            "(better; p 3.7e-05, Holm 0.00026) |") in table
    assert "| 4× − 1× |  |  | -0.833 [" in table
    # A bound that whole percents would show as "-0%" keeps its sign and size.
    assert (study.percent(-0.004), study.percent(-0.13), study.percent(0.0004)) == ("-0.4%", "-13%", "+0.0%")


def test_each_set_costs_the_runs_it_adds_and_a_set_of_other_settings_is_missing(root):
    cost = {c["set"]: c for c in study.gather(root)["cost"]}
    assert cost[study.DEFAULT.name]["missing"]  # make reproduce's folder was not written here
    assert (cost[study.W96.name]["runs"], cost[study.W96.name]["adds"]) == (12, 12)
    # The 8-seed set writes its own run names in this made-up root, so all 16 are new; minutes follow.
    assert cost[study.EIGHT_SEEDS.name]["added_training_min"] == pytest.approx(16.0)

    # The 8-seed folder rewritten by a 3-seed command no longer counts as the 8-seed set.
    path = root / study.EIGHT_SEEDS.out / "results.json"
    recorded = json.loads(path.read_text())
    recorded["settings"]["seeds"] = [0, 1, 2]
    path.write_text(json.dumps(recorded))
    found = study.gather(root)
    assert "eight_seeds" not in found and "ladder" in found
    assert f"| {study.EIGHT_SEEDS.name} | `{study.EIGHT_SEEDS.command}` | missing |" in study.markdown(found)


def test_the_script_writes_its_tables_and_the_ladder_plot_and_fills_the_pages_blocks(root):
    page = "intro\n<!-- results:draws:begin -->\nold\n<!-- results:draws:end -->\nmiddle\n" \
           "<!-- results:summary:begin -->\nold\n<!-- results:summary:end -->\nend\n"
    (root / "README.md").write_text(page)
    done = subprocess.run([sys.executable, "benchmarks/study.py", "--root", str(root)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    out = root / study.STUDY_DIR
    written = json.loads((out / "results.json").read_text())
    assert written["ladder"]["trend"]["same_step"]["points"] == 12
    assert written["sets"][2]["rows"][0]["fid"] == [100.0] * 4  # every run's per-seed numbers kept
    assert "Scale ladder" in (out / "results.md").read_text()
    # A fixed element id, not plotly's random one, so that rerunning the script leaves the file unchanged.
    assert 'id="scale_ladder"' in (out / "scale_ladder.html").read_text()
    filled = (root / "README.md").read_text()  # the root's own README; it has no results page: none is written
    assert filled.startswith("intro\n") and "\nmiddle\n" in filled and filled.endswith("end\n") and "old" not in filled
    for block, name in (("draws", "draws.md"), ("summary", "summary.md")):
        shown = filled.split(f"<!-- results:{block}:begin -->\n")[1].split(f"\n<!-- results:{block}:end -->")[0]
        assert shown == (out / name).read_text().rstrip("\n")
    assert not (root / "docs" / "results" / "README.md").exists()


def test_every_study_command_is_a_valid_reproduce_command_with_its_own_folder():
    outs = [s.out for s in study.SETS]
    assert len(set(outs)) == len(outs)
    for s in study.SETS:
        assert s.settings()["seeds"]  # parses with reproduce.py's own parser


def test_the_preregistered_set_reads_its_primary_endpoint_and_its_exploratory_curve(root):
    # NTP 100 on every seed; #L2 lower by 1 … 8 at the end except seed 13 (+4): 7 of 8 lower.
    end = [99.0, 98.0, 97.0, 96.0, 95.0, 94.0, 93.0, 104.0]
    curves = {"ntp": {step: [100.0] * 8 for step in study.CURVE_STEPS},
              "l2": {1200: [130.0] * 8, 2400: [110.0] * 8, 4800: [100.0 + i for i in range(8)], 9600: end}}
    write_set(root, study.PREREGISTERED, {"ntp": arm([100.0] * 8), "l2": arm(end)}, 493_440, curves=curves)
    found = study.gather(root)
    primary = found["preregistered"]["same_step"]["fid"]
    assert primary.diffs == (-1.0, -2.0, -3.0, -4.0, -5.0, -6.0, -7.0, 4.0) and primary.below == 7
    # sign test 7 of 8: 2 · (1 + 8) / 256; Wilcoxon: the positive difference (4) shares rank 4.5 with −4,
    # W+ = 4.5, and 2 · P(W+ ≤ 4.5) over the 256 sign patterns of ranks 1, 2, 3, 4.5, 4.5, 6, 7, 8
    assert primary.sign_p == pytest.approx(18 / 256)
    ranks = [1, 2, 3, 4.5, 4.5, 6, 7, 8]
    import itertools
    below = sum(sum(r for r, up in zip(ranks, signs) if up) <= 4.5 for signs in itertools.product((0, 1), repeat=8))
    assert primary.wilcoxon_p == pytest.approx(2 * below / 256)
    curve = found["preregistered"]["curve"]
    assert curve[1200]["fid"].diffs == (30.0,) * 8 and curve[4800]["fid"].diffs == tuple(float(i) for i in range(8))
    assert curve[9600]["fid"].diffs == primary.diffs  # here the made-up periodic look equals the final one
    table = study.markdown(found)
    # 9,600 steps: #L2 switches to next-token prediction at 4,800, so the looks up to there sample a patch model
    assert [step for step, point in curve.items() if point["in_patch_stage"]] == [1200, 2400, 4800]
    assert "**Preregistered**" in table and ("| 2,400 (#L2 still in its patch stage: not a comparison) | 2× | "
                                             "+10 [+10, +10], 0 of 8 lower | +10% [+10%, +10%] |") in table
    names = [e["comparison"] for e in found["family"]]
    assert sum("PREREGISTERED primary" in n for n in names) == 1
    # the patch-stage looks are no comparison, and the 9,600-step look has the primary's differences: one test,
    # listed once, under the primary's name
    assert not any("exploratory look" in n for n in names)


def test_the_family_counts_each_comparison_once_and_only_holm_survivors_are_better_or_worse(root):
    found = study.gather(root)
    family = found["family"]
    diffs = [e["paired"].diffs for e in family]
    assert len(diffs) == len(set(diffs))
    # W96's same step is also the recipe reading's "ours": one entry, not two
    assert sum(d == found["ladder"]["rungs"][1]["same_step"]["fid"].diffs for d in diffs) == 1
    from analysis import holm

    assert [e["p_holm"] for e in family] == pytest.approx(holm([e["p"] for e in family]))
    for e in family:
        if e["p_holm"] < 0.05:
            assert e["verdict"] == ("better" if e["paired"].mean < 0 else "worse")
        else:
            assert e["verdict"] == ("suggestive" if e["paired"].excludes_zero() else "not significant")
    # the made-up length set's 4× comparison: interval excludes zero alone, not after the adjustment
    four = next(e for e in family if e["comparison"].startswith("0.49M, 4,800 steps"))
    assert four["paired"].excludes_zero() and four["p_holm"] >= 0.05 and four["verdict"] == "suggestive"


def test_the_summary_lists_only_holm_survivors_and_words_the_preregistered_outcome_by_its_rule(root):
    found = study.gather(root)
    summary = study.summary_markdown(found)
    decided = [e for e in found["family"] if e["verdict"] in ("better", "worse")]
    assert summary.count("\n| ") == 1 + len(decided)  # the rule line, then one row each
    assert "suggestive" not in summary.split("\n\n")[0]
    assert ("not measured yet" in summary) == ("preregistered" not in found)
    assert f"{len(decided)} of the {len(found['family'])} paired FID comparisons" in summary
    from analysis import Paired

    def sentence(diffs):  # relative to an NTP FID of 20 on every seed
        return study.preregistered_sentence(Paired(diffs), Paired(tuple(d / 20 for d in diffs)))

    lower = sentence((-1.0, -2.0, -3.0, -1.5, -2.5, -1.0, -2.0, -3.0))
    assert lower.startswith("#L2 λ½ reaches a lower FID than NTP at the same step")
    assert "weaker" not in lower and "lower on 8 of 8 seeds (sign test p = 0.0078" in lower
    mixed = sentence((-5.0, -6.0, -4.0, -5.5, -4.5, -6.5, -5.0, 1.0))  # t clears zero, the sign test (7 of 8) does not
    assert "rank-based tests are weaker" in mixed and "7 of 8 seeds (sign test p = 0.07" in mixed
    assert sentence((1.0, 2.0, 3.0, 1.5, 2.5, 1.0, 2.0, 3.0)).startswith("#L2 λ½ is worse")
    open_ = sentence((1.0, -1.0, 2.0, -2.0, 0.5, -0.5, 1.0, -1.0))
    assert open_.startswith("the same-step difference is not significant") and "not confirmed" in open_
    assert "Relative to NTP's FID: +0.0% [-6%, +6%]" in open_ and "lower on 4 of 8 seeds" in open_


def test_the_correlation_of_the_arms_across_seeds_is_reported_with_what_it_means_for_pairing():
    results = {"settings": {"seeds": [0, 1, 2, 3]},
               "rows": [{"arm": "ntp", "fid": [60.0, 70.0, 80.0, 90.0]}, {"arm": "l2", "fid": [95.0, 85.0, 75.0, 65.0]}]}
    assert study.correlation(results, "l2", "ntp") == pytest.approx(-1.0)
    assert "r = -1.00" in study.correlation_sentence(-1.0) and "not sharper" in study.correlation_sentence(-1.0)
    assert "removes" in study.correlation_sentence(0.5) and "not sharper" not in study.correlation_sentence(0.5)
    results["rows"][1]["fid"] = [50.0] * 4
    assert study.correlation(results, "l2", "ntp") is None


def test_the_quickstart_draws_sentence_is_generated_from_every_recorded_draw(root):
    found = study.gather(root)
    draws = found["quickstart_draws"]  # only the made-up 1.87M set here: NTP 100, #L2 72, 70, 70, 70
    assert [(d["seed"], d["threads"], d["ntp"], d["npp"]) for d in draws] == [
        (0, "one thread", 100.0, 72.0), (1, "one thread", 100.0, 70.0), (2, "one thread", 100.0, 70.0),
        (3, "one thread", 100.0, 70.0)]
    assert study.draws_markdown(draws) == (
        "Over the 4 recorded 2,000-sample draws of this recipe (seeds 0, 1, 2, 3 with one thread per run), NTP "
        "scored 100.0–100.0 and NPP 70.0–72.0; NPP − NTP ranged from -30.0 to -28.0, NPP worse on 0 of 4.")
