"""The train/validation split (the reference's), k folds inside its training part, and loading the data set as
the split that train.py and bench.py train on or the images val.py and export.py evaluate on."""
import os
import warnings

import numpy as np

from dataerror import DataError
from dataset import SegmentationData, Targets, cache_budget, check_blank, check_foreground
from pairing import scan
from utils import UserError


def split_ids(ids, val_split, split_seed):
    """(train_ids, val_ids) exactly as the reference (sorted ids, scikit-learn's train_test_split with
    random_state=split_seed): one permutation of a NumPy RandomState seeded so, its first ceil(val_split * n)
    positions for validation. Written here because importing scikit-learn for it cost ~1 s of every start-up;
    tests/test_splits.py checks it against scikit-learn."""
    n_val = int(np.ceil(val_split * len(ids))) if val_split > 0 else 0
    if n_val < 1 or n_val >= len(ids):
        few = (" With one or two large images, cut each into several image files (tiles, each with its mask) so "
               "that some train and some validate." if len(ids) < 3 else "")
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


def load_validation(cfg, recorded):
    """The images to evaluate runs on, decoded (only those). recorded: per run, its split.csv ({'train', 'val'}), or
    None for a run from before it was recorded (then the split of the files present). One run: its validation
    images; several (an ensemble): the images none of them trained on. -> (data, a note on files added or
    removed since the run trained, or '')."""
    root, targets = os.path.join(cfg["data_dir"], cfg["dataset"]), Targets.of(cfg)
    scanned = scan(root, cfg["img_ext"], cfg["mask_ext"], cfg["num_classes"], objects=targets.objects)
    splits = [r or dict(zip(("train", "val"), split_for(list(scanned), cfg))) for r in recorded]
    if len(splits) > 1:
        seen = set().union(*(r["train"] for r in splits))
        val_ids, note = [i for i in scanned if i not in seen], ""
    else:
        val_ids, note = [i for i in splits[0]["val"] if i in scanned], ""
        known = set(splits[0]["train"]) | set(splits[0]["val"])
        added, removed = len(set(scanned) - known), len(known - set(scanned))
        if added or removed:
            note = (f"{root} has {added} image(s) more and {removed} fewer than when the run trained; evaluating the "
                    f"{len(val_ids)} of its {len(splits[0]['val'])} recorded validation images still there")
    if not val_ids:
        raise DataError(f"none of the images to evaluate on is in {root} (the run's validation images, or with several "
                        "runs the images none of them trained on)", setting="data", path=root)
    data = SegmentationData.decode({i: scanned[i] for i in val_ids}, cfg["input_channels"],
                                   cache_budget(cfg["cache_mb"]), root, targets=targets)
    return data, note


def split(data, cfg):
    """(train, validation) SegmentationData of `data`, split by the config's val_split and split_seed (and fold)."""
    train_ids, val_ids = split_for(data.ids, cfg)
    return data.subset(train_ids), data.subset(val_ids)


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
        scanned = {i: scanned[i] for i in recorded["train"] + recorded["val"] if i in scanned}
        if not any(i in scanned for i in recorded["val"]) or not any(i in scanned for i in recorded["train"]):
            raise DataError(f"{root} no longer holds the run's training or validation images (its split.csv); "
                            "start a new run on the data set as it is now (another --name)", path=root)
    data = SegmentationData.decode(scanned, cfg["input_channels"], cache_budget(cfg["cache_mb"]), root,
                                   targets=targets)
    check_foreground(data.target_pixels.sum(0), root, cfg["class_mode"], targets.objects)
    check_blank(data, root, cfg["class_mode"])
    if recorded is not None:
        return data.subset([i for i in recorded["train"] if i in scanned]), \
            data.subset([i for i in recorded["val"] if i in scanned])
    return split(data, cfg)


def split_changes(root, recorded, present):
    """A note on a resumed run's images added or removed since it started ('' if none)."""
    known = set(recorded["train"]) | set(recorded["val"])
    added, removed = len(set(present) - known), len(known - set(present))
    if not (added or removed):
        return ""
    return (f"{root} has {added} image(s) more and {removed} fewer than when the run started; it goes on with its "
            "recorded split (split.csv) of the images still there" + (": the new ones are left out (start a new run "
            "to train on them)" if added else ""))
