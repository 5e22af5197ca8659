"""benchmarks/reproduce.py: the comparison at matched points, and a small end-to-end reproduction."""

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def reproduce():
    """The script as a module (pytest puts benchmarks/ on the path, as running the script does)."""
    return importlib.import_module("reproduce")


def fake_run(flops: float, fid: float, loss: float, loop_s: float = 100.0, wall_s: float = 150.0) -> dict:
    final = {"fid": fid, "is": 2.0, "precision": 0.5, "recall": 0.5, "class_accuracy": 0.9}
    return {"flops": flops, "final": final, "final_loss": loss, "curve": [{"step": 10, "flops": flops, **final}],
            "loop_s": loop_s, "wall_s": wall_s}


def test_npp_is_paired_with_ntp_by_seed_at_the_same_step_and_the_same_flops(reproduce):
    # Three seeds; #L2 costs 0.625 of NTP, and the budget arm trains as many FLOPs as #L2.
    ntp = [fake_run(160e12, f, 1.0, loop_s=120.0) for f in (50.0, 60.0, 70.0)]
    l2 = [fake_run(100e12, f, 1.2, loop_s=76.8) for f in (40.0, 55.0, 61.0)]  # NTP − 10, − 5, − 9
    budget = [fake_run(100e12, f, 1.1) for f in (45.0, 56.0, 64.0)]  # #L2 − 5, − 1, − 3
    runs = {("d", arm, seed): group[seed] for arm, group in (("ntp", ntp), ("l2", l2), ("ntp-l2-budget", budget))
            for seed in range(3)}
    rows = reproduce.compare(runs, ["d"], ["l2", "ntp-l2-budget"], [0, 1, 2])
    assert [r["arm"] for r in rows] == ["ntp", "l2", "ntp-l2-budget"]
    assert rows[1]["flops_ratio"] == [pytest.approx(0.625)] * 3 and rows[1]["wall_ratio"] == [pytest.approx(0.64)] * 3
    same_step, same_flops = reproduce.comparisons(rows)
    assert (same_step["kind"], same_step["against"]) == ("same step", "NTP")
    assert same_step["fid"]["diffs"] == [-10.0, -5.0, -9.0] and same_step["fid"]["seeds_lower"] == 3
    # mean −8, sd 2.6458, t(0.975, 2) = 4.3027: −8 ± 6.5725
    assert same_step["fid"]["ci95"] == pytest.approx([-14.5725, -1.4275], rel=1e-4)
    assert same_step["final_loss"]["diffs"] == [pytest.approx(0.2)] * 3
    assert same_flops["kind"] == "same FLOPs" and same_flops["fid"]["diffs"] == [-5.0, -1.0, -3.0]
    table = reproduce.markdown(rows, "header")
    assert "| d | NPP #L2 λ½ | NTP (same step) | 3 | -8 [-14.6, -1.43], 3 of 3 lower | better |" in table
    assert "| d | NPP #L2 λ½ | NTP for #L2 λ½'s budget (0.625× steps) (same FLOPs) | 3 | -3 [-7.97, +1.97], 3 of 3 " \
           "lower | not significant |" in table
    # cost table: TFLOP, loop minutes, whole-run minutes, ratios
    assert "| d | NTP | 160 ± 0 | 2 ± 0 | 2.5 ± 0 | 1 ± 0 | 1 ± 0 |" in table


def test_an_npp_arm_without_its_budget_arm_is_compared_at_the_same_step_only(reproduce):
    runs = {("d", "ntp", 0): fake_run(160e12, 50.0, 1.0), ("d", "l2", 0): fake_run(100e12, 40.0, 1.2)}
    rows = reproduce.compare(runs, ["d"], ["l2"], [0])
    assert [c["kind"] for c in reproduce.comparisons(rows)] == ["same step"]
    assert "| d | NPP #L2 λ½ | NTP (same step) | 1 | -10 (1 seed) | not significant |" in reproduce.markdown(rows, "")


