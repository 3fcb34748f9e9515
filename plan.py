"""--plan auto: training settings chosen from the data set itself, as nnU-Net plans its runs.

survey() reads a sample of the data set (sizes, channels, bit depth, classes, how much each class covers, object
sizes); make_plan() turns that survey and the machine into settings, each with its reason. make_plan is a pure
function: the same survey and machine give the same plan. Settings the user gave (flags, --config) are kept, and
the rules after them use the user's values (a given --input_w sets the batch size the plan picks, say).
"""
import math
import os
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

import runtime
from advice import (MAJORITY, MIN_BATCH, MIN_BATCH_WHY, MIN_STEPS, RARE_CLASS, batch_for_steps,   # the notes' thresholds
                    majority_advice)
from archs import SIZE_MULTIPLE, build_model, final_logits, training_bytes_per_pixel
from dataset import OBJECT_PLANES, Targets, read_target
from imagefiles import decode, image_type, read_labels
from losses import BORDER_WEIGHT, LOSSES, OBJECTS_LOSS, OVERLAP_LOSSES, SOFTMAX_LOSSES
from pairing import class_names_file, scan
from splits import (crops_per_epoch, image_regions, largest_crop, region_cover, region_layout, region_length,
                    regions_said, uses_regions, windows)
from utils import UserError, command, duration, resolve_device

DERIVED = ("--target", "the files in", "the file ")   # how config words a setting it derived (follow_target,
                                                      # follow_folder)
SURVEY_IMAGES = 48          # images read for the survey, evenly spread over the sorted ids
UNIFORM = 1.5               # largest / smallest side up to which images count as one size
WHOLE_LIMIT = {False: 256, True: 512}    # (cuda?) image sides up to which images train whole, at their own size
CROP_SIDE = {False: 128, True: 256}      # (cuda?) the crop side for larger images ...
OBJECTS_ACROSS = 3          # ... raised (up to twice) so that this many median objects fit across a crop
SPECK = 3.0                 # a blob or label narrower than this (equivalent diameter, px) is a speck, not an object
OBJECTS_SHARE = 0.5         # object sizes mean something when objects hold this share of the foreground pixels
STEP_PIXELS = {False: 16 * 96 * 96, True: 32 * 256 * 256}   # (cuda?) input pixels per optimizer step, at most
BATCHES = (32, 16, 8, 4, MIN_BATCH)  # batch sizes the plan picks from (advice.MIN_BATCH at least)
TARGET_STEPS = {False: 1500, True: 3000}  # (cuda?) optimizer steps of the whole run (700 on a CPU left the
                                          # multi-class set at 0.55 IoU, 1416 steps reached 0.85: BENCHMARKS.md)
EPOCHS = (10, 400)          # the fewest and most epochs the plan gives
EMA_SPAN = 7                # the weights are averaged over about the last 1/EMA_SPAN of the run's steps ...
EMA_DECAY = (0.99, 0.995)   # ... within these decays (about the last 100 to 200 steps)
BACKGROUND = 0.5            # masks/0 covering more than this of the pixels is a background class (softmax)
OVERLAP = 0.01              # classes that share less than this of their marked pixels are exclusive (softmax) ...
UNMARKED = 0.1              # ... when at most this of the pixels is in no class (softmax counts them as class 0)
BUDGET_USE = 0.9            # a time budget's share the plan fills: the rest is room for an estimate off by 10%
                            # (training stops at the budget anyway, but a cut schedule ends before its low rates)
SENSIBLE_STEPS = 0.5        # under a time budget, the fewest sensible steps: this share of TARGET_STEPS (700 steps left
                            # the multi-class set at 0.55 IoU); below it the plan takes a narrower network or crops
NARROWER = (16, 8)          # the widths a time budget may take: width 16 scored as 32 on dsb2018_96 for a step 2.3x
                            # cheaper, width 8 0.002 below at a third of the cost (BENCHMARKS.md)
SMALLER_CROPS = (0.75, 0.5) # then crops this much smaller a side (of the planned crop; MIN_CROP at least)
MIN_CROP = 64               # the smallest crop side the plan makes smaller crops down to, and the smallest it splits
                            # one or two images into regions for
