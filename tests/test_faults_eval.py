"""Numbers tied to the model that made them, through the real command line (issue 21, items 1, 4 and the GPU
line): an evaluation scores only samples that the same weights, tokenizer, sampler and seeds drew, exactly
as many as it records; a weights file whose bytes changed after it was written is refused in one line; a
foreign checkpoint with a NaN weight is refused by `npp convert`; `--device cuda` without a GPU is one line.

Two tiny runs (`a`, `b`: seeds 1 and 2) are trained once for the module; every evaluation draws 20 or 10
samples in batches of 10 and scores FID with the shipped MNIST classifier against 200 test digits, so
each costs seconds. docs/reliability.md ("Evaluations tied to their model") lists these cases.
"""

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

import npp
from npp.data import mnist_images
from npp.runs import RunDir
from test_faults import NPP, codes, env, npp_train, one_line  # noqa: F401 (codes is a fixture)

BATCH = "10"
"""Batch size of every evaluation here: part of what drew a sample, so the same for all of them."""


@pytest.fixture(scope="module")
def shared(tmp_path_factory) -> Path:
    """The module's NPP_CACHE (the reference's features are computed once) and its reference .npz."""
    root = tmp_path_factory.mktemp("eval-shared")
    images = mnist_images("test")[0][:200].permute(0, 2, 3, 1).contiguous().numpy()
    np.savez(root / "reference.npz", arr_0=images)
    return root


@pytest.fixture(scope="module")
def runs(codes, tmp_path_factory) -> dict[str, RunDir]:  # noqa: F811 (the imported fixture)
    """Two runs of the same architecture with other weights (seeds 1 and 2; b's export is its EMA)."""
    root = tmp_path_factory.mktemp("eval-runs") / "runs"
    for name, seed, ema in (("a", 1, 0.0), ("b", 2, 0.9)):  # b keeps an EMA: its checkpoints hold ema.safetensors
        result = npp_train(codes, root, name, seed=seed, **{"schedule.total-steps": 4, "ckpt-every": 4, "ema-decay": ema})
        assert result.returncode == 0, result.stderr[-3000:]
    return {"a": RunDir(root / "a"), "b": RunDir(root / "b"), "tokenizer": Path(codes).parent / "vq"}


def evaluate(shared: Path, runs, target: Path, out: Path, *extra: str, num: int = 20) -> subprocess.CompletedProcess:
    return subprocess.run([NPP, "evaluate", str(target), "--num-samples", str(num), "--batch-size", BATCH,
                           "--metrics", "fid", "--reference", str(shared / "reference.npz"), "--no-progress",
                           "--tokenizer", str(runs["tokenizer"]), "--out", str(out), *extra],
                          capture_output=True, text=True, timeout=600, env=env(shared))


def results(result: subprocess.CompletedProcess, out: Path) -> dict:
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads((out / "results.json").read_text())


def pngs(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.glob("*.png"))


@pytest.fixture(scope="module")
def shared_folder(shared, runs, tmp_path_factory):
    """a, then b, evaluated into one --out folder (a copy of it kept as a left it), and b into a fresh one."""
    root = tmp_path_factory.mktemp("eval-out")
    first = results(evaluate(shared, runs, runs["a"].path, root / "X"), root / "X")
    shutil.copytree(root / "X", root / "as-a-left-it")
    second_run = evaluate(shared, runs, runs["b"].path, root / "X")
    second = results(second_run, root / "X")
    fresh = results(evaluate(shared, runs, runs["b"].path, root / "fresh"), root / "fresh")
    return {"root": root, "a": first, "b": second, "b stderr": second_run.stderr, "b fresh": fresh}


def test_a_second_models_evaluation_in_a_shared_folder_reports_its_own_fid(shared_folder):
    a, b, fresh, root = shared_folder["a"], shared_folder["b"], shared_folder["b fresh"], shared_folder["root"]
    assert a["samples_key"] != b["samples_key"] and a["model"]["model_sha256"] != b["model"]["model_sha256"]
    assert b["metrics"]["fid"] == fresh["metrics"]["fid"] != a["metrics"]["fid"]
    assert (b["num_samples"], b["drawn_this_run"], b["reused"]) == (20, 20, 0)
    assert (a["drawn_this_run"], a["reused"]) == (20, 0)
    # a's samples and results are kept beside b's, named by a's key, never scored for b nor deleted.
    kept = root / "X" / f"samples.{a['samples_key']}"
    assert len(pngs(kept)) == 20 and json.loads((kept / "manifest.json").read_text())["key"] == a["samples_key"]
    assert json.loads((root / "X" / f"results.{a['samples_key']}.json").read_text())["metrics"] == a["metrics"]
    assert len(pngs(root / "X" / "samples")) == 20
    warnings = [line for line in shared_folder["b stderr"].splitlines() if "warning" in line]
    assert len(warnings) == 2 and all(f"{a['samples_key']}" in w for w in warnings), warnings


