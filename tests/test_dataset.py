"""dataset.py: the data set object: every image and its target decoded once, checked and cached (SegmentationData),
and what an image's target is (Targets)."""
import os

import cv2
import numpy as np
import pytest

import config
import train
from conftest import make_data, write_tiff
from dataerror import worded
from dataset import SegmentationData
from utils import UserError


def load(root, num_classes=1, input_channels=3, img_ext=".png"):
    """The data set as train.py reads it: a problem's fix in train.py's words."""
    with worded(train.data_fix):
        return SegmentationData.from_folder(str(root), img_ext, ".png", num_classes, input_channels)


def test_loads_generated_set(tiny):
    d = load(tiny)
    assert d.ids == sorted(d.ids) and len(d.ids) == 10
    assert d.images[0].shape == (32, 32, 3) and d.images[0].dtype == np.uint8
    assert d.masks[0].shape == (32, 32, 1) and set(np.unique(d.masks[0])) <= {0, 1}


def test_masks_binarised_at_127(tiny):
    mask = np.zeros((32, 32), np.uint8)
    mask[:, :10], mask[:, 10:20] = 100, 200      # bilinear in-between values
    cv2.imwrite(os.path.join(tiny, "masks", "0", "img0000.png"), mask)
    m = load(tiny).masks[0][:, :, 0]
    assert m[:, :10].max() == 0 and m[:, 10:20].min() == 1 and m[:, 20:].max() == 0


def test_zero_one_masks_accepted_with_warning(tiny):
    for f in os.listdir(os.path.join(tiny, "masks", "0")):
        p = os.path.join(tiny, "masks", "0", f)
        cv2.imwrite(p, (cv2.imread(p, 0) > 127).astype(np.uint8))
    with pytest.warns(UserWarning, match="only the values 0 and 1"):
        d = load(tiny)
    assert sum(m.sum() for m in d.masks) > 0


def test_grayscale_rgba_and_channel_conversion(tmp_path):
    gray = make_data(tmp_path, "gray", channels=1)
    assert load(gray, input_channels=1).images[0].shape == (32, 32, 1)
    rgb_from_gray = load(gray, input_channels=3).images[0]
    assert rgb_from_gray.shape == (32, 32, 3) and (rgb_from_gray[..., 0] == rgb_from_gray[..., 2]).all()
    rgba = make_data(tmp_path, "rgba")
    p = os.path.join(rgba, "images", "img0000.png")
    img = cv2.imread(p)
    cv2.imwrite(p, np.concatenate([img, np.full(img.shape[:2] + (1,), 255, np.uint8)], 2))
    assert cv2.imread(p, cv2.IMREAD_UNCHANGED).shape[2] == 4
    assert load(rgba).images[0].shape == (32, 32, 3)
    with pytest.raises(UserError, match="colour but input_channels is 1: pass --input_channels 3 .or convert the images to grayscale first."):
        load(rgba, input_channels=1)


def test_multiclass_masks_stacked(tmp_path):
    d = load(make_data(tmp_path, "three", num_classes=3), num_classes=3)
    assert d.masks[0].shape == (32, 32, 3)


