"""Segmentation losses on logits (B, C, H, W) and 0/1 targets (B, C, H, W), and a registry by name.

Sigmoid losses treat each class as an independent binary problem (the reference's multi-label
behaviour). Softmax losses (CrossEntropyLoss, CEDiceLoss) are for mutually exclusive classes:
the data set's target is already one-hot (dataset.exclusive: a pixel no mask marks is class 0,
one that two masks mark is the higher class), its argmax is the class index, and prediction is
the argmax of the logits; the metrics score the same one-hot target.
"""
import torch
import torch.nn.functional as F
from torch import nn

SMOOTH = 1e-5  # keeps soft Dice defined on empty images, as in the reference


def soft_dice_loss(probs, target):
    """1 - soft Dice, computed per image and class, then averaged (in float32 under autocast)."""
    probs, target = probs.float(), target.float()
    inter = (probs * target).sum((2, 3))
    dice = (2 * inter + SMOOTH) / (probs.sum((2, 3)) + target.sum((2, 3)) + SMOOTH)
    return 1 - dice.mean()


class BCEWithLogitsLoss(nn.Module):
    """Binary cross-entropy on logits, per pixel and class."""

    def forward(self, logits, target):
        return F.binary_cross_entropy_with_logits(logits, target)


class DiceLoss(nn.Module):
    """Soft Dice loss on sigmoid probabilities, per image and class."""

    def forward(self, logits, target):
        return soft_dice_loss(torch.sigmoid(logits), target)


class BCEDiceLoss(nn.Module):
    """0.5 * BCE + soft Dice (the reference's default loss)."""

    def forward(self, logits, target):
        bce = F.binary_cross_entropy_with_logits(logits, target)
        return 0.5 * bce + soft_dice_loss(torch.sigmoid(logits), target)


def batch_dice_loss(probs, target):
    """1 - soft Dice per class over the whole batch (all images' pixels pooled), averaged over the classes. A class
    that is absent from most images (the borders of --target objects, under 1% of the pixels) is then scored where
    it is, instead of each image without it rewarding a prediction of nothing, as per-image Dice does."""
    probs, target = probs.float(), target.float()
    inter = (probs * target).sum((0, 2, 3))
    dice = (2 * inter + SMOOTH) / (probs.sum((0, 2, 3)) + target.sum((0, 2, 3)) + SMOOTH)
    return 1 - dice.mean()


class BCEBatchDiceLoss(nn.Module):
    """0.5 * BCE + soft Dice per class over the batch (batch_dice_loss): for rare, thin classes such as the borders
    of --target objects, whose default loss it is."""

    def forward(self, logits, target):
        bce = F.binary_cross_entropy_with_logits(logits, target)
        return 0.5 * bce + batch_dice_loss(torch.sigmoid(logits), target)


BORDER_WEIGHT = 10.0   # how much more a border pixel weighs in BorderWeightedLoss's cross-entropy (the U-Net paper's
                       # w0 = 10 on the gaps between touching cells; Caicedo et al. 2019 weigh their boundary class 10x)


class BorderWeightedLoss(nn.Module):
    """--target objects' loss: 0.5 * BCE in which the pixels of the borders plane (the last; plane 1 of the objects
    target) weigh BORDER_WEIGHT times the others, on every plane, + soft Dice per class over the batch. Unweighted,
    the 2-pixel borders (0.2-0.3% of stage1_train's pixels) were not learned in 726 steps (BENCHMARKS.md)."""

    def forward(self, logits, target):
        weight = 1 + (BORDER_WEIGHT - 1) * target[:, -1:].float()          # (B, 1, H, W), broadcast over the planes
        bce = F.binary_cross_entropy_with_logits(logits.float(), target.float(), weight=weight)
        return 0.5 * bce + batch_dice_loss(torch.sigmoid(logits), target)


def lovasz_grad(gt_sorted):
    """Gradient of the Lovász extension of the Jaccard loss w.r.t. sorted errors (Berman et al. 2018, alg. 1)."""
    gts = gt_sorted.sum()
    intersection = gts - gt_sorted.cumsum(0)
    union = gts + (1 - gt_sorted).cumsum(0)
    jaccard = 1 - intersection / union
    jaccard[1:] = jaccard[1:] - jaccard[:-1]
    return jaccard


def lovasz_hinge_flat(logits, labels):
    """Lovász hinge for one binary image: logits and 0/1 labels, flattened to (P,)."""
    signs = 2 * labels - 1
    errors = 1 - logits * signs
    errors_sorted, perm = torch.sort(errors, descending=True)
    grad = lovasz_grad(labels[perm])
    return torch.dot(F.relu(errors_sorted), grad)


class LovaszHingeLoss(nn.Module):
    """Lovász hinge (Berman, Rannen Triki, Blaschko, CVPR 2018), per image and class, averaged."""

    def forward(self, logits, target):
        logits = logits.float().flatten(2)        # (B, C, P)
        target = target.float().flatten(2)
        losses = [lovasz_hinge_flat(logits[b, c], target[b, c])
                  for b in range(logits.shape[0]) for c in range(logits.shape[1])]
        return torch.stack(losses).mean()


class CrossEntropyLoss(nn.Module):
    """Softmax cross-entropy over mutually exclusive classes."""

    def forward(self, logits, target):
        return F.cross_entropy(logits, target.argmax(1))


class CEDiceLoss(nn.Module):
    """Softmax cross-entropy + soft Dice on the softmax probabilities (one-hot target)."""

    def forward(self, logits, target):
        index = target.argmax(1)                                            # (B, H, W)
        onehot = F.one_hot(index, logits.shape[1]).permute(0, 3, 1, 2)
        return F.cross_entropy(logits, index) + soft_dice_loss(logits.softmax(1), onehot)


SIGMOID_LOSSES = {
    "BCEWithLogitsLoss": BCEWithLogitsLoss,
    "BCEDiceLoss": BCEDiceLoss,
    "BCEBatchDiceLoss": BCEBatchDiceLoss,
    "BorderWeightedLoss": BorderWeightedLoss,
    "LovaszHingeLoss": LovaszHingeLoss,
    "DiceLoss": DiceLoss,
}
SOFTMAX_LOSSES = {
    "CrossEntropyLoss": CrossEntropyLoss,
    "CEDiceLoss": CEDiceLoss,
}
LOSSES = {**SIGMOID_LOSSES, **SOFTMAX_LOSSES}
# the losses with an overlap term (Dice, Lovasz): they weigh a class by its overlap, so a rare class is not ignored
OVERLAP_LOSSES = ("BCEDiceLoss", "BCEBatchDiceLoss", "BorderWeightedLoss", "DiceLoss", "LovaszHingeLoss", "CEDiceLoss")
TARGET_LOSSES = {"BorderWeightedLoss": "objects"}   # losses that only make sense for one --target
OBJECTS_LOSS = "BorderWeightedLoss"   # --target objects' default loss: its borders weigh more, its Dice pools the batch
