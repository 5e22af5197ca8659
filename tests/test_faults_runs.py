"""One writer per run folder, exports that make a resume's checks, and faults while saving on real
filesystems, through the real command line (docs/reliability.md: "Experiments never mix", "Faults while
saving").

The disk-full and read-only cases run on a real tmpfs mounted by the test (root can mount one here). Where
`mount` is refused (no root, a container without CAP_SYS_ADMIN), they fall back to patching the writer to
fail as that filesystem does, and say so in their assertion messages.
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from npp.checkpoints import Checkpointer
from npp.runs import RunDir
from test_faults import NPP, ROOT, codes, env, npp_train, one_line, train_argv  # noqa: F401 (codes: a fixture)


def npp(*argv: str, tmp: Path, patch: str = "") -> subprocess.CompletedProcess:
    """`npp ARGV`; with `patch`, the same command in a Python that first runs the patch (the fallback
    where no tmpfs can be mounted)."""
    command = [sys.executable, "-c", patch + "\nimport sys\nfrom npp.cli import main\nsys.exit(main(sys.argv[1:]))",
               *argv] if patch else [NPP, *argv]
    return subprocess.run(command, cwd=ROOT, env=env(tmp), capture_output=True, text=True, timeout=600)


def dead_pid() -> int:
    """The pid of a process that has ended (and been reaped)."""
    process = subprocess.Popen(["true"])
    process.wait()
    return process.pid


def write_lock(run: Path, *, pid: int, host: str) -> None:
    (run / ".lock").write_text(json.dumps({"pid": pid, "host": host, "command": "npp train --name x",
                                           "since": "2026-01-01 00:00:00 UTC", "started": None, "token": "t"}))


def train_steps(run: RunDir) -> list[int]:
    return [row["step"] for row in run.train_rows()]


@pytest.fixture(scope="module")
def runs(codes, tmp_path_factory):
    """Run a (20 steps), started on a folder that holds a stale lock (a killed trainer's, same host) and the
    partial export of a kill -9; run b, another experiment and model (dim 32), 7 steps."""
    runs = tmp_path_factory.mktemp("runs") / "runs"
    (runs / "a" / ".export.k9x").mkdir(parents=True)
    (runs / "a" / ".export.k9x" / "model.safetensors").write_bytes(b"\0" * 100)
    stale = dead_pid()
    write_lock(runs / "a", pid=stale, host=socket.gethostname())
    a = npp_train(codes, runs, "a")
    b = npp_train(codes, runs, "b", **{"schedule.total-steps": 7, "schedule.lr": 3e-3,
                                       "model-overrides": '{"dim": 32}'})
    assert b.returncode == 0, b.stderr[-3000:]
    return runs, a, stale


def test_a_stale_lock_is_taken_over_with_a_warning_and_a_partial_export_removed(runs):
    runs, result, stale = runs
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"npp train: warning: {runs / 'a'} was locked by pid {stale} on {socket.gethostname()}" in result.stderr
    assert "no longer running; taking the lock over" in result.stderr
    assert f"warning: removed {runs / 'a' / '.export.k9x'}, the partial export of an interrupted process" in result.stderr
    run = RunDir(runs / "a")
    assert not (run.path / ".lock").exists() and not run.partial_exports() and run.exported
    assert train_steps(run) == list(range(1, 21))


def test_a_second_trainer_an_export_and_an_evaluation_are_refused_while_a_run_trains(codes, runs, tmp_path):
    folder = tmp_path / "runs"
    first = subprocess.Popen([NPP, "train", *train_argv(codes, folder, "c", **{"schedule.total-steps": 100_000})],
                             cwd=ROOT, env=env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    run = RunDir(folder / "c")
    try:
        deadline = time.monotonic() + 300
        while not (run.path / ".lock").exists() and first.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert (run.path / ".lock").exists(), "the first trainer never took the lock"
        shutil.copytree(runs[0] / "a" / "export", run.export)  # an export from before: evaluate would read it
        holder = f"is in use by pid {first.pid} on {socket.gethostname()} since"
        # The same command with another learning rate: today's two experiments in one folder.
        second = one_line(npp("train", *train_argv(codes, folder, "c", **{"schedule.total-steps": 400,
                                                                          "schedule.lr": 5e-4}), tmp=tmp_path),
                          "npp train")
        assert holder in second and f"kill {first.pid}" in second and "wait for it to finish" in second
        assert holder in one_line(npp("export", str(run.path), tmp=tmp_path), "npp export")
        evaluated = npp("evaluate", str(run.path), "--num-samples", "8", "--no-progress", "--tokenizer",
                        str(Path(codes).parent / "vq"), tmp=tmp_path)
        assert holder in one_line(evaluated, "npp evaluate") and not (run.path / "eval").exists()
        first.send_signal(signal.SIGTERM)  # it stops at a checkpoint and gives the lock back
        out, err = first.communicate(timeout=300)
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    assert first.returncode == 128 + signal.SIGTERM, err[-3000:]
    assert "stopped by a signal" in out and not (run.path / ".lock").exists()
    steps = train_steps(run)
    assert steps == list(range(1, len(steps) + 1)) and len(steps) >= 1  # one row per step, no duplicates
    assert run.read_config()["schedule"]["lr"] == 1e-3  # the first trainer's experiment, untouched


def test_a_lock_of_another_host_is_never_taken_over(runs, tmp_path):
    run = RunDir(tmp_path / "a")
    shutil.copytree(runs[0] / "a", run.path)
    write_lock(run.path, pid=dead_pid(), host="gpu-node-7")
    error = one_line(npp("export", str(run.path), tmp=tmp_path), "npp export")
    assert "locked by pid" in error and "on gpu-node-7" in error and f"delete {run.path / '.lock'}" in error
    assert (run.path / ".lock").exists()


def test_export_removes_the_partial_export_a_kill_left(runs, tmp_path):
    run = RunDir(tmp_path / "a")
    shutil.copytree(runs[0] / "a", run.path)
    (run.path / ".export.abc123").mkdir()
    (run.path / ".export.abc123" / "model.safetensors").write_bytes(b"\0" * 100)
    result = npp("export", str(run.path), tmp=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "removed" in result.stderr and ".export.abc123" in result.stderr
    assert not run.partial_exports() and run.exported and not (run.path / ".lock").exists()


@pytest.mark.heavy  # an evaluation (~15 s); export and train remove partial exports by default
def test_an_evaluation_into_the_run_removes_the_partial_export_a_kill_left(codes, runs, tmp_path):
    run = RunDir(tmp_path / "a")
    shutil.copytree(runs[0] / "a", run.path)
    (run.path / ".export.ev1").mkdir()
    result = npp("evaluate", str(run.path), "--num-samples", "8", "--no-progress", "--tokenizer",
                 str(Path(codes).parent / "vq"), tmp=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"npp evaluate: warning: removed {run.path / '.export.ev1'}" in result.stderr
    assert not run.partial_exports() and (run.path / "eval").is_dir()


def test_export_refuses_a_checkpoint_of_another_experiment_or_model(runs, tmp_path):
    runs = runs[0]
    run = RunDir(tmp_path / "a")
    shutil.copytree(runs / "a", run.path)
    before = (run.export / "model.safetensors").read_bytes()
    planted = run.checkpoints / RunDir.tag(30)
    shutil.copytree(RunDir(runs / "b").checkpoints / RunDir.tag(7), planted)
    Checkpointer(run, "test").set_latest(planted.name)
    error = one_line(npp("export", str(run.path), tmp=tmp_path), "npp export")
    assert f"{planted} was written by another experiment than {run.config} describes" in error
    # A checkpoint from before meta.json carried the experiment: the architecture still gives it away.
    meta = json.loads((planted / "meta.json").read_text())
    del meta["experiment"]
    (planted / "meta.json").write_text(json.dumps(meta))
    error = one_line(npp("export", str(run.path), tmp=tmp_path), "npp export")
    assert f"{planted} holds another model than {run.config} trains (--model debug): dim 32 (the run: 64)" in error
    assert (run.export / "model.safetensors").read_bytes() == before  # the run's own export is kept


# ---- faults while saving, on real filesystems ---------------------------------------------------------

@pytest.fixture
def mount(tmp_path):
    """mount(folder, "size=2m"[, "ro"]) mounts a tmpfs there and returns True, or False where the system
    refuses (the tests then patch the writer instead); every mount is undone at the end."""
    mounted = []

    def make(folder: Path, *options: str) -> bool:
        folder.mkdir(parents=True, exist_ok=True)
        if os.geteuid() != 0 or shutil.which("mount") is None:
            return False
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", ",".join(options), "tmpfs", str(folder)],
                              capture_output=True).returncode == 0
        if done:
            mounted.append(folder)
        return done

    yield make
    for folder in reversed(mounted):
        subprocess.run(["umount", "-l", str(folder)], check=False)


FULL_EXPORT = """
from safetensors import SafetensorError
import safetensors.torch
def save_file(tensors, filename, metadata=None):
    open(filename, "wb").write(bytes(1000))  # a partial file, as a write that runs out of room leaves
    raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
safetensors.torch.save_file = save_file
"""


def test_a_full_disk_during_export_is_one_line_and_leaves_no_partial_folder(runs, mount, tmp_path):
    source = RunDir(runs[0] / "a")
    run = RunDir(tmp_path / "disk" / "a")
    tag = source.latest_tag()
    # Room for the run's config and its latest checkpoint (1.7 MB), not for the export beside them (0.6 MB).
    real = mount(run.path.parent, "size=2000k")
    run.path.mkdir()
    shutil.copy(source.config, run.config)
    shutil.copytree(source.checkpoints / tag, run.checkpoints / tag)
    Checkpointer(run, "test").set_latest(tag)
    result = npp("export", str(run.path), tmp=tmp_path, patch="" if real else FULL_EXPORT)
    error = one_line(result, "npp export")
    assert f"could not write the export of {run.path}: the disk is full" in error, (real, error)
    assert "the partial folder was removed and the checkpoints are kept" in error
    assert not run.partial_exports() and not run.export.exists() and not (run.path / ".lock").exists()
    assert run.latest_tag() == tag and (run.checkpoints / tag / "mp_rank_00_model_states.pt").is_file()


FULL_CHECKPOINT = """
import errno, torch
real_save, calls = torch.save, []
def save(obj, f, *args, **kwargs):
    calls.append(f)
    if len(calls) > 1:
        real_save(obj, f, *args, **kwargs)  # leaves a file behind, as a write that runs out of room does
        raise OSError(errno.{code}, "{what}")
    return real_save(obj, f, *args, **kwargs)
torch.save = save
"""


@pytest.mark.heavy  # two trainings (~40 s); the export case covers a full tmpfs by default
def test_a_checkpoint_that_fills_a_real_tmpfs_is_one_line_and_the_run_resumes_once_there_is_room(codes, mount,
                                                                                                  tmp_path):
    runs = tmp_path / "runs"
    # One debug checkpoint is 1.7 MB: step 7's fits, step 10's (the end of the 2×2 stage) does not.
    real = mount(runs, "size=2600k")
    patch = "" if real else FULL_CHECKPOINT.format(code="ENOSPC", what="No space left on device")
    error = one_line(npp("train", *train_argv(codes, runs, "f"), tmp=tmp_path, patch=patch), "npp train")
    assert "could not save checkpoint step-00000010" in error and "the disk is full" in error, (real, error)
    assert "the partial folder was removed and step-00000007 is the last complete one" in error
    run = RunDir(runs / "f")
    assert [p.name for p in run.checkpoints.iterdir() if p.name.startswith("step-")] == ["step-00000007"]
    assert not (run.path / ".lock").exists()
    if real:
        assert subprocess.run(["mount", "-o", "remount,size=16m", str(runs)]).returncode == 0
    resumed = npp_train(codes, runs, "f")  # the disk has room again: the same command goes on
    assert resumed.returncode == 0 and "resuming at step 7" in resumed.stdout, resumed.stderr[-3000:]
    assert train_steps(run) == list(range(1, 21))


@pytest.mark.heavy  # a 400-step training remounted read-only part way (~20 s)
def test_a_checkpoints_folder_that_turns_read_only_mid_run_is_one_line(codes, mount, tmp_path):
    # A fresh run on a read-only folder is refused before training (check_run_folder); here the folder turns
    # read-only while the run trains (a remount, as a failing disk does), between two checkpoints.
    run = RunDir(tmp_path / "runs" / "r")
    real = mount(run.checkpoints, "size=16m")
    if real:
        argv = train_argv(codes, run.path.parent, "r", **{"schedule.total-steps": 400, "ckpt-every": 50,
                                                          "log-every": 50})
        trainer = subprocess.Popen([NPP, "train", *argv], cwd=ROOT, env=env(tmp_path), stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 300
        while run.latest_tag() is None and trainer.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        while subprocess.run(["mount", "-o", "remount,ro", str(run.checkpoints)]).returncode != 0:
            assert trainer.poll() is None and time.monotonic() < deadline, "the folder could not be made read-only"
            time.sleep(0.02)  # busy: a checkpoint file is open for writing
        last = run.latest_tag()
        out, err = trainer.communicate(timeout=300)
        result = subprocess.CompletedProcess(trainer.args, trainer.returncode, out, err)
        failed = RunDir.tag(int(last.split("-")[1]) + 50)
    else:  # no mount here: the writer is patched to fail as a read-only folder does, at the second save
        patch = FULL_CHECKPOINT.format(code="EROFS", what="Read-only file system")
        result = npp("train", *train_argv(codes, run.path.parent, "r"), tmp=tmp_path, patch=patch)
        last, failed = RunDir.tag(7), RunDir.tag(10)
    error = one_line(result, "npp train")
    assert f"could not save checkpoint {failed}" in error, (real, error)
    assert "the folder cannot be written to (read-only, or no permission)" in error
    assert f"the partial folder was removed and {last} is the last complete one" in error
    assert run.latest_tag() == last and not (run.checkpoints / failed).exists()
    assert not (run.path / ".lock").exists()