def corrupt(path, how):
    if how == "zero-byte":
        open(path, "wb").close()
    else:
        data = open(path, "rb").read()
        open(path, "wb").write(data[: len(data) // 2])


@pytest.mark.parametrize("setup, pattern", [
    (lambda d: os.rename(d, d + "_gone"), "does not exist"),
    (lambda d: [os.remove(os.path.join(d, "images", f)) for f in os.listdir(os.path.join(d, "images"))], "No input file found"),
    (lambda d: os.remove(os.path.join(d, "masks", "0", "img0003.png")), "have no mask.*img0003"),
    (lambda d: os.remove(os.path.join(d, "images", "img0004.png")), "have no image.*img0004"),
    (lambda d: corrupt(os.path.join(d, "images", "img0002.png"), "zero-byte"), "cannot read image file .*img0002"),
    (lambda d: corrupt(os.path.join(d, "images", "img0002.png"), "truncated"), "cannot read image file .*img0002"),
    (lambda d: cv2.imwrite(os.path.join(d, "masks", "0", "img0001.png"), np.zeros((16, 32), np.uint8)), "img0001.png is 32x16 but its image"),
    (lambda d: cv2.imwrite(os.path.join(d, "masks", "0", "img0001.png"), np.zeros((32, 32, 3), np.uint8)), "img0001.png has 3 channels"),
    (lambda d: cv2.imwrite(os.path.join(d, "masks", "0", "img0001.png"), np.arange(32 * 32, dtype=np.uint16).reshape(32, 32) % 4), "img0001.png has no value above 127.*labels/"),
    (lambda d: os.makedirs(os.path.join(d, "masks", "1")), r"class folders \[0, 1\] but num_classes 1 .*; pass --num_classes 2"),
], ids=["missing", "empty", "no-mask", "no-image", "zero-byte", "truncated", "size", "rgb-mask", "16bit-mask", "classes"])
def test_validation_errors_name_the_problem(tiny, setup, pattern):
    setup(tiny)
    with pytest.raises(UserError, match=pattern):
        load(tiny)


def test_real_dsb2018_96_loads(dsb_path):
    d = load(dsb_path)
    assert len(d.ids) == 670
    assert all(i.shape == (96, 96, 3) for i in d.images) and all(m.shape == (96, 96, 1) for m in d.masks)
    frac = np.mean([m.mean() for m in d.masks])
    assert 0.08 < frac < 0.2   # the README says about 14% foreground


def test_label_images_are_the_target_and_the_objects(micro):
    import tifffile
    data = SegmentationData.from_folder(micro, ".tif", ".png", 1, 1)
    assert len(data.ids) == 12 and data.dtypes == {np.dtype(np.uint16)}
    labels = tifffile.imread(os.path.join(micro, "labels", data.ids[0] + ".tif"))
    assert np.array_equal(data.mask(0)[:, :, 0], (labels > 0).astype(np.uint8))
    assert data.instances(0).max() == len(np.unique(labels)) - 1            # one object per label
    assert data.subset(data.ids[1:]).instances(0).max() == len(np.unique(
        tifffile.imread(os.path.join(micro, "labels", data.ids[1] + ".tif")))) - 1


def test_label_images_beside_masks_give_the_objects(micro):
    import tifffile
    os.makedirs(os.path.join(micro, "masks", "0"))
    for f in os.listdir(os.path.join(micro, "labels")):
        labels = tifffile.imread(os.path.join(micro, "labels", f))
        cv2.imwrite(os.path.join(micro, "masks", "0", f.replace(".tif", ".png")), ((labels > 0) * 255).astype(np.uint8))
    data = SegmentationData.from_folder(micro, ".tif", ".png", 1, 1)
    assert data.samples[0].masks and data.samples[0].labels.endswith(".tif")
    assert data.instances(0).max() >= 2


@pytest.mark.parametrize("breakage, pattern", [
    (lambda p: write_tiff(p, np.zeros((16, 32), np.uint16)), r"label image .*cell0001.tif is 32x16 but its image is 32x32"),
    (lambda p: write_tiff(p, np.zeros((32, 32), np.float32)), r"label image .*cell0001.tif is float32; label images must hold whole numbers"),
    (lambda p: write_tiff(p, np.zeros((32, 32, 3), np.uint8)), r"label image .*cell0001.tif has 3 channels; label images must be single-channel"),
    (lambda p: write_tiff(p, np.full((32, 32), -1, np.int16)), r"cell0001.tif holds negative values"),
    (lambda p: os.remove(p), r"1 image\(s\) have no label image in .*labels: cell0001"),
    (lambda p: open(p, "wb").write(b"II*\x00broken"), r"cannot read image file .*cell0001.tif"),
])
def test_bad_label_images_name_the_file(micro, breakage, pattern):
    breakage(os.path.join(micro, "labels", "cell0001.tif"))
    with pytest.raises(UserError, match=pattern):
        SegmentationData.from_folder(micro, ".tif", ".png", 1, 1)


def test_object_borders_are_drawn_at_the_networks_resolution():
    from dataset import BORDER_RADIUS, Targets
    resized = Targets.of({**config.DEFAULTS, "target": "objects", "input_h": 32, "input_w": 32})
    assert resized.input_size == (32, 32) and resized.border_radius((64, 64)) == 2 * BORDER_RADIUS
    assert resized.border_radius((32, 48)) == round(1.5 * BORDER_RADIUS) and resized.border_radius((8, 8)) == 1
    cropped = Targets.of({**config.DEFAULTS, "target": "objects", "crop": True})
    assert cropped.input_size is None and cropped.border_radius((1000, 1000)) == BORDER_RADIUS
    assert not Targets.of(config.DEFAULTS).objects and Targets.of({**config.DEFAULTS, "class_mode": "softmax"}).softmax


def test_target_objects_reads_the_label_images_whatever_masks_holds(tmp_path):
    from dataset import Targets
    from pairing import scan
    root = tmp_path / "set"
    for folder in ("images", "masks/0", "labels"):
        os.makedirs(root / folder)
    labels = np.zeros((64, 64), np.uint16)
    labels[10:30, 10:30], labels[10:30, 30:50] = 1, 2                      # two touching squares
    cv2.imwrite(str(root / "images" / "a.png"), np.full((64, 64, 3), 90, np.uint8))
    cv2.imwrite(str(root / "masks" / "0" / "a.png"), np.zeros((64, 64), np.uint8))   # an empty mask: not read
    cv2.imwrite(str(root / "labels" / "a.png"), labels)
    targets = Targets(objects=True, input_size=(32, 32))
    data = SegmentationData.decode(scan(str(root), ".png", ".png", 2, objects=True), 3, None, str(root),
                                   targets=targets)
    mask = data.mask(0)
    assert mask.shape == (64, 64, 2) and mask[:, :, 0].sum() == 800
    assert np.flatnonzero(mask[20, :, 1]).tolist() == [28, 29, 30, 31]   # 2 pixels each side at 64 for 1 at 32
    assert data.target_pixels.tolist() == [[800, 4 * 20]]


def test_invert_mask_makes_the_target_the_complement_of_the_masks_and_of_the_label_images(tiny, micro):
    from dataset import Targets
    from pairing import scan
    inverted = Targets.of({**config.DEFAULTS, "invert_mask": True})
    assert inverted.invert and not Targets.of(config.DEFAULTS).invert
    for root, ext in ((tiny, ".png"), (micro, ".tif")):
        plain = SegmentationData.decode(scan(root, ext, ".png", 1), 3, None, root)
        data = SegmentationData.decode(scan(root, ext, ".png", 1), 3, 0, root, targets=inverted)   # cached: none
        assert data.masks[0] is None and np.array_equal(data.mask(0), 1 - plain.mask(0))
        assert plain.mask(0).any() and data.mask(0).any()
        pixels = [h * w for h, w in plain.sizes]
        assert data.target_pixels[:, 0].tolist() == [p - t for p, t in zip(pixels, plain.target_pixels[:, 0])]
