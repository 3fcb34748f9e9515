"""splits.py: the reference's train/validation split, k folds inside its training part, the split by regions of one
or two large images, and the loaded split."""
import math
import os

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

import config
from conftest import make_data, make_microscopy, write_tiff
from dataerror import DataError
from dataset import parse_region_id, region_id
from rundir import read_split
from splits import (REGION_MARGIN, fold_ids, image_regions, largest_crop, load_splits, load_validation, region_length,
                    split_for, split_ids, unseen, uses_regions)
from utils import UserError


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


# --- one or two large images: a split by regions -------------------------------------------------------------------

REGION_CFG = {**config.DEFAULTS, "img_ext": ".tif", "input_channels": 1, "crop": True, "input_h": 64,
              "input_w": 64, "batch_size": 2, "cache_mb": 64}


def region_cfg(root, **changes):
    return {**REGION_CFG, "data_dir": os.path.dirname(root), "dataset": os.path.basename(root), **changes}


@settings(max_examples=300, deadline=None)
@given(h=st.integers(16, 3000), w=st.integers(16, 3000), crop=st.sampled_from([16, 32, 64, 112, 128, 256]),
       val_split=st.floats(0.05, 0.9))
@example(h=22, w=85, crop=16, val_split=0.2)               # an exact 20% strip, once failed by float rounding
def test_the_regions_are_a_strip_at_the_end_of_the_longer_side_apart_from_the_training_strip(h, w, crop, val_split):
    regions = image_regions((h, w), (crop, crop), val_split)
    length = max(h, w)
    if regions is None:                      # too small: not even crop + crop + the margin fit along the longer side
        assert length < crop + max(math.ceil(val_split * length), crop) + REGION_MARGIN
        assert largest_crop((h, w), val_split) < crop
        return
    train, val = regions
    rows = h >= w
    along = 0 if rows else 1
    assert val.inside((h, w)) and train.inside((h, w)) and not train.overlaps(val)
    assert val.size[1 - along] == train.size[1 - along] == (w if rows else h)        # across the whole image
    assert (val.bottom, val.right) == (h, w) and (train.top, train.left) == (0, 0)   # bottom (right) / top (left)
    assert val.size[along] >= crop and train.size[along] >= crop                   # each holds a whole crop
    assert val.size[along] >= val_split * length - 1e-9    # val_split of the area at least (it spans the image;
                                                           # the margin: 0.2 * 22 * 85 is 374.00000000000006)
    gap = (val.top - train.bottom) if rows else (val.left - train.right)
    assert gap == REGION_MARGIN
    assert largest_crop((h, w), val_split) >= crop and region_length(crop, val_split) <= length


def coordinates_image(root, size=(256, 256)):
    """A one-image data set whose 16-bit pixel values are their own position (row * width + column), with a label
    image of a few squares -> its path."""
    h, w = size
    image = np.arange(h * w, dtype=np.uint32).reshape(h, w).astype(np.uint16)
    labels = np.zeros(size, np.uint16)
    for k, (y, x) in enumerate([(20, 20), (100, 150), (200, 40), (230, 200)]):
        labels[y:y + 12, x:x + 12] = k + 1
    write_tiff(os.path.join(root, "images", "big.tif"), image)
    write_tiff(os.path.join(root, "labels", "big.tif"), labels)
    return str(root)


def rows_of(values, width=256):
    return values.astype(np.int64) // width


@pytest.mark.parametrize("cache_mb", [64, 0.01])          # decoded once and cut, or read from disk again and cut
def test_training_crops_never_reach_a_validation_pixel(tmp_path, cache_mb):
    from loaders import train_transform
    root = coordinates_image(tmp_path / "inputs" / "big")
    cfg = region_cfg(root, cache_mb=cache_mb, affine=1.0)
    train, val = load_splits(cfg)
    (image_train, image_val), = [image_regions((256, 256), (64, 64), 0.2)]
    assert train.recorded_ids == [region_id("big", image_train)] and val.recorded_ids == [region_id("big", image_val)]
    assert len(train.ids) >= 10 * cfg["batch_size"]           # enough crops an epoch for MIN_STEPS batches
    assert train.fully_cached == (cache_mb == 64)
    transform = train_transform(64, 64, 1, crop=True, affine=1.0)      # flips, turns, affine warps mirrored at borders
    reached = set()
    for k in range(len(train.ids)):
        pixels = train.image(k)[:, :, 0]
        assert rows_of(pixels).max() < image_train.bottom and train.mask(k).shape[:2] == pixels.shape
        for seed in range(5):
            transform.set_random_seed(seed)
            crop = transform(image=np.zeros((*pixels.shape, 1), np.float32), mask=pixels)["mask"]
            assert crop.shape[:2] == (64, 64)
            reached |= set(np.unique(rows_of(crop)).tolist())
    assert max(reached) < image_train.bottom <= image_val.top - REGION_MARGIN    # never the margin nor validation
    assert max(reached) > image_train.bottom - 16                                 # the crops do reach the region's end
    for k in range(len(val.ids)):                                                 # validation: windows of its region
        rows = rows_of(val.image(k)[:, :, 0])
        assert rows.min() >= image_val.top and val.image(k).shape[:2] == (64, 64)
    covered = np.zeros((256, 256), bool)
    for r in val.regions:
        covered[r.top:r.bottom, r.left:r.right] = True
    assert covered[image_val.top:, :].all() and not covered[:image_val.top].any()  # the whole region, nothing else


