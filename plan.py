"""--plan auto: training settings chosen from the data set itself, as nnU-Net plans its runs.

survey() reads a sample of the data set (sizes, channels, bit depth, classes, how much each class covers, object
sizes); make_plan() turns that survey and the machine into settings, each with its reason. make_plan is a pure
function: the same survey and machine give the same plan. Settings the user gave (flags, --config) are kept, and
the rules after them use the user's values (a given --input_w sets the batch size the plan picks, say).
"""
import math
import os
from dataclasses import dataclass

import numpy as np
import torch

from advice import MAJORITY, MIN_STEPS, RARE_CLASS, majority_advice   # what train.py's start-up notes warn at
from archs import SIZE_MULTIPLE, training_bytes_per_pixel
from dataset import OBJECT_PLANES, Targets, read_target
from imagefiles import decode, image_type, read_labels
from losses import BORDER_WEIGHT, OBJECTS_LOSS, SOFTMAX_LOSSES
from pairing import class_names_file, scan
from utils import UserError, command, resolve_device

DERIVED = ("--target", "the files in", "the file ")   # how config words a setting it derived (follow_target,
                                                      # follow_folder)
SURVEY_IMAGES = 48          # images read for the survey, evenly spread over the sorted ids
UNIFORM = 1.5               # largest / smallest side up to which images count as one size
WHOLE_LIMIT = {False: 256, True: 512}    # (cuda?) image sides up to which images train whole, at their own size
CROP_SIDE = {False: 128, True: 256}      # (cuda?) the crop side for larger images ...
OBJECTS_ACROSS = 3          # ... raised (up to twice) so that this many median objects fit across a crop
STEP_PIXELS = {False: 16 * 96 * 96, True: 32 * 256 * 256}   # (cuda?) input pixels per optimizer step, at most
BATCHES = (32, 16, 8, 4, 2)  # batch sizes the plan picks from (2 at least: BatchNorm needs more than one image)
TARGET_STEPS = {False: 1500, True: 3000}  # (cuda?) optimizer steps of the whole run (700 on a CPU left the
                                          # multi-class set at 0.55 IoU, 1416 steps reached 0.85: BENCHMARKS.md)
EPOCHS = (10, 400)          # the fewest and most epochs the plan gives
EMA_SPAN = 7                # the weights are averaged over about the last 1/EMA_SPAN of the run's steps ...
EMA_DECAY = (0.99, 0.995)   # ... within these decays (about the last 100 to 200 steps)
BACKGROUND = 0.5            # masks/0 covering more than this of the pixels is a background class (softmax)
OVERLAP = 0.01              # classes that share less than this of their marked pixels are exclusive (softmax) ...
UNMARKED = 0.1              # ... when at most this of the pixels is in no class (softmax counts them as class 0)


@dataclass
class Survey:
    """What make_plan knows of a data set (from up to SURVEY_IMAGES of its images)."""
    images: int              # images in the data set
    height: int              # median image height
    width: int               # median image width
    smallest: int            # the smallest side of any surveyed image
    largest: int             # the largest side of any surveyed image
    channels: int            # channels the image files hold (1: grayscale, 3: colour, any count in TIFF)
    dtype: str               # the widest pixel type: uint8, uint16 or float32
    classes: int             # mask classes: folders masks/0 .. ; 1 with label images only
    foreground: tuple        # per class, the fraction of the pixels its masks mark
    object_size: float       # median object diameter in pixels (label images, else class 0's blobs); 0 if none
    brightness: tuple = (0.0, 0.0)  # 10th and 90th percentile of the images' mean intensity, as a fraction of the
                                    # pixel type's range (integer types; (0, 0) for float images)
    overlap: tuple = (0.0, 0.0)     # of the pixels some class marks, the fraction two or more classes mark; the
                                    # same among classes 1 and up (masks/0 left out)
    unmarked: float = 0.0           # the fraction of the pixels no class marks
    names: tuple = ()               # the classes' names, from masks/names.txt

    def line(self):
        cover = ", ".join(f"{100 * f:.1f}%" for f in self.foreground)
        objects = f", objects median {self.object_size:.0f} px" if self.object_size else ""
        channels = "1 channel" if self.channels == 1 else f"{self.channels} channels"
        classes = "1 class" if self.classes == 1 else f"{self.classes} classes"
        shared = (f"; {100 * self.overlap[0]:.1f}% of the marked pixels in two or more classes, "
                  f"{100 * self.unmarked:.1f}% of the pixels in none" if self.classes > 1 else "")
        return (f"{self.images} images, median {self.width}x{self.height}, {channels} of {self.dtype}, {classes} "
                f"covering {cover} of the pixels{shared}{objects}")


