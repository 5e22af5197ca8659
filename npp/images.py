"""Pixels in and out: any image PIL reads to 8-bit RGB (extraction, crops, evaluation references), decoded
samples to uint8 and to PNG grids (used by the quickstart, evaluation and the app)."""

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


# ------------------------------------------------------------------------------------------------
# Pixels in: any image PIL reads, as 8-bit RGB
# ------------------------------------------------------------------------------------------------

BACKGROUND = (255, 255, 255)
"""What transparent pixels are composited on: white, as a browser or an image viewer shows them."""

FLOAT_RANGE = (0.0, 1.0)
"""Float images (mode F) are read as intensities in [0, 1] (torchvision's and scikit-image's convention)."""

_D50_WHITE = np.array([0.96422, 1.0, 0.82521])
_XYZ_D50_TO_LINEAR_SRGB = np.array([[3.1338561, -1.6168667, -0.4906146],  # Bradford-adapted to sRGB's D65
                                    [-0.9787684, 1.9161415, 0.0334540],
                                    [0.0719453, -0.2289914, 1.4052427]])


def to_rgb8(image: Image.Image) -> Image.Image:
    """Any image PIL reads as 8-bit RGB: the one conversion of every image npp takes in.

    Extraction, crops and evaluation reference folders all read pixels through it, so one image gives the
    same pixels everywhere. Raises ValueError for pixels without a defined 8-bit reading (the caller skips
    the image and lists the reason). The rules, mode by mode:

    1, L, P, RGB, RGBX, HSV   PIL's exact conversion (a palette is looked up, grey is replicated).
    LA, PA, RGBA              composited on BACKGROUND (white): round((c·a + 255·(255 − a)) / 255); so is
                              any image with a transparency key (a palette entry, a grey or RGB value).
    La, RGBa                  premultiplied (c·a/255 stored): the same composite, c + 255 − a.
    I;16, I;16B, I;16L, I;16N 16-bit integers: round(v / 257), i.e. 65535 → 255, never clipped.
    I                         integers scaled by the file's bit depth: 16-bit for PNG and PGM/PPM (PIL
                              stretches other PGM maxvals to 65535), the BitsPerSample of a TIFF; refused
                              when negative or when the depth is unknown.
    F                         floats read as [0, 1] (FLOAT_RANGE): round(255·v); refused when any value
                              would not round into 0…255 (or is NaN): rescale such images first.
    CMYK                      round((255 − c)(255 − k) / 255), PIL's naive conversion (no ICC profile).
    YCbCr                     JPEG's full-range (JFIF) formula, rounded and clipped to 0…255.
    LAB                       CIE L*a*b* relative to D50 (the ICC and Adobe convention libtiff assumes for
                              CIELab TIFFs), Bradford-adapted to sRGB; out-of-gamut colours clip. (PIL's own
                              convert is an approximation: sRGB blue came out (27, 7, 253).)

    16-bit colour PNGs are opened by PIL as RGB/RGBA keeping the high byte of each sample: within one level
    of round(v / 257), never clipped.
    """
    mode = image.mode
    if mode in ("L", "RGB", "1", "P", "RGBX", "HSV") and "transparency" not in image.info:
        return image.convert("RGB")
    if mode in ("La", "RGBa"):  # premultiplied alpha (e.g. TIFFs with associated alpha)
        return _composite_premultiplied(np.asarray(image))
    if mode in ("LA", "PA", "RGBA", "L", "RGB", "1", "P"):
        return _composite(np.asarray(image.convert("RGBA")))
    if mode.startswith("I"):
        return _integer_to_rgb8(image)
    if mode == "F":
        return _grey(_float_to_uint8(np.asarray(image, dtype=np.float64)))
    if mode == "CMYK":
        return _cmyk_to_rgb8(np.asarray(image))
    if mode == "YCbCr":
        return _ycbcr_to_rgb8(np.asarray(image))
    if mode == "LAB":
        return _lab_to_rgb8(np.asarray(image))
    raise ValueError(f"image mode {mode} has no defined 8-bit RGB reading; save the image as RGB")


def _grey(grey_HW: np.ndarray) -> Image.Image:
    return Image.fromarray(np.repeat(grey_HW.astype(np.uint8)[..., None], 3, axis=-1), "RGB")


def _composite(rgba_HW4: np.ndarray, background: tuple[int, int, int] = BACKGROUND) -> Image.Image:
    """RGBA on an opaque background, rounded to the nearest level (no ties: 255 is odd)."""
    rgb = rgba_HW4[..., :3].astype(np.int64)
    alpha = rgba_HW4[..., 3:].astype(np.int64)
    out = (rgb * alpha + np.asarray(background, dtype=np.int64) * (255 - alpha) + 127) // 255
    return Image.fromarray(out.astype(np.uint8), "RGB")


