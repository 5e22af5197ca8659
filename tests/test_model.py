import math

import pytest
import torch
import torch.nn.functional as F

import npp
from npp.model import rope_2d

from conftest import random_weights


# ---- an independent, deliberately naive LlamaGen forward (float64, loops, complex RoPE) ----------

def reference_logits(state, cfg: npp.ModelConfig, tokens_BL, labels_B, patch_size=1):
    """LlamaGen's class-conditional forward written from docs/method.md §2–3 without any npp code."""
    sd = {k: v.double() for k, v in state.items()}
    B, grid, p, hd = tokens_BL.shape[0], cfg.grid, patch_size, cfg.head_dim
    g = grid // p
    emb = sd["tok_embeddings.weight"][tokens_BL]
    patches = []
    for pr in range(g):
        for pc in range(g):
            idx = [(pr * p + r) * grid + pc * p + c for r in range(p) for c in range(p)]
            patches.append(emb[:, idx].mean(1))
    x = torch.cat([sd["cls_embedding.embedding_table.weight"][labels_B][:, None],
                   torch.stack(patches, 1)[:, :-1]], 1)
    S = x.shape[1]
    # Rotation per position: class token multiplied by 0; patch n at coarse (n // g, n % g).
    quarter = hd // 4
    freqs = cfg.rope_base ** (-torch.arange(quarter, dtype=torch.float64) * 2 / (hd // 2))
    rot = torch.zeros(S, hd // 2, dtype=torch.complex128)
    for s in range(1, S):
        row, col = divmod(s - 1, g)
        rot[s] = torch.polar(torch.ones(hd // 2, dtype=torch.float64),
                             torch.cat([row * freqs, col * freqs]))

    def rms(v, w):
        return v / torch.sqrt((v * v).mean(-1, keepdim=True) + cfg.norm_eps) * w

    def rope(v):  # (B, S, H, hd)
        c = torch.view_as_complex(v.reshape(*v.shape[:-1], hd // 2, 2).contiguous())
        return torch.view_as_real(c * rot[None, :, None]).flatten(-2)

    kvh = cfg.kv_heads
    for i in range(cfg.n_layer):
        pre = f"layers.{i}."
        h = rms(x, sd[pre + "attention_norm.weight"])
        qkv = h @ sd[pre + "attention.wqkv.weight"].T
        q, k, v = qkv.split([cfg.n_head * hd, kvh * hd, kvh * hd], -1)
        q, k = rope(q.view(B, S, cfg.n_head, hd)), rope(k.view(B, S, kvh, hd))
        v = v.view(B, S, kvh, hd)
        out = torch.zeros(B, S, cfg.n_head, hd, dtype=torch.float64)
        for head in range(cfg.n_head):
            kv = head // (cfg.n_head // kvh)
            scores = q[:, :, head] @ k[:, :, kv].transpose(1, 2) / math.sqrt(hd)
            scores = scores.masked_fill(~torch.ones(S, S, dtype=torch.bool).tril(), float("-inf"))
            out[:, :, head] = scores.softmax(-1) @ v[:, :, kv]
        x = x + out.flatten(2) @ sd[pre + "attention.wo.weight"].T
        h = rms(x, sd[pre + "ffn_norm.weight"])
        ff = F.silu(h @ sd[pre + "feed_forward.w1.weight"].T) * (h @ sd[pre + "feed_forward.w3.weight"].T)
        x = x + ff @ sd[pre + "feed_forward.w2.weight"].T
    return rms(x, sd["norm.weight"]) @ sd["output.weight"].T


@pytest.mark.parametrize("patch_size", [1, 2, 4])
@pytest.mark.parametrize("n_kv_head", [None, 1])
def test_forward_matches_naive_llamagen(tiny_config, patch_size, n_kv_head):
    cfg = npp.ModelConfig.preset("debug", vocab_size=64, num_classes=10, grid=8, n_kv_head=n_kv_head)
    model = random_weights(npp.GPT(cfg)).eval()
    tokens, labels = torch.randint(0, 64, (2, 64)), torch.tensor([3, 10])
    expected = reference_logits(model.state_dict(), cfg, tokens, labels, patch_size)
    torch.testing.assert_close(model(tokens, labels, patch_size).double(), expected, rtol=1e-4, atol=1e-4)


def test_rope_table_layout():
    table = rope_2d(4, 16, 10000.0)
    assert table.shape == (17, 8, 2) and table.dtype == torch.float32
    assert torch.count_nonzero(table[0]) == 0                       # the class-token quirk
    # Token 6 sits at row 1, column 2: the first 4 pairs turn with the row, the last 4 with the column.
    freqs = 10000.0 ** (-torch.arange(0, 8, 2) / 8)
    torch.testing.assert_close(table[1 + 6, :, 0], torch.cat([torch.cos(1 * freqs), torch.cos(2 * freqs)]))
    torch.testing.assert_close(table[1 + 6, :, 1], torch.cat([torch.sin(1 * freqs), torch.sin(2 * freqs)]))


def test_centre_patch_positions_put_each_patch_at_its_centre_on_the_token_grid(tiny_config):
    coarse, centre = rope_2d(2, 16, 10000.0), rope_2d(2, 16, 10000.0, spacing=4)
    freqs = 10000.0 ** (-torch.arange(0, 8, 2) / 8)
    # patch 1 of a 2×2 grid of 4×4 patches: row 0, column 1 → token-grid centre (1.5, 5.5)
    torch.testing.assert_close(coarse[1 + 1, :, 0], torch.cat([torch.cos(0 * freqs), torch.cos(1 * freqs)]))
    torch.testing.assert_close(centre[1 + 1, :, 0], torch.cat([torch.cos(1.5 * freqs), torch.cos(5.5 * freqs)]))
    model = random_weights(npp.GPT(tiny_config)).eval()
    tokens, labels = torch.randint(0, 64, (2, 64)), torch.tensor([3, 10])
    moved = npp.GPT(npp.ModelConfig(**{**tiny_config.__dict__, "patch_positions": "centre"})).eval()
    moved.load_state_dict(model.state_dict())
    torch.testing.assert_close(moved(tokens, labels, 1), model(tokens, labels, 1))  # NTP: the same positions
    assert not torch.allclose(moved(tokens, labels, 2), model(tokens, labels, 2))


@pytest.mark.parametrize("patch_size", [1, 2, 4])
def test_causality(tiny_config, patch_size):
    model = random_weights(npp.GPT(tiny_config)).eval()
    tokens, labels = torch.randint(0, 64, (1, 64)), torch.tensor([4])
    base = model(tokens, labels, patch_size)
    changed_patch = (8 // patch_size) ** 2 // 2 - 1
    members = npp.patch_targets(torch.arange(64)[None], patch_size)[0, changed_patch]
    edited = tokens.clone()
    edited[0, members] = (edited[0, members] + 1) % 64
    out = model(edited, labels, patch_size)
    # Row n predicts patch n from patches < n: rows up to the edited patch must not move, later rows must.
    torch.testing.assert_close(out[:, :changed_patch + 1], base[:, :changed_patch + 1], rtol=0, atol=0)
    assert not torch.allclose(out[:, changed_patch + 1:], base[:, changed_patch + 1:])


def test_kv_cache_decoding_equals_full_forward(tiny_config):
    model = random_weights(npp.GPT(tiny_config)).eval()
    tokens, labels = torch.randint(0, 64, (3, 64)), torch.tensor([0, 5, 10])
    full = model(tokens, labels)
    cache = model.new_cache(3)
    k_before = cache.k.data_ptr()
    rows = [model.decode(cache, 0, labels_B=labels)]
    rows += [model.decode(cache, i, tokens_BS=tokens[:, i - 1:i]) for i in range(1, 64)]
    torch.testing.assert_close(torch.cat(rows, 1), full, rtol=1e-5, atol=1e-5)
    assert cache.k.data_ptr() == k_before  # written in place, never re-allocated
    # A prompt of several positions at once, then single steps, gives the same logits too.
    cache = model.new_cache(3)
    chunk = model.decode(cache, 0, labels_B=labels, tokens_BS=tokens[:, :20])
    rest = model.decode(cache, 21, tokens_BS=tokens[:, 20:30])
    torch.testing.assert_close(torch.cat([chunk, rest], 1), full[:, :31], rtol=1e-5, atol=1e-5)


def test_zero_head_gives_exactly_ln_vocab(tiny_config):
    model = npp.GPT(tiny_config)
    assert torch.count_nonzero(model.output.weight) == 0
    tokens, labels = torch.randint(0, 64, (4, 64)), torch.randint(0, 10, (4,))
    for p in (1, 2, 4):
        loss = npp.next_patch_loss(model(tokens, labels, p), tokens, p)
        assert loss.item() == pytest.approx(math.log(64), rel=1e-6)


def test_init_statistics_and_null_class_row():
    model = npp.GPT(npp.ModelConfig.preset("tiny", vocab_size=512, num_classes=10, grid=8))
    assert model.cls_embedding.embedding_table.weight.shape == (11, 256)
    std = model.layers[0].feed_forward.w1.weight.std().item()
    assert std == pytest.approx(0.02, rel=0.05)
    assert torch.all(model.norm.weight == 1)


LLAMAGEN_PARAMS = {"B": 110_888_448, "L": 342_910_976, "XL": 774_699_520, "XXL": 1_410_972_672,
                   "3B": 3_096_659_200, "2B": 1_918_996_480}


@pytest.mark.parametrize("name,count", LLAMAGEN_PARAMS.items())
def test_preset_parameter_counts_match_llamagen(name, count):
    with torch.device("meta"):
        model = npp.GPT(npp.ModelConfig.preset(name, vocab_size=16384, num_classes=1000))
    assert model.num_params() == count
    matmul = sum(p.numel() for n, p in model.named_parameters() if p.dim() == 2 and "embedding" not in n)
    assert model.config.matmul_params() == matmul


def test_flops_formula():
    cfg = npp.ModelConfig.preset("B")
    n = cfg.matmul_params()
    assert cfg.flops_per_sample(1) == 6 * n * 256 + 12 * 12 * 768 * 256**2
    assert cfg.flops_per_sample(2) == 6 * n * 64 + 12 * 12 * 768 * 64**2


def test_dropout_only_in_train_mode():
    cfg = npp.ModelConfig.preset("debug", vocab_size=64, num_classes=10, grid=8)
    model = random_weights(npp.GPT(cfg))
    tokens, labels = torch.randint(0, 64, (2, 64)), torch.tensor([1, 2])
    model.eval()
    assert torch.equal(model(tokens, labels), model(tokens, labels))
    model.train()
    assert not torch.equal(model(tokens, labels), model(tokens, labels))


def test_class_dropout_uses_the_null_row():
    cfg = npp.ModelConfig.preset("debug", vocab_size=64, num_classes=10, grid=8, class_dropout=0.999999)
    emb = npp.GPT(cfg).cls_embedding
    labels = torch.arange(10)
    null_row = emb.embedding_table.weight[10]
    assert torch.equal(emb.train()(labels)[:, 0], null_row.expand(10, -1))
    assert torch.equal(emb.eval()(labels)[:, 0], emb.embedding_table.weight[:10])


def test_activation_checkpointing_gives_the_same_gradients(tiny_config):
    model = random_weights(npp.GPT(tiny_config)).train()
    tokens, labels = torch.randint(0, 64, (2, 64)), torch.tensor([1, 2])

    def grads(checkpointing: bool):
        model.zero_grad()
        model.activation_checkpointing = checkpointing
        torch.manual_seed(123)  # same dropout masks in both runs
        npp.next_patch_loss(model(tokens, labels, 2), tokens, 2).backward()
        return [p.grad.clone() for p in model.parameters()]

    for a, b in zip(grads(False), grads(True)):
        torch.testing.assert_close(a, b)


@pytest.mark.heavy  # a torch.compile on the CPU; ~15 s
def test_training_forward_compiles_without_graph_breaks(tiny_config):
    model = random_weights(npp.GPT(tiny_config))
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")  # fullgraph: a break raises
    tokens, labels = torch.randint(0, 64, (2, 64)), torch.tensor([1, 2])
    for p in (2, 1):
        model.train()
        npp.next_patch_loss(compiled(tokens, labels, p), tokens, p).backward()
        model.eval()
        torch.testing.assert_close(compiled(tokens, labels, p), model(tokens, labels, p))


def test_bf16_forward_is_close_to_fp32(tiny_config):
    model = random_weights(npp.GPT(tiny_config)).eval()
    tokens, labels = torch.randint(0, 64, (2, 64)), torch.tensor([1, 2])
    fp32 = model(tokens, labels, 2)
    bf16 = model.to(torch.bfloat16)(tokens, labels, 2)
    assert bf16.dtype == torch.float32  # logits come back in fp32 for the loss
    assert torch.isfinite(bf16).all()
    assert (bf16 - fp32).abs().max() < 0.05 * fp32.abs().max()


def test_wrong_token_count_is_named(tiny_config):
    with pytest.raises(ValueError, match="expected 64 tokens"):
        npp.GPT(tiny_config)(torch.zeros(1, 60, dtype=torch.long), torch.tensor([0]))


@pytest.mark.parametrize("kwargs,message", [
    ({"patch_positions": "middle"}, "patch_positions='middle'"),
    ({"dim": 100, "n_head": 3}, "not divisible by n_head"),
    ({"dim": 96, "n_head": 16}, "multiple of 4"),
    ({"n_kv_head": 5}, "must divide n_head"),
    ({"resid_dropout": 1.0}, r"\[0, 1\)"),
    ({"grid": 0}, "positive integer"),
])
def test_bad_model_configs_are_named(kwargs, message):
    with pytest.raises(npp.ConfigError, match=message):
        npp.ModelConfig(**kwargs)


def test_unknown_preset_lists_the_choices():
    with pytest.raises(npp.ConfigError, match="choose one of debug, tiny, B, L, XL, XXL, 2B, 3B"):
        npp.ModelConfig.preset("XXXL")
