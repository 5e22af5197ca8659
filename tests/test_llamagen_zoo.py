"""LlamaGen's seven released class-conditional GPTs, as stand-ins: what npp infers from each file.

No download: each stand-in has the released file's name, layout (DDP {"model": …} or FSDP's bare state
dict), key names, real width, FFN width and bf16 dtype, but one layer, a 64-code vocabulary and 4 classes,
so that the whole zoo fits in a few hundred MB. With one layer a file cannot match its preset by (layers,
width); it is matched by width alone (each LlamaGen width belongs to one preset), and the inferred line
says so. The truth is LlamaGen's table: heads from gpt.py's presets, 384 px with VQ-16 is a 24×24 grid.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import npp
from npp import cli

NPP = os.path.join(os.path.dirname(sys.executable), "npp")

# file -> (layout, preset, width, heads, grid): LlamaGen's README and gpt.py.
ZOO = {
    "c2i_B_256.pt": ("ddp", "B", 768, 12, 16),
    "c2i_B_384.pt": ("ddp", "B", 768, 12, 24),
    "c2i_L_256.pt": ("ddp", "L", 1024, 16, 16),
    "c2i_L_384.pt": ("ddp", "L", 1024, 16, 24),
    "c2i_XL_384.pt": ("ddp", "XL", 1280, 20, 24),
    "c2i_XXL_384.pt": ("fsdp", "XXL", 1536, 24, 24),
    "c2i_3B_384.pt": ("fsdp", "3B", 3200, 32, 24),
}
VOCAB, CLASSES = 64, 4


def llamagen_hidden(dim: int) -> int:
    """LlamaGen's SwiGLU width: find_multiple(int(2·4·dim/3), 256)."""
    hidden = int(2 * 4 * dim / 3)
    return -(-hidden // 256) * 256


def stand_in_state(dim: int, n_layer: int = 1, seed: int = 0) -> dict[str, torch.Tensor]:
    """A state dict with LlamaGen's key names and shapes (written from its naming, not from npp.GPT), bf16."""
    g = torch.Generator().manual_seed(seed)
    hidden = llamagen_hidden(dim)

    def w(*shape):
        return (torch.randn(*shape, generator=g) * 0.02).to(torch.bfloat16)

    state = {"cls_embedding.embedding_table.weight": w(CLASSES + 1, dim), "tok_embeddings.weight": w(VOCAB, dim)}
    for i in range(n_layer):
        state |= {f"layers.{i}.attention.wqkv.weight": w(3 * dim, dim), f"layers.{i}.attention.wo.weight": w(dim, dim),
                  f"layers.{i}.feed_forward.w1.weight": w(hidden, dim), f"layers.{i}.feed_forward.w3.weight": w(hidden, dim),
                  f"layers.{i}.feed_forward.w2.weight": w(dim, hidden),
                  f"layers.{i}.attention_norm.weight": torch.ones(dim, dtype=torch.bfloat16),
                  f"layers.{i}.ffn_norm.weight": torch.ones(dim, dtype=torch.bfloat16)}
    return state | {"norm.weight": torch.ones(dim, dtype=torch.bfloat16), "output.weight": w(VOCAB, dim)}


def llamagen_args(preset: str, image_size: int) -> argparse.Namespace:
    """The arguments LlamaGen's train_c2i.py stores in its checkpoints (the ones that matter here, and a few more)."""
    return argparse.Namespace(gpt_model=f"GPT-{preset}", image_size=image_size, downsample_size=16, vocab_size=16384,
                              num_classes=1000, cls_token_num=1, gpt_type="c2i", lr=1e-4, global_batch_size=256)


def write(path, state, layout, args=None, prefix=""):
    state = {prefix + k: v for k, v in state.items()}
    if layout == "fsdp" and args is None:
        payload = state  # FSDP's consolidated export: the bare state dict
    else:
        payload = {"model": state, "optimizer": None, "steps": 100} | ({"args": args} if args is not None else {})
    torch.save(payload, path)
    return path


@pytest.fixture(scope="module")
def states():
    return {width: stand_in_state(width) for width in sorted({row[2] for row in ZOO.values()})}


@pytest.mark.parametrize("with_args", [False, True], ids=["no-args", "args"])
@pytest.mark.parametrize("name", list(ZOO))
def test_each_released_file_gets_its_heads_and_grid(name, with_args, states, tmp_path):
    layout, preset, width, heads, grid = ZOO[name]
    image_size = grid * 16
    prefix = {"c2i_B_256.pt": "module.", "c2i_L_384.pt": "_orig_mod."}.get(name, "")  # wrappers' prefixes
    path = write(tmp_path / name, states[width], layout, llamagen_args(preset, image_size) if with_args else None,
                 prefix)
    model = npp.GPT.from_llamagen(path)
    c = model.config
    assert (c.n_head, c.grid, c.dim, c.n_layer, c.head_dim) == (heads, grid, width, 1, width // heads)
    assert (c.vocab_size, c.num_classes, c.hidden_dim, c.n_kv_head) == (VOCAB, CLASSES, llamagen_hidden(width), None)
    assert model.tok_embeddings.weight.dtype == torch.bfloat16  # kept as the file holds it
    line = model.inferred
    assert "\n" not in line and line.startswith(f"{name}: 1 layer × {width}, {heads} heads of {width // heads}")
    assert f"grid {grid}×{grid}" in line
    if with_args:
        assert f"LlamaGen preset {preset}, from the stored args.gpt_model" in line
        assert f"stored args: image_size {image_size}, downsample_size 16" in line
    else:
        assert f"LlamaGen preset {preset} by width {width} alone" in line
        assert f"file name _{image_size}, VQ-16" in line


def test_full_depth_matches_the_preset_by_layers_and_width():
    """A file with its preset's real depth (GPT-B: 12 layers; meta tensors, nothing allocated) needs no fallback."""
    state = {k: v.to("meta") for k, v in stand_in_state(768, n_layer=1).items()}
    for i in range(1, 12):
        state |= {k.replace("layers.0.", f"layers.{i}."): v for k, v in state.items() if k.startswith("layers.0.")}
    inferred = npp.infer_llamagen(state, "/zoo/c2i_B_384.pt")
    assert (inferred.config.n_layer, inferred.config.n_head, inferred.config.grid) == (12, 12, 24)
    assert inferred.description == ("c2i_B_384.pt: 12 layers × 768, 12 heads of 64 (LlamaGen preset B), "
                                    "grid 24×24 (file name _384, VQ-16)")


def test_explicit_arguments_win_and_stored_args_beat_the_name(states, tmp_path):
    state = states[3200]
    # stored args say 256 px, the name says 384: the file's own record wins over its name
    path = write(tmp_path / "c2i_3B_384.pt", state, "fsdp", llamagen_args("3B", 256))
    assert npp.GPT.from_llamagen(path).config.grid == 16
    # explicit arguments win over everything
    model = npp.GPT.from_llamagen(path, n_head=25, grid=12)
    assert (model.config.n_head, model.config.grid) == (25, 12) and "n_head given" in model.inferred
    assert npp.GPT.from_llamagen(path, image_size=512).config.grid == 32
    # a file called model.pt tells its grid through the stored args
    path = write(tmp_path / "model.pt", state, "fsdp", llamagen_args("3B", 384))
    assert npp.GPT.from_llamagen(path).config.grid == 24


def test_convert_prints_and_records_what_it_inferred(states, tmp_path, capsys):
    path = write(tmp_path / "c2i_XXL_384.pt", states[1536], "fsdp")
    assert cli.main(["convert", str(path), str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out.splitlines()
    expected = ("c2i_XXL_384.pt: 1 layer × 1536, 24 heads of 64 (LlamaGen preset XXL by width 1536 alone: the file "
                "has 1 of its 48 layers), grid 24×24 (file name _384, VQ-16)")
    assert out[0] == expected
    saved = json.loads((tmp_path / "out" / "config.json").read_text())
    assert saved["inferred"] == expected and saved["n_head"] == 24 and saved["grid"] == 24
    again = npp.GPT.from_pretrained(tmp_path / "out")  # strict loading tolerates the record
    assert (again.config.n_head, again.config.grid) == (24, 24)

    assert cli.main(["convert", str(path), str(tmp_path / "out2"), "--image-size", "256", "--n-head", "12"]) == 0
    assert json.loads((tmp_path / "out2" / "config.json").read_text())["grid"] == 16


def one_line_refusal(*argv: str) -> str:
    result = subprocess.run([NPP, "convert", *argv], capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("npp convert: error: "), result.stderr[-2000:]
    return lines[0]


def test_what_a_file_cannot_tell_is_asked_for_in_one_line(tmp_path):
    unknown = write(tmp_path / "c2i_custom_256.pt", stand_in_state(640, n_layer=2), "ddp")  # no preset is 640 wide
    error = one_line_refusal(str(unknown), str(tmp_path / "out"))
    assert "2 layers × width 640 match no LlamaGen preset" in error and "--n-head" in error
    assert not (tmp_path / "out").exists()

    nameless = write(tmp_path / "model.pt", stand_in_state(768), "ddp")
    error = one_line_refusal(str(nameless), str(tmp_path / "out"))
    assert "does not say its image size" in error and "--grid" in error and "--image-size" in error
    assert not (tmp_path / "out").exists()


def test_the_pipeline_takes_the_gpts_grid_not_the_tokenizers(tmp_path):
    """A GPT trained at twice its tokenizer's training size (the mnist-8x8 VQ: 32 px, 4 px per code) keeps its
    own 16×16 grid; image_size= is divided by the tokenizer's downsampling."""
    from npp.files import ASSETS

    model = npp.GPT(npp.ModelConfig.preset("debug", vocab_size=256, num_classes=10, grid=16))
    args = argparse.Namespace(gpt_model="debug", image_size=64, downsample_size=4)
    torch.save({"model": model.state_dict(), "args": args}, tmp_path / "c2i.pt")
    pipe = npp.Pipeline.from_llamagen(tmp_path / "c2i.pt", ASSETS / "mnist-8x8")
    assert (pipe.grid, pipe.image_size, pipe.vq.config.grid) == (16, 64, 8)
    assert pipe.model.inferred == ("c2i.pt: 2 layers × 64, 2 heads of 32 (npp preset debug), "
                                   "grid 16×16 (stored args: image_size 64, downsample_size 4)")

    torch.save({"model": model.state_dict()}, tmp_path / "bare.pt")
    with pytest.raises(npp.CheckpointError, match="does not say its image size"):
        npp.Pipeline.from_llamagen(tmp_path / "bare.pt", ASSETS / "mnist-8x8")
    assert npp.Pipeline.from_llamagen(tmp_path / "bare.pt", ASSETS / "mnist-8x8", image_size=64).grid == 16


# ---- the tokenizer follows the GPT: a 384-px file draws 384-px images with a 24×24 RoPE table ----------------

VQ_STAND_IN = dict(base_channels=32, ch_mult=(1, 1, 1, 1, 1), num_res_blocks=1, z_channels=32, codebook_size=VOCAB,
                   codebook_dim=8)
"""A VQ-16 stand-in (5 levels: 16 px per code) trained, like LlamaGen's vq_ds16_c2i.pt, at 256 px; small channels."""


@pytest.fixture(scope="module")
def vq_pt(tmp_path_factory):
    """vq_ds16_c2i.pt in LlamaGen's layout ({"model": state}), random weights."""
    vq = npp.VQModel(npp.VQConfig(image_size=256, **VQ_STAND_IN))
    path = tmp_path_factory.mktemp("vq") / "vq_ds16_c2i.pt"
    torch.save({"model": vq.state_dict()}, path)
    return path


def test_a_384_px_file_draws_384_px_images_and_its_logits_are_llamagens_over_24x24(states, vq_pt, tmp_path):
    """One 256-px VQ-16 file serves the 384-px GPT (it is convolutional): 24×24 codes decode to 384×384 images,
    and the GPT's logits on a whole 24×24 sequence equal the suite's naive float64 forward with 2-D RoPE over
    24×24 (token n at row n // 24, column n % 24)."""
    from test_model import reference_logits

    path = write(tmp_path / "c2i_B_384.pt", states[768], "ddp")
    pipe = npp.Pipeline.from_llamagen(path, vq_pt, **VQ_STAND_IN)
    assert (pipe.grid, pipe.image_size, pipe.vq.config.image_size) == (24, 384, 256)
    images_BHW3 = pipe([0, 3], npp.PAPER_SAMPLER, generator=torch.Generator().manual_seed(0))
    assert images_BHW3.shape == (2, 384, 384, 3) and images_BHW3.dtype == torch.uint8

    config = pipe.model.config
    tokens_BL, labels_B = torch.randint(0, VOCAB, (2, 24 * 24)), torch.tensor([1, CLASSES])  # CLASSES: the null class
    expected = reference_logits(states[768], config, tokens_BL, labels_B)
    with torch.no_grad():
        logits = pipe.model.float()(tokens_BL, labels_B).double()
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4)


def test_an_image_size_the_tokenizer_cannot_divide_is_refused(states, vq_pt, tmp_path):
    path = write(tmp_path / "c2i_B_384.pt", states[768], "ddp")
    with pytest.raises(npp.ConfigError, match="image_size=392: must be a positive multiple of the tokenizer's "
                                              "downsampling 16"):
        npp.Pipeline.from_llamagen(path, vq_pt, image_size=392, **VQ_STAND_IN)
    assert npp.Pipeline.from_llamagen(path, vq_pt, image_size=512, **VQ_STAND_IN).image_size == 512


# ---- every entry takes every layout: {"model": …} with or without args, a bare state dict; prefixes; bf16 -------

LAYOUTS = {"model": ("ddp", None), "model+args": ("ddp", llamagen_args("B", 384)), "bare": ("fsdp", None)}
PREFIXES = {"plain": "", "ddp": "module.", "compiled": "_orig_mod."}
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("prefix", PREFIXES)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_entry_takes_every_layout_prefix_and_dtype(layout, prefix, dtype, states, vq_pt, tmp_path, capsys):
    """npp.GPT.from_llamagen, npp.Pipeline.from_llamagen and `npp convert` read the same weights, heads and grid
    from c2i_B_384.pt however it was saved; the tensors keep the file's dtype."""
    state = {k: v.to(DTYPES[dtype]) for k, v in states[768].items()}
    kind, args = LAYOUTS[layout]
    path = write(tmp_path / "c2i_B_384.pt", state, kind, args, PREFIXES[prefix])

    def same(model):
        c = model.config
        assert (c.n_head, c.grid, c.dim) == (12, 24, 768), model.inferred
        loaded = model.state_dict()
        assert loaded.keys() == state.keys()
        assert all(loaded[k].dtype == v.dtype and torch.equal(loaded[k], v) for k, v in state.items())

    same(npp.GPT.from_llamagen(path))
    pipe = npp.Pipeline.from_llamagen(path, vq_pt, **VQ_STAND_IN)
    same(pipe.model)
    assert pipe.image_size == 384
    assert cli.main(["convert", str(path), str(tmp_path / "out")]) == 0
    assert capsys.readouterr().out.startswith("c2i_B_384.pt: 1 layer × 768, 12 heads of 64")
    same(npp.GPT.from_pretrained(tmp_path / "out"))


def test_a_converted_bf16_fsdp_file_is_evaluated_through_the_command_line(states, tmp_path):
    """The hardest layout (a bare bf16 state dict under torch.compile's prefix) through `npp convert` and
    `npp evaluate` as processes: sampled at 384 px with the VQ-16 stand-in, scored (here by the MNIST judge's
    features, resized to its 32 px) against a folder of reference images."""
    from PIL import Image

    from test_faults import ROOT, env

    path = write(tmp_path / "c2i_B_384.pt", states[768], "fsdp", prefix="_orig_mod.")
    vq = npp.VQModel(npp.VQConfig(image_size=256, **VQ_STAND_IN)).save_pretrained(tmp_path / "vq")
    reference = tmp_path / "reference"
    reference.mkdir()
    for i in range(4):
        Image.new("RGB", (32, 32), (60 * i, 0, 0)).save(reference / f"{i}.png")
    converted = subprocess.run([NPP, "convert", str(path), str(tmp_path / "gpt")], capture_output=True, text=True,
                               timeout=300)
    assert converted.returncode == 0, converted.stderr[-2000:]
    assert json.loads((tmp_path / "gpt" / "config.json").read_text())["grid"] == 24
    evaluated = subprocess.run(
        [NPP, "evaluate", str(tmp_path / "gpt"), "--tokenizer", str(vq), "--out", str(tmp_path / "eval"),
         "--num-samples", "4", "--batch-size", "2", "--metrics", "fid", "--feature-extractor", "npp-mnist-classifier",
         "--reference", str(reference), "--eval-image-size", "32", "--device", "cpu", "--progress", "false"],
        cwd=ROOT, env=env(tmp_path), capture_output=True, text=True, timeout=600)
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    results = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert results["image_size"]["sampled"] == 384 and results["config"]["sampler"]["cfg_scale"] == 2.0
    assert results["metrics"]["fid"] > 0


# ---- the README's zoo table is what npp does ------------------------------------------------------------------

ROOT = Path(__file__).resolve().parents[1]
ZOO_ROW = re.compile(r"^\| (NPP )?(c2i_\w+\.pt) \| (DDP|FSDP) \| `(npp convert [^`]+)` \| (\d+) heads(?: of (\d+))?, "
                     r"(\d+)×\d+ \| [\d.]+ \(([\d.]+); ([^)]+)\) \| ([\d.]+) · ([\d.]+) \| ([\d.]+) · ([\d.]+) \|$", re.M)
WIDTHS = {preset: width for _, preset, width, _, _ in ZOO.values()}


def preflight_cells(preset: str, grid: int) -> tuple[str, ...]:
    """The table's memory cells from the preflight's estimate: weights in fp32 · bf16, and one process fine-tuning
    at micro-batch 1 without ZeRO in fp32 on the CPU · amp-bf16 on a GPU (GiB, one decimal)."""
    from npp.preflight import GiB, Plan, estimate

    model = npp.ModelConfig.preset(preset, vocab_size=16384, num_classes=1000, grid=grid)
    weights = [estimate(Plan(model, 1, precision=p, device=d)).weights for p, d in (("fp32", "cpu"), ("bf16", "cuda"))]
    tuning = [estimate(Plan(model, 1, precision=p, device=d)).peak for p, d in (("fp32", "cpu"), ("amp-bf16", "cuda"))]
    return tuple(f"{value / GiB:.1f}" for value in (*weights, *tuning))


def test_the_readme_zoo_commands_load_what_its_table_says(states, tmp_path, monkeypatch, capsys):
    """Every `npp convert` of the README's zoo table runs as written, in a folder holding stand-ins under the
    released names and layouts; what it infers, the protocol `npp evaluate` then applies to a LlamaGen file, and
    the memory cells (from npp.preflight's estimate) are the table's."""
    from npp.protocol import LLAMAGEN_FID_CFG, default_protocol

    rows = ZOO_ROW.findall((ROOT / "README.md").read_text())
    assert sorted(name for npp_row, name, *_ in rows if not npp_row) == sorted(ZOO)
    assert [name for npp_row, name, *_ in rows if npp_row] == ["c2i_B_256.pt", "c2i_L_256.pt", "c2i_XL_256.pt",
                                                                "c2i_XXL_256.pt"]
    monkeypatch.chdir(tmp_path)
    for npp_row, name, layout, command, heads, head_dim, grid, cfg, scored, *memory in rows:
        preset = name.split("_")[1]
        argv = shlex.split(command)
        Path(argv[2]).parent.mkdir(parents=True, exist_ok=True)
        write(Path(argv[2]), states[WIDTHS[preset]], layout.lower())
        assert cli.main(argv[1:]) == 0, command
        capsys.readouterr()
        saved = json.loads((Path(argv[3]) / "config.json").read_text())
        assert (saved["n_head"], saved["grid"]) == (int(heads), int(grid)), command
        assert saved["dim"] // saved["n_head"] == int(head_dim or 64)
        if not npp_row:
            assert (layout.lower(), int(heads), int(grid)) == ZOO[name][:1] + ZOO[name][3:]
            protocol = default_protocol(Path(argv[3]).parent)
            assert protocol.cfg_scale == LLAMAGEN_FID_CFG[preset] == float(cfg)
            assert scored == ("384 → 256 px" if protocol.eval_image_size == 256 else f"{int(grid) * 16} px")
        assert tuple(memory) == preflight_cells(preset, int(grid)), name
