"""The data set: image/mask discovery, up-front validation, decoding into memory, the train/validation split.

Layout (as in the reference, plus label images):
    <root>/images/<id><img_ext>
    <root>/masks/<class>/<id><mask_ext>      class = 0 .. num_classes-1
    <root>/labels/<id>.png|.tif|.tiff        label images (0 background, 1..N one number per object), as
                                             napari, Cellpose or StarDist write them: the target when there
                                             is no masks/ (foreground = label > 0), and the objects of
                                             val.py --instances (instances/ is the older name for the same);
                                             with --target objects the only target (objects and their borders)

Images are 8- or 16-bit PNG or TIFF, float32 TIFF or JPEG, with any number of channels (TIFF through
tifffile). Every image and mask is decoded once, checked, and kept in memory in its own type (uint8,
uint16 or float32: nothing is rounded to 8 bits), so an epoch never decodes a file again and every
problem with the data is reported before training starts. Extensions match whatever their case, and
.tif and .tiff are one. Batching, augmentation and normalisation are in loaders.py and normalize.py.
"""
import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from itertools import repeat

import cv2
import numpy as np

from utils import UserError

# How the running script lets a user change each data setting: a message names only what that script accepts.
# '{}' is filled with the suggested value. val.py and bench.py pass their own.
TRAIN_HINTS = {
    "data": "pass --data_dir and --dataset so that <data_dir>/<dataset> is the folder with images/ and masks/ "
            "(or labels/)",
    "img_ext": "pass --img_ext {}",
    "mask_ext": "pass --mask_ext {}",
    "input_channels": "pass --input_channels {} (or convert the images to grayscale first)",
    "num_classes": "pass --num_classes {}",
    "target": ", or train on the masks with --target masks",
}

MAX_LISTED = 10                           # file names shown in one error message
DECODE_THREADS = min(8, (os.cpu_count() or 1) + 1)   # decoding and checking files in parallel
DECODE_CHUNK = 256                        # files decoded per round, so --cache_mb bounds the peak memory too
TIFF_EXTS = (".tif", ".tiff")             # one extension for matching: --img_ext .tif finds .tiff and .TIF too
LABEL_EXTS = (".png", ".tif", ".tiff")    # label images, whatever --mask_ext says
LABEL_FOLDERS = ("labels", "instances")   # the label-image folder; instances/ is its older name
MAX_IMAGE_BYTES = 2 * 2**30               # a file whose pixels would take more is refused before it is decoded
IMAGE_TYPES = (np.uint8, np.uint16, np.float32)   # kept as they are; other integer and float types -> float32
TARGETS = ("masks", "objects")            # the config's target: what the network learns (Targets)
OBJECT_PLANES = ("objects", "borders")    # --target objects: its two planes (instances.object_targets)
BORDER_RADIUS = 1                         # --target objects: border half-width, in pixels of the network input


@dataclass
class Targets:
    """What an image's training target is, from the run's config (Targets.of): its masks, made exclusive in
    softmax mode; or, with objects, the planes of instances.object_targets from its label image, the borders
    drawn BORDER_RADIUS pixels wide at the network's input (so wider at an image resized down to it: a border
    must not vanish in the resizing)."""
    softmax: bool = False
    objects: bool = False
    input_size: tuple = None     # (h, w) the images are resized to for the network; None: crops at their own size

    @classmethod
    def of(cls, cfg):
        objects = cfg.get("target") == "objects"
        return cls(cfg["class_mode"] == "softmax", objects,
                   (cfg["input_h"], cfg["input_w"]) if objects and not cfg["crop"] else None)

    def border_radius(self, size):
        """The border half-width in the pixels of an image of size (H, W)."""
        if self.input_size is None:
            return BORDER_RADIUS
        return max(1, round(BORDER_RADIUS * max(size[0] / self.input_size[0], size[1] / self.input_size[1])))


def listing(names):
    """'a, b, c' with at most MAX_LISTED names, then '... and N more'."""
    names = sorted(names)
    shown = ", ".join(names[:MAX_LISTED])
    return shown + (f" ... and {len(names) - MAX_LISTED} more" if len(names) > MAX_LISTED else "")


def ext_family(ext):
    """The extensions that `ext` stands for, lower case: ('.tif', '.tiff') for either, else (ext,)."""
    ext = ext.lower()
    return TIFF_EXTS if ext in TIFF_EXTS else (ext,)


