"""Image inputs: the embedded MNIST, ImageFolder listing, crop settings and crop geometry."""

import numpy as np
import pytest
import torch
from PIL import Image

from npp.config import ConfigError
from npp.crops import CropConfig, adm_centre_crop, crop_variants, five_crops
from npp.data import (MNIST_SIZE, DataError, ImageFolderSource, MnistSource, list_image_folder, load_mnist, mnist_images,
                      to_unit_range)

# Digits per class in LeCun's MNIST, 0 to 9.
MNIST_TRAIN_HISTOGRAM = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
MNIST_TEST_HISTOGRAM = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


# ---- the embedded MNIST ---------------------------------------------------------------------------

@pytest.mark.parametrize("split, histogram", [("train", MNIST_TRAIN_HISTOGRAM), ("test", MNIST_TEST_HISTOGRAM)])
def test_mnist_counts_and_label_histogram(split, histogram):
    digits, labels = load_mnist(split)
    assert digits.shape == (sum(histogram), 28, 28) and digits.dtype == torch.uint8
    assert labels.dtype == torch.int64
    assert torch.bincount(labels, minlength=10).tolist() == histogram


def test_mnist_images_are_padded_to_32_with_black_and_replicated_to_rgb():
    digits, _ = load_mnist("test")
    images, labels = mnist_images("test")
    assert images.shape == (10_000, 3, MNIST_SIZE, MNIST_SIZE) and images.dtype == torch.uint8
    border = torch.ones(MNIST_SIZE, MNIST_SIZE, dtype=torch.bool)
    border[2:-2, 2:-2] = False
    assert images[:, :, border].max() == 0
    assert torch.equal(images[:, 1], images[:, 0]) and torch.equal(images[:, 2], images[:, 0])
    assert torch.equal(images[:, 0, 2:-2, 2:-2], digits)


def test_unit_range_maps_0_and_255_to_the_ends():
    assert to_unit_range(torch.tensor([0, 255], dtype=torch.uint8)).tolist() == [-1.0, 1.0]


def test_mnist_source_serves_the_padded_digits_as_rgb():
    source = MnistSource("test", limit=5)
    images, labels = mnist_images("test")
    assert len(source) == 5 and source.labels.tolist() == labels[:5].tolist()
    image = source.open(3)
    assert image.mode == "RGB" and image.size == (32, 32)
    assert np.array_equal(np.asarray(image), images[3].permute(1, 2, 0).numpy())
    with pytest.raises(ConfigError, match="limit"):
        MnistSource("test", limit=0)


# ---- ImageFolder listing ----------------------------------------------------------------------------

