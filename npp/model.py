"""A class-conditional LlamaGen GPT that can read its input in p×p patches.

Read top to bottom: normalisation, 2-D rotary embeddings, attention (with an explicit KV cache for
sampling), the SwiGLU feed-forward, the block, and the GPT itself with its import and export.
Parameter names match LlamaGen's state dicts exactly, so released checkpoints load strictly.

Sequence layout: position 0 is the class token, then (patch) embeddings in row-major grid order.
The training forward takes the full token grid; with patch_size p > 1 it averages the embeddings
of each p×p square (npp.patching), so the sequence is p² times shorter.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import re
from dataclasses import dataclass
from typing import Any, Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from npp.config import MODEL_PRESETS, ModelConfig
from npp.patching import group_patches
from npp.errors import CheckpointError, is_int
from npp.weights import Pretrained, check_finite, load_strict, read_foreign_checkpoint


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 and cast back before the weight, as LlamaGen does: bf16 checkpoints
        # then give the same activations here as there.
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.type_as(x) * self.weight


# --------------------------------------------------------------------------------------------
# 2-D rotary position embedding
# --------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=64)
def rope_2d(grid: int, head_dim: int, base: float, device: torch.device | str = "cpu",
            spacing: int = 1) -> torch.Tensor:
    """cos/sin table of shape (1 + grid², head_dim // 2, 2) in fp32, row 0 for the class token.

    The rotary pairs are adjacent dims (x[2i], x[2i+1]); the first half of the pairs rotates with the
    grid row, the second half with the column. Row 0 is all zeros, so the class token's query and key
    are multiplied by zero and only its value carries the class: LlamaGen's checkpoints were trained
    that way and need it. Coordinates are spacing·i + (spacing - 1)/2: integers for spacing 1, patch
    centres in token units for spacing p. Pure and cached; callers must not modify the returned tensor.
    """
    half = head_dim // 2
    freqs_F = 1.0 / (base ** (torch.arange(0, half, 2, dtype=torch.float32, device=device) / half))
    coord = spacing * torch.arange(grid, dtype=torch.float32, device=device) + (spacing - 1) / 2
    angle_GF = torch.outer(coord, freqs_F)
    angle_GGK = torch.cat(
        [angle_GF[:, None, :].expand(grid, grid, -1),   # row angle, constant along a row
         angle_GF[None, :, :].expand(grid, grid, -1)],  # column angle
        dim=-1,
    )
    table_LK2 = torch.stack([angle_GGK.cos(), angle_GGK.sin()], dim=-1).flatten(0, 1)
    class_row = torch.zeros(1, half, 2, device=device)
    return torch.cat([class_row, table_LK2])


def rope_table(config: ModelConfig, patch_size: int, device: torch.device) -> torch.Tensor:
    """The table for a sequence of (grid / patch_size)² patches (config.patch_positions places them)."""
    # Under torch.compile the table is traced as ordinary ops (Dynamo cannot use the cache).
    make = rope_2d.__wrapped__ if torch.compiler.is_compiling() else rope_2d
    spacing = patch_size if config.patch_positions == "centre" else 1
    return make(config.grid // patch_size, config.head_dim, config.rope_base, device, spacing)


def apply_rope(x_BSHd: torch.Tensor, rope_SK2: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent pairs of x by the angles in rope (fp32 maths, result in x's dtype)."""
    x_BSHK2 = x_BSHd.float().unflatten(-1, (-1, 2))
    cos, sin = rope_SK2[None, :, None, :, 0], rope_SK2[None, :, None, :, 1]
    x0, x1 = x_BSHK2[..., 0], x_BSHK2[..., 1]
    rotated = torch.stack([x0 * cos - x1 * sin, x1 * cos + x0 * sin], dim=-1)
    return rotated.flatten(-2).type_as(x_BSHd)


# --------------------------------------------------------------------------------------------
# Attention with an explicit, preallocated KV cache
# --------------------------------------------------------------------------------------------

@dataclass
class KVCache:
    """Preallocated keys and values for every layer: (n_layer, B, kv_heads, max_len, head_dim).

    It lives outside the model and is passed to each decoding call, so sampling never mutates the
    module and no tensor is re-allocated per step.
    """

    k: torch.Tensor
    v: torch.Tensor

    @classmethod
    def empty(cls, config: ModelConfig, batch: int, max_len: int, *, dtype: torch.dtype,
              device: torch.device | str) -> "KVCache":
        shape = (config.n_layer, batch, config.kv_heads, max_len, config.head_dim)
        return cls(torch.zeros(shape, dtype=dtype, device=device),
                   torch.zeros(shape, dtype=dtype, device=device))


class Attention(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.kv_heads, config.head_dim
        self.wqkv = nn.Linear(config.dim, (self.n_head + 2 * self.n_kv_head) * self.head_dim, bias=False)
        self.wo = nn.Linear(config.dim, config.dim, bias=False)
        self.attn_dropout = config.attn_dropout
        self.resid_dropout = nn.Dropout(config.resid_dropout)

    def forward(self, x_BSD: torch.Tensor, rope_SK2: torch.Tensor,
                cache: tuple[torch.Tensor, torch.Tensor] | None = None, start: int = 0) -> torch.Tensor:
        B, S, D = x_BSD.shape
        q_dim, kv_dim = self.n_head * self.head_dim, self.n_kv_head * self.head_dim
        q, k, v = self.wqkv(x_BSD).split([q_dim, kv_dim, kv_dim], dim=-1)
        q_BSHd = apply_rope(q.view(B, S, self.n_head, self.head_dim), rope_SK2)
        k_BSHd = apply_rope(k.view(B, S, self.n_kv_head, self.head_dim), rope_SK2)
        q_BHSd, k_BHSd = q_BSHd.transpose(1, 2), k_BSHd.transpose(1, 2)
        v_BHSd = v.view(B, S, self.n_kv_head, self.head_dim).transpose(1, 2)

        mask, causal = None, True
        if cache is not None:
            k_cache, v_cache = cache
            k_cache[:, :, start:start + S] = k_BHSd
            v_cache[:, :, start:start + S] = v_BHSd
            k_BHSd, v_BHSd = k_cache[:, :, :start + S], v_cache[:, :, :start + S]
            if start > 0:  # queries sit at start..start+S-1 and see every key up to themselves
                causal = False
                if S > 1:
                    key_pos = torch.arange(start + S, device=x_BSD.device)
                    query_pos = torch.arange(start, start + S, device=x_BSD.device)
                    mask = key_pos[None, :] <= query_pos[:, None]

        out_BHSd = F.scaled_dot_product_attention(
            q_BHSd, k_BHSd, v_BHSd, attn_mask=mask, is_causal=causal,
            dropout_p=self.attn_dropout if self.training else 0.0,
            enable_gqa=self.n_kv_head != self.n_head,
        )
        return self.resid_dropout(self.wo(out_BHSd.transpose(1, 2).reshape(B, S, D)))


class FeedForward(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.w1 = nn.Linear(config.dim, config.hidden_dim, bias=False)
        self.w3 = nn.Linear(config.dim, config.hidden_dim, bias=False)
        self.w2 = nn.Linear(config.hidden_dim, config.dim, bias=False)
        self.ffn_dropout = nn.Dropout(config.ffn_dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ffn_dropout(self.w2(F.silu(self.w1(x)) * self.w3(x)))


class TransformerBlock(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.attention_norm = RMSNorm(config.dim, config.norm_eps)
        self.attention = Attention(config)
        self.ffn_norm = RMSNorm(config.dim, config.norm_eps)
        self.feed_forward = FeedForward(config)

    def forward(self, x: torch.Tensor, rope_SK2: torch.Tensor,
                cache: tuple[torch.Tensor, torch.Tensor] | None = None, start: int = 0) -> torch.Tensor:
        h = x + self.attention(self.attention_norm(x), rope_SK2, cache, start)
        return h + self.feed_forward(self.ffn_norm(h))


class ClassEmbedding(nn.Module):
    """Class table with a final null row; in training, labels drop to the null class at random."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.null_class = config.num_classes
        self.drop_prob = config.class_dropout
        self.embedding_table = nn.Embedding(config.num_classes + 1, config.dim)

    def forward(self, labels_B: torch.Tensor) -> torch.Tensor:
        if self.training and self.drop_prob > 0:
            drop_B = torch.rand(labels_B.shape, device=labels_B.device) < self.drop_prob
            labels_B = torch.where(drop_B, self.null_class, labels_B)
        return self.embedding_table(labels_B).unsqueeze(1)


# --------------------------------------------------------------------------------------------
# The GPT
# --------------------------------------------------------------------------------------------

class GPT(Pretrained, nn.Module):
    """Class-conditional LlamaGen GPT with next-patch input grouping.

    >>> model = GPT(ModelConfig.preset("debug", vocab_size=64, num_classes=10, grid=8))
    >>> logits_BNV = model(tokens_BL, labels_B, patch_size=2)   # N = (8 / 2)² = 16
    """

    config_class = ModelConfig

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.cls_embedding = ClassEmbedding(config)
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.dim)
        self.tok_dropout = nn.Dropout(config.token_dropout)
        self.layers = nn.ModuleList(TransformerBlock(config) for _ in range(config.n_layer))
        self.norm = RMSNorm(config.dim, config.norm_eps)
        self.output = nn.Linear(config.dim, config.vocab_size, bias=False)
        self.activation_checkpointing = False
        """Recompute each block in the backward pass (set by the trainer; saves activation memory)."""
        self.inferred: str | None = None
        """For a model read by from_llamagen: one line saying what was inferred about it and from where."""
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=self.config.init_std)
            elif isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)
        # A zero head predicts the uniform distribution: the first loss is exactly ln(vocab).
        nn.init.zeros_(self.output.weight)

    # ---- training forward ----------------------------------------------------------------

    def forward(self, tokens_BL: torch.Tensor, labels_B: torch.Tensor, patch_size: int = 1) -> torch.Tensor:
        """Next-(patch) logits for a full token grid.

        tokens_BL: (B, grid²) codes in row-major order; labels_B: (B,) class ids (num_classes is the
        null class). Returns logits_BNV with N = (grid / patch_size)²: row n predicts patch n (token
        n when patch_size = 1) from the class and patches 0..n-1.
        """
        h_BND = self.tok_dropout(self.input_sequence(tokens_BL, labels_B, patch_size))
        rope_NK2 = rope_table(self.config, patch_size, h_BND.device)
        for layer in self.layers:
            if self.activation_checkpointing and self.training:
                h_BND = checkpoint(layer, h_BND, rope_NK2[:-1], use_reentrant=False)
            else:
                h_BND = layer(h_BND, rope_NK2[:-1])
        return self.output(self.norm(h_BND)).float()

    def input_sequence(self, tokens_BL: torch.Tensor, labels_B: torch.Tensor, patch_size: int = 1) -> torch.Tensor:
        """The first block's input before dropout: the class token, then the (patch-averaged) embeddings
        of every patch but the last (nothing follows it), (B, N, D) with N = (grid / patch_size)²."""
        grid = self.config.grid
        if tokens_BL.shape[1] != grid * grid:
            raise ValueError(f"expected {grid * grid} tokens per image ({grid}×{grid} grid), "
                             f"got {tokens_BL.shape[1]}: pass the full token grid")
        self.config.check_patch_size(patch_size)
        emb_BND = group_patches(self.tok_embeddings(tokens_BL), grid, patch_size)
        return torch.cat([self.cls_embedding(labels_B), emb_BND[:, :-1]], dim=1)

    # ---- cached decoding (sampling) -------------------------------------------------------

    def new_cache(self, batch: int, *, dtype: torch.dtype | None = None) -> KVCache:
        """An empty KV cache long enough for a whole image (class token + grid² - 1 inputs)."""
        weight = self.tok_embeddings.weight
        return KVCache.empty(self.config, batch, self.config.seq_len, dtype=dtype or weight.dtype,
                             device=weight.device)

    def decode(self, cache: KVCache, start: int, *, labels_B: torch.Tensor | None = None,
               tokens_BS: torch.Tensor | None = None) -> torch.Tensor:
        """Logits for sequence positions start..start+S-1, reading and filling the cache.

        Position 0 is the class token (give labels_B, start = 0); position i ≥ 1 holds image token
        i - 1 (give tokens_BS). With both, the class token is followed by the tokens. Labels are
        used as given (no class dropout): pass the null class for the unconditional branch of CFG.
        """
        parts = []
        if labels_B is not None:
            if start != 0:
                raise ValueError("the class token sits at position 0: call decode(labels_B=…) with start=0")
            parts.append(self.cls_embedding.embedding_table(labels_B).unsqueeze(1))
        if tokens_BS is not None:
            parts.append(self.tok_embeddings(tokens_BS))
        if not parts:
            raise ValueError("decode() needs labels_B, tokens_BS or both")
        h_BSD = self.tok_dropout(torch.cat(parts, dim=1))
        S = h_BSD.shape[1]
        if start + S > cache.k.shape[3]:
            raise ValueError(f"positions up to {start + S} exceed the cache length {cache.k.shape[3]}")
        rope = rope_table(self.config, 1, h_BSD.device)
        for i, layer in enumerate(self.layers):
            h_BSD = layer(h_BSD, rope[start:start + S], (cache.k[i], cache.v[i]), start)
        return self.output(self.norm(h_BSD)).float()

    # ---- accounting ------------------------------------------------------------------------

    def num_params(self, *, exclude_embeddings: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        if exclude_embeddings:
            n -= self.tok_embeddings.weight.numel() + self.cls_embedding.embedding_table.weight.numel()
        return n

    def flops_per_sample(self, patch_size: int = 1) -> float:
        """Training FLOPs for one image at this patch size (see ModelConfig.flops_per_sample)."""
        return self.config.flops_per_sample(patch_size)

    # ---- LlamaGen / NPP checkpoints --------------------------------------------------------

    @classmethod
    def from_llamagen(cls, path_or_state_dict: str | os.PathLike | Mapping[str, torch.Tensor], *,
                      n_head: int | None = None, grid: int | None = None, image_size: int | None = None,
                      **overrides: Any) -> "GPT":
        """Load a LlamaGen or NPP class-conditional GPT checkpoint, strictly (weights_only, strict keys).

        Layouts: {"model": state} with or without LlamaGen's stored `args`, "module"/"state_dict", or a
        bare (FSDP) state dict; `module.`/`_orig_mod.` prefixes; bf16 or fp32 tensors. Vocabulary, width,
        depth, classes, FFN width and GQA heads are read from tensor shapes; heads and grid as
        `infer_llamagen` says (explicit arguments win; otherwise the preset table, the stored training
        arguments, the file name; a fact the file cannot tell is asked for in one line). The line saying
        what was inferred and from where is kept as `model.inferred`. Other ModelConfig fields (dropouts,
        rope_base, …) can be given as keyword overrides.
        """
        checkpoint = read_foreign_checkpoint(path_or_state_dict)
        inferred = infer_llamagen(checkpoint.state, checkpoint.source, args=checkpoint.args, n_head=n_head,
                                  grid=grid, image_size=image_size, **overrides)
        with torch.device("meta"):
            model = cls(inferred.config)
        check_finite(checkpoint.state, checkpoint.source)
        model = load_strict(model, checkpoint.state, checkpoint.source).eval()
        model.inferred = inferred.description
        return model


# ---- what a LlamaGen / NPP file says about its architecture -------------------------------------

LLAMAGEN_PRESETS = ("B", "L", "XL", "XXL", "3B")
"""LlamaGen's released class-conditional architectures (its gpt.py GPT-B … GPT-3B), in MODEL_PRESETS."""

LLAMAGEN_DOWNSAMPLE = 16
"""VQ-16, the tokenizer of every released LlamaGen c2i GPT: one code per 16×16 pixels."""

_SIZE_IN_NAME = re.compile(r"_(256|384|512)(?=$|[._-])")
"""The image size in a released file's name: c2i_B_256.pt, c2i_XXL_384.pt, …"""


@dataclass(frozen=True)
class LlamaGenInference:
    """The architecture of a foreign checkpoint and one line saying what was inferred and from where."""

    config: ModelConfig
    description: str


def infer_llamagen(state: Mapping[str, torch.Tensor], source: str, *, args: Mapping[str, Any] | None = None,
                   n_head: int | None = None, grid: int | None = None, image_size: int | None = None,
                   **overrides: Any) -> LlamaGenInference:
    """The ModelConfig of a LlamaGen/NPP GPT state dict, never from a guess.

    Shapes give vocabulary, width, depth, classes, FFN width and GQA heads. Heads (not in any shape):
    an explicit `n_head`; else the preset with this (layers, width) in MODEL_PRESETS; else the LlamaGen
    preset the stored `args.gpt_model` names, when its width matches; else the LlamaGen preset with this
    width, when exactly one has it (a file cut to fewer layers than its preset, e.g. a test stand-in: the
    description says so); else refused, asking for n_head. Grid: an explicit `grid` or `image_size`
    (÷ the stored downsample_size, else 16); else the stored `args` (image_size // downsample_size);
    else the file name's _256/_384/_512 (÷ 16, VQ-16); else refused, asking for grid or image_size.
    """
    if "tok_embeddings.weight" not in state or "cls_embedding.embedding_table.weight" not in state:
        hint = ("it looks like a VQ tokenizer: use npp.VQModel.from_llamagen"
                if any(k.startswith(("encoder.", "quantize.")) for k in state)
                else "expected a LlamaGen/NPP class-conditional GPT")
        raise CheckpointError(f"{source} has no tok_embeddings.weight/cls_embedding.embedding_table.weight; {hint}")
    vocab_size, dim = state["tok_embeddings.weight"].shape
    layer_ids = {int(m.group(1)) for k in state if (m := re.match(r"layers\.(\d+)\.", k))}
    if not layer_ids:
        raise CheckpointError(f"{source} has no transformer layers (layers.N.*): not a GPT checkpoint")
    n_layer = max(layer_ids) + 1
    args = dict(args or {})
    name = os.path.basename(source) if source != "the given state dict" else source

    n_head, heads_from = _infer_heads(n_layer, dim, n_head, args, source)
    if dim % n_head:
        raise CheckpointError(f"{source}: width {dim} is not divisible by n_head={n_head}; pass n_head=")
    grid, grid_from = _infer_grid(grid, image_size, args, source)

    head_dim = dim // n_head
    qkv_rows = state["layers.0.attention.wqkv.weight"].shape[0] if "layers.0.attention.wqkv.weight" in state else 3 * dim
    n_kv_head = (qkv_rows // head_dim - n_head) // 2
    config = ModelConfig(
        vocab_size=vocab_size, dim=dim, n_layer=n_layer, n_head=n_head,
        n_kv_head=None if n_kv_head == n_head else n_kv_head,
        num_classes=state["cls_embedding.embedding_table.weight"].shape[0] - 1, grid=grid, **overrides,
    )
    ffn = state.get("layers.0.feed_forward.w1.weight")
    if ffn is not None and ffn.shape[0] != config.hidden_dim:  # keep the default rule when it fits
        config = dataclasses.replace(config, ffn_dim=ffn.shape[0])
    kv = f", {config.kv_heads} kv heads" if config.n_kv_head is not None else ""
    description = (f"{name}: {n_layer} layer{'s' * (n_layer != 1)} × {dim}, {n_head} heads of {head_dim}{kv} ({heads_from}), "
                   f"grid {grid}×{grid} ({grid_from})")
    return LlamaGenInference(config, description)


def infer_llamagen_config(state: Mapping[str, torch.Tensor], source: str, *, n_head: int | None = None,
                          grid: int | None = None, **overrides: Any) -> ModelConfig:
    """infer_llamagen's config alone (kept for callers of the older name)."""
    return infer_llamagen(state, source, n_head=n_head, grid=grid, **overrides).config


def _preset_label(name: str) -> str:
    return f"LlamaGen preset {name}" if name in LLAMAGEN_PRESETS else f"npp preset {name}"


def _infer_heads(n_layer: int, dim: int, n_head: int | None, args: Mapping[str, Any],
                 source: str) -> tuple[int, str]:
    if n_head is not None:
        if not (is_int(n_head) and n_head > 0):
            raise CheckpointError(f"{source}: n_head={n_head!r} must be a positive whole number")
        return n_head, "n_head given"
    for name, (layers, heads, width) in MODEL_PRESETS.items():
        if (layers, width) == (n_layer, dim):
            return heads, _preset_label(name)
    stored = str(args.get("gpt_model", "")).removeprefix("GPT-")
    if stored in LLAMAGEN_PRESETS and MODEL_PRESETS[stored][2] == dim:
        return MODEL_PRESETS[stored][1], f"LlamaGen preset {stored}, from the stored args.gpt_model"
    same_width = [name for name, (_, _, width) in MODEL_PRESETS.items() if width == dim]
    if len(same_width) == 1 and same_width[0] in LLAMAGEN_PRESETS:
        name = same_width[0]
        layers, heads, _ = MODEL_PRESETS[name]
        return heads, f"LlamaGen preset {name} by width {dim} alone: the file has {n_layer} of its {layers} layers"
    raise CheckpointError(f"{source}: {n_layer} layers × width {dim} match no LlamaGen preset, and the head count "
                          f"is in no tensor shape: pass n_head= (npp convert --n-head N)")


def _infer_grid(grid: int | None, image_size: int | None, args: Mapping[str, Any],
                source: str) -> tuple[int, str]:
    stored_size, stored_down = args.get("image_size"), args.get("downsample_size")
    if grid is not None:
        if image_size is not None:
            raise CheckpointError(f"{source}: give grid= or image_size=, not both")
        return grid, "grid given"
    if image_size is not None:
        if not (is_int(image_size) and image_size > 0):
            raise CheckpointError(f"{source}: image_size={image_size!r} must be a positive whole number of pixels")
        down = stored_down if is_int(stored_down) and stored_down > 0 else LLAMAGEN_DOWNSAMPLE
        if image_size % down:
            raise CheckpointError(f"{source}: image_size={image_size} is not a multiple of the tokenizer's "
                                  f"downsampling {down}; pass a multiple of {down}, or grid=")
        return image_size // down, f"image_size {image_size} given, VQ-{down}"
    if is_int(stored_size) and is_int(stored_down) and stored_down > 0 and stored_size > 0:
        if stored_size % stored_down:
            raise CheckpointError(f"{source}: its stored args say image_size {stored_size} and downsample_size "
                                  f"{stored_down}, which do not give a whole grid; pass grid=")
        return stored_size // stored_down, f"stored args: image_size {stored_size}, downsample_size {stored_down}"
    stem = os.path.basename(source)
    match = _SIZE_IN_NAME.search(stem) if source != "the given state dict" else None
    if match:
        size = int(match.group(1))
        return size // LLAMAGEN_DOWNSAMPLE, f"file name _{size}, VQ-{LLAMAGEN_DOWNSAMPLE}"
    raise CheckpointError(f"{source} does not say its image size (no stored args.image_size, no _256/_384/_512 in "
                          f"its name): pass grid= or image_size= (npp convert --grid N or --image-size PX)")
