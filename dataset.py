"""The data set: image/mask discovery, up-front validation, decoding into memory, the train/validation split.

Layout (as in the reference):
    <root>/images/<id><img_ext>
    <root>/masks/<class>/<id><mask_ext>      class = 0 .. num_classes-1

Every image and mask is decoded once, checked, and kept in memory (uint8), so an epoch never
decodes a file again and every problem with the data is reported before training starts.
Batching and augmentation are in loaders.py.
"""
import os
import warnings

import cv2
import numpy as np
from sklearn.model_selection import train_test_split

from utils import UserError

MAX_LISTED = 10                           # file names shown in one error message


def listing(names):
    """'a, b, c' with at most MAX_LISTED names, then '... and N more'."""
    names = sorted(names)
    shown = ", ".join(names[:MAX_LISTED])
    return shown + (f" ... and {len(names) - MAX_LISTED} more" if len(names) > MAX_LISTED else "")


def find_ids(folder, ext):
    """Sorted ids (file names without `ext`) in `folder`; an empty or wrong-extension folder is a UserError."""
    if not os.path.isdir(folder):
        raise UserError(f"folder {folder} does not exist; put your images there, or pass --data_dir/--dataset "
                        "(or --images) pointing at the folder that holds them")
    files = [f for f in os.listdir(folder) if not f.startswith(".")]
    ids = sorted(f[: -len(ext)] for f in files if f.endswith(ext) and os.path.isfile(os.path.join(folder, f)))
    if ids:
        return ids
    if not files:
        raise UserError(f"No input file found in {folder}, make sure you put your images there")
    found = sorted({os.path.splitext(f)[1] for f in files if os.path.splitext(f)[1]})
    raise UserError(f"no file ending in '{ext}' in {folder} (it holds files ending in {', '.join(found) or '(none)'}); "
                    f"pass the right extension, e.g. --img_ext {found[0] if found else '.png'}")


def decode(path):
    """cv2.imread with IMREAD_UNCHANGED; an unreadable, empty or truncated file is a UserError."""
    img = cv2.imread(path, cv2.IMREAD_UNCHANGED) if os.path.getsize(path) > 0 else None
    if img is None:
        raise UserError(f"cannot read image file {path}: it is empty, truncated or not an image. "
                        "Replace it or remove it (and its mask) from the data set.")
    return img


def read_image(path, input_channels):
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
        raise UserError(f"image {path} is in colour but --input_channels is 1; pass --input_channels 3, "
                        "or convert the images to grayscale first")
    raise UserError(f"image {path} has {img.shape[2]} channels; --input_channels must be 1 (grayscale) or 3 (RGB)")


def read_mask(path):
    """8-bit single-channel mask file -> uint8 (H, W) with its raw values."""
    m = decode(path)
    if m.dtype != np.uint8:
        raise UserError(f"mask {path} is {m.dtype}; masks must be 8-bit single-channel PNGs with foreground > 127. "
                        "Convert it (e.g. (mask > 0) * 255 as uint8).")
    if m.ndim == 3:
        raise UserError(f"mask {path} has {m.shape[2]} channels; masks must be 8-bit single-channel "
                        "(grayscale) with foreground > 127. Save it as grayscale.")
    return m


def class_folders(mask_root, num_classes):
    """Checks masks/0 .. masks/<num_classes-1> exist and no other class folder does."""
    if not os.path.isdir(mask_root):
        raise UserError(f"mask folder {mask_root} does not exist; put each class's masks in "
                        f"{mask_root}/<class>/ (class 0 .. num_classes-1), named like the images")
    present = sorted(d for d in os.listdir(mask_root) if os.path.isdir(os.path.join(mask_root, d)))
    expected = [str(c) for c in range(num_classes)]
    if present != expected:
        raise UserError(f"{mask_root} holds class folders [{', '.join(present)}] but --num_classes {num_classes} "
                        f"expects [{', '.join(expected)}]; pass --num_classes {len(present) or 1} or fix the folders")
    return [os.path.join(mask_root, c) for c in expected]


def check_pairs(image_ids, mask_dir, mask_ext):
    """Every image has a mask in mask_dir and every mask an image; mismatches listed by name."""
    mask_ids = set(find_ids(mask_dir, mask_ext))
    no_mask = set(image_ids) - mask_ids
    no_image = mask_ids - set(image_ids)
    if no_mask:
        raise UserError(f"{len(no_mask)} image(s) have no mask in {mask_dir}: {listing(no_mask)}. "
                        f"Add the masks (named <id>{mask_ext}) or remove those images.")
    if no_image:
        raise UserError(f"{len(no_image)} mask(s) in {mask_dir} have no image: {listing(no_image)}. "
                        "Add the images or remove those masks.")


