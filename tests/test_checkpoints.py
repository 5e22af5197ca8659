import argparse
import os
import pickle
import subprocess
import sys

import pytest
import torch

import npp
from npp import cli

from conftest import random_weights


def llamagen_state(n_kv_head=None):
    """A small GPT state dict in LlamaGen naming, as their training script would save it."""
    cfg = npp.ModelConfig(vocab_size=96, num_classes=7, grid=8, n_layer=2, n_head=2, dim=128,
                          n_kv_head=n_kv_head)
    return random_weights(npp.GPT(cfg)).state_dict(), cfg


def logits_of(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, model.config.vocab_size, (2, model.config.seq_len), generator=g)
    return torch.cat([model(tokens, torch.tensor([1, 3]), p) for p in (1, 2)], 1)


@pytest.mark.parametrize("wrap", ["model", "module", "state_dict", "bare", "compiled"])
def test_llamagen_roundtrip_keeps_logits(tmp_path, wrap):
    state, cfg = llamagen_state()
    reference = npp.GPT(cfg)
    reference.load_state_dict(state)
    reference.eval()
    if wrap == "bare":
        payload = state
    elif wrap == "compiled":
        payload = {"model": {f"_orig_mod.{k}": v for k, v in state.items()}}
    else:  # LlamaGen stores its argparse arguments and step count beside the weights
        payload = {wrap: state, "args": argparse.Namespace(gpt_model="GPT-B", lr=1e-4), "steps": 10}
    torch.save(payload, tmp_path / "c2i.pt")

    model = npp.GPT.from_llamagen(tmp_path / "c2i.pt", grid=8, n_head=2)  # 2 × 128 is no preset: heads given
    assert model.config == cfg
    expected = logits_of(reference)
    torch.testing.assert_close(logits_of(model), expected, rtol=0, atol=0)

    model.save_pretrained(tmp_path / "export")
    assert sorted(os.listdir(tmp_path / "export")) == ["config.json", "model.safetensors", "model.safetensors.sha256"]
    again = npp.GPT.from_pretrained(tmp_path / "export")
    assert again.config == cfg and not again.training
    torch.testing.assert_close(logits_of(again), expected, rtol=0, atol=0)


def test_gqa_and_ffn_width_are_inferred():
    state, cfg = llamagen_state(n_kv_head=1)
    model = npp.GPT.from_llamagen(state, grid=8, n_head=2)
    assert model.config.n_kv_head == 1 and model.config.hidden_dim == cfg.hidden_dim


def test_overrides_reach_the_config():
    state, _ = llamagen_state()
    model = npp.GPT.from_llamagen(state, grid=8, n_head=2, resid_dropout=0.0, class_dropout=0.0)
    assert model.config.resid_dropout == 0.0 and model.config.class_dropout == 0.0


