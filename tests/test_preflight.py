"""The memory preflight: its activation constants are what the model saves, its totals match the H200's
peaks, and a run that cannot fit is refused before anything is read, built or written."""

import os
import subprocess
import sys
from contextlib import nullcontext
from pathlib import Path

import pytest
import torch

import npp
from npp.patching import next_patch_loss
from npp.preflight import ACTIVATION_BYTES, GiB, Plan, check_fits, estimate

ROOT = Path(__file__).resolve().parents[1]


def saved_bytes(model: npp.GPT, batch: int, precision: str) -> int:
    """Bytes of the tensors the training forward saves for its backward (parameters excluded)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in params:
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    g = torch.Generator().manual_seed(batch)
    tokens = torch.randint(0, model.config.vocab_size, (batch, model.config.seq_len), generator=g)
    labels = torch.randint(0, model.config.num_classes, (batch,), generator=g)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if precision == "amp-bf16" else nullcontext()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor), autocast:
        next_patch_loss(model(tokens, labels), tokens)
    return sum(storages.values())


@pytest.mark.parametrize("precision", ["fp32", "amp-bf16", "bf16"])
def test_the_activation_constants_are_what_the_forward_saves(precision):
    config = npp.ModelConfig(vocab_size=100, num_classes=10, grid=8, n_layer=3, n_head=4, dim=96, ffn_dim=320)
    model = npp.GPT(config).train()
    if precision == "bf16":
        model = model.to(torch.bfloat16)  # DeepSpeed's bf16 mode: the weights themselves in bf16
    per_token = (saved_bytes(model, 6, precision) - saved_bytes(model, 2, precision)) / (4 * config.seq_len)
    per_D, per_H, once = ACTIVATION_BYTES[precision]
    expected = config.n_layer * (per_D * config.dim + per_H * config.hidden_dim) + once * config.dim
    expected += 4 * config.vocab_size  # the loss keeps its fp32 log-softmax
    assert per_token == pytest.approx(expected, rel=0.05)


@pytest.mark.parametrize("preset,micro_batch,measured_gib", [
    ("XXL", 64, 29.97), ("XXL", 128, 31.38), ("XXL", 256, 44.30),
    ("2B", 128, 41.38), ("2B", 256, 51.21), ("2B", 512, 77.34),
])
def test_the_estimate_is_within_20_percent_of_the_peaks_measured_on_an_h200(preset, micro_batch, measured_gib):
    # docs/benchmarks.md: one H200, ZeRO-2, activation checkpointing, DeepSpeed's bf16 mode, NTP at grid 16.
    model = npp.ModelConfig.preset(preset, vocab_size=16384, num_classes=1000, grid=16)
    plan = Plan(model, micro_batch, world=1, zero_stage=2, precision="bf16", checkpointing=True, device="cuda")
    assert estimate(plan).peak / GiB == pytest.approx(measured_gib, rel=0.20)


def test_zero_and_more_gpus_shrink_the_state_as_documented():
    model = npp.ModelConfig.preset("XXL", vocab_size=16384, num_classes=1000, grid=16)
    one = estimate(Plan(model, 1, precision="bf16", zero_stage=2, world=1))
    eight = estimate(Plan(model, 1, precision="bf16", zero_stage=2, world=8))
    assert eight.weights == one.weights and eight.optimizer == pytest.approx(one.optimizer / 8)
    three = estimate(Plan(model, 1, precision="bf16", zero_stage=3, world=8))
    assert three.weights == pytest.approx(one.weights / 8)
    offloaded = estimate(Plan(model, 1, precision="bf16", zero_stage=2, offload=True))
    assert offloaded.optimizer == 0 and offloaded.host > 0
    # amp-bf16 keeps fp32 weights and gradients: 4 bytes each, and autocast's bf16 copies.
    amp = estimate(Plan(model, 1, precision="amp-bf16", zero_stage=0))
    assert amp.gradients == 2 * one.gradients and amp.weights == 3 * one.weights


def test_a_run_that_does_not_fit_is_refused_with_the_fixes_that_do():
    model = npp.ModelConfig.preset("XXL", vocab_size=16384, num_classes=1000, grid=16)
    plan = Plan(model, 256, world=1, zero_stage=2, precision="amp-bf16", device="cuda")
    with pytest.raises(npp.ConfigError) as refused:
        check_fits(plan, batch=256, budget=80 * GiB)
    message = str(refused.value)
    assert "\n" not in message and "needs ≈" in message and "80.0 GiB available" in message
    assert "--activation-checkpointing" in message and "--micro-batch-size" in message
    assert check_fits(plan.__class__(model, 256, 1, 2, False, "amp-bf16", True, "cuda"), 256, 80 * GiB)
    cpu = Plan(model, 256, precision="fp32", device="cpu")
    with pytest.raises(npp.ConfigError, match="try a GPU"):
        check_fits(cpu, batch=256, budget=22 * GiB)


def run_train(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "NPP_CACHE": str(tmp_path / "cache"), "DS_ACCELERATOR": "cpu"}
    return subprocess.run([sys.executable, "-m", "npp.train", "--runs-dir", str(tmp_path / "runs"), *args],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def test_npp_train_refuses_xxl_on_this_machine_before_any_work(tmp_path):
    result = run_train(tmp_path, "--recipe", "paper", "--model", "XXL", "--name", "xxl")
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("npp train: error: this run needs ≈")
    assert "host has" in result.stderr and "a GPU" in result.stderr
    assert not (tmp_path / "runs").exists()  # no run directory
    assert not (tmp_path / "cache").exists()  # no extraction of the embedded data


def test_the_train_notebook_stops_an_xxl_run_in_its_first_cell(tmp_path):
    import nbformat

    env = {**os.environ, "NPP_CACHE": str(tmp_path / "cache")}
    out = tmp_path / "xxl.ipynb"
    result = subprocess.run([str(Path(sys.executable).with_name("papermill")), "notebooks/train.ipynb", str(out),
                             "-p", "model", "XXL", "-p", "runs_dir", str(tmp_path / "runs")],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode != 0
    code = [cell for cell in nbformat.read(str(out), as_version=4).cells if cell.cell_type == "code"]
    failed = [cell for cell in code if any(o.output_type == "error" for o in cell.outputs)]
    assert len(failed) == 1 and "# Check every parameter" in failed[0].source
    error = next(o for o in failed[0].outputs if o.output_type == "error")
    assert error.ename == "ConfigError" and "this run needs ≈" in error.evalue and "a GPU" in error.evalue
    assert not (tmp_path / "runs").exists() and not (tmp_path / "cache").exists()
