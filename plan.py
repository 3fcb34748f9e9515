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

from advice import MIN_STEPS, RARE_CLASS   # the thresholds train.py's start-up notes warn at
from archs import SIZE_MULTIPLE, training_bytes_per_pixel
from dataset import OBJECT_PLANES, Targets, read_target
from imagefiles import decode, image_type, read_labels
from losses import BORDER_WEIGHT, OBJECTS_LOSS, SOFTMAX_LOSSES
from pairing import scan
from splits import (SMALLEST_BATCH, crops_per_epoch, image_regions, largest_crop, region_cover, region_layout,
                    region_length, regions_said, uses_regions)
from utils import UserError, command, resolve_device

DERIVED = ("--target", "the files in")   # how config words a setting it derived (follow_target, follow_folder)
SURVEY_IMAGES = 48          # images read for the survey, evenly spread over the sorted ids
UNIFORM = 1.5               # largest / smallest side up to which images count as one size
WHOLE_LIMIT = {False: 256, True: 512}    # (cuda?) image sides up to which images train whole, at their own size
CROP_SIDE = {False: 128, True: 256}      # (cuda?) the crop side for larger images ...
OBJECTS_ACROSS = 3          # ... raised (up to twice) so that this many median objects fit across a crop
STEP_PIXELS = {False: 16 * 96 * 96, True: 32 * 256 * 256}   # (cuda?) input pixels per optimizer step, at most
BATCHES = (32, 16, 8, 4, SMALLEST_BATCH)  # batch sizes the plan picks from (BatchNorm needs more than one image)
TARGET_STEPS = {False: 1500, True: 3000}  # (cuda?) optimizer steps of the whole run (700 on a CPU left the
                                          # multi-class set at 0.55 IoU, 1416 steps reached 0.85: BENCHMARKS.md)
EPOCHS = (10, 400)          # the fewest and most epochs the plan gives
EMA_SPAN = 7                # the weights are averaged over about the last 1/EMA_SPAN of the run's steps ...
EMA_DECAY = (0.99, 0.995)   # ... within these decays (about the last 100 to 200 steps)
BACKGROUND = 0.5            # masks/0 covering more than this of the pixels is a background class (softmax)
REGION_CROP = 64            # the smallest crop side the plan splits one or two images into regions for


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
    sizes: tuple = ()               # (id, (h, w)) of each surveyed image (all of a data set split by regions)

    def line(self):
        cover = ", ".join(f"{100 * f:.1f}%" for f in self.foreground)
        objects = f", objects median {self.object_size:.0f} px" if self.object_size else ""
        channels = "1 channel" if self.channels == 1 else f"{self.channels} channels"
        classes = "1 class" if self.classes == 1 else f"{self.classes} classes"
        return (f"{self.images} image{'s' if self.images != 1 else ''}, median {self.width}x{self.height}, {channels} of {self.dtype}, {classes} "
                f"covering {cover} of the pixels{objects}")


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
    targets = Targets(objects=cfg["target"] == "objects")         # borders at the images' own size
    scanned = scan(root, cfg["img_ext"], cfg["mask_ext"], classes, objects=targets.objects)
    ids = list(scanned)
    picked = sorted({ids[round(k)] for k in np.linspace(0, len(ids) - 1, min(SURVEY_IMAGES, len(ids)))})
    shapes, channels, dtypes, covered, pixels, diameters, means = [], set(), set(), 0, 0, [], []
    for i in picked:
        img = image_type(decode(scanned[i].image), scanned[i].image)
        if img.dtype.kind in "ui":
            means.append(float(img.mean()) / np.iinfo(img.dtype).max)
        shapes.append(img.shape[:2])
        channels.add(img.shape[2] if img.ndim == 3 else 1)
        dtypes.add(img.dtype)
        target = read_target(scanned[i], img.shape[:2], targets)[0]
        covered, pixels = covered + target.reshape(-1, target.shape[2]).sum(0), pixels + target.shape[0] * target.shape[1]
        diameters.extend(object_diameters(scanned[i], target))
    sides = [s for shape in shapes for s in shape]
    widest = max(dtypes, key=lambda d: (d.kind == "f", d.itemsize))
    return Survey(images=len(ids), height=int(np.median([s[0] for s in shapes])),
                  width=int(np.median([s[1] for s in shapes])), smallest=min(sides), largest=max(sides),
                  channels=max(channels), dtype=str(widest), classes=classes,
                  foreground=tuple(float(c) / pixels for c in covered),
                  object_size=float(np.median(diameters)) if diameters else 0.0,
                  brightness=tuple(float(b) for b in np.percentile(means, (10, 90))) if means else (0.0, 0.0),
                  sizes=tuple((i, tuple(shape)) for i, shape in zip(picked, shapes)))


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
    side = crop_side(s, m)
    size = f"{s.width}x{s.height}" if uniform else f"from {s.smallest} to {s.largest} px a side"
    objects = f", objects median {s.object_size:.0f} px" if s.object_size else ""
    return Choice({"crop": True, "input_h": side, "input_w": side},
                  f"images are {size}{objects}: trained on {side}x{side} crops at full resolution; val.py predicts "
                  "whole images by tiles")


