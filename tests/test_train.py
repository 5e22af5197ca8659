"""The trainer, run as users run it: real processes, the DeepSpeed engine and launcher, kill -9.

Every run trains the debug GPT on codes of the first MNIST digits, encoded by a small random
tokenizer (training quality is not the point here; the loop, checkpoints and schedule are).
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import npp
from npp.config import TrainConfig
from npp.extract import mnist_codes
from npp.checkpoints import Checkpointer
from npp.runs import RunDir
from npp.schedule import lr_at, plan_stages, stage_at
from npp.weights import deepspeed_state_classes, safe_load

ROOT = Path(__file__).resolve().parents[1]
DEEPSPEED = Path(sys.executable).parent / "deepspeed"


@pytest.fixture(scope="module")
def codes(tmp_path_factory) -> str:
    torch.manual_seed(0)
    vq = npp.VQModel(npp.VQConfig.preset("mnist-8x8", codebook_size=64)).eval()
    return str(mnist_codes(vq, tmp_path_factory.mktemp("cache"), "train", limit=256).directory)


def env(tmp: Path) -> dict[str, str]:
    return {**os.environ, "DS_ACCELERATOR": "cpu", "NPP_CACHE": str(tmp / "cache"), "PYTHONUNBUFFERED": "1",
            "OMP_NUM_THREADS": "1"}


def train_args(codes: str, runs: Path, name: str, **overrides) -> list[str]:
    options = {"name": name, "runs_dir": str(runs), "data": codes, "model": "debug", "batch_size": 16,
               "schedule.total_steps": 30, "schedule.levels": 2, "schedule.lr": 1e-3,
               "schedule.warmup_steps": 3, "log_every": 1, "ckpt_every": 10, "num_workers": 0,
               "tensorboard": "false", "progress": "false", **overrides}
    return [item for key, value in options.items() for item in (f"--{key}", str(value))]


def train(codes, runs, name, *, launcher=(), timeout=300, **overrides) -> subprocess.CompletedProcess:
    command = [*launcher, *(["npp/train.py"] if launcher else [sys.executable, "-m", "npp.train"]),
               *train_args(codes, runs, name, **overrides)]
    return subprocess.run(command, cwd=ROOT, env=env(runs.parent), capture_output=True, text=True,
                          timeout=timeout)


def losses(runs: Path, name: str) -> list[float]:
    return [row["loss"] for row in RunDir(runs / name).read_metrics()]


@pytest.fixture(scope="module")
def reference(codes, tmp_path_factory) -> Path:
    """An uninterrupted 30-step NPP run (2×2 for 15 steps, then NTP) with dropout on."""
    runs = tmp_path_factory.mktemp("runs")
    result = train(codes, runs, "full")
    assert result.returncode == 0, result.stderr[-3000:]
    return runs


def test_lr_and_stage_transitions_follow_the_plan(reference):
    run = RunDir(reference / "full")
    config = npp.config.TrainConfig.from_dict(run.read_config())
    stages = plan_stages(config.schedule, grid=8)
    rows = run.read_metrics()
    assert [row["step"] for row in rows] == list(range(1, 31))
    for row in rows:  # row "step" counts finished steps; it logs the step with index step - 1
        assert row["lr"] == lr_at(config.schedule, stages, row["step"] - 1)
        assert row["patch_size"] == stage_at(stages, row["step"] - 1).patch_size
    assert [row["patch_size"] for row in rows] == [2] * 15 + [1] * 15
    # FLOPs grow 4× faster per step after the switch, as the model's own count says.
    flops = [row["flops_seen"] for row in rows]
    cfg = npp.ModelConfig.preset("debug", vocab_size=64, num_classes=10, grid=8)
    assert flops[0] == 16 * cfg.flops_per_sample(2) and flops[-1] - flops[-2] == 16 * cfg.flops_per_sample(1)
    assert rows[0]["loss"] == pytest.approx(torch.log(torch.tensor(64.0)).item(), rel=1e-5)
    assert rows[-1]["loss"] < rows[0]["loss"] - 0.2


def test_kill_9_then_resume_continues_the_same_trajectory(codes, reference):
    runs = reference
    command = [sys.executable, "-m", "npp.train", *train_args(codes, runs, "killed")]
    process = subprocess.Popen(command, cwd=ROOT, env=env(runs.parent), stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    metrics = runs / "killed" / "metrics.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and process.poll() is None:
        if metrics.is_file() and len(metrics.read_text().splitlines()) >= 23:
            break
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    run = RunDir(runs / "killed")
    assert run.latest_tag() == "step-00000020"  # killed after the step-20 checkpoint, before 30
    assert len(run.read_metrics()) >= 23

    result = train(codes, runs, "killed")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resuming at step 20" in result.stdout
    # The resumed run crosses nothing twice and reproduces every loss bit for bit, dropout included.
    assert losses(runs, "killed") == losses(runs, "full")


def test_export_loads_and_samples(reference):
    export = RunDir(reference / "full").export
    assert sorted(p.name for p in export.iterdir()) == ["config.json", "model.safetensors", "model.safetensors.sha256",
                                                         "source.json", "tokenizer.json"]
    model = npp.GPT.from_pretrained(export)
    assert model.config.grid == 8 and model.config.vocab_size == 64 and model.config.num_classes == 10
    tokens = npp.generate(model, torch.tensor([3, 7]), cfg_scale=2.0, generator=torch.Generator().manual_seed(0))
    assert tokens.shape == (2, 64) and tokens.max() < 64
    tokenizer = json.loads((export / "tokenizer.json").read_text())
    assert len(tokenizer["fingerprint"]) == 64
    assert json.loads((export / "source.json").read_text())["checkpoint"] == "step-00000030"


def test_keep_last_keeps_stage_ends_and_the_pointer_is_atomic(reference):
    run = RunDir(reference / "full")
    # keep_last = 2 pruned step 10; step 15 ends the 2×2 stage and stays, and loads on its own.
    assert run.checkpoint_tags() == ["step-00000015", "step-00000020", "step-00000030"]
    from npp.checkpoints import load_checkpoint_model

    coarse = load_checkpoint_model(run.path, "step-00000015")
    final = npp.GPT.from_pretrained(run.export)
    assert not torch.equal(coarse.output.weight, final.output.weight)
    assert torch.equal(load_checkpoint_model(run.path).output.weight, final.output.weight)
    assert run.latest_tag() == "step-00000030"
    # A checkpoint folder without its pointer (a crash mid-save) is never taken for the latest.
    shutil.copytree(run.checkpoints / "step-00000030", run.checkpoints / "step-00000040")
    (run.checkpoints / "step-00000040" / "meta.json").unlink()
    assert run.latest_tag() == "step-00000030"
    shutil.rmtree(run.checkpoints / "step-00000040")


NO_DROPOUT = {"model_overrides": json.dumps({"token_dropout": 0.0, "resid_dropout": 0.0, "ffn_dropout": 0.0,
                                             "class_dropout": 0.0})}


def test_two_process_zero2_trains_and_resumes_on_one_process(codes, tmp_path):
    runs = tmp_path / "runs"
    launcher = (str(DEEPSPEED), "--num_gpus", "2", "--master_port", str(29500 + os.getpid() % 1000))
    result = train(codes, runs, "z2", launcher=launcher, deepspeed="ds_configs/zero2.json", keep_last=5,
                   **NO_DROPOUT)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    assert "2 process(es) on cpu, fp32, ZeRO stage 2" in result.stdout
    two = losses(runs, "z2")
    assert two[-1] < two[0] - 0.2

    # The same run resumed at step 20 with one process: DeepSpeed's universal checkpoint re-shards
    # the optimizer state. Without dropout only the order of the gradient sums differs.
    shutil.copytree(runs / "z2", runs / "z1")
    shutil.rmtree(runs / "z1" / "checkpoints" / "step-00000030")
    Checkpointer(RunDir(runs / "z1"), "test").set_latest("step-00000020")
    result = train(codes, runs, "z1", deepspeed="ds_configs/zero2.json", keep_last=5, **NO_DROPOUT)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    assert "1 process(es) on cpu" in result.stdout and "resuming at step 20" in result.stdout
    one = losses(runs, "z1")
    assert one[:20] == two[:20]
    assert one[20:] == pytest.approx(two[20:], abs=1e-5)


def test_zero3_single_process_trains_and_exports_from_shards(codes, tmp_path):
    runs = tmp_path / "runs"
    result = train(codes, runs, "z3", deepspeed="ds_configs/zero3.json", **{"schedule.total_steps": 20})
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    assert "ZeRO stage 3" in result.stdout
    rows = losses(runs, "z3")
    assert rows[-1] < rows[0] - 0.1
    model = npp.GPT.from_pretrained(RunDir(runs / "z3").export)
    assert model.num_params() == npp.GPT(model.config).num_params()


@pytest.mark.heavy  # test_faults' SIGTERM-resume counters test covers this path by default
def test_sigterm_saves_and_the_run_finishes_on_resume(codes, tmp_path):
    runs = tmp_path / "runs"
    command = [sys.executable, "-m", "npp.train", *train_args(codes, runs, "term", ckpt_every=1000)]
    process = subprocess.Popen(command, cwd=ROOT, env=env(tmp_path), stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    metrics = runs / "term" / "metrics.jsonl"
    while process.poll() is None and not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 5):
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=120)
    assert process.returncode == 128 + signal.SIGTERM, output[-2000:]
    assert "stopped by a signal" in output
    tag = RunDir(runs / "term").latest_tag()
    assert tag is not None and int(tag.split("-")[1]) >= 5
    result = train(codes, runs, "term", ckpt_every=1000)
    assert result.returncode == 0 and f"resuming at step {int(tag.split('-')[1])}" in result.stdout
    assert [row["step"] for row in RunDir(runs / "term").read_metrics()] == list(range(1, 31))


def test_non_finite_loss_stops_and_keeps_the_checkpoint(codes, tmp_path):
    runs = tmp_path / "runs"
    result = train(codes, runs, "nan", ckpt_every=2, **{"schedule.lr": 1e30, "schedule.warmup_steps": 0})
    assert result.returncode == 2
    error = [line for line in result.stderr.splitlines() if line.startswith("npp train: error:")]
    assert len(error) == 1 and "loss became nan" in error[0] and "lower schedule.lr" in error[0]
    run = RunDir(runs / "nan")
    assert run.latest_tag() is not None and (run.checkpoints / run.latest_tag() / "meta.json").is_file()


@pytest.mark.parametrize("overrides,message", [
    ({"batch_size": 0}, "TrainConfig.batch_size=0: must be a whole number ≥ 1"),
    ({"schedule.segment_factor": 1.5}, "λ must lie in (0, 1)"),
    ({"model": "XXXL"}, "TrainConfig.model='XXXL': choose one of"),
    ({"data": "/no/such/folder"}, "neither an embedded data set"),
    ({"deepspeed": "ds_configs/nope.json"}, "no such file; use one of ds_configs/*.json"),
    ({"batch_size": 10, "micro_batch_size": 4}, "not a multiple of micro_batch_size=4"),
])
def test_bad_configs_fail_fast_with_one_line(codes, tmp_path, overrides, message):
    result = train(codes, tmp_path / "runs", "bad", **overrides)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("npp train: error:")
    assert message in result.stderr
    # Refused before any work: no run directory, nothing extracted into the cache.
    assert not (tmp_path / "runs" / "bad").exists() and not (tmp_path / "cache" / "codes").exists()


def test_ema_is_checkpointed_and_exported(codes, tmp_path):
    from safetensors.torch import load_file

    runs = tmp_path / "runs"
    result = train(codes, runs, "ema", ema_decay=0.9, **{"schedule.total_steps": 10})
    assert result.returncode == 0, result.stderr[-3000:]
    run = RunDir(runs / "ema")
    assert json.loads((run.export / "source.json").read_text())["ema"] is True
    ema = load_file(str(run.checkpoints / run.latest_tag() / "ema.safetensors"))
    exported = npp.GPT.from_pretrained(run.export).state_dict()
    assert all(torch.equal(exported[k], ema[k]) for k in ema)
    # The average lags the trained weights: the exported head is not the last step's head.
    trained = safe_load(run.checkpoints / run.latest_tag() / "mp_rank_00_model_states.pt",
                        allow=deepspeed_state_classes())["module"]
    assert not torch.equal(trained["output.weight"], ema["output.weight"])


@pytest.mark.heavy
def test_compiled_training_compiles_once_per_stage(codes, tmp_path):
    script = f"""
