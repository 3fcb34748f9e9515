"""loaders.py: the memory and workers loaders, their augmentation, seeding, sharding and choice."""
import os
from dataclasses import fields

import cv2
import numpy as np
import pytest
import torch

import runtime
from dataset import SegmentationData
from loaders import (AFFINE, BRIGHTNESS, CONTRAST, HSV, AlbumentationsDataset, AugmentDraws, MemoryLoader,
                     WorkersLoader, choose_loader, make_loaders, shard, train_transform, val_transform)
from conftest import make_data
from normalize import Normalization, mean_std, normalize
from utils import UserError

RGB = Normalization("imagenet", channels=3)   # what 8-bit RGB images get by default


def unstandardize(images):
    """Network inputs of RGB 8-bit images back to 0..1."""
    mean, std = (torch.tensor(v).view(1, -1, 1, 1) for v in mean_std(RGB))
    return images * std + mean

CPU = runtime.Runtime(torch.device("cpu"), None, channels_last=False, fused=False)


def load(root, num_classes=1, input_channels=3):
    return SegmentationData.from_folder(str(root), ".png", ".png", num_classes, input_channels)


def settings(**kw):
    """The loader-related config keys for the tiny 32x32 set."""
    return {"input_h": 32, "input_w": 32, "input_channels": 3, "num_classes": 1, "crop": False, "batch_size": 4,
            "num_workers": 0, "seed": 0, "loader": "auto", "affine": 0.0, "normalize": "auto", "norm_pmin": 1.0,
            "norm_pmax": 99.8, "per_image_norm": False, **kw}


def test_items_are_normalised_once_and_reproducible(tiny):
    d = load(tiny)
    ds = AlbumentationsDataset(d, train_transform(32, 32, 3), RGB, (32, 32), seed=5)
    img, mask, meta = ds[3]
    assert img.shape == (3, 32, 32) and img.dtype == torch.float32
    assert mask.shape == (1, 32, 32) and set(mask.unique().tolist()) <= {0.0, 1.0}
    assert meta == {"img_id": "img0003"}
    assert img.std() > 0.2           # ~N(0,1)-scaled, not squashed by a second /255
    assert torch.equal(ds[3][0], img) and torch.equal(ds[3][1], mask)
    ds.set_epoch(1)
    assert any(not torch.equal(ds[i][0], AlbumentationsDataset(d, train_transform(32, 32, 3), RGB, (32, 32), seed=5)[i][0]) for i in range(10))


def test_val_transform_resizes_without_augmenting(tiny):
    d = load(tiny)
    ds = AlbumentationsDataset(d, val_transform(64, 48), RGB, (64, 48), train=False)
    img, mask, _ = ds[0]
    assert img.shape == (3, 64, 48) and mask.shape == (1, 64, 48)
    expected = (d.images[0][0, 0, 0] / 255 - 0.485) / 0.229
    assert img[0, 0, 0].item() == pytest.approx(expected, abs=1e-4)


def two_tone(tmp_path):
    """A data set whose images are exactly their masks (0 or 255 in every channel)."""
    root = make_data(tmp_path, "twotone", n=12)
    for f in os.listdir(os.path.join(root, "images")):
        m = cv2.imread(os.path.join(root, "masks", "0", f), 0)
        cv2.imwrite(os.path.join(root, "images", f), np.repeat(m[:, :, None], 3, 2))
    return load(root)


def test_memory_loader_keeps_masks_aligned_under_augmentation(tmp_path):
    d = two_tone(tmp_path)
    tl = MemoryLoader(d, settings(seed=1), CPU, train=True)
    changed = False
    for epoch in range(3):
        tl.set_epoch(epoch)
        for images, masks, meta in tl:
            raw = unstandardize(images)                           # back to 0..1
            assert torch.equal((raw.mean(1, keepdim=True) > 0.5).float(), masks)
            index = [d.ids.index(i) for i in meta["img_id"]]
            original = torch.stack([torch.from_numpy(d.masks[k]).permute(2, 0, 1).float() for k in index])
            changed |= not torch.equal(original, masks)               # geometry was really applied
    assert changed


