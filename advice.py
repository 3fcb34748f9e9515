"""What a run's settings mean for its data set, said before and after training.

At start-up: images shrunk or stretched far from their size to the network input (the worst named),
too few optimizer steps per epoch, a class with almost no foreground. After training and in val.py: the
IoU of the trivial predictions (every pixel background, every pixel foreground), which a model has to beat by a margin
before its own IoU means anything (on a set whose foreground fills most of each image, "foreground
everywhere" alone scores high).
"""
from dataclasses import dataclass

import numpy as np

from archs import SIZE_MULTIPLE
from losses import OVERLAP_LOSSES

RESIZE_WARN = 2.0      # an image resized to the network input by more than this factor along a side gets a warning
                       # (train.py at start-up, val.py for --data/--images): shrunk, it loses detail; stretched, the
                       # network sees it magnified, made of interpolated pixels
NAMED = 3              # images such a warning names, the most resized first
MIN_STEPS = 10         # optimizer steps per epoch below which a run learns little per epoch
MIN_BATCH = 2          # the smallest batch the plan chooses and the notes suggest: BatchNorm's statistics then span
                       # more than one image (a smaller batch only where the training split has one image)
MIN_BATCH_WHY = "the smallest batch whose BatchNorm statistics span more than one image"
RARE_CLASS = 0.01      # a class covering less of the training pixels than this
MAJORITY = 0.5         # one class covering more of the training pixels than this: its complement may be the point
MARGIN = 0.05          # how much IoU a model must gain over the better trivial prediction


@dataclass
class Trivial:
    """Mean IoU over the classes of predicting the same thing at every pixel."""
    background: float      # nothing (sigmoid) / class 0 (softmax) everywhere
    foreground: float      # every class (sigmoid) / the most common other class (softmax) everywhere
    foreground_what: str   # what 'foreground' predicted, in words

    @property
    def best(self):
        return max(self.background, self.foreground)

    def line(self):
        return (f"trivial predictions score IoU {self.background:.4f} (background everywhere) and "
                f"{self.foreground:.4f} ({self.foreground_what} everywhere)")


def resize_factor(size, cfg):
    """How an image of size (h, w) is resized to the network input: (factor >= 1, 'shrunk' or 'stretched'), for the
    side resized the most (a 20x20000 image into 32x32 is shrunk 625x, a 1x1 one stretched 32x)."""
    ratios = (size[0] / cfg["input_h"], size[1] / cfg["input_w"])
    shrink, stretch = max(ratios), 1 / min(ratios)
    return (shrink, "shrunk") if shrink >= stretch else (stretch, "stretched")


def resized_images(ids, sizes, cfg):
    """The one rule for both scripts' warnings: the images resized by more than RESIZE_WARN ->
    {'shrunk': [(factor, id, (h, w)), ...], 'stretched': [...]}, each list the most resized first."""
    found = {"shrunk": [], "stretched": []}
    for i, size in zip(ids, sizes):
        factor, how = resize_factor(size, cfg)
        if factor > RESIZE_WARN:
            found[how].append((factor, i, tuple(size)))
    return {how: sorted(images, key=lambda x: -x[0]) for how, images in found.items()}


def times(factor):
    return f"{factor:.1f}x" if factor < 10 else f"{factor:.0f}x"


def resized_line(how, images, total, cfg):
    """What resized_images found of one kind, naming up to NAMED images: '2 of 120 images are shrunk more than 2x
    to the 96x96 network input: img7 (20000x20, 625x), img3 (512x512, 5.3x)', or for a whole set of one size
    'all 12 images (512x512) are shrunk 5.3x to ...'."""
    target = f"the {cfg['input_w']}x{cfg['input_h']} network input"
    if len(images) == total and len({size for _, _, size in images}) == 1:
        h, w = images[0][2]
        which = f"the image ({w}x{h}) is" if total == 1 else f"all {total} images ({w}x{h}) are"
        return f"{which} {how} {times(images[0][0])} to {target}"
    named = ", ".join(f"{i} ({w}x{h}, {times(f)})" for f, i, (h, w) in images[:NAMED])
    more = f" and {len(images) - NAMED} more" if len(images) > NAMED else ""
    which = (f"all {total} images are" if len(images) == total else
             f"{len(images)} of {total} images {'is' if len(images) == 1 else 'are'}")
    return f"{which} {how} more than {RESIZE_WARN:g}x to {target}: {named}{more}"


def odd_ones(images, total):
    """A few resized images among many that are not are often files saved wrongly: '' or the words that say so."""
    return "check them (images of another size than most are often mis-saved files), or " \
        if len(images) <= total // 2 else ""


def resize_notes(ids, sizes, cfg):
    """train.py's start-up notes on the images resized by more than RESIZE_WARN to the network input, one for those
    shrunk and one for those stretched ([] with --crop: crops are taken at full resolution)."""
    if cfg["crop"] or not sizes:
        return []
    found, notes = resized_images(ids, sizes, cfg), []
    if found["shrunk"]:
        notes.append(f"{resized_line('shrunk', found['shrunk'], len(sizes), cfg)}, so thin or small structures may "
                     f"vanish; {odd_ones(found['shrunk'], len(sizes))}train on crops of the images at full resolution "
                     "instead (--crop; val.py then predicts whole images by tiles), or give a larger "
                     "--input_w/--input_h")
    if found["stretched"]:
        h, w = (int(np.median([s[k] for s in sizes])) for k in (0, 1))
        notes.append(f"{resized_line('stretched', found['stretched'], len(sizes), cfg)}: the network learns them "
                     "magnified, made of interpolated pixels, each at the cost of a full input; "
                     f"{odd_ones(found['stretched'], len(sizes))}give a smaller --input_w/--input_h (the images' "
                     f"median size is {w}x{h}: e.g. --input_w {nearest_side(w)} --input_h {nearest_side(h)})")
    return notes


