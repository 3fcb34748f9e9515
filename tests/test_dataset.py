import os

import cv2
import numpy as np
import pytest

import config
from conftest import make_data
from dataset import (TRAIN_HINTS, SegmentationData, binarize_mask, fold_ids, load_splits, read_image, read_mask, scan,
                     split_for, split_ids)
from utils import UserError


def load(root, num_classes=1, input_channels=3, img_ext=".png"):
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


def test_wrong_extension_suggests_the_right_one(tiny):
    with pytest.raises(UserError, match="--img_ext .png"):
        load(tiny, img_ext=".tif")


def test_split_is_the_reference_split():
    ids = [f"{i:03d}" for i in range(50)]
    tr, va = split_ids(ids, 0.2, 41)
    assert len(va) == 10 and sorted(tr + va) == ids
    assert split_ids(ids, 0.2, 41) == (tr, va)
    with pytest.raises(UserError, match="val_split"):
        split_ids(ids[:1], 0.2, 41)


@pytest.mark.parametrize("n,val_split,seed", [(50, 0.2, 41), (670, 0.2, 41), (7, 0.3, 0), (101, 0.5, 12345)])
def test_split_and_folds_equal_scikit_learns(n, val_split, seed):
    """The splits are written with NumPy (no scikit-learn import at start-up) but must stay the reference's."""
    from sklearn.model_selection import KFold, train_test_split
    ids = [f"img{i:04d}" for i in range(n)]
    assert split_ids(ids, val_split, seed) == tuple(train_test_split(ids, test_size=val_split, random_state=seed))
    train_ids = split_ids(ids, val_split, seed)[0]
    for folds in [k for k in (2, 3, 5) if k <= len(train_ids)]:
        for fold, (tr, va) in enumerate(KFold(folds, shuffle=True, random_state=seed).split(train_ids)):
            assert fold_ids(train_ids, folds, fold, seed) == ([train_ids[k] for k in tr], [train_ids[k] for k in va])


def test_load_splits_is_the_configs_split(tmp_path):
    make_data(tmp_path, "set", n=20)
    cfg = {"data_dir": str(tmp_path), "dataset": "set", "img_ext": ".png", "mask_ext": ".png", "num_classes": 1,
           "input_channels": 3, "cache_mb": 0, "val_split": 0.25, "split_seed": 3, "folds": 1, "fold": 0,
           "class_mode": "sigmoid"}
    train, val = load_splits(cfg)
    assert (train.ids, val.ids) == tuple(list(s) for s in split_ids([f"img{i:04d}" for i in range(20)], 0.25, 3))
    assert len(val.ids) == 5 and val.masks[0].shape == (32, 32, 1)


def test_real_dsb2018_96_loads(dsb_path):
    d = load(dsb_path)
    assert len(d.ids) == 670
    assert all(i.shape == (96, 96, 3) for i in d.images) and all(m.shape == (96, 96, 1) for m in d.masks)
    frac = np.mean([m.mean() for m in d.masks])
    assert 0.08 < frac < 0.2   # the README says about 14% foreground


def test_folds_partition_the_training_split_and_never_touch_the_held_out_images():
    ids = [f"img{i:04d}" for i in range(50)]
    cfg = {"val_split": 0.2, "split_seed": 41, "folds": 4}
    outer_train, held_out = split_ids(ids, 0.2, 41)
    folds = [split_for(ids, {**cfg, "fold": i}) for i in range(4)]
    vals = [set(v) for _, v in folds]
    assert set().union(*vals) == set(outer_train) and sum(map(len, vals)) == len(outer_train)   # each image once
    for train, val in folds:
        assert not set(train) & set(val) and not (set(train) | set(val)) & set(held_out)
    assert split_for(ids, {**cfg, "fold": 2}) == folds[2]                                       # repeatable
    with pytest.raises(UserError, match="--folds 60 on a training split of 40 images"):
        split_for(ids, {**cfg, "folds": 60, "fold": 0})


# --- microscopy files: TIFF, 16-bit, float32, channels, label images (issue 19) ---