def split_ext(name, exts):
    """'a.TIF', ('.tif', '.tiff') -> 'a'; None if the name does not end in one of exts (any case)."""
    low = name.lower()
    for e in sorted(exts, key=len, reverse=True):
        if low.endswith(e) and len(name) > len(e):
            return name[: -len(e)]
    return None


IMAGE_EXTS = (".png", ".tif", ".tiff", ".jpg", ".jpeg", ".bmp")   # what a folder's one image type may be


def single_image_type(folder):
    """The extension of the files in `folder` when they are all images of one type (.tif and .tiff count as one,
    in any case), else None (also when the folder is missing or empty): a default a user need not type."""
    try:
        names = [f for f in os.listdir(folder) if not f.startswith(".")]
    except OSError:
        return None
    exts = {os.path.splitext(f)[1].lower() for f in names}
    families = {ext_family(e) for e in exts}
    if len(families) != 1 or not exts <= set(IMAGE_EXTS):
        return None
    return sorted(exts)[0]


def find_files(folder, exts, what):
    """{id: file name} of the files in `folder` ending in one of exts (any case); two files with one id (a.tif and
    a.TIFF) are a UserError. Hidden files are skipped; folders and broken links named like files are refused."""
    found = {}
    for f in sorted(os.listdir(folder)):
        i = split_ext(f, exts) if not f.startswith(".") else None
        if i is None:
            continue
        path = os.path.join(folder, f)
        if not os.path.isfile(path):
            kind = "a broken link" if os.path.islink(path) else "a folder"
            raise UserError(f"{path} is {kind}, not a file; {what} must be files. Remove or rename it.")
        if i in found:
            raise UserError(f"{folder} holds two files for the id '{i}' ({found[i]} and {f}); keep one of them")
        found[i] = f
    return found


def find_ids(folder, ext, hints, ext_key="img_ext"):
    """{id: file name} (ids sorted) of the files ending in `ext` in `folder`; an empty or wrong-extension folder is
    a UserError. ext_key: the setting `ext` came from (img_ext or mask_ext), which the message suggests changing."""
    what = "masks" if ext_key == "mask_ext" else "images"
    if not os.path.isdir(folder):
        reason = "is a file, not a folder" if os.path.exists(folder) else "does not exist"
        raise UserError(f"folder {folder} {reason}; put your {what} there, or {hints['data']}")
    if not ext.startswith(".") or ext == ".":
        bare = ext.strip(".")
        found = sorted({os.path.splitext(f)[1] for f in os.listdir(folder) if os.path.splitext(f)[1]})
        suggestion = "." + bare if bare else (found[0] if found else ".png")
        problem = "has no leading dot" if bare else "is empty"
        raise UserError(f"the extension '{ext}' {problem}; {hints[ext_key].format(suggestion)}")
    ids = find_files(folder, ext_family(ext), what)
    if ids:
        return ids
    files = [f for f in os.listdir(folder) if not f.startswith(".")]
    if not files:
        raise UserError(f"No input file found in {folder}, make sure you put your {what} there")
    found = sorted({os.path.splitext(f)[1] for f in files if os.path.splitext(f)[1]})
    fix = hints[ext_key].format(found[0] if found else ".png")
    raise UserError(f"no file ending in '{ext}' in {folder} (it holds files ending in {', '.join(found) or '(none)'}); "
                    f"{fix} if that is the extension of your {what}")


def is_tiff(path):
    return os.path.splitext(path)[1].lower() in TIFF_EXTS


def unreadable(path, why="it is empty, truncated or not an image"):
    return UserError(f"cannot read image file {path}: {why}. Replace it or remove it (and its mask) from the data set.")


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PNG_CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}     # by the colour type in the PNG header


def png_dimensions(header):
    """(width, height) from a PNG's IHDR (bytes 16-24 of the file)."""
    return int.from_bytes(header[16:20], "big"), int.from_bytes(header[20:24], "big")


def png_decoded_bytes(header):
    """The first 26 bytes of a PNG -> the bytes its pixels take decoded (from the header, before decoding), or None
    if they are not a PNG's. A few kilobytes of PNG can declare gigabytes of pixels."""
    if len(header) < 26 or not header.startswith(PNG_SIGNATURE) or header[12:16] != b"IHDR":
        return None
    width, height = png_dimensions(header)
    return width * height * PNG_CHANNELS.get(header[25], 4) * (2 if header[24] == 16 else 1)


