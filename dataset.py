"""The data set object: every image and its training target decoded once, checked, and cached in memory.

Every image and mask is decoded once (imagefiles.py), checked, and kept in memory in its own type (uint8, uint16
or float32: nothing is rounded to 8 bits) up to a byte budget, so an epoch never decodes a file again and every
problem with the data is reported before training starts. The target of an image (Targets) is its masks, or its
label image's foreground, or with --target objects its objects and their borders. Finding and pairing the files is
pairing.py, the splits splits.py; batching, augmentation and normalisation are in loaders.py and normalize.py.
"""
import os
import re
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from itertools import repeat

import numpy as np

from dataerror import DataError
from imagefiles import checked_labels, is_tiff, read_image, read_labels, read_masks
from pairing import listing, scan

DECODE_THREADS = min(8, (os.cpu_count() or 1) + 1)   # decoding and checking files in parallel
DECODE_CHUNK = 256                        # files decoded per round, so --cache_mb bounds the peak memory too
TARGETS = ("masks", "objects")            # the config's target: what the network learns (Targets)
OBJECT_PLANES = ("objects", "borders")    # --target objects: its two planes (instances.object_targets)
BORDER_RADIUS = 1                         # --target objects: border half-width, in pixels of the network input
MOSTLY_EMPTY = 0.5                        # a warning when more than this share of the images' targets mark nothing
REGION_ID = re.compile(r"^(?P<image>.+)@y(?P<top>\d+)-(?P<bottom>\d+)_x(?P<left>\d+)-(?P<right>\d+)$")  # region_id()


@dataclass(frozen=True)
class Region:
    """A rectangle of an image: rows top .. bottom - 1, columns left .. right - 1 (the ends excluded, as in slices)."""
    top: int
    bottom: int
    left: int
    right: int

    @property
    def size(self):
        return self.bottom - self.top, self.right - self.left

    def cut(self, array):
        """The region of an (H, W, ...) array: a view, not a copy."""
        return array[self.top:self.bottom, self.left:self.right]

    def inside(self, size):
        return 0 <= self.top < self.bottom <= size[0] and 0 <= self.left < self.right <= size[1]

    def overlaps(self, other):
        return (self.top < other.bottom and other.top < self.bottom and self.left < other.right
                and other.left < self.right)


def region_id(image_id, region):
    """The id of a region of an image, as split.csv and val.py's files name it: '<image id>@y<top>-<bottom>_x<left>-
    <right>' (e.g. 'cells@y208-256_x0-256', the last 48 rows); the image id itself for the whole image (None)."""
    if region is None:
        return image_id
    return f"{image_id}@y{region.top}-{region.bottom}_x{region.left}-{region.right}"


def parse_region_id(text):
    """region_id()'s text -> (image id, Region), or (text, None) when it names no region."""
    found = REGION_ID.match(text)
    if not found:
        return text, None
    top, bottom, left, right = (int(found[k]) for k in ("top", "bottom", "left", "right"))
    if top >= bottom or left >= right:
        return text, None
    return found["image"], Region(top, bottom, left, right)



@dataclass
class Targets:
    """What an image's training target is, from the run's config (Targets.of): its masks, made exclusive in
    softmax mode, or with invert their complement (--invert_mask: the pixels the one class's mask does not mark);
    or, with objects, the planes of instances.object_targets from its label image, the borders drawn
    BORDER_RADIUS pixels wide at the network's input (so wider at an image resized down to it: a border must not
    vanish in the resizing)."""
    softmax: bool = False
    objects: bool = False
    input_size: tuple = None     # (h, w) the images are resized to for the network; None: crops at their own size
    invert: bool = False         # the complement of the mask (one class)

    @classmethod
    def of(cls, cfg):
        objects = cfg.get("target") == "objects"
        return cls(cfg["class_mode"] == "softmax", objects,
                   (cfg["input_h"], cfg["input_w"]) if objects and not cfg["crop"] else None,
                   bool(cfg.get("invert_mask")))

    def border_radius(self, size):
        """The border half-width in the pixels of an image of size (H, W)."""
        if self.input_size is None:
            return BORDER_RADIUS
        return max(1, round(BORDER_RADIUS * max(size[0] / self.input_size[0], size[1] / self.input_size[1])))


