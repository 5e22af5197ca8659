"""Evaluation: torch-fidelity metrics, sharding, resume, the Inception path and the errors."""

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch_fidelity
from PIL import Image

import npp
from npp.config import SamplerConfig
from npp.data import mnist_images
from npp.errors import ConfigError
from npp.evaluate import EvalConfig, build_parser, config_from_args, evaluate, main, sample_to_folder
from npp.fidelity import (INCEPTION_EXTRACTOR, MNIST_EXTRACTOR, fidelity_metrics, register_mnist_extractor,
                          resolve_reference, save_reference_statistics)
from npp.tokenizer import load_embedded_tokenizer

from conftest import random_weights

REPO = Path(__file__).resolve().parents[1]


def write_pngs(images_NHW3: torch.Tensor, folder: Path) -> Path:
    folder.mkdir(parents=True)
    for i, image in enumerate(images_NHW3.numpy()):
        Image.fromarray(image).save(folder / f"{i:05d}.png")
    return folder


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    """One cache for the module: the embedded reference's features are computed once (a minute on 2 cores),
    not once per test."""
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def test_split() -> torch.Tensor:
    return mnist_images("test")[0].permute(0, 2, 3, 1)


DIGITS = 2_000
"""Test digits of the FID checks: enough to separate a shifted, noisy copy by far; all 10,000 (minutes of
PNG writing and feature extraction on 2 cores) in the heavy test of the embedded reference."""


def perturbed_folders(images_NHW3: torch.Tensor, root: Path) -> tuple[Path, Path]:
    """The images as PNGs, and a copy with every digit shifted by 2 px and blurred by noise."""
    g = torch.Generator().manual_seed(0)
    shifted = torch.roll(images_NHW3, shifts=2, dims=2).float() + torch.randn(images_NHW3.shape, generator=g) * 40
    perturbed = shifted.clamp(0, 255).to(torch.uint8)
    return write_pngs(images_NHW3, root / "test"), write_pngs(perturbed, root / "perturbed")


@pytest.fixture(scope="module")
def folders(test_split, tmp_path_factory):
    return perturbed_folders(test_split[:DIGITS], tmp_path_factory.mktemp("fid"))


@pytest.fixture(scope="module")
def export(tmp_path_factory) -> Path:
    """A random GPT on the mnist-8x8 codes, exported the way the trainer exports runs."""
    folder = tmp_path_factory.mktemp("export") / "export"
    config = npp.ModelConfig.preset("debug", vocab_size=256, num_classes=10, grid=8)
    random_weights(npp.GPT(config)).save_pretrained(folder)
    vq = load_embedded_tokenizer("mnist-8x8")
    (folder / "tokenizer.json").write_text(json.dumps({"data": "mnist-8x8", "fingerprint": vq.fingerprint(),
                                                       "config": vq.config.to_dict(), "path": None}))
    return folder


def mnist_reference_folder(folder: Path):
    return resolve_reference(str(folder), True)


def direct_fid(input1: Path, input2: Path) -> float:
    register_mnist_extractor()
    return torch_fidelity.calculate_metrics(input1=str(input1), input2=str(input2), fid=True, cuda=False,
                                            feature_extractor=MNIST_EXTRACTOR, verbose=False,
                                            cache=False)["frechet_inception_distance"]


# ---- metrics ------------------------------------------------------------------------------------

def test_fid_of_the_test_split_against_itself_and_a_perturbed_copy(cache, folders, tmp_path, monkeypatch):
    monkeypatch.setenv("NPP_CACHE", str(cache))
    test, perturbed = folders
    same = fidelity_metrics(str(test), mnist_reference_folder(test), ["fid"], extractor=MNIST_EXTRACTOR,
                            num_samples=DIGITS)["fid"]
    other = fidelity_metrics(str(perturbed), mnist_reference_folder(test), ["fid"], extractor=MNIST_EXTRACTOR,
                             num_samples=DIGITS)["fid"]
    assert abs(same) < 1e-3
    assert other > 10.0
    assert same == pytest.approx(direct_fid(test, test), abs=1e-6)
    assert other == pytest.approx(direct_fid(perturbed, test), rel=1e-6)