def _touch_image(path):
    """A small image in the format its extension names."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (4, 4)).save(path)


def test_image_folder_order_labels_and_ignored_files(tmp_path):
    for relative in ["zebra/b.png", "zebra/a.JPG", "ant/z.png", "ant/sub/a.png", "ant/a.png", "mole/x.webp"]:
        _touch_image(tmp_path / relative)
    (tmp_path / "ant" / "notes.txt").write_text("not an image")
    _touch_image(tmp_path / ".ipynb_checkpoints" / "a.png")  # hidden: not a class
    _touch_image(tmp_path / "loose.png")                     # beside the classes: not an item

    classes, files, labels = list_image_folder(tmp_path)
    assert classes == ["ant", "mole", "zebra"]
    assert files == ["ant/a.png", "ant/z.png", "ant/sub/a.png", "mole/x.webp", "zebra/a.JPG", "zebra/b.png"]
    assert labels == [0, 0, 0, 1, 2, 2]
    source = ImageFolderSource(tmp_path)
    assert source.labels.dtype == np.int64 and source.name(3) == "mole/x.webp"
    assert source.open(4).mode == "RGB"
    assert source.identity()["count"] == 6 and source.describe()["root"] == str(tmp_path.resolve())


def _listing_error(root) -> str:
    with pytest.raises(DataError) as info:
        list_image_folder(root)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_bad_image_folders_name_the_problem_and_the_fix(tmp_path):
    assert "no such folder" in _listing_error(tmp_path / "missing")
    (tmp_path / "file.png").write_bytes(b"")
    assert "is a file, not a folder" in _listing_error(tmp_path / "file.png")
    (tmp_path / "empty").mkdir()
    assert "has no class sub-folders: put the images of each class" in _listing_error(tmp_path / "empty")
    _touch_image(tmp_path / "flat" / "a.png")
    assert "holds images but no class sub-folders" in _listing_error(tmp_path / "flat")
    _touch_image(tmp_path / "hollow" / "cat" / "a.png")
    (tmp_path / "hollow" / "dog").mkdir()
    message = _listing_error(tmp_path / "hollow")
    assert message.startswith(f"class folder {tmp_path / 'hollow' / 'dog'} holds no images")
    assert "add its images or remove the folder" in message


# ---- crop settings ----------------------------------------------------------------------------------

def test_crop_config_defaults_and_variant_counts():
    assert CropConfig().ranges == (1.1, 1.05) and CropConfig().num_variants == 20
    assert CropConfig(size=256).range_sides() == [281, 268]        # LlamaGen's int(256 · r)
    assert CropConfig(size=100, ranges=(1.13,)).range_sides() == [113]  # not 112.99999999999999
    assert CropConfig("centre-flip", size=16).num_variants == 2
    assert CropConfig("centre", size=16).ranges == () and CropConfig("none", size=32).num_variants == 1
    names = CropConfig(size=16).variant_names()
    assert len(names) == 20 and names[0] == "1.1:top-left" and names[9] == "1.1:flipped-centre"
    assert names[10] == "1.05:top-left"
    for crops in (CropConfig(size=16, ranges=(1.25,)), CropConfig("centre-flip", size=8)):
        assert CropConfig.from_dict(crops.to_dict()) == crops


@pytest.mark.parametrize("kwargs, fragment", [
    (dict(mode="five-crop"), "CropConfig.mode='five-crop': choose one of ten-crop, centre-flip"),
    (dict(size=0), "CropConfig.size=0: must be a positive integer"),
    (dict(ranges=(0.9, 1.1)), "every range must be a number ≥ 1"),
    (dict(ranges=()), "ten-crop needs at least one range"),
    (dict(ranges=(1.1, 1.1)), "repeated ranges"),
    (dict(mode="centre-flip", ranges=(1.1,)), "only mode 'ten-crop' takes crop ranges; drop them"),
])
def test_bad_crop_settings_name_the_field_and_the_fix(kwargs, fragment):
    with pytest.raises(ConfigError) as info:
        CropConfig(**kwargs)
    assert fragment in str(info.value) and "\n" not in str(info.value)


# ---- crop geometry ----------------------------------------------------------------------------------

def coordinate_image(height: int, width: int) -> Image.Image:
    """Red = row, green = column: every pixel says where it came from."""
    rows, cols = np.mgrid[0:height, 0:width]
    return Image.fromarray(np.stack([rows, cols, np.zeros_like(rows)], -1).astype(np.uint8))


def rows_cols(view_3HW: torch.Tensor) -> tuple[list[int], list[int]]:
    """The source row of each output row and the source column of each output column."""
    return view_3HW[0, :, 0].tolist(), view_3HW[1, 0, :].tolist()


def test_adm_centre_crop_without_resizing_cuts_the_middle():
    # 40 wide, 16 high, target 16: no halving (16 < 32), scale 1, left = (40 - 16) // 2 = 12.
    crop = np.asarray(adm_centre_crop(coordinate_image(16, 40), 16))
    assert crop.shape == (16, 16, 3)
    assert crop[:, 0, 0].tolist() == list(range(16)) and crop[0, :, 1].tolist() == list(range(12, 28))


def test_adm_centre_crop_halves_with_a_box_filter_first():
    # A 32×16 coordinate image blown up 4× to 128×64: two box halvings (64 ≥ 32, then 32 ≥ 32) give
    # it back exactly (each 2×2 box holds equal pixels); then top = (32 - 16) // 2 = 8.
    small = np.asarray(coordinate_image(32, 16))
    big = Image.fromarray(small.repeat(4, axis=0).repeat(4, axis=1))
    assert np.array_equal(np.asarray(adm_centre_crop(big, 16)), small[8:24])


def test_adm_centre_crop_resizes_the_short_side_bicubically():
    # 50×30 to 16: no halving (30 < 32); scale 16/30 gives 27×16 (round(26.67)); left = (27-16)//2 = 5.
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (30, 50, 3), dtype=np.uint8))
    expected = np.asarray(image.resize((27, 16), Image.Resampling.BICUBIC))[:, 5:21]
    assert np.array_equal(np.asarray(adm_centre_crop(image, 16)), expected)


def test_ten_crop_corners_centre_and_flips():
    # size 16, range 1.25: the 20×20 image is already the ADM crop (⌊16·1.25⌋ = 20), corners are
    # offset by 4, the centre by 2; the last five are the same crops of the mirrored image.
    views = crop_variants(coordinate_image(20, 20), CropConfig("ten-crop", size=16, ranges=(1.25,)))
    assert views.shape == (10, 3, 16, 16) and views.dtype == torch.uint8
    top, bottom, middle = list(range(0, 16)), list(range(4, 20)), list(range(2, 18))
    expected = [(top, top), (top, bottom), (bottom, top), (bottom, bottom), (middle, middle)]
    expected += [(r, [19 - c for c in cols]) for r, cols in expected]  # column c of the mirror is 19 - c
    assert [rows_cols(v) for v in views] == expected


def test_five_crop_centre_rounds_half_to_even_like_torchvision():
    assert five_crops(np.zeros((17, 17, 3)), 16)[4].shape == (16, 16, 3)
    square = np.asarray(coordinate_image(19, 17))
    # (17 - 16) / 2 = 0.5 rounds to 0; (19 - 16) / 2 = 1.5 rounds to 2.
    centre = five_crops(square, 16)[4]
    assert centre[0, 0, :2].tolist() == [2, 0]


def test_two_ranges_give_twenty_variants_in_order():
    image = Image.fromarray(np.random.default_rng(1).integers(0, 256, (40, 30, 3), dtype=np.uint8))
    crops = CropConfig("ten-crop", size=16, ranges=(1.1, 1.05))
    views = crop_variants(image, crops)
    assert views.shape == (20, 3, 16, 16)
    for k, side in enumerate(crops.range_sides()):          # 17 and 16
        square = np.asarray(adm_centre_crop(image, side))
        assert np.array_equal(views[10 * k].permute(1, 2, 0).numpy(), square[:16, :16])
        assert np.array_equal(views[10 * k + 5].permute(1, 2, 0).numpy(), square[:16, ::-1][:, :16])


def test_centre_flip_and_none():
    image = Image.fromarray(np.random.default_rng(2).integers(0, 256, (24, 40, 3), dtype=np.uint8))
    views = crop_variants(image, CropConfig("centre-flip", size=16))
    centre = torch.from_numpy(np.array(adm_centre_crop(image, 16))).permute(2, 0, 1)
    assert torch.equal(views[0], centre) and torch.equal(views[1], centre.flip(-1))
    square = image.crop((0, 0, 24, 24))
    assert torch.equal(crop_variants(square, CropConfig("none", size=24))[0],
                       torch.from_numpy(np.array(square)).permute(2, 0, 1))
    with pytest.raises(ValueError, match="crop mode 'none' needs 16×16"):
        crop_variants(image, CropConfig("none", size=16))