@pytest.mark.parametrize("h, w", [(32, 32), (32, 48)])
def test_affine_warps_image_and_mask_together(tmp_path, h, w):
    d = two_tone(tmp_path)
    d = SegmentationData(d.ids, [cv2.resize(i, (w, h), interpolation=cv2.INTER_NEAREST) for i in d.images],
                         [cv2.resize(m, (w, h), interpolation=cv2.INTER_NEAREST)[..., None] for m in d.masks])
    plain = MemoryLoader(d, settings(seed=1, input_h=h, input_w=w, affine=0.0), CPU, train=True)
    warped = MemoryLoader(d, settings(seed=1, input_h=h, input_w=w, affine=1.0), CPU, train=True)
    plain.set_epoch(1)
    warped.set_epoch(1)
    for (_, m0, meta0), (images, masks, meta1) in zip(plain, warped):
        assert meta0 == meta1                                            # same order: the draws come after
        raw = unstandardize(images)
        agree = ((raw.mean(1, keepdim=True) > 0.5).float() == masks).float().mean()
        assert agree > 0.97 and set(masks.unique().tolist()) <= {0.0, 1.0}   # aligned (edges resampled)
        assert not torch.equal(m0, masks)                                # the geometry changed
    assert {"scale", "shift", "degrees"} <= set(AFFINE)
    item = AlbumentationsDataset(d, train_transform(h, w, 3, affine=1.0), RGB, (h, w), seed=0)[0][1]
    assert set(item.unique().tolist()) <= {0.0, 1.0}                     # the workers path takes it too


def test_memory_loader_is_seeded_per_epoch(tiny):
    d = load(tiny)
    tl = MemoryLoader(d, settings(seed=3), CPU, train=True)
    batches = {}
    for epoch in (1, 2, 1):
        tl.set_epoch(epoch)
        got = [(x, m["img_id"]) for x, _, m in tl]
        if epoch in batches:
            assert all(torch.equal(a[0], b[0]) and a[1] == b[1] for a, b in zip(batches[epoch], got))
        batches[epoch] = got
    assert len(batches[1]) == 2                                        # 10 images, batch 4: last partial dropped
    assert not torch.equal(batches[1][0][0], batches[2][0][0])


def test_memory_loader_draws_are_named_and_each_does_what_its_name_says(tiny):
    tl = MemoryLoader(load(tiny), settings(input_w=48), CPU, train=True)      # not square: half turns only
    d = tl.epoch_draws(200)
    assert set(d.turns.tolist()) == {0.0, 2.0} and set(d.colour.tolist()) == {BRIGHTNESS, CONTRAST, HSV}
    assert d.brightness.abs().max() <= 0.2 and 0.8 <= d.contrast.min() and d.contrast.max() <= 1.2
    assert d.hue.abs().max() <= 40 and d.saturation.abs().max() <= 30 and d.value.abs().max() <= 20
    image = torch.rand(1, 3, 32, 48)
    mask = (image[:, :1] > 0.5).float()

    def only(**drawn):       # one image's draws: nothing but what is named (colour: brightness + 0)
        return AugmentDraws(**{f.name: torch.tensor([float(drawn.get(f.name, 0))]) for f in fields(AugmentDraws)})

    for drawn, expected in (({"h_flip": 1}, image.flip(3)), ({"v_flip": 1}, image.flip(2)),
                            ({"turns": 2}, image.flip(2).flip(3))):
        x, m = tl.augment(image, mask, only(**drawn).of_batch(slice(None)))
        assert torch.equal(x, expected) and torch.equal(m, (expected[:, :1] > 0.5).float())
    x, _ = tl.augment(image, mask, only(colour=CONTRAST, contrast=1.1).of_batch(slice(None)))
    assert torch.equal(x, (image * 1.1).clamp(0, 1))


def test_memory_loader_validation_equals_val_transform(tiny):
    d = load(tiny)
    tl = MemoryLoader(d, settings(), CPU, train=False)
    images = torch.cat([x for x, _, _ in tl])
    ids = [i for _, _, m in tl for i in m["img_id"]]
    assert ids == d.ids and len(tl) == 1           # in order, nothing dropped (validation batches of up to 4 x 4)
    ds = AlbumentationsDataset(d, val_transform(32, 32), RGB, (32, 32), train=False)
    assert torch.allclose(images, torch.stack([ds[k][0] for k in range(10)]), atol=1e-5)


