"""The VQ tokenizer: LlamaGen's layout, strict import, our export, and the L2 codebook lookup."""

import os

import pytest
import torch
import torch.nn.functional as F

import npp
from npp.tokenizer import to_uint8

# A small LlamaGen-shaped tokenizer: two levels (downsample 2), 32 channels, 64 codes of dim 4.
SMALL = dict(base_channels=32, ch_mult=(1, 2), num_res_blocks=1, z_channels=32, codebook_size=64,
             codebook_dim=4)


def llamagen_vq_shapes(ch, ch_mult, nrb, z, V, d, in_ch=3):
    """Every tensor LlamaGen's VQModel holds, with its shape, written from its construction rules
    (docs/method.md §6) without npp code: encoder levels with nrb ResnetBlocks, decoder levels in reverse
    with nrb + 1, attention at the lowest resolution, the quantizer's usage buffer."""
    shapes = {}

    def conv(name, cin, cout, k):
        shapes[f"{name}.weight"], shapes[f"{name}.bias"] = (cout, cin, k, k), (cout,)

    def norm(name, c):
        shapes[f"{name}.weight"] = shapes[f"{name}.bias"] = (c,)

    def res(name, cin, cout):
        norm(f"{name}.norm1", cin), conv(f"{name}.conv1", cin, cout, 3)
        norm(f"{name}.norm2", cout), conv(f"{name}.conv2", cout, cout, 3)
        if cin != cout:
            conv(f"{name}.nin_shortcut", cin, cout, 1)

    def attn(name, c):
        norm(f"{name}.norm", c)
        for proj in ("q", "k", "v", "proj_out"):
            conv(f"{name}.{proj}", c, c, 1)

    levels = len(ch_mult)
    conv("encoder.conv_in", in_ch, ch, 3)
    block_in = ch
    for lvl in range(levels):
        out = ch * ch_mult[lvl]
        for j in range(nrb):
            res(f"encoder.conv_blocks.{lvl}.res.{j}", block_in, out)
            block_in = out
            if lvl == levels - 1:
                attn(f"encoder.conv_blocks.{lvl}.attn.{j}", out)
        if lvl != levels - 1:
            conv(f"encoder.conv_blocks.{lvl}.downsample.conv", out, out, 3)
    res("encoder.mid.0", block_in, block_in), attn("encoder.mid.1", block_in), res("encoder.mid.2", block_in, block_in)
    norm("encoder.norm_out", block_in), conv("encoder.conv_out", block_in, z, 3)

    block_in = ch * ch_mult[-1]
    conv("decoder.conv_in", z, block_in, 3)
    res("decoder.mid.0", block_in, block_in), attn("decoder.mid.1", block_in), res("decoder.mid.2", block_in, block_in)
    for i, lvl in enumerate(reversed(range(levels))):
        out = ch * ch_mult[lvl]
        for j in range(nrb + 1):
            res(f"decoder.conv_blocks.{i}.res.{j}", block_in, out)
            block_in = out
            if lvl == levels - 1:
                attn(f"decoder.conv_blocks.{i}.attn.{j}", out)
        if lvl != 0:
            conv(f"decoder.conv_blocks.{i}.upsample.conv", out, out, 3)
    norm("decoder.norm_out", block_in), conv("decoder.conv_out", block_in, in_ch, 3)

    shapes["quantize.embedding.weight"] = (V, d)
    shapes["quantize.codebook_used"] = (65536,)
    conv("quant_conv", z, d, 1), conv("post_quant_conv", d, z, 1)
    return shapes


def llamagen_vq_state(seed=0, **arch):
    g = torch.Generator().manual_seed(seed)
    shapes = llamagen_vq_shapes(arch["base_channels"], arch["ch_mult"], arch["num_res_blocks"],
                                arch["z_channels"], arch["codebook_size"], arch["codebook_dim"])
    state = {k: torch.randn(s, generator=g) * 0.1 for k, s in shapes.items()}
    for k in state:
        if "norm" in k and k.endswith(".weight"):
            state[k] += 1.0
    return state


def test_vq16_has_llamagen_names_shapes_and_size():
    with torch.device("meta"):
        vq = npp.VQModel(npp.VQConfig.preset("llamagen-vq16"))
    expected = llamagen_vq_shapes(128, (1, 1, 2, 2, 4), 2, 256, 16384, 8)
    del expected["quantize.codebook_used"]  # a training statistic, not loaded (see from_llamagen)
    assert {k: tuple(v.shape) for k, v in vq.state_dict().items()} == expected
    assert vq.num_params() == 71_883_403  # docs/method.md §6: 71.9M
    assert vq.config.grid == 16 and vq.config.downsample == 16


@pytest.mark.parametrize("wrap", ["model", "bare"])
def test_llamagen_state_loads_and_round_trips(tmp_path, wrap):
    state = llamagen_vq_state(**SMALL)
    torch.save({"model": state, "steps": 3} if wrap == "model" else state, tmp_path / "vq.pt")
    vq = npp.VQModel.from_llamagen(tmp_path / "vq.pt", image_size=16, **SMALL)
    assert not vq.training
    images = torch.rand(3, 3, 16, 16) * 2 - 1
    codes = vq.encode(images)
    assert codes.shape == (3, 8, 8) and codes.dtype == torch.long
    assert len(codes.unique()) > 4  # random weights still spread over the codebook
    decoded = vq.decode(codes)
    assert decoded.shape == (3, 3, 16, 16) and decoded.dtype == torch.float32

    vq.save_pretrained(tmp_path / "export")
    assert sorted(os.listdir(tmp_path / "export")) == ["config.json", "model.safetensors", "model.safetensors.sha256"]
    again = npp.VQModel.from_pretrained(tmp_path / "export")
    assert again.config == vq.config
    assert torch.equal(again.encode(images), codes)
    assert torch.equal(again.decode(codes), decoded)
    assert again.fingerprint() == vq.fingerprint()