def crop_side(s, m):
    """The side of the crops of large images: CROP_SIDE, raised (up to twice) so that OBJECTS_ACROSS median objects
    fit across, at most the smallest image side."""
    side = CROP_SIDE[m.cuda]
    if s.object_size:
        side = max(side, min(2 * side, nearest_multiple(OBJECTS_ACROSS * s.object_size)))
    return min(side, max(SIZE_MULTIPLE, s.smallest // SIZE_MULTIPLE * SIZE_MULTIPLE))


def surveyed_sizes(s):
    """(h, w) of each surveyed image (the median size when the survey did not list them)."""
    return [size for _, size in s.sizes] or [(s.height, s.width)]


def by_regions(s, cfg, given):
    """Whether the plan splits the data set by regions (splits.uses_regions) for crops it plans: too few images to
    validate on whole images, --crop not turned off, no --folds."""
    batch = cfg["batch_size"] if "batch_size" in given else BATCHES[-1]
    return ("crop" not in given or bool(cfg["crop"])) and uses_regions(s.images, {**cfg, "crop": True,
                                                                                  "batch_size": batch})


def region_fit(s, val_split):
    """The largest crop side that fits a training and a validation region into every surveyed image."""
    return min(min(largest_crop(size, val_split), min(size) // SIZE_MULTIPLE * SIZE_MULTIPLE)
               for size in surveyed_sizes(s))


def plan_region_input(s, m, val_split):
    """One or two images, too few to validate on whole images: crops (the crop rule's side, at most region_fit) of
    a training region of each image, validated on another region (the line planned() adds says which)."""
    side = min(crop_side(s, m), region_fit(s, val_split))
    images = f"1 image of {s.width}x{s.height}" if s.images == 1 else f"{s.images} images of median {s.width}x{s.height}"
    return Choice({"crop": True, "input_h": side, "input_w": side},
                  f"{images}, too few to validate on whole images: trained on {side}x{side} crops from one region of "
                  "each image, validated on another (the last line says which); val.py predicts whole images by tiles")


def region_pairs(s, cfg):
    """[(training Region, validation Region)] of the surveyed images that the config's crops fit (planned() refuses a
    plan where one does not)."""
    found = [image_regions(size, (cfg["input_h"], cfg["input_w"]), cfg["val_split"]) for size in surveyed_sizes(s)]
    return [pair for pair in found if pair]


def epoch_samples(s, cfg, batch_size):
    """How many samples an epoch trains on in batches of batch_size: the training split's images, or in a split by
    regions the crops drawn from the training regions (splits.crops_per_epoch)."""
    pairs = region_pairs(s, cfg) if uses_regions(s.images, {**cfg, "batch_size": batch_size}) else None
    if not pairs:
        return s.images - math.ceil(cfg["val_split"] * s.images)
    return len(pairs) * crops_per_epoch([t.size for t, _ in pairs], (cfg["input_h"], cfg["input_w"]), batch_size)


def training_images(images, cfg):
    """How many of `images` the run trains on: those the validation split leaves (splits.split_for), less the
    fold validated on with --folds K."""
    train = images - math.ceil(cfg["val_split"] * images)
    if cfg["folds"] > 1:
        train -= train // cfg["folds"] + (1 if cfg["fold"] < train % cfg["folds"] else 0)
    return train


def check_enough(s, cfg, sources, root):
    """The smallest data set the plan handles: one whose training split fills the smallest batch it plans
    (BATCHES[-1], or the --batch_size given when smaller), or else one split by regions (by_regions) whose images
    hold them; a UserError before any plan is printed otherwise."""
    train = training_images(s.images, cfg)
    need = min(cfg["batch_size"], BATCHES[-1]) if "batch_size" in sources else BATCHES[-1]
    why = regions_refused(s, cfg, sources) if train < need else ""
    if not why:
        return
    folds = f" with fold {cfg['fold']} of --folds {cfg['folds']} held out too" if cfg["folds"] > 1 else ""
    smallest = (f"--plan auto needs at least {need} training images (its smallest batch: BatchNorm learns from more "
                "than one image)" if need > 1 else "a run needs at least one training image")
    raise UserError(f"{smallest}, and {root} holds {s.images} image(s), of which --val_split {cfg['val_split']:g}"
                    f"{folds} leaves {max(train, 0)} to train on; {why}. Add images" +
                    (", or train without --plan (with --batch_size 1)" if train >= 1 else ""))


def regions_refused(s, cfg, given):
    """Why a data set too small to validate on whole images cannot be split by regions either ('' when it can)."""
    regions = "one or two large images train on crops of a region of each image, validated on another region"
    if "crop" in given and not cfg["crop"]:
        return f"{regions}, which --crop false turns off"
    if cfg["folds"] > 1:
        return f"{regions}, but --folds needs whole images to fold"
    if "input_h" in given or "input_w" in given:      # the crops given: planned() checks that they fit
        return ""
    if region_fit(s, cfg["val_split"]) < REGION_CROP:
        return (f"{regions}, but these images (median {s.width}x{s.height}) are too small for that: crops of "
                f"{REGION_CROP} px, the smallest the plan trains on, need {region_length(REGION_CROP, cfg['val_split'])}"
                " px along an image's longer side")
    return ""


def plan_batch(s, m, cfg):
    """The largest batch that keeps MIN_STEPS optimizer steps per epoch and a step's pixels within STEP_PIXELS and
    half the memory; 2 at least. In a split by regions the steps count the crops that cover the training regions
    about once (an epoch then draws crops for MIN_STEPS batches at least: splits.crops_per_epoch)."""
    pixels = cfg["input_h"] * cfg["input_w"]
    step_bytes = training_bytes_per_pixel(cfg["arch"], cfg["base_channels"]) * pixels
    pairs = region_pairs(s, cfg) if uses_regions(s.images, {**cfg, "batch_size": BATCHES[-1]}) else []
    distinct = (len(pairs) * region_cover([t.size for t, _ in pairs], (cfg["input_h"], cfg["input_w"])) if pairs
                else s.images - math.ceil(cfg["val_split"] * s.images))
    def what(b):
        if pairs:
            return f"{epoch_samples(s, cfg, b)} random crops an epoch from training regions that hold about {distinct}"
        return f"{distinct} training image{'s' if distinct != 1 else ''}"
    for b in BATCHES:
        if distinct // b >= MIN_STEPS and b * pixels <= STEP_PIXELS[m.cuda] and b * step_bytes <= m.memory / 2:
            return Choice({"batch_size": b}, f"{what(b)} give {epoch_samples(s, cfg, b) // b} optimizer steps per "
                          f"epoch in batches of {b}")
    b = BATCHES[-1]
    return Choice({"batch_size": b}, f"{what(b)}: the smallest batch BatchNorm trains with gives "
                  f"{max(1, epoch_samples(s, cfg, b) // b)} optimizer step(s) per epoch")


def steps_per_epoch(s, cfg):
    """Optimizer steps per epoch of the config's batch on the surveyed data set (1 at least)."""
    return max(1, epoch_samples(s, cfg, cfg["batch_size"]) // cfg["batch_size"])


def plan_epochs(s, m, cfg):
    steps = steps_per_epoch(s, cfg)
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
    """Sigmoid classes with BCE + Dice, or softmax when masks/0 is a background drawn under the other classes. A
    class mode or loss the user gave decides the other."""
    rare = [f"class {c} ({100 * f:.2f}% of the pixels)" for c, f in enumerate(s.foreground) if f < RARE_CLASS]
    weighs = f"; its Dice term weighs {', '.join(rare)} by overlap, so a rare class is not ignored" if rare else ""
    if cfg["target"] == "objects":
        return Choice({"num_classes": len(OBJECT_PLANES), "class_mode": "sigmoid", "loss": OBJECTS_LOSS},
                      f"--target objects: a sigmoid per plane ({', '.join(OBJECT_PLANES)}), with a cross-entropy in "
                      f"which border pixels weigh {BORDER_WEIGHT:g}x + a Dice that pools the batch, so the thin borders "
                      "are learned")
    if "class_mode" in given or "loss" in given:
        softmax = cfg["class_mode"] == "softmax" if "class_mode" in given else cfg["loss"] in SOFTMAX_LOSSES
        why = f"as --{'class_mode' if 'class_mode' in given else 'loss'} {cfg['class_mode' if 'class_mode' in given else 'loss']} asks"
    else:
        softmax = s.classes > 1 and s.foreground[0] > BACKGROUND
        why = (f"masks/0 covers {100 * s.foreground[0]:.0f}% of the pixels: a background, so one class per pixel"
               if softmax else "a sigmoid per class" + (" (masks/0 is not a background)" if s.classes > 1 else ""))
    mode, loss = ("softmax", "CEDiceLoss") if softmax else ("sigmoid", "BCEDiceLoss")
    count = "1 class" if s.classes == 1 else f"{s.classes} classes"
    return Choice({"num_classes": s.classes, "class_mode": mode, "loss": loss},
                  f"{count}: {why}, with a cross-entropy + Dice loss{weighs}")


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
    if by_regions(s, cfg, kept):
        take(plan_region_input(s, m, cfg["val_split"]))
    else:
        take(plan_input(s, m, {k: cfg[k] for k in ("crop", "input_h", "input_w") if k in kept}))
    take(plan_batch(s, m, cfg))
    take(plan_epochs(s, m, cfg))
    take(plan_optimizer())
    take(plan_ema(steps_per_epoch(s, cfg) * cfg["epochs"]))
    return plan


def planned(cfg, sources):
    """--plan auto: the config with the planned settings, and the lines that say what was planned and why.
    sources: where each user-set key came from (flags, --config); those keys are not planned."""
    root = os.path.join(cfg["data_dir"], cfg["dataset"])
    s, m = survey(root, cfg, sources), machine(cfg["device"])
    check_enough(s, cfg, sources, root)
    choices = make_plan(s, m, cfg, sources)
    final = {**cfg, **{k: v for c in choices for k, v in c.settings.items()}}
    lines = [f"plan for {root} ({s.line()}) on the {'GPU' if m.cuda else 'CPU'}:"]
    lines += [f"  {c.flags():<44} {c.reason}" for c in choices]
    lines += region_line(s, final, root)
    followed = sorted(k for k, where in sources.items() if where.startswith(DERIVED))
    yours = sorted(k for k in sources if k not in ("name", "dataset", "data_dir", *followed))
    for where in sorted({sources[k] for k in followed}):
        lines.append(f"  set by {where}: {', '.join(k for k in followed if sources[k] == where)}")
    if yours:
        lines.append(f"  kept as given: {', '.join(yours)}")
    return final, choices, lines


def region_line(s, cfg, root):
    """[The plan's line on where the validation regions lie] for a data set split by regions, else []; an image that
    cannot hold them is refused as train.py would refuse it (splits.region_layout), before anything is printed."""
    if not uses_regions(s.images, cfg):
        return []
    region_layout([i for i, _ in s.sizes] or ["the median image"], surveyed_sizes(s), cfg, root)
    pairs = region_pairs(s, cfg)
    copies = crops_per_epoch([t.size for t, _ in pairs], (cfg["input_h"], cfg["input_w"]), cfg["batch_size"])
    return [f"  {regions_said(pairs, copies, cfg)} (split.csv records the regions; val.py scores the validation "
            "regions)"]