def test_workers_loader_is_seeded_per_epoch(tiny):
    d = load(tiny)
    el = WorkersLoader(d, settings(seed=2), CPU, train=True)
    el.set_epoch(1)
    first = [(x, m["img_id"]) for x, _, m in el]
    el.set_epoch(1)
    again = [(x, m["img_id"]) for x, _, m in el]
    assert all(torch.equal(a[0], b[0]) and a[1] == b[1] for a, b in zip(first, again)) and len(first) == 2


@pytest.mark.parametrize("asked, crop, cached, expected", [
    ("auto", False, True, "memory"),        # all decoded and small: on the device
    ("auto", True, True, "workers"),        # random crops of full-size images: albumentations
    ("auto", False, False, "workers"),      # not all of it fits the cache: streamed from disk
    ("workers", False, True, "workers"),
    ("memory", False, False, "memory"),     # asked for: honoured (images are read once, up front)
])
def test_choose_loader(tiny, asked, crop, cached, expected):
    d = load(tiny)
    if not cached:
        d.images[0] = None
    assert choose_loader(asked, d, settings(crop=crop), CPU) == expected


def test_memory_loader_with_crop_is_refused(tiny):
    with pytest.raises(UserError, match="with --crop use --loader workers"):
        choose_loader("memory", load(tiny), settings(crop=True), CPU)


def test_a_memory_loader_larger_than_half_the_memory_is_refused(tiny, monkeypatch):
    import loaders
    d = load(tiny)
    assert choose_loader("memory", d, settings(), CPU) == "memory"
    monkeypatch.setattr(loaders, "memory_bytes", lambda rt: 1000)       # a machine with 1 KB
    with pytest.raises(UserError, match="--loader memory would hold the training split resized to"):
        choose_loader("memory", d, settings(), CPU)


@pytest.mark.parametrize("kind, cls", [("memory", MemoryLoader), ("workers", WorkersLoader)])
def test_make_loaders_gives_the_kind_asked_for(tiny, kind, cls):
    d = load(tiny)
    train, val = make_loaders(settings(loader=kind), d.subset(d.ids[:7]), d.subset(d.ids[7:]), CPU)
    assert type(train) is cls and type(val) is cls and train.kind == val.kind == kind
    assert len(train) == 1 and len(val) == 1          # 7 training images, batch 4: the partial batch is dropped
    assert [i for _, _, m in val for i in m["img_id"]] == d.ids[7:]


def test_shards_cover_validation_and_balance_training():
    order = torch.randperm(11)
    val = [shard(order, r, 3, drop_remainder=False) for r in range(3)]
    assert sorted(torch.cat(val).tolist()) == list(range(11))
    train = [shard(order, r, 3, drop_remainder=True) for r in range(3)]
    assert {len(t) for t in train} == {3} and len(set(torch.cat(train).tolist())) == 9


def test_capped_cache_reads_the_rest_from_disk_with_the_same_batches(tiny):
    full = load(tiny)
    capped = SegmentationData.from_folder(str(tiny), ".png", ".png", 1, 3, cache_bytes=3 * (32 * 32 * 3 + 32 * 32))
    assert sum(i is not None for i in capped.images) == 3 and not capped.fully_cached and full.fully_cached
    batches = []
    for d in (full, capped):
        loader = WorkersLoader(d, settings(seed=4), CPU, train=True)
        loader.set_epoch(2)
        batches.append([(x, y, m["img_id"]) for x, y, m in loader])
    for (x1, y1, i1), (x2, y2, i2) in zip(*batches):
        assert i1 == i2 and torch.equal(x1, x2) and torch.equal(y1, y2)
    cfg = settings()
    assert choose_loader("auto", capped, cfg, CPU) == "workers"
    assert choose_loader("auto", full, cfg, CPU) == "memory"


# --- one normalisation for training and prediction (issue 19) ---

def micro_settings(**kw):
    return settings(**{"input_channels": 1, "normalize": "percentile", **kw})