def test_a_results_folder_of_another_set_is_not_overwritten(tmp_path):
    # docs/results/mnist-8x8 holds the default set; a smaller model's set sent there by mistake must stop
    # before it trains anything, and say how to give it a folder of its own.
    out = tmp_path / "mnist-8x8"
    out.mkdir()
    recorded = {"command": "python benchmarks/reproduce.py", "settings": {"seeds": [0, 1, 2], "width": None}}
    (out / "results.json").write_text(json.dumps(recorded))
    runs = tmp_path / "runs"
    result = subprocess.run([sys.executable, "benchmarks/reproduce.py", "--width", "96", "--seeds", "0",
                             "--runs-dir", str(runs), "--out", str(out)], cwd=ROOT, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode != 0
    assert result.stderr.strip().splitlines()[-1] == (
        f"{out} holds the results of `python benchmarks/reproduce.py`: give this set its own folder with --out, "
        f"or delete {out} to replace them")
    assert not runs.exists() and json.loads((out / "results.json").read_text()) == recorded


@pytest.mark.heavy
def test_a_small_reproduction_writes_tables_and_plots_and_reuses_its_runs(tmp_path):
    out = tmp_path / "out"
    command = [sys.executable, "benchmarks/reproduce.py", "--data", "mnist-8x8", "--seeds", "0", "--schedules", "l2",
               "--model", "debug", "--steps", "20", "--eval-every", "10", "--eval-samples", "20",
               "--final-samples", "30", "--runs-dir", str(tmp_path / "runs"), "--out", str(out)]
    environment = {**os.environ, "NPP_CACHE": str(tmp_path / "cache")}
    result = subprocess.run(command, cwd=ROOT, env=environment, capture_output=True, text=True, timeout=1800)
    assert result.returncode == 0, result.stderr[-3000:]
    first = json.loads((out / "results.json").read_text())
    rows = first["rows"]
    assert first["settings"]["seeds"] == [0] and first["settings"]["model"] == "debug"
    assert [r["schedule"] for r in rows] == ["NTP", "NPP #L2 λ½"] and rows[0]["parameters"] > 0
    assert [c["kind"] for c in first["comparisons"]] == ["same step"]
    assert rows[1]["flops_ratio"][0] < 0.7 and len(rows[1]["wall_s"]) == 1
    finals = sorted((tmp_path / "runs").glob("*/eval/n30-*/results.json"))
    assert len(finals) == 2  # each finished run evaluated on --final-samples
    assert rows[1]["fid"] == [json.loads(finals[0 if "l2" in finals[0].parent.parent.parent.name else 1]
                                         .read_text())["metrics"]["fid"]]
    assert {p.name for p in out.iterdir()} >= {"results.md", "fid_vs_step.png", "fid_vs_flops.png"}
    assert "Training cost per run" in (out / "results.md").read_text()
    assert 'id="fid_vs_step"' in (out / "fid_vs_step.html").read_text()  # fixed id: reruns diff clean

    exports = sorted((tmp_path / "runs").glob("*/export/model.safetensors"))
    stamps = [p.stat().st_mtime_ns for p in exports]
    again = subprocess.run(command, cwd=ROOT, env=environment, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "npp train:" not in again.stdout + again.stderr  # nothing retrained
    assert [p.stat().st_mtime_ns for p in exports] == stamps
    assert json.loads((out / "results.json").read_text())["rows"] == rows  # wall times kept with the runs


def test_a_recipe_arm_is_compared_with_ntp_under_the_same_recipe(reproduce):
    # The paper-shaped set runs no plain NTP: its NTP arm is its own baseline, and #L2 is paired with it.
    runs = {("d", "ntp-paper-shaped", 0): fake_run(160e12, 50.0, 1.0),
            ("d", "l2-paper-shaped", 0): fake_run(100e12, 44.0, 1.2)}
    rows = reproduce.compare(runs, ["d"], ["l2-paper-shaped"], [0])
    assert [r["arm"] for r in rows] == ["ntp-paper-shaped", "l2-paper-shaped"] and rows[0]["flops_ratio"] == [1.0]
    [same_step] = reproduce.comparisons(rows)
    assert same_step["against"] == "NTP, paper-shaped recipe" and same_step["fid"]["diffs"] == [-6.0]