def check_png_size(header, name):
    """A UserError for a PNG whose declared pixels would take more than MAX_IMAGE_BYTES decoded."""
    size = png_decoded_bytes(header)
    if size is not None and size > MAX_IMAGE_BYTES:
        width, height = png_dimensions(header)
        raise UserError(f"{name} declares {width}x{height} pixels ({size / 2**30:.1f} GiB decoded), more than "
                        f"{MAX_IMAGE_BYTES >> 30} GiB; this toolkit takes 2D images that fit in memory: crop or tile it "
                        "first (or replace the file if it is damaged)")


def decode(path):
    """An image file -> array (H, W) or (H, W, C), colour channels in RGB order, alpha dropped; TIFF through tifffile,
    the rest through OpenCV (JPEGs turned as their EXIF orientation says). An unreadable file is a UserError."""
    if not os.path.isfile(path):
        raise unreadable(path, "it is not a file (a folder or a broken link)")
    if os.path.getsize(path) == 0:
        raise unreadable(path, "it is empty")
    if is_tiff(path):
        return read_tiff(path)
    with open(path, "rb") as f:
        check_png_size(f.read(26), path)
    if os.path.splitext(path)[1].lower() in (".jpg", ".jpeg"):
        img = cv2.imread(path, cv2.IMREAD_ANYCOLOR | cv2.IMREAD_ANYDEPTH)      # applies the EXIF orientation
    else:
        img = cv2.imread(path, cv2.IMREAD_UNCHANGED)
    if img is None:
        raise unreadable(path)
    if img.ndim == 3 and img.shape[2] == 4:
        img = cv2.cvtColor(img, cv2.COLOR_BGRA2RGB)                           # alpha dropped
    elif img.ndim == 3 and img.shape[2] == 3:
        img = cv2.cvtColor(img, cv2.COLOR_BGR2RGB)
    return img


def read_tiff(path):
    """A 2D TIFF -> (H, W) or (H, W, C). Channels are the axes the file names as such (S: samples such as RGB, C:
    channels as Fiji/ImageJ and OME write them); a stack (Z, T) or an axis the file does not name is refused with
    its shape and axes, because this toolkit segments 2D images and guessing would train on the wrong thing."""
    import tifffile    # here: PNG-only data sets never import it
    try:
        with open(path, "rb") as f, tifffile.TiffFile(f) as tif:
            if len(tif.pages) == 1:           # the common case, read without building the series (faster)
                page = tif.pages.first
                axes, shape, dtype, photometric, read = page.axes, page.shape, page.dtype, page.photometric, page.asarray
            else:
                if len(tif.series) > 1:
                    raise UserError(f"{path} holds {len(tif.series)} images of shapes "
                                    f"{', '.join(str(s.shape) for s in tif.series)}; save each as its own file")
                series = tif.series[0]
                axes, shape, dtype, read = series.axes, series.shape, series.dtype, series.asarray
                photometric = tif.pages.first.photometric
            if int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize > MAX_IMAGE_BYTES:
                raise UserError(f"{path} declares {shape} pixels of {dtype}, more than {MAX_IMAGE_BYTES >> 30} GiB "
                                "decoded; this toolkit takes 2D images that fit in memory: crop or tile it first")
            data = tiff_layout(path, axes, shape)
            img = read()
    except UserError:
        raise
    except Exception as e:   # tifffile raises TiffFileError, ValueError, struct.error, ... on a damaged file
        raise unreadable(path, f"tifffile could not read it ({type(e).__name__}: {str(e)[:200]})") from None
    img = img.reshape(shape)
    if data["channel_axis"] is not None:
        img = np.moveaxis(img, data["channel_axis"], -1)
    if img.ndim == 3 and img.shape[2] == 4 and str(photometric).endswith("RGB"):
        img = img[:, :, :3]                                                   # RGBA: alpha dropped
    return np.ascontiguousarray(img)