@dataclass
class Machine:
    cuda: bool               # training on a CUDA GPU (else the CPU)
    memory: int              # bytes a training step may use


@dataclass
class Choice:
    """Planned settings that belong together, and why."""
    settings: dict           # config key -> value
    reason: str

    def flags(self):
        def flag(k, v):
            if isinstance(v, bool):
                return f"--{k}" if v else f"--{k} false"
            if isinstance(v, list):                 # class_names: one comma-separated word for the shell
                return command(f"--{k}", ",".join(map(str, v)))
            return command(f"--{k}", f"{v:g}" if isinstance(v, float) else v)
        return " ".join(flag(k, v) for k, v in self.settings.items())


def class_count(root):
    """The numbered folders masks/0, masks/1, ... -> their count (1 when there is no masks/: label images)."""
    masks = os.path.join(root, "masks")
    if not os.path.isdir(masks):
        return 1
    numbered = [d for d in os.listdir(masks) if d.isdigit() and os.path.isdir(os.path.join(masks, d))]
    return max(1, len(numbered))


def object_diameters(sample, target):
    """Equivalent diameters of the objects of one image: its label image's, else the blobs of class 0's mask.
    Objects as large as half the image (a background, a network of membranes) are left out."""
    from scipy import ndimage
    labels = (read_labels(sample.labels, target.shape[:2]) if sample.labels
              else ndimage.label(target[:, :, 0])[0])
    areas = np.bincount(labels.ravel())[1:]
    diameters = np.sqrt(4 * areas[areas > 0] / np.pi)
    return diameters[diameters < min(target.shape[:2]) / 2]


def survey(root, cfg, sources):
    """Reads up to SURVEY_IMAGES images of <root> (and their masks) -> Survey. The files are checked as training
    checks them; num_classes is the user's if given, else the count of masks/ folders."""
    classes = cfg["num_classes"] if "num_classes" in sources else class_count(root)
    targets = Targets(objects=cfg["target"] == "objects", invert=bool(cfg["invert_mask"]))   # borders at the
    scanned = scan(root, cfg["img_ext"], cfg["mask_ext"], classes, objects=targets.objects)  # images' own size
    ids = list(scanned)
    picked = sorted({ids[round(k)] for k in np.linspace(0, len(ids) - 1, min(SURVEY_IMAGES, len(ids)))})
    shapes, channels, dtypes, covered, shared, diameters, means = [], set(), set(), 0, np.zeros(4, np.int64), [], []
    for i in picked:
        img = image_type(decode(scanned[i].image), scanned[i].image)
        if img.dtype.kind in "ui":
            means.append(float(img.mean()) / np.iinfo(img.dtype).max)
        shapes.append(img.shape[:2])
        channels.add(img.shape[2] if img.ndim == 3 else 1)
        dtypes.add(img.dtype)
        target = read_target(scanned[i], img.shape[:2], targets)[0]
        covered, shared = covered + target.reshape(-1, target.shape[2]).sum(0), shared + sharing(target)
        diameters.extend(object_diameters(scanned[i], target))
    sides, pixels = [s for shape in shapes for s in shape], sum(h * w for h, w in shapes)
    widest = max(dtypes, key=lambda d: (d.kind == "f", d.itemsize))
    return Survey(images=len(ids), height=int(np.median([s[0] for s in shapes])),
                  width=int(np.median([s[1] for s in shapes])), smallest=min(sides), largest=max(sides),
                  channels=max(channels), dtype=str(widest), classes=classes,
                  foreground=tuple(float(c) / pixels for c in covered),
                  object_size=float(np.median(diameters)) if diameters else 0.0,
                  brightness=tuple(float(b) for b in np.percentile(means, (10, 90))) if means else (0.0, 0.0),
                  overlap=(shared[1] / max(1, shared[0]), shared[3] / max(1, shared[2])),
                  unmarked=1 - shared[0] / pixels, names=tuple(class_names_file(root)[0]))


