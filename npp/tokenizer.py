"""The VQ tokenizer: LlamaGen's VQ-GAN architecture with an L2-normalised codebook (docs/method.md §6).

Read top to bottom: the building blocks (ResnetBlock, AttnBlock, resampling), the encoder and the
decoder, the quantizer, and the VQModel with its import and export. Module names follow LlamaGen's
state dicts exactly, so `vq_ds16_c2i.pt` loads strictly.

    vq = VQModel.from_llamagen("vq_ds16_c2i.pt")
    codes_Bhw = vq.encode(images_B3HW)          # images in [-1, 1]
    images_B3HW = vq.decode(codes_Bhw)          # in [-1, 1]; to_uint8() for PNGs
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F

from npp.config import VQConfig
from npp.errors import CheckpointError, check
from npp.files import ASSETS
from npp.weights import Pretrained, check_finite, fingerprint, load_foreign_state_dict, load_strict


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=32, num_channels=channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, dropout: float):
        super().__init__()
        self.norm1 = _norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = _norm(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        # LlamaGen names the 1×1 projection of a widening block "nin_shortcut".
        self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return (x if self.nin_shortcut is None else self.nin_shortcut(x)) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all positions of a feature map (1×1 conv projections)."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = _norm(channels)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x_BChw: torch.Tensor) -> torch.Tensor:
        B, C, h, w = x_BChw.shape
        normed = self.norm(x_BChw)
        # (B, C, h, w) -> (B, 1, hw, C): one head of width C, scaled by C^-1/2 as in LlamaGen.
        q, k, v = (proj(normed).flatten(2).transpose(1, 2).unsqueeze(1) for proj in (self.q, self.k, self.v))
        out_B1LC = F.scaled_dot_product_attention(q, k, v)
        return x_BChw + self.proj_out(out_B1LC.squeeze(1).transpose(1, 2).reshape(B, C, h, w))


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Pad right and bottom only (LlamaGen's asymmetric padding), then a stride-2 3×3 conv.
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Level(nn.Module):
    """One resolution level: ResnetBlocks, attention after each at the lowest resolution, resampling."""

    def __init__(self, in_channels: int, out_channels: int, blocks: int, attention: bool,
                 resample: str | None, dropout: float):
        super().__init__()
        widths = [in_channels] + [out_channels] * blocks
        self.res = nn.ModuleList(ResnetBlock(a, b, dropout) for a, b in zip(widths, widths[1:]))
        self.attn = nn.ModuleList(AttnBlock(out_channels) for _ in range(blocks if attention else 0))
        # The resampler's attribute name ("downsample" or "upsample") is part of LlamaGen's key names.
        self.resample = resample
        if resample is not None:
            self.add_module(resample, {"downsample": Downsample, "upsample": Upsample}[resample](out_channels))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        for i, block in enumerate(self.res):
            h = block(h)
            if len(self.attn):
                h = self.attn[i](h)
        return h if self.resample is None else getattr(self, self.resample)(h)


def _middle(channels: int, dropout: float) -> nn.ModuleList:
    return nn.ModuleList([ResnetBlock(channels, channels, dropout), AttnBlock(channels),
                          ResnetBlock(channels, channels, dropout)])


class Encoder(nn.Module):
    def __init__(self, c: VQConfig):
        super().__init__()
        widths = [c.base_channels * m for m in c.ch_mult]
        last = len(widths) - 1
        self.conv_in = nn.Conv2d(c.in_channels, c.base_channels, 3, padding=1)
        self.conv_blocks = nn.ModuleList(
            Level(c.base_channels if l == 0 else widths[l - 1], widths[l], c.num_res_blocks,
                  attention=l == last, resample=None if l == last else "downsample", dropout=c.dropout)
            for l in range(len(widths)))
        self.mid = _middle(widths[-1], c.dropout)
        self.norm_out = _norm(widths[-1])
        self.conv_out = nn.Conv2d(widths[-1], c.z_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for module in [*self.conv_blocks, *self.mid]:
            h = module(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """The encoder's mirror: levels from the lowest resolution up, one more ResnetBlock per level."""

    def __init__(self, c: VQConfig):
        super().__init__()
        widths = [c.base_channels * m for m in reversed(c.ch_mult)]
        last = len(widths) - 1
        self.conv_in = nn.Conv2d(c.z_channels, widths[0], 3, padding=1)
        self.mid = _middle(widths[0], c.dropout)
        self.conv_blocks = nn.ModuleList(
            Level(widths[max(l - 1, 0)], widths[l], c.num_res_blocks + 1, attention=l == 0,
                  resample=None if l == last else "upsample", dropout=c.dropout)
            for l in range(len(widths)))
        self.norm_out = _norm(widths[-1])
        self.conv_out = nn.Conv2d(widths[-1], c.in_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(z)
        for module in [*self.mid, *self.conv_blocks]:
            h = module(h)
        return self.conv_out(F.silu(self.norm_out(h)))


# --------------------------------------------------------------------------------------------
# Quantizer
# --------------------------------------------------------------------------------------------

@dataclass
class Quantized:
    """What the quantizer returns in training: straight-through latents, losses and the codes."""

    z_q_BChw: torch.Tensor
    """Chosen (normalised) codes with the encoder's gradient passed straight through."""
    codebook_loss: torch.Tensor
    """mean ||sg(z) − e||²: pulls the chosen codes towards the encoder outputs."""
    commit_loss: torch.Tensor
    """commit_beta · mean ||z − sg(e)||²: keeps the encoder close to its codes."""
    codes_Bhw: torch.Tensor
    z_BhwC: torch.Tensor
    """The normalised encoder outputs (detached), which dead-code re-seeding draws from."""


class VectorQuantizer(nn.Module):
    """Nearest-neighbour lookup on the unit sphere: codes and encoder outputs are L2-normalised."""

    def __init__(self, c: VQConfig):
        super().__init__()
        self.commit_beta = c.commit_beta
        self.embedding = nn.Embedding(c.codebook_size, c.codebook_dim)
        nn.init.uniform_(self.embedding.weight, -1.0 / c.codebook_size, 1.0 / c.codebook_size)

    def codebook(self) -> torch.Tensor:
        """The normalised codebook (V, codebook_dim), in fp32."""
        return F.normalize(self.embedding.weight.float(), dim=-1)

    def nearest(self, z_NC: torch.Tensor) -> torch.Tensor:
        """Index of the nearest normalised code for each row (normalised here, in fp32)."""
        # On the unit sphere the smallest distance is the largest dot product.
        return (F.normalize(z_NC.float(), dim=-1) @ self.codebook().T).argmax(dim=-1)

    def lookup(self, codes: torch.Tensor) -> torch.Tensor:
        """Normalised code vectors, channels last: (*codes.shape, codebook_dim)."""
        return self.codebook()[codes]

    def forward(self, z_BChw: torch.Tensor) -> Quantized:
        z_BhwC = F.normalize(z_BChw.float().permute(0, 2, 3, 1), dim=-1)
        codes_Bhw = self.nearest(z_BhwC)
        e_BhwC = self.lookup(codes_Bhw)
        codebook_loss = (e_BhwC - z_BhwC.detach()).pow(2).mean()
        commit_loss = self.commit_beta * (z_BhwC - e_BhwC.detach()).pow(2).mean()
        z_q_BhwC = z_BhwC + (e_BhwC - z_BhwC).detach()
        return Quantized(z_q_BhwC.permute(0, 3, 1, 2).type_as(z_BChw), codebook_loss, commit_loss,
                         codes_Bhw, z_BhwC.detach())


# --------------------------------------------------------------------------------------------
# The tokenizer
# --------------------------------------------------------------------------------------------

# Training statistics that LlamaGen's quantizer keeps as a buffer: not part of the architecture.
_LLAMAGEN_EXTRA_KEYS = ("quantize.codebook_used",)


class VQModel(Pretrained, nn.Module):
    """Images in [-1, 1] to a grid of codes and back."""

    config_class = VQConfig

    def __init__(self, config: VQConfig):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self.quantize = VectorQuantizer(config)
        self.quant_conv = nn.Conv2d(config.z_channels, config.codebook_dim, 1)
        self.post_quant_conv = nn.Conv2d(config.codebook_dim, config.z_channels, 1)

    @property
    def dtype(self) -> torch.dtype:
        return self.quant_conv.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.quant_conv.weight.device

    def latents(self, images_B3HW: torch.Tensor) -> torch.Tensor:
        """Encoder output projected to the codebook dimension, before quantization."""
        self._check_images(images_B3HW)
        return self.quant_conv(self.encoder(images_B3HW.to(self.device, self.dtype)))

    def forward(self, images_B3HW: torch.Tensor) -> tuple[torch.Tensor, Quantized]:
        """Training pass: reconstruction and the quantizer's losses and codes."""
        quantized = self.quantize(self.latents(images_B3HW))
        return self.decode_latents(quantized.z_q_BChw), quantized

    @torch.no_grad()
    def encode(self, images_B3HW: torch.Tensor) -> torch.Tensor:
        """Codes (int64, B × h × w) of images in [-1, 1] (B × 3 × H × W), h = H / downsample."""
        z_BChw = self.latents(images_B3HW)
        return self.quantize.nearest(z_BChw.permute(0, 2, 3, 1))

    def decode_latents(self, z_BChw: torch.Tensor) -> torch.Tensor:
        """Images from latent vectors (normalised codes, or any mix of them, e.g. patch averages)."""
        return self.decoder(self.post_quant_conv(z_BChw.to(self.dtype)))

    @torch.no_grad()
    def decode(self, codes_Bhw: torch.Tensor) -> torch.Tensor:
        """Images in about [-1, 1] (B × 3 × H × W, fp32) from codes (B × h × w)."""
        if codes_Bhw.dim() != 3:
            raise ValueError(f"codes must be B × h × w, got shape {tuple(codes_Bhw.shape)}; "
                             f"reshape flat sequences with .view(B, grid, grid)")
        if codes_Bhw.numel() and (codes_Bhw.min() < 0 or codes_Bhw.max() >= self.config.codebook_size):
            raise ValueError(f"codes must lie in [0, {self.config.codebook_size}), got "
                             f"[{codes_Bhw.min().item()}, {codes_Bhw.max().item()}]")
        z_BChw = self.quantize.lookup(codes_Bhw.to(self.device).long()).permute(0, 3, 1, 2)
        return self.decode_latents(z_BChw).float()

    def _check_images(self, images: torch.Tensor) -> None:
        c = self.config
        if images.dim() != 4 or images.shape[1] != c.in_channels:
            raise ValueError(f"images must be B × {c.in_channels} × H × W, got shape {tuple(images.shape)}")
        if images.shape[2] % c.downsample or images.shape[3] % c.downsample:
            raise ValueError(f"image size {tuple(images.shape[2:])} is not a multiple of the tokenizer's "
                             f"downsampling factor {c.downsample}: resize or crop first")

    def fingerprint(self) -> str:
        """sha256 of the weights: names a tokenizer in manifests, the same for a .pt and its export."""
        return fingerprint(self)

    # ---- LlamaGen checkpoints --------------------------------------------------------------

    @classmethod
    def from_llamagen(cls, path_or_state_dict: str | os.PathLike | Mapping[str, torch.Tensor], *,
                      base_channels: int = 128, ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4),
                      z_channels: int = 256, codebook_size: int = 16384, codebook_dim: int = 8,
                      num_res_blocks: int = 2, image_size: int = 256, **overrides: Any) -> "VQModel":
        """Load a LlamaGen VQ checkpoint (e.g. vq_ds16_c2i.pt) strictly; defaults are VQ-16's."""
        state, source = load_foreign_state_dict(path_or_state_dict)
        if not any(k.startswith("encoder.") for k in state):
            hint = ("it looks like a GPT: use npp.GPT.from_llamagen" if "tok_embeddings.weight" in state
                    else "expected a LlamaGen VQ tokenizer")
            raise CheckpointError(f"{source} has no encoder.* weights; {hint}")
        state = {k: v for k, v in state.items() if k not in _LLAMAGEN_EXTRA_KEYS}
        config = VQConfig(image_size=image_size, base_channels=base_channels, ch_mult=tuple(ch_mult),
                          num_res_blocks=num_res_blocks, z_channels=z_channels,
                          codebook_size=codebook_size, codebook_dim=codebook_dim, **overrides)
        with torch.device("meta"):
            model = cls(config)
        check_finite(state, source)
        return load_strict(model, state, source).eval()


