"""The quickstart: the shipped tokenizer and classifier, two real runs, and digits that look right."""

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import npp
from npp.config import TrainConfig
from npp.fidelity import class_accuracy
from npp.quickstart import QUICKSTART_RUNS, digit_grid, quickstart_config
from npp.runs import RunDir
from npp.tokenizer import load_embedded_tokenizer

ROOT = Path(__file__).resolve().parents[1]
SHORT = 8
"""Steps of the shortened quickstart: its 2×2 stage ends at 4."""


def test_the_two_configs_differ_only_in_name_and_schedule():
    ntp, npp_ = (quickstart_config(name).to_dict() for name in QUICKSTART_RUNS)
    assert ntp["schedule"].pop("levels") == 1 and npp_["schedule"].pop("levels") == 2
    assert npp_["schedule"]["segment_factor"] == 0.5
    assert {k: v for k, v in ntp.items() if k != "name"} == {k: v for k, v in npp_.items() if k != "name"}
    # The recipe of the quickstart, as it was measured (README): 1,200 steps of 32 images, lr 2e-3.
    assert (ntp["batch_size"], ntp["schedule"]["total_steps"], ntp["schedule"]["lr"]) == (32, 1200, 2e-3)
    assert ntp["model_overrides"] == {"n_layer": 4, "n_head": 4, "dim": 192, "token_dropout": 0.0,
                                      "resid_dropout": 0.0, "ffn_dropout": 0.0}


def test_an_untrained_model_draws_no_digits():
    # The judge is not fooled by noise: samples of a random model are rarely the requested digit.
    vq = load_embedded_tokenizer("mnist-8x8")
    model = npp.GPT(npp.ModelConfig.preset("debug", vocab_size=256, num_classes=10, grid=8)).eval()
    torch.nn.init.normal_(model.output.weight, std=0.02)
    images = digit_grid(npp.Pipeline(model, vq), per_class=5)
    assert images.shape == (50, 32, 32, 3) and images.dtype == torch.uint8
    assert class_accuracy(images, torch.arange(10).repeat_interleave(5)) < 0.4


@pytest.mark.heavy
def test_quickstart_trains_both_runs_and_they_draw_the_requested_digits(tmp_path):
    env = {**os.environ, "NPP_CACHE": str(tmp_path / "cache"), "DS_ACCELERATOR": "cpu"}
    result = subprocess.run([sys.executable, "-m", "npp.quickstart", "--runs-dir", str(tmp_path / "runs")],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=3600)
    assert result.returncode == 0, result.stderr[-3000:]
    flops = {}
    for name in QUICKSTART_RUNS:
        run = RunDir(tmp_path / "runs" / name)
        assert (run.samples / "quickstart.png").is_file()
        results = json.loads(next(run.path.glob("eval/*/results.json")).read_text())
        assert results["num_samples"] == 1000
        # Recognisable digits of the requested class: chance is 10%, an untrained model stays below 40%.
        assert results["metrics"]["class_accuracy"] >= 0.6, (name, results["metrics"])
        flops[name] = run.train_rows()[-1]["flops_seen"]
    assert flops["quickstart-npp"] < 0.7 * flops["quickstart-ntp"]
    assert result.stdout.count("show the requested digit") == 2


def test_the_quickstart_evaluates_at_its_quarters_and_stage_ends_on_a_few_hundred_samples():
    for name in QUICKSTART_RUNS:
        config = quickstart_config(name)
        stage_ends = {stage.end for stage in npp.plan_stages(config.schedule)}
        every = set(range(config.eval_every, config.schedule.total_steps + 1, config.eval_every))
        assert sorted(every | stage_ends) == [300, 600, 900, 1200] and config.eval_samples == 300
        # Observation only: the run's identity (what it computes) is that of the same run without them.
        unevaluated = dataclasses.replace(config, eval_every=0, eval_samples=TrainConfig().eval_samples)
        assert unevaluated.experiment_id() == config.experiment_id()


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> Path:
    """Codes of the first digits by the shipped mnist-8x8 tokenizer: the periodic evaluation can decode and judge them."""
    from npp.crops import CropConfig
    from npp.data import MnistSource
    from npp.extract import extract_codes
    from npp.files import ASSETS

    out = tmp_path_factory.mktemp("digits") / "codes"
    extract_codes(MnistSource("train", 256), load_embedded_tokenizer("mnist-8x8"), out, CropConfig("none", size=32),
                  tokenizer_path=ASSETS / "mnist-8x8", progress=False)
    return out


def test_periodic_evaluations_leave_the_trained_weights_and_losses_bit_for_bit(digits, tmp_path):
    """The quickstart recipe shortened to 8 steps, once with evaluations at its quarters and stage ends, once
    without: sampling draws from its own generators, so the weights the quickstart evaluates are the same."""
    from test_faults import NPP, env

    def start(name: str, eval_every: int) -> subprocess.Popen:
        argv = [NPP, "train", "--recipe", "quickstart", "--model", "tiny", "--data", str(digits), "--name", name,
                "--runs-dir", str(tmp_path / "runs"), "--schedule.total-steps", str(SHORT), "--log-every", "1",
                "--eval-every", str(eval_every), "--eval-samples", "20", "--progress", "false"]
        return subprocess.Popen(argv, cwd=ROOT, env=env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)

    # Side by side, one thread each: the two runs share nothing but the read-only data.
    processes = {"judged": start("judged", SHORT // 4), "plain": start("plain", 0)}
    for process in processes.values():
        _, err = process.communicate(timeout=600)
        assert process.returncode == 0, err[-3000:]
    judged, plain = (RunDir(tmp_path / "runs" / name) for name in processes)
    assert [row["step"] for row in judged.eval_rows()] == [2, 4, 6, 8] and plain.eval_rows() == []
    assert [row["loss"] for row in judged.train_rows()] == [row["loss"] for row in plain.train_rows()]
    weights, reference = (load_file(run.export / "model.safetensors") for run in (judged, plain))
    assert weights.keys() == reference.keys()
    assert all(torch.equal(weights[key], reference[key]) for key in weights)
