"""Prediction over a data set, shared by val.py and bench.py: probabilities at each image's own
size (resized batches, or overlapping tiles at full resolution), thresholded masks, and the
files written for them (masks, probability maps, outline overlays).

Batches are prepared here without a DataLoader (resize with OpenCV, normalise in torch, as the
validation transform does), predicted with the run's autocast and memory format (the Runtime),
and the PNG files are encoded and written by a few threads while the next batch is predicted.
"""
import os
from concurrent.futures import ThreadPoolExecutor

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from engine import predict_logits
from loaders import normalize_stats
from metrics import binarize
from tiling import predict_tiled
from utils import write_png

OUTLINE_COLOURS = [(0, 255, 0), (0, 0, 255), (255, 0, 0), (0, 255, 255), (255, 0, 255)]  # BGR, per class
WRITER_THREADS = 4   # PNG encoding releases the GIL: a few threads write while the network predicts


@torch.no_grad()
def predict_probs(model, images, cfg, rt, tta):
    """Images (B, C_in, H, W) -> class probabilities (B, C, H, W), optionally averaged over flips."""
    images, _ = rt.place_batch(images)
    flips = [[], [3], [2]] if tta else [[]]
    total = 0
    for dims in flips:
        x = images.flip(dims) if dims else images
        with rt.autocast():
            logits = predict_logits(model, x, cfg["deep_supervision"]).float()
        probs = logits.softmax(1) if cfg["class_mode"] == "softmax" else torch.sigmoid(logits)
        total = total + (probs.flip(dims) if dims else probs)
    return total / len(flips)


def to_prediction(probs, cfg, threshold):
    """Probabilities (1, C, H, W) -> 0/1 masks: threshold per class, or one-hot argmax in softmax mode."""
    if cfg["class_mode"] == "softmax":
        return binarize(probs, "softmax")  # argmax of probabilities = argmax of logits
    return (probs > threshold).float()


def normalized(images, input_channels, size=None):
    """uint8 images (H, W, C_in) -> float32 (B, C_in, h, w), each resized to size=(h, w) if given,
    normalised as the validation transform does."""
    if size is not None:
        images = [cv2.resize(im, (size[1], size[0]), interpolation=cv2.INTER_LINEAR).reshape(*size, -1)
                  for im in images]
    mean, std = normalize_stats(input_channels)
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255          # (B, C_in, h, w)
    return (x - torch.tensor(mean).view(1, -1, 1, 1)) / torch.tensor(std).view(1, -1, 1, 1)


def resized_probs(model, data, cfg, rt, args):
    """Yields (k, image, probabilities (1, C, H, W) at the image's original size): batches resized to the input."""
    size = (cfg["input_h"], cfg["input_w"])
    for start in range(0, len(data.ids), args.batch_size):
        images = [data.image(k) for k in range(start, min(start + args.batch_size, len(data.ids)))]
        probs = predict_probs(model, normalized(images, cfg["input_channels"], size), cfg, rt, args.tta)
        for b, image in enumerate(images):
            p = probs[b:b + 1]                                                        # (1, C, h, w)
            if image.shape[:2] != size:
                p = F.interpolate(p, size=image.shape[:2], mode="bilinear", align_corners=False)
            yield start + b, image, p


def tiled_probs(model, data, cfg, rt, args):
    """Yields (k, image, probabilities (1, C, H, W)): whole images at full resolution, by overlapping tiles."""
    for k in range(len(data.ids)):
        image = data.image(k)
        x = normalized([image], cfg["input_channels"]).to(rt.device)
        yield k, image, predict_tiled(lambda tiles: predict_probs(model, tiles, cfg, rt, args.tta), x,
                                      cfg["input_h"], cfg["input_w"], args.overlap, args.batch_size)


def outline_overlay(image, pred, skip_class0=False):
    """The image (BGR) with each class's predicted outline drawn in its colour."""
    canvas = cv2.cvtColor(image if image.shape[2] == 3 else np.repeat(image, 3, 2), cv2.COLOR_RGB2BGR)
    for c in range(1 if skip_class0 else 0, pred.shape[0]):
        contours, _ = cv2.findContours(pred[c].astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
        cv2.drawContours(canvas, contours, -1, OUTLINE_COLOURS[c % len(OUTLINE_COLOURS)], 1)
    return canvas


def write_outputs(out_dir, img_id, pred, probs, image, args):
    """Binary masks per class, and optionally probability maps and an outline overlay (numpy arrays)."""
    for c in range(pred.shape[0]):
        write_png(os.path.join(out_dir, str(c), img_id + ".png"), (pred[c] * 255).astype(np.uint8), durable=False)
        if args.save_probs:
            write_png(os.path.join(out_dir, "probs", str(c), img_id + ".png"),
                      np.round(probs[c] * 255).astype(np.uint8), durable=False)
    if args.overlay:
        write_png(os.path.join(out_dir, "overlay", img_id + ".png"), outline_overlay(image, pred), durable=False)


def make_dirs(out_dir, num_classes, args):
    for c in range(num_classes):
        os.makedirs(os.path.join(out_dir, str(c)), exist_ok=True)
        if args.save_probs:
            os.makedirs(os.path.join(out_dir, "probs", str(c)), exist_ok=True)
    if args.overlay:
        os.makedirs(os.path.join(out_dir, "overlay"), exist_ok=True)


def run_inference(model, data, cfg, rt, args, out_dir, meter):
    """Predicts every image of `data`, writes its outputs, and (if labeled) adds its counts to `meter`."""
    tiled = args.tile or cfg["crop"]
    with ThreadPoolExecutor(WRITER_THREADS) as pool:
        pending = []
        for k, image, probs in (tiled_probs if tiled else resized_probs)(model, data, cfg, rt, args):
            pred = to_prediction(probs, cfg, args.threshold)                              # (1, C, H, W)
            if data.labeled:
                target = torch.from_numpy(data.mask(k)).permute(2, 0, 1)[None].float().to(rt.device)
                meter.update(pred, target)
            pending.append(pool.submit(write_outputs, out_dir, data.ids[k], pred[0].cpu().numpy(),
                                       probs[0].cpu().numpy(), image, args))
        for job in pending:
            job.result()                       # a failed write raises here
