"""Training small VQ tokenizers: the loss falls, dead codes come back, resume is exact, errors are clear."""

import json

import pytest
import torch

from npp.cli import main
from npp.config import ConfigError, VQConfig
from npp.data import to_unit_range
from npp.tokenizer import VQModel
from npp.tokenizer_train import (CodeUsage, TokenizerTrainConfig, TokenizerTrainer, code_histogram,
                                 reseed_codes, usage_and_perplexity)
from npp.weights import read_safetensors

# A few batch-16 steps of mnist-8x8 on 256 digits; no periodic evaluation, no judge, quiet.
TINY = dict(steps=6, batch_size=16, warmup_steps=1, train_images=256, log_every=1, eval_every=0, ckpt_every=0,
            test_images=50, classifier="none", progress=False)


def tiny(**overrides) -> TokenizerTrainConfig:
    return TokenizerTrainConfig(**{**TINY, **overrides})


def flags(**settings) -> list[str]:
    """The `npp tokenizer train` flags for these config values."""
    args = []
    for name, value in settings.items():
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            args.append(flag if value else f"--no-{name.replace('_', '-')}")
        else:
            args += [flag, str(value)]
    return args


def used_codes(model: VQModel, images_B3HW: torch.Tensor) -> int:
    return int((code_histogram(model.encode(images_B3HW), model.config.codebook_size) > 0).sum())


def test_loss_decreases(tmp_path):
    trainer = TokenizerTrainer(tiny(steps=12), tmp_path)
    losses = [trainer.train_step()["loss"] for _ in range(12)]
    assert sum(losses[-3:]) < 0.6 * sum(losses[:3]), losses


def test_code_usage_finds_codes_unused_for_a_while():
    usage = CodeUsage(codebook_size=4, decay=0.5, dead_threshold=0.3)
    usage.update(torch.tensor([5, 5, 0, 0]))
    assert usage.dead().tolist() == []                      # one idle step: 0.5 × uniform share, alive
    usage.update(torch.tensor([5, 5, 0, 0]))
    assert usage.dead().tolist() == [2, 3]                  # two idle steps: 0.25 × uniform < 0.3
    usage.revive(torch.tensor([2]))
    assert usage.dead().tolist() == [3]


def test_usage_and_perplexity_of_a_histogram():
    usage, perplexity = usage_and_perplexity(torch.tensor([10, 10, 0, 0]))
    assert usage == 0.5 and perplexity == pytest.approx(2.0)


def test_reseeding_copies_encoder_outputs_and_clears_their_adam_moments():
    model = VQModel(VQConfig.preset("mnist-8x8"))
    weight_VC = model.quantize.embedding.weight
    optimizer = torch.optim.AdamW([weight_VC], lr=1e-3)
    weight_VC.pow(2).sum().backward()
    optimizer.step()
    z_NC = torch.nn.functional.normalize(torch.randn(100, weight_VC.shape[1]), dim=-1)
    codes = torch.tensor([3, 7, 11])
    kept_moment = optimizer.state[weight_VC]["exp_avg"][0].clone()

    reseed_codes(model, optimizer, codes, z_NC, torch.Generator().manual_seed(0))

    moved_VC = weight_VC.detach()[codes]
    assert all(any(torch.equal(row, z) for z in z_NC) for row in moved_VC)       # copies of encoder outputs
    assert len({tuple(row.tolist()) for row in moved_VC}) == 3                   # distinct ones
    for moment in ("exp_avg", "exp_avg_sq"):
        assert not optimizer.state[weight_VC][moment][codes].any()
    assert torch.equal(optimizer.state[weight_VC]["exp_avg"][0], kept_moment)


def _collapsed_trainer(tmp_path, reseed_every: int) -> TokenizerTrainer:
    """Every code the same vector: only code 0 can be chosen, and a few of its twins where the matmul's
    rounding happens to break the tie in their favour."""
    trainer = TokenizerTrainer(tiny(reseed_every=reseed_every, usage_decay=0.5, dead_threshold=0.3),
                               tmp_path / f"reseed-{reseed_every}")
    with torch.no_grad():
        trainer.model.quantize.embedding.weight[:] = trainer.model.quantize.embedding.weight[0]
    return trainer


def test_dead_codes_are_reseeded_and_used_again(tmp_path):
    reviving, collapsed = _collapsed_trainer(tmp_path, reseed_every=2), _collapsed_trainer(tmp_path, reseed_every=0)
    digits_B3HW = to_unit_range(reviving.train_images[:64])
    assert used_codes(reviving.model, digits_B3HW) <= 8

    reseeded = sum(reviving.train_step()["reseeded"] for _ in range(4))
    for _ in range(4):
        collapsed.train_step()

    assert reseeded >= 250                                     # nearly every code was dead and got moved
    assert used_codes(collapsed.model, digits_B3HW) <= 8       # without the remedy nothing recovers
    assert used_codes(reviving.model, digits_B3HW) >= 64       # with it, many codes are chosen again