def tiff_layout(path, axes, shape):
    """{'channel_axis': the index of the channel axis or None} for a TIFF with these axes (tifffile's letters, with
    singleton axes already dropped); anything but YX plus at most one channel axis is a UserError."""
    axes = axes.upper()
    extra = [a for a in axes if a not in "YX"]
    if "Y" in axes and "X" in axes and not extra:
        return {"channel_axis": None}
    if "Y" in axes and "X" in axes and len(extra) == 1 and extra[0] in "SC":
        return {"channel_axis": axes.index(extra[0])}
    names = {"Z": "depth (a Z stack)", "T": "time (a time series)", "Q": "an axis the file does not name",
             "I": "an axis the file does not name (several pages)", "C": "channels", "S": "samples (channels)"}
    said = ", ".join(f"{a} {n}: {names.get(a, 'another axis')}" for a, n in zip(axes, shape) if a not in "YX")
    raise UserError(
        f"{path} is not a 2D image: its shape is {tuple(shape)} with axes {axes} ({said}). This toolkit segments 2D "
        "images with channels. Save each plane as its own 2D file (e.g. tifffile.imwrite(f'{id}_z{k}.tif', "
        "stack[k])) or a projection (stack.max(axis=0)); if the extra axis is channels, save it with its axes named, "
        "e.g. tifffile.imwrite(path, image, imagej=True, metadata={'axes': 'CYX'}) for an image of shape (C, H, W), "
        "as Fiji writes a multi-channel image")


def image_type(img, path):
    """An image's pixels in a type the toolkit keeps: uint8, uint16 and float32 as they are; other integers and
    floats as float32 (exact for int16, float16); complex, bool or non-finite floats are refused."""
    if img.dtype.type in IMAGE_TYPES:
        out = img
    elif img.dtype.kind in "uif":
        out = img.astype(np.float32)
    else:
        raise UserError(f"image {path} has pixels of type {img.dtype}; images must be 8- or 16-bit integers or float32")
    if out.dtype.kind == "f" and not np.isfinite(out).all():
        raise UserError(f"image {path} holds NaN or infinite values; replace them (e.g. np.nan_to_num) first")
    return out


def read_image(path, input_channels, hints):
    """An image file -> (H, W, input_channels) in its own type (uint8, uint16 or float32), RGB order, alpha dropped.
    Grayscale is replicated for an RGB run, and an RGB file whose channels are equal is grayscale for a 1-channel run;
    any other channel count must equal input_channels."""
    img = image_type(decode(path), path)
    if img.ndim == 2:
        img = img[:, :, None]
    channels = img.shape[2]
    if channels == input_channels:
        return np.ascontiguousarray(img)
    if input_channels == 3 and channels == 1:
        return np.repeat(img, 3, axis=2)                      # grayscale replicated
    if input_channels == 1 and channels == 3:
        if (img[:, :, 0] == img[:, :, 1]).all() and (img[:, :, 1] == img[:, :, 2]).all():
            return np.ascontiguousarray(img[:, :, :1])        # grayscale stored as RGB
        raise UserError(f"image {path} is in colour but input_channels is 1: {hints['input_channels'].format(3)}")
    raise UserError(f"image {path} has {channels} channel(s) but input_channels is {input_channels}: "
                    f"{hints['input_channels'].format(channels)}")


def read_mask(path):
    """An 8- or 16-bit single-channel mask file -> (H, W) with its raw values."""
    m = decode(path)
    if m.dtype not in (np.uint8, np.uint16):
        raise UserError(f"mask {path} is {m.dtype}; masks must be 8- or 16-bit single-channel images with foreground "
                        "> 127 (8-bit) or > 32767 (16-bit), or 0/1. Convert it (e.g. (mask > 0) * 255 as uint8).")
    if m.ndim == 3 and not is_tiff(path) and is_palette_png(path):
        raise UserError(f"mask {path} is a palette (indexed-colour) PNG; masks must be 8-bit grayscale with "
                        "foreground > 127. Save it as grayscale, one mask per class (e.g. with PIL: "
                        "Image.fromarray(((np.array(Image.open(p)) == k) * 255).astype('uint8')) for class k).")
    if m.ndim == 3:
        raise UserError(f"mask {path} has {m.shape[2]} channels; masks must be single-channel (grayscale) with "
                        "foreground > 127. Save it as grayscale.")
    return m


def read_labels(path, size):
    """A label image (integer, single channel, 0 background, one number per object) of size (H, W) -> int64 labels
    renumbered 1..N (0 stays the background)."""
    labels = checked_labels(path, size)
    _, inverse = np.unique(labels, return_inverse=True)
    renumbered = inverse.reshape(labels.shape).astype(np.int64)
    return renumbered if labels.min() == 0 else renumbered + 1     # keep 0 as the background


