"""The data set: image/mask discovery, up-front validation, decoding into memory, the train/validation split.

Layout (as in the reference):
    <root>/images/<id><img_ext>
    <root>/masks/<class>/<id><mask_ext>      class = 0 .. num_classes-1

Every image and mask is decoded once, checked, and kept in memory (uint8), so an epoch never
decodes a file again and every problem with the data is reported before training starts.
Batching and augmentation are in loaders.py.
"""
import importlib
import os
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor
from itertools import repeat

import cv2
import numpy as np

from utils import UserError

# How the running script lets a user change each data setting: a message names only what that script accepts.
# '{}' is filled with the suggested value. val.py and bench.py pass their own.
TRAIN_HINTS = {
    "data": "pass --data_dir and --dataset so that <data_dir>/<dataset> is the folder with images/ and masks/",
    "img_ext": "pass --img_ext {}",
    "mask_ext": "pass --mask_ext {}",
    "input_channels": "pass --input_channels {} (or convert the images to grayscale first)",
    "num_classes": "pass --num_classes {}",
}

MAX_LISTED = 10                           # file names shown in one error message
DECODE_THREADS = min(8, (os.cpu_count() or 1) + 1)   # decoding and checking files in parallel
DECODE_CHUNK = 256                        # files decoded per round, so --cache_mb bounds the peak memory too


def listing(names):
    """'a, b, c' with at most MAX_LISTED names, then '... and N more'."""
    names = sorted(names)
    shown = ", ".join(names[:MAX_LISTED])
    return shown + (f" ... and {len(names) - MAX_LISTED} more" if len(names) > MAX_LISTED else "")


def find_ids(folder, ext, hints, ext_key="img_ext"):
    """Sorted ids (file names without `ext`) in `folder`; an empty or wrong-extension folder is a UserError.
    ext_key: the setting `ext` came from (img_ext or mask_ext), which the message suggests changing."""
    if not os.path.isdir(folder):
        raise UserError(f"folder {folder} does not exist; put your files there, or {hints['data']}")
    files = [f for f in os.listdir(folder) if not f.startswith(".")]
    ids = sorted(f[: -len(ext)] for f in files if f.endswith(ext) and os.path.isfile(os.path.join(folder, f)))
    if ids:
        return ids
    if not files:
        raise UserError(f"No input file found in {folder}, make sure you put your images there")
    found = sorted({os.path.splitext(f)[1] for f in files if os.path.splitext(f)[1]})
    fix = hints[ext_key].format(found[0] if found else ".png")
    raise UserError(f"no file ending in '{ext}' in {folder} (it holds files ending in {', '.join(found) or '(none)'}); "
                    f"{fix} if that is the extension of your {'masks' if ext_key == 'mask_ext' else 'images'}")


def decode(path):
    """cv2.imread with IMREAD_UNCHANGED; an unreadable, empty or truncated file is a UserError."""
    img = cv2.imread(path, cv2.IMREAD_UNCHANGED) if os.path.getsize(path) > 0 else None
    if img is None:
        raise UserError(f"cannot read image file {path}: it is empty, truncated or not an image. "
                        "Replace it or remove it (and its mask) from the data set.")
    return img


def read_image(path, input_channels, hints):
    """8-bit grayscale/RGB/RGBA file -> uint8 (H, W, input_channels), RGB order, alpha dropped."""
    img = decode(path)
    if img.dtype != np.uint8:
        raise UserError(f"image {path} is {img.dtype}, not 8-bit; convert your images to 8-bit "
                        "(e.g. scale 16-bit microscopy to 0..255) before training")
    if img.ndim == 3 and img.shape[2] == 4:
        img = img[:, :, :3]                                   # drop alpha
    if img.ndim == 3 and img.shape[2] == 3:
        img = cv2.cvtColor(img, cv2.COLOR_BGR2RGB)
    if img.ndim == 2:
        img = img[:, :, None]
    if img.shape[2] == input_channels:
        return np.ascontiguousarray(img)
    if input_channels == 3 and img.shape[2] == 1:
        return np.repeat(img, 3, axis=2)                      # grayscale replicated
    if input_channels == 1 and img.shape[2] == 3:
        if (img[:, :, 0] == img[:, :, 1]).all() and (img[:, :, 1] == img[:, :, 2]).all():
            return np.ascontiguousarray(img[:, :, :1])        # grayscale stored as RGB
        raise UserError(f"image {path} is in colour but input_channels is 1: {hints['input_channels'].format(3)}")
    raise UserError(f"image {path} has {img.shape[2]} channels; images must be grayscale (1 channel), RGB or RGBA")