def read_target(sample, size, targets=None):
    """-> (0/1 uint8 (H, W, C) target, whether a mask was stored as 0/1): the masks, or the label image's foreground;
    with targets.invert their complement; with targets.objects, the label image's objects and borders
    (instances.object_targets)."""
    if targets is not None and targets.objects:
        from instances import object_targets
        return object_targets(checked_labels(sample.labels, size), targets.border_radius(size)), False
    if sample.masks:
        mask, zero_one = read_masks(sample.masks, sample.image, size)
    else:
        mask, zero_one = (checked_labels(sample.labels, size) > 0).astype(np.uint8)[:, :, None], False
    return (1 - mask if targets is not None and targets.invert else mask), zero_one


def exclusive(mask):
    """(H, W, C) 0/1 masks -> (one-hot (H, W, C), whether two masks marked one pixel): softmax mode's target. Each
    pixel is the highest-numbered class whose mask marks it; a pixel no mask marks is class 0 (the background).
    The loss, the training metrics and val.py all see this target, so they score what the network is taught."""
    marked = mask.any(axis=2)
    index = np.where(marked, mask.shape[2] - 1 - np.argmax(mask[:, :, ::-1], axis=2), 0)
    return (index[:, :, None] == np.arange(mask.shape[2])).astype(np.uint8), bool((mask.sum(2) > 1).any())


def read_pair(sample, input_channels, targets=None):
    """A Sample -> checked image (H, W, C_in) in its own type, 0/1 target (H, W, C), whether a mask was stored as 0/1."""
    img = read_image(sample.image, input_channels)
    return (img, *read_target(sample, img.shape[:2], targets))