def test_code_is_the_nearest_normalised_entry():
    vq = npp.VQModel.from_llamagen(llamagen_vq_state(**SMALL), image_size=16, **SMALL)
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        z_NC = vq.latents(images).permute(0, 2, 3, 1).reshape(-1, SMALL["codebook_dim"])
    codebook = vq.quantize.embedding.weight
    # Brute force: Euclidean distance between unit vectors, every pair.
    distances = torch.cdist(F.normalize(z_NC, dim=-1), F.normalize(codebook, dim=-1))
    assert torch.equal(vq.encode(images).flatten(), distances.argmin(-1))
    # Unnormalised matching would choose differently here: the norm of the entries matters to it.
    assert not torch.equal(torch.cdist(z_NC, codebook).argmin(-1), distances.argmin(-1))


def test_training_pass_gives_straight_through_gradients_and_losses():
    vq = npp.VQModel(npp.VQConfig(image_size=16, **SMALL)).train()
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    recon, q = vq(images)
    assert recon.shape == images.shape and q.codes_Bhw.shape == (2, 8, 8)
    z, e = q.z_BhwC, vq.quantize.lookup(q.codes_Bhw)
    torch.testing.assert_close(q.codebook_loss, (e - z).pow(2).mean())
    torch.testing.assert_close(q.commit_loss, 0.25 * (e - z).pow(2).mean())
    ((recon - images).pow(2).mean() + q.codebook_loss + q.commit_loss).backward()
    # The reconstruction loss reaches the encoder through the straight-through estimator.
    assert vq.encoder.conv_in.weight.grad.abs().sum() > 0
    assert vq.quantize.embedding.weight.grad.abs().sum() > 0


def test_bf16_encode_matches_fp32_mostly():
    vq = npp.VQModel.from_llamagen(llamagen_vq_state(**SMALL), image_size=16, **SMALL)
    images = torch.rand(4, 3, 16, 16) * 2 - 1
    fp32 = vq.encode(images)
    bf16 = vq.to(torch.bfloat16).encode(images)
    assert (bf16 == fp32).float().mean() > 0.8  # near-ties may flip under bf16 rounding
    assert vq.decode(bf16).dtype == torch.float32


def test_to_uint8_matches_llamagen_rounding():
    x = torch.tensor([-1.0, -0.5, 0.0, 0.999, 1.0]).view(1, 1, 1, 5).expand(1, 3, 1, 5)
    assert to_uint8(x)[0, 0, :, 0].tolist() == [0, 64, 128, 255, 255]


def _error(source, **kwargs) -> str:
    with pytest.raises(npp.CheckpointError) as info:
        npp.VQModel.from_llamagen(source, **kwargs)
    assert "\n" not in str(info.value)
    return str(info.value)


def test_bad_checkpoints_are_named(tmp_path):
    state = llamagen_vq_state(**SMALL)
    missing = {k: v for k, v in state.items() if k != "decoder.conv_out.bias"}
    assert "missing keys decoder.conv_out.bias" in _error(missing, **SMALL)
    extra = dict(state, **{"discriminator.conv.weight": torch.zeros(1)})
    assert "unexpected keys discriminator.conv.weight" in _error(extra, **SMALL)
    # VQ-16 defaults on a small file: five levels expected, two found.
    assert "does not match the model: missing keys" in _error(state)
    assert "quantize.embedding.weight (64, 4) vs (64, 8)" in _error(state, **dict(SMALL, codebook_dim=8))
    gpt = npp.GPT(npp.ModelConfig.preset("debug", vocab_size=16, num_classes=2, grid=4)).state_dict()
    assert "use npp.GPT.from_llamagen" in _error(gpt)
    (tmp_path / "junk.pt").write_bytes(b"\x00" * 100)
    assert "not a readable PyTorch checkpoint" in _error(tmp_path / "junk.pt")
    with pytest.raises(npp.CheckpointError, match="describes 'npp.GPT', not 'npp.VQModel'"):
        npp.GPT(npp.ModelConfig.preset("debug", vocab_size=16, num_classes=2, grid=4)).save_pretrained(tmp_path / "g")
        npp.VQModel.from_pretrained(tmp_path / "g")


def test_bad_inputs_are_named():
    vq = npp.VQModel(npp.VQConfig(image_size=16, **SMALL)).eval()
    with pytest.raises(ValueError, match="not a multiple of the tokenizer's downsampling factor 2"):
        vq.encode(torch.zeros(1, 3, 15, 16))
    with pytest.raises(ValueError, match="B × 3 × H × W"):
        vq.encode(torch.zeros(3, 16, 16))
    with pytest.raises(ValueError, match=r"codes must lie in \[0, 64\)"):
        vq.decode(torch.full((1, 8, 8), 64))


@pytest.mark.parametrize("kwargs,message", [
    ({"base_channels": 48}, "multiples of 32"),
    ({"ch_mult": ()}, "one positive multiplier per level"),
    ({"image_size": 250}, "not divisible by the downsampling factor 16"),
    ({"codebook_size": 0}, "positive integer"),
])
def test_bad_tokenizer_configs_are_named(kwargs, message):
    with pytest.raises(npp.ConfigError, match=message):
        npp.VQConfig(**kwargs)