def read_mask(path):
    """8-bit single-channel mask file -> uint8 (H, W) with its raw values."""
    m = decode(path)
    if m.dtype != np.uint8:
        raise UserError(f"mask {path} is {m.dtype}; masks must be 8-bit single-channel PNGs with foreground > 127. "
                        "Convert it (e.g. (mask > 0) * 255 as uint8).")
    if m.ndim == 3 and is_palette_png(path):
        raise UserError(f"mask {path} is a palette (indexed-colour) PNG; masks must be 8-bit grayscale with "
                        "foreground > 127. Save it as grayscale, one mask per class (e.g. with PIL: "
                        "Image.fromarray(((np.array(Image.open(p)) == k) * 255).astype('uint8')) for class k).")
    if m.ndim == 3:
        raise UserError(f"mask {path} has {m.shape[2]} channels; masks must be 8-bit single-channel "
                        "(grayscale) with foreground > 127. Save it as grayscale.")
    return m


def read_instances(path, size):
    """A label image (8- or 16-bit, single channel, 0 background, one number per object) of size (H, W) -> int64
    labels renumbered 1..N."""
    labels = decode(path)
    if labels.dtype not in (np.uint8, np.uint16) or labels.ndim != 2:
        raise UserError(f"instance labels {path} are {labels.dtype} with {labels.shape[2] if labels.ndim == 3 else 1} "
                        "channels; they must be 8- or 16-bit single-channel PNGs (0 background, 1..N one per object)")
    if labels.shape != size:
        raise UserError(f"instance labels {path} are {labels.shape[1]}x{labels.shape[0]} but the image is "
                        f"{size[1]}x{size[0]}; they must match their image's size")
    _, inverse = np.unique(labels, return_inverse=True)
    renumbered = inverse.reshape(labels.shape).astype(np.int64)
    return renumbered if labels.min() == 0 else renumbered + 1     # keep 0 as the background


def is_palette_png(path):
    """Whether the file is a PNG whose colour type (byte 25 of its IHDR) is 3: indexed colour with a palette."""
    with open(path, "rb") as f:
        head = f.read(26)
    return head[:8] == b"\x89PNG\r\n\x1a\n" and len(head) == 26 and head[25] == 3


def binarize_mask(m, path):
    """Raw 8-bit mask -> (0/1 uint8 mask, whether it was stored as 0/1). Decided per mask: foreground is > 127,
    or 1 in a mask that holds only 0 and 1; a mask whose largest value is 2..127 would read as empty: refused."""
    top = int(m.max())
    if top <= 1:
        return m.astype(np.uint8), top == 1
    if top <= 127:
        raise UserError(f"mask {path} has no value above 127 (its largest is {top}), so it would be read as empty. "
                        "Masks mark foreground with values > 127 (e.g. 255) or hold only 0 and 1; values such as "
                        "1, 2, 3 look like class labels: put one 0/255 mask per class in masks/<class>/ instead.")
    return (m > 127).astype(np.uint8), False


def read_masks(mask_paths, img_path, size):
    """[mask path per class] of the image img_path of size (H, W) -> (0/1 uint8 (H, W, C), whether any was
    stored as 0/1)."""
    planes = []
    for p in mask_paths:
        m = read_mask(p)
        if m.shape != size:
            raise UserError(f"mask {p} is {m.shape[1]}x{m.shape[0]} but its image {img_path} is "
                            f"{size[1]}x{size[0]}; masks must match their image's size")
        planes.append(binarize_mask(m, p))
    return np.stack([m for m, _ in planes], axis=2), any(zero_one for _, zero_one in planes)


