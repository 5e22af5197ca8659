"""Next patch prediction: group the token grid into p×p squares and score whole patches.

Patches are squares of the token grid in row-major order over the coarse grid (docs/method.md §3): on a
16×16 grid with p = 2, patch 0 holds tokens {0, 1, 16, 17} and patch 1 holds {2, 3, 18, 19}. All of
it is reshapes, so it works for every dtype (integer targets included) and under torch.compile.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from npp.config import check_patch_size


def _coarse_side(length: int, grid: int, patch_size: int) -> int:
    if length != grid * grid:
        raise ValueError(f"sequence of {length} tokens is not a {grid}×{grid} grid")
    check_patch_size(patch_size, grid)
    return grid // patch_size


def patchify(x_BL: torch.Tensor, grid: int, patch_size: int) -> torch.Tensor:
    """(B, grid², *rest) -> (B, N, p², *rest): the members of each patch, patches row-major.

    Within a patch, members are in row-major order too (the p² tokens of its first row, then the
    next row).
    """
    B, L, *rest = x_BL.shape
    g, p = _coarse_side(L, grid, patch_size), patch_size
    x = x_BL.reshape(B, g, p, g, p, *rest)            # (B, patch row, row in patch, patch col, col in patch)
    x = x.transpose(2, 3)                              # (B, patch row, patch col, row in patch, col in patch)
    return x.reshape(B, g * g, p * p, *rest)


def unpatchify(x_BNk: torch.Tensor, grid: int, patch_size: int) -> torch.Tensor:
    """Inverse of patchify: (B, N, p², *rest) -> (B, grid², *rest)."""
    B, N, k, *rest = x_BNk.shape
    g, p = grid // patch_size, patch_size
    if N != g * g or k != p * p:
        raise ValueError(f"expected ({g * g}, {p * p}) patches×members, got ({N}, {k})")
    return x_BNk.reshape(B, g, g, p, p, *rest).transpose(2, 3).reshape(B, grid * grid, *rest)


def group_patches(emb_BLD: torch.Tensor, grid: int, patch_size: int) -> torch.Tensor:
    """Average the embeddings of each p×p square: (B, grid², D) -> (B, (grid/p)², D)."""
    if patch_size == 1:
        return emb_BLD
    return patchify(emb_BLD, grid, patch_size).mean(dim=2)


def patch_targets(tokens_BL: torch.Tensor, patch_size: int) -> torch.Tensor:
    """Targets of next-patch prediction: (B, grid²) codes -> (B, N, p²)."""
    grid = math.isqrt(tokens_BL.shape[1])
    return patchify(tokens_BL, grid, patch_size)


def next_patch_loss(logits_BNV: torch.Tensor, tokens_BL: torch.Tensor, patch_size: int = 1) -> torch.Tensor:
    """Mean over positions and over the p² members of -log p(member token).

    One log-softmax per position, then a gather of the p² targets: the same value as repeating the
    logits p² times and calling cross_entropy (the authors' code), at 1/p² of the memory. With
    patch_size = 1 it is plain cross-entropy.
    """
    if patch_size == 1:
        return F.cross_entropy(logits_BNV.flatten(0, 1).float(), tokens_BL.flatten())
    targets_BNk = patch_targets(tokens_BL, patch_size)
    if targets_BNk.shape[1] != logits_BNV.shape[1]:
        raise ValueError(f"{logits_BNV.shape[1]} logit rows for {targets_BNk.shape[1]} patches: "
                         f"the model and the loss must use the same patch_size")
    logp_BNV = F.log_softmax(logits_BNV.float(), dim=-1)
    return -logp_BNV.gather(-1, targets_BNk.long()).mean()
