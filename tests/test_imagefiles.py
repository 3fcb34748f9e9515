"""imagefiles.py: reading one image, mask or label file in its own type, and the problems that name the file."""

import cv2
import numpy as np
import pytest

import imagefiles
import train
from conftest import write_tiff
from dataerror import DataError, worded
from imagefiles import binarize_mask, read_image, read_mask
from utils import UserError


@pytest.mark.parametrize("name, array, kw, expected_shape", [
    ("gray16.tif", np.arange(1000, 1000 + 6 * 7, dtype=np.uint16).reshape(6, 7), {}, (6, 7, 1)),
    ("float.tiff", np.linspace(-3, 5000, 42, dtype=np.float32).reshape(6, 7), {}, (6, 7, 1)),
    ("rgb16.TIF", np.arange(6 * 7 * 3, dtype=np.uint16).reshape(6, 7, 3) * 300, {}, (6, 7, 3)),
    ("two.tif", np.arange(2 * 6 * 7, dtype=np.uint16).reshape(2, 6, 7), {"imagej": True, "metadata": {"axes": "CYX"}}, (6, 7, 2)),
    ("ome4.tif", np.arange(4 * 6 * 7, dtype=np.uint16).reshape(4, 6, 7), {"ome": True, "metadata": {"axes": "CYX"}}, (6, 7, 4)),
    ("planar.tif", np.arange(3 * 6 * 7, dtype=np.uint8).reshape(3, 6, 7), {"photometric": "rgb"}, (6, 7, 3)),
    ("single.tif", np.arange(6 * 7, dtype=np.uint16).reshape(1, 1, 6, 7), {"imagej": True, "metadata": {"axes": "ZCYX"}}, (6, 7, 1)),
])
def test_tiff_images_are_read_exactly_in_their_own_type(tmp_path, name, array, kw, expected_shape):
    path = write_tiff(str(tmp_path / name), array, **kw)
    img = read_image(path, expected_shape[2])
    assert img.shape == expected_shape and img.dtype == array.dtype        # nothing rounded to 8 bits
    channels_last = array.reshape(expected_shape[:2] + (-1,)) if array.ndim == 2 or array.shape[-1] == 3 and "planar" not in name \
        else np.moveaxis(array.reshape((-1,) + expected_shape[:2]), 0, -1)
    assert np.array_equal(img, channels_last)


def test_16_bit_png_keeps_every_grey_level(tmp_path):
    array = (np.arange(64, dtype=np.uint16).reshape(8, 8) + 1000)          # 64 levels that 8 bits would merge
    cv2.imwrite(str(tmp_path / "a.PNG"), array)
    img = read_image(str(tmp_path / "a.PNG"), 1)
    assert img.dtype == np.uint16 and len(np.unique(img)) == 64


@pytest.mark.parametrize("array, kw, pattern", [
    (np.zeros((5, 8, 9), np.uint16), {"imagej": True, "metadata": {"axes": "ZYX"}}, r"shape is \(5, 8, 9\) with axes ZYX \(Z 5: depth"),
    (np.zeros((3, 2, 8, 9), np.uint16), {"imagej": True, "metadata": {"axes": "TCYX"}}, r"shape is .* with axes TCYX \(T 3: time .*C 2"),
    (np.zeros((2, 8, 9), np.uint16), {}, r"shape is .* with axes QYX \(Q 2: an axis the file does not name\).*metadata=\{'axes': 'CYX'\}"),
])
def test_stacks_and_unnamed_axes_are_refused_with_shape_and_axes(tmp_path, array, kw, pattern):
    path = write_tiff(str(tmp_path / "stack.tif"), array, **kw)
    with pytest.raises(UserError, match=r"stack.tif is not a 2D image: its " + pattern):
        read_image(path, 1)


@pytest.mark.parametrize("content", [b"II*\x00garbage", b"not a tiff at all", b"MM\x00*\x00\x00\x00\x08\xff\xff"])
def test_unreadable_tiff_names_the_file(tmp_path, content):
    (tmp_path / "bad.tif").write_bytes(content)
    with pytest.raises(UserError, match="cannot read image file .*bad.tif"):
        read_image(str(tmp_path / "bad.tif"), 1)


def test_a_tiff_declaring_gigabytes_is_refused_before_decoding(tmp_path, monkeypatch):
    path = write_tiff(str(tmp_path / "big.tif"), np.zeros((64, 64), np.uint16))
    monkeypatch.setattr(imagefiles, "MAX_IMAGE_BYTES", 1000)
    with pytest.raises(UserError, match=r"big.tif declares \(64, 64\) pixels"):
        read_image(path, 1)


def test_channel_count_must_match_with_the_flag_to_pass(tmp_path):
    path = write_tiff(str(tmp_path / "two.tif"), np.zeros((2, 8, 9), np.uint16), imagej=True, metadata={"axes": "CYX"})
    with pytest.raises(UserError, match="two.tif has 2 channel.* input_channels is 3: pass --input_channels 2"), \
            worded(train.data_fix):
        read_image(path, 3)
    with pytest.raises(DataError) as raised:                 # the facts, for any script to word
        read_image(path, 3)
    e = raised.value
    assert (e.setting, e.path, e.found) == ("input_channels", path, 2)
    assert e.fact == f"image {path} has 2 channel(s) but input_channels is 3"


def test_nan_in_a_float_image_is_refused(tmp_path):
    path = write_tiff(str(tmp_path / "nan.tif"), np.array([[0, np.nan]], np.float32))
    with pytest.raises(UserError, match="nan.tif holds NaN"):
        read_image(path, 1)


def test_16_bit_masks_are_binarised_at_half_their_range(tmp_path):
    cv2.imwrite(str(tmp_path / "m.png"), np.array([[0, 32767], [32768, 65535]], np.uint16))
    assert binarize_mask(read_mask(str(tmp_path / "m.png")), "m.png")[0].tolist() == [[0, 0], [1, 1]]
    cv2.imwrite(str(tmp_path / "m.png"), np.array([[0, 255]], np.uint16))       # 0/255 stored in 16 bits
    assert binarize_mask(read_mask(str(tmp_path / "m.png")), "m.png")[0].tolist() == [[0, 1]]


def test_a_jpeg_is_turned_as_its_exif_orientation_says(tmp_path):
    from PIL import Image
    pixels = np.zeros((10, 20, 3), np.uint8)
    pixels[:, :5] = 255                                  # a white band on the left
    image = Image.fromarray(pixels)
    exif = image.getexif()
    exif[0x0112] = 6                                     # "rotate 90 degrees clockwise to display"
    image.save(tmp_path / "photo.jpg", exif=exif.tobytes())
    img = read_image(str(tmp_path / "photo.jpg"), 3)
    assert img.shape == (20, 10, 3) and img[:5].mean() > 200 and img[-5:].mean() < 50   # the band is now on top
