"""Issue 21, data: every image mode PIL reads becomes the 8-bit RGB a user expects (never clipped), and a
damaged extraction folder or tokenizer reference is one line naming the file and the fix.

The conversions are checked against arrays built by hand with numpy (a 16-bit gradient → round(v / 257), ...);
the refusals through the real command line (`npp extract`, `npp train`, `npp evaluate`): exit code 2, one line.
"""

import json
import os
import re
import shutil
import struct
import subprocess
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import npp
from npp.codes import CodeDataset, read_manifest
from npp.crops import CropConfig
from npp.data import DataError, ImageFolderSource, MnistSource, mnist_images
from npp.extract import extract_codes
from npp.fidelity import MNIST_EXTRACTOR, resolve_reference, save_reference_statistics
from npp.images import to_rgb8
from npp.pipeline import Pipeline
from npp.plan import data_facts
from npp.tokenizer import load_embedded_tokenizer
from test_faults import NPP, ROOT, codes, env, one_line, train_argv  # noqa: F401  (codes: a shared fixture)

TINY_VQ = dict(image_size=16, base_channels=32, ch_mult=(1, 2), num_res_blocks=1, z_channels=32,
               codebook_size=64, codebook_dim=4)
RNG = np.random.default_rng(21)


def composite_on_white(rgb: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """What a viewer shows of RGB with alpha on a white page: the documented reading of transparency."""
    rgb, alpha = rgb.astype(np.float64), alpha.astype(np.float64)[..., None]
    return np.round((rgb * alpha + 255 * (255 - alpha)) / 255).astype(np.uint8)


def grey3(values: np.ndarray) -> np.ndarray:
    return np.repeat(values.astype(np.uint8)[..., None], 3, axis=-1)


def saved(image: Image.Image, path: Path, **options) -> Image.Image:
    """The image as PIL opens it again from a file (the mode a user's file arrives in)."""
    image.save(path, **options)
    return Image.open(path)


def png16_rgb(path: Path, rgb_HW3: np.ndarray) -> Path:
    """A 16-bit-per-channel RGB PNG, written by hand (PIL cannot write one)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    H, W, _ = rgb_HW3.shape
    rows = b"".join(b"\x00" + row.astype(">u2").tobytes() for row in rgb_HW3)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", W, H, 16, 2, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))
    return path


# ---- every mode, against a conversion built by hand ---------------------------------------------------

def _mode_1(tmp):
    bits = RNG.integers(0, 2, (8, 8)).astype(bool)
    return saved(Image.fromarray(bits), tmp / "a.png"), grey3(bits * 255)


def _mode_L(tmp):
    v = RNG.integers(0, 256, (8, 8), dtype=np.uint8)
    return saved(Image.fromarray(v), tmp / "a.png"), grey3(v)


def _mode_LA(tmp):
    la = RNG.integers(0, 256, (8, 8, 2), dtype=np.uint8)
    return saved(Image.fromarray(la, "LA"), tmp / "a.png"), composite_on_white(grey3(la[..., 0]), la[..., 1])


def _mode_P(tmp):
    palette = RNG.integers(0, 256, (256, 3), dtype=np.uint8)
    index = RNG.integers(0, 256, (8, 8), dtype=np.uint8)
    image = Image.fromarray(index, "P")
    image.putpalette(palette.tobytes())
    return saved(image, tmp / "a.png"), palette[index]


def _mode_P_transparent(tmp):
    palette = RNG.integers(0, 256, (256, 3), dtype=np.uint8)
    alphas = RNG.integers(0, 256, 256, dtype=np.uint8)
    index = RNG.integers(0, 256, (8, 8), dtype=np.uint8)
    image = Image.fromarray(index, "P")
    image.putpalette(palette.tobytes())
    return saved(image, tmp / "a.png", transparency=alphas.tobytes()), composite_on_white(palette[index],
                                                                                         alphas[index])


def _mode_RGB(tmp):
    rgb = RNG.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    return saved(Image.fromarray(rgb), tmp / "a.png"), rgb


def _mode_RGBA(tmp):
    rgba = RNG.integers(0, 256, (8, 8, 4), dtype=np.uint8)
    return saved(Image.fromarray(rgba, "RGBA"), tmp / "a.png"), composite_on_white(rgba[..., :3], rgba[..., 3])


def _premultiplied(mode: str, channels: int):
    """La / RGBa (premultiplied: c·a/255 stored; PIL reads TIFFs with associated alpha so): c + 255 − a on white."""
    pixels = RNG.integers(0, 256, (8, 8, channels), dtype=np.uint8)
    pixels[..., :-1] = np.minimum(pixels[..., :-1], pixels[..., -1:])
    colour, alpha = pixels[..., :-1].astype(int), pixels[..., -1:].astype(int)
    expected = np.broadcast_to(np.clip(colour + 255 - alpha, 0, 255), (8, 8, 3)).astype(np.uint8)
    return Image.frombytes(mode, (8, 8), pixels.tobytes()), expected


def _mode_La(tmp):
    return _premultiplied("La", 2)


def _mode_RGBa(tmp):
    return _premultiplied("RGBa", 4)


def _mode_CMYK(tmp):
    cmyk = RNG.integers(0, 256, (8, 8, 4), dtype=np.uint8).astype(np.float64)
    expected = np.round((255 - cmyk[..., :3]) * (255 - cmyk[..., 3:]) / 255).astype(np.uint8)
    return saved(Image.fromarray(cmyk.astype(np.uint8), "CMYK"), tmp / "a.tif"), expected


def _mode_YCbCr(tmp):  # no file format PIL writes keeps YCbCr: the mode as a JPEG decoder's draft gives it
    ycc = RNG.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    y, cb, cr = (ycc[..., i].astype(np.float64) for i in range(3))
    jfif = np.stack([y + 1.402 * (cr - 128), y - 0.344136 * (cb - 128) - 0.714136 * (cr - 128),
                     y + 1.772 * (cb - 128)], axis=-1)
    return Image.fromarray(ycc, "YCbCr"), np.clip(np.round(jfif), 0, 255).astype(np.uint8)


def _mode_I16(tmp):
    v = np.arange(0, 65536, 1025, dtype=np.uint16)[:64].reshape(8, 8)
    v[-1, -1] = 65535
    return saved(Image.fromarray(v), tmp / "a.png"), grey3(np.round(v / 257))


def _mode_I16B(tmp):
    v = RNG.integers(0, 65536, (8, 8)).astype(">u2")
    return saved(Image.frombytes("I;16B", (8, 8), v.tobytes()), tmp / "a.tif"), grey3(np.round(v / 257))


def _mode_I_pgm16(tmp):
    v = RNG.integers(0, 65536, (8, 8)).astype(">u2")
    (tmp / "a.pgm").write_bytes(b"P5\n8 8\n65535\n" + v.tobytes())
    return Image.open(tmp / "a.pgm"), grey3(np.round(v / 257))


def _mode_I_tiff32(tmp):
    v = RNG.integers(0, 2**31, (8, 8)).astype(np.int32)
    v[0, 0], v[0, 1] = 0, 2**31 - 1
    return saved(Image.fromarray(v), tmp / "a.tif"), grey3(np.round(v.astype(np.float64) * 255 / (2**31 - 1)))


def _mode_F(tmp):
    v = RNG.random((8, 8), dtype=np.float32)
    v[0, 0], v[0, 1] = 0.0, 1.0
    return saved(Image.fromarray(v), tmp / "a.tif"), grey3(np.round(v.astype(np.float64) * 255))


MODES = {"1": _mode_1, "L": _mode_L, "LA": _mode_LA, "P": _mode_P, "P+transparency": _mode_P_transparent,
         "RGB": _mode_RGB, "RGBA": _mode_RGBA, "La": _mode_La, "RGBa": _mode_RGBa, "CMYK": _mode_CMYK, "YCbCr": _mode_YCbCr, "I;16": _mode_I16,
         "I;16B": _mode_I16B, "I (16-bit PGM)": _mode_I_pgm16, "I (32-bit TIFF)": _mode_I_tiff32, "F": _mode_F}


@pytest.mark.parametrize("mode", MODES)
def test_every_image_mode_reads_as_its_known_8bit_rgb(mode, tmp_path):
    image, expected_HW3 = MODES[mode](tmp_path)
    assert image.mode == mode.split()[0].split("+")[0]  # the mode the file really arrives in
    rgb = to_rgb8(image)
    assert rgb.mode == "RGB"
    np.testing.assert_array_equal(np.asarray(rgb), expected_HW3)


def test_a_16bit_gradient_is_scaled_not_clipped(tmp_path):
    """The reported case: before, 99.5% of a 16-bit grey PNG's pixels came out as 255."""
    v = np.linspace(0, 65535, 64 * 64).round().astype(np.uint16).reshape(64, 64)
    Image.fromarray(v).save(tmp_path / "grey16.png")
    with Image.open(tmp_path / "grey16.png") as image:
        got = np.asarray(to_rgb8(image))[..., 0]
    np.testing.assert_array_equal(got, np.round(v / 257))
    assert (got == 255).mean() < 0.01 and len(np.unique(got)) == 256


def test_lab_reads_as_srgb_by_the_published_values(tmp_path):
    """CIE L*a*b* (D50, Bradford-adapted: the ICC convention) of sRGB's greys and primaries, from the standard
    tables. Greys come out exact; a primary within 12 levels, since a file holds L* in steps of 100/255 and a*,
    b* in whole units, and sRGB's curve is steep near 0 (PIL's own convert gave blue as (27, 7, 253))."""
    greys = {100.0: 255, 0.0: 0, 53.59: 128, 27.09: 64, 77.68: 192}
    primaries = {(54.29, 80.81, 69.89): (255, 0, 0), (87.82, -79.29, 80.99): (0, 255, 0),
                 (29.57, 68.30, -112.03): (0, 0, 255)}
    lab = [(L, 0.0, 0.0) for L in greys] + list(primaries)
    stored = np.array([[[round(L * 255 / 100), round(a) % 256, round(b) % 256] for L, a, b in lab]], dtype=np.uint8)
    image = saved(Image.fromarray(stored, "LAB"), tmp_path / "lab.tif")
    assert image.mode == "LAB"
    got = np.asarray(to_rgb8(image)).astype(int)[0]
    assert got[:len(greys)].tolist() == [[v] * 3 for v in greys.values()]
    assert np.abs(got[len(greys):] - np.array(list(primaries.values()))).max() <= 12, got


def test_16bit_colour_png_is_within_one_level_of_the_exact_scaling(tmp_path):
    """PIL opens 16-bit colour PNGs as 8-bit RGB keeping the high byte: within one level of round(v / 257)."""
    v = RNG.integers(0, 65536, (8, 8, 3)).astype(np.uint16)
    v[0, 0] = (0, 65535, 32896)
    with Image.open(png16_rgb(tmp_path / "rgb16.png", v)) as image:
        got = np.asarray(to_rgb8(image)).astype(int)
    assert np.abs(np.round(v / 257) - got).max() <= 1 and got[0, 0].tolist() == [0, 255, 128]


@pytest.mark.parametrize("pixels, reason", [
    (np.array([[0.0, 2.0]], dtype=np.float32), "float pixels span 0…2; npp reads float images as [0, 1]"),
    (np.array([[0.0, np.nan]], dtype=np.float32), "with NaN/inf"),
    (np.array([[-5, 7]], dtype=np.int32), "pixels span -5…7, outside the 31-bit range"),
])
def test_pixels_without_an_8bit_reading_are_refused_not_guessed(pixels, reason, tmp_path):
    image = saved(Image.fromarray(pixels), tmp_path / "a.tif")
    with pytest.raises(ValueError, match=re.escape(reason)):
        to_rgb8(image)


def test_a_16bit_reference_folder_has_the_statistics_of_its_8bit_twin(tmp_path, monkeypatch):
    """`npp evaluate --reference FOLDER` reads through the same conversion: FID statistics of 16-bit digits equal
    those of the 8-bit digits they were made from (torch-fidelity's own reading clipped them to white)."""
    monkeypatch.setenv("NPP_CACHE", str(tmp_path / "cache"))
    digits_NHW = mnist_images("test")[0][:24, 0].numpy()
    for name, images in (("eight", digits_NHW), ("sixteen", digits_NHW.astype(np.uint16) * 257)):
        (tmp_path / name).mkdir()
        for i, image in enumerate(images):
            Image.fromarray(image).save(tmp_path / name / f"{i:03d}.png")
    stats = {name: np.load(save_reference_statistics(resolve_reference(str(tmp_path / name), True),
                                                     tmp_path / f"{name}.npz", extractor=MNIST_EXTRACTOR))
             for name in ("eight", "sixteen")}
    with Image.open(tmp_path / "sixteen" / "000.png") as first:
        assert first.mode == "I;16"
    assert np.array_equal(stats["eight"]["mu"], stats["sixteen"]["mu"])
    assert np.array_equal(stats["eight"]["sigma"], stats["sixteen"]["sigma"])


# ---- through `npp extract`: a 16-bit image encodes as its 8-bit twin; a bad name is skipped and listed ----

@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    return npp.VQModel(npp.VQConfig(**TINY_VQ)).eval().save_pretrained(tmp_path_factory.mktemp("vq"))


def extract(source: Path, output: Path, tokenizer: Path) -> subprocess.CompletedProcess:
    return subprocess.run([NPP, "extract", str(source), str(output), "--tokenizer", str(tokenizer), "--crop", "none",
                           "--image-size", "16", "--batch-size", "16", "--workers", "0", "--no-progress"],
                          cwd=ROOT, env=env(output.parent), capture_output=True, text=True, timeout=300)


def test_extract_encodes_a_16bit_png_as_its_exact_8bit_twin_and_lists_a_non_utf8_name(tokenizer, tmp_path):
    source = tmp_path / "images"
    (source / "grey").mkdir(parents=True)
    v = np.linspace(0, 65535, 256).round().astype(np.uint16).reshape(16, 16)
    Image.fromarray(v).save(source / "grey" / "a-sixteen.png")  # mode I;16
    Image.fromarray(grey3(np.round(v / 257))).save(source / "grey" / "b-twin.png")  # the conversion by hand
    Image.fromarray(np.full((16, 16, 3), 255, np.uint8)).save(source / "grey" / "c-white.png")  # what clipping gave
    fd = os.open(os.fsencode(source / "grey") + b"/\xff.png", os.O_WRONLY | os.O_CREAT)
    os.write(fd, (source / "grey" / "b-twin.png").read_bytes())
    os.close(fd)
    result = extract(source, tmp_path / "codes", tokenizer)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "4 images" in result.stdout and "3 usable, 1 skipped" in result.stdout
    output = tmp_path / "codes"
    files = (output / "files.txt").read_text().splitlines()
    assert files == ["grey/a-sixteen.png", "grey/b-twin.png", "grey/c-white.png", "grey/\\xff.png"]
    manifest = read_manifest(output)
    assert manifest["skipped"] == [{"index": 3, "file": "grey/\\xff.png",
                                    "reason": "ValueError: the name is not valid UTF-8: rename the file and extract "
                                              "again"}]
    codes_NL = np.load(output / "codes.npy")[:, 0]
    assert np.array_equal(codes_NL[0], codes_NL[1])  # the 16-bit image is encoded as its 8-bit twin
    assert not np.array_equal(codes_NL[0], codes_NL[2])  # and not as the white image clipping made of it
    assert np.load(output / "labels.npy").tolist() == [0, 0, 0, -1]
    np.testing.assert_array_equal(np.asarray(ImageFolderSource(source).open(0)), grey3(np.round(v / 257)))


def test_a_class_folder_with_a_non_utf8_name_is_one_line(tokenizer, tmp_path):
    source = tmp_path / "images"
    os.makedirs(os.fsencode(source) + b"/cl\xe9")
    Image.new("RGB", (16, 16)).save(os.fsdecode(os.fsencode(source) + b"/cl\xe9/a.png"))
    err = one_line(extract(source, tmp_path / "codes", tokenizer), "npp extract")
    assert "images/cl\\xe9: the name is not valid UTF-8" in err and "rename the folder" in err
    assert not (tmp_path / "codes").exists()


# ---- a damaged extraction folder: one line naming the file and the fix ----------------------------------

def _truncate_codes(d: Path) -> str:
    data = (d / "codes.npy").read_bytes()
    (d / "codes.npy").write_bytes(data[: len(data) // 2])
    return "codes.npy cannot be read as a plain array"


def _object_labels(d: Path) -> str:
    np.save(d / "labels.npy", np.array([object()] * 256, dtype=object), allow_pickle=True)
    return "labels.npy cannot be read as a plain array (Array can't be memory-mapped: Python objects in dtype"


def _manifest_not_json(d: Path) -> str:
    (d / "manifest.json").write_bytes(b"\xff{ not json")
    return "manifest.json is not valid JSON"


def _manifest_missing_keys(d: Path) -> str:
    manifest = json.loads((d / "manifest.json").read_text())
    del manifest["grid"], manifest["vocab_size"]
    (d / "manifest.json").write_text(json.dumps(manifest))
    return "manifest.json is damaged (missing grid, vocab_size)"


def _manifest_bad_values(d: Path) -> str:
    manifest = json.loads((d / "manifest.json").read_text())
    manifest.update(grid="8x8", crops={"count": 0})
    (d / "manifest.json").write_text(json.dumps(manifest))
    return "manifest.json is damaged (bad grid, crops)"


def _code_beyond_vocab(d: Path) -> str:
    codes = np.load(d / "codes.npy")
    codes[17, 0, 5] = 64  # the tokenizer has 64 codes: 0…63
    np.save(d / "codes.npy", codes)
    return "codes.npy row 17 holds code 64, outside the vocabulary 0…63 of its manifest"


def _negative_code(d: Path) -> str:
    codes = np.load(d / "codes.npy").astype(np.int32)
    codes[200, 0, 0] = -3
    np.save(d / "codes.npy", codes)
    manifest = json.loads((d / "manifest.json").read_text())
    (d / "manifest.json").write_text(json.dumps({**manifest, "dtype": "int32"}))
    return "codes.npy row 200 holds code -3, outside the vocabulary 0…63"


def _label_beyond_classes(d: Path) -> str:
    labels = np.load(d / "labels.npy")
    labels[3] = 10
    np.save(d / "labels.npy", labels)
    return "labels.npy row 3 holds label 10, not a class 0…9 (nor -1)"


DAMAGE = {"truncated codes.npy": _truncate_codes, "object-array labels.npy": _object_labels,
          "manifest not JSON": _manifest_not_json, "manifest missing keys": _manifest_missing_keys,
          "manifest bad values": _manifest_bad_values, "code beyond the vocabulary": _code_beyond_vocab,
          "negative code": _negative_code, "label beyond the classes": _label_beyond_classes}


def damaged_copy(codes: str, case: str, tmp: Path) -> tuple[Path, str]:
    folder = tmp / "damaged"
    shutil.copytree(codes, folder)
    return folder, DAMAGE[case](folder)


@pytest.mark.parametrize("case", DAMAGE)
def test_a_damaged_extraction_folder_is_refused_naming_the_file(case, codes, tmp_path):
    """What the trainer opens (data_facts' manifest, then the data set), in process: every damage, one error."""
    folder, fragment = damaged_copy(codes, case, tmp_path)
    with pytest.raises(DataError) as caught:
        data_facts(str(folder))
        CodeDataset(folder)
    message = str(caught.value)
    assert fragment in message and str(folder) in message and "extract the codes again" in message
    assert "\n" not in message


@pytest.mark.parametrize("damage, fragment", [
    (lambda d: (d / "extract.json").write_text("[1, 2"), "extract.json is damaged (not the JSON object extraction "
                                                         "wrote): the folder cannot be resumed"),
    (_truncate_codes, "codes.npy cannot be read as a plain array"),
    (lambda d: np.save(d / "done.npy", np.zeros(3, np.uint8)), "done.npy is uint8 (3,), this extraction writes "
                                                               "uint8 (256,)"),
])
def test_resuming_an_extraction_into_a_damaged_folder_is_refused(damage, fragment, codes, tmp_path):
    folder = tmp_path / "damaged"
    shutil.copytree(codes, folder)
    (folder / "manifest.json").unlink()  # an extraction still to finish
    damage(folder)
    vq = npp.VQModel.from_pretrained(Path(codes).parent / "vq")
    with pytest.raises(DataError, match=re.escape(fragment)) as caught:
        extract_codes(MnistSource("train", limit=256), vq, folder, CropConfig("none", size=32), progress=False)
    assert "extract the codes again" in str(caught.value) and not (folder / "manifest.json").exists()


CLI_DAMAGE = ["object-array labels.npy", "code beyond the vocabulary"]


@pytest.mark.parametrize("case", [*CLI_DAMAGE, *(pytest.param(c, marks=pytest.mark.heavy) for c in DAMAGE
                                                 if c not in CLI_DAMAGE)])
def test_training_on_a_damaged_extraction_folder_is_one_line_before_any_step(case, codes, tmp_path):
    folder, fragment = damaged_copy(codes, case, tmp_path)
    runs = tmp_path / "runs"
    result = subprocess.run([NPP, "train", *train_argv(str(folder), runs, "d")], cwd=ROOT, env=env(tmp_path),
                            capture_output=True, text=True, timeout=600)
    err = one_line(result, "npp train")
    assert fragment in err and "extract the codes again" in err
    assert not (runs / "d" / "checkpoints").exists() or not any((runs / "d" / "checkpoints").iterdir())
    assert not (runs / "d" / "metrics.jsonl").exists() or not (runs / "d" / "metrics.jsonl").read_text().strip()


# ---- a damaged export/tokenizer.json: one line naming the file ------------------------------------------

@pytest.fixture(scope="module")
def export(tmp_path_factory) -> Path:
    """A debug GPT on the mnist-8x8 codes, exported with the tokenizer reference the trainer writes."""
    folder = tmp_path_factory.mktemp("run") / "export"
    npp.GPT(npp.ModelConfig.preset("debug", vocab_size=256, num_classes=10, grid=8)).save_pretrained(folder)
    vq = load_embedded_tokenizer("mnist-8x8")
    reference = {"data": "mnist-8x8", "source": {"kind": "mnist", "split": "train"}, "fingerprint": vq.fingerprint(),
                 "path": None, "config": vq.config.to_dict()}
    (folder / "tokenizer.json").write_text(json.dumps(reference))
    return folder


TOKENIZER_DAMAGE = {
    "not JSON": (lambda ref: b"{\"data\": \"mnist-8x8\", \xff", "is damaged (not valid JSON)"),
    "a list": (lambda ref: b"[1, 2]", "is damaged (a JSON list, not an object)"),
    "missing keys": (lambda ref: json.dumps({"path": None}).encode(), "is damaged (missing data, fingerprint)"),
    "bad config": (lambda ref: json.dumps({**ref, "config": {"codebook_sise": 7}}).encode(),
                   "is damaged (unknown config field codebook_sise)"),
    "no such shipped tokenizer": (lambda ref: json.dumps({**ref, "data": "mnist-99x99"}).encode(),
                                  "names no tokenizer to load (data 'mnist-99x99' is not one of the shipped"),
    "no such path": (lambda ref: json.dumps({**ref, "path": "/nowhere/vq"}).encode(),
                     "names the tokenizer /nowhere/vq, which is not on this machine (fingerprint"),
}


def damaged_export(export: Path, case: str, tmp: Path) -> tuple[Path, str]:
    folder = tmp / "export"
    shutil.copytree(export, folder)
    make, fragment = TOKENIZER_DAMAGE[case]
    reference = json.loads((export / "tokenizer.json").read_text())
    (folder / "tokenizer.json").write_bytes(make(reference))
    return folder, fragment


@pytest.mark.parametrize("case", TOKENIZER_DAMAGE)
def test_a_damaged_tokenizer_reference_is_refused_where_a_run_is_loaded(case, export, tmp_path):
    """Pipeline.from_run is what evaluation, the quickstart and the app load a run with."""
    folder, fragment = damaged_export(export, case, tmp_path)
    with pytest.raises(npp.errors.CheckpointError) as caught:
        Pipeline.from_run(folder)
    message = str(caught.value)
    assert message.startswith(str(folder / "tokenizer.json")) and fragment in message and "\n" not in message
    assert "pass --tokenizer PATH" in message


def test_the_intact_reference_still_loads(export):
    assert Pipeline.from_run(export).vq.config.codebook_size == 256


@pytest.mark.parametrize("case", ["not JSON", *(pytest.param(c, marks=pytest.mark.heavy) for c in TOKENIZER_DAMAGE
                                                if c != "not JSON")])
def test_evaluating_with_a_damaged_tokenizer_reference_is_one_line(case, export, tmp_path):
    folder, fragment = damaged_export(export, case, tmp_path)
    before = sorted(p.name for p in folder.iterdir())
    result = subprocess.run([NPP, "evaluate", str(folder), "--num-samples", "2", "--batch-size", "2", "--metrics",
                             "fid", "--no-progress", "--out", str(tmp_path / "eval")], cwd=ROOT, env=env(tmp_path),
                            capture_output=True, text=True, timeout=600)
    err = one_line(result, "npp evaluate")
    assert f"{folder / 'tokenizer.json'} " in err and fragment in err
    assert sorted(p.name for p in folder.iterdir()) == before and not (tmp_path / "eval").exists()