def checked_labels(path, size):
    """A label image of size (H, W) as stored, after every check (integer, one channel, size, not negative)."""
    labels = decode(path)
    where = f"label image {path}"
    if labels.dtype.kind not in "ui" or labels.dtype.itemsize > 8:
        raise UserError(f"{where} is {labels.dtype}; label images must hold whole numbers (8-, 16- or 32-bit "
                        "integers: 0 background, 1..N one per object). Save it as an integer image, e.g. "
                        "tifffile.imwrite(path, labels.astype('uint16')) after rounding")
    if labels.ndim != 2:
        raise UserError(f"{where} has {labels.shape[2]} channels; label images must be single-channel (0 background, "
                        "1..N one number per object), not colour: save the label layer itself (napari: "
                        "File > Save Selected Layer; Fiji: Image > Type > 16-bit)")
    if labels.shape != tuple(size):
        raise UserError(f"{where} is {labels.shape[1]}x{labels.shape[0]} but its image is {size[1]}x{size[0]}; "
                        "labels must match their image's size")
    if labels.dtype.kind == "i" and labels.min() < 0:
        raise UserError(f"{where} holds negative values; labels are 0 (background) and 1..N (one per object)")
    return labels


read_instances = read_labels   # the name val.py --instances used first


def is_palette_png(path):
    """Whether the file is a PNG whose colour type (byte 25 of its IHDR) is 3: indexed colour with a palette."""
    with open(path, "rb") as f:
        head = f.read(26)
    return head.startswith(PNG_SIGNATURE) and len(head) == 26 and head[25] == 3


def binarize_mask(m, path):
    """Raw 8- or 16-bit mask -> (0/1 uint8 mask, whether it was stored as 0/1). Decided per mask: foreground is above
    half the type's range (> 127 for 8-bit; > 32767 for 16-bit, or > 127 in a 16-bit mask whose values stay within
    0..255), or 1 in a mask that holds only 0 and 1; a mask whose largest value is 2..half would read as empty: refused."""
    top = int(m.max())
    if top <= 1:
        return m.astype(np.uint8), top == 1
    half = 127 if m.dtype == np.uint8 or top <= 255 else 32767
    if top <= half:
        raise UserError(f"mask {path} has no value above {half} (its largest is {top}), so it would be read as empty. "
                        f"Masks mark foreground with values > {half} (e.g. {2 * half + 1}) or hold only 0 and 1; values "
                        "such as 1, 2, 3 look like labels: put label images (one number per object) in labels/, or "
                        "one 0/255 mask per class in masks/<class>/.")
    return (m > half).astype(np.uint8), False


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


@dataclass
class Sample:
    """One image's files: the image, its mask per class ([] when the label image is the target), its label image
    (labels/ or instances/; None if the data set has none)."""
    image: str
    masks: list = field(default_factory=list)
    labels: str = None


def read_target(sample, size, targets=None):
    """-> (0/1 uint8 (H, W, C) target, whether a mask was stored as 0/1): the masks, or the label image's foreground;
    with targets.objects, the label image's objects and borders (instances.object_targets)."""
    if targets is not None and targets.objects:
        from instances import object_targets
        return object_targets(checked_labels(sample.labels, size), targets.border_radius(size)), False
    if sample.masks:
        return read_masks(sample.masks, sample.image, size)
    return (checked_labels(sample.labels, size) > 0).astype(np.uint8)[:, :, None], False


def exclusive(mask):
    """(H, W, C) 0/1 masks -> (one-hot (H, W, C), whether two masks marked one pixel): softmax mode's target. Each
    pixel is the highest-numbered class whose mask marks it; a pixel no mask marks is class 0 (the background).
    The loss, the training metrics and val.py all see this target, so they score what the network is taught."""
    marked = mask.any(axis=2)
    index = np.where(marked, mask.shape[2] - 1 - np.argmax(mask[:, :, ::-1], axis=2), 0)
    return (index[:, :, None] == np.arange(mask.shape[2])).astype(np.uint8), bool((mask.sum(2) > 1).any())


def read_pair(sample, input_channels, hints, targets=None):
    """A Sample -> checked image (H, W, C_in) in its own type, 0/1 target (H, W, C), whether a mask was stored as 0/1."""
    img = read_image(sample.image, input_channels, hints)
    return (img, *read_target(sample, img.shape[:2], targets))


def class_folders(mask_root, num_classes, hints):
    """Checks masks/0 .. masks/<num_classes-1> exist and no other class folder does."""
    if not os.path.isdir(mask_root):
        raise UserError(f"mask folder {mask_root} does not exist; put each class's masks in "
                        f"{mask_root}/<class>/ (class 0 .. num_classes-1), named like the images, or label images "
                        f"(0 background, 1..N one per object) in {os.path.join(os.path.dirname(mask_root), 'labels')}/")
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