def sharing(target):
    """An image's (H, W, C) 0/1 target -> pixels marked by a class, by two or more; the same for classes 1 and up."""
    marks, above_0 = target.sum(2, dtype=np.int32), target[:, :, 1:].sum(2, dtype=np.int32)
    return np.array([(marks > 0).sum(), (marks > 1).sum(), (above_0 > 0).sum(), (above_0 > 1).sum()], np.int64)


def machine(device):
    """The Machine a --device names: a CUDA GPU and its memory, or the CPU and this machine's RAM."""
    dev = resolve_device(device)
    if dev.type == "cuda":
        return Machine(True, torch.cuda.get_device_properties(dev).total_memory)
    return Machine(False, os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))


def nearest_multiple(side):
    """The multiple of SIZE_MULTIPLE (at least one) nearest to side: a network input side."""
    return max(SIZE_MULTIPLE, int(round(side / SIZE_MULTIPLE)) * SIZE_MULTIPLE)


def plan_input(s, m, given):
    """Whole images at their own size, or crops (and prediction by tiles) of images too large or too varied."""
    uniform = s.largest <= UNIFORM * s.smallest
    if given.get("crop") is False or (uniform and max(s.height, s.width) <= WHOLE_LIMIT[m.cuda]
                                      and not given.get("crop")):
        h, w = given.get("input_h", nearest_multiple(s.height)), given.get("input_w", nearest_multiple(s.width))
        why = ("at their own size" if (h, w) == (s.height, s.width) else f"resized to {w}x{h}" +
               (" (the input size given)" if "input_w" in given else f", the nearest multiple of {SIZE_MULTIPLE}"))
        return Choice({"crop": False, "input_h": h, "input_w": w}, f"images are {s.width}x{s.height}: trained whole, {why}")
    side = CROP_SIDE[m.cuda]
    if s.object_size:
        side = max(side, min(2 * side, nearest_multiple(OBJECTS_ACROSS * s.object_size)))
    side = min(side, max(SIZE_MULTIPLE, s.smallest // SIZE_MULTIPLE * SIZE_MULTIPLE))
    size = f"{s.width}x{s.height}" if uniform else f"from {s.smallest} to {s.largest} px a side"
    objects = f", objects median {s.object_size:.0f} px" if s.object_size else ""
    return Choice({"crop": True, "input_h": side, "input_w": side},
                  f"images are {size}{objects}: trained on {side}x{side} crops at full resolution; val.py predicts "
                  "whole images by tiles")


def training_images(images, cfg):
    """How many of `images` the run trains on: those the validation split leaves (splits.split_for), less the
    fold validated on with --folds K."""
    train = images - math.ceil(cfg["val_split"] * images)
    if cfg["folds"] > 1:
        train -= train // cfg["folds"] + (1 if cfg["fold"] < train % cfg["folds"] else 0)
    return train


def check_enough(s, cfg, sources, root):
    """The smallest data set the plan handles: one whose training split fills the smallest batch it plans
    (BATCHES[-1]), or one image when the user gave --batch_size; a UserError before any plan is printed otherwise."""
    train, need = training_images(s.images, cfg), 1 if "batch_size" in sources else BATCHES[-1]
    if train >= need:
        return
    folds = f" with fold {cfg['fold']} of --folds {cfg['folds']} held out too" if cfg["folds"] > 1 else ""
    smallest = (f"--plan auto needs at least {need} training images (its smallest batch: BatchNorm learns from more "
                "than one image)" if need > 1 else "a run needs at least one training image")
    raise UserError(f"{smallest}, and {root} holds {s.images} image(s), of which --val_split {cfg['val_split']:g}"
                    f"{folds} leaves {max(train, 0)} to train on. Add images (with one or two large images, cut each "
                    "into several image files with their masks)" +
                    (", or train without --plan (with --batch_size 1)" if train >= 1 else ""))


def plan_batch(s, m, cfg, val_split):
    """The largest batch that keeps MIN_STEPS optimizer steps per epoch and a step's pixels within STEP_PIXELS and
    half the memory; 2 at least."""
    train_images = s.images - math.ceil(val_split * s.images)
    pixels = cfg["input_h"] * cfg["input_w"]
    step_bytes = training_bytes_per_pixel(cfg["arch"], cfg["base_channels"]) * pixels
    for b in BATCHES:
        if train_images // b >= MIN_STEPS and b * pixels <= STEP_PIXELS[m.cuda] and b * step_bytes <= m.memory / 2:
            return Choice({"batch_size": b}, f"{train_images} training images give {train_images // b} optimizer "
                          f"steps per epoch in batches of {b}")
    return Choice({"batch_size": BATCHES[-1]}, f"{train_images} training image(s): the smallest batch BatchNorm "
                  f"trains with gives {max(1, train_images // 2)} optimizer step(s) per epoch")


def steps_per_epoch(s, batch_size, val_split):
    return max(1, (s.images - math.ceil(val_split * s.images)) // batch_size)


def plan_epochs(s, m, batch_size, val_split):
    steps = steps_per_epoch(s, batch_size, val_split)
    epochs = min(EPOCHS[1], max(EPOCHS[0], math.ceil(TARGET_STEPS[m.cuda] / steps)))
    return Choice({"epochs": epochs}, f"{epochs} epochs of {steps} steps: about {epochs * steps} optimizer steps "
                  f"(the plan aims at {TARGET_STEPS[m.cuda]} on this device)")


def plan_model(s, m):
    if m.cuda:
        return Choice({"arch": "NestedUNet", "deep_supervision": False}, "UNet++ on a GPU (the reference's network)")
    return Choice({"arch": "UNet", "deep_supervision": False}, "UNet on a CPU: about 2.5x cheaper per image than "
                  "NestedUNet, for a similar IoU")


def plan_channels(s):
    kind = {1: "grayscale", 3: "colour (RGB)"}.get(s.channels, f"{s.channels}-channel")
    return Choice({"input_channels": s.channels}, f"the images are {kind}")


def plan_normalize(s):
    """8-bit: / 255 and ImageNet's statistics, then each image standardised on its own, as nnU-Net does for every
    modality but CT. A rule on the images' brightness spread (on only above 25%) left it off the multi-class set,
    whose shapes vary in brightness from image to image: 0.55 against 0.63 with it (BENCHMARKS.md); on dsb2018_96 it
    gives +0.009. Wider types: percentiles, per image already."""
    if s.dtype == "uint8":
        low, high = s.brightness
        return Choice({"normalize": "imagenet", "per_image_norm": True},
                      f"8-bit images (mean brightness {100 * low:.0f}% to {100 * high:.0f}% of the range, 10th to 90th "
                      "percentile): / 255, then each image standardised on its own, so its contrast, not its exposure, "
                      "is learned")
    return Choice({"normalize": "percentile", "per_image_norm": False},
                  f"{s.dtype} images: per image, the 1st and 99.8th percentiles -> 0 and 1 (as CSBDeep/StarDist), "
                  "whatever the microscope's range")


def plan_classes(s, cfg, given):
    """Sigmoid classes with BCE + Dice, or softmax when the data says each pixel is one class (exclusive_classes).
    A class mode or loss the user gave decides the other. The classes' names come with them (masks/names.txt)."""
    rare = [f"class {c} ({100 * f:.2f}% of the pixels)" for c, f in enumerate(s.foreground) if f < RARE_CLASS]
    weighs = f"; its Dice term weighs {', '.join(rare)} by overlap, so a rare class is not ignored" if rare else ""
    if cfg["target"] == "objects":
        return Choice({"num_classes": len(OBJECT_PLANES), "class_mode": "sigmoid", "loss": OBJECTS_LOSS},
                      f"--target objects: a sigmoid per plane ({', '.join(OBJECT_PLANES)}), with a cross-entropy in "
                      f"which border pixels weigh {BORDER_WEIGHT:g}x + a Dice that pools the batch, so the thin borders "
                      "are learned")
    if "class_mode" in given or "loss" in given:
        key = "class_mode" if "class_mode" in given else "loss"
        softmax = cfg["class_mode"] == "softmax" if key == "class_mode" else cfg["loss"] in SOFTMAX_LOSSES
        why = f"as --{key} {cfg[key]} asks"
    else:
        softmax, why = exclusive_classes(s)
    mode, loss = ("softmax", "CEDiceLoss") if softmax else ("sigmoid", "BCEDiceLoss")
    count = "1 class" if s.classes == 1 else f"{s.classes} classes"
    names = {"class_names": list(s.names)} if s.names and len(s.names) == s.classes else {}
    named = " (their names from masks/names.txt)" if names else ""
    return Choice({"num_classes": s.classes, "class_mode": mode, "loss": loss, **names},
                  f"{count}{named}: {why}, with a cross-entropy + Dice loss{weighs}{majority(s, cfg)}")


def exclusive_classes(s):
    """-> (softmax?, why) from what the masks mark. Softmax when the classes rarely share a pixel (under OVERLAP of
    the pixels they mark; with masks/0 a background covering most pixels, drawn under the others or not, the
    smaller of that share with and without it) and masks/0 is such a background or few pixels are in no class
    (at most UNMARKED: gaps, 'void', which softmax counts as class 0, the background). Otherwise a sigmoid per
    class: classes that overlap, or a background no mask marks while masks/0 is a class of its own (softmax would
    fold that background into it)."""
    if s.classes == 1:
        return False, "a sigmoid"
    background = s.foreground[0] > BACKGROUND
    shared = min(s.overlap) if background else s.overlap[0]
    if shared >= OVERLAP:
        return False, (f"{100 * shared:.1f}% of the marked pixels are in two or more classes (softmax needs under "
                       f"{100 * OVERLAP:g}%): a sigmoid per class")
    unmarked = f"the {100 * s.unmarked:.1f}% of the pixels no class marks count as class 0, the background"
    if background:
        return True, (f"masks/0 covers {100 * s.foreground[0]:.0f}% of the pixels: a background, so one class per "
                      f"pixel (softmax; a pixel masks/0 and another class mark is that class; {unmarked})")
    if s.unmarked <= UNMARKED:
        return True, (f"the classes are exclusive ({100 * shared:.2f}% of the marked pixels in two or more): one "
                      f"class per pixel (softmax); {unmarked}")
    return False, (f"the classes are exclusive but {100 * s.unmarked:.0f}% of the pixels are in none, and masks/0 "
                   f"({100 * s.foreground[0]:.0f}%) is a class, not that background: a sigmoid per class (for one "
                   "class per pixel, make masks/0 the background: every pixel no other class marks)")


def majority(s, cfg):
    """'; class 0 covers 78% ...: --invert_mask ...' for one class covering most pixels (advice.majority_advice)."""
    if s.classes != 1 or cfg["target"] != "masks" or cfg["invert_mask"] or s.foreground[0] <= MAJORITY:
        return ""
    return "; " + majority_advice(s.foreground[0], "the pixels")


def plan_optimizer():
    return Choice({"optimizer": "AdamW", "lr": 1e-3, "weight_decay": 1e-4, "scheduler": "CosineAnnealingLR",
                   "min_lr": 1e-5}, "AdamW with a cosine schedule: the best of the recipes (BENCHMARKS.md) on a CPU and a GPU")


def plan_ema(steps):
    """An average of the weights, always: the raw weights' validation IoU fell from 0.78 to 0.23 between two epochs
    on dsb2018_96, the averaged ones never more than 0.002 (BENCHMARKS.md). It spans about 1/EMA_SPAN of the run."""
    decay = round(min(EMA_DECAY[1], max(EMA_DECAY[0], 1 - EMA_SPAN / max(1, steps))), 3)
    span = round(1 / (1 - decay))
    over = (f"about the last {span} of the run's {steps} steps" if span < steps else
            f"the run's {steps} steps, the later ones weighing more")   # a run shorter than the average's span
    return Choice({"ema": decay}, f"the model saved is an average of the weights over {over} (raw weights can "
                  "collapse between epochs)")


def make_plan(s, m, cfg, given):
    """Survey s, Machine m, the config so far and the keys the user set -> [Choice] for the keys the user did not
    set, in order (each rule sees the values before it, the user's included). Pure: nothing is read or written."""
    cfg, plan = dict(cfg), []

    kept = set(given)                 # the user's keys, and those a rule settled for good

    def take(choice):
        mine = {k: v for k, v in choice.settings.items() if k not in kept}
        cfg.update(mine)
        if mine:
            plan.append(Choice(mine, choice.reason))

    sides = [k for k in ("input_h", "input_w") if k in kept]
    if len(sides) == 1:                                           # one side given: a square input
        other = "input_w" if sides[0] == "input_h" else "input_h"
        take(Choice({other: cfg[sides[0]]}, f"a square input, as --{sides[0]} {cfg[sides[0]]}"))
        kept.add(other)
    take(plan_channels(s))
    take(plan_classes(s, cfg, given))
    take(plan_normalize(s))
    take(plan_model(s, m))
    take(plan_input(s, m, {k: cfg[k] for k in ("crop", "input_h", "input_w") if k in kept}))
    take(plan_batch(s, m, cfg, cfg["val_split"]))
    take(plan_epochs(s, m, cfg["batch_size"], cfg["val_split"]))
    take(plan_optimizer())
    take(plan_ema(steps_per_epoch(s, cfg["batch_size"], cfg["val_split"]) * cfg["epochs"]))
    return plan


def planned(cfg, sources):
    """--plan auto: the config with the planned settings, and the lines that say what was planned and why.
    sources: where each user-set key came from (flags, --config); those keys are not planned."""
    root = os.path.join(cfg["data_dir"], cfg["dataset"])
    s, m = survey(root, cfg, sources), machine(cfg["device"])
    check_enough(s, cfg, sources, root)
    choices = make_plan(s, m, cfg, sources)
    lines = [f"plan for {root} ({s.line()}) on the {'GPU' if m.cuda else 'CPU'}:"]
    lines += [f"  {c.flags():<44} {c.reason}" for c in choices]
    followed = sorted(k for k, where in sources.items() if where.startswith(DERIVED))
    yours = sorted(k for k in sources if k not in ("name", "dataset", "data_dir", *followed))
    for where in sorted({sources[k] for k in followed}):
        lines.append(f"  set by {where}: {', '.join(k for k in followed if sources[k] == where)}")
    if yours:
        lines.append(f"  kept as given: {', '.join(yours)}")
    return {**cfg, **{k: v for c in choices for k, v in c.settings.items()}}, choices, lines