TIMING_SECONDS = 1.5        # the plan times the planned network's training steps for about this long ...
TIMED_STEPS = (2, 30)       # ... at least and at most this many, after one untimed step (the first allocates)


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
    sizes: tuple = ()               # (id, (h, w)) of each surveyed image (all of a data set split by regions)

    def line(self):
        cover = ", ".join(f"{100 * f:.1f}%" for f in self.foreground)
        objects = f", objects median {self.object_size:.0f} px" if self.object_size else ""
        channels = "1 channel" if self.channels == 1 else f"{self.channels} channels"
        classes = "1 class" if self.classes == 1 else f"{self.classes} classes"
        shared = (f"; {100 * self.overlap[0]:.1f}% of the marked pixels in two or more classes, "
                  f"{100 * self.unmarked:.1f}% of the pixels in none" if self.classes > 1 else "")
        return (f"{self.images} image{'s' if self.images != 1 else ''}, median {self.width}x{self.height}, "
                f"{channels} of {self.dtype}, {classes} covering {cover} of the pixels{shared}{objects}")


@dataclass
class Speed:
    """What the planned network costs on this machine, timed (time_training)."""
    step: float              # seconds a training step takes: forward, loss, backward, optimizer, weight average
    image: float             # seconds a validation image takes: a forward pass


@dataclass
class Machine:
    cuda: bool               # training on a CUDA GPU (else the CPU)
    memory: int              # bytes a training step may use
    speed: Callable | None = None   # config -> Speed of its network here (None: not timed, no duration planned)


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
    """The objects of one image: its label image's, else the blobs of class 0's mask, from SPECK px across to half
    the image (larger ones are a background, or a network of membranes) -> (their equivalent diameters, the pixels
    they hold, the foreground pixels: all the labels' or blobs')."""
    from scipy import ndimage
    labels = (read_labels(sample.labels, target.shape[:2]) if sample.labels
              else ndimage.label(target[:, :, 0])[0])
    areas = np.bincount(labels.ravel())[1:]
    areas = areas[areas > 0]
    diameters = np.sqrt(4 * areas / np.pi)
    objects = (diameters >= SPECK) & (diameters < min(target.shape[:2]) / 2)
    return diameters[objects], int(areas[objects].sum()), int(areas.sum())


def object_size(diameters, held, foreground):
    """The median object diameter the survey reports and the plan uses, or 0 when the masks are not objects: when
    objects (object_diameters) hold less than OBJECTS_SHARE of the foreground pixels (specks of a class, or one
    region spanning the image), a median of them would describe what the masks are not."""
    return float(np.median(diameters)) if len(diameters) and held >= OBJECTS_SHARE * foreground else 0.0


def survey(root, cfg, sources):
    """Reads up to SURVEY_IMAGES images of <root> (and their masks) -> Survey. The files are checked as training
    checks them; num_classes is the user's if given, else the count of masks/ folders."""
    classes = cfg["num_classes"] if "num_classes" in sources else class_count(root)
    targets = Targets(objects=cfg["target"] == "objects", invert=bool(cfg["invert_mask"]))   # borders at the
    scanned = scan(root, cfg["img_ext"], cfg["mask_ext"], classes, objects=targets.objects)  # images' own size
    ids = list(scanned)
    picked = sorted({ids[round(k)] for k in np.linspace(0, len(ids) - 1, min(SURVEY_IMAGES, len(ids)))})
    shapes, channels, dtypes, covered, shared, diameters, means = [], set(), set(), 0, np.zeros(4, np.int64), [], []
    in_objects = [0, 0]                                           # pixels in objects, foreground pixels
    for i in picked:
        img = image_type(decode(scanned[i].image), scanned[i].image)
        if img.dtype.kind in "ui":
            means.append(float(img.mean()) / np.iinfo(img.dtype).max)
        shapes.append(img.shape[:2])
        channels.add(img.shape[2] if img.ndim == 3 else 1)
        dtypes.add(img.dtype)
        target = read_target(scanned[i], img.shape[:2], targets)[0]
        covered, shared = covered + target.reshape(-1, target.shape[2]).sum(0), shared + sharing(target)
        found, held, foreground = object_diameters(scanned[i], target)
        diameters.extend(found)
        in_objects = [in_objects[0] + held, in_objects[1] + foreground]
    sides, pixels = [s for shape in shapes for s in shape], sum(h * w for h, w in shapes)
    widest = max(dtypes, key=lambda d: (d.kind == "f", d.itemsize))
    return Survey(images=len(ids), height=int(np.median([s[0] for s in shapes])),
                  width=int(np.median([s[1] for s in shapes])), smallest=min(sides), largest=max(sides),
                  channels=max(channels), dtype=str(widest), classes=classes,
                  foreground=tuple(float(c) / pixels for c in covered),
                  object_size=object_size(diameters, *in_objects),
                  brightness=tuple(float(b) for b in np.percentile(means, (10, 90))) if means else (0.0, 0.0),
                  overlap=(shared[1] / max(1, shared[0]), shared[3] / max(1, shared[2])),
                  unmarked=1 - shared[0] / pixels, names=tuple(class_names_file(root)[0]),
                  sizes=tuple((i, tuple(shape)) for i, shape in zip(picked, shapes)))


