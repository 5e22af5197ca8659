"""Pixels out: decoded samples to uint8 and to PNG grids (used by the quickstart, evaluation and the app)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from npp.files import atomic_path


def image_grid(images_BHW3: torch.Tensor | np.ndarray, nrow: int, pad: int = 2) -> Image.Image:
    """uint8 images (B, H, W, 3) tiled row by row, nrow per row, on a black background."""
    images = np.asarray(images_BHW3)
    B, H, W, C = images.shape
    rows = -(-B // nrow)
    canvas = np.zeros((rows * (H + pad) + pad, nrow * (W + pad) + pad, C), dtype=np.uint8)
    for i, image in enumerate(images):
        r, c = divmod(i, nrow)
        canvas[pad + r * (H + pad): pad + r * (H + pad) + H, pad + c * (W + pad): pad + c * (W + pad) + W] = image
    return Image.fromarray(canvas)


def save_png(image: Image.Image, path: str | os.PathLike) -> Path:
    """Write a PNG atomically (a reader such as the app never sees half a file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")
    return path
