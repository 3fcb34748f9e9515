"""Predicting and scoring a data set: the loop val.py runs (and bench.py times), between predict.py, which yields a
result per image, and outputs.py, which writes it.

Scores are counted at each image's own size and, for a single run predicting resized images, also at the network
input size, as training scores its validation split (train.py's val_iou).
"""
from dataclasses import dataclass

import cv2
import torch

from metrics import SegMeter
from predict import class_thresholds, predict_images, to_prediction
from utils import progress_bar


@dataclass
class Scores:
    """The counts of an evaluation: at each image's size, and at the network input (None when not counted)."""
    image: SegMeter
    input: SegMeter = None
    input_images: int = 0         # how many images were predicted at the network input (and counted in `input`)

    @classmethod
    def new(cls, runs):
        cfg, device = runs[0].cfg, runs[0].rt.device
        return cls(SegMeter(cfg["num_classes"], device, keep_per_image=True),
                   SegMeter(cfg["num_classes"], device) if len(runs) == 1 else None)


def evaluate(runs, data, options, writer, scores):
    """Predicts every image of `data` with `runs`, adds labelled images to `scores` and hands each result to the
    outputs.ImageWriter `writer` -> with instances, a row per image for objects.csv, else None."""
    cfg = runs[0].cfg
    thresholds = class_thresholds(cfg, options.threshold, options.border_threshold)
    results = predict_images(runs, data, options)
    for result in progress_bar(results, "predicting", total=len(data.ids)):
        truth = data.mask(result.index) if data.labeled else None                        # (H, W, C) 0/1
        if truth is not None:
            scores.image.update(result.mask_tensor, as_target(truth, result.mask_tensor.device))
        if truth is not None and result.at_input is not None and scores.input is not None:
            score_at_input(scores.input, result.at_input, truth, cfg, thresholds)
            scores.input_images += 1
        true_labels = (lambda k=result.index: data.instances(k)) if data.labeled and options.instances else None
        writer.submit(result, None if truth is None else truth.transpose(2, 0, 1), true_labels)
    return writer.rows()


def as_target(mask, device):
    """A (H, W, C) 0/1 mask as the (1, C, H, W) float tensor the meters take."""
    return torch.from_numpy(mask).permute(2, 0, 1)[None].float().to(device)


def score_at_input(meter, probs, truth, cfg, threshold):
    """Adds one image scored at the network input size: its mask resized with nearest neighbour, as the
    training loaders do."""
    h, w = probs.shape[2:]
    target = cv2.resize(truth, (w, h), interpolation=cv2.INTER_NEAREST).reshape(h, w, -1)
    meter.update(to_prediction(probs, cfg, threshold), as_target(target, probs.device))
