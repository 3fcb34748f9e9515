import os

import cv2
import numpy as np
import pytest

from conftest import make_data
from dataset import SegmentationData, load_splits, split_for, split_ids
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
    (lambda d: cv2.imwrite(os.path.join(d, "masks", "0", "img0001.png"), np.zeros((32, 32), np.uint16)), "img0001.png is uint16"),
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


def test_load_splits_is_the_configs_split(tmp_path):
    make_data(tmp_path, "set", n=20)
    cfg = {"data_dir": str(tmp_path), "dataset": "set", "img_ext": ".png", "mask_ext": ".png", "num_classes": 1,
           "input_channels": 3, "cache_mb": 0, "val_split": 0.25, "split_seed": 3, "folds": 1, "fold": 0}
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