def to_uint8(images_B3HW: torch.Tensor) -> torch.Tensor:
    """[-1, 1] floats to uint8 pixels, B × H × W × 3, as LlamaGen saves samples: clamp(127.5·x + 128)."""
    return (images_B3HW.float() * 127.5 + 128).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu()


# --------------------------------------------------------------------------------------------
# Finding a tokenizer: the shipped ones by name, a save_pretrained folder, or a LlamaGen .pt
# --------------------------------------------------------------------------------------------

EMBEDDED_TOKENIZERS = ("mnist-8x8", "mnist-16x16")
"""The shipped MNIST tokenizers (npp/assets/<name>), one per embedded data set of the same name."""


def load_embedded_tokenizer(name: str = "mnist-8x8", device: str | torch.device = "cpu") -> VQModel:
    """A shipped MNIST tokenizer, in eval mode; its metrics.json says how it was made."""
    check(name in EMBEDDED_TOKENIZERS, f"no embedded tokenizer {name!r}: choose one of {', '.join(EMBEDDED_TOKENIZERS)}")
    return VQModel.from_pretrained(ASSETS / name, device=device)


def tokenizer_location(spec: str | os.PathLike) -> Path:
    """Where a tokenizer spec points: a shipped name (mnist-8x8, …) that is not a path here means its folder
    in npp/assets; anything else is a path, as given."""
    if os.fspath(spec) in EMBEDDED_TOKENIZERS and not os.path.exists(spec):
        return ASSETS / os.fspath(spec)
    return Path(spec)


def load_tokenizer(path: str | os.PathLike, *, preset: str | None = None, **overrides: Any) -> VQModel:
    """A shipped tokenizer by name (EMBEDDED_TOKENIZERS), a tokenizer folder written by
    VQModel.save_pretrained, or a LlamaGen VQ .pt checkpoint.

    `preset` (default llamagen-vq16) and `overrides` (VQConfig fields) describe a .pt's architecture;
    a folder carries its own config, so giving them with one is an error rather than ignored.
    """
    path = tokenizer_location(path)
    if path.is_dir():
        given = ([] if preset is None else ["preset"]) + sorted(overrides)
        check(not given, f"{path} is a save_pretrained folder with its own config.json: drop the "
                         f"architecture flags ({', '.join(given)}), they are for .pt files")
        return VQModel.from_pretrained(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file or folder; give a shipped tokenizer "
                              f"({', '.join(EMBEDDED_TOKENIZERS)}), a folder written by "
                              f"VQModel.save_pretrained or a LlamaGen VQ .pt checkpoint")
    return VQModel.from_llamagen(path, **VQConfig.preset(preset or "llamagen-vq16", **overrides).to_dict())
