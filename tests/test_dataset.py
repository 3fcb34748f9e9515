import os
import warnings

import cv2
import numpy as np
import pytest
import torch

from conftest import make_data
from dataset import EpochLoader, SegDataset, SegmentationData, TensorLoader, choose_loader, split_ids, train_transform, val_transform
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
    with pytest.raises(UserError, match="colour but --input_channels is 1"):
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
    (lambda d: os.makedirs(os.path.join(d, "masks", "1")), r"class folders \[0, 1\] but --num_classes 1"),
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


def test_items_are_normalised_once_and_reproducible(tiny):
    d = load(tiny)
    ds = SegDataset(d, train_transform(32, 32, 3), seed=5)
    img, mask, meta = ds[3]
    assert img.shape == (3, 32, 32) and img.dtype == torch.float32
    assert mask.shape == (1, 32, 32) and set(mask.unique().tolist()) <= {0.0, 1.0}
    assert meta == {"img_id": "img0003"}
    assert img.std() > 0.2           # ~N(0,1)-scaled, not squashed by a second /255
    assert torch.equal(ds[3][0], img) and torch.equal(ds[3][1], mask)
    ds.set_epoch(1)
    assert any(not torch.equal(ds[i][0], SegDataset(d, train_transform(32, 32, 3), seed=5)[i][0]) for i in range(10))


def test_val_transform_resizes_without_augmenting(tiny):
    d = load(tiny)
    ds = SegDataset(d, val_transform(64, 48, 3))
    img, mask, _ = ds[0]
    assert img.shape == (3, 64, 48) and mask.shape == (1, 64, 48)
    expected = (d.images[0][0, 0, 0] / 255 - 0.485) / 0.229
    assert img[0, 0, 0].item() == pytest.approx(expected, abs=1e-4)


def test_real_dsb2018_96_loads(dsb_path):
    d = load(dsb_path)
    assert len(d.ids) == 670
    assert all(i.shape == (96, 96, 3) for i in d.images) and all(m.shape == (96, 96, 1) for m in d.masks)
    frac = np.mean([m.mean() for m in d.masks])
    assert 0.08 < frac < 0.2   # the README says about 14% foreground


def two_tone(tmp_path):
    """A data set whose images are exactly their masks (0 or 255 in every channel)."""
    root = make_data(tmp_path, "twotone", n=12)
    for f in os.listdir(os.path.join(root, "images")):
        m = cv2.imread(os.path.join(root, "masks", "0", f), 0)
        cv2.imwrite(os.path.join(root, "images", f), np.repeat(m[:, :, None], 3, 2))
    return load(root)


def test_tensor_loader_keeps_masks_aligned_under_augmentation(tmp_path):
    d = two_tone(tmp_path)
    tl = TensorLoader(d, 32, 32, 4, torch.device("cpu"), seed=1, train=True)
    changed = False
    for epoch in range(3):
        tl.set_epoch(epoch)
        for images, masks, meta in tl:
            raw = images * tl.std + tl.mean                            # back to 0..1
            assert torch.equal((raw.mean(1, keepdim=True) > 0.5).float(), masks)
            index = [d.ids.index(i) for i in meta["img_id"]]
            original = torch.stack([torch.from_numpy(d.masks[k]).permute(2, 0, 1).float() for k in index])
            changed |= not torch.equal(original, masks)               # geometry was really applied
    assert changed


def test_tensor_loader_is_seeded_per_epoch(tiny):
    d = load(tiny)
    tl = TensorLoader(d, 32, 32, 4, torch.device("cpu"), seed=3, train=True)
    batches = {}
    for epoch in (1, 2, 1):
        tl.set_epoch(epoch)
        got = [(x, m["img_id"]) for x, _, m in tl]
        if epoch in batches:
            assert all(torch.equal(a[0], b[0]) and a[1] == b[1] for a, b in zip(batches[epoch], got))
        batches[epoch] = got
    assert len(batches[1]) == 2                                        # 10 images, batch 4: last partial dropped
    assert not torch.equal(batches[1][0][0], batches[2][0][0])


def test_tensor_loader_validation_equals_val_transform(tiny):
    d = load(tiny)
    tl = TensorLoader(d, 32, 32, 4, torch.device("cpu"), seed=0, train=False)
    images = torch.cat([x for x, _, _ in tl])
    ids = [i for _, _, m in tl for i in m["img_id"]]
    assert ids == d.ids and len(tl) == 3                               # in order, nothing dropped
    ds = SegDataset(d, val_transform(32, 32, 3))
    assert torch.allclose(images, torch.stack([ds[k][0] for k in range(10)]), atol=1e-5)


def test_epoch_loader_is_seeded_per_epoch(tiny):
    d = load(tiny)
    el = EpochLoader(d, train_transform(32, 32, 3), 4, 0, torch.device("cpu"), seed=2, train=True)
    el.set_epoch(1)
    first = [(x, m["img_id"]) for x, _, m in el]
    el.set_epoch(1)
    again = [(x, m["img_id"]) for x, _, m in el]
    assert all(torch.equal(a[0], b[0]) and a[1] == b[1] for a, b in zip(first, again)) and len(first) == 2


def test_choose_loader(tiny):
    d = load(tiny)
    cfg = {"input_h": 32, "input_w": 32, "input_channels": 3, "num_classes": 1, "crop": False}
    assert choose_loader("auto", d, cfg, torch.device("cpu")) == "memory"
    assert choose_loader("workers", d, cfg, torch.device("cpu")) == "workers"


def test_capped_cache_reads_the_rest_from_disk_with_the_same_batches(tiny):
    full = load(tiny)
    capped = SegmentationData.from_folder(str(tiny), ".png", ".png", 1, 3, cache_bytes=3 * (32 * 32 * 3 + 32 * 32))
    assert sum(i is not None for i in capped.images) == 3 and not capped.fully_cached and full.fully_cached
    batches = []
    for d in (full, capped):
        loader = EpochLoader(d, train_transform(32, 32, 3), 4, 0, torch.device("cpu"), seed=4, train=True)
        loader.set_epoch(2)
        batches.append([(x, y, m["img_id"]) for x, y, m in loader])
    for (x1, y1, i1), (x2, y2, i2) in zip(*batches):
        assert i1 == i2 and torch.equal(x1, x2) and torch.equal(y1, y2)
    cfg = {"input_h": 32, "input_w": 32, "input_channels": 3, "num_classes": 1, "crop": False}
    assert choose_loader("auto", capped, cfg, torch.device("cpu")) == "workers"
    assert choose_loader("auto", full, cfg, torch.device("cpu")) == "memory"
