"""A count is an integer, never a boolean: `true` in a JSON file is refused in one line, not read as 1.

Python's bool is an int subclass, so a bare isinstance check lets `"codebook_size": true` build a one-code
codebook; every integer field goes through npp.errors.is_int instead.
"""

from __future__ import annotations

import json
import subprocess

import pytest

from npp.classifier import ClassifierConfig, ClassifierTrainConfig
from npp.config import ConfigError, VQConfig
from npp.tokenizer import VQModel
from npp.tokenizer_train import TokenizerTrainConfig
from test_faults import NPP, ROOT, env, one_line


@pytest.mark.parametrize("make, field", [
    (lambda: VQConfig.preset("mnist-8x8", codebook_size=True), "VQConfig.codebook_size"),
    (lambda: VQConfig.preset("mnist-8x8", ch_mult=(1, True)), "VQConfig.ch_mult"),
    (lambda: ClassifierConfig(num_classes=True), "ClassifierConfig.num_classes"),
    (lambda: ClassifierConfig(widths=(32, True)), "ClassifierConfig.widths"),
    (lambda: ClassifierTrainConfig(epochs=True), "ClassifierTrainConfig.epochs"),
    (lambda: ClassifierTrainConfig(train_images=False), "ClassifierTrainConfig.train_images"),
    (lambda: TokenizerTrainConfig(batch_size=True), "TokenizerTrainConfig.batch_size"),
    (lambda: TokenizerTrainConfig(log_every=True), "TokenizerTrainConfig.log_every"),
    (lambda: TokenizerTrainConfig(eval_images=True), "TokenizerTrainConfig.eval_images"),
])
def test_a_boolean_is_not_an_integer_setting(make, field):
    with pytest.raises(ConfigError) as error:
        make()
    message = str(error.value)
    assert message.startswith(f"{field}=") and "\n" not in message


def test_a_tokenizer_folder_whose_config_says_true_is_refused_in_one_line(tmp_path):
    VQModel(VQConfig.preset("mnist-8x8", codebook_size=64)).save_pretrained(tmp_path / "vq")
    config_json = tmp_path / "vq" / "config.json"
    config = json.loads(config_json.read_text())
    # Before the fix this loaded as a one-code codebook and failed later on the weights' shapes.
    config_json.write_text(json.dumps({**config, "codebook_size": True}))
    result = subprocess.run([NPP, "extract", "mnist:test", str(tmp_path / "codes"), "--tokenizer", str(tmp_path / "vq"),
                             "--no-progress"], cwd=ROOT, env=env(tmp_path), capture_output=True, text=True,
                            timeout=600)
    assert "VQConfig.codebook_size=True: must be a positive integer" in one_line(result, "npp extract")
    assert not (tmp_path / "codes" / "codes.npy").exists()