def write_tiff(path, array, **kw):
    import tifffile
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tifffile.imwrite(path, array, **kw)
    return path


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
    img = read_image(path, expected_shape[2], TRAIN_HINTS)
    assert img.shape == expected_shape and img.dtype == array.dtype        # nothing rounded to 8 bits
    channels_last = array.reshape(expected_shape[:2] + (-1,)) if array.ndim == 2 or array.shape[-1] == 3 and "planar" not in name \
        else np.moveaxis(array.reshape((-1,) + expected_shape[:2]), 0, -1)
    assert np.array_equal(img, channels_last)


def test_16_bit_png_keeps_every_grey_level(tmp_path):
    array = (np.arange(64, dtype=np.uint16).reshape(8, 8) + 1000)          # 64 levels that 8 bits would merge
    cv2.imwrite(str(tmp_path / "a.PNG"), array)
    img = read_image(str(tmp_path / "a.PNG"), 1, TRAIN_HINTS)
    assert img.dtype == np.uint16 and len(np.unique(img)) == 64


@pytest.mark.parametrize("array, kw, pattern", [
    (np.zeros((5, 8, 9), np.uint16), {"imagej": True, "metadata": {"axes": "ZYX"}}, r"shape is \(5, 8, 9\) with axes ZYX \(Z 5: depth"),
    (np.zeros((3, 2, 8, 9), np.uint16), {"imagej": True, "metadata": {"axes": "TCYX"}}, r"shape is .* with axes TCYX \(T 3: time .*C 2"),
    (np.zeros((2, 8, 9), np.uint16), {}, r"shape is .* with axes QYX \(Q 2: an axis the file does not name\).*metadata=\{'axes': 'CYX'\}"),
])
def test_stacks_and_unnamed_axes_are_refused_with_shape_and_axes(tmp_path, array, kw, pattern):
    path = write_tiff(str(tmp_path / "stack.tif"), array, **kw)
    with pytest.raises(UserError, match=r"stack.tif is not a 2D image: its " + pattern):
        read_image(path, 1, TRAIN_HINTS)


@pytest.mark.parametrize("content", [b"II*\x00garbage", b"not a tiff at all", b"MM\x00*\x00\x00\x00\x08\xff\xff"])
def test_unreadable_tiff_names_the_file(tmp_path, content):
    (tmp_path / "bad.tif").write_bytes(content)
    with pytest.raises(UserError, match="cannot read image file .*bad.tif"):
        read_image(str(tmp_path / "bad.tif"), 1, TRAIN_HINTS)


def test_a_tiff_declaring_gigabytes_is_refused_before_decoding(tmp_path, monkeypatch):
    import dataset
    path = write_tiff(str(tmp_path / "big.tif"), np.zeros((64, 64), np.uint16))
    monkeypatch.setattr(dataset, "MAX_IMAGE_BYTES", 1000)
    with pytest.raises(UserError, match=r"big.tif declares \(64, 64\) pixels"):
        read_image(path, 1, TRAIN_HINTS)


def test_channel_count_must_match_with_the_flag_to_pass(tmp_path):
    path = write_tiff(str(tmp_path / "two.tif"), np.zeros((2, 8, 9), np.uint16), imagej=True, metadata={"axes": "CYX"})
    with pytest.raises(UserError, match="two.tif has 2 channel.* input_channels is 3: pass --input_channels 2"):
        read_image(path, 3, TRAIN_HINTS)


def test_nan_in_a_float_image_is_refused(tmp_path):
    path = write_tiff(str(tmp_path / "nan.tif"), np.array([[0, np.nan]], np.float32))
    with pytest.raises(UserError, match="nan.tif holds NaN"):
        read_image(path, 1, TRAIN_HINTS)


def test_extensions_match_in_any_case_and_tif_is_tiff(tmp_path):
    root = tmp_path / "set"
    for name in ("a.TIF", "b.tiff", "c.tif"):
        write_tiff(str(root / "images" / name), np.zeros((8, 8), np.uint16))
        write_tiff(str(root / "labels" / (name.split(".")[0] + ".PNG.tif")), np.zeros((8, 8), np.uint16))
    for name in ("a", "b", "c"):
        os.rename(root / "labels" / f"{name}.PNG.tif", root / "labels" / f"{name}.TIFF")
    data = SegmentationData.from_folder(str(root), ".tif", ".png", 1, 1)
    assert data.ids == ["a", "b", "c"]
    write_tiff(str(root / "images" / "a.tif"), np.zeros((8, 8), np.uint16))      # a second file for id a
    with pytest.raises(UserError, match="two files for the id 'a'"):
        SegmentationData.from_folder(str(root), ".tif", ".png", 1, 1)


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


