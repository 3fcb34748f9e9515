"""Generate a small synthetic nuclei-like data set in the toolkit's layout (no download needed).

    python make_demo_data.py --out inputs/demo --n 120 --size 64
    python make_demo_data.py --out inputs/demo16 --microscopy      # 16-bit TIFFs with TIFF label images
    python make_demo_data.py --out inputs/em --membranes --n 30 --size 512   # thin membranes between cells
    python make_demo_data.py --out inputs/shapes8 --num_classes 8 --exclusive --void --names   # 8 classes

Each image is a dim, noisy, uneven background with bright blurred blobs ("nuclei"); class k's
mask marks the blobs of shape k (k = 0: ellipses, 1: squares, 2: triangles). With --exclusive,
class 0 is the background instead, so every pixel belongs to exactly one class (softmax mode);
--void then leaves a ring of 1 px around each blob in no class, as street-scene sets leave their
"void" pixels unlabelled. Up to 11 classes: past three shapes, a shape comes back one grey level
brighter (ellipses at 4 levels, ...). --names writes masks/names.txt, the classes' names.

--microscopy writes what a fluorescence microscope and an annotation tool give instead: 12-bit
signal in 16-bit TIFFs (background about 100, nuclei 300-3000 grey levels, with noise; --channels 2
adds a second, dimmer channel, saved as Fiji does, axes CYX; --float32 writes float32 TIFFs) and
images/<id>.tif with labels/<id>.tif, one number per nucleus, some of them touching.

--membranes writes what electron microscopy of tissue looks like: large grayscale images of cells
packed edge to edge, separated by thin dark membranes 2-3 px wide; the mask marks the cells' insides
(most of each image), so a model has to find the thin lines between them.
"""
import signal
import sys

if __name__ == "__main__":   # Ctrl-C or SIGTERM while the imports below load (seconds: torch) ends quietly
    signal.signal(signal.SIGINT, lambda *_: sys.exit(130))
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(130))

import argparse
import os
import shutil
from dataclasses import dataclass

import cv2
import numpy as np

import outputs
from utils import UserError, exit_on_user_error

SHAPES = ("ellipse", "square", "triangle")
MAX_CLASSES = 11               # mask classes it can draw: the shapes at up to four grey levels (and a background)
LEVELS = (60, 250)             # the darkest and brightest level of a many-class set's shapes (on a background of 0-45)


def draw_shape(canvas, kind, cx, cy, r, angle):
    if kind == "ellipse":
        cv2.ellipse(canvas, (cx, cy), (r, max(2, int(r * 0.7))), angle, 0, 360, 255, -1)
    elif kind == "square":
        box = cv2.boxPoints(((cx, cy), (1.6 * r, 1.6 * r), angle)).astype(np.int32)
        cv2.fillPoly(canvas, [box], 255)
    else:
        t = np.deg2rad(angle) + np.array([0, 2 * np.pi / 3, 4 * np.pi / 3])
        pts = np.stack([cx + r * np.cos(t), cy + r * np.sin(t)], 1).astype(np.int32)
        cv2.fillPoly(canvas, [pts], 255)


@dataclass(frozen=True)
class Classes:
    """What the masks of a generated nuclei-like set mark."""
    count: int = 1              # mask classes (masks/0 .. masks/<count-1>)
    exclusive: bool = False     # class 0 is the background: every pixel in exactly one class (softmax mode)
    void: bool = False          # with exclusive: a 1-px ring around each blob in no class
    names: bool = False         # also write masks/names.txt

    @property
    def shapes(self):
        """The classes that are shapes (all but the background)."""
        return self.count - 1 if self.exclusive else self.count

    def names_list(self):
        """The classes' names: 'background' (exclusive), then per shape class its shape, with its grey level's
        number past the first ('ellipse', 'square', 'triangle', 'ellipse 2', ...)."""
        shapes = [SHAPES[k % len(SHAPES)] + (f" {k // len(SHAPES) + 1}" if k >= len(SHAPES) else "")
                  for k in range(self.shapes)]
        return ["background"] * self.exclusive + shapes


