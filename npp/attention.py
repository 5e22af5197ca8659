"""Attention maps of a trained GPT, computed beside the model rather than inside it.

The model attends with fused SDPA, which never materialises the probabilities. Rather than add a
switch to the model (state in forward, a slower path to keep correct), we re-run each block's own
projections here: the same wqkv split, the same 2-D RoPE table and causal softmax(QKᵀ/√d), while
the blocks themselves produce the next layer's input. tests/test_attention.py checks that
probabilities @ V through wo reproduce the Attention module's output.

Sequence layout (as in GPT.forward): position 0 is the class token and position n ≥ 1 holds patch
n - 1 in row-major order of the (grid/p)×(grid/p) coarse grid; the last patch is never an input, so
a sequence of N = (grid/p)² positions covers patches 0..N-2.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import torch

from npp.model import GPT, Attention, apply_rope, rope_table


# --------------------------------------------------------------------------------------------
# Probabilities
# --------------------------------------------------------------------------------------------

def attention_probs(attention: Attention, x_BSD: torch.Tensor, rope_SK2: torch.Tensor) -> torch.Tensor:
    """Causal attention probabilities (B, H, S, S) in fp32 of one Attention module on its input.

    x_BSD is the module's input (after the block's attention_norm). With grouped-query attention
    each key/value head serves n_head / n_kv_head consecutive query heads, as SDPA's enable_gqa does.
    """
    B, S, _ = x_BSD.shape
    H, Hkv, d = attention.n_head, attention.n_kv_head, attention.head_dim
    q, k, _v = attention.wqkv(x_BSD).split([H * d, Hkv * d, Hkv * d], dim=-1)
    q_BHSd = apply_rope(q.view(B, S, H, d), rope_SK2).transpose(1, 2).float()
    k_BHSd = apply_rope(k.view(B, S, Hkv, d), rope_SK2).transpose(1, 2).float()
    k_BHSd = k_BHSd.repeat_interleave(H // Hkv, dim=1)
    scores_BHSS = q_BHSd @ k_BHSd.transpose(-1, -2) / math.sqrt(d)
    future_SS = torch.ones(S, S, dtype=torch.bool, device=x_BSD.device).triu(1)
    return scores_BHSS.masked_fill(future_SS, float("-inf")).softmax(dim=-1)


@torch.no_grad()
def attention_maps(model: GPT, tokens_BL: torch.Tensor, labels_B: torch.Tensor, *,
                   patch_size: int = 1) -> list[torch.Tensor]:
    """Per layer, the attention probabilities (B, H, N, N), fp32, of the training forward.

    N = (grid / patch_size)²: the class token and the grouped patch embeddings without the last one,
    exactly the sequence GPT.forward scores. Runs in eval mode (the model's mode is restored after),
    so what is shown is what sampling computes, without dropout or class-label drop.
    """
    was_training = model.training
    model.eval()
    try:
        h_BND = model.input_sequence(tokens_BL, labels_B, patch_size)
        rope_NK2 = rope_table(model.config, patch_size, h_BND.device)[:-1]
        maps = []
        for layer in model.layers:
            maps.append(attention_probs(layer.attention, layer.attention_norm(h_BND), rope_NK2))
            h_BND = layer(h_BND, rope_NK2)
        return maps
    finally:
        model.train(was_training)


# --------------------------------------------------------------------------------------------
# Summaries
# --------------------------------------------------------------------------------------------

def _side_of(num_positions: int) -> int:
    side = math.isqrt(num_positions)
    if side * side != num_positions:
        raise ValueError(f"{num_positions} positions are not class token + side² - 1 patches: "
                         f"pass maps from attention_maps")
    return side


def _cell_distances(side: int, device: torch.device) -> torch.Tensor:
    """Euclidean distance (N-1, N-1) between the grid cells of image positions 1..N-1."""
    index = torch.arange(side * side - 1, device=device)
    cells_M2 = torch.stack([index // side, index % side], dim=-1).float()
    return torch.cdist(cells_M2, cells_M2)


def mean_attention_distance(probs_BHNN: torch.Tensor, grid_side: int) -> torch.Tensor:
    """Per head (H,): how far, in grid cells of this level, each image query looks on average.

    The class token carries no position (its RoPE angle is zero), so it is left out as query and
    key and each query's weights are renormalised over the image keys it sees. The mean runs over
    queries and the batch; a small value means local attention, a large one global.
    """
    side = _side_of(probs_BHNN.shape[-1])
    if side != grid_side:
        raise ValueError(f"maps of {probs_BHNN.shape[-1]} positions belong to a {side}×{side} grid, "
                         f"not {grid_side}×{grid_side}: pass grid // patch_size of the maps")
    image_BHMM = probs_BHNN[..., 1:, 1:].float()
    image_BHMM = image_BHMM / image_BHMM.sum(-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
    per_query_BHM = (image_BHMM * _cell_distances(side, probs_BHNN.device)).sum(-1)
    return per_query_BHM.mean(dim=(0, 2))


def mean_attention_distance_by_layer(maps: list[torch.Tensor], grid_side: int) -> torch.Tensor:
    """(n_layer, H): mean_attention_distance of every layer's maps."""
    return torch.stack([mean_attention_distance(probs_BHNN, grid_side) for probs_BHNN in maps])


class QueryHeatmap(NamedTuple):
    cells: np.ndarray
    """(side, side) probability that the query gives each patch; NaN where not yet visible."""
    class_weight: float
    """Probability on the class token (not a grid cell)."""
    query_cell: tuple[int, int] | None
    """(row, col) of the query's own patch; None when the query is the class token."""


def query_heatmap(probs_HNN: torch.Tensor, query: int, head: int) -> QueryHeatmap:
    """One head's attention from one query position, laid out on the coarse grid.

    query is a sequence position (negative counts from the end, -1 being the last); the cells of
    patches after the query's own are NaN because the causal mask hides them, and the last patch is
    always NaN because it is never an input.
    """
    H, N, _ = probs_HNN.shape
    side = _side_of(N)
    if not -N <= query < N:
        raise ValueError(f"query={query} is outside the {N} positions (0 = class token, "
                         f"1..{N - 1} = patches, -1 = last)")
    if not -H <= head < H:
        raise ValueError(f"head={head} is outside the {H} heads: use 0..{H - 1}")
    query %= N
    row_N = probs_HNN[head, query].float().cpu().numpy()
    cells = np.full(side * side, np.nan)
    cells[:query] = row_N[1:query + 1]
    query_cell = None if query == 0 else divmod(query - 1, side)
    return QueryHeatmap(cells.reshape(side, side), float(row_N[0]), query_cell)


def patch_position(position: int, grid: int, patch_size: int) -> int:
    """The coarse-sequence position holding the patch of a full-grid sequence position.

    Maps a query chosen on the token grid to the patch-stage view. The class token stays 0; a token
    of the last patch maps to the last coarse position, since the last patch is never an input.
    """
    N = grid * grid
    if not -N <= position < N:
        raise ValueError(f"position={position} is outside the {N} positions of a {grid}×{grid} grid")
    position %= N
    if position == 0:
        return 0
    row, col = divmod(position - 1, grid)
    side = grid // patch_size
    patch = (row // patch_size) * side + col // patch_size
    return min(patch + 1, side * side - 1)