def _composite_premultiplied(pixels: np.ndarray, background: tuple[int, int, int] = BACKGROUND) -> Image.Image:
    """Premultiplied colour (c·a/255 stored) on an opaque background: c + round(b·(255 − a) / 255)."""
    colour = pixels[..., :-1].astype(np.int64)
    alpha = pixels[..., -1:].astype(np.int64)
    rgb = np.broadcast_to(colour, (*colour.shape[:-1], 3))
    out = rgb + (np.asarray(background, dtype=np.int64) * (255 - alpha) + 127) // 255
    return Image.fromarray(np.clip(out, 0, 255).astype(np.uint8), "RGB")


def _scaled(values: np.ndarray, full_scale: int) -> np.ndarray:
    """Integers in 0 … full_scale to the nearest of 0 … 255 (full_scale is odd, so there are no ties)."""
    return (values.astype(np.int64) * 255 + full_scale // 2) // full_scale


def _integer_to_rgb8(image: Image.Image) -> Image.Image:
    values = np.asarray(image)
    full_scale = _integer_full_scale(image)
    low, high = (int(values.min()), int(values.max())) if values.size else (0, 0)
    if low < 0 or high > full_scale:
        raise ValueError(f"{image.mode} pixels span {low}…{high}, outside the {full_scale.bit_length()}-bit "
                         f"range 0…{full_scale}; save the image as 8- or 16-bit unsigned")
    grey = _scaled(values, full_scale)
    key = image.info.get("transparency")
    if isinstance(key, int):  # a grey value that marks transparent pixels (PNG tRNS)
        alpha = np.where(values == key, 0, 255)
        return _composite(np.stack([grey, grey, grey, alpha], axis=-1))
    return _grey(grey)


def _integer_full_scale(image: Image.Image) -> int:
    """The largest value of an integer image's bit depth: 65535 for 16-bit, the TIFF's own for mode I."""
    if image.mode.startswith("I;16"):
        return 2**16 - 1
    if image.format in ("PNG", "PPM"):
        return 2**16 - 1  # PNG stores at most 16 bits; PIL stretches any PGM maxval to 65535
    if image.format == "TIFF":
        bits = image.tag_v2.get(258, (32,))
        bits = bits[0] if isinstance(bits, tuple) else bits
        signed = image.tag_v2.get(339, 1) in (2, (2,))
        return 2 ** (int(bits) - signed) - 1
    raise ValueError(f"{image.mode} pixels of a {image.format or 'in-memory'} image have no stated bit depth; "
                     f"save the image as 8- or 16-bit")


def _float_to_uint8(values: np.ndarray) -> np.ndarray:
    """Floats in FLOAT_RANGE to 0 … 255; values that would not round into that range are refused."""
    low, high = FLOAT_RANGE
    scaled = (values - low) / (high - low) * 255
    if values.size and not (np.isfinite(scaled).all() and scaled.min() >= -0.5 and scaled.max() < 255.5):
        raise ValueError(f"float pixels span {np.nanmin(values):g}…{np.nanmax(values):g}"
                         f"{' with NaN/inf' if not np.isfinite(values).all() else ''}; npp reads float images "
                         f"as [{low:g}, {high:g}]: rescale the image to that range")
    return np.clip(np.round(scaled), 0, 255)


def _cmyk_to_rgb8(cmyk_HW4: np.ndarray) -> Image.Image:
    c = cmyk_HW4.astype(np.int64)
    rgb = ((255 - c[..., :3]) * (255 - c[..., 3:]) + 127) // 255
    return Image.fromarray(rgb.astype(np.uint8), "RGB")


def _ycbcr_to_rgb8(ycc_HW3: np.ndarray) -> Image.Image:
    y, cb, cr = (ycc_HW3[..., i].astype(np.float64) for i in range(3))
    cb, cr = cb - 128, cr - 128
    rgb = np.stack([y + 1.402 * cr, y - 0.344136 * cb - 0.714136 * cr, y + 1.772 * cb], axis=-1)
    return Image.fromarray(np.clip(np.round(rgb), 0, 255).astype(np.uint8), "RGB")


def _lab_to_rgb8(lab_HW3: np.ndarray) -> Image.Image:
    """PIL's LAB pixel bytes (L* scaled to 0 … 255, a* and b* signed bytes, as TIFF stores them) via XYZ (D50)
    to sRGB. (PIL's getpixel and Image.new show a* and b* offset by 128; the bytes are signed.)"""
    L = lab_HW3[..., 0].astype(np.float64) * 100 / 255
    a, b = (lab_HW3[..., i].astype(np.int8).astype(np.float64) for i in (1, 2))
    fy = (L + 16) / 116
    f_XYZ = np.stack([fy + a / 500, fy, fy - b / 200], axis=-1)
    xyz = np.where(f_XYZ > 6 / 29, f_XYZ**3, 3 * (6 / 29) ** 2 * (f_XYZ - 4 / 29)) * _D50_WHITE
    linear = np.clip(xyz @ _XYZ_D50_TO_LINEAR_SRGB.T, 0, 1)
    srgb = np.where(linear <= 0.0031308, 12.92 * linear, 1.055 * linear ** (1 / 2.4) - 0.055)
    return Image.fromarray(np.round(srgb * 255).astype(np.uint8), "RGB")