def _error(source, **kwargs) -> str:
    with pytest.raises(npp.CheckpointError) as info:
        npp.GPT.from_llamagen(source, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_missing_unexpected_and_misshapen_keys_are_named():
    state, _ = llamagen_state()
    missing = dict(state)
    del missing["layers.1.ffn_norm.weight"]
    assert "missing keys layers.1.ffn_norm.weight" in _error(missing, grid=8, n_head=2)

    extra = dict(state, **{"layers.0.attention.kv_cache.k_cache": torch.zeros(1)})
    assert "unexpected keys layers.0.attention.kv_cache.k_cache" in _error(extra, grid=8, n_head=2)

    bad = dict(state, **{"layers.1.feed_forward.w2.weight": torch.zeros(128, 100)})
    assert "shape mismatches" in _error(bad, grid=8, n_head=2) and "layers.1.feed_forward.w2.weight" in _error(bad, grid=8, n_head=2)

    assert "not divisible by n_head=3" in _error(state, n_head=3)


def test_unreadable_and_foreign_files_are_named(tmp_path):
    state, _ = llamagen_state()
    torch.save({"model": state}, tmp_path / "good.pt")
    data = (tmp_path / "good.pt").read_bytes()
    (tmp_path / "truncated.pt").write_bytes(data[: len(data) // 2])
    assert "is not a readable PyTorch checkpoint" in _error(tmp_path / "truncated.pt")
    (tmp_path / "notes.txt").write_text("hello")
    assert "is not a readable PyTorch checkpoint" in _error(tmp_path / "notes.txt")
    assert "no such file" in _error(tmp_path / "absent.pt")

    torch.save({"model": {"encoder.conv_in.weight": torch.zeros(2), "quantize.embedding.weight": torch.zeros(2)}},
               tmp_path / "vq.pt")
    assert "use npp.VQModel.from_llamagen" in _error(tmp_path / "vq.pt")
    torch.save([1, 2, 3], tmp_path / "list.pt")
    assert "holds a list" in _error(tmp_path / "list.pt")


class _Exploit:
    def __reduce__(self):
        return (os.system, ("touch /tmp/npp-pwned",))


def test_malicious_pickle_is_refused_without_running(tmp_path):
    if os.path.exists("/tmp/npp-pwned"):
        os.remove("/tmp/npp-pwned")
    with open(tmp_path / "evil.pt", "wb") as f:
        pickle.dump({"model": _Exploit()}, f, protocol=2)
    assert "asks to run or build posix.system" in _error(tmp_path / "evil.pt")
    assert not os.path.exists("/tmp/npp-pwned")


def test_deepspeeds_own_loads_are_weights_only_without_replacing_torch_load(tmp_path):
    """DeepSpeed's readers pass weights_only=False; inside the block torch refuses the pickle all the same, the
    DeepSpeed state classes load (also after a nested safe_load left its own allowance), and afterwards
    torch.load is the same function and the environment as it was."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler

    from npp.weights import deepspeed_reads_weights_only, safe_load

    load, environ = torch.load, dict(os.environ)
    marker = tmp_path / "CODE-RAN"
    torch.save({"model": _Planted(marker)}, tmp_path / "evil.pt")
    torch.save({"scaler": LossScaler(2.0)}, tmp_path / "state.pt")
    with pytest.raises(npp.CheckpointError, match="asks to run or build posix.system"):
        with deepspeed_reads_weights_only(tmp_path):
            torch.load(tmp_path / "evil.pt", weights_only=False)
    with deepspeed_reads_weights_only(tmp_path):
        safe_load(tmp_path / "state.pt", allow=[LossScaler])  # a nested allowance of the same class
        assert torch.load(tmp_path / "state.pt", weights_only=False)["scaler"].cur_scale == 2.0
    assert not marker.exists() and torch.load is load and dict(os.environ) == environ


class _Planted:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_from_pretrained_names_a_wrong_folder(tmp_path):
    with pytest.raises(npp.CheckpointError, match="has no config.json"):
        npp.GPT.from_pretrained(tmp_path)


def test_convert_command(tmp_path, capsys):
    state, cfg = llamagen_state()
    torch.save({"model": state}, tmp_path / "c2i.pt")
    assert cli.main(["convert", str(tmp_path / "c2i.pt"), str(tmp_path / "out"), "--grid", "8",
                     "--n-head", "2"]) == 0
    assert "2 layers × 2 heads × 128" in capsys.readouterr().out
    assert npp.GPT.from_pretrained(tmp_path / "out").config == cfg

    (tmp_path / "bad.pt").write_text("nope")
    assert cli.main(["convert", str(tmp_path / "bad.pt"), str(tmp_path / "out2")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("npp convert: error:") and "\n" not in err


def test_console_script_is_installed():
    result = subprocess.run([os.path.join(os.path.dirname(sys.executable), "npp"), "convert", "--help"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "--n-head" in result.stdout


def test_exports_are_readable_by_others(tmp_path):
    state, cfg = llamagen_state()
    model = npp.GPT(cfg)
    model.save_pretrained(tmp_path / "export")
    for name in ("model.safetensors", "config.json"):
        assert (tmp_path / "export" / name).stat().st_mode & 0o044 == 0o044, name
