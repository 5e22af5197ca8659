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


def fake_run(flops_per_step: float, fids: list[float], loop_s: float, wall_s: float) -> dict:
    curve = [{"step": 10 * (i + 1), "flops": flops_per_step * 10 * (i + 1), "fid": f, "is": 2.0, "precision": 0.5,
              "recall": 0.5, "class_accuracy": 0.9} for i, f in enumerate(fids)]
    return {"flops": curve[-1]["flops"], "final": {k: v for k, v in curve[-1].items() if k not in ("step", "flops")},
            "curve": curve, "loop_s": loop_s, "wall_s": wall_s}


def test_npp_is_compared_with_ntp_at_the_same_step_and_at_the_same_flops(reproduce):
    runs = {("d", "ntp", 0): fake_run(4.0e12, [90.0, 70.0, 50.0, 40.0], 120.0, 180.0),
            ("d", "l2", 0): fake_run(2.5e12, [80.0, 60.0, 45.0, 30.0], 76.8, 150.0)}
    ntp, l2 = reproduce.compare(runs, ["d"], ["l2"], [0])
    assert ntp["schedule"] == "NTP" and ntp["flops_ratio"] == [1.0]
    assert l2["fid"] == [30.0] and l2["flops_ratio"] == [pytest.approx(0.625)]
    # NPP ends at 100 TFLOP; NTP's curve passes 80 at step 20 and 120 at step 30: FID 70 → 50.
    assert l2["ntp_fid_same_flops"] == [pytest.approx(60.0)]
    assert l2["wall_ratio"] == [pytest.approx(0.64)]
    table = reproduce.markdown([ntp, l2], "header")
    assert "| d | NPP #L2 λ½ | 1 | 30 | -10 | 30 vs 60 | " in table
    # cost table: TFLOP, loop minutes, whole-run minutes, ratios
    assert "| d | NTP | 160 | 2 | 3 | 1 | 1 |" in table
    assert "| d | NPP #L2 λ½ | 100 | 1.28 | 2.5 | 0.625 | 0.64 |" in table


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
    assert [r["schedule"] for r in rows] == ["NTP", "NPP #L2 λ½"]
    assert rows[1]["flops_ratio"][0] < 0.7 and len(rows[1]["wall_s"]) == 1
    finals = sorted((tmp_path / "runs").glob("*/eval/n30-*/results.json"))
    assert len(finals) == 2  # each finished run evaluated on --final-samples
    assert rows[1]["fid"] == [json.loads(finals[0 if "l2" in finals[0].parent.parent.parent.name else 1]
                                         .read_text())["metrics"]["fid"]]
    assert {p.name for p in out.iterdir()} >= {"results.md", "fid_vs_step.png", "fid_vs_flops.png"}
    assert "Training cost per run" in (out / "results.md").read_text()

    exports = sorted((tmp_path / "runs").glob("*/export/model.safetensors"))
    stamps = [p.stat().st_mtime_ns for p in exports]
    again = subprocess.run(command, cwd=ROOT, env=environment, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "npp train:" not in again.stdout + again.stderr  # nothing retrained
    assert [p.stat().st_mtime_ns for p in exports] == stamps
    assert json.loads((out / "results.json").read_text())["rows"] == rows  # wall times kept with the runs
