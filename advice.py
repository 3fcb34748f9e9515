"""What a run's settings mean for its data set, said before and after training.

At start-up: images shrunk far below their size to the network input, too few optimizer steps per
epoch, a class with almost no foreground. After training and in val.py: the IoU of the trivial
predictions (every pixel background, every pixel foreground), which a model has to beat by a margin
before its own IoU means anything (on a set whose foreground fills most of each image, "foreground
everywhere" alone scores high).
"""
from dataclasses import dataclass

import numpy as np

from losses import OVERLAP_LOSSES

SHRINK_WARN = 2.0      # an image more than this many times larger than the network input (either side) loses
                       # detail when shrunk to it: train.py's start-up note and val.py's --tile note warn
MIN_STEPS = 10         # optimizer steps per epoch below which a run learns little per epoch
MIN_BATCH = 2          # the smallest batch the plan chooses and the notes suggest: BatchNorm's statistics then span
                       # more than one image (a smaller batch only where the training split has one image)
MIN_BATCH_WHY = "the smallest batch whose BatchNorm statistics span more than one image"
RARE_CLASS = 0.01      # a class covering less of the training pixels than this
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


def shrink_factor(size, cfg):
    """How many times an image of size (h, w) is shrunk to the network input: its larger side's factor."""
    return max(size[0] / cfg["input_h"], size[1] / cfg["input_w"])


def shrunk_enough_to_warn(size, cfg):
    """Whether an image of size (h, w), resized to the network input, is shrunk more than SHRINK_WARN times."""
    return shrink_factor(size, cfg) > SHRINK_WARN


def shrunk_note(sizes, cfg):
    """A note when the images (their median size) are shrunk enough to warn to the network input ('' if not)."""
    if cfg["crop"] or not sizes:
        return ""
    h, w = (int(np.median([s[k] for s in sizes])) for k in (0, 1))
    if not shrunk_enough_to_warn((h, w), cfg):
        return ""
    return (f"the images (median {w}x{h}) are shrunk {shrink_factor((h, w), cfg):.1f}x to the {cfg['input_w']}x"
            f"{cfg['input_h']} network input, so thin or small structures may vanish; train on crops of the images at "
            "full resolution instead (--crop; val.py then predicts whole images by tiles), or give a larger "
            "--input_w/--input_h")


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


def startup_notes(cfg, train_data, processes=1):
    """Every start-up note for this config on this training split."""
    notes = [shrunk_note(train_data.sizes, cfg), steps_note(len(train_data.ids), cfg, processes)]
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
    crops = "" if crop else " or on crops (--crop)"
    return (f"{what} {iou:.4f} does not beat predicting {which} everywhere ({baseline.best:.4f}) by {MARGIN}: the model "
            f"has learned little. Check the masks, train longer{crops}, or start from a recipe (--config recipes/...)")