def check_pairs(image_ids, found, folder, ext, what):
    """Every image has a file in `found` ({id: file} of `folder`) and every file an image; mismatches listed by name."""
    no_file = set(image_ids) - set(found)
    no_image = set(found) - set(image_ids)
    if no_file:
        raise UserError(f"{len(no_file)} image(s) have no {what} in {folder}: {listing(no_file)}. "
                        f"Add them (named <id>{ext}) or remove those images.")
    if no_image:
        raise UserError(f"{len(no_image)} {what}(s) in {folder} have no image: {listing(no_image)}. "
                        "Add the images or remove those files.")


def label_folder(root):
    """<root>/labels or <root>/instances, whichever exists (None if neither); both is a UserError."""
    present = [os.path.join(root, d) for d in LABEL_FOLDERS if os.path.isdir(os.path.join(root, d))]
    if len(present) > 1:
        raise UserError(f"{root} has both labels/ and instances/; they hold the same thing (label images, one number "
                        "per object): keep one of them")
    return present[0] if present else None


def missing_reason(path):
    """Why the folder `path` is not there: it is a file, a folder above it is a file (--data_dir naming a file),
    or it does not exist."""
    if os.path.exists(path):
        return "is a file, not a folder"
    above = os.path.dirname(os.path.normpath(path))
    while above and not os.path.exists(above):
        above = os.path.dirname(above)
    if above and not os.path.isdir(above):
        return f"cannot exist: {above} is a file, not a folder"
    return "does not exist"


def scan(root, img_ext, mask_ext, num_classes, hints, objects=False):
    """Finds the data set's files and checks that they pair up -> {id: Sample}, ids sorted. Nothing is decoded yet.
    Without masks/, the label images in labels/ are the target (one class: label > 0). objects (--target objects):
    the label images are the target whatever masks/ holds, and every image needs one."""
    if not os.path.isdir(root):
        raise UserError(f"data set folder {root} {missing_reason(root)}; create it with images/ and masks/0/ (or labels/) inside, "
                        f"or {hints['data']}")
    images = find_ids(os.path.join(root, "images"), img_ext, hints)
    ids = list(images)
    labels_dir = label_folder(root)
    labels = {}
    if labels_dir:
        labels = find_files(labels_dir, LABEL_EXTS, "label images")
        check_pairs(ids, labels, labels_dir, ".tif", "label image")
    mask_dirs = []                                            # with objects: masks/, if any, is not the target
    if objects and labels_dir is None:
        raise UserError(f"{root} has no label images (labels/ or instances/), which a run with target objects learns "
                        "from (one number per object, 0 the background, as napari, Cellpose or StarDist save them); "
                        f"add them{hints.get('target', '')}")
    if not objects and (labels_dir is None or os.path.isdir(os.path.join(root, "masks"))):
        mask_dirs = class_folders(os.path.join(root, "masks"), num_classes, hints)
    elif not objects and num_classes != 1:
        raise UserError(f"{root} has label images ({labels_dir}/) and no masks/, which gives one class (label > 0), "
                        f"but num_classes is {num_classes}: {hints['num_classes'].format(1)}, or add masks/0 .. "
                        f"masks/{num_classes - 1}")
    masks = []
    for d in mask_dirs:
        found = find_ids(d, mask_ext, hints, "mask_ext")
        check_pairs(ids, found, d, mask_ext, "mask")
        masks.append(found)
    return {i: Sample(os.path.join(root, "images", images[i]), [os.path.join(d, m[i]) for d, m in zip(mask_dirs, masks)],
                      os.path.join(labels_dir, labels[i]) if labels_dir else None)
            for i in ids}


