import pytest
import torch

import npp
from npp.sampling import filter_logits, sample_token

from conftest import random_weights


@pytest.fixture
def model(tiny_config):
    return random_weights(npp.GPT(tiny_config)).eval()


def greedy_reference(model, labels, cfg_scale=1.0, cfg_interval=-1):
    """Greedy decoding with full forwards and no cache: the spec that generate() must meet."""
    B, L, null = len(labels), model.config.seq_len, model.config.num_classes
    tokens = torch.zeros(B, L, dtype=torch.long)
    with torch.no_grad():
        for t in range(L):
            logits = model(tokens, labels)[:, t]
            if cfg_scale > 1.0 and (cfg_interval == -1 or t <= cfg_interval + 1):
                uncond = model(tokens, torch.full_like(labels, null))[:, t]
                logits = uncond + cfg_scale * (logits - uncond)
            tokens[:, t] = logits.argmax(-1)
    return tokens


@pytest.mark.parametrize("cfg_scale,cfg_interval", [(1.0, -1), (3.0, -1), (3.0, 5)])
def test_greedy_generation_matches_full_forward_decoding(model, cfg_scale, cfg_interval):
    labels = torch.tensor([0, 7, 10])
    tokens = npp.generate(model, labels, cfg_scale=cfg_scale, cfg_interval=cfg_interval, top_k=1)
    assert torch.equal(tokens, greedy_reference(model, labels, cfg_scale, cfg_interval))


def test_guidance_interval_changes_the_result(model):
    labels = torch.tensor([0, 7])
    always = npp.generate(model, labels, cfg_scale=4.0, top_k=1)
    early = npp.generate(model, labels, cfg_scale=4.0, cfg_interval=0, top_k=1)
    assert torch.equal(always[:, :2], early[:, :2]) and not torch.equal(always, early)


def test_same_seed_same_tokens(model):
    labels = torch.tensor([1, 2, 3, 4])

    def draw(seed):
        return npp.generate(model, labels, cfg_scale=2.0, top_p=0.9, top_k=20,
                            generator=torch.Generator().manual_seed(seed))

    first = draw(0)
    assert first.shape == (4, 64) and first.dtype == torch.long
    assert 0 <= first.min() and first.max() < 64
    assert torch.equal(first, draw(0))
    assert not torch.equal(first, draw(1))


def test_filter_logits_top_k_and_nucleus():
    probs = torch.tensor([[0.05, 0.5, 0.15, 0.3]])
    logits = probs.log()
    kept = lambda out: torch.isfinite(out)[0].tolist()  # noqa: E731
    assert kept(filter_logits(logits, top_k=2)) == [False, True, False, True]
    # Nucleus: the smallest set of most likely tokens whose mass reaches top_p.
    assert kept(filter_logits(logits, top_p=0.45)) == [False, True, False, False]
    assert kept(filter_logits(logits, top_p=0.7)) == [False, True, False, True]
    assert kept(filter_logits(logits, top_p=0.99)) == [True, True, True, True]
    assert kept(filter_logits(logits, top_p=0.01)) == [False, True, False, False]


def test_top_k_sampling_only_draws_allowed_tokens(model):
    tokens = npp.generate(model, torch.tensor([1]), top_k=1, temperature=5.0)
    assert torch.equal(tokens, npp.generate(model, torch.tensor([1]), top_k=1))


def test_callback_streams_every_step_and_mode_is_restored(model):
    seen = []
    model.train()
    npp.generate(model, torch.tensor([1, 2]), callback=lambda step, t: seen.append((step, t.shape)),
                 progress=True)
    assert seen == [(i, (2, i + 1)) for i in range(64)]
    assert model.training


@pytest.mark.parametrize("kwargs,message", [
    ({"labels": [11]}, r"class labels must lie in \[0, 10\]"),
    ({"top_p": 0.0}, "top_p"),
    ({"temperature": -1.0}, "temperature"),
    ({"top_k": -3}, "top_k"),
    ({"cfg_interval": -2}, "cfg_interval"),
])
def test_bad_sampling_arguments_are_named(model, kwargs, message):
    labels = torch.tensor(kwargs.pop("labels", [1]))
    with pytest.raises(ValueError, match=message):
        npp.generate(model, labels, **kwargs)


def test_inverse_cdf_draws_follow_the_filtered_distribution():
    probs = torch.tensor([0.1, 0.0, 0.6, 0.3])
    uniforms = (torch.arange(10_000) + 0.5) / 10_000  # an even sweep of [0, 1)
    logits = probs.log().expand(len(uniforms), -1)
    counts = torch.bincount(sample_token(logits, uniforms), minlength=4) / len(uniforms)
    assert torch.allclose(counts, probs, atol=1e-3)
    top2 = torch.bincount(sample_token(logits, uniforms, top_k=2), minlength=4) / len(uniforms)
    assert torch.allclose(top2, torch.tensor([0.0, 0.0, 2 / 3, 1 / 3]), atol=1e-3)
    assert sample_token(logits[:1], torch.tensor([0.999999])).item() == 3  # never past the last token


def test_one_generator_per_label_makes_each_sample_independent_of_its_batch(model):
    def gens(seeds):
        return [torch.Generator().manual_seed(s) for s in seeds]

    kwargs = dict(cfg_scale=2.0, top_k=30)
    batch = npp.generate(model, torch.tensor([3, 5, 8]), generator=gens([10, 11, 12]), **kwargs)
    alone = npp.generate(model, torch.tensor([5]), generator=gens([11]), **kwargs)
    other_mates = npp.generate(model, torch.tensor([1, 5]), generator=gens([99, 11]), **kwargs)
    assert torch.equal(batch[1], alone[0]) and torch.equal(batch[1], other_mates[1])
    with pytest.raises(ValueError, match="one per label"):
        npp.generate(model, torch.tensor([1, 2]), generator=gens([1]))