class SegmentationData:
    """A validated data set: ids, and per image its (H, W, C_in) image in its own type (uint8, uint16 or float32)
    and (H, W, C) 0/1 uint8 target.

    Decoded images are cached in memory up to a byte budget; the rest are read from disk again
    when asked for (image(k), mask(k)), with the same result. masks is None for unlabeled images.
    dtypes: the image types present (what --normalize auto decides by).
    """

    def __init__(self, ids, images, masks, samples=None, input_channels=3):
        self.ids, self.images, self.masks = ids, images, masks
        self.samples = samples                # per image its Sample, for uncached reads and label images
        self.input_channels = input_channels
        self.dtypes = {im.dtype for im in images if im is not None}   # decode() adds those of uncached images
        self.targets = Targets()              # decode(): what each image's target is (softmax, objects)
        self.target_pixels = None             # decode(): (N, C) foreground pixels of each image's target
        self.sizes = None                     # decode(): each image's (H, W)
        self.flat = []                        # decode(): the ids of the images of one value throughout (blank)
        self.regions = [None] * len(ids)      # views(): per entry the Region of its image it is, None: the whole image
        self.recorded = None                  # views(): the ids split.csv records for it (recorded_ids)

    @classmethod
    def from_folder(cls, root, img_ext, mask_ext, num_classes, input_channels, cache_bytes=None):
        """Checks every file (decoding each once) and keeps the decoded arrays while they fit in cache_bytes."""
        return cls.decode(scan(root, img_ext, mask_ext, num_classes), input_channels, cache_bytes, root)

    @classmethod
    def decode(cls, scanned, input_channels, cache_bytes, root, *, targets=Targets()):
        """scan()'s {id: Sample} -> the checked, decoded data set (cached up to cache_bytes). targets.softmax: the
        targets are made exclusive (exclusive()), with one warning for the images where masks overlap;
        targets.objects: the objects and borders of each label image.
        data.target_pixels: per image and class, the target's foreground pixels; data.sizes: per image (H, W)."""
        ids, samples = list(scanned), list(scanned.values())
        images, masks, zero_one, dtypes, used = [], [], [], set(), 0
        overlapping, counts, sizes, flat = [], [], [], []
        # OpenCV decodes without the GIL: threads run in parallel. tifffile's parsing holds it, so TIFF files are
        # read in this thread (faster than threads contending for the GIL).
        threads = 1 if any(is_tiff(s.image) for s in samples[:1]) else DECODE_THREADS
        with ThreadPoolExecutor(threads) as pool:
            for start in range(0, len(ids), DECODE_CHUNK):
                chunk = pool.map(read_pair, samples[start:start + DECODE_CHUNK], repeat(input_channels),
                                 repeat(targets))
                for i, (img, mask, was_zero_one) in zip(ids[start:], chunk):
                    if targets.softmax:
                        mask, overlaps = exclusive(mask)
                        overlapping += [i] if overlaps else []
                    counts.append(mask.reshape(-1, mask.shape[2]).sum(0, dtype=np.int64))
                    sizes.append(img.shape[:2])
                    flat += [i] if img.min() == img.max() else []     # one value throughout: nothing to see
                    keep = cache_bytes is None or used + img.nbytes + mask.nbytes <= cache_bytes
                    used += (img.nbytes + mask.nbytes) if keep else 0
                    images.append(img if keep else None)
                    masks.append(mask if keep else None)
                    dtypes.add(img.dtype)
                    zero_one += [i] if was_zero_one else []
        warn_zero_one(zero_one, len(ids), root)
        if overlapping:
            warnings.warn(f"{len(overlapping)} of {len(ids)} images (e.g. {listing(overlapping[:3])}) have pixels that "
                          f"two class masks under {root}/masks mark; in softmax mode each pixel is one class, so "
                          "those count as the higher-numbered class (in training and in val.py alike)", stacklevel=3)
        data = cls(ids, images, masks, samples, input_channels)
        data.dtypes, data.targets = dtypes, targets
        data.target_pixels, data.sizes = np.array(counts, np.int64).reshape(len(ids), -1), sizes
        data.flat = flat
        return data

    @property
    def labeled(self):
        return self.masks is not None

    @property
    def fully_cached(self):
        return all(i is not None for i in self.images)

    def image(self, k):
        """(H, W, C_in) in the file's type, from the cache or decoded from disk (for a region view, its region)."""
        if self.images[k] is not None:
            return self.images[k]
        return cut(read_image(self.samples[k].image, self.input_channels), self.regions[k])

    def whole_size(self, k):
        """(H, W) of the whole image entry k is (a region view's image, not the region)."""
        if self.regions[k] is None:
            return self.image(k).shape[:2]
        return read_image(self.samples[k].image, self.input_channels).shape[:2]

    def mask(self, k):
        """uint8 (H, W, C) of 0/1, from the cache or decoded from disk."""
        if self.masks[k] is not None:
            return self.masks[k]
        mask = read_target(self.samples[k], self.whole_size(k), self.targets)[0]   # made on the whole image, then cut
        return cut(exclusive(mask)[0] if self.targets.softmax else mask, self.regions[k])

    def instances(self, k):
        """int64 (H, W) object labels of image k (0 background, 1..N): its label image when the data set has
        them, else the connected components of its first mask. A region view: the objects of its region (an object
        the region's edge cuts keeps the part inside)."""
        if self.samples is None or self.samples[k].labels is None:
            from scipy import ndimage
            return ndimage.label(self.mask(k)[:, :, 0])[0].astype(np.int64)
        labels = read_labels(self.samples[k].labels, self.whole_size(k))
        return labels if self.regions[k] is None else consecutive(self.regions[k].cut(labels))

    @property
    def recorded_ids(self):
        """The ids split.csv records for this data set: its ids, or for views of regions (training crops drawn from
        a region several times an epoch, validation windows) the regions they are cut from, each once."""
        return list(self.recorded) if self.recorded is not None else list(dict.fromkeys(self.ids))

    def views(self, picks, recorded=None):
        """[(image id, Region or None)] -> a SegmentationData of those regions of this data set's images (None: the
        whole image; a region may be picked more than once), each named region_id(image id, region). The cached
        arrays are cut as views, never copied; sizes, target pixels and blank images are the regions'. recorded:
        the ids split.csv records for it (recorded_ids), if not these."""
        index = {i: k for k, i in enumerate(self.ids)}
        pick = [index[i] for i, _ in picks]
        regions = [r for _, r in picks]
        data = SegmentationData([region_id(i, r) for i, r in picks],
                                [None if self.images[k] is None else cut(self.images[k], r) for k, r in zip(pick, regions)],
                                None if self.masks is None else
                                [None if self.masks[k] is None else cut(self.masks[k], r) for k, r in zip(pick, regions)],
                                None if self.samples is None else [self.samples[k] for k in pick], self.input_channels)
        data.dtypes, data.targets, data.regions, data.recorded = self.dtypes, self.targets, regions, recorded
        if self.sizes is not None:
            counted = {}                      # per distinct view: (size, target pixels, blank?)
            for j, (i, r) in enumerate(picks):
                if (i, r) not in counted:
                    counted[i, r] = (self.sizes[pick[j]], self.target_pixels[pick[j]], i in self.flat) if r is None \
                        else data.measure(j)
            data.sizes = [counted[p][0] for p in picks]
            data.target_pixels = np.array([counted[p][1] for p in picks], np.int64).reshape(len(picks), -1)
            data.flat = list(dict.fromkeys(data.ids[j] for j, p in enumerate(picks) if counted[p][2]))
        return data

    def measure(self, k):
        """(size, target pixels per class, whether it is one value throughout) of entry k, as decode() counts them."""
        img, mask = self.image(k), self.mask(k) if self.labeled else None
        counts = np.zeros(0, np.int64) if mask is None else mask.reshape(-1, mask.shape[2]).sum(0, dtype=np.int64)
        return tuple(img.shape[:2]), counts, bool(img.min() == img.max())

    def subset(self, ids):
        index = {i: k for k, i in enumerate(self.ids)}
        pick = [index[i] for i in ids]
        data = SegmentationData(list(ids), [self.images[k] for k in pick],
                                None if self.masks is None else [self.masks[k] for k in pick],
                                None if self.samples is None else [self.samples[k] for k in pick],
                                self.input_channels)
        data.dtypes, data.targets = self.dtypes, self.targets
        if self.sizes is not None:
            data.target_pixels, data.sizes = self.target_pixels[pick], [self.sizes[k] for k in pick]
        kept = set(ids)
        data.flat = [i for i in self.flat if i in kept]
        data.regions = [self.regions[k] for k in pick]
        return data


