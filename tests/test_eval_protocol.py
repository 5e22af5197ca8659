"""LlamaGen's evaluation protocol in `npp evaluate`: the bicubic resize before the metrics (its
--image-size-eval) and the FID CFG scale of each released GPT as the default, said in one line.

Stand-ins only: a random debug GPT on the mnist-8x8 codes (16 px, resized to 32, the size the MNIST judge
reads), and one-layer GPT-B / GPT-XL files in LlamaGen's layout, converted as `npp convert` converts them.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import npp
from npp.protocol import Protocol, default_protocol
from npp.sampling import sample_generators
from npp.tokenizer import load_embedded_tokenizer
from test_faults import NPP, ROOT, env, one_line
from test_llamagen_zoo import stand_in_state, write

SAMPLED, EVALUATED, N = 16, 32, 4


@pytest.fixture(scope="module")
def export(tmp_path_factory) -> Path:
    """A random GPT on the mnist-8x8 codes at a 4×4 grid (16 px), exported as the trainer exports runs."""
    folder = tmp_path_factory.mktemp("run") / "export"
    torch.manual_seed(0)
    model = npp.GPT(npp.ModelConfig.preset("debug", vocab_size=256, num_classes=10, grid=4))
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.5)  # varied codes, so that a wrong resize cannot pass by accident
    model.save_pretrained(folder)
    vq = load_embedded_tokenizer("mnist-8x8")
    (folder / "tokenizer.json").write_text(json.dumps({"data": "mnist-8x8", "fingerprint": vq.fingerprint(),
                                                       "config": vq.config.to_dict(), "path": None}))
    return folder


@pytest.fixture(scope="module")
def resized_eval(export, tmp_path_factory):
    """`npp evaluate --eval-image-size 32` of the 16-px stand-in against eight 32-px reference images."""
    tmp = tmp_path_factory.mktemp("eval")
    reference = tmp / "reference"
    reference.mkdir()
    g = torch.Generator().manual_seed(1)
    for i in range(8):
        Image.fromarray(torch.randint(0, 256, (EVALUATED, EVALUATED, 3), generator=g, dtype=torch.uint8).numpy()
                        ).save(reference / f"{i}.png")
    result = subprocess.run([NPP, "evaluate", str(export), "--eval-image-size", str(EVALUATED), "--num-samples", str(N),
                             "--batch-size", "2", "--metrics", "fid", "--reference", str(reference), "--export-npz",
                             "--device", "cpu", "--progress", "false"],
                            cwd=ROOT, env=env(tmp), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result, export.parent / "eval" / f"n{N}-seed0-balanced-cfg2-i-1-t1-k0-p1-b2-e{EVALUATED}"


def test_help_shows_the_resize_and_the_released_models_cfg():
    result = subprocess.run([NPP, "evaluate", "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0
    text = " ".join(result.stdout.split())
    assert "--eval-image-size INT Resize every sample to this many pixels a side (bicubic)" in text
    assert "--image-size-eval" in text
    assert "CFG B 2.0, L 2.0, XL 1.75, XXL 1.75, 3B 1.65; its 384-px models resized to 256 px" in text


def test_the_resize_is_recorded_and_applied_to_the_samples_and_the_npz(export, resized_eval):
    result, folder = resized_eval
    assert result.stdout.splitlines()[0] == ("npp evaluate: CFG scale 2 (the paper's sampler (PAPER_SAMPLER)); "
                                             f"resized to {EVALUATED} px (bicubic) before the metrics "
                                             "(--eval-image-size)")
    results = json.loads((folder / "results.json").read_text())
    assert results["image_size"] == {"sampled": SAMPLED, "evaluated": EVALUATED,
                                     "resize": "bicubic (torch, on the decoder's output)"}
    assert results["config"]["eval_image_size"] == EVALUATED and results["sampler"]["eval_image_size"] == EVALUATED
    assert np.isfinite(results["metrics"]["fid"])

    # The numbers: the decoder's output of the same seeds' codes, resized by torch's bicubic, then rounded.
    pipe = npp.Pipeline.from_run(export)
    labels_N = torch.arange(N) % 10
    codes_Nhw = torch.cat([pipe(labels_N[k:k + 2], npp.PAPER_SAMPLER, output="codes",
                                generator=sample_generators(range(k, k + 2), 0)) for k in (0, 2)])
    with torch.no_grad():
        decoded_N3HW = pipe.vq.decode(codes_Nhw)
    resized_N3HW = torch.nn.functional.interpolate(decoded_N3HW, size=(EVALUATED, EVALUATED), mode="bicubic")
    expected_NHW3 = (resized_N3HW * 127.5 + 128).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    with np.load(folder / "samples.npz") as npz:
        assert npz["arr_0"].shape == (N, EVALUATED, EVALUATED, 3) and npz["arr_0"].dtype == np.uint8
        np.testing.assert_array_equal(npz["arr_0"], expected_NHW3)
    for i in range(N):
        np.testing.assert_array_equal(np.asarray(Image.open(folder / "samples" / f"{i:06d}.png").convert("RGB")),
                                      expected_NHW3[i])


def test_without_the_resize_the_folder_name_and_sample_key_are_unchanged(export):
    """Evaluations recorded before the resize existed keep their folders and their samples."""
    from npp.evaluate import EvalConfig, samples_identity

    plain, resized = EvalConfig(num_samples=4, batch_size=2), EvalConfig(num_samples=4, batch_size=2, eval_image_size=32)
    assert plain.folder_name() == "n4-seed0-balanced-cfg2-i-1-t1-k0-p1-b2"
    assert resized.folder_name() == plain.folder_name() + "-e32"
    pipe = npp.Pipeline.from_run(export)
    assert "eval_image_size" not in samples_identity(pipe, plain) and "eval_image_size" not in plain.image_settings()
    assert samples_identity(pipe, resized)["eval_image_size"] == 32


@pytest.fixture(scope="module")
def released(tmp_path_factory) -> dict[str, Path]:
    """GPT-B 256 px and GPT-XL 384 px stand-ins (one layer, real widths, LlamaGen's DDP layout, no stored
    args), converted as `npp convert` converts them (config.json records what was inferred)."""
    tmp, exports = tmp_path_factory.mktemp("zoo"), {}
    for name, width in (("c2i_B_256.pt", 768), ("c2i_XL_384.pt", 1280)):
        model = npp.GPT.from_llamagen(write(tmp / name, stand_in_state(width), "ddp"))
        exports[name] = model.save_pretrained(tmp / name.removesuffix(".pt"), inferred=model.inferred)
    return exports


def test_a_released_models_cfg_and_eval_size_are_its_fid_protocol(released):
    assert default_protocol(released["c2i_B_256.pt"]) == Protocol(
        2.0, 0, "LlamaGen's FID protocol for its released GPT-B at 256 px")
    assert default_protocol(released["c2i_XL_384.pt"]) == Protocol(
        1.75, 256, "LlamaGen's FID protocol for its released GPT-XL at 384 px")


def test_evaluate_states_the_protocol_in_force_and_flags_win(released, tmp_path):
    """The line comes first, before the weights are read: here the export names no tokenizer, so the run then
    stops with the loader's one-line error."""
    def run(*flags):
        return subprocess.run([NPP, "evaluate", str(released["c2i_XL_384.pt"]), "--num-samples", "4",
                               "--device", "cpu", *flags], cwd=ROOT, env=env(tmp_path), capture_output=True,
                              text=True, timeout=300)

    default = run()
    assert default.stdout.splitlines()[0] == (
        "npp evaluate: CFG scale 1.75 (LlamaGen's FID protocol for its released GPT-XL at 384 px); resized to "
        "256 px (bicubic) before the metrics (LlamaGen's FID protocol for its released GPT-XL at 384 px)")
    assert "--tokenizer" in one_line(default, "npp evaluate")
    given = run("--cfg-scale", "3", "--eval-image-size", "0")
    assert given.stdout.splitlines()[0] == ("npp evaluate: CFG scale 3 (--cfg-scale); scored at the model's own "
                                            "size (--eval-image-size)")


def test_a_run_of_ours_keeps_its_recipes_cfg(export, tmp_path):
    run = tmp_path / "runs" / "xl-npp"
    shutil.copytree(export, run / "export")
    (run / "config.json").write_text(json.dumps({"recipe": "paper", "model": "XL", "eval_sampler": {"cfg_scale": 1.75}}))
    assert default_protocol(run) == Protocol(1.75, 0, f"the run's recipe ({run / 'config.json'}: eval_sampler)")
    assert default_protocol(export).cfg_scale == npp.PAPER_SAMPLER.cfg_scale  # nothing says otherwise