def nearest_side(side):
    """The network input side (a multiple of SIZE_MULTIPLE, at least one) nearest to an image side."""
    return max(SIZE_MULTIPLE, round(side / SIZE_MULTIPLE) * SIZE_MULTIPLE)


def batch_for_steps(n_train, processes=1):
    """The batch for n_train training images (over `processes`): the largest that gives MIN_STEPS optimizer steps an
    epoch, never below MIN_BATCH, nor above the images a process has (a larger batch would drop every one). The plan
    chooses no larger batch, and the steps note suggests this one: they never disagree."""
    return max(1, min(n_train // processes, max(MIN_BATCH, n_train // (MIN_STEPS * processes))))


def steps_note(n_train, cfg, processes=1):
    """A note when an epoch makes fewer than MIN_STEPS optimizer steps and the batch of batch_for_steps would make
    more ('' if not: at MIN_BATCH the batch is as small as it goes, and the epochs are the run's length)."""
    steps = n_train // (cfg["batch_size"] * processes)
    batch = batch_for_steps(n_train, processes)
    if steps >= MIN_STEPS or n_train // (batch * processes) <= steps:
        return ""
    return (f"an epoch makes only {steps} optimizer step(s) ({n_train} training images, --batch_size "
            f"{cfg['batch_size']}); --batch_size {batch} gives {n_train // (batch * processes)} per epoch, or "
            "train for more --epochs")


def rare_class_notes(target_pixels, sizes, cfg):
    """A note per class covering less than RARE_CLASS of the training pixels (not class 0 in softmax mode)."""
    if target_pixels is None or cfg["loss"] in OVERLAP_LOSSES:
        return []
    total = sum(h * w for h, w in sizes)
    first = 1 if cfg["class_mode"] == "softmax" else 0
    fractions = target_pixels.sum(0) / max(total, 1)
    better = "CEDiceLoss" if cfg["class_mode"] == "softmax" else "BCEDiceLoss"
    return [f"class {c} covers {100 * f:.2f}% of the training pixels; with --loss {cfg['loss']} a model can score "
            f"well by missing it. A loss that weighs overlap (--loss {better}) suits rare classes"
            for c, f in enumerate(fractions) if c >= first and 0 < f < RARE_CLASS]


def majority_advice(fraction, where):
    """What to say of one class covering `fraction` (above MAJORITY) of `where` ('the training pixels')."""
    return (f"class 0 covers {100 * fraction:.0f}% of {where}, so its IoU is high for little; if the other "
            f"{100 * (1 - fraction):.0f}% (membranes, borders, background) is the class that matters, --invert_mask "
            "trains on it (val.py scores both either way)")


def majority_note(target_pixels, sizes, cfg):
    """A note when the one class of a run covers more than MAJORITY of the training pixels ('' if not)."""
    if target_pixels is None or not sizes or cfg["num_classes"] != 1 or cfg["target"] != "masks" or \
            cfg.get("invert_mask"):
        return ""
    fraction = float(target_pixels.sum()) / max(1, sum(h * w for h, w in sizes))
    return majority_advice(fraction, "the training pixels") if fraction > MAJORITY else ""


def startup_notes(cfg, train_data, processes=1, val_data=None):
    """Every start-up note for this config on this training split (and validation split: its images are resized
    too)."""
    every = [train_data] + ([val_data] if val_data is not None else [])
    ids, sizes = [i for d in every for i in d.ids], [s for d in every for s in (d.sizes or [])]
    notes = resize_notes(ids, sizes, cfg) + [steps_note(len(train_data.ids), cfg, processes),
                                             majority_note(train_data.target_pixels, train_data.sizes, cfg)]
    return [n for n in notes if n] + rare_class_notes(train_data.target_pixels, train_data.sizes or [], cfg)


def trivial(target_pixels, sizes, class_mode):
    """The Trivial IoUs on images with these target pixel counts (N, C) and sizes, as the data-set-level
    metrics count them (a class absent from truth and prediction scores 1)."""
    total = sum(h * w for h, w in sizes)
    present = target_pixels.sum(0).astype(np.float64)

    def everywhere(classes):
        return float(np.mean([present[c] / total if c in classes else float(present[c] == 0)
                              for c in range(len(present))]))
    if class_mode == "softmax":
        common = 1 + int(np.argmax(present[1:])) if len(present) > 1 else 0
        return Trivial(everywhere({0}), everywhere({common}), f"class {common}")
    return Trivial(everywhere(set()), everywhere(set(range(len(present)))), "foreground")


def beats(iou, baseline, what="IoU", crop=False):
    """A warning ('' if none) when a model's IoU (`what`: its name) is not MARGIN above the better trivial
    prediction. crop: the run trained on crops already (--crop is then not suggested)."""
    if iou >= baseline.best + MARGIN:
        return ""
    which = "background" if baseline.background >= baseline.foreground else baseline.foreground_what
    if baseline.best + MARGIN > 1:       # nothing can beat it: the masks, not the model, decide the score
        marks = "(almost) nothing" if which == "background" else "(almost) every pixel"
        return (f"{what} {iou:.4f}: predicting {which} everywhere already scores {baseline.best:.4f} on these images, "
                f"as their masks mark {marks}, so no model can beat it by {MARGIN} and the score says little about "
                "this one. Check the masks, and evaluate on images that have something to find")
    crops = "" if crop else " or on crops (--crop)"
    return (f"{what} {iou:.4f} does not beat predicting {which} everywhere ({baseline.best:.4f}) by {MARGIN}: the model "
            f"has learned little. Check the masks, train longer{crops}, or start from a recipe (--config recipes/...)")
