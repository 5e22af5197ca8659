"""The CPU thread count is a recorded setting: `--threads` reaches torch in train and evaluate, the count in
force is recorded (config.json, every metrics row, results.json), runs recorded before it existed resume
unchanged, and benchmarks/reproduce.py never pairs runs trained with different counts."""

import importlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

from npp.config import TrainConfig
from npp.runs import RunDir
from test_faults import NPP, ROOT, codes, env, npp_train, one_line  # noqa: F401 (codes: the shared fixture)

SHORT = {"schedule.total-steps": 4, "ckpt-every": 4, "log-every": 2}


@pytest.fixture(scope="module")
def runs(codes, tmp_path_factory):  # noqa: F811
    """Two finished debug runs under OMP_NUM_THREADS=1: one with --threads 2, one with the default."""
    folder = tmp_path_factory.mktemp("threads") / "runs"
    for name, extra in (("two", ("--threads", "2")), ("default", ())):
        result = npp_train(codes, folder, name, *extra, **SHORT)
        assert result.returncode == 0, result.stderr[-3000:]
    return folder


def npp_evaluate(run: RunDir, out: str, *extra: str) -> subprocess.CompletedProcess:
    tokenizer = Path(run.read_config()["data"]).parent / "vq"  # where the codes fixture saved it
    return subprocess.run([NPP, "evaluate", str(run.path), "--out", str(run.path / out), "--tokenizer", str(tokenizer),
                           "--num-samples", "4",
                           "--batch-size", "4", "--metrics", "fid", "--no-save-png", "--no-progress", *extra],
                          cwd=ROOT, env=env(run.path.parent.parent), capture_output=True, text=True, timeout=600)


def test_train_records_the_thread_count_it_trained_with(runs):
    two, default = RunDir(runs / "two"), RunDir(runs / "default")
    assert two.read_config()["threads"] == 2  # the flag beats OMP_NUM_THREADS=1
    assert [row["threads"] for row in two.train_rows()] == [2, 2]
    assert default.read_config()["threads"] == 1  # no flag: the process's own count, recorded
    assert [row["threads"] for row in default.train_rows()] == [1, 1]


def test_evaluate_records_the_thread_count_in_results_json(runs):
    run = RunDir(runs / "two")
    for out, extra, expected in (("eval-2", ("--threads", "2"), 2), ("eval-default", (), 1)):
        result = npp_evaluate(run, out, *extra)
        assert result.returncode == 0, result.stderr[-3000:]
        results = json.loads((run.path / out / "results.json").read_text())
        assert results["threads"] == expected and results["config"]["threads"] == expected


@pytest.mark.parametrize("command", ["train", "evaluate"])
def test_a_thread_count_below_one_is_one_line(runs, codes, command):  # noqa: F811
    if command == "train":
        result = npp_train(codes, runs, "zero", "--threads", "0", **SHORT)
        assert not (runs / "zero").exists()
    else:
        result = npp_evaluate(RunDir(runs / "two"), "eval-zero", "--threads", "0")
        assert not (runs / "two" / "eval-zero").exists()
    error = one_line(result, f"npp {command}")
    assert "threads=0" in error and "≥ 1" in error


def test_the_app_refuses_a_thread_count_below_one(tmp_path):
    result = subprocess.run([sys.executable, "app/demo.py", "--threads", "0", "--runs", str(tmp_path)], cwd=ROOT,
                            env=env(tmp_path), capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr[-3000:]
    assert result.stderr.startswith("app/demo.py: error: --threads 0") and "≥ 1" in result.stderr


def test_a_run_recorded_without_a_thread_count_resumes_unchanged():
    saved = TrainConfig(name="old", seed=3).to_dict()
    del saved["threads"]  # as config.json was written before the field existed
    now = TrainConfig(name="old", seed=3, threads=2)
    assert now.changes_from(saved) == []
    assert now.experiment_id() == TrainConfig.from_dict(saved).experiment_id()
    assert TrainConfig(name="old", seed=4, threads=2).changes_from(saved) == ["seed"]  # a real change still counts


# ------------------------------------------------------------------------------------------------
# benchmarks/reproduce.py pairs only runs of one thread count
# ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def reproduce():
    return importlib.import_module("reproduce")


def fake_run(name: str, fid: float, threads: int | None) -> dict:
    final = {"fid": fid, "is": 2.0, "precision": 0.5, "recall": 0.5, "class_accuracy": 0.9}
    run = {"name": name, "flops": 1e12, "final": final, "final_loss": 1.0, "loop_s": 100.0, "wall_s": 150.0,
           "curve": [{"step": 10, "flops": 1e12, **final}]}
    return run if threads is None else {**run, "threads": threads}


def pair(reproduce, ntp: int | None, l2: int | None) -> list[dict]:
    runs = {("d", "ntp", 0): fake_run("ntp-s0", 50.0, ntp), ("d", "l2", 0): fake_run("l2-s0", 40.0, l2)}
    return reproduce.compare(runs, ["d"], ["l2"], [0])


def test_reproduce_refuses_to_pair_runs_of_different_thread_counts(reproduce):
    with pytest.raises(SystemExit) as refused:
        pair(reproduce, 1, 2)
    message = str(refused.value)
    assert "\n" not in message and "ntp-s0 (1 thread(s))" in message and "l2-s0 (2 thread(s))" in message
    assert "--threads" in message


def test_reproduce_pairs_a_recorded_count_only_with_itself_and_unrecorded_only_with_unrecorded(reproduce):
    assert pair(reproduce, 1, 1)[1]["fid"] == [40.0]
    assert pair(reproduce, None, None)[1]["fid"] == [40.0]  # the sets recorded before the count regenerate
    with pytest.raises(SystemExit, match="unrecorded thread count"):
        pair(reproduce, None, 1)


def test_reproduce_refuses_a_run_trained_with_several_counts(reproduce, tmp_path):
    run = RunDir(tmp_path / "mixed")
    run.path.mkdir()
    run.metrics.write_text("".join(json.dumps({"step": s, "loss": 1.0, **extra}) + "\n"
                                   for s, extra in ((10, {}), (20, {"threads": 1}))))
    with pytest.raises(SystemExit, match="several thread counts"):
        reproduce.trained_threads(run)
