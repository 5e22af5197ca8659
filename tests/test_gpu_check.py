"""benchmarks/gpu_check.sh at toy sizes on the CPU, so that the GPU check works when a GPU comes."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


# Two to three minutes on 2 cores (a dozen training processes): `make test-heavy`, and before a GPU run.
@pytest.mark.heavy
def test_the_gpu_check_runs_every_part_as_a_dry_run(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable, "NPP_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(["bash", "benchmarks/gpu_check.sh", "--dry-run", "--out", str(tmp_path / "out")],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    report = (tmp_path / "out" / "report.md").read_text()
    # Both notebook runs finished and exported; the second was stopped by SIGTERM and resumed.
    assert "| debug | " in report and report.count("| yes |") == 2 and "| 12 | yes | yes |" in report
    assert "| 2×2 | 16 |" in report and "| 1×1 (NTP) | 64 |" in report
    assert "amp-bf16 against fp32" in report and "Largest relative difference" in report
    assert "samples/s" in report