def test_resume_equals_an_uninterrupted_run(tmp_path):
    # Reseeding every 2 steps with a short usage memory, so the resumed state includes re-seeded codes.
    settings = dict(TINY, steps=6, ckpt_every=3, reseed_every=2, usage_decay=0.5, dead_threshold=0.3)
    assert main(["tokenizer", "train", "--out", str(tmp_path / "whole"), *flags(**settings)]) == 0

    interrupted = TokenizerTrainer(TokenizerTrainConfig(**settings), tmp_path / "split")
    interrupted.train(until=3)
    assert interrupted.step == 3 and (tmp_path / "split" / "checkpoints" / "latest.pt").is_file()
    assert main(["tokenizer", "train", "--out", str(tmp_path / "split"), "--resume", *flags(**settings)]) == 0

    _, whole = read_safetensors(tmp_path / "whole", "npp.VQModel", "test")
    _, split = read_safetensors(tmp_path / "split", "npp.VQModel", "test")
    assert whole.keys() == split.keys()
    assert all(torch.equal(whole[k], split[k]) for k in whole)

    def training_rows(run: str) -> list[tuple]:
        rows = [json.loads(line) for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
        return [(r["step"], r["loss"], r["reseeded"]) for r in rows if "loss" in r]

    assert training_rows("split") == training_rows("whole")           # each step logged once, identically
    assert [step for step, _, _ in training_rows("whole")] == [1, 2, 3, 4, 5, 6]
    assert sum(reseeded for _, _, reseeded in training_rows("whole")) > 0
    metrics = json.loads((tmp_path / "split" / "metrics.json").read_text())
    assert metrics["steps"] == 6 and metrics["test"]["images"] == 50


def test_resume_refuses_a_changed_recipe(tmp_path, capsys):
    settings = dict(TINY, steps=2)
    assert main(["tokenizer", "train", "--out", str(tmp_path), *flags(**settings)]) == 0
    assert main(["tokenizer", "train", "--out", str(tmp_path), "--resume", *flags(**{**settings, "lr": 3e-3})]) == 2
    assert "lr=0.002 (not 0.003)" in capsys.readouterr().err
    # Without --resume an existing run is never overwritten.
    assert main(["tokenizer", "train", "--out", str(tmp_path), *flags(**settings)]) == 2
    assert "pass --resume" in capsys.readouterr().err


@pytest.mark.parametrize("field, value, fix", [
    ("lr", -1.0, "must be positive"),
    ("preset", "mnist-4x4", "choose one of llamagen-vq16, mnist-8x8, mnist-16x16"),
    ("warmup_steps", 6, "less than steps=6"),
    ("dead_threshold", 1.5, "must lie in (0, 1)"),
    ("betas", (0.9, 1.0), "two values in [0, 1)"),
    ("batch_size", 0, "positive integer"),
    ("usage_decay", 1.0, "must lie in (0, 1)"),
])
def test_bad_settings_fail_in_one_line_naming_field_and_fix(field, value, fix):
    with pytest.raises(ConfigError) as error:
        tiny(**{field: value})
    message = str(error.value)
    assert f"TokenizerTrainConfig.{field}=" in message and fix in message and "\n" not in message


def test_cli_reports_bad_settings_in_one_line(tmp_path, capsys):
    assert main(["tokenizer", "train", "--out", str(tmp_path), "--dead-threshold", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("npp tokenizer train: error: TokenizerTrainConfig.dead_threshold=0.0") and "\n" not in err


def test_cli_help_lists_every_setting_with_its_docstring(capsys):
    with pytest.raises(SystemExit) as done:
        main(["tokenizer", "train", "--help"])
    assert done.value.code == 0
    help_text = " ".join(capsys.readouterr().out.split())
    for flag in ("--out", "--resume", "--preset", "--steps", "--betas", "--dead-threshold", "--reseed-every",
                 "--l1-weight", "--no-progress"):
        assert flag in help_text
    assert "A code is dead when its EMA frequency is below" in help_text


def test_cli_two_step_run_writes_a_loadable_tokenizer(tmp_path, capsys):
    out = tmp_path / "vq"
    assert main(["tokenizer", "train", "--out", str(out), *flags(**dict(TINY, steps=2, preset="mnist-16x16"))]) == 0
    assert "2 steps" in capsys.readouterr().out
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == 2 and metrics["command"].startswith(f"npp tokenizer train --out {out} --steps 2")
    assert {"recon_mse", "codebook_usage", "perplexity"} <= metrics["test"].keys()
    assert metrics["config"]["preset"] == "mnist-16x16" and metrics["wall_time_s"] > 0
    vq = VQModel.from_pretrained(out)
    assert vq.fingerprint() == metrics["fingerprint"]
    assert vq.encode(torch.zeros(1, 3, 32, 32)).shape == (1, 16, 16)