def consecutive(labels):
    """Object labels renumbered 1..N in their order (0 stays the background): a region holds only some objects of
    its image, and the object scores count the labels 1..N (instances.object_scores)."""
    _, inverse = np.unique(labels, return_inverse=True)
    renumbered = inverse.reshape(labels.shape).astype(np.int64)
    return renumbered if labels.min() == 0 else renumbered + 1


def cut(array, region):
    """The region of an image-shaped array (None: the whole array)."""
    return array if region is None else region.cut(array)


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


def check_foreground(foreground, root, class_mode, objects=False):
    """Training on masks that mark nothing: a DataError when no class has a foreground pixel in any image (the model
    could only learn to predict nothing, at IoU 0); a warning per class that has none. In softmax mode class 0
    is the background, which unmarked pixels fill: only classes 1.. are checked."""
    first = 1 if class_mode == "softmax" else 0
    empty = [c for c in range(first, len(foreground)) if foreground[c] == 0]
    if len(empty) == len(foreground) - first:
        raise DataError(f"no mask under {root} marks any pixel (masks: values above 127; label images: above 0), so "
                        "there is nothing to learn. Check that masks/ (or labels/) holds the right files and that "
                        "foreground is stored as 255 (or as 1 in masks that hold only 0 and 1)", path=root)
    if objects:
        if empty:
            warnings.warn(f"no two objects touch in any label image under {root}, so the borders plane of --target "
                          "objects is empty: the network learns only the objects plane, val_iou averages in an empty "
                          "plane (IoU 1 wherever no border is predicted), and val.py --instances splits objects by "
                          "their shape alone, as for a run on masks. Train with --target masks (val.py --instances "
                          "splits touching objects there too)", stacklevel=3)
        return
    for c in empty:
        warnings.warn(f"class {c} has no foreground pixel in any mask under {root}/masks/{c}: the model cannot learn "
                      "it and its IoU will stay 0 (or 1 where it predicts nothing). Check that folder's masks",
                      stacklevel=3)


def check_blank(data, root, class_mode):
    """Warnings for a data set of blank images: images of one value throughout (the network sees nothing in them),
    and targets that mark nothing in most images (it sees mostly background and may learn to predict nothing);
    each names the images. In softmax mode class 0 is the background: classes 1.. count as marking something."""
    if data.flat:
        which = ("every image is" if len(data.flat) == len(data.ids) else
                 f"{len(data.flat)} of {len(data.ids)} images {'is' if len(data.flat) == 1 else 'are'}")
        warnings.warn(f"{which} blank under {root}/images, one value throughout ({listing(data.flat)}): the "
                      "network sees nothing there to learn from. Check those files (an export or conversion that "
                      "failed, the wrong channel or page of a TIFF) and remove or replace them", stacklevel=3)
    first = 1 if class_mode == "softmax" else 0
    unmarked = [i for i, pixels in zip(data.ids, data.target_pixels) if not pixels[first:].any()]
    if len(unmarked) > MOSTLY_EMPTY * len(data.ids):
        warnings.warn(f"{len(unmarked)} of {len(data.ids)} images under {root} have masks that mark nothing "
                      f"({listing(unmarked)}): the network sees mostly background and may learn to predict nothing "
                      "(and score the IoU of predicting background everywhere). If those images hold objects, their "
                      "masks were saved wrongly (foreground is 255, or 1 in masks of 0 and 1); if they really hold "
                      "none, train on the images that do, or add more that do", stacklevel=3)
