"""Resuming and exporting a run whose checkpoints were damaged after the fact, through the real command line:
the checkpoints themselves say which one is newest and complete, a damaged file costs the steps since the
checkpoint before it (with one warning), and nothing is set aside or started again behind the user's back.

One small run with EMA (checkpoints at steps 7, 10, 14 and 20) is trained once; each test damages a copy.
"""

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from npp.runs import RunDir
from test_faults import NPP, ROOT, codes, env, npp_train, one_line, train_argv  # noqa: F401 (codes: a fixture)
from test_faults_runs import mount, npp  # noqa: F401 (mount: a fixture)

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


def tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def checkpoints_on_tmpfs(run: RunDir, mount) -> bool:
    """Move the run's checkpoints onto a tmpfs of their own (True), or leave them where mounting is refused."""
    saved = run.path / "checkpoints-saved"
    os.replace(run.checkpoints, saved)
    real = mount(run.checkpoints, "size=16m")
    shutil.copytree(saved, run.checkpoints, dirs_exist_ok=True)
    shutil.rmtree(saved)
    return real


def fill(folder: Path) -> None:
    with open(folder / "filler", "wb") as f:
        try:
            while True:
                f.write(bytes(2**16))
                f.flush()
        except OSError:
            pass


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


NO_ROOM = "import shutil\nshutil.disk_usage = lambda path: shutil._ntuple_diskusage(2**30, 2**30, 0)"


def test_resuming_on_a_full_disk_says_so_and_keeps_the_run(codes, run, mount, tmp_path):
    (run.checkpoints / "step-00000020" / "meta.json").unlink()  # the run has 6 steps to go, from step 14
    real = checkpoints_on_tmpfs(run, mount)
    if real:
        fill(run.checkpoints)
    before = tree(run.path)
    result = npp("train", *train_argv(codes, run.path.parent, "r", **EMA), tmp=tmp_path,
                 patch="" if real else NO_ROOM)
    error = one_line(result, "npp train")
    assert f"{run.checkpoints} has no room for another checkpoint: the disk is full" in error, (real, error)
    assert "make room, then run the same command again" in error and "--no-resume" not in error
    assert tree(run.path) == before and not set_aside(run)


def test_resuming_on_a_read_only_folder_says_so_and_keeps_the_run(codes, run, mount):
    real = checkpoints_on_tmpfs(run, mount)
    if real:
        assert subprocess.run(["mount", "-o", "remount,ro", str(run.checkpoints)]).returncode == 0
    else:
        run.checkpoints.chmod(0o555)
    before = tree(run.path)
    error = one_line(resume(codes, run), "npp train")
    assert f"{run.checkpoints} cannot be written to (a read-only file system" in error, (real, error)
    assert "could not be loaded" not in error and "--no-resume" not in error
    assert tree(run.path) == before and not set_aside(run)


def test_a_truncated_ema_file_exports_the_checkpoint_before_it_with_one_warning(run, tmp_path):
    truncate(run.checkpoints / "step-00000020" / "ema.safetensors")
    shutil.rmtree(run.export)
    result = subprocess.run([NPP, "export", str(run.path)], cwd=ROOT, env=env(tmp_path), capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    warning, = result.stderr.splitlines()
    assert warning.startswith("npp export: warning:") and "step-00000020" in warning and "ema.safetensors" in warning
    assert json.loads((run.export / "source.json").read_text())["checkpoint"] == "step-00000014"
