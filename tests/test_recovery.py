"""Resuming and exporting a run whose checkpoints were damaged after the fact, through the real command line:
the checkpoints themselves say which one is newest and complete, a damaged file costs the steps since the
checkpoint before it (with one warning), and nothing is set aside or started again behind the user's back.

One small run with EMA (checkpoints at steps 7, 10, 14 and 20) is trained once; each test damages a copy.
"""

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from npp.runs import RunDir
from test_faults import NPP, ROOT, codes, env, npp_train, one_line  # noqa: F401 (codes: a fixture)

EMA = {"ema-decay": 0.9}


@pytest.fixture(scope="module")
def trained(codes, tmp_path_factory) -> RunDir:
    runs = tmp_path_factory.mktemp("trained") / "runs"
    result = npp_train(codes, runs, "r", **EMA)
    assert result.returncode == 0, result.stderr[-3000:]
    return RunDir(runs / "r")


@pytest.fixture
def run(trained, tmp_path) -> RunDir:
    """A copy of the trained run, to damage."""
    shutil.copytree(trained.path, tmp_path / "runs" / "r")
    return RunDir(tmp_path / "runs" / "r")


def resume(codes: str, run: RunDir, **overrides) -> subprocess.CompletedProcess:
    return npp_train(codes, run.path.parent, run.path.name, **{**EMA, **overrides})


def set_aside(run: RunDir) -> list[Path]:
    return sorted(run.path.glob("previous-*"))


def test_a_deleted_latest_pointer_resumes_from_the_newest_complete_checkpoint(codes, run):
    (run.checkpoints / "latest").unlink()
    shutil.rmtree(run.export)
    result = resume(codes, run)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resuming at step 20" in result.stdout and not set_aside(run)
    assert run.exported and run.latest_tag() == "step-00000020"


def test_a_deleted_latest_pointer_still_refuses_a_changed_config(codes, run):
    (run.checkpoints / "latest").unlink()
    before = sorted(p.name for p in run.checkpoints.iterdir())
    error = one_line(resume(codes, run, **{"schedule.lr": 3e-4}), "npp train")
    assert "was started with other values of schedule" in error and "--no-resume" in error
    assert sorted(p.name for p in run.checkpoints.iterdir()) == before and not set_aside(run)


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def test_a_truncated_ema_file_resumes_from_the_checkpoint_before_it_with_one_warning(codes, run):
    truncate(run.checkpoints / "step-00000020" / "ema.safetensors")
    result = resume(codes, run)
    assert result.returncode == 0, result.stderr[-3000:]
    warnings = [line for line in result.stderr.splitlines() if "warning" in line]
    assert len(warnings) == 1 and "step-00000020" in warnings[0] and "ema.safetensors" in warnings[0], warnings
    assert "resuming at step 14" in result.stdout and not set_aside(run)
    assert [row["step"] for row in run.train_rows()] == list(range(1, 21))
    assert json.loads((run.export / "source.json").read_text())["checkpoint"] == "step-00000020"  # saved again