def sharing(target):
    """An image's (H, W, C) 0/1 target -> pixels marked by a class, by two or more; the same for classes 1 and up."""
    marks, above_0 = target.sum(2, dtype=np.int32), target[:, :, 1:].sum(2, dtype=np.int32)
    return np.array([(marks > 0).sum(), (marks > 1).sum(), (above_0 > 0).sum(), (above_0 > 1).sum()], np.int64)


def machine(device):
    """The Machine a --device names: a CUDA GPU and its memory, or the CPU and this machine's RAM, and the timer of
    its training steps."""
    dev = resolve_device(device)
    if dev.type == "cuda":
        memory = torch.cuda.get_device_properties(dev).total_memory
    else:
        memory = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return Machine(dev.type == "cuda", memory, Timer(device, memory))


class Timer:
    """Machine.speed for this machine: each network and batch shape timed once (time_training), then remembered.
    None for a step that would not fit in half the memory (the plan's batch rule; it is not risked here)."""

    def __init__(self, device, memory):
        self.device, self.memory, self.known = device, memory, {}

    def __call__(self, cfg):
        keys = ("arch", "base_channels", "deep_supervision", "input_channels", "num_classes", "batch_size", "input_h",
                "input_w", "loss", "amp", "memory_format")
        key = tuple(str(cfg[k]) for k in keys)
        if key not in self.known:
            need = (training_bytes_per_pixel(cfg["arch"], cfg["base_channels"]) * cfg["batch_size"] * cfg["input_h"]
                    * cfg["input_w"])
            self.known[key] = time_training(cfg, self.device) if need <= self.memory / 2 else None
        return self.known[key]


def time_training(cfg, device):
    """Times training steps of the network cfg describes on random batches of its batch shape, on the device, as
    the engine runs them (its precision and memory layout, the loss, AdamW, the weight average), and its forward
    passes in evaluation -> Speed. It leaves the random number generators as they were, so that a planned run
    trains as a rerun of its config.yml does."""
    rt = runtime.build(resolve_device(device), cfg)
    b, h, w = cfg["batch_size"], cfg["input_h"], cfg["input_w"]
    with torch.random.fork_rng(devices=[rt.device] if rt.cuda else []):
        net = rt.place_model(build_model(cfg)).train()
        params = list(net.parameters())
        average = [p.detach().clone() for p in params]     # the weight average the plan always sets
        try:
            optimizer = torch.optim.AdamW(params, lr=cfg["lr"], fused=rt.fused or None)
        except RuntimeError:                         # no fused AdamW for this device in this torch
            optimizer = torch.optim.AdamW(params, lr=cfg["lr"])
        criterion = LOSSES[cfg["loss"]]()
        images, masks = rt.place_batch(torch.randn(b, cfg["input_channels"], h, w),
                                       (torch.rand(b, cfg["num_classes"], h, w) > 0.5).float())

        def step():
            with rt.autocast():
                out = net(images)
                heads = out if cfg["deep_supervision"] else [out]
                loss = sum(criterion(o, masks) for o in heads) / len(heads)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            torch._foreach_lerp_(average, [p.detach() for p in params], 0.01)

        def forward():
            with torch.no_grad(), rt.autocast():
                final_logits(net(images), cfg["deep_supervision"]).float().sum().item()

        step_seconds = timed(step, rt, TIMING_SECONDS)
        net.eval()
        forward_seconds = timed(forward, rt, TIMING_SECONDS / 4)
    return Speed(step_seconds, forward_seconds / b)


def timed(fn, rt, seconds):
    """The mean seconds of fn() over TIMED_STEPS calls or `seconds`, after one untimed call. The mean, not the
    median: the run pays for the slow steps too (another program taking the CPU, say)."""
    fn()
    rt.synchronize()
    times, start = [], time.perf_counter()
    while len(times) < TIMED_STEPS[0] or (len(times) < TIMED_STEPS[1] and time.perf_counter() - start < seconds):
        t = time.perf_counter()
        fn()
        rt.synchronize()
        times.append(time.perf_counter() - t)
    return float(np.mean(times))


