"""Hostile and unlucky inputs, through the real command line: each ends in one line on stderr, exit code 2,
and nothing a user made is lost; no file in a run folder can make npp run code.

The trainer runs on codes of the first 256 digits encoded by a small random tokenizer (as in test_train.py).
docs/reliability.md lists every case with what the user sees and what is kept.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import npp
from npp.extract import mnist_codes
from npp.runs import RunDir

ROOT = Path(__file__).resolve().parents[1]
NPP = str(Path(sys.executable).with_name("npp"))


@pytest.fixture(scope="module")
def codes(tmp_path_factory) -> str:
    torch.manual_seed(0)
    vq = npp.VQModel(npp.VQConfig.preset("mnist-8x8", codebook_size=64)).eval()
    directory = mnist_codes(vq, tmp_path_factory.mktemp("cache"), "train", limit=256).directory
    vq.save_pretrained(directory.parent / "vq")  # what decodes them: `--tokenizer` of the commands that sample
    return str(directory)


def env(tmp: Path, **extra: str) -> dict[str, str]:
    return {**os.environ, "DS_ACCELERATOR": "cpu", "NPP_CACHE": str(tmp / "cache"), "PYTHONUNBUFFERED": "1",
            "OMP_NUM_THREADS": "1", **extra}


def train_argv(codes: str, runs: Path, name: str, **overrides) -> list[str]:
    options = {"name": name, "runs-dir": str(runs), "data": codes, "model": "debug", "batch-size": 8,
               "schedule.total-steps": 20, "schedule.lr": 1e-3, "schedule.warmup-steps": 2, "log-every": 1,
               "ckpt-every": 7, "num-workers": 0, "tensorboard": "false", "progress": "false", **overrides}
    return [item for key, value in options.items() for item in (f"--{key}", str(value))]


def npp_train(codes: str, runs: Path, name: str, *extra: str, **overrides) -> subprocess.CompletedProcess:
    return subprocess.run([NPP, "train", *train_argv(codes, runs, name, **overrides), *extra], cwd=ROOT,
                          env=env(runs.parent), capture_output=True, text=True, timeout=600)


def one_line(result: subprocess.CompletedProcess, prog: str) -> str:
    """The process failed with exit code 2 and exactly one line on stderr, from `prog`."""
    assert result.returncode == 2, (result.returncode, result.stderr[-3000:])
    assert result.stderr.count("\n") == 1 and result.stderr.startswith(f"{prog}: error:"), result.stderr[-3000:]
    return result.stderr


# ---- no code runs from a run folder --------------------------------------------------------------

class Planted:
    """Unpickled without weights_only, this runs a shell command: what a tampered run folder would hold."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def plant(path: Path, marker: Path) -> None:
    torch.save({"module": Planted(marker)}, path)


@pytest.fixture(scope="module")
def planted_run(codes, tmp_path_factory):
    """A finished run whose latest checkpoint's model file was replaced by the planted pickle."""
    runs = tmp_path_factory.mktemp("planted") / "runs"
    result = npp_train(codes, runs, "p")
    assert result.returncode == 0, result.stderr[-3000:]
    run = RunDir(runs / "p")
    marker = runs.parent / "CODE-RAN"
    plant(run.checkpoints / run.latest_tag() / "mp_rank_00_model_states.pt", marker)
    return run, marker


def test_export_refuses_a_planted_pickle(planted_run):
    run, marker = planted_run
    shutil.rmtree(run.export)
    error = one_line(subprocess.run([NPP, "export", str(run.path)], capture_output=True, text=True, timeout=300,
                                    env=env(run.path.parent.parent)), "npp export")
    assert "posix.system" in error and "weights-only" in error and "weights_only=False" not in error
    assert not marker.exists()


def test_the_notebooks_loader_refuses_a_planted_pickle(planted_run):
    run, marker = planted_run
    script = f"from npp.checkpoints import load_checkpoint_model; load_checkpoint_model({str(run.path)!r})"
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode != 0 and "CheckpointError" in result.stderr and "posix.system" in result.stderr
    assert not marker.exists()