@pytest.mark.parametrize("kind", ["8-bit imagenet", "16-bit percentile", "float32 percentile", "2-channel per-image"])
def test_training_and_prediction_see_identical_inputs_for_the_same_file(tmp_path, kind):
    import predict
    from conftest import make_microscopy
    if kind == "8-bit imagenet":
        d, cfg = load(make_data(tmp_path, "rgb", size=40)), settings(normalize="imagenet")
    else:
        channels = 2 if "2-channel" in kind else 1
        dtype = np.float32 if "float32" in kind else np.uint16
        root = make_microscopy(tmp_path, "m", n=10, size=40, channels=channels, dtype=dtype)
        d = SegmentationData.from_folder(root, ".tif", ".png", 1, channels)
        cfg = settings(input_channels=channels, normalize="percentile", per_image_norm="per-image" in kind)
    memory = torch.cat([x for x, _, _ in MemoryLoader(d, cfg, CPU, train=False)])
    workers = torch.cat([x for x, _, _ in WorkersLoader(d, cfg, CPU, train=False)])
    norm = Normalization.from_config(cfg, d.dtypes)
    # what val.py's Predictor gives its network: predict.prepared's raw batch and ranges, normalised
    predicted = torch.cat([normalize(*predict.prepared([d.image(k)], norm, (32, 32)), norm) for k in range(len(d.ids))])
    if cfg["per_image_norm"]:    # a mean over a batch of 4 or of 1 may round differently in the last bit
        assert torch.allclose(memory, predicted, atol=1e-6) and torch.allclose(workers, predicted, atol=1e-6)
    else:
        assert torch.equal(memory, predicted) and torch.equal(workers, predicted)


def test_16_bit_signal_in_200_grey_levels_is_not_quantised_to_8_bits(tmp_path):
    import tifffile
    root = tmp_path / "faint"
    os.makedirs(root / "images"), os.makedirs(root / "labels")
    rng = np.random.default_rng(0)
    for i in range(6):
        image = (1000 + rng.integers(0, 200, (32, 32))).astype(np.uint16)   # 12-bit data in 200 levels
        tifffile.imwrite(root / "images" / f"f{i}.tif", image)
        tifffile.imwrite(root / "labels" / f"f{i}.tif", (image > 1100).astype(np.uint16))
    d = SegmentationData.from_folder(str(root), ".tif", ".png", 1, 1)
    for mode in ("imagenet", "percentile"):
        for loader in (MemoryLoader, WorkersLoader):
            x = torch.cat([b for b, _, _ in loader(d, micro_settings(normalize=mode), CPU, train=False)])
            assert len(torch.unique(x[0])) > 150, (mode, loader)      # 8 bits would leave one or two levels


def test_16_bit_training_batches_are_augmented_in_0_to_1(micro):
    d = SegmentationData.from_folder(micro, ".tif", ".png", 1, 1)
    for loader in (MemoryLoader(d, micro_settings(), CPU, train=True), WorkersLoader(d, micro_settings(), CPU, train=True)):
        loader.set_epoch(1)
        x, m, _ = next(iter(loader))
        unit = x * 0.25 + 0.5                              # percentile mode: 0..1 (augmented there), then centred
        # the 1st to 99.8th percentile stretched to 0..1 and clipped: a batch of 4 reaches both ends, none beyond
        assert x.dtype == torch.float32 and (unit.min().item(), unit.max().item()) == (pytest.approx(0, abs=1e-6),
                                                                                       pytest.approx(1, abs=1e-6))
        assert unit.std() > 0.05
        assert set(m.unique().tolist()) <= {0.0, 1.0}


def test_memory_loader_keeps_16_bit_images_in_16_bits(micro):
    d = SegmentationData.from_folder(micro, ".tif", ".png", 1, 1)
    assert MemoryLoader(d, micro_settings(), CPU, train=False).images.dtype == torch.uint16


def test_loader_workers_are_at_most_one_per_core(tiny, monkeypatch):
    import loaders
    monkeypatch.setattr(loaders.os, "sched_getaffinity", lambda pid: {0, 1})      # a 2-core machine
    d = load(tiny)
    train, _ = make_loaders(settings(loader="workers", num_workers=4), d.subset(d.ids[:7]), d.subset(d.ids[7:]), CPU)
    assert train.loader.num_workers == 2
    assert loaders.usable_cores() == 2


def test_validation_batches_are_larger_within_a_pixel_budget():
    from loaders import VALIDATION_PIXELS, batch_size
    small = {"batch_size": 8, "input_h": 96, "input_w": 96}
    assert batch_size(small, train=True) == 8 and batch_size(small, train=False) == 32
    large = {"batch_size": 2, "input_h": 512, "input_w": 512}              # 512x512 is over the budget already
    assert batch_size(large, train=False) == 2
    assert batch_size({"batch_size": 4, "input_h": 96, "input_w": 96}, train=False) * 96 * 96 <= VALIDATION_PIXELS