def test_label_images_without_masks_give_one_class(micro):
    with pytest.raises(UserError, match="no masks/, which gives one class .*num_classes is 2: pass --num_classes 1"):
        scan(micro, ".tif", ".png", 2, TRAIN_HINTS)
    os.rename(os.path.join(micro, "labels"), os.path.join(micro, "instances"))
    os.makedirs(os.path.join(micro, "labels"))
    with pytest.raises(UserError, match="both labels/ and instances/"):
        scan(micro, ".tif", ".png", 1, TRAIN_HINTS)


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
    img = read_image(str(tmp_path / "photo.jpg"), 3, TRAIN_HINTS)
    assert img.shape == (20, 10, 3) and img[:5].mean() > 200 and img[-5:].mean() < 50   # the band is now on top


@pytest.mark.parametrize("make, pattern", [
    (lambda d: os.makedirs(os.path.join(d, "images", "img0003.png")), "img0003.png is a folder, not a file"),
    (lambda d: os.symlink(os.path.join(d, "nowhere.png"), os.path.join(d, "images", "img0099.png")), "img0099.png is a broken link"),
])
def test_folders_and_broken_links_named_like_images_are_named(tiny, make, pattern):
    if "img0003" in pattern:
        os.remove(os.path.join(tiny, "images", "img0003.png"))
    make(tiny)
    with pytest.raises(UserError, match=pattern):
        load(tiny)


def test_an_extension_without_its_dot_and_a_data_set_that_is_a_file_are_explained(tiny, tmp_path):
    with pytest.raises(UserError, match="the extension 'png' has no leading dot; pass --img_ext .png"):
        load(tiny, img_ext="png")
    (tmp_path / "afile").write_text("x")
    with pytest.raises(UserError, match="afile is a file, not a folder"):
        load(str(tmp_path / "afile"))


def test_object_borders_are_drawn_at_the_networks_resolution():
    from dataset import BORDER_RADIUS, Targets
    resized = Targets.of({**config.DEFAULTS, "target": "objects", "input_h": 32, "input_w": 32})
    assert resized.input_size == (32, 32) and resized.border_radius((64, 64)) == 2 * BORDER_RADIUS
    assert resized.border_radius((32, 48)) == round(1.5 * BORDER_RADIUS) and resized.border_radius((8, 8)) == 1
    cropped = Targets.of({**config.DEFAULTS, "target": "objects", "crop": True})
    assert cropped.input_size is None and cropped.border_radius((1000, 1000)) == BORDER_RADIUS
    assert not Targets.of(config.DEFAULTS).objects and Targets.of({**config.DEFAULTS, "class_mode": "softmax"}).softmax


def test_target_objects_reads_the_label_images_whatever_masks_holds(tmp_path):
    from dataset import SegmentationData, Targets, scan
    root = tmp_path / "set"
    for folder in ("images", "masks/0", "labels"):
        os.makedirs(root / folder)
    labels = np.zeros((64, 64), np.uint16)
    labels[10:30, 10:30], labels[10:30, 30:50] = 1, 2                      # two touching squares
    cv2.imwrite(str(root / "images" / "a.png"), np.full((64, 64, 3), 90, np.uint8))
    cv2.imwrite(str(root / "masks" / "0" / "a.png"), np.zeros((64, 64), np.uint8))   # an empty mask: not read
    cv2.imwrite(str(root / "labels" / "a.png"), labels)
    targets = Targets(objects=True, input_size=(32, 32))
    data = SegmentationData.decode(scan(str(root), ".png", ".png", 2, TRAIN_HINTS, objects=True), 3, None, str(root),
                                   TRAIN_HINTS, targets)
    mask = data.mask(0)
    assert mask.shape == (64, 64, 2) and mask[:, :, 0].sum() == 800
    assert np.flatnonzero(mask[20, :, 1]).tolist() == [28, 29, 30, 31]   # 2 pixels each side at 64 for 1 at 32
    assert data.target_pixels.tolist() == [[800, 4 * 20]]