@pytest.mark.heavy
def test_the_embedded_reference_is_the_whole_test_split(test_split, tmp_path, monkeypatch):
    """The embedded reference (in memory, features cached on first use) gives the numbers of its images."""
    monkeypatch.setenv("NPP_CACHE", str(tmp_path / "cache"))
    test, perturbed = perturbed_folders(test_split, tmp_path / "fid")
    expected = direct_fid(perturbed, test)
    embedded = resolve_reference("mnist-test", True)
    for _ in range(2):
        assert fidelity_metrics(str(perturbed), embedded, ["fid"], extractor=MNIST_EXTRACTOR,
                                num_samples=10_000)["fid"] == pytest.approx(expected, rel=1e-6)
    assert any((tmp_path / "cache" / "fidelity").iterdir())


def test_npz_references_images_and_statistics_give_the_folder_numbers(cache, folders, test_split, tmp_path,
                                                                     monkeypatch):
    monkeypatch.setenv("NPP_CACHE", str(cache))
    test, perturbed = folders
    expected = fidelity_metrics(str(perturbed), mnist_reference_folder(test), ["fid", "prc"],
                                extractor=MNIST_EXTRACTOR, num_samples=DIGITS)
    np.savez(tmp_path / "images.npz", arr_0=test_split[:DIGITS].numpy())  # the ADM evaluator's layout
    images = resolve_reference(str(tmp_path / "images.npz"), True)
    assert images.identity["kind"] == "npz" and images.count == DIGITS
    assert fidelity_metrics(str(perturbed), images, ["fid", "prc"], extractor=MNIST_EXTRACTOR,
                            num_samples=DIGITS) == pytest.approx(expected, rel=1e-6)

    stats_file = save_reference_statistics(mnist_reference_folder(test), tmp_path / "stats.npz",
                                           extractor=MNIST_EXTRACTOR)
    stats = resolve_reference(str(stats_file), True)
    fid = fidelity_metrics(str(perturbed), stats, ["fid"], extractor=MNIST_EXTRACTOR, num_samples=DIGITS)
    assert fid["fid"] == pytest.approx(expected["fid"], rel=1e-6)
    with pytest.raises(ConfigError, match="gives FID only"):
        fidelity_metrics(str(perturbed), stats, ["fid", "prc"], extractor=MNIST_EXTRACTOR, num_samples=DIGITS)
    np.savez(tmp_path / "junk.npz", x=np.zeros(3))
    with pytest.raises(ConfigError, match="arr_0 .reference images. or with mu and sigma"):
        resolve_reference(str(tmp_path / "junk.npz"), True)


# ---- sampling: shards, restarts ---------------------------------------------------------------

def pngs(folder: Path) -> dict[str, bytes]:
    return {p.name: np.asarray(Image.open(p)).tobytes() for p in sorted(folder.glob("*.png"))}


def test_two_shards_draw_the_images_of_one_run_and_a_restart_skips_finished_batches(export, tmp_path):
    pipe = npp.Pipeline.from_run(export)
    config = EvalConfig(num_samples=10, batch_size=4, labels="random", sampler=SamplerConfig(cfg_scale=1.5, top_k=50))
    assert sample_to_folder(pipe, config, tmp_path / "one") == 10
    drawn = [sample_to_folder(pipe, config, tmp_path / "two", rank=r, world=2) for r in (1, 0)]
    assert drawn == [4, 6]  # batches {1} and {0, 2}
    one = pngs(tmp_path / "one")
    assert len(one) == 10 and one == pngs(tmp_path / "two")
    assert len(set(one.values())) == 10

    # A restart after losing one batch's files draws that batch again, and only it.
    os.remove(tmp_path / "two" / "000005.png")
    untouched = (tmp_path / "two" / "000000.png").stat().st_mtime_ns
    assert sample_to_folder(pipe, config, tmp_path / "two") == 4
    assert pngs(tmp_path / "two") == one
    assert (tmp_path / "two" / "000000.png").stat().st_mtime_ns == untouched


