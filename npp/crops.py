"""Crops (docs/method.md §7): ADM's centre crop and LlamaGen's crop variants, configured by `CropConfig`."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

from npp.errors import check, is_int, known_fields
from npp.images import to_rgb8

CROP_MODES = ("ten-crop", "centre-flip", "centre", "none")
_TEN_CROP_POSITIONS = ("top-left", "top-right", "bottom-left", "bottom-right", "centre")
LLAMAGEN_CROP_RANGES = (1.1, 1.05)


@dataclass
class CropConfig:
    """How one image becomes the fixed-size views (crop variants) the tokenizer encodes.

    ten-crop     LlamaGen's ImageNet protocol: per range r, ADM-centre-crop to ⌊size·r⌋, take the four
                 corners and the centre of side `size`, then the same five of the mirrored image
                 (torchvision's TenCrop order): 10 variants per range.
    centre-flip  ADM centre crop to `size` and its mirror image: 2 variants (LlamaGen's other mode).
    centre       ADM centre crop to `size`: 1 variant (e.g. reference images for evaluation).
    none         the image as it is, which must already be size × size: 1 variant (embedded MNIST).
    """

    mode: str = "ten-crop"
    """One of ten-crop, centre-flip, centre, none."""
    size: int = 256
    """Side in pixels of every variant (the tokenizer's input size)."""
    ranges: tuple[float, ...] | None = None
    """ten-crop only: the images are first centre-cropped to ⌊size·r⌋ for each r; None means
    LlamaGen's (1.1, 1.05), i.e. 20 variants. Other modes take no ranges."""

    def __post_init__(self) -> None:
        check(self.mode in CROP_MODES,
               f"CropConfig.mode={self.mode!r}: choose one of {', '.join(CROP_MODES)}")
        check(is_int(self.size) and self.size > 0,
               f"CropConfig.size={self.size!r}: must be a positive integer (pixels)")
        if self.mode != "ten-crop":
            check(not self.ranges,
                   f"CropConfig.ranges={self.ranges}: only mode 'ten-crop' takes crop ranges; "
                   f"drop them or use mode='ten-crop'")
            self.ranges = ()
            return
        self.ranges = tuple(LLAMAGEN_CROP_RANGES if self.ranges is None else self.ranges)
        check(len(self.ranges) > 0,
               "CropConfig.ranges=(): ten-crop needs at least one range, e.g. (1.1, 1.05)")
        check(all(isinstance(r, (int, float)) and math.isfinite(r) and r >= 1.0 for r in self.ranges),
               f"CropConfig.ranges={self.ranges}: every range must be a number ≥ 1 (the image is "
               f"centre-cropped to size·range before the ten crops), e.g. (1.1, 1.05)")
        check(len(set(self.ranges)) == len(self.ranges),
               f"CropConfig.ranges={self.ranges}: repeated ranges give duplicate variants; list each once")
        self.ranges = tuple(float(r) for r in self.ranges)

    @property
    def num_variants(self) -> int:
        return {"ten-crop": 10 * len(self.ranges), "centre-flip": 2}.get(self.mode, 1)

    def range_sides(self) -> list[int]:
        """Side of the ADM centre crop taken before the ten crops, for each range.

        ⌊size·r⌋ as LlamaGen's int(); the epsilon keeps e.g. 100·1.13 = 112.99999999999999 at 113.
        """
        return [math.floor(self.size * r + 1e-9) for r in self.ranges]

    def variant_names(self) -> list[str]:
        """A name for each variant, in storage order (the middle axis of codes.npy)."""
        if self.mode == "ten-crop":
            return [f"{r:g}:{flip}{position}" for r in self.ranges for flip in ("", "flipped-")
                    for position in _TEN_CROP_POSITIONS]
        return {"centre-flip": ["centre", "flipped-centre"], "centre": ["centre"], "none": ["identity"]}[self.mode]

    def to_dict(self) -> dict[str, Any]:
        return {"mode": self.mode, "size": self.size, "ranges": list(self.ranges)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CropConfig:
        data = known_fields(cls, data)
        return cls(**{**data, "ranges": tuple(data.get("ranges") or ()) or None})


def adm_centre_crop(image: Image.Image, size: int) -> Image.Image:
    """ADM's centre crop (guided-diffusion `center_crop_arr`) to a size × size image.

    While the short side is at least twice the target, halve the image with a box filter (bicubic
    alone would alias when shrinking a lot); then resize bicubically so that the short side is
    `size`, and cut the centre (offsets rounded down).
    """
    while min(image.size) >= 2 * size:
        image = image.resize(tuple(side // 2 for side in image.size), resample=Image.Resampling.BOX)
    scale = size / min(image.size)
    image = image.resize(tuple(round(side * scale) for side in image.size), resample=Image.Resampling.BICUBIC)
    left, top = (image.width - size) // 2, (image.height - size) // 2
    return image.crop((left, top, left + size, top + size))


def five_crops(square_HWC: np.ndarray, size: int) -> list[np.ndarray]:
    """Top-left, top-right, bottom-left, bottom-right and centre crops of side `size`.

    The centre offset is round((side − size) / 2) with Python's round-half-to-even, as torchvision's
    center_crop computes it (LlamaGen extracts with torchvision's TenCrop).
    """
    H, W = square_HWC.shape[:2]
    top, left = round((H - size) / 2), round((W - size) / 2)
    corners = [(0, 0), (0, W - size), (H - size, 0), (H - size, W - size), (top, left)]
    return [square_HWC[y:y + size, x:x + size] for y, x in corners]


MAX_ASPECT_RATIO = 20
"""Longer side over shorter side beyond which an image is skipped (and listed): the centre crop scales the
short side to the crop size, so a 200,000×1 strip would need gigabytes on the way to one useless crop."""


def crop_variants(image: Image.Image, crops: CropConfig) -> torch.Tensor:
    """Every crop variant of an image, uint8 (V, 3, size, size) in `crops.variant_names()` order.

    Feed them to a tokenizer through `npp.data.to_unit_range` (floats in [-1, 1]). Raises ValueError for an image
    too elongated to crop (see MAX_ASPECT_RATIO): extraction skips it with that reason.
    """
    if max(image.size) > MAX_ASPECT_RATIO * min(image.size):
        raise ValueError(f"{image.width}×{image.height} is more elongated than {MAX_ASPECT_RATIO}:1")
    image = to_rgb8(image)
    if crops.mode == "none":
        if image.size != (crops.size, crops.size):
            raise ValueError(f"image is {image.width}×{image.height}, crop mode 'none' needs "
                             f"{crops.size}×{crops.size}")
        views = [np.asarray(image)]
    elif crops.mode == "ten-crop":
        views = []
        for side in crops.range_sides():
            square = np.asarray(adm_centre_crop(image, side))
            views += five_crops(square, crops.size) + five_crops(square[:, ::-1], crops.size)
    else:
        centre = np.asarray(adm_centre_crop(image, crops.size))
        views = [centre, centre[:, ::-1]] if crops.mode == "centre-flip" else [centre]
    views_VHWC = np.stack(views)
    return torch.from_numpy(views_VHWC).permute(0, 3, 1, 2).contiguous()