def test_the_first_model_evaluated_again_gets_its_own_samples_back(shared_folder, shared, runs, tmp_path):
    a, b = shared_folder["a"], shared_folder["b"]
    out = tmp_path / "X"
    shutil.copytree(shared_folder["root"] / "X", out)  # a's samples aside, b's in place
    again = results(evaluate(shared, runs, runs["a"].path, out), out)
    assert (again["drawn_this_run"], again["reused"]) == (0, 20)
    assert again["metrics"] == a["metrics"]
    assert len(pngs(out / f"samples.{b['samples_key']}")) == 20 and not (out / f"samples.{a['samples_key']}").exists()
    assert json.loads((out / f"results.{b['samples_key']}.json").read_text())["metrics"] == b["metrics"]


def test_a_reexport_with_other_weights_does_not_reuse_the_old_samples(shared_folder, shared, runs, tmp_path):
    a, fresh_b = shared_folder["a"], shared_folder["b fresh"]
    export = tmp_path / "export"
    shutil.copytree(runs["a"].export, export)
    out = tmp_path / "out"
    shutil.copytree(shared_folder["root"] / "as-a-left-it", out)  # the export's samples before it was re-written
    for name in ("model.safetensors", "model.safetensors.sha256"):  # the same run exported with other weights
        shutil.copy(runs["b"].export / name, export / name)
    again = results(evaluate(shared, runs, export, out), out)
    assert (again["drawn_this_run"], again["reused"]) == (20, 0)
    assert again["metrics"]["fid"] == fresh_b["metrics"]["fid"] != a["metrics"]["fid"]
    assert len(pngs(out / f"samples.{a['samples_key']}")) == 20


@pytest.fixture(scope="module")
def unrecorded(shared, runs, tmp_path_factory):
    """Run a's export without its sha256 record (as an older npp wrote it), evaluated on 10 samples in memory."""
    root = tmp_path_factory.mktemp("unrecorded")
    shutil.copytree(runs["a"].export, root / "export")
    (root / "export" / "model.safetensors.sha256").unlink()
    result = evaluate(shared, runs, root / "export", root / "out", "--no-save-png", num=10)
    return root, result, results(result, root / "out")


def test_an_export_without_a_hash_record_loads_with_a_warning(unrecorded):
    root, result, ten = unrecorded
    lines = [line for line in result.stderr.splitlines() if "sha256 record" in line]
    assert len(lines) == 1 and lines[0].startswith("npp: warning:"), result.stderr[-3000:]
    assert f"{root / 'export' / 'model.safetensors'}" in lines[0]
    assert (ten["num_samples"], ten["drawn_this_run"], ten["reused"]) == (10, 10, 0)
    assert not (root / "export" / "model.safetensors.sha256").exists()  # loading writes nothing into it


