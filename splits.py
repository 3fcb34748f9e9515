"""The train/validation split (the reference's), k folds inside its training part, the split by regions of one or
two large images, and loading the data set as the split that train.py and bench.py train on or the images val.py and
export.py evaluate on.

A data set too small to validate on whole images (its split of whole images leaves fewer training images than the
smallest batch: one or two large images) is split by regions when the run trains on crops: a strip at the end of each
image's longer side is held out for validation (image_regions), and training crops are drawn from the rest only.
split.csv records each region as an id with a suffix, '<image id>@y<top>-<bottom>_x<left>-<right>'
(dataset.region_id), which val.py and --resume resolve to that region of the image again; an id that is an image's
own stays that whole image, so split.csv files written before regions read as they did.
"""
import math
import os
import warnings
from itertools import count

import numpy as np

from advice import MIN_BATCH, MIN_STEPS   # MIN_BATCH: also the fewest training images a split of whole
                                          # images must leave before regions are split
from archs import SIZE_MULTIPLE
from dataerror import DataError
from dataset import (Region, SegmentationData, Targets, cache_budget, check_blank, check_foreground, parse_region_id,
                     region_id)
from imagefiles import read_image
from pairing import scan
from utils import UserError

REGION_MARGIN = 16      # pixels left out between an image's training and validation regions, so that an object the
                        # line between them cuts is not half trained on and half validated


def split_ids(ids, val_split, split_seed):
    """(train_ids, val_ids) exactly as the reference (sorted ids, scikit-learn's train_test_split with
    random_state=split_seed): one permutation of a NumPy RandomState seeded so, its first ceil(val_split * n)
    positions for validation. Written here because importing scikit-learn for it cost ~1 s of every start-up;
    tests/test_splits.py checks it against scikit-learn."""
    n_val = int(np.ceil(val_split * len(ids))) if val_split > 0 else 0
    if n_val < 1 or n_val >= len(ids):
        few = (" With one or two large images, train on crops of them (--crop, with --input_h and --input_w, without "
               "--folds): a region of each image is then held out for validation (docs/training.md, 'One or two large images')."
               if len(ids) < 3 else "")
        raise UserError(f"--val_split {val_split} on {len(ids)} images leaves {n_val} validation and "
                        f"{len(ids) - n_val} training images; both need at least one. Add images or change "
                        f"--val_split.{few}")
    order = np.random.RandomState(split_seed).permutation(len(ids))
    return [ids[k] for k in order[n_val:]], [ids[k] for k in order[:n_val]]


