"""IoU and Dice per class, per image and over a data set, computed in torch on the tensor's device.

Everything is built from three counts per image and class: |P∩T|, |P| and |T|. Per-image
scores come from one image's counts; data-set scores from counts summed over all images, so
they do not depend on the batch size. An image (or data set) where prediction and target are
both empty scores 1.
"""
import torch


def binarize(logits, mode="sigmoid", threshold=0.5):
    """Logits (B, C, H, W) -> 0/1 float prediction: sigmoid > threshold, or one-hot argmax."""
    if mode == "softmax":
        return torch.nn.functional.one_hot(logits.argmax(1), logits.shape[1]).permute(0, 3, 1, 2).float()
    return (torch.sigmoid(logits.float()) > threshold).float()


def counts(pred, target):
    """0/1 prediction and target (B, C, H, W) -> (inter, pred_sum, target_sum), each (B, C)."""
    target = (target > 0.5).float()
    inter = (pred * target).sum((2, 3))
    return inter, pred.sum((2, 3)), target.sum((2, 3))


def iou_from_counts(inter, psum, tsum):
    union = psum + tsum - inter
    return torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))


def dice_from_counts(inter, psum, tsum):
    total = psum + tsum
    return torch.where(total > 0, 2 * inter / total.clamp(min=1), torch.ones_like(total))


class SegMeter:
    """Accumulates counts over batches on the device; reads out data-set and per-image scores.

    keep_per_image=True keeps each image's counts (needed for per-image means and metrics.csv).
    Sums are float64, so pixel counts stay exact on any data set size, and can be summed over
    processes (distributed.all_reduce_sum(meter.sums)) to give the single-process figure.
    """

    def __init__(self, num_classes, device, keep_per_image=False):
        self.keep_per_image = keep_per_image
        self.sums = torch.zeros(3, num_classes, dtype=torch.float64, device=device)  # inter, pred_sum, target_sum
        self.per_image = []    # list of (3, B, C)

    def update(self, pred, target):
        c = torch.stack(counts(pred, target))    # (3, B, C)
        self.sums += c.sum(1)
        if self.keep_per_image:
            self.per_image.append(c)

    def dataset_scores(self):
        """(iou, dice), each a (C,) tensor of data-set-level scores per class."""
        inter, psum, tsum = self.sums
        return iou_from_counts(inter, psum, tsum), dice_from_counts(inter, psum, tsum)

    def image_scores(self):
        """(iou, dice), each (N, C): one row per image, in the order they were added."""
        inter, psum, tsum = torch.cat(self.per_image, 1)
        return iou_from_counts(inter, psum, tsum), dice_from_counts(inter, psum, tsum)

    def iou(self):
        """Headline data-set IoU: mean over classes of each class's data-set IoU (a float)."""
        return self.dataset_scores()[0].mean().item()