import json, torch, torch._dynamo.utils as du
from npp.config import TrainConfig, ScheduleConfig
from npp.train import Trainer
config = TrainConfig(name="c", runs_dir={str(tmp_path)!r}, data={codes!r}, model="debug", batch_size=16,
                     schedule=ScheduleConfig(total_steps=8, levels=2), compile=True, num_workers=0, log_every=1,
                     tensorboard=False, progress=False)
trainer = Trainer(config)
trainer.train()
print(json.dumps(dict(du.counters["stats"])))
trainer.close()
"""
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env(tmp_path), capture_output=True,
                            text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    stats = json.loads(result.stdout.strip().splitlines()[-1])
    assert stats["unique_graphs"] <= 2  # one forward graph per stage (2×2, then NTP)
    rows = losses(tmp_path, "c")
    assert len(rows) == 8 and rows[-1] < rows[0]


def test_resuming_with_another_experiment_is_refused(codes, reference):
    result = train(codes, reference, "full", **{"schedule.levels": 3})
    assert result.returncode == 2
    assert "was started with other values of schedule" in result.stderr and "--no-resume" in result.stderr


def test_a_run_saved_before_a_field_existed_is_the_same_experiment(codes, reference):
    saved = RunDir(reference / "full").read_config()
    config = TrainConfig.from_dict(saved)
    del saved["schedule"]["warmup_every_stage"]  # as written by an npp that did not know the field
    assert config.changes_from(saved) == []
    saved["schedule"]["warmup_every_stage"] = False
    assert config.changes_from(saved) == ["schedule"]


def test_a_checkpoint_loads_and_exports_after_its_data_is_deleted(codes, tmp_path):
    from npp.checkpoints import load_checkpoint_model

    data = shutil.copytree(codes, tmp_path / "codes")
    runs = tmp_path / "runs"
    result = train(str(data), runs, "orphan", **{"schedule.total_steps": 6, "ckpt_every": 3})
    assert result.returncode == 0, result.stderr[-3000:]
    shutil.rmtree(data)
    run = RunDir(runs / "orphan")
    shutil.rmtree(run.export)
    coarse = load_checkpoint_model(run.path, RunDir.tag(3))  # the checkpoint that ends the 2×2 stage
    assert coarse.config.grid == 8 and coarse.config.vocab_size == 64
    exported = subprocess.run([sys.executable, "-m", "npp.cli", "export", str(run.path)], capture_output=True,
                              text=True, timeout=300, env=env(tmp_path))
    assert exported.returncode == 0, exported.stderr[-2000:]
    assert torch.equal(npp.GPT.from_pretrained(run.export).output.weight, load_checkpoint_model(run.path).output.weight)
    assert json.loads((run.export / "tokenizer.json").read_text())["fingerprint"]


def test_npp_command_trains_and_exports(reference, tmp_path):
    npp_bin = str(Path(sys.executable).parent / "npp")
    helped = subprocess.run([npp_bin, "train", "--help"], capture_output=True, text=True, timeout=120)
    assert helped.returncode == 0 and "--schedule.segment-factor" in helped.stdout and "λ" in helped.stdout
    run = RunDir(reference / "full")
    shutil.rmtree(run.export)
    exported = subprocess.run([npp_bin, "export", str(run.path)], capture_output=True, text=True, timeout=300,
                              env=env(reference.parent))
    assert exported.returncode == 0, exported.stderr[-2000:]
    assert npp.GPT.from_pretrained(run.export).config.grid == 8
    missing = subprocess.run([npp_bin, "export", str(tmp_path / "nothing")], capture_output=True, text=True,
                             timeout=120)
    assert missing.returncode == 2 and missing.stderr.count("\n") == 1
    assert "is not a run directory" in missing.stderr


# ---- periodic evaluation ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def judged_codes(tmp_path_factory) -> str:
    """Codes of the first digits by the shipped mnist-8x8 tokenizer, which the manifest names, so that
    samples can be decoded and judged."""
    from npp.crops import CropConfig
    from npp.data import MnistSource
    from npp.extract import extract_codes
    from npp.files import ASSETS
    from npp.tokenizer import load_embedded_tokenizer

    out = tmp_path_factory.mktemp("judged") / "codes"
    extract_codes(MnistSource("train", 256), load_embedded_tokenizer("mnist-8x8"), out,
                  CropConfig("none", size=32), tokenizer_path=ASSETS / "mnist-8x8")
    return str(out)


@pytest.mark.heavy  # the notebook and README pairs evaluate periodically by default
def test_periodic_evaluation_logs_metrics_at_its_steps_and_leaves_training_unchanged(judged_codes, tmp_path):
    runs = tmp_path / "runs"
    short = {"schedule.total_steps": 12, "ckpt_every": 100}
    plain = train(judged_codes, runs, "plain", **short)
    judged = train(judged_codes, runs, "judged", eval_every=5, eval_samples=20, **short)
    assert plain.returncode == 0 and judged.returncode == 0, judged.stderr[-3000:]
    run = RunDir(runs / "judged")
    assert [row["loss"] for row in run.train_rows()] == losses(runs, "plain")
    rows = run.eval_rows()
    assert [row["step"] for row in rows] == [5, 6, 10, 12]  # every 5 steps and at both stage ends
    assert [row["patch_size"] for row in rows] == [2, 2, 1, 1]
    for row in rows:
        assert {"fid", "is", "precision", "recall", "class_accuracy", "flops_seen"} <= set(row)
        assert row["fid"] > 0 and 0 <= row["class_accuracy"] <= 1
        assert (run.path / row["samples"]).is_file()
    assert rows[-1]["flops_seen"] == run.train_rows()[-1]["flops_seen"]


def test_a_bad_evaluation_reference_fails_before_training(judged_codes, tmp_path):
    result = train(judged_codes, tmp_path / "runs", "bad", eval_every=5, eval_reference=str(tmp_path / "nowhere"))
    assert result.returncode == 2 and result.stderr.count("\n") == 1
    assert "is not an image folder" in result.stderr and "--eval-reference" in result.stderr
    assert not (tmp_path / "runs" / "bad").exists()  # refused before the run directory was written


# ---- precision ----------------------------------------------------------------------------------

PRECISION_SCRIPT = """
import json, sys, torch
from npp.batches import micro_batches
from npp.config import ScheduleConfig, TrainConfig
from npp.train import Trainer
config = TrainConfig(name=sys.argv[2], runs_dir=sys.argv[3], data=sys.argv[4], model="debug", batch_size=16,
                     precision=sys.argv[1], schedule=ScheduleConfig(total_steps=6, levels=2, lr=1e-3, warmup_steps=2),
                     num_workers=0, tensorboard=False, progress=False)