class SegmentationData:
    """A validated data set: ids, and per image its (H, W, C_in) image in its own type (uint8, uint16 or float32)
    and (H, W, C) 0/1 uint8 target.

    Decoded images are cached in memory up to a byte budget; the rest are read from disk again
    when asked for (image(k), mask(k)), with the same result. masks is None for unlabeled images.
    dtypes: the image types present (what --normalize auto decides by).
    """

    def __init__(self, ids, images, masks, samples=None, input_channels=3, hints=None):
        self.ids, self.images, self.masks = ids, images, masks
        self.samples = samples                # per image its Sample, for uncached reads and label images
        self.input_channels = input_channels
        self.hints = hints or TRAIN_HINTS
        self.dtypes = {im.dtype for im in images if im is not None}   # decode() adds those of uncached images
        self.targets = Targets()              # decode(): what each image's target is (softmax, objects)
        self.target_pixels = None             # decode(): (N, C) foreground pixels of each image's target
        self.sizes = None                     # decode(): each image's (H, W)

    @classmethod
    def from_folder(cls, root, img_ext, mask_ext, num_classes, input_channels, cache_bytes=None):
        """Checks every file (decoding each once) and keeps the decoded arrays while they fit in cache_bytes.
        Messages name train.py's flags; other scripts call decode(scan(..., hints), ...) with their own hints."""
        scanned = scan(root, img_ext, mask_ext, num_classes, TRAIN_HINTS)
        return cls.decode(scanned, input_channels, cache_bytes, root, TRAIN_HINTS)

    @classmethod
    def decode(cls, scanned, input_channels, cache_bytes, root, hints, targets=Targets()):
        """scan()'s {id: Sample} -> the checked, decoded data set (cached up to cache_bytes). targets.softmax: the
        targets are made exclusive (exclusive()), with one warning for the images where masks overlap;
        targets.objects: the objects and borders of each label image.
        data.target_pixels: per image and class, the target's foreground pixels; data.sizes: per image (H, W)."""
        ids, samples = list(scanned), list(scanned.values())
        images, masks, zero_one, dtypes, used = [], [], [], set(), 0
        overlapping, counts, sizes = [], [], []
        # OpenCV decodes without the GIL: threads run in parallel. tifffile's parsing holds it, so TIFF files are
        # read in this thread (faster than threads contending for the GIL).
        threads = 1 if any(is_tiff(s.image) for s in samples[:1]) else DECODE_THREADS
        with ThreadPoolExecutor(threads) as pool:
            for start in range(0, len(ids), DECODE_CHUNK):
                chunk = pool.map(read_pair, samples[start:start + DECODE_CHUNK], repeat(input_channels), repeat(hints),
                                 repeat(targets))
                for i, (img, mask, was_zero_one) in zip(ids[start:], chunk):
                    if targets.softmax:
                        mask, overlaps = exclusive(mask)
                        overlapping += [i] if overlaps else []
                    counts.append(mask.reshape(-1, mask.shape[2]).sum(0, dtype=np.int64))
                    sizes.append(img.shape[:2])
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
        data = cls(ids, images, masks, samples, input_channels, hints)
        data.dtypes, data.targets = dtypes, targets
        data.target_pixels, data.sizes = np.array(counts, np.int64).reshape(len(ids), -1), sizes
        return data

    @property
    def labeled(self):
        return self.masks is not None

    @property
    def fully_cached(self):
        return all(i is not None for i in self.images)

    def image(self, k):
        """(H, W, C_in) in the file's type, from the cache or decoded from disk."""
        if self.images[k] is not None:
            return self.images[k]
        return read_image(self.samples[k].image, self.input_channels, self.hints)

    def mask(self, k):
        """uint8 (H, W, C) of 0/1, from the cache or decoded from disk."""
        if self.masks[k] is not None:
            return self.masks[k]
        mask = read_target(self.samples[k], self.image(k).shape[:2], self.targets)[0]
        return exclusive(mask)[0] if self.targets.softmax else mask

    def instances(self, k):
        """int64 (H, W) object labels of image k (0 background, 1..N): its label image when the data set has
        them, else the connected components of its first mask."""
        if self.samples is None or self.samples[k].labels is None:
            from scipy import ndimage
            return ndimage.label(self.mask(k)[:, :, 0])[0].astype(np.int64)
        return read_labels(self.samples[k].labels, self.image(k).shape[:2])

    def subset(self, ids):
        index = {i: k for k, i in enumerate(self.ids)}
        pick = [index[i] for i in ids]
        data = SegmentationData(list(ids), [self.images[k] for k in pick],
                                None if self.masks is None else [self.masks[k] for k in pick],
                                None if self.samples is None else [self.samples[k] for k in pick],
                                self.input_channels, self.hints)
        data.dtypes, data.targets = self.dtypes, self.targets
        if self.sizes is not None:
            data.target_pixels, data.sizes = self.target_pixels[pick], [self.sizes[k] for k in pick]
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
    """(train_ids, val_ids) exactly as the reference (sorted ids, scikit-learn's train_test_split with
    random_state=split_seed): one permutation of a NumPy RandomState seeded so, its first ceil(val_split * n)
    positions for validation. Written here because importing scikit-learn for it cost ~1 s of every start-up;
    tests/test_dataset.py checks it against scikit-learn."""
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
    KFold(folds, shuffle=True, random_state=split_seed) makes them (checked against it in tests/test_dataset.py):
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