def fold_ids(ids, folds, fold, split_seed):
    """K-fold inside `ids` (the training split): (the other folds' ids, fold `fold`'s ids), as scikit-learn's
    KFold(folds, shuffle=True, random_state=split_seed) makes them (checked against it in tests/test_splits.py):
    positions shuffled by a seeded RandomState, cut into folds of n // K (the first n % K one larger), each side
    listed in the ids' order, so that fold i's images are the same in every run of the K."""
    if folds > len(ids):
        raise UserError(f"--folds {folds} on a training split of {len(ids)} images leaves empty folds; use --folds "
                        f"{len(ids)} or fewer")
    order = np.arange(len(ids))
    np.random.RandomState(split_seed).shuffle(order)
    sizes = [len(ids) // folds + (1 if k < len(ids) % folds else 0) for k in range(folds)]
    start = sum(sizes[:fold])
    held = np.zeros(len(ids), bool)
    held[order[start:start + sizes[fold]]] = True
    return [i for i, h in zip(ids, held) if not h], [i for i, h in zip(ids, held) if h]


def split_for(ids, cfg):
    """The config's (train ids, validation ids): the val_split/split_seed split of the sorted ids, and with
    --folds K, fold --fold of its training part as the validation set (the held-out split stays unseen)."""
    train_ids, val_ids = split_ids(ids, cfg["val_split"], cfg["split_seed"])
    if cfg["folds"] > 1:
        train_ids, val_ids = fold_ids(train_ids, cfg["folds"], cfg["fold"], cfg["split_seed"])
    return train_ids, val_ids


def uses_regions(images, cfg):
    """Whether a data set of `images` images is split by regions of each image instead of by whole images: a run on
    crops (--crop), without --folds, whose split of whole images would leave fewer training images than the smallest
    batch (MIN_BATCH; one with --batch_size 1): one or two large images, say."""
    if not cfg.get("crop") or cfg["folds"] > 1:
        return False
    return images - math.ceil(cfg["val_split"] * images) < min(cfg["batch_size"], MIN_BATCH)


def image_regions(size, crop, val_split):
    """(training Region, validation Region) of an image of size (h, w) for crops of `crop` (h, w), or None when it is
    too small for both. The validation region is a strip across the end of the image's longer side (its bottom rows,
    or its right columns when it is wider than high): val_split of the image's area, and at least one crop deep so
    that it holds a whole network input. The training region is the strip at the other end, REGION_MARGIN pixels
    away, and must hold a crop too; the pixels between belong to neither."""
    h, w = size
    rows = h >= w
    length, along = (h, crop[0]) if rows else (w, crop[1])
    depth = max(math.ceil(val_split * length), along)
    end = length - depth - REGION_MARGIN
    if end < along:
        return None
    if rows:
        return Region(0, end, 0, w), Region(h - depth, h, 0, w)
    return Region(0, h, 0, end), Region(0, h, w - depth, w)


def largest_crop(size, val_split):
    """The largest crop side (a multiple of SIZE_MULTIPLE) along an image's longer side for which image_regions fits
    both regions into it; 0 when not even the smallest does."""
    for side in range(max(size) // SIZE_MULTIPLE * SIZE_MULTIPLE, 0, -SIZE_MULTIPLE):
        if image_regions(size, (side, side), val_split):
            return side
    return 0


def region_length(side, val_split):
    """The shortest image side along which image_regions fits both regions of crops `side` long."""
    return next(n for n in count(side) if image_regions((n, 1), (side, side), val_split))


def region_cover(sizes, crop):
    """How many crops cover training regions of these sizes about once: their mean area over a crop's, 1 at least."""
    area = sum(h * w for h, w in sizes) / len(sizes)
    return max(1, round(area / (crop[0] * crop[1])))


def crops_per_epoch(sizes, crop, batch_size):
    """Random crops drawn from each training region (of these sizes) in an epoch: as many as cover it about once,
    and at least enough for MIN_STEPS batches over all of them, so that an epoch learns something between two
    validations (and advice's note on too few steps has nothing to say)."""
    return max(region_cover(sizes, crop), math.ceil(MIN_STEPS * batch_size / len(sizes)))


def windows(region, crop):
    """Crop-sized windows covering a region, overlapping where its size is no multiple of the crop's (a side shorter
    than the crop: one window as long as it): the validation split during training, which sees network inputs, so
    that val_iou is measured over the whole region and not its centre alone."""
    rows, cols = spans(region.top, region.size[0], crop[0]), spans(region.left, region.size[1], crop[1])
    return [Region(top, bottom, left, right) for top, bottom in rows for left, right in cols]


def spans(start, length, side):
    """(begin, end) of windows `side` long covering start .. start + length, evenly spaced, the last ending at its
    end; one window as long as it when it is shorter."""
    if length <= side:
        return [(start, start + length)]
    n = math.ceil(length / side)
    return [(start + b, start + b + side) for b in (round(k * (length - side) / (n - 1)) for k in range(n))]


def region_layout(ids, sizes, cfg, root):
    """[(image id, training Region, validation Region)] of each image for the config's crops and val_split; a
    UserError naming the first image too small for them, and the crop that would fit."""
    layout = []
    for i, size in zip(ids, sizes):
        regions = image_regions(size, (cfg["input_h"], cfg["input_w"]), cfg["val_split"])
        if regions is None:
            raise UserError(too_small(i, size, cfg, root, len(ids)))
        layout.append((i, *regions))
    return layout


def too_small(image, size, cfg, root, images):
    """The refusal of an image too small to hold a training and a validation region of the config's crops."""
    h, w = size
    rows = h >= w
    flag, side = ("--input_h", cfg["input_h"]) if rows else ("--input_w", cfg["input_w"])
    need = region_length(side, cfg["val_split"])
    fits = largest_crop(size, cfg["val_split"])
    train = images - math.ceil(cfg["val_split"] * images)
    return (f"{root} holds {images} image(s), too few to validate on whole images (--val_split {cfg['val_split']:g} "
            f"leaves {train} to train on), so a region of each image is held out for validation instead; {image} "
            f"({w}x{h}) is too small for that with {flag} {side}: a validation strip one crop deep at least and a "
            f"training strip that holds a crop, {REGION_MARGIN} px apart, need {need} px along its "
            f"{'height' if rows else 'width'}. " +
            (f"Train on smaller crops ({flag} {fits} or less), or add images" if fits else "Add images"))


def region_views(data, train, val, cfg):
    """(training, validation) SegmentationData of the regions `train` and `val` ([(image id, Region)]): each training
    region crops_per_epoch times (the loader draws a random crop from each copy), and the windows of each validation
    region; both record the regions themselves for split.csv."""
    crop = (cfg["input_h"], cfg["input_w"])
    copies = crops_per_epoch([r.size for _, r in train], crop, cfg["batch_size"])
    return (data.views([p for _ in range(copies) for p in train], recorded=[region_id(*p) for p in train]),
            data.views([(i, w) for i, r in val for w in windows(r, crop)], recorded=[region_id(*p) for p in val]))


def regions_said(pairs, copies, cfg):
    """Where a split by regions lies, in words (the plan's line and train.py's): pairs [(training Region, validation
    Region)], one per image; `copies` random crops an epoch from each training region."""
    t, v = pairs[0]
    crops = f"{copies} random {cfg['input_w']}x{cfg['input_h']} crops an epoch"
    if any(p != pairs[0] for p in pairs) or (v.top > 0) == (v.left > 0):
        return (f"validation on a strip across the end of each image's longer side (its bottom rows, or its right "
                f"columns when it is wider than high: {cfg['val_split']:.0%} of it, one crop deep at least), training "
                f"on {crops} from the other end of each, {REGION_MARGIN} px apart from it")
    which = "the image" if len(pairs) == 1 else f"each of the {len(pairs)} images"
    if v.top > 0:
        return (f"validation on the bottom {v.size[0]} rows of {which} ({v.size[0] / v.bottom:.0%}), training on "
                f"{crops} from the top {t.bottom} rows, {v.top - t.bottom} rows apart from them")
    return (f"validation on the right {v.size[1]} columns of {which} ({v.size[1] / v.right:.0%}), training on "
            f"{crops} from the left {t.right} columns, {v.left - t.right} columns apart from them")


def region_note(train, val, cfg):
    """train.py's line on a split by regions ('' for a split of whole images)."""
    if all(r is None for r in val.regions):
        return ""
    trained = dict(parse_region_id(i) for i in train.recorded_ids)
    pairs = [(trained.get(image), region) for image, region in map(parse_region_id, val.recorded_ids)]
    if any(t is None or v is None for t, v in pairs):       # a split.csv edited by hand: no words for it
        return ""
    copies = len(train.ids) // len(train.recorded_ids)
    images = "1 image" if len(pairs) == 1 else f"{len(pairs)} images"
    return (f"split by regions ({images}, too few to validate on whole images): "
            f"{regions_said(pairs, copies, cfg)}; split.csv records the regions, and val.py scores the validation "
            "regions")


def resolve(ids, present):
    """split.csv ids -> [(image id, Region or None)] of those whose image is in `present`: an id that is an image's
    own is that whole image (even one named like a region), else '<image id>@y..' is that region of the image."""
    found = []
    for i in ids:
        image, region = (i, None) if i in present else parse_region_id(i)
        if image in present:
            found.append((image, region))
    return found


def image_of(i, present):
    """The image a split.csv id names (itself, or the image of its region)."""
    return i if i in present else parse_region_id(i)[0]


def load_validation(cfg, recorded):
    """The images (or regions of images) to evaluate runs on, decoded (only those). recorded: per run, its split.csv
    ({'train', 'val'}), or None for a run from before it was recorded (then the split of the files present). One run:
    its validation images or regions; several (an ensemble): those none of them trained on. -> (data, a note on files
    added or removed since the run trained, or '')."""
    root, targets = os.path.join(cfg["data_dir"], cfg["dataset"]), Targets.of(cfg)
    scanned = scan(root, cfg["img_ext"], cfg["mask_ext"], cfg["num_classes"], objects=targets.objects)
    splits = [r or present_split(scanned, cfg, root) for r in recorded]
    note = ""
    if len(splits) > 1:
        entries = unseen(splits, scanned)
    else:
        entries = resolve(splits[0]["val"], scanned)
        known = {image_of(i, scanned) for i in splits[0]["train"] + splits[0]["val"]}
        added, removed = len(set(scanned) - known), len(known - set(scanned))
        if added or removed:
            note = (f"{root} has {added} image(s) more and {removed} fewer than when the run trained; evaluating the "
                    f"{len(entries)} of its {len(splits[0]['val'])} recorded validation images still there")
    if not entries:
        raise DataError(f"none of the images to evaluate on is in {root} (the run's validation images, or with several "
                        "runs the images none of them trained on)", setting="data", path=root)
    data = SegmentationData.decode({i: scanned[i] for i in dict.fromkeys(i for i, _ in entries)}, cfg["input_channels"],
                                   cache_budget(cfg["cache_mb"]), root, targets=targets)
    check_inside(data, entries)
    return data.views(entries), note


def present_split(scanned, cfg, root):
    """The split ({'train', 'val'} of ids) a run without split.csv made of the images present: by whole images, or
    by regions (uses_regions; their sizes are read for it)."""
    if not uses_regions(len(scanned), cfg):
        return dict(zip(("train", "val"), split_for(list(scanned), cfg)))
    sizes = [read_image(sample.image, cfg["input_channels"]).shape[:2] for sample in scanned.values()]
    layout = region_layout(list(scanned), sizes, cfg, root)
    return {"train": [region_id(i, r) for i, r, _ in layout], "val": [region_id(i, r) for i, _, r in layout]}


def unseen(splits, present):
    """An ensemble's images to evaluate on, [(image id, Region or None)]: the whole images and the runs' validation
    regions that none of the runs trained on a pixel of."""
    trained = {}
    for s in splits:
        for i, region in resolve(s["train"], present):
            trained.setdefault(i, []).append(region)
    order = {i: k for k, i in enumerate(present)}
    candidates = sorted([(i, None) for i in present] + [e for s in splits for e in resolve(s["val"], present)],
                        key=lambda e: order[e[0]])                                 # the images' order, as scanned
    return list(dict.fromkeys((i, r) for i, r in candidates if not any(
        t is None or r is None or t.overlaps(r) for t in trained.get(i, ()))))


def check_inside(data, entries):
    """A DataError for a recorded region that is no longer inside its image (the image changed since)."""
    size = dict(zip(data.ids, data.sizes))
    for i, region in entries:
        if region is not None and not region.inside(size[i]):
            h, w = size[i]
            raise DataError(f"the run's split.csv names the region {region_id(i, region)} of the image {i}, which is "
                            f"{w}x{h} now: the image changed since the run started. Start a new run on it (another "
                            "--name)")


def split(data, cfg, root="the data set"):
    """(train, validation) SegmentationData of `data`, split by the config's val_split and split_seed (and fold), or
    by regions of each image when it has too few images for that (uses_regions)."""
    if uses_regions(len(data.ids), cfg):
        layout = region_layout(data.ids, data.sizes, cfg, root)
        return region_views(data, [(i, r) for i, r, _ in layout], [(i, r) for i, _, r in layout], cfg)
    train_ids, val_ids = split_for(data.ids, cfg)
    return data.subset(train_ids), data.subset(val_ids)


def recorded_split(data, train, val, cfg):
    """(train, validation) SegmentationData of a resumed run's recorded split ([(image id, Region or None)]): its
    whole images, or its regions as region_views makes them (a whole image among regions: all of it)."""
    check_inside(data, train + val)
    if all(r is None for _, r in train + val):
        return data.views(train), data.views(val)
    size = dict(zip(data.ids, data.sizes))
    whole = lambda i, r: (i, r or Region(0, size[i][0], 0, size[i][1]))   # noqa: E731
    return region_views(data, [whole(*p) for p in train], [whole(*p) for p in val], cfg)


def load_splits(cfg, *, recorded=None):
    """The config's data set, validated and decoded, as (train, validation): the split train.py and bench.py
    use. recorded: a resumed run's split.csv ({'train', 'val'}): then its split of the images still there, never a
    new one (images added since are left out, so no validation image is ever trained on)."""
    root, targets = os.path.join(cfg["data_dir"], cfg["dataset"]), Targets.of(cfg)
    scanned = scan(root, cfg["img_ext"], cfg["mask_ext"], cfg["num_classes"], objects=targets.objects)
    if recorded is not None:
        note = split_changes(root, recorded, scanned)
        if note:
            warnings.warn(note, stacklevel=2)
        train, val = resolve(recorded["train"], scanned), resolve(recorded["val"], scanned)
        if not train or not val:
            raise DataError(f"{root} no longer holds the run's training or validation images (its split.csv); "
                            "start a new run on the data set as it is now (another --name)", path=root)
        scanned = {i: scanned[i] for i in dict.fromkeys(i for i, _ in train + val)}
    data = SegmentationData.decode(scanned, cfg["input_channels"], cache_budget(cfg["cache_mb"]), root,
                                   targets=targets)
    check_foreground(data.target_pixels.sum(0), root, cfg["class_mode"], targets.objects)
    check_blank(data, root, cfg["class_mode"])
    if recorded is not None:
        return recorded_split(data, train, val, cfg)
    return split(data, cfg, root)


def split_changes(root, recorded, present):
    """A note on a resumed run's images added or removed since it started ('' if none)."""
    known = {image_of(i, present) for i in recorded["train"] + recorded["val"]}
    added, removed = len(set(present) - known), len(known - set(present))
    if not (added or removed):
        return ""
    return (f"{root} has {added} image(s) more and {removed} fewer than when the run started; it goes on with its "
            "recorded split (split.csv) of the images still there" + (": the new ones are left out (start a new run "
            "to train on them)" if added else ""))