def nearest_multiple(side):
    """The multiple of SIZE_MULTIPLE (at least one) nearest to side: a network input side."""
    return max(SIZE_MULTIPLE, int(round(side / SIZE_MULTIPLE)) * SIZE_MULTIPLE)


def plan_input(s, m, given, scale=1.0):
    """Whole images at their own size, or crops (and prediction by tiles) of images too large or too varied; scale:
    crops this much smaller a side, for a time budget."""
    uniform = s.largest <= UNIFORM * s.smallest
    if given.get("crop") is False or (uniform and max(s.height, s.width) <= WHOLE_LIMIT[m.cuda]
                                      and not given.get("crop")):
        h, w = given.get("input_h", nearest_multiple(s.height)), given.get("input_w", nearest_multiple(s.width))
        why = ("at their own size" if (h, w) == (s.height, s.width) else f"resized to {w}x{h}" +
               (" (the input size given)" if "input_w" in given else f", the nearest multiple of {SIZE_MULTIPLE}"))
        return Choice({"crop": False, "input_h": h, "input_w": w}, f"images are {s.width}x{s.height}: trained whole, {why}")
    full = crop_side(s, m)
    side = smaller_crop(full, scale)
    size = f"{s.width}x{s.height}" if uniform else f"from {s.smallest} to {s.largest} px a side"
    objects = f", objects median {s.object_size:.0f} px" if s.object_size else ""
    smaller = f" ({full}x{full} without the time budget)" if side < full else ""
    return Choice({"crop": True, "input_h": side, "input_w": side},
                  f"images are {size}{objects}: trained on {side}x{side} crops{smaller} at full resolution; val.py "
                  "predicts whole images by tiles")


def smaller_crop(side, scale):
    """A crop side made smaller by `scale` for a time budget (1: as it is), MIN_CROP at least, never larger."""
    return min(side, max(MIN_CROP, nearest_multiple(side * scale)))


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


