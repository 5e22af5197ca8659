"""npp.Pipeline: one call from labels to pictures, the same pictures as generate + decode."""

import json

import numpy as np
import pytest
import torch

import npp
from npp.tokenizer import load_embedded_tokenizer, to_uint8

from conftest import random_weights


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    """A random GPT on the mnist-8x8 vocabulary, exported as the trainer exports runs."""
    folder = tmp_path_factory.mktemp("run") / "export"
    torch.manual_seed(0)
    model = random_weights(npp.GPT(npp.ModelConfig.preset("debug", vocab_size=256, num_classes=10, grid=8)))
    model.save_pretrained(folder)
    vq = load_embedded_tokenizer("mnist-8x8")
    (folder / "tokenizer.json").write_text(json.dumps({"data": "mnist-8x8", "fingerprint": vq.fingerprint(),
                                                       "config": vq.config.to_dict(), "path": None}))
    return folder


def generators(n: int) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(100 + i) for i in range(n)]


def test_from_run_draws_the_images_of_generate_then_decode(export):
    pipe = npp.Pipeline.from_run(export.parent)  # the run directory finds its export
    sampler = npp.SamplerConfig(cfg_scale=2.0, top_k=20, temperature=0.9)
    labels = torch.tensor([0, 3, 3, 9])
    images = pipe(labels, sampler, generator=generators(4))

    model, vq = npp.GPT.from_pretrained(export), load_embedded_tokenizer("mnist-8x8")
    tokens = npp.generate(model, labels, cfg_scale=2.0, top_k=20, temperature=0.9, generator=generators(4))
    assert torch.equal(images, to_uint8(vq.decode(tokens.view(-1, 8, 8))))
    assert images.shape == (4, 32, 32, 3) and images.dtype == torch.uint8
    assert torch.equal(pipe(labels, sampler, generator=generators(4), output="codes"), tokens.view(-1, 8, 8))
    pil = pipe(labels, sampler, generator=generators(4), output="pil")
    assert [image.size for image in pil] == [(32, 32)] * 4
    assert torch.equal(torch.stack([torch.from_numpy(np.array(p)) for p in pil]), images)
    assert pipe.on_embedded_data and pipe.image_size == 32


def test_keywords_replace_the_samplers_values_and_unknown_ones_are_named(export):
    pipe = npp.Pipeline.from_run(export)
    labels = torch.tensor([1, 2])
    by_keyword = pipe(labels, npp.PAPER_SAMPLER, generator=generators(2), top_k=5)
    by_config = pipe(labels, npp.SamplerConfig(cfg_scale=2.0, top_k=5), generator=generators(2))
    assert torch.equal(by_keyword, by_config)
    with pytest.raises(npp.ConfigError, match="unknown sampling argument"):
        pipe(labels, top_q=0.5)
    with pytest.raises(npp.ConfigError, match="output='png'"):
        pipe(labels, output="png")


def test_a_pipeline_leaves_a_training_model_in_training_mode(export):
    model = npp.GPT.from_pretrained(export).train()
    pipe = npp.Pipeline(model, load_embedded_tokenizer("mnist-8x8"))
    pipe([1], generator=generators(1))
    assert model.training  # the trainer's periodic evaluation samples its model mid-training


def test_a_tokenizer_of_another_vocabulary_is_refused(export):
    vq = npp.VQModel(npp.VQConfig.preset("mnist-8x8", codebook_size=64))
    with pytest.raises(npp.ConfigError, match="has 64 codes but the model predicts 256"):
        npp.Pipeline(npp.GPT.from_pretrained(export), vq)
