"""Code extraction (npp.extract, `npp extract`) and the data set over its output (npp.codes.CodeDataset)."""

import json
import os
import shutil
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

import npp
from npp import cli
from npp import extract as extract_module
from npp.codes import CodeDataset
from npp.crops import CropConfig, crop_variants
from npp.data import MNIST_CLASSES, DataError, ImageFolderSource, mnist_images, to_unit_range
from npp.extract import ARRAY_FILES, extract_codes, mnist_codes

TINY_VQ = dict(image_size=16, base_channels=32, ch_mult=(1, 2), num_res_blocks=1, z_channels=32,
               codebook_size=64, codebook_dim=4)
SKIPPED = {8: ("dog/broken.png", "UnidentifiedImageError: cannot identify image file"),
           13: ("eel/cut.png", "OSError: image file is truncated")}
VALID_ROWS = [i for i in range(14) if i not in SKIPPED]


@pytest.fixture(scope="module")
def vq() -> npp.VQModel:
    torch.manual_seed(0)
    # float64: fp32 latents move by ~1e-6 with the batch composition, enough to flip a near tie
    # between two codes; in float64 encoding image by image must give exactly the extracted codes.
    return npp.VQModel(npp.VQConfig(**TINY_VQ)).double().eval()


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """3 classes × 4 images of assorted sizes and modes, one corrupt and one truncated file, a note."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    shapes = [(20, 20), (37, 23), (64, 80), (12, 30)]
    for name in ("cat", "dog", "eel"):
        (root / name).mkdir()
        for k, ((h, w), mode) in enumerate(zip(shapes, ("RGB", "L", "RGBA", "P"))):
            pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
            Image.fromarray(pixels).convert(mode).save(root / name / f"{k}.png")
    (root / "cat" / "readme.txt").write_text("not an image")
    (root / "dog" / "broken.png").write_bytes(b"this is not a PNG")
    whole = (root / "eel" / "0.png").read_bytes()
    (root / "eel" / "cut.png").write_bytes(whole[: len(whole) // 2])
    return root


@pytest.fixture(scope="module")
def tokenizer_dir(vq, tmp_path_factory):
    return vq.save_pretrained(tmp_path_factory.mktemp("tokenizer"))


def run_extract(folder, vq, output, crops, **kwargs):
    return extract_codes(ImageFolderSource(folder), vq, output, crops, progress=False, **kwargs)


@pytest.fixture(scope="module")
def ten_crop_dir(folder, vq, tmp_path_factory):
    output = tmp_path_factory.mktemp("ten-crop")
    run_extract(folder, vq, output, CropConfig("ten-crop", size=16), batch_size=5, tokenizer_path="tok")
    return output


# ---- extraction --------------------------------------------------------------------------------------

def check_codes_match_direct_encoding(output, folder, vq, crops):
    source = ImageFolderSource(folder)
    codes_NVL = np.load(output / "codes.npy")
    labels_N = np.load(output / "labels.npy")
    assert codes_NVL.dtype == np.uint16 and codes_NVL.shape == (14, crops.num_variants, 64)
    for row in VALID_ROWS:
        views = crop_variants(source.open(row), crops)
        expected = vq.encode(to_unit_range(views)).reshape(crops.num_variants, -1)
        assert np.array_equal(codes_NVL[row], expected.numpy()), source.name(row)
        assert labels_N[row] == source.labels[row]
    for row in SKIPPED:
        assert labels_N[row] == -1 and not codes_NVL[row].any()
    assert np.load(output / "done.npy").tolist() == [2 if row in SKIPPED else 1 for row in range(14)]


def test_ten_crop_extraction_equals_encoding_the_crops(ten_crop_dir, folder, vq):
    check_codes_match_direct_encoding(ten_crop_dir, folder, vq, CropConfig("ten-crop", size=16))
    manifest = json.loads((ten_crop_dir / "manifest.json").read_text())
    assert {k: manifest[k] for k in ("format", "count", "valid", "grid", "vocab_size", "dtype", "image_size",
                                     "classes", "files", "npp_version")} == {
        "format": "npp.codes/1", "count": 14, "valid": 12, "grid": [8, 8], "vocab_size": 64, "dtype": "uint16",
        "image_size": 16, "classes": ["cat", "dog", "eel"], "files": "files.txt", "npp_version": npp.__version__}
    assert manifest["crops"] == {"mode": "ten-crop", "size": 16, "ranges": [1.1, 1.05], "count": 20,
                                 "names": CropConfig(size=16).variant_names()}
    assert manifest["tokenizer"] == {"fingerprint": vq.fingerprint(), "path": os.path.abspath("tok"),
                                     "config": vq.config.to_dict()}
    assert manifest["source"]["kind"] == "image-folder" and manifest["source"]["root"] == str(folder.resolve())
    assert [(s["index"], s["file"]) for s in manifest["skipped"]] == [(i, f) for i, (f, _) in SKIPPED.items()]
    for record, (_, reason) in zip(manifest["skipped"], SKIPPED.values()):
        assert record["reason"].startswith(reason)
    assert (ten_crop_dir / "files.txt").read_text().splitlines() == ImageFolderSource(folder).files
    assert json.loads((ten_crop_dir / "classes.json").read_text()) == ["cat", "dog", "eel"]


def test_centre_flip_extraction_equals_encoding_the_crops(folder, vq, tmp_path):
    crops = CropConfig("centre-flip", size=16)
    report = run_extract(folder, vq, tmp_path, crops, batch_size=4)
    check_codes_match_direct_encoding(tmp_path, folder, vq, crops)
    assert (report.encoded, report.skipped) == (12, 2)
    assert report.manifest["crops"]["names"] == ["centre", "flipped-centre"]
    assert "14 images × 2 crops → 8×8 codes (uint16, vocab 64), 12 usable, 2 skipped" in report.summary()


class Interrupted(Exception):
    pass


def test_interrupted_extraction_resumes_to_identical_arrays(folder, vq, tmp_path):
    crops = CropConfig("ten-crop", size=16, ranges=(1.25,))
    run_extract(folder, vq, tmp_path / "whole", crops, batch_size=3)

    def stop_after_two_batches(done, total):
        if done == 6:
            raise Interrupted
    with pytest.raises(Interrupted):
        run_extract(folder, vq, tmp_path / "resumed", crops, batch_size=3, on_batch=stop_after_two_batches)
    assert not (tmp_path / "resumed" / "manifest.json").exists()
    assert (np.load(tmp_path / "resumed" / "done.npy") != 0).sum() == 6
    with pytest.raises(DataError, match="has not finished: rerun the same `npp extract` command"):
        CodeDataset(tmp_path / "resumed")

    report = run_extract(folder, vq, tmp_path / "resumed", crops, batch_size=3)
    assert report.encoded + report.skipped == 14 - 6
    for name in (*ARRAY_FILES, "manifest.json"):
        assert (tmp_path / "whole" / name).read_bytes() == (tmp_path / "resumed" / name).read_bytes(), name

    again = run_extract(folder, vq, tmp_path / "resumed", crops, batch_size=3)  # finished: nothing to do
    assert (again.encoded, again.skipped) == (0, 0) and again.manifest == report.manifest


def test_resuming_with_other_settings_is_refused(folder, vq, ten_crop_dir):
    with pytest.raises(DataError, match=r"other settings \(crops, codes_shape differ\): rerun it with the arguments"):
        run_extract(folder, vq, ten_crop_dir, CropConfig("centre-flip", size=16))


def test_two_processes_write_the_same_arrays_as_one(folder, tokenizer_dir, tmp_path, capsys):
    options = ["--tokenizer", str(tokenizer_dir), "--image-size", "16", "--batch-size", "3", "--workers", "0",
               "--no-progress"]
    assert cli.main(["extract", str(folder), str(tmp_path / "one"), *options]) == 0
    assert capsys.readouterr().out.count(" images × 20 crops") == 1
    # --standalone: the launcher's rendezvous binds a free port itself.
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
              "-m", "npp.cli", "extract", str(folder), str(tmp_path / "two"), *options]
    result = subprocess.run(launch, capture_output=True, text=True, timeout=120,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count(" images × 20 crops") == 1  # the summary comes from rank 0 only
    for name in (*ARRAY_FILES, "manifest.json"):
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes(), name


# ---- bad inputs ---------------------------------------------------------------------------------------

@pytest.fixture
def paths(folder, tokenizer_dir, tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "flat").mkdir()
    Image.new("RGB", (16, 16)).save(tmp_path / "flat" / "a.png")
    (tmp_path / "notes.pt").write_text("not a checkpoint")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "thesis.tex").write_text("")
    gpt = npp.GPT(npp.ModelConfig.preset("debug", vocab_size=64, num_classes=3, grid=8))
    torch.save({"model": gpt.state_dict()}, tmp_path / "gpt.pt")
    return SimpleNamespace(folder=str(folder), tok=str(tokenizer_dir), tmp=tmp_path, out=str(tmp_path / "out"))


BAD_INPUTS = {
    "missing folder": (lambda p: [str(p.tmp / "nope"), p.out, "--tokenizer", p.tok],
                       "no such folder; give an ImageFolder root"),
    "empty folder": (lambda p: [str(p.tmp / "empty"), p.out, "--tokenizer", p.tok],
                     "has no class sub-folders: put the images of each class in their own sub-folder"),
    "no class folders": (lambda p: [str(p.tmp / "flat"), p.out, "--tokenizer", p.tok],
                         "holds images but no class sub-folders"),
    "crop range below 1": (lambda p: [p.folder, p.out, "--tokenizer", p.tok, "--crop-ranges", "0.9"],
                           "CropConfig.ranges=(0.9,): every range must be a number ≥ 1"),
    "ranges without ten-crop": (lambda p: [p.folder, p.out, "--tokenizer", p.tok, "--crop", "centre-flip",
                                           "--crop-ranges", "1.1"], "only mode 'ten-crop' takes crop ranges"),
    "image size": (lambda p: [p.folder, p.out, "--tokenizer", p.tok, "--image-size", "15"],
                   "is not a multiple of the tokenizer's downsampling factor 2"),
    "batch size": (lambda p: [p.folder, p.out, "--tokenizer", p.tok, "--batch-size", "0"],
                   "batch_size=0: must be a positive integer"),
    "missing tokenizer": (lambda p: [p.folder, p.out, "--tokenizer", str(p.tmp / "vq.pt")],
                          "no such file or folder; give a shipped tokenizer (mnist-8x8, mnist-16x16), a folder written by VQModel"),
    "tokenizer not a checkpoint": (lambda p: [p.folder, p.out, "--tokenizer", str(p.tmp / "notes.pt")],
                                   "is not a readable PyTorch checkpoint"),
    "GPT as tokenizer": (lambda p: [p.folder, p.out, "--tokenizer", str(p.tmp / "gpt.pt")],
                         "has no encoder.* weights; it looks like a GPT"),
    "folder not a tokenizer": (lambda p: [p.folder, p.out, "--tokenizer", p.folder],
                               "has no config.json: point at a folder written by VQModel.save_pretrained"),
    "flags for a folder": (lambda p: [p.folder, p.out, "--tokenizer", p.tok, "--codebook-size", "64"],
                           "drop the architecture flags (codebook_size), they are for .pt files"),
    "busy output": (lambda p: [p.folder, str(p.tmp / "busy"), "--tokenizer", p.tok, "--image-size", "16"],
                    "is not empty and holds no extraction (it has thesis.tex): choose a new or empty"),
    "mnist split": (lambda p: ["mnist:val", p.out, "--tokenizer", p.tok],
                    "'mnist:val': the embedded MNIST splits are mnist:train and mnist:test"),
}


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_inputs_fail_fast_with_one_line_naming_the_fix(case, paths, capsys):
    make_args, fragment = BAD_INPUTS[case]
    assert cli.main(["extract", *make_args(paths), "--workers", "0", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("npp extract: error: ") and "\n" not in err
    assert fragment in err


# ---- the data set over the codes ------------------------------------------------------------------------

def test_code_dataset_serves_valid_rows_and_describes_the_codes(ten_crop_dir):
    dataset = CodeDataset(ten_crop_dir)
    assert len(dataset) == 12 and dataset.rows.tolist() == VALID_ROWS
    assert (dataset.grid, dataset.vocab_size, dataset.num_classes, dataset.num_variants) == (8, 64, 3, 20)
    assert dataset.classes == ["cat", "dog", "eel"]
    codes_NVL = np.load(ten_crop_dir / "codes.npy")
    labels_N = np.load(ten_crop_dir / "labels.npy")
    for index in range(len(dataset)):
        tokens_L, label = dataset[index]
        assert tokens_L.dtype == torch.int64 and tokens_L.shape == (64,) and label.dtype == torch.int64
        row = dataset.rows[index]
        assert torch.equal(tokens_L, torch.from_numpy(codes_NVL[row, dataset.variant(index)].astype(np.int64)))
        assert label.item() == labels_N[row] >= 0


def test_variant_choice_covers_every_crop_and_is_reproducible(ten_crop_dir):
    dataset, same, other = CodeDataset(ten_crop_dir), CodeDataset(ten_crop_dir), CodeDataset(ten_crop_dir, seed=1)
    picks = [dataset.variant(0, epoch) for epoch in range(300)]
    assert set(picks) == set(range(20))
    assert picks == [same.variant(0, epoch) for epoch in range(300)]
    assert picks != [other.variant(0, epoch) for epoch in range(300)]
    dataset.set_epoch(7)
    assert [dataset.variant(i) for i in range(12)] == [same.variant(i, 7) for i in range(12)]
    assert torch.equal(dataset[5][0], torch.from_numpy(np.load(ten_crop_dir / "codes.npy")[
        dataset.rows[5], same.variant(5, 7)].astype(np.int64)))


def test_code_dataset_in_dataloader_workers_matches_direct_reads(ten_crop_dir):
    dataset = CodeDataset(ten_crop_dir)
    dataset[0]  # the parent maps the file; the workers must map their own
    dataset.set_epoch(3)
    loader = torch.utils.data.DataLoader(dataset, batch_size=5, num_workers=2)
    tokens_NL, labels_N = (torch.cat(parts) for parts in zip(*loader))
    direct = [dataset[i] for i in range(len(dataset))]
    assert torch.equal(tokens_NL, torch.stack([t for t, _ in direct]))
    assert torch.equal(labels_N, torch.stack([label for _, label in direct]))


def test_distributed_sampler_shards_are_disjoint_and_skip_nothing_valid(ten_crop_dir):
    dataset = CodeDataset(ten_crop_dir)
    shards = []
    for rank in range(2):
        sampler = torch.utils.data.distributed.DistributedSampler(dataset, num_replicas=2, rank=rank, seed=0)
        sampler.set_epoch(1)
        shards.append(list(sampler))
        labels = torch.cat([label for _, label in torch.utils.data.DataLoader(dataset, 4, sampler=sampler)])
        assert (labels >= 0).all()
    assert not set(shards[0]) & set(shards[1]) and sorted(shards[0] + shards[1]) == list(range(12))
    assert sorted(dataset.rows[shards[0] + shards[1]].tolist()) == VALID_ROWS


def test_code_dataset_checks_the_folder(ten_crop_dir, tmp_path):
    with pytest.raises(DataError, match="has no manifest.json; point at a folder written by `npp extract`"):
        CodeDataset(tmp_path)
    broken = tmp_path / "broken"
    shutil.copytree(ten_crop_dir, broken)
    np.save(broken / "labels.npy", np.zeros(3, dtype=np.int64))
    with pytest.raises(DataError, match=r"labels.npy is int64 \(3,\), the manifest says int64 \(14,\)"):
        CodeDataset(broken)
    (broken / "codes.npy").unlink()
    with pytest.raises(DataError, match="codes.npy is missing"):
        CodeDataset(broken)


# ---- the embedded MNIST through the same interface ------------------------------------------------------

def test_mnist_codes_are_extracted_once_and_served_like_any_codes(vq, tmp_path, monkeypatch):
    dataset = mnist_codes(vq, tmp_path, "test", limit=24, batch_size=10)
    assert (len(dataset), dataset.grid, dataset.num_variants, dataset.num_classes) == (24, 16, 1, 10)
    assert dataset.classes == MNIST_CLASSES and dataset.manifest["source"]["kind"] == "mnist"
    images, labels = mnist_images("test")
    expected = vq.encode(to_unit_range(images[:24])).reshape(24, -1)
    assert torch.equal(torch.stack([dataset[i][0] for i in range(24)]), expected)
    assert torch.equal(torch.stack([dataset[i][1] for i in range(24)]), labels[:24])

    def no_second_extraction(*args, **kwargs):
        raise AssertionError("the cached codes should have been reused")
    monkeypatch.setattr(extract_module, "extract_codes", no_second_extraction)
    assert len(mnist_codes(vq, tmp_path, "test", limit=24)) == 24


# ---- codes at another image size than the tokenizer's, and the model they train ---------------------------

def test_codes_at_another_image_size_train_a_model_of_that_grid(tmp_path):
    """The shipped mnist-8x8 tokenizer (trained at 32 px, 4 px per code) is convolutional: `--image-size 16` gives
    4×4 codes (the digits resized by the centre crop), and `npp train` on them trains a 4×4-grid model whose
    export decodes 16-px images with the same tokenizer."""
    from npp.data import MnistSource
    from test_faults import NPP, env, npp_train, one_line

    codes = tmp_path / "codes16"
    argv = [NPP, "extract", "mnist:test", str(codes), "--tokenizer", "mnist-8x8", "--workers", "0", "--no-progress",
            "--batch-size", "500"]
    refused = subprocess.run([*argv, "--image-size", "18"], env=env(tmp_path), capture_output=True, text=True,
                             timeout=300)
    assert "is not a multiple of the tokenizer's downsampling factor 4" in one_line(refused, "npp extract")
    assert not codes.exists()

    done = subprocess.run([*argv, "--image-size", "16"], env=env(tmp_path), capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    manifest = json.loads((codes / "manifest.json").read_text())
    assert (manifest["grid"], manifest["image_size"], manifest["crops"]["mode"]) == ([4, 4], 16, "centre")
    assert manifest["tokenizer"]["path"] == "mnist-8x8"  # by name: any install finds it in its own npp/assets
    vq = npp.tokenizer.load_embedded_tokenizer("mnist-8x8")
    source, crops = MnistSource("test"), CropConfig("centre", size=16)
    views_B3SS = torch.cat([crop_variants(source.open(i), crops) for i in range(6)])
    expected_B16 = vq.encode(to_unit_range(views_B3SS)).flatten(1).numpy()
    np.testing.assert_array_equal(np.load(codes / "codes.npy")[:6, 0], expected_B16)

    trained = npp_train(str(codes), tmp_path / "runs", "at16", **{"schedule.total-steps": 4, "ckpt-every": 4})
    assert trained.returncode == 0, trained.stderr[-3000:]
    pipe = npp.Pipeline.from_run(tmp_path / "runs" / "at16")
    assert (pipe.grid, pipe.image_size, pipe.vq.fingerprint()) == (4, 16, vq.fingerprint())
    images_BHW3 = pipe([1, 7], npp.PAPER_SAMPLER, generator=torch.Generator().manual_seed(0))
    assert images_BHW3.shape == (2, 16, 16, 3)
