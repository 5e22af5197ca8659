"""The architecture of a VQ tokenizer (VQConfig) and its named presets.

Kept apart from npp.config, which re-exports both, so that every config is still found there; this module
needs nothing but the validation helpers.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from npp.errors import ConfigError, check, is_int, known_fields


# name -> VQConfig fields. llamagen-vq16 is LlamaGen's VQ-16 (docs/method.md §6); the MNIST ones are
# ours, sized so that `make quickstart` trains them on a laptop CPU in minutes.
VQ_PRESETS: dict[str, dict[str, Any]] = {
    "llamagen-vq16": dict(image_size=256, base_channels=128, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=2,
                          z_channels=256, codebook_size=16384, codebook_dim=8),
    "mnist-8x8": dict(image_size=32, base_channels=32, ch_mult=(1, 1, 2), num_res_blocks=1,
                      z_channels=64, codebook_size=256, codebook_dim=8),
    "mnist-16x16": dict(image_size=32, base_channels=32, ch_mult=(1, 2), num_res_blocks=1,
                        z_channels=64, codebook_size=256, codebook_dim=8),
}


@dataclass
class VQConfig:
    """Architecture of a LlamaGen VQ tokenizer. Defaults are LlamaGen's VQ-16 (ImageNet, 256 px)."""

    image_size: int = 256
    """Side of the (square) images it was trained on; the token grid is image_size // downsample."""
    base_channels: int = 128
    """Channels after conv_in; level l has base_channels · ch_mult[l] (multiples of 32: GroupNorm(32))."""
    ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    """Channel multiplier per resolution level; every level but the last halves the resolution."""
    num_res_blocks: int = 2
    """ResnetBlocks per encoder level; the decoder has one more per level, as in LlamaGen."""
    z_channels: int = 256
    """Channels of the encoder output and decoder input, around the 1×1 quant convolutions."""
    codebook_size: int = 16384
    """Number of codes (the GPT's vocabulary)."""
    codebook_dim: int = 8
    """Dimension of a code; codes and encoder outputs are L2-normalised before matching."""
    in_channels: int = 3
    """Image channels (grey-scale data is replicated to RGB, so every image pipeline is the same)."""
    dropout: float = 0.0
    """Dropout inside ResnetBlocks (LlamaGen: 0)."""
    commit_beta: float = 0.25
    """Weight of the commitment term of the quantizer loss."""

    def __post_init__(self) -> None:
        self.ch_mult = tuple(self.ch_mult)
        for name in ("image_size", "base_channels", "num_res_blocks", "z_channels", "codebook_size",
                     "codebook_dim", "in_channels"):
            value = getattr(self, name)
            check(is_int(value) and value > 0,
                   f"VQConfig.{name}={value!r}: must be a positive integer")
        check(len(self.ch_mult) >= 1 and all(is_int(m) and m > 0 for m in self.ch_mult),
               f"VQConfig.ch_mult={self.ch_mult}: give one positive multiplier per level, e.g. (1, 2, 2)")
        widths = [self.base_channels * m for m in self.ch_mult]
        check(all(w % 32 == 0 for w in [self.base_channels, *widths]),
               f"VQConfig: channel widths {[self.base_channels, *widths]} must be multiples of 32 "
               f"(GroupNorm with 32 groups); change base_channels or ch_mult")
        check(self.image_size % self.downsample == 0,
               f"VQConfig.image_size={self.image_size} is not divisible by the downsampling factor "
               f"{self.downsample}: use a multiple of {self.downsample}")
        check(0.0 <= self.dropout < 1.0, f"VQConfig.dropout={self.dropout}: must lie in [0, 1)")
        check(self.commit_beta >= 0, f"VQConfig.commit_beta={self.commit_beta}: must be ≥ 0")

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> "VQConfig":
        """A named tokenizer architecture (llamagen-vq16, mnist-8x8, mnist-16x16), fields overridable."""
        if name not in VQ_PRESETS:
            raise ConfigError(f"unknown tokenizer preset {name!r}: choose one of {', '.join(VQ_PRESETS)}")
        return cls(**{**VQ_PRESETS[name], **overrides})

    @property
    def downsample(self) -> int:
        """Pixels per token along each side: 2^(levels - 1)."""
        return 2 ** (len(self.ch_mult) - 1)

    @property
    def grid(self) -> int:
        """Side of the token grid for images of image_size."""
        return self.image_size // self.downsample

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["ch_mult"] = list(self.ch_mult)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "VQConfig":
        return cls(**known_fields(cls, data))