def load_validation(cfg, recorded, hints):
    """The images to evaluate runs on, decoded (only those). recorded: per run, its split.csv ({'train', 'val'}), or
    None for a run from before it was recorded (then the split of the files present). One run: its validation
    images; several (an ensemble): the images none of them trained on. -> (data, a note on files added or
    removed since the run trained, or '')."""
    root, targets = os.path.join(cfg["data_dir"], cfg["dataset"]), Targets.of(cfg)
    scanned = scan(root, cfg["img_ext"], cfg["mask_ext"], cfg["num_classes"], hints, targets.objects)
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
                                   cache_budget(cfg["cache_mb"]), root, hints, targets)
    return data, note


def split(data, cfg):
    """(train, validation) SegmentationData of `data`, split by the config's val_split and split_seed (and fold)."""
    train_ids, val_ids = split_for(data.ids, cfg)
    return data.subset(train_ids), data.subset(val_ids)


def load_splits(cfg, hints=None, recorded=None):
    """The config's data set, validated and decoded, as (train, validation): the split train.py and bench.py
    use. hints: how the running script sets each data setting, for its messages (default: TRAIN_HINTS).
    recorded: a resumed run's split.csv ({'train', 'val'}): then its split of the images still there, never a new
    one (images added since are left out, so no validation image is ever trained on)."""
    root, hints = os.path.join(cfg["data_dir"], cfg["dataset"]), hints or TRAIN_HINTS
    targets = Targets.of(cfg)
    scanned = scan(root, cfg["img_ext"], cfg["mask_ext"], cfg["num_classes"], hints, targets.objects)
    if recorded is not None:
        note = split_changes(root, recorded, scanned)
        if note:
            warnings.warn(note, stacklevel=2)
        scanned = {i: scanned[i] for i in recorded["train"] + recorded["val"] if i in scanned}
        if not any(i in scanned for i in recorded["val"]) or not any(i in scanned for i in recorded["train"]):
            raise UserError(f"{root} no longer holds the run's training or validation images (its split.csv); "
                            "start a new run on the data set as it is now (another --name)")
    data = SegmentationData.decode(scanned, cfg["input_channels"], cache_budget(cfg["cache_mb"]), root, hints, targets)
    check_foreground(data.target_pixels.sum(0), root, cfg["class_mode"], targets.objects)
    if recorded is not None:
        return data.subset([i for i in recorded["train"] if i in scanned]), \
            data.subset([i for i in recorded["val"] if i in scanned])
    return split(data, cfg)


def check_foreground(foreground, root, class_mode, objects=False):
    """Training on masks that mark nothing: a UserError when no class has a foreground pixel in any image (the model
    could only learn to predict nothing, at IoU 0); a warning per class that has none. In softmax mode class 0
    is the background, which unmarked pixels fill: only classes 1.. are checked."""
    first = 1 if class_mode == "softmax" else 0
    empty = [c for c in range(first, len(foreground)) if foreground[c] == 0]
    if len(empty) == len(foreground) - first:
        raise UserError(f"no mask under {root} marks any pixel (masks: values above 127; label images: above 0), so "
                        "there is nothing to learn. Check that masks/ (or labels/) holds the right files and that "
                        "foreground is stored as 255 (or as 1 in masks that hold only 0 and 1)")
    if objects:
        if empty:
            warnings.warn(f"no two objects touch in any label image under {root}, so the borders plane of --target "
                          "objects is empty and adds nothing: train with --target masks", stacklevel=3)
        return
    for c in empty:
        warnings.warn(f"class {c} has no foreground pixel in any mask under {root}/masks/{c}: the model cannot learn "
                      "it and its IoU will stay 0 (or 1 where it predicts nothing). Check that folder's masks",
                      stacklevel=3)


def split_changes(root, recorded, present):
    """A note on a resumed run's images added or removed since it started ('' if none)."""
    known = set(recorded["train"]) | set(recorded["val"])
    added, removed = len(set(present) - known), len(known - set(present))
    if not (added or removed):
        return ""
    return (f"{root} has {added} image(s) more and {removed} fewer than when the run started; it goes on with its "
            "recorded split (split.csv) of the images still there" + (": the new ones are left out (start a new run "
            "to train on them)" if added else ""))