def test_resuming_skips_a_planted_checkpoint_for_the_one_before_it(planted_run, codes):
    run, marker = planted_run
    shutil.copytree(run.path, run.path.parent / "p-resumed")
    result = npp_train(codes, run.path.parent, "p-resumed")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "warning: checkpoint" in result.stderr and "posix.system" in result.stderr
    assert "resuming at step 14" in result.stdout  # the checkpoint before the planted one
    assert not marker.exists()


@pytest.mark.heavy  # the other planted-pickle tests cover safe_load by default
def test_a_universal_checkpoint_resume_refuses_a_planted_pickle(codes, tmp_path):
    runs = tmp_path / "runs"
    result = npp_train(codes, runs, "z", deepspeed="ds_configs/zero2.json", **{"schedule.total-steps": 8,
                                                                                "ckpt-every": 8})
    assert result.returncode == 0, result.stderr[-3000:]
    run = RunDir(runs / "z")
    shutil.rmtree(run.export)
    marker = tmp_path / "CODE-RAN"
    plant(run.checkpoints / run.latest_tag() / "zero_pp_rank_0_mp_rank_00_optim_states.pt", marker)
    # Two processes resume a one-process ZeRO-2 checkpoint: DeepSpeed's universal conversion reads every file.
    launcher = [str(Path(sys.executable).with_name("deepspeed")), "--num_gpus", "2",
                "--master_port", str(29600 + os.getpid() % 300)]
    resumed = subprocess.run([*launcher, "npp/train.py", *train_argv(codes, runs, "z", deepspeed="ds_configs/zero2.json",
                                                                      **{"schedule.total-steps": 8, "ckpt-every": 8})],
                             cwd=ROOT, env=env(tmp_path), capture_output=True, text=True, timeout=600)
    assert "posix.system" in resumed.stdout + resumed.stderr
    assert not marker.exists()


# ---- a fresh start never mixes two experiments ------------------------------------------------

def test_no_resume_then_a_crash_then_a_rerun_trains_the_new_experiment_from_scratch(codes, tmp_path):
    runs = tmp_path / "runs"
    assert npp_train(codes, runs, "s").returncode == 0  # 20 steps, checkpoints at 7, 10 (stage end), 14, 20
    new = train_argv(codes, runs, "s", **{"schedule.total-steps": 40, "schedule.lr": 3e-4})
    process = subprocess.Popen([NPP, "train", *new, "--no-resume"], cwd=ROOT, env=env(tmp_path),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metrics = runs / "s" / "metrics.jsonl"
    deadline = time.time() + 300
    # The finished run's metrics are there from the start: wait until they were set aside and new ones written.
    while time.time() < deadline and process.poll() is None and not (
            any((runs / "s").glob("previous-*")) and metrics.is_file()
            and len(metrics.read_text().splitlines()) >= 2):
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)  # before its first checkpoint at step 7
    process.wait()
    rerun = subprocess.run([NPP, "train", *new], cwd=ROOT, env=env(tmp_path), capture_output=True, text=True,
                           timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "resuming" not in rerun.stdout
    run = RunDir(runs / "s")
    assert [row["step"] for row in run.train_rows()] == list(range(1, 41))
    assert run.train_rows()[0]["lr"] == pytest.approx(3e-4 / 2)  # the new run's warm-up, not the old run's
    previous = sorted(run.path.glob("previous-*"))
    assert len(previous) == 1 and (previous[0] / "checkpoints" / RunDir.tag(20)).is_dir()  # nothing lost


def test_counters_after_a_sigterm_resume_equal_an_uninterrupted_run(codes, tmp_path):
    runs = tmp_path / "runs"
    options = {"schedule.total-steps": 60, "ckpt-every": 7, "log-every": 5}
    assert npp_train(codes, runs, "full", **options).returncode == 0
    process = subprocess.Popen([NPP, "train", *train_argv(codes, runs, "cut", **options)], cwd=ROOT,
                               env=env(tmp_path), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metrics = runs / "cut" / "metrics.jsonl"
    while process.poll() is None and not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 2):
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)  # near step 10-13: a stop off the logging grid
    assert process.wait(timeout=300) == 128 + signal.SIGTERM
    assert npp_train(codes, runs, "cut", **options).returncode == 0
    counters = lambda name: [(r["step"], r["tokens_seen"], r["flops_seen"])  # noqa: E731
                             for r in RunDir(runs / name).train_rows()]
    assert counters("cut") == counters("full")


