"""TokenizerRef: the one type for the tokenizer reference of a manifest, a checkpoint's meta.json and an export's
tokenizer.json. The JSON those files have always held reads back unchanged; an export whose tokenizer is on
another machine is refused in one line naming its fingerprint and the option that supplies it."""

import json
import subprocess

import pytest

import npp
from npp.errors import CheckpointError
from npp.tokenizer import load_embedded_tokenizer
from npp.tokenref import TokenizerRef
from test_faults import NPP, env, one_line

from conftest import random_weights


@pytest.fixture(scope="module")
def shipped() -> TokenizerRef:
    return TokenizerRef.shipped("mnist-8x8")


def test_the_recorded_json_shapes_read_back_unchanged(shipped):
    written = {"data": "codes/in64", "source": {"kind": "folder", "path": "/data/in"}, "fingerprint": "ab" * 32,
               "path": "/models/vq.pt", "config": shipped.config.to_dict()}  # what the trainer has always written
    assert TokenizerRef.from_dict(written, where="meta.json").to_dict() == written
    assert list(TokenizerRef.from_dict(written, where="meta.json").to_dict()) == list(written)  # the key order too
    hand_made = {"data": "mnist-8x8", "fingerprint": shipped.fingerprint, "path": None}  # no source, no config
    assert TokenizerRef.from_dict(hand_made, where="x") == TokenizerRef(data="mnist-8x8", fingerprint=shipped.fingerprint)
    assert TokenizerRef.from_dict(shipped.to_dict(), where="x") == shipped


def test_the_manifest_entry_and_the_data_folders_reference_agree(shipped):
    manifest = {"source": {"kind": "mnist", "split": "test"}, "tokenizer": shipped.manifest_entry()}
    assert list(shipped.manifest_entry()) == ["fingerprint", "path", "config"]
    ref = TokenizerRef.of_data("codes/x", manifest)
    assert ref.data == "codes/x" and ref.config == shipped.config and ref.on_embedded_data  # the source says MNIST


def test_load_checks_the_fingerprint(shipped, tmp_path):
    assert shipped.load().fingerprint() == shipped.fingerprint == load_embedded_tokenizer("mnist-8x8").fingerprint()
    folder = load_embedded_tokenizer("mnist-16x16").save_pretrained(tmp_path / "vq")
    with pytest.raises(npp.ConfigError, match="is not the one the codes of"):
        shipped.load(override=folder)


@pytest.mark.parametrize("info, problem", [([1], "a JSON list, not an object"), ({"data": "x"}, "missing fingerprint"),
                                           ({"data": 3, "fingerprint": "f"}, "bad data"),
                                           ({"data": "x", "fingerprint": "f", "config": {"depth": 2}},
                                            "unknown config field depth")])
def test_a_malformed_reference_names_the_file_and_what_is_wrong(info, problem):
    with pytest.raises(CheckpointError, match=f"^where.json is damaged \\({problem}"):
        TokenizerRef.from_dict(info, where="where.json")


def test_an_export_whose_tokenizer_is_on_another_machine_is_one_line(shipped, tmp_path):
    export = tmp_path / "export"
    random_weights(npp.GPT(npp.ModelConfig.preset("debug", vocab_size=256, num_classes=10, grid=8))).save_pretrained(export)
    elsewhere = TokenizerRef(data="/other/codes", fingerprint=shipped.fingerprint, path="/other/machine/vq.pt",
                             config=shipped.config)
    (export / "tokenizer.json").write_text(json.dumps(elsewhere.to_dict()))
    result = subprocess.run([NPP, "evaluate", str(export), "--out", str(tmp_path / "out")], capture_output=True,
                            text=True, timeout=300, env=env(tmp_path))
    error = one_line(result, "npp evaluate")
    assert "/other/machine/vq.pt, which is not on this machine" in error
    assert f"fingerprint {shipped.fingerprint}" in error and "--tokenizer PATH" in error
    assert not (tmp_path / "out").exists()


def test_training_checks_the_tokenizer_only_where_it_is(shipped, tmp_path):
    assert shipped.check_decodes() is None  # a shipped tokenizer: loaded and its fingerprint checked
    in_memory = TokenizerRef(data=str(tmp_path / "codes"), fingerprint=shipped.fingerprint)
    assert in_memory.check_decodes() is None  # nothing on disk to check: evaluation asks for --tokenizer
    copied = TokenizerRef(data="codes/x", fingerprint=shipped.fingerprint, path=str(tmp_path / "gone"))
    assert copied.check_decodes() == (f"{tmp_path / 'gone'}, the tokenizer codes/x was extracted with, is not on this "
                                      f"machine: evaluation will need `npp evaluate --tokenizer`")
    replaced = TokenizerRef(data="codes/x", fingerprint="0" * 64,
                            path=str(load_embedded_tokenizer("mnist-8x8").save_pretrained(tmp_path / "vq")))
    with pytest.raises(npp.ConfigError, match="put the tokenizer the codes were extracted with back"):
        replaced.check_decodes()