def test_fewer_samples_into_a_folder_of_more_scores_exactly_those(shared_folder, unrecorded, shared, runs, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(shared_folder["root"] / "as-a-left-it", out)  # 20 samples of run a
    ten = results(evaluate(shared, runs, runs["a"].path, out, num=10), out)
    assert (ten["num_samples"], ten["drawn_this_run"], ten["reused"]) == (10, 0, 10)
    assert ten["metrics"]["fid"] == unrecorded[2]["metrics"]["fid"] != shared_folder["a"]["metrics"]["fid"]
    assert len(pngs(out / "samples")) == 20  # the other ten stay, unscored


def flip_tensor_bytes(path: Path) -> None:
    """Invert 64 bytes in the middle of a safetensors file's tensor data; its JSON header stays intact."""
    data = bytearray(path.read_bytes())
    start = 8 + int.from_bytes(data[:8], "little")
    middle = start + (len(data) - start) // 2
    data[middle:middle + 64] = bytes(255 - b for b in data[middle:middle + 64])
    path.write_bytes(bytes(data))


def test_flipped_bytes_in_an_exports_tensor_data_are_one_line(runs, shared, tmp_path):
    export = tmp_path / "export"
    shutil.copytree(runs["a"].export, export)
    flip_tensor_bytes(export / "model.safetensors")
    with safe_open(str(export / "model.safetensors"), "pt") as weights:  # the header still parses
        assert "output.weight" in weights.keys()
    result = evaluate(shared, runs, export, tmp_path / "out")
    error = one_line(result, "npp evaluate")
    assert f"{export / 'model.safetensors'} is damaged" in error and "sha256" in error and "npp export" in error
    assert (export / "model.safetensors").is_file() and (export / "model.safetensors.sha256").is_file()
    assert not (tmp_path / "out").exists()


def test_flipped_bytes_in_a_checkpoints_ema_are_a_warning_at_export_and_the_one_before_is_exported(runs, tmp_path):
    run = RunDir(tmp_path / "b")
    shutil.copytree(runs["b"].path, run.path)
    tags = run.checkpoint_tags()
    ema = run.checkpoints / tags[-1] / "ema.safetensors"
    assert Path(f"{ema}.sha256").is_file() and len(tags) > 1
    flip_tensor_bytes(ema)
    result = subprocess.run([NPP, "export", str(run.path)], capture_output=True, text=True, timeout=300,
                            env=env(tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]
    warning, = result.stderr.splitlines()
    assert f"{ema} is damaged" in warning and "copy the checkpoint again" in warning and "the one before it" in warning
    assert json.loads((run.export / "source.json").read_text())["checkpoint"] == tags[-2] and ema.is_file()


def test_flipped_bytes_in_a_tokenizer_are_refused_naming_it(runs, tmp_path):
    shutil.copytree(runs["tokenizer"], tmp_path / "vq")
    assert (tmp_path / "vq" / "model.safetensors.sha256").is_file()
    flip_tensor_bytes(tmp_path / "vq" / "model.safetensors")
    with pytest.raises(npp.CheckpointError, match=f"{tmp_path / 'vq' / 'model.safetensors'} is damaged: its sha256"):
        npp.VQModel.from_pretrained(tmp_path / "vq")


def test_a_foreign_checkpoint_with_a_nan_weight_is_refused_by_convert(runs, tmp_path):
    state = npp.GPT.from_pretrained(runs["a"].export).state_dict()
    state["layers.0.attention.wqkv.weight"][3, 5] = float("nan")
    torch.save({"model": state}, tmp_path / "nan.pt")
    error = one_line(subprocess.run([NPP, "convert", str(tmp_path / "nan.pt"), str(tmp_path / "out"), "--grid", "8"],
                                    capture_output=True, text=True, timeout=300), "npp convert")
    assert "layers.0.attention.wqkv.weight" in error and "NaN or infinite" in error
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("command", ["evaluate", "extract"])
def test_device_cuda_without_a_gpu_is_one_line_before_anything_loads(command, runs, tmp_path):
    assert not torch.cuda.is_available()
    argv = {"evaluate": [str(runs["a"].path), "--out", str(tmp_path / "out")],
            "extract": ["mnist:test", str(tmp_path / "out"), "--tokenizer", str(runs["tokenizer"])]}[command]
    result = subprocess.run([NPP, command, *argv, "--device", "cuda"], capture_output=True, text=True, timeout=300,
                            env=env(tmp_path))
    error = one_line(result, f"npp {command}")
    assert "no CUDA GPU is available: use --device cpu" in error and "damaged" not in error
    assert not (tmp_path / "out").exists()


def test_samples_of_unknown_origin_are_moved_aside_not_scored(tmp_path, capsys):
    from PIL import Image

    from npp.sample_folder import claim_samples

    folder = tmp_path / "samples"
    folder.mkdir()
    Image.new("RGB", (8, 8)).save(folder / "000000.png")  # an older npp's sample: no manifest, no key
    key = claim_samples(folder, {"model_sha256": "0" * 64})
    assert (tmp_path / "samples.unverified" / "000000.png").is_file() and pngs(folder) == []
    assert json.loads((folder / "manifest.json").read_text())["key"] == key
    warning = capsys.readouterr().err
    assert warning.count("\n") == 1 and "of unknown origin (no manifest); moved them to samples.unverified" in warning


def test_a_sample_replaced_while_evaluating_is_refused(tmp_path):
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    from npp.sample_folder import KEY_CHUNK, read_samples

    info = PngInfo()
    info.add_text(KEY_CHUNK, "another")
    Image.new("RGB", (8, 8)).save(tmp_path / "000000.png", pnginfo=info)
    with pytest.raises(npp.DataError, match="000000.png was replaced by another model's sample"):
        read_samples(tmp_path, 1, key="mine")