def shape_levels(shape_classes):
    """A many-class set's grey level per shape class: the k-th repeat of a shape is brighter (more than three
    classes), so that two classes of one shape differ; None for up to three classes (one brightness per image)."""
    if shape_classes <= len(SHAPES):
        return None
    repeats = -(-shape_classes // len(SHAPES))
    return [np.linspace(*LEVELS, repeats)[k // len(SHAPES)] for k in range(shape_classes)]


def make_sample(rng, size, classes, channels):
    """-> image uint8 (size, size[, 3]), list of classes.count uint8 masks (0/255)."""
    shape_classes = classes.shapes
    levels = shape_levels(shape_classes)
    yy, xx = np.mgrid[0:size, 0:size] / size
    background = 20 + 25 * (xx * rng.uniform(-1, 1) + yy * rng.uniform(-1, 1))       # uneven lighting
    masks = [np.zeros((size, size), np.uint8) for _ in range(shape_classes)]
    for _ in range(rng.integers(2, 7)):
        k = rng.integers(shape_classes)
        r = int(rng.uniform(0.06, 0.14) * size)
        cx, cy = rng.integers(r, size - r, 2)
        draw_shape(masks[k], SHAPES[k % len(SHAPES)], int(cx), int(cy), max(r, 3), int(rng.integers(180)))
    fg = np.maximum.reduce(masks) > 0
    brightness = rng.uniform(110, 200)
    img = background + fg * brightness
    for k in range(shape_classes if levels else 0):     # the higher class on top, as softmax mode counts overlaps
        img = np.where(masks[k] > 0, background + levels[k], img)
    img = cv2.GaussianBlur(img.astype(np.float32), (0, 0), 0.8) + rng.normal(0, 12, (size, size))
    img = np.clip(img, 0, 255).astype(np.uint8)
    if channels == 3:
        tint = rng.uniform(0.7, 1.0, 3)
        img = np.clip(img[:, :, None] * tint, 0, 255).astype(np.uint8)
    if classes.exclusive:
        ring = cv2.dilate(fg.astype(np.uint8), np.ones((3, 3), np.uint8)) > 0 if classes.void else fg
        masks = [np.where(ring, 0, 255).astype(np.uint8)] + masks
    return img, masks


MARKER = ".made_by_make_demo_data"      # in every folder this script wrote: it may rewrite only those
DATA_FOLDERS = ("images", "masks", "labels")
MAX_SIZE = 4096      # --size: one image of 4096x4096 takes about 1.2 GB of memory while it is made (~70 bytes a pixel)


def check_space(out, n, size, per_pixel):
    """--n images of --size, at most per_pixel bytes a pixel on disk (image and masks or labels, uncompressed as a
    TIFF is), against the free space where --out goes: a UserError naming --n and both figures before writing."""
    path = os.path.abspath(out)
    while not os.path.exists(path):
        path = os.path.dirname(path)
    need, free = n * size * size * per_pixel, shutil.disk_usage(path).free
    if need > free:
        raise UserError(f"--n {n}: {n} images of {size}x{size} and their masks or labels take up to {need / 2**30:.1f} GiB on "
                        f"disk, and {path} has {free / 2**30:.1f} GiB free; pass a smaller --n or --size")


def prepare_out(out):
    """Makes `out` ready for a new synthetic set: a folder this script wrote before (its MARKER) has its data
    folders emptied (a smaller --n leaves no stale images); a folder holding anyone else's images is refused."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise UserError(f"--out {out} is a file; pass a folder (it is created if missing)")
    outputs.check_place(out, f"--out {out}", "make_demo_data.py", "Pass --out to a folder of its own (the default is "
                        "inputs/demo)", own={out: "a data set"})        # a data set: rewritten if this script's
    present = [d for d in DATA_FOLDERS if os.path.isdir(os.path.join(out, d)) and os.listdir(os.path.join(out, d))]
    if present and not os.path.isfile(os.path.join(out, MARKER)):
        raise UserError(f"--out {out} already holds {', '.join(d + '/' for d in present)} that this script did not "
                        "write; it never replaces a data set. Pass another --out (if it is a demo set from an earlier "
                        "version of the toolkit, delete that folder and run again)")
    for d in present:
        shutil.rmtree(os.path.join(out, d))
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, MARKER), "w") as f:
        f.write("synthetic data written by make_demo_data.py; it may rewrite this folder\n")


def generate(out, n=120, size=64, classes=Classes(), channels=3, seed=0):
    """Write n images and their masks under `out` in the images/ + masks/<class>/ layout (and with classes.names
    masks/names.txt); returns the ids."""
    prepare_out(out)
    rng = np.random.default_rng(seed)
    os.makedirs(os.path.join(out, "images"), exist_ok=True)
    for c in range(classes.count):
        os.makedirs(os.path.join(out, "masks", str(c)), exist_ok=True)
    if classes.names:
        with open(os.path.join(out, "masks", "names.txt"), "w") as f:
            f.write("".join(name + "\n" for name in classes.names_list()))
    ids = [f"img{i:04d}" for i in range(n)]
    for i in ids:
        img, masks = make_sample(rng, size, classes, channels)
        cv2.imwrite(os.path.join(out, "images", i + ".png"), img)
        for c, m in enumerate(masks):
            cv2.imwrite(os.path.join(out, "masks", str(c), i + ".png"), m)
    return ids


def nuclei_sample(rng, size, channels, dtype):
    """-> raw image (size, size) or (channels, size, size) in dtype with 12-bit-like intensities, uint16 label
    image: 3-8 discs of radius 4-9 px, every other one placed to touch the previous."""
    yy, xx = np.mgrid[0:size, 0:size]
    labels = np.zeros((size, size), np.uint16)
    centres = []
    for n in range(int(rng.integers(3, 9))):
        r = int(rng.integers(4, 10))
        if centres and n % 2:                          # touching its predecessor
            (py, px, pr), angle = centres[-1], rng.uniform(0, 2 * np.pi)
            cy, cx = py + (pr + r) * np.sin(angle), px + (pr + r) * np.cos(angle)
        else:
            cy, cx = rng.uniform(r, size - r, 2)
        disc = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
        labels[disc & (labels == 0)] = n + 1
        centres.append((cy, cx, r))
    signal = np.zeros((size, size))
    for k in range(1, labels.max() + 1):
        signal[labels == k] = rng.uniform(300, 3000)
    planes = []
    for c in range(channels):
        plane = 100 + cv2.GaussianBlur(signal * (1 if c == 0 else 0.3), (0, 0), 1.0) + rng.normal(0, 15, signal.shape)
        planes.append(plane.clip(0, 4095))
    image = np.stack(planes) if channels > 1 else planes[0]
    return image.astype(dtype), np.unique(labels, return_inverse=True)[1].reshape(size, size).astype(np.uint16)


def generate_microscopy(out, n=60, size=64, channels=1, seed=0, dtype=np.uint16):
    """Write n 16-bit (or float32) TIFF images and their uint16 TIFF label images under `out`
    (images/<id>.tif, labels/<id>.tif); returns the ids."""
    import tifffile
    prepare_out(out)
    rng = np.random.default_rng(seed)
    for d in ("images", "labels"):
        os.makedirs(os.path.join(out, d), exist_ok=True)
    ids = [f"cell{i:04d}" for i in range(n)]
    for i in ids:
        image, labels = nuclei_sample(rng, size, channels, dtype)
        meta = {"imagej": True, "metadata": {"axes": "CYX"}} if channels > 1 else {}
        tifffile.imwrite(os.path.join(out, "images", i + ".tif"), image, **meta)
        tifffile.imwrite(os.path.join(out, "labels", i + ".tif"), labels)
    return ids


def membrane_sample(rng, size):
    """-> uint8 image (size, size), uint8 mask (0/255): cells around random seeds (one per ~25x25 px) whose
    borders, where the nearest seed changes, are dark membranes 2-4 px wide; inside the cells, dark vesicles that
    are not membranes. The mask is the cells without their borders (about 80% of the image)."""
    from scipy import ndimage
    seeds = np.zeros((size, size), bool)
    count = max(4, size * size // 625)
    seeds[rng.integers(0, size, count), rng.integers(0, size, count)] = True
    _, (iy, ix) = ndimage.distance_transform_edt(~seeds, return_indices=True)
    cell = iy * size + ix                                             # which seed each pixel is nearest to
    border = np.zeros((size, size), bool)
    border[:, 1:] |= cell[:, 1:] != cell[:, :-1]
    border[1:, :] |= cell[1:, :] != cell[:-1, :]
    border = ndimage.binary_dilation(border, iterations=int(rng.integers(1, 3)))
    shade = rng.uniform(120, 200, count + 1)[np.unique(cell, return_inverse=True)[1].reshape(size, size)]
    vesicles = cv2.GaussianBlur((rng.random((size, size)) < 0.002).astype(np.float32), (0, 0), 1.5) * 400
    texture = cv2.GaussianBlur(rng.normal(0, 30, (size, size)), (0, 0), 2.0)
    img = np.where(border, 80.0, shade) - vesicles + texture
    img = cv2.GaussianBlur(img.astype(np.float32), (0, 0), 1.0) + rng.normal(0, 20, (size, size))
    return np.clip(img, 0, 255).astype(np.uint8), np.where(border, 0, 255).astype(np.uint8)


def generate_membranes(out, n=30, size=512, seed=0):
    """Write n grayscale membrane images (membrane_sample) and their one-class masks under `out`; returns the ids."""
    prepare_out(out)
    rng = np.random.default_rng(seed)
    for d in ("images", os.path.join("masks", "0")):
        os.makedirs(os.path.join(out, d), exist_ok=True)
    ids = [f"em{i:04d}" for i in range(n)]
    for i in ids:
        img, mask = membrane_sample(rng, size)
        cv2.imwrite(os.path.join(out, "images", i + ".png"), img)
        cv2.imwrite(os.path.join(out, "masks", "0", i + ".png"), mask)
    return ids


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="inputs/demo", help="output folder (default: inputs/demo)")
    p.add_argument("--n", type=int, default=120, help="number of images (default: 120)")
    p.add_argument("--size", type=int, default=64, help="image side in pixels (default: 64)")
    p.add_argument("--num_classes", type=int, default=1, choices=range(1, MAX_CLASSES + 1), metavar="N",
                   help=f"mask classes, 1 to {MAX_CLASSES} (default: 1)")
    p.add_argument("--channels", type=int, default=None, choices=(1, 2, 3),
                   help="1 = grayscale, 3 = RGB (default: 3); with --microscopy 1 or 2 fluorescence channels (default: 1)")
    p.add_argument("--microscopy", action="store_true", help="16-bit TIFF images with TIFF label images (labels/)")
    p.add_argument("--float32", action="store_true", help="with --microscopy: float32 TIFF images")
    p.add_argument("--exclusive", action="store_true", help="class 0 is the background (for --class_mode softmax)")
    p.add_argument("--void", action="store_true", help="with --exclusive: a 1-px ring around each blob in no class "
                   "(unlabelled, as the 'void' of street-scene sets)")
    p.add_argument("--names", action="store_true", help="also write masks/names.txt: the classes' names, one a line")
    p.add_argument("--membranes", action="store_true", help="grayscale cells separated by thin membranes, the mask "
                   "marking the cells (electron-microscopy-like; try --n 30 --size 512)")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    if a.n < 1 or not 16 <= a.size <= MAX_SIZE:
        p.error(f"--n must be at least 1 and --size between 16 and {MAX_SIZE}")
    if (a.exclusive and a.num_classes < 2) or (a.void and not a.exclusive):
        p.error("--exclusive needs --num_classes 2 or more (class 0 is the background), and --void needs --exclusive")
    if a.microscopy and (a.channels == 3 or a.num_classes > 1 or a.exclusive or a.names):
        p.error("--microscopy writes 1 or 2 channels and one class (label images): drop --num_classes/--exclusive/--names")
    if a.membranes and (a.microscopy or a.num_classes > 1 or a.exclusive or a.names or a.channels not in (None, 1)):
        p.error("--membranes writes one class of grayscale 8-bit images: drop the other data options")
    with exit_on_user_error():
        per_pixel = (2 if a.membranes else (a.channels or 1) * (4 if a.float32 else 2) + 2 if a.microscopy
                     else (a.channels or 3) + a.num_classes)      # bytes of an image and its masks or labels
        check_space(a.out, a.n, a.size, per_pixel)
        if a.membranes:
            generate_membranes(a.out, a.n, a.size, a.seed)
            print(f"wrote {a.n} grayscale membrane images and masks to {a.out}/images and {a.out}/masks/0")
            return
        if a.microscopy:
            generate_microscopy(a.out, a.n, a.size, a.channels or 1, a.seed, np.float32 if a.float32 else np.uint16)
            print(f"wrote {a.n} {'float32' if a.float32 else '16-bit'} TIFF images and label images to {a.out}/images "
                  f"and {a.out}/labels")
            return
        generate(a.out, a.n, a.size, Classes(a.num_classes, a.exclusive, a.void, a.names), a.channels or 3, a.seed)
    print(f"wrote {a.n} images and masks to {a.out}/images and {a.out}/masks/0..{a.num_classes - 1}" +
          (f" (their names in {a.out}/masks/names.txt)" if a.names else ""))


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.default_int_handler)   # from here on, main() handles Ctrl-C and SIGTERM
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    main()
