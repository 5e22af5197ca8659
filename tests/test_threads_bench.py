"""benchmarks/threads.py: the rule that picks a default thread count, on made-up speeds, and (heavy) one real
measurement end to end."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

import threads

ROOT = Path(__file__).resolve().parents[1]


def test_the_rule_wants_near_the_fastest_alone_and_half_speed_beside_a_busy_process():
    # the figures: 2 threads 156 alone but 53 beside a busy process; 1 thread 93 → 87
    verdicts = threads.choose({1: {"alone": 93.0, "busy": 87.0}, 2: {"alone": 156.0, "busy": 53.0}})
    assert verdicts[2] == {"within_10pct_alone": True, "half_speed_when_busy": False, "passes": False}
    assert verdicts[1] == {"within_10pct_alone": False, "half_speed_when_busy": True, "passes": False}
    # a setting within 10% of the fastest that keeps half its speed passes
    verdicts = threads.choose({1: {"alone": 145.0, "busy": 90.0}, 2: {"alone": 156.0, "busy": 53.0}})
    assert verdicts[1]["passes"] and not verdicts[2]["passes"]


@pytest.mark.heavy  # four short trainings
def test_the_benchmark_measures_each_setting_alone_and_beside_a_busy_process(tmp_path):
    out = tmp_path / "threads.json"
    done = subprocess.run([sys.executable, "benchmarks/threads.py", "--threads", "1", "--steps", "30", "--skip", "10",
                           "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stderr[-3000:]
    record = json.loads(out.read_text())
    assert record["table"]["1"]["alone"] > 0 and record["table"]["1"]["busy"] > 0
    assert "| threads | imgs/s alone |" in done.stdout