@pytest.mark.heavy  # the in-process two-shard test covers the partition by default
def test_torchrun_with_two_processes_gives_the_images_and_metrics_of_one(cache, export, tmp_path):
    # Bit-identical images need the same arithmetic: same device, batch size and thread count.
    env = {**os.environ, "NPP_CACHE": str(cache), "OMP_NUM_THREADS": "1"}
    flags = [str(export), "--num-samples", "40", "--batch-size", "8", "--metrics", "fid", "prc", "--no-progress"]

    def run(*launcher, out):
        result = subprocess.run([sys.executable, *launcher, "-m", "npp.evaluate", *flags, "--out", str(out)],
                                cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]
        assert result.stdout.count("results:") == 1  # rank 0 reports, once
        return json.loads((out / "results.json").read_text())

    single = run(out=tmp_path / "single")
    sharded = run("-m", "torch.distributed.run", "--nproc_per_node", "2",
                  "--master_port", str(29700 + os.getpid() % 200), out=tmp_path / "sharded")
    assert pngs(tmp_path / "single" / "samples") == pngs(tmp_path / "sharded" / "samples")
    assert sharded["metrics"] == single["metrics"]
    assert set(single["metrics"]) == {"fid", "precision", "recall", "class_accuracy"}


def test_results_record_what_the_number_depends_on_and_the_npz_is_adm_shaped(cache, export, tmp_path, monkeypatch):
    monkeypatch.setenv("NPP_CACHE", str(cache))
    sampler = SamplerConfig(cfg_scale=3.0, top_p=0.9)
    config = EvalConfig(num_samples=12, batch_size=5, sampler=sampler, export_npz=True, progress=False)
    results = evaluate(export, config)
    folder = export.parent / "eval" / config.folder_name()
    assert json.loads((folder / "results.json").read_text()) == json.loads(json.dumps(results))
    assert results["torch_fidelity"] == torch_fidelity.__version__
    assert results["feature_extractor"]["name"] == MNIST_EXTRACTOR
    assert len(results["feature_extractor"]["weights_sha256"]) == 64
    assert results["reference"] == {"kind": "embedded", "name": "mnist-test", "count": 10_000}
    assert results["sampler"]["cfg_scale"] == 3.0 and results["sampler"]["top_p"] == 0.9
    assert results["model"]["model_sha256"] and results["model"]["tokenizer_fingerprint"]
    assert "not comparable to ImageNet FID" in results["note"]
    assert set(results["metrics"]) == {"fid", "is", "is_std", "precision", "recall", "kid", "kid_std",
                                       "class_accuracy"}
    arr = np.load(folder / "samples.npz")["arr_0"]
    assert arr.shape == (12, 32, 32, 3) and arr.dtype == np.uint8
    assert np.array_equal(arr[7], np.asarray(Image.open(folder / "samples" / "000007.png")))
    # Kept in memory instead of PNGs: the same images, so the same numbers.
    in_memory = evaluate(export, EvalConfig(num_samples=12, batch_size=5, sampler=sampler, save_png=False,
                                            progress=False), out=tmp_path / "mem")
    assert in_memory["metrics"] == results["metrics"]


# ---- Inception ---------------------------------------------------------------------------------