def read_pair(paths, input_channels, hints):
    """(image path, [mask path per class]) -> checked uint8 image (H, W, C_in), 0/1 mask (H, W, C), whether a
    mask was stored as 0/1."""
    img_path, mask_paths = paths
    img = read_image(img_path, input_channels, hints)
    return (img, *read_masks(mask_paths, img_path, img.shape[:2]))


def class_folders(mask_root, num_classes, hints):
    """Checks masks/0 .. masks/<num_classes-1> exist and no other class folder does."""
    if not os.path.isdir(mask_root):
        raise UserError(f"mask folder {mask_root} does not exist; put each class's masks in "
                        f"{mask_root}/<class>/ (class 0 .. num_classes-1), named like the images")
    present = sorted((d for d in os.listdir(mask_root)   # hidden folders (.ipynb_checkpoints...) are not classes
                      if os.path.isdir(os.path.join(mask_root, d)) and not d.startswith(".")),
                     key=lambda d: (not d.isdigit(), int(d) if d.isdigit() else 0, d))   # 2 before 10
    expected = [str(c) for c in range(num_classes)]
    if present != expected:
        numbered = present == [str(c) for c in range(len(present))] and present
        fix = hints["num_classes"].format(len(present)) if numbered else "name the class folders 0, 1, 2, ... (one per class)"
        raise UserError(f"{mask_root} holds class folders [{', '.join(present)}] but num_classes {num_classes} "
                        f"expects [{', '.join(expected)}]; {fix}")
    return [os.path.join(mask_root, c) for c in expected]


def check_pairs(image_ids, mask_dir, mask_ext, hints):
    """Every image has a mask in mask_dir and every mask an image; mismatches listed by name."""
    mask_ids = set(find_ids(mask_dir, mask_ext, hints, "mask_ext"))
    no_mask = set(image_ids) - mask_ids
    no_image = mask_ids - set(image_ids)
    if no_mask:
        raise UserError(f"{len(no_mask)} image(s) have no mask in {mask_dir}: {listing(no_mask)}. "
                        f"Add the masks (named <id>{mask_ext}) or remove those images.")
    if no_image:
        raise UserError(f"{len(no_image)} mask(s) in {mask_dir} have no image: {listing(no_image)}. "
                        "Add the images or remove those masks.")


def scan(root, img_ext, mask_ext, num_classes, hints):
    """Finds the data set's files and checks that they pair up -> {id: (image path, [mask path per class])},
    ids sorted. Nothing is decoded yet."""
    if not os.path.isdir(root):
        raise UserError(f"data set folder {root} does not exist; create it with images/ and masks/0/ inside, "
                        f"or {hints['data']}")
    ids = find_ids(os.path.join(root, "images"), img_ext, hints)
    mask_dirs = class_folders(os.path.join(root, "masks"), num_classes, hints)
    for d in mask_dirs:
        check_pairs(ids, d, mask_ext, hints)
    if os.path.isdir(os.path.join(root, "instances")):      # optional nucleus labels (val.py --instances)
        check_pairs(ids, os.path.join(root, "instances"), mask_ext, hints)
    return {i: (os.path.join(root, "images", i + img_ext), [os.path.join(d, i + mask_ext) for d in mask_dirs])
            for i in ids}


