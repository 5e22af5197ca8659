"""The shipped DeepSpeed configs pass the trainer's checks, and ds_configs/README.md's memory table
is what the presets' parameter counts give. No DeepSpeed process is started."""

import json
import re
from pathlib import Path

import pytest
import torch

import npp
from npp.config import ConfigError, TrainConfig
from npp.model import GPT
from npp.distributed import deepspeed_config, zero_stage

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "ds_configs").glob("*.json"))
README = ROOT / "ds_configs" / "README.md"
GiB = 2**30


def leaves(tree, path=()):
    """(path, value) of every non-dict value in a nested dict."""
    for key, value in tree.items():
        if isinstance(value, dict):
            yield from leaves(value, (*path, key))
        else:
            yield (*path, key), value


def test_every_config_is_listed():
    assert [p.name for p in CONFIGS] == ["zero2.json", "zero2_offload.json", "zero3.json"]


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_auto_values_are_filled_from_the_run_config(path):
    config = TrainConfig(batch_size=64, micro_batch_size=4, grad_clip=0.5, deepspeed=str(path))
    filled = deepspeed_config(config, world=8, bf16=True)
    assert not [p for p, value in leaves(filled) if value == "auto"]
    assert filled["train_batch_size"] == 64
    assert filled["train_micro_batch_size_per_gpu"] == 4
    assert filled["gradient_accumulation_steps"] == 2  # 64 / (4 × 8)
    assert filled["gradient_clipping"] == 0.5
    assert filled["bf16"] == {"enabled": True}
    # Everything the file sets itself passes through unchanged.
    user = json.loads(path.read_text())
    for key, value in leaves(user):
        if value != "auto":
            node = filled
            for part in key:
                node = node[part]
            assert node == value, key
    assert zero_stage(filled) == user["zero_optimization"]["stage"]


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_fp32_on_one_process_without_accumulation(path):
    filled = deepspeed_config(TrainConfig(batch_size=16, deepspeed=str(path)), world=1, bf16=False)
    assert (filled["train_micro_batch_size_per_gpu"], filled["gradient_accumulation_steps"]) == (16, 1)
    assert filled["bf16"] == {"enabled": False}


@pytest.mark.parametrize("section", ["optimizer", "scheduler"])
def test_optimizer_and_scheduler_sections_are_refused(tmp_path, section):
    user = {**json.loads((ROOT / "ds_configs" / "zero2.json").read_text()), section: {"type": "AdamW"}}
    path = tmp_path / "with_section.json"
    path.write_text(json.dumps(user))
    with pytest.raises(ConfigError, match=f"remove the '{section}' section"):
        deepspeed_config(TrainConfig(batch_size=16, deepspeed=str(path)), world=1, bf16=False)


def test_a_batch_number_that_disagrees_is_refused(tmp_path):
    path = tmp_path / "fixed_batch.json"
    path.write_text(json.dumps({"train_batch_size": 32, "zero_optimization": {"stage": 2}}))
    with pytest.raises(ConfigError, match="train_batch_size=32 disagrees"):
        deepspeed_config(TrainConfig(batch_size=64, deepspeed=str(path)), world=1, bf16=False)


# ---- the README's memory table ------------------------------------------------------------------

def readme_rows() -> dict[str, list[str]]:
    """Cells of the table whose header starts with | preset | parameters | 16 B/param."""
    lines = README.read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| preset | parameters | 16 B/param"))
    rows = {}
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows[cells[0]] = cells[1:]
    return rows


def exact_params(preset: str) -> int:
    config = npp.ModelConfig.preset(preset, vocab_size=16384, num_classes=1000, grid=16)
    with torch.device("meta"):  # counts without allocating 3B parameters
        return GPT(config).num_params()


def test_readme_memory_table_matches_the_presets():
    rows = readme_rows()
    assert list(rows) == ["B", "L", "XL", "XXL", "2B", "3B"]
    for preset, cells in rows.items():
        params = exact_params(preset)
        assert int(cells[0].replace(",", "")) == params, preset
        expected = [16 * params] + [2 * params + 14 * params / n for n in (1, 8, 16, 32)] \
            + [16 * params / n for n in (8, 32)]
        assert [float(c) for c in cells[1:]] == [round(b / GiB, 2) for b in expected], preset


def test_readme_parameter_counts_agree_with_the_main_readme():
    main = (ROOT / "README.md").read_text()
    for preset, cells in readme_rows().items():
        assert re.search(rf"^\| {re.escape(preset)} \|.*\| {re.escape(cells[0])} ", main, re.MULTILINE), preset