def test_the_validation_regions_are_what_val_py_and_resume_read_back(tmp_path):
    root = coordinates_image(tmp_path / "inputs" / "big")
    cfg = region_cfg(root)
    train, val = load_splits(cfg)
    recorded = {"train": train.recorded_ids, "val": val.recorded_ids}
    data, note = load_validation(cfg, [recorded])
    assert data.ids == val.recorded_ids and note == ""
    _, region = parse_region_id(data.ids[0])
    assert data.sizes == [region.size] and rows_of(data.image(0)[:, :, 0]).min() == region.top
    objects = data.instances(0)                                                   # the objects of the region, 1..N
    assert objects.shape == region.size and sorted(np.unique(objects)) == list(range(objects.max() + 1))
    assert objects.max() == 2                                                     # 2 of the image's 4 squares
    again_train, again_val = load_splits(cfg, recorded=recorded)                  # --resume: the same split
    assert (again_train.ids, again_val.ids) == (train.ids, val.ids)
    assert all((a == b).all() for a, b in zip(
        (again_train.image(k) for k in range(3)), (train.image(k) for k in range(3))))
    assert load_validation(cfg, [None])[0].ids == data.ids                        # split.csv lost: the same regions


def test_two_images_each_hold_out_a_region(tmp_path):
    root = make_microscopy(tmp_path / "inputs", "two", n=2, size=192)
    train, val = load_splits(region_cfg(root))
    assert [parse_region_id(i)[0] for i in val.recorded_ids] == ["cell0000", "cell0001"]
    assert [parse_region_id(i)[0] for i in train.recorded_ids] == ["cell0000", "cell0001"]
    assert len(train.ids) == len(train.recorded_ids) * (len(train.ids) // 2)     # as many crops from each image


def test_a_data_set_large_enough_to_validate_on_whole_images_is_split_by_images(tmp_path):
    root = make_microscopy(tmp_path / "inputs", "three", n=3, size=192)
    train, val = load_splits(region_cfg(root))                                  # 2 training images fill batch 2
    assert (len(train.ids), len(val.ids)) == (2, 1) and all(r is None for r in train.regions + val.regions)
    assert not uses_regions(1, {**REGION_CFG, "crop": False})                   # resized whole images: never
    assert not uses_regions(1, {**REGION_CFG, "folds": 2})
    assert not uses_regions(2, {**REGION_CFG, "batch_size": 1})                 # 1 training image fills batch 1
    assert uses_regions(1, {**REGION_CFG, "batch_size": 1}) and uses_regions(2, REGION_CFG)


def test_an_image_too_small_for_the_regions_is_refused_with_the_crop_that_fits(tmp_path):
    root = make_microscopy(tmp_path / "inputs", "one", n=1, size=256)
    with pytest.raises(UserError, match=r"cell0000 \(256x256\) is too small for that with --input_h 128: .* need 272 px "
                                        r"along its height. Train on smaller crops \(--input_h 112 or less\)"):
        load_splits(region_cfg(root, input_h=128, input_w=128))
    with pytest.raises(UserError, match="With one or two large images, train on crops of them"):
        load_splits(region_cfg(root, crop=False))                               # resized whole images: the old refusal


def test_an_old_split_csv_reads_as_before_and_an_image_named_like_a_region_stays_whole(tmp_path):
    root = make_microscopy(tmp_path / "inputs", "set", n=5, size=48)
    os.rename(os.path.join(root, "images", "cell0004.tif"), os.path.join(root, "images", "cell@y0-8_x0-8.tif"))
    os.rename(os.path.join(root, "labels", "cell0004.tif"), os.path.join(root, "labels", "cell@y0-8_x0-8.tif"))
    run = tmp_path / "models" / "old"
    os.makedirs(run)
    (run / "split.csv").write_text("id,subset\ncell0000,train\ncell0001,train\ncell0002,train\ncell0003,val\n"
                                   "cell@y0-8_x0-8,val\n")                      # as runs before regions wrote it
    recorded = read_split(str(run))
    cfg = region_cfg(root, crop=False, input_h=48, input_w=48)
    data, note = load_validation(cfg, [recorded])
    assert data.ids == ["cell0003", "cell@y0-8_x0-8"] and data.regions == [None, None] and note == ""
    assert data.sizes == [(48, 48), (48, 48)]                                   # whole images
    train, val = load_splits(cfg, recorded=recorded)
    assert train.ids == ["cell0000", "cell0001", "cell0002"] and val.ids == data.ids


def test_a_recorded_region_outside_its_image_and_a_damaged_split_csv_are_named(tmp_path):
    root = make_microscopy(tmp_path / "inputs", "one", n=1, size=64)
    recorded = {"train": ["cell0000@y0-20_x0-64"], "val": ["cell0000@y40-999_x0-64"]}
    with pytest.raises(DataError, match=r"names the region cell0000@y40-999_x0-64 of the image cell0000, which is "
                                        r"64x64 now"):
        load_validation(region_cfg(root), [recorded])
    run = tmp_path / "models" / "bad"
    os.makedirs(run)
    (run / "split.csv").write_text("image;set\ncell0000;train\n")
    with pytest.raises(UserError, match="split.csv is not a split.csv as train.py writes it"):
        read_split(str(run))


def test_an_ensemble_evaluates_the_regions_none_of_its_runs_trained_on():
    present = {"a": None, "b": None}
    one = {"train": ["a@y0-100_x0-200", "b@y0-100_x0-200"], "val": ["a@y120-200_x0-200", "b@y120-200_x0-200"]}
    other = {"train": ["a@y0-130_x0-200", "b@y0-100_x0-200"], "val": ["a@y150-200_x0-200", "b@y120-200_x0-200"]}
    got = [region_id(i, r) for i, r in unseen([one, other], present)]
    # a's validation region of the first run overlaps the second run's training region; a's of the second does not
    assert got == ["a@y150-200_x0-200", "b@y120-200_x0-200"]
    assert [region_id(i, r) for i, r in unseen([one, one], present)] == one["val"]
    whole = {"train": ["a"], "val": ["b"]}
    assert unseen([whole, whole], present) == [("b", None)]                      # whole images, as before


@pytest.mark.e2e
def test_two_images_train_on_crops_without_a_plan_and_val_py_scores_both_held_out_regions(tmp_path, monkeypatch,
                                                                                         capsys):
    import train
    import val
    from conftest import run_main
    make_microscopy(tmp_path / "inputs", "two", n=2, size=192)
    argv = ["--dataset", "two", "--img_ext", ".tif", "--input_channels", "1", "--crop", "--input_h", "64", "--input_w",
            "64", "-b", "4", "--epochs", "1", "--base_channels", "8", "--num_workers", "0", "--name", "two"]
    code, out, err = run_main(train.main, argv, tmp_path, monkeypatch, capsys)
    assert code == 0, err
    assert "split by regions (2 images, too few to validate on whole images): validation on the bottom 64 rows of " \
           "each of the 2 images" in out
    train_region, val_region = image_regions((192, 192), (64, 64), 0.2)
    recorded = read_split(str(tmp_path / "models" / "two"))
    assert recorded == {"train": [region_id(f"cell000{k}", train_region) for k in (0, 1)],
                        "val": [region_id(f"cell000{k}", val_region) for k in (0, 1)]}
    code, out, err = run_main(val.main, ["--name", "two"], tmp_path, monkeypatch, capsys)
    assert code == 0, err
    rows = (tmp_path / "outputs" / "two" / "metrics.csv").read_text().splitlines()[1:]
    assert [r.split(",")[0] for r in rows] == recorded["val"]


def test_two_images_resized_whole_are_told_that_crops_split_them_by_regions(tmp_path, monkeypatch, capsys):
    import train
    from conftest import run_main
    make_microscopy(tmp_path / "inputs", "two", n=2, size=192)
    argv = ["--dataset", "two", "--img_ext", ".tif", "--input_channels", "1", "--input_h", "64", "--input_w", "64"]
    code, out, err = run_main(train.main, argv, tmp_path, monkeypatch, capsys)
    assert code == 2 and "--batch_size 16 is larger than the training split (1 of 2 images" in err
    assert "With one or two large images, train on crops of them (--crop" in err and "Traceback" not in err