trainer = Trainer(config)
grads = set()
for p in trainer.engine.module.parameters():
    p.register_hook(lambda g: grads.add(str(g.dtype)))
batches = micro_batches(trainer.data, trainer.order, 0, 6, rank=0, world=1, micro=16, num_workers=0, pin_memory=False)
losses = [trainer.train_step(step, [next(batches)]).item() for step in range(6)]
state = {str(v.dtype) for s in trainer.optimizer.state.values() for v in s.values() if torch.is_tensor(v) and v.dim()}
print(json.dumps({"losses": losses, "grads": sorted(grads), "state": sorted(state),
                  "params": sorted({str(p.dtype) for p in trainer.engine.module.parameters()}),
                  "summary": trainer.summary()}))
trainer.close()
"""


def test_amp_bf16_keeps_fp32_weights_gradients_and_optimizer_state(codes, tmp_path):
    results = {}
    for precision in ("amp-bf16", "fp32"):
        result = subprocess.run([sys.executable, "-c", PRECISION_SCRIPT, precision, precision, str(tmp_path), codes],
                                cwd=ROOT, env=env(tmp_path), capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]
        results[precision] = json.loads(result.stdout.strip().splitlines()[-1])
    amp, fp32 = results["amp-bf16"], results["fp32"]
    assert amp["params"] == amp["grads"] == amp["state"] == ["torch.float32"]
    assert "1 process(es) on cpu, amp-bf16" in amp["summary"]
    # The matmuls ran in bf16: close to fp32 (bf16 keeps 8 bits of mantissa), not equal to it.
    assert amp["losses"] == pytest.approx(fp32["losses"], rel=2e-2) and amp["losses"] != fp32["losses"]