# ---- damaged and foreign files ----------------------------------------------------------------

@pytest.fixture(scope="module")
def exported(codes, tmp_path_factory):
    runs = tmp_path_factory.mktemp("exported") / "runs"
    assert npp_train(codes, runs, "e", **{"schedule.total-steps": 4, "ckpt-every": 4}).returncode == 0
    return RunDir(runs / "e")


def test_a_truncated_export_is_one_line_naming_the_file(codes, exported, tmp_path):
    damaged = tmp_path / "damaged"
    shutil.copytree(exported.export, damaged)
    data = (damaged / "model.safetensors").read_bytes()
    (damaged / "model.safetensors").write_bytes(data[: len(data) // 3])
    # codes extracted in memory name no tokenizer file: give the one that encoded them
    tokenizer = str(Path(codes).parent / "vq")
    error = one_line(subprocess.run([NPP, "evaluate", str(damaged), "--num-samples", "4", "--tokenizer", tokenizer],
                                    capture_output=True,
                                    text=True, timeout=300, env=env(tmp_path)), "npp evaluate")
    assert f"{damaged}/model.safetensors is damaged" in error and "npp export" in error
    with pytest.raises(npp.CheckpointError, match="is damaged"):
        npp.GPT.from_pretrained(damaged)
    vq = npp.VQModel(npp.VQConfig.preset("mnist-8x8"))
    vq.save_pretrained(tmp_path / "vq")
    (tmp_path / "vq" / "model.safetensors").write_bytes(b"\x00" * 10)
    with pytest.raises(npp.CheckpointError, match="is damaged"):
        npp.VQModel.from_pretrained(tmp_path / "vq")


@pytest.mark.parametrize("kind", ["random", "empty", "planted", "legacy"])
def test_unloadable_pt_files_are_one_line_and_a_legacy_checkpoint_loads(kind, exported, tmp_path):
    path = tmp_path / f"{kind}.pt"
    state = npp.GPT.from_pretrained(exported.export).state_dict()
    if kind == "random":
        path.write_bytes(np.random.default_rng(0).bytes(4096))
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "planted":
        plant(path, tmp_path / "CODE-RAN")
    else:  # the format torch wrote before 1.6: no zip, so no memory map either
        torch.save({"model": state}, path, _use_new_zipfile_serialization=False)
    result = subprocess.run([NPP, "convert", str(path), str(tmp_path / "out"), "--grid", "8"], capture_output=True,
                            text=True, timeout=300)
    if kind == "legacy":
        assert result.returncode == 0, result.stderr[-2000:]
        assert torch.equal(npp.GPT.from_pretrained(tmp_path / "out").output.weight, state["output.weight"])
        return
    error = one_line(result, "npp convert")
    assert {"random": "is not a readable PyTorch checkpoint", "empty": "is empty",
            "planted": "asks to run or build posix.system"}[kind] in error
    assert "weights_only=False" not in error and not (tmp_path / "CODE-RAN").exists()


def test_a_folder_that_cannot_be_written_is_one_line(exported, tmp_path):
    pt = tmp_path / "model.pt"
    torch.save({"model": npp.GPT.from_pretrained(exported.export).state_dict()}, pt)
    error = one_line(subprocess.run([NPP, "convert", str(pt), "/proc/x", "--grid", "8"], capture_output=True,
                                    text=True, timeout=300), "npp convert")
    assert "/proc/x" in error


# ---- bad configurations: one line, before any work --------------------------------------------

@pytest.mark.parametrize("extra,message", [
    (["--model-overrides", '{"grid": 4}'], "come(s) from the data's manifest"),
    (["--model-overrides", '{"vocab_size": 100}'], "come(s) from the data's manifest"),
    (["--model-overrides", "5"], "is a JSON int, not an object"),
    (["--model-overrides", '{"token_dropout": "x"}'], "ModelConfig.token_dropout='x'"),
    (["--betas", "0.9"], "TrainConfig.betas=[0.9]: give two values"),
    (["--ckpt-every", "true"], "'true' is not a whole number"),
])
def test_bad_flags_are_one_line(codes, tmp_path, extra, message):
    error = one_line(npp_train(codes, tmp_path / "runs", "bad", *extra), "npp train")
    assert message in error
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("content,message", [
    ("{not json", "is not valid JSON"),
    ("[1, 2]", "holds a JSON list, not an object"),
    ('{"weight_decay": "x"}', "TrainConfig.weight_decay='x'"),
    ('{"keep_last": true}', "TrainConfig.keep_last=True"),  # a bool is not a count
])
def test_bad_config_files_are_one_line(codes, tmp_path, content, message):
    (tmp_path / "run.json").write_text(content)
    error = one_line(npp_train(codes, tmp_path / "runs", "bad", "--config", str(tmp_path / "run.json")), "npp train")
    assert message in error


def test_an_image_folder_is_not_codes(codes, tmp_path):
    (tmp_path / "images" / "cat").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(tmp_path / "images" / "cat" / "a.png")
    error = one_line(npp_train(codes, tmp_path / "runs", "bad", data=str(tmp_path / "images")), "npp train")
    assert "has no manifest.json" in error and "npp extract" in error


def test_an_impossible_schedule_is_refused_before_the_embedded_data_is_extracted(tmp_path):
    result = subprocess.run([NPP, "train", "--name", "l5", "--runs-dir", str(tmp_path / "runs"), "--model", "debug",
                             "--data", "mnist-8x8", "--schedule.levels", "5"], cwd=ROOT, env=env(tmp_path),
                            capture_output=True, text=True, timeout=600)
    assert "do not tile the 8×8 token grid" in one_line(result, "npp train")
    assert not (tmp_path / "cache" / "codes").exists() and not (tmp_path / "runs").exists()


def test_codes_whose_tokenizer_changed_are_refused_at_the_start_of_training(tmp_path):
    from npp.crops import CropConfig
    from npp.data import MnistSource
    from npp.extract import extract_codes

    torch.manual_seed(0)
    vq = npp.VQModel(npp.VQConfig.preset("mnist-8x8", codebook_size=64)).eval()
    vq.save_pretrained(tmp_path / "vq")
    extract_codes(MnistSource("train", 64), vq, tmp_path / "codes", CropConfig("none", size=32),
                  tokenizer_path=tmp_path / "vq", progress=False)
    npp.VQModel(npp.VQConfig.preset("mnist-8x8", codebook_size=64)).save_pretrained(tmp_path / "vq")  # replaced
    error = one_line(npp_train(str(tmp_path / "codes"), tmp_path / "runs", "t"), "npp train")
    assert "is not the one the codes of" in error and "extract the codes again" in error
    assert "--tokenizer" not in error


@pytest.mark.parametrize("flag,message", [
    (["--cfg-scale", "-1"], "SamplerConfig.cfg_scale=-1.0"),
    (["--cfg-scale", "inf"], "SamplerConfig.cfg_scale=inf"),
    (["--top-k", "-3"], "SamplerConfig.top_k=-3"),
    (["--top-p", "0"], "SamplerConfig.top_p=0.0"),
    (["--num-samples", "1"], "EvalConfig.num_samples=1"),
])
def test_bad_evaluation_settings_are_one_line_before_sampling(exported, tmp_path, flag, message):
    error = one_line(subprocess.run([NPP, "evaluate", str(exported.path), *flag, "--out", str(tmp_path / "out")],
                                    capture_output=True, text=True, timeout=300, env=env(tmp_path)), "npp evaluate")
    assert message in error and not (tmp_path / "out").exists()


@pytest.mark.parametrize("labels,knobs,message", [
    ([], {}, "labels_B is empty"),
    ([2.7], {}, "class labels must be integers"),
    ([1], {"cfg_scale": float("inf")}, "SamplerConfig.cfg_scale=inf"),
    ([1], {"top_k": True}, "SamplerConfig.top_k=True"),
])
def test_generate_names_bad_arguments(labels, knobs, message):
    model = npp.GPT(npp.ModelConfig.preset("debug", vocab_size=64, num_classes=10, grid=8))
    with pytest.raises(npp.ConfigError, match=message.replace("(", r"\(").replace("[", r"\[")):
        npp.generate(model, torch.tensor(labels), **knobs)


# ---- faults while saving, and a damaged latest checkpoint -----------------------------------------

FAULTY_SAVE = """
import errno, sys, torch
real_save, calls = torch.save, []
def save(obj, f, *args, **kwargs):
    calls.append(f)
    if len(calls) > {after}:
        real_save(obj, f, *args, **kwargs)  # leaves a file behind, as a write that runs out of room does
        raise {error}
    return real_save(obj, f, *args, **kwargs)
torch.save = save
from npp.train import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.parametrize("error,reason", [
    ("OSError(errno.ENOSPC, 'No space left on device')", "the disk is full"),
    # Each case is a training process (~20 s): the other two under -m heavy.
    pytest.param("RuntimeError('[enforce fail at inline_container.cc:783] . unexpected pos 128 vs 0')",
                 "the disk is full", marks=pytest.mark.heavy),
    pytest.param("PermissionError(errno.EACCES, 'Permission denied')", "cannot be written to",
                 marks=pytest.mark.heavy),
])
def test_a_checkpoint_that_cannot_be_written_is_one_line_and_leaves_no_partial_folder(codes, tmp_path, error, reason):
    # The quickstart recipe's 2×2 stage ends at step 10: checkpoints at 7, 10, 14, 20; the save at 10 fails.
    script = FAULTY_SAVE.format(after=1, error=error)
    result = subprocess.run([sys.executable, "-c", script, *train_argv(codes, tmp_path / "runs", "f")], cwd=ROOT,
                            env=env(tmp_path), capture_output=True, text=True, timeout=600)
    message = one_line(result, "npp train")
    assert reason in message and "step-00000010" in message and "step-00000007 is the last complete one" in message
    run = RunDir(tmp_path / "runs" / "f")
    assert [p.name for p in run.checkpoints.iterdir() if p.name.startswith("step-")] == ["step-00000007"]
    assert run.latest_tag() == "step-00000007"
    resumed = npp_train(codes, tmp_path / "runs", "f")  # the disk has room again: the run goes on
    assert resumed.returncode == 0 and "resuming at step 7" in resumed.stdout


def test_a_damaged_latest_checkpoint_falls_back_to_the_one_before_it(codes, tmp_path):
    runs = tmp_path / "runs"
    assert npp_train(codes, runs, "d", **{"schedule.total-steps": 30}).returncode == 0
    run = RunDir(runs / "d")
    shutil.rmtree(run.export)
    for name in ("mp_rank_00_model_states.pt",):
        path = run.checkpoints / RunDir.tag(30) / name
        path.write_bytes(path.read_bytes()[:100])  # cut off, as a failed copy leaves it
    result = npp_train(codes, runs, "d", **{"schedule.total-steps": 30})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "warning: checkpoint" in result.stderr and "step-00000030" in result.stderr
    assert "resuming at step 28" in result.stdout and run.exported


# ---- extraction and evaluation on a small machine -----------------------------------------------

def test_an_extremely_elongated_image_is_skipped_and_listed(tmp_path):
    folder = tmp_path / "images" / "strip"
    folder.mkdir(parents=True)
    Image.new("RGB", (20_000, 1)).save(folder / "long.png")
    Image.new("RGB", (40, 36)).save(folder / "fine.png")
    vq = npp.VQModel(npp.VQConfig.preset("mnist-8x8"))
    vq.save_pretrained(tmp_path / "vq")
    result = subprocess.run([NPP, "extract", str(tmp_path / "images"), str(tmp_path / "codes"), "--tokenizer",
                             str(tmp_path / "vq"), "--crop", "centre", "--image-size", "32", "--workers", "0",
                             "--no-progress"], capture_output=True, text=True, timeout=300, env=env(tmp_path))
    assert result.returncode == 0, result.stderr[-2000:]
    skipped = json.loads((tmp_path / "codes" / "manifest.json").read_text())["skipped"]
    assert [s["file"] for s in skipped] == ["strip/long.png"] and "more elongated than 20:1" in skipped[0]["reason"]


@pytest.mark.heavy  # a regression check of a start-up hang; ~20 s
def test_evaluation_on_two_cores_starts_no_data_loader_workers(codes, exported, tmp_path):
    result = subprocess.run([NPP, "evaluate", str(exported.path), "--num-samples", "8", "--no-progress",
                             "--tokenizer", str(Path(codes).parent / "vq"), "--out", str(tmp_path / "out")],
                            capture_output=True, text=True, timeout=600, env=env(tmp_path))
    assert result.returncode == 0, result.stderr[-2000:]
    assert "worker processes" not in result.stderr