class SegmentationData:
    """A validated data set: ids, and per image its uint8 (H, W, C_in) image and (H, W, C) 0/1 mask.

    Decoded images are cached in memory up to a byte budget; the rest are read from disk again
    when asked for (image(k), mask(k)), with the same result. masks is None for unlabeled images.
    """

    def __init__(self, ids, images, masks, paths=None, input_channels=3, hints=None):
        self.ids, self.images, self.masks = ids, images, masks
        self.paths = paths                    # per image: (image path, [mask path per class]), for uncached reads
        self.input_channels = input_channels
        self.hints = hints or TRAIN_HINTS
        self.instance_dir = None              # <root>/instances when the data set has nucleus labels

    @classmethod
    def from_folder(cls, root, img_ext, mask_ext, num_classes, input_channels, cache_bytes=None):
        """Checks every file (decoding each once) and keeps the decoded arrays while they fit in cache_bytes.
        Messages name train.py's flags; other scripts call decode(scan(..., hints), ...) with their own hints."""
        scanned = scan(root, img_ext, mask_ext, num_classes, TRAIN_HINTS)
        return cls.decode(scanned, input_channels, cache_bytes, root, TRAIN_HINTS)

    @classmethod
    def decode(cls, scanned, input_channels, cache_bytes, root, hints):
        """scan()'s {id: (image path, [mask paths])} -> the checked, decoded data set (cached up to cache_bytes)."""
        ids, paths = list(scanned), list(scanned.values())
        images, masks, zero_one, used = [], [], [], 0
        with ThreadPoolExecutor(DECODE_THREADS) as pool:   # OpenCV decodes without the GIL: threads run in parallel
            for start in range(0, len(ids), DECODE_CHUNK):
                chunk = pool.map(read_pair, paths[start:start + DECODE_CHUNK], repeat(input_channels), repeat(hints))
                for i, (img, mask, was_zero_one) in zip(ids[start:], chunk):
                    keep = cache_bytes is None or used + img.nbytes + mask.nbytes <= cache_bytes
                    used += (img.nbytes + mask.nbytes) if keep else 0
                    images.append(img if keep else None)
                    masks.append(mask if keep else None)
                    zero_one += [i] if was_zero_one else []
        warn_zero_one(zero_one, len(ids), root)
        data = cls(ids, images, masks, paths, input_channels, hints)
        data.instance_dir = os.path.join(root, "instances") if os.path.isdir(os.path.join(root, "instances")) else None
        return data

    @property
    def labeled(self):
        return self.masks is not None

    @property
    def fully_cached(self):
        return all(i is not None for i in self.images)

    def image(self, k):
        """uint8 (H, W, C_in), from the cache or decoded from disk."""
        if self.images[k] is not None:
            return self.images[k]
        return read_image(self.paths[k][0], self.input_channels, self.hints)

    def mask(self, k):
        """uint8 (H, W, C) of 0/1, from the cache or decoded from disk."""
        if self.masks[k] is not None:
            return self.masks[k]
        img_path, mask_paths = self.paths[k]
        return read_masks(mask_paths, img_path, cv2.imread(img_path, cv2.IMREAD_UNCHANGED).shape[:2])[0]

    def instances(self, k):
        """int64 (H, W) object labels of image k (0 background, 1..N): its instances/ file when the data set has
        one, else the connected components of its first mask."""
        if self.instance_dir is None:
            from scipy import ndimage
            return ndimage.label(self.mask(k)[:, :, 0])[0].astype(np.int64)
        ext = os.path.splitext(self.paths[k][1][0])[1]
        return read_instances(os.path.join(self.instance_dir, self.ids[k] + ext), self.image(k).shape[:2])

    def subset(self, ids):
        index = {i: k for k, i in enumerate(self.ids)}
        pick = [index[i] for i in ids]
        data = SegmentationData(list(ids), [self.images[k] for k in pick],
                                None if self.masks is None else [self.masks[k] for k in pick],
                                None if self.paths is None else [self.paths[k] for k in pick],
                                self.input_channels, self.hints)
        data.instance_dir = self.instance_dir
        return data


def warn_zero_one(ids, total, root):
    """One warning for the masks stored as 0/1 (read with 1 as foreground), with their count and examples."""
    if not ids:
        return
    which = "all masks" if len(ids) == total else f"{len(ids)} of {total} images' masks (e.g. {listing(ids[:3])})"
    warnings.warn(f"{which} under {root}/masks hold only the values 0 and 1; reading 1 as foreground there. "
                  "(The expected format is 0 = background, 255 = foreground.)", stacklevel=3)


def cache_budget(cache_mb):
    """--cache_mb -> bytes; 0 = automatic: half the memory available now, shared by this node's processes."""
    if cache_mb > 0:
        return int(cache_mb * 2**20)
    available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return available // 2 // int(os.environ.get("LOCAL_WORLD_SIZE", "1"))