def plan_region_input(s, m, val_split, scale=1.0):
    """One or two images, too few to validate on whole images: crops (the crop rule's side, at most region_fit;
    smaller by `scale` for a time budget) of a training region of each image, validated on another region (the line
    planned() adds says which)."""
    full = min(crop_side(s, m), region_fit(s, val_split))
    side = smaller_crop(full, scale)
    images = f"1 image of {s.width}x{s.height}" if s.images == 1 else f"{s.images} images of median {s.width}x{s.height}"
    return Choice({"crop": True, "input_h": side, "input_w": side},
                  f"{images}, too few to validate on whole images: trained on {side}x{side} crops"
                  f"{f' ({full}x{full} without the time budget)' if side < full else ''} from one region of "
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
    if region_fit(s, cfg["val_split"]) < MIN_CROP:
        return (f"{regions}, but these images (median {s.width}x{s.height}) are too small for that: crops of "
                f"{MIN_CROP} px, the smallest the plan trains on, need {region_length(MIN_CROP, cfg['val_split'])}"
                " px along an image's longer side")
    return ""


def plan_batch(s, m, cfg):
    """The largest batch that keeps MIN_STEPS optimizer steps per epoch and a step's pixels within STEP_PIXELS and
    half the memory; else advice's floor, MIN_BATCH (the batch its steps note would suggest: they agree). In a split
    by regions the steps count the crops that cover the training regions about once (an epoch then draws crops for
    MIN_STEPS batches at least: splits.crops_per_epoch)."""
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
    samples = epoch_samples(s, cfg, MIN_BATCH) if pairs else distinct
    b = min(MIN_BATCH, batch_for_steps(samples))          # 1 only for a training split of one whole image
    why = MIN_BATCH_WHY if b == MIN_BATCH else "the one image"
    return Choice({"batch_size": b}, f"{what(b)}: batch {b} ({why}) gives "
                  f"{max(1, epoch_samples(s, cfg, b) // b)} optimizer step(s) per epoch")


def steps_per_epoch(s, cfg):
    """Optimizer steps per epoch of the config's batch on the surveyed data set (1 at least)."""
    return max(1, epoch_samples(s, cfg, cfg["batch_size"]) // cfg["batch_size"])


def wanted_epochs(s, m, cfg):
    """The epochs for about TARGET_STEPS optimizer steps, within EPOCHS."""
    steps = steps_per_epoch(s, cfg)
    return min(EPOCHS[1], max(EPOCHS[0], math.ceil(TARGET_STEPS[m.cuda] / steps)))


def plan_epochs(s, m, cfg):
    """Epochs for about TARGET_STEPS optimizer steps; with a time budget (and a timed machine), at most as many as
    fit in it, saying what that gives up."""
    steps, epochs = steps_per_epoch(s, cfg), wanted_epochs(s, m, cfg)
    aim = f"the plan aims at {TARGET_STEPS[m.cuda]} on this device"
    fit = budget_epochs(s, m, cfg)
    if fit is None or fit >= epochs:
        within = "" if fit is None else f"; within the {minutes(cfg['time_budget'])} time budget"
        return Choice({"epochs": epochs}, f"{epochs} epochs of {steps} steps: about {epochs * steps} optimizer steps "
                      f"({aim}){within}")
    fit = max(1, fit)
    return Choice({"epochs": fit}, f"{fit} epochs of {steps} steps: about {fit * steps} optimizer steps, what fits the "
                  f"{minutes(cfg['time_budget'])} time budget ({aim}: {epochs} epochs; {epochs - fit} given up)")


def plan_model(s, m, cfg, width=None):
    """UNet on a CPU, UNet++ on a GPU; width: a narrower network (base_channels), for a time budget."""
    if m.cuda:
        choice = Choice({"arch": "NestedUNet", "deep_supervision": False}, "UNet++ on a GPU (the reference's network)")
    else:
        choice = Choice({"arch": "UNet", "deep_supervision": False}, "UNet on a CPU: about 2.5x cheaper per image than "
                        "NestedUNet, for a similar IoU")
    if width:
        choice.settings["base_channels"] = width
        choice.reason += (f"; {width} channels wide instead of {cfg['base_channels']}, to fit the "
                          f"{minutes(cfg['time_budget'])} time budget")
    return choice


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
                  f"{count}{named}: {why}, {loss_words(cfg['loss'] if 'loss' in given else loss, 'loss' in given, rare)}"
                  f"{majority(s, cfg)}")


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


def loss_words(loss, given, rare):
    """The loss as the plan's class line says it (the planned cross-entropy + Dice, or the user's --loss), and that
    it weighs the rare classes by overlap only when it does: a loss without an overlap term gets advice's rare-class
    note at start-up instead, and the two never say the opposite."""
    said = f"with --loss {loss} (given)" if given else "with a cross-entropy + Dice loss"
    if rare and loss in OVERLAP_LOSSES:
        said += f"; its overlap term weighs {', '.join(rare)} by overlap, so a rare class is not ignored"
    return said


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
    set, in order (each rule sees the values before it, the user's included). Pure: nothing is read or written, and
    the machine's timings (m.speed) are the same for the same network. Under a time budget, when the fewest
    sensible epochs do not fit, the cheaper runs of cheaper_runs() are planned in turn until one does."""
    plan, planned_cfg = plan_rules(s, m, cfg, given, {})
    for cheaper in cheaper_runs(cfg, m, given):
        if fits(s, m, planned_cfg, given):
            break
        plan, planned_cfg = plan_rules(s, m, cfg, given, cheaper)
    return plan


def plan_rules(s, m, cfg, given, cheaper):
    """The rules in order -> ([Choice], the config they make); cheaper: {'width': base_channels, 'scale': of the
    crop side} for a time budget ({}: none)."""
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
    take(plan_model(s, m, cfg, cheaper.get("width")))
    if by_regions(s, cfg, kept):
        take(plan_region_input(s, m, cfg["val_split"], cheaper.get("scale", 1.0)))
    else:
        take(plan_input(s, m, {k: cfg[k] for k in ("crop", "input_h", "input_w") if k in kept},
                        cheaper.get("scale", 1.0)))
    take(plan_batch(s, m, cfg))
    take(plan_epochs(s, m, cfg))
    take(plan_optimizer())
    take(plan_ema(steps_per_epoch(s, cfg) * cfg["epochs"]))
    return plan, cfg


def cheaper_runs(cfg, m, given):
    """What a time budget may make cheaper, in this order, where the user did not set it: a narrower network
    (NARROWER), then smaller crops (SMALLER_CROPS). None without a budget or a timed machine."""
    if not cfg["time_budget"] or m.speed is None:
        return []
    widths = [] if "base_channels" in given else list(NARROWER)
    scales = [] if {"input_h", "input_w"} & set(given) else list(SMALLER_CROPS)
    return [{"width": w} for w in widths] + [{"width": widths[-1] if widths else None, "scale": k} for k in scales]


def fits(s, m, cfg, given):
    """Whether a planned config fits its time budget: the epochs the user gave, else the fewest sensible ones
    (SENSIBLE_STEPS of the target, at most the epochs wanted)."""
    fit = budget_epochs(s, m, cfg)
    if fit is None:
        return True
    steps = steps_per_epoch(s, cfg)
    sensible = min(wanted_epochs(s, m, cfg), math.ceil(SENSIBLE_STEPS * TARGET_STEPS[m.cuda] / steps))
    return fit >= (cfg["epochs"] if "epochs" in given else sensible)


# What the timed steps leave out, measured on the demo sets on a 2-core CPU (docs/training.md#how-long-a-run-takes):
START_SECONDS = 5.0         # a run's seconds besides its epochs, from the plan's line on: the data loaded, the network
                            # built, the first steps' warm-up, the last files and curves.png (4-5 s measured)
WORKERS_COST = (1.15, 0.3)  # --loader workers (crops, or --loader workers): its worker processes take about 15% of
                            # the steps' CPU, and start again each epoch (0.3 s): a real epoch of the em set took
                            # 1.1-1.5x its timed steps and validation; on the memory loader 0.94-1.04x


def epoch_seconds(s, cfg, speed):
    """An epoch's expected seconds: its optimizer steps, its validation inputs, and what the workers loader adds
    (the loader loaders.choose_loader takes for crops; the memory loader otherwise, unless --loader workers)."""
    share, start = WORKERS_COST if cfg["crop"] or cfg["loader"] == "workers" else (1.0, 0.0)
    return steps_per_epoch(s, cfg) * speed.step * share + validation_inputs(s, cfg) * speed.image + start


def validation_inputs(s, cfg):
    """The network inputs an epoch's validation predicts: the validation split's images, or in a split by regions
    the crop-sized windows covering each validation region (splits.windows)."""
    pairs = region_pairs(s, cfg) if uses_regions(s.images, cfg) else None
    if not pairs:
        return math.ceil(cfg["val_split"] * s.images)
    return sum(len(windows(v, (cfg["input_h"], cfg["input_w"]))) for _, v in pairs)


def run_seconds(s, cfg, speed):
    """A run's expected seconds from the plan's line on: START_SECONDS and its epochs."""
    return START_SECONDS + cfg["epochs"] * epoch_seconds(s, cfg, speed)


def budget_epochs(s, m, cfg):
    """How many epochs of this config fit in BUDGET_USE of its time budget on machine m (None: no budget, or no
    timing; 0 or less: not even one)."""
    speed = m.speed(cfg) if cfg["time_budget"] and m.speed is not None else None
    if speed is None:
        return None
    return math.floor((BUDGET_USE * 60 * cfg["time_budget"] - START_SECONDS) / epoch_seconds(s, cfg, speed))


def minutes(budget):
    """A time budget (minutes) as a message says it: '5 min', '2.5 min'."""
    return f"{budget:g} min"


def about(seconds):
    """An expected duration, rounded as an estimate is: '50s', '6m20s', '1h05m'."""
    return duration(round(seconds / 10) * 10 if seconds < 1200 else round(seconds / 60) * 60)


def expected(s, m, cfg):
    """The line that says how long the planned run (config cfg) is expected to take on this machine, and how it
    meets its time budget; '' when its steps were not timed."""
    speed = m.speed(cfg) if m.speed is not None else None
    if speed is None:
        return ""
    steps, epoch = steps_per_epoch(s, cfg), epoch_seconds(s, cfg, speed)
    total = run_seconds(s, cfg, speed)
    line = (f"expected: about {about(total)} on this {'GPU' if m.cuda else 'CPU'} ({speed.step:.2f} s a step, "
            f"{cfg['epochs'] * steps} steps, plus validation)")
    budget = 60 * cfg["time_budget"]
    if budget and total <= budget:
        line += f", within the {minutes(cfg['time_budget'])} time budget"
    elif budget:
        last = max(1, math.floor((budget - START_SECONDS) / epoch))
        line += (f": more than the {minutes(cfg['time_budget'])} time budget, which stops training after about epoch "
                 f"{last} of {cfg['epochs']}")
    return line


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
    return final, choices, lines + [line for line in [expected(s, m, final)] if line]


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
