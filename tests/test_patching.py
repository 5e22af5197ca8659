import itertools

import pytest
import torch
import torch.nn.functional as F

import npp
from npp.patching import group_patches, next_patch_loss, patch_targets, patchify, unpatchify


def naive_patches(grid: int, p: int) -> list[list[int]]:
    """Token indices of each p×p patch, patches row-major over the coarse grid (a plain loop)."""
    patches = []
    for pr, pc in itertools.product(range(grid // p), range(grid // p)):
        patches.append([(pr * p + r) * grid + pc * p + c for r in range(p) for c in range(p)])
    return patches


def test_order_matches_the_reference_example():
    tokens = torch.arange(256)[None]
    targets = patch_targets(tokens, 2)[0]
    assert targets[0].tolist() == [0, 1, 16, 17]
    assert targets[1].tolist() == [2, 3, 18, 19]
    assert targets[8].tolist() == [32, 33, 48, 49]


@pytest.mark.parametrize("grid,p", [(16, 1), (16, 2), (16, 4), (16, 8), (16, 16), (8, 2), (4, 4)])
def test_grouping_equals_a_naive_loop(grid, p):
    emb = torch.randn(3, grid * grid, 5)
    grouped = group_patches(emb, grid, p)
    expected = torch.stack([emb[:, idx].mean(1) for idx in naive_patches(grid, p)], dim=1)
    assert grouped.shape == (3, (grid // p) ** 2, 5)
    torch.testing.assert_close(grouped, expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.int16, torch.uint8, torch.bfloat16])
def test_patchify_works_for_every_dtype_and_inverts(dtype):
    tokens = torch.randint(0, 100, (2, 64)).to(dtype)
    patches = patchify(tokens, 8, 2)
    assert patches.dtype == dtype
    assert patches[0].tolist() == [[tokens[0, i].item() for i in idx] for idx in naive_patches(8, 2)]
    assert torch.equal(unpatchify(patches, 8, 2), tokens)


@pytest.mark.parametrize("p", [1, 2, 4])
def test_loss_is_the_mean_of_p2_cross_entropies(p):
    grid, V = 8, 11
    tokens = torch.randint(0, V, (3, grid * grid))
    logits = torch.randn(3, (grid // p) ** 2, V)
    members = naive_patches(grid, p)
    separate = [F.cross_entropy(logits.flatten(0, 1), tokens[:, [idx[j] for idx in members]].flatten())
                for j in range(p * p)]
    torch.testing.assert_close(next_patch_loss(logits, tokens, p), torch.stack(separate).mean())
    # The authors' formulation: logits repeated p² times, one cross-entropy over all members.
    repeated = logits.unsqueeze(2).expand(-1, -1, p * p, -1)
    torch.testing.assert_close(next_patch_loss(logits, tokens, p),
                               F.cross_entropy(repeated.flatten(0, 2), patch_targets(tokens, p).flatten()))


def test_loss_rejects_mismatched_patch_size():
    with pytest.raises(ValueError, match="same patch_size"):
        next_patch_loss(torch.randn(2, 16, 7), torch.randint(0, 7, (2, 64)), patch_size=4)


def test_bad_patch_size_is_named():
    with pytest.raises(ValueError, match="does not tile"):
        group_patches(torch.randn(1, 64, 4), 8, 3)
    with pytest.raises(npp.ConfigError, match=r"use one of \[1, 2, 4, 8\]"):
        npp.ModelConfig(grid=8).check_patch_size(3)