def random_inception_file(path: Path) -> Path:
    """torch-fidelity's Inception-v3 with random weights, saved like the real file."""
    from torch_fidelity import feature_extractor_inceptionv3 as inception

    original = inception.FeatureExtractorInceptionV3.load_state_dict
    inception.FeatureExtractorInceptionV3.load_state_dict = lambda self, state: None
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(inception, "load_state_dict_from_url", lambda *a, **k: {})
            torch.manual_seed(0)
            net = inception.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    finally:
        inception.FeatureExtractorInceptionV3.load_state_dict = original
    torch.save(net.state_dict(), path)
    return path


def test_the_inception_path_runs_with_a_weights_file_given_by_path(export, tmp_path, monkeypatch, test_split):
    monkeypatch.setenv("NPP_CACHE", str(tmp_path / "cache"))
    weights = random_inception_file(tmp_path / "inception.pth")
    reference = write_pngs(test_split[:16], tmp_path / "ref")
    config = EvalConfig(num_samples=8, batch_size=8, feature_extractor=INCEPTION_EXTRACTOR,
                        inception_weights=str(weights), reference=str(reference), metrics=("fid", "isc"),
                        progress=False)
    results = evaluate(export, config, out=tmp_path / "eval")
    assert np.isfinite(results["metrics"]["fid"]) and results["metrics"]["is"] > 0
    assert results["feature_extractor"]["weights"] == str(weights)
    assert results["reference"]["kind"] == "folder" and results["reference"]["count"] == 16
    assert "class_accuracy" not in results["metrics"]


# ---- errors: one line, before any sampling -----------------------------------------------------

def cli_error(capsys, out, *argv) -> str:
    assert main([*argv, "--out", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


def test_bad_inputs_give_one_line_errors_that_name_the_fix(export, tmp_path, capsys):
    out = tmp_path / "out"
    assert "not a run directory or an export folder" in cli_error(capsys, out, str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    assert "holds no images" in cli_error(capsys, out, str(export), "--reference", str(tmp_path / "empty"))
    big = tmp_path / "big"
    big.mkdir()
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(big / "a.png")
    assert "give a --reference of 32×32 images" in cli_error(capsys, out, str(export), "--reference", str(big))
    missing = cli_error(capsys, out, str(export), "--feature-extractor", INCEPTION_EXTRACTOR,
                        "--inception-weights", str(tmp_path / "none.pth"))
    assert "no Inception weights" in missing and "--inception-weights PATH" in missing
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    assert "is not a readable PyTorch checkpoint" in cli_error(capsys, out, str(export), "--feature-extractor", INCEPTION_EXTRACTOR,
                                             "--inception-weights", str(tmp_path / "junk.pth"))
    assert "use 'balanced' or 'random'" in cli_error(capsys, out, str(export), "--labels", "uniform")
    assert not out.exists()  # refused before the first sample
    with pytest.raises(ConfigError, match="metrics"):
        EvalConfig(metrics=("fid", "sfid"))


def test_sampler_flags_come_from_the_sampler_config_fields():
    @dataclasses.dataclass(frozen=True)
    class MinPSampler(SamplerConfig):
        min_p: float = 0.0
        """Drop tokens below min_p times the most likely token's probability."""

    parser = build_parser(MinPSampler)
    text = parser.format_help()
    for field in ("--cfg-scale", "--cfg-interval", "--temperature", "--top-k", "--top-p", "--min-p"):
        assert field in text
    assert "below min_p times" in " ".join(text.split())
    config = config_from_args(parser.parse_args(["run", "--min-p", "0.1", "--top-k", "5"]), MinPSampler)
    assert config.sampler == MinPSampler(cfg_scale=2.0, top_k=5, min_p=0.1)
    assert "-min_p0.1" in config.folder_name()
    # The default is the paper's sampler; a bad knob is refused by SamplerConfig's own check.
    assert config_from_args(build_parser().parse_args(["run"])).sampler == npp.PAPER_SAMPLER
    with pytest.raises(ConfigError, match="SamplerConfig.top_p=0.0"):
        config_from_args(build_parser().parse_args(["run", "--top-p", "0"]))