class SegmentationData:
    """A validated data set: ids, and per image its uint8 (H, W, C_in) image and (H, W, C) 0/1 mask.

    Decoded images are cached in memory up to a byte budget; the rest are read from disk again
    when asked for (image(k), mask(k)), with the same result. masks is None for unlabeled images.
    """

    def __init__(self, ids, images, masks, paths=None, input_channels=3, threshold=127):
        self.ids, self.images, self.masks = ids, images, masks
        self.paths = paths                    # per image: (image path, [mask path per class]), for uncached reads
        self.input_channels, self.threshold = input_channels, threshold

    @classmethod
    def from_folder(cls, root, img_ext, mask_ext, num_classes, input_channels, cache_bytes=None):
        """Checks every file (decoding each once) and keeps the decoded arrays while they fit in cache_bytes."""
        if not os.path.isdir(root):
            raise UserError(f"data set folder {root} does not exist; create it with images/ and masks/0/ inside, "
                            "or pass --data_dir and --dataset so that <data_dir>/<dataset> is your data")
        ids = find_ids(os.path.join(root, "images"), img_ext)
        mask_dirs = class_folders(os.path.join(root, "masks"), num_classes)
        for d in mask_dirs:
            check_pairs(ids, d, mask_ext)
        images, masks, paths, used, peak = [], [], [], 0, 0
        for i in ids:
            img_path = os.path.join(root, "images", i + img_ext)
            mask_paths = [os.path.join(d, i + mask_ext) for d in mask_dirs]
            img = read_image(img_path, input_channels)
            planes = [read_mask(p) for p in mask_paths]
            for p, m in zip(mask_paths, planes):
                if m.shape != img.shape[:2]:
                    raise UserError(f"mask {p} is {m.shape[1]}x{m.shape[0]} but its image "
                                    f"{img_path} is {img.shape[1]}x{img.shape[0]}; masks must match their image's size")
            mask = np.stack(planes, axis=2)                        # (H, W, C) raw values
            peak = max(peak, int(mask.max()))
            keep = cache_bytes is None or used + img.nbytes + mask.nbytes <= cache_bytes
            used += (img.nbytes + mask.nbytes) if keep else 0
            images.append(img if keep else None)
            masks.append(mask if keep else None)
            paths.append((img_path, mask_paths))
        threshold = mask_threshold(peak, root)
        masks = [None if m is None else (m > threshold).astype(np.uint8) for m in masks]
        return cls(ids, images, masks, paths, input_channels, threshold)

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
        return read_image(self.paths[k][0], self.input_channels)

    def mask(self, k):
        """uint8 (H, W, C) of 0/1, from the cache or decoded from disk."""
        if self.masks[k] is not None:
            return self.masks[k]
        return (np.stack([read_mask(p) for p in self.paths[k][1]], axis=2) > self.threshold).astype(np.uint8)

    def subset(self, ids):
        index = {i: k for k, i in enumerate(self.ids)}
        pick = [index[i] for i in ids]
        return SegmentationData(list(ids), [self.images[k] for k in pick],
                                None if self.masks is None else [self.masks[k] for k in pick],
                                None if self.paths is None else [self.paths[k] for k in pick],
                                self.input_channels, self.threshold)


def mask_threshold(peak, root):
    """Foreground is > 127; a data set whose masks only hold 0/1 is accepted (> 0) with one warning."""
    if peak == 1:
        warnings.warn(f"the masks under {root}/masks hold only the values 0 and 1; reading 1 as foreground. "
                      "(The expected format is 0 = background, 255 = foreground.)", stacklevel=3)
        return 0
    return 127


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
    train_ids, val_ids = train_test_split(ids, test_size=val_split, random_state=split_seed)
    return train_ids, val_ids


def split(data, cfg):
    """(train, validation) SegmentationData of `data`, split by the config's val_split and split_seed."""
    train_ids, val_ids = split_ids(data.ids, cfg["val_split"], cfg["split_seed"])
    return data.subset(train_ids), data.subset(val_ids)


def load_splits(cfg):
    """The config's data set, validated and decoded, as (train, validation): the one split train.py,
    val.py and bench.py all use."""
    root = os.path.join(cfg["data_dir"], cfg["dataset"])
    data = SegmentationData.from_folder(root, cfg["img_ext"], cfg["mask_ext"], cfg["num_classes"],
                                        cfg["input_channels"], cache_budget(cfg["cache_mb"]))
    return split(data, cfg)