def split_ids(ids, val_split, split_seed):
    """(train_ids, val_ids) exactly as the reference: sorted ids, sklearn's train_test_split."""
    n_val = int(np.ceil(val_split * len(ids))) if val_split > 0 else 0
    if n_val < 1 or n_val >= len(ids):
        raise UserError(f"--val_split {val_split} on {len(ids)} images leaves {n_val} validation and "
                        f"{len(ids) - n_val} training images; both need at least one. Add images or change --val_split.")
    from sklearn.model_selection import train_test_split   # ~1.3 s to import: see load_splits
    train_ids, val_ids = train_test_split(ids, test_size=val_split, random_state=split_seed)
    return train_ids, val_ids


def fold_ids(ids, folds, fold, split_seed):
    """K-fold inside `ids` (the training split): (the other folds' ids, fold `fold`'s ids), with scikit-learn's
    KFold (shuffled with split_seed), so that fold i's images are the same in every run of the K."""
    if folds > len(ids):
        raise UserError(f"--folds {folds} on a training split of {len(ids)} images leaves empty folds; use --folds "
                        f"{len(ids)} or fewer")
    from sklearn.model_selection import KFold
    train_idx, val_idx = list(KFold(folds, shuffle=True, random_state=split_seed).split(ids))[fold]
    return [ids[k] for k in train_idx], [ids[k] for k in val_idx]


def split_for(ids, cfg):
    """The config's (train ids, validation ids): the val_split/split_seed split of the sorted ids, and with
    --folds K, fold --fold of its training part as the validation set (the held-out split stays unseen)."""
    train_ids, val_ids = split_ids(ids, cfg["val_split"], cfg["split_seed"])
    if cfg["folds"] > 1:
        train_ids, val_ids = fold_ids(train_ids, cfg["folds"], cfg["fold"], cfg["split_seed"])
    return train_ids, val_ids


def import_sklearn_split():
    """Imports scikit-learn's model_selection for split_ids(), ahead of time (run in a thread)."""
    importlib.import_module("sklearn.model_selection")


def load_validation(cfg, recorded, hints):
    """The images to evaluate runs on, decoded (only those). recorded: per run, its split.csv ({'train', 'val'}), or
    None for a run from before it was recorded (then the split of the files present). One run: its validation
    images; several (an ensemble): the images none of them trained on. -> (data, a note on files added or
    removed since the run trained, or '')."""
    root = os.path.join(cfg["data_dir"], cfg["dataset"])
    scanned = scan(root, cfg["img_ext"], cfg["mask_ext"], cfg["num_classes"], hints)
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
        raise UserError(f"none of the images to evaluate on is in {root} (the run's validation images, or with several "
                        f"runs the images none of them trained on); {hints['data']}")
    data = SegmentationData.decode({i: scanned[i] for i in val_ids}, cfg["input_channels"],
                                   cache_budget(cfg["cache_mb"]), root, hints)
    return data, note


def split(data, cfg):
    """(train, validation) SegmentationData of `data`, split by the config's val_split and split_seed (and fold)."""
    train_ids, val_ids = split_for(data.ids, cfg)
    return data.subset(train_ids), data.subset(val_ids)


def load_splits(cfg, hints=None):
    """The config's data set, validated and decoded, as (train, validation): the split train.py and bench.py
    use. hints: how the running script sets each data setting, for its messages (default: TRAIN_HINTS)."""
    root, hints = os.path.join(cfg["data_dir"], cfg["dataset"]), hints or TRAIN_HINTS
    # scikit-learn's import (for the split) runs in a thread while the files are decoded and checked
    threading.Thread(target=import_sklearn_split, daemon=True).start()
    scanned = scan(root, cfg["img_ext"], cfg["mask_ext"], cfg["num_classes"], hints)
    data = SegmentationData.decode(scanned, cfg["input_channels"], cache_budget(cfg["cache_mb"]), root, hints)
    return split(data, cfg)
