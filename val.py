"""Evaluate a trained run on its validation split, or predict masks for new images.

    python val.py --name <exp>                    # validation split: masks, metrics.csv, printed IoU/Dice
    python val.py --name <exp> --images DIR       # unlabeled images: masks only

Masks are written as outputs/<name>/<class>/<id>.png (binary 0/255) at each image's original size;
predictions for --images go to outputs/<name>/predictions/<class>/<id>.png unless --output says otherwise.
"""
import argparse
import csv
import io
import os
import warnings

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

import checkpoint
import config
import runtime
from dataset import SegmentationData, find_ids, load_splits, read_image
from engine import build_network, predict_logits
from loaders import AlbumentationsDataset, normalize_transform, val_transform
from metrics import SegMeter, binarize
from tiling import predict_tiled
from utils import UserError, atomic_write, exit_on_user_error, plain_warning, write_png

OUTPUTS_DIR = "outputs"
OUTLINE_COLOURS = [(0, 255, 0), (0, 0, 255), (255, 0, 0), (0, 255, 255), (255, 0, 255)]  # BGR, per class


def parse_args(argv):
    p = argparse.ArgumentParser(description="Evaluate a trained run, or predict masks for new images.")
    p.add_argument("--name", required=True, help="run name: models/<name>/")
    p.add_argument("--images", help="folder of unlabeled images to predict instead of the validation split")
    p.add_argument("--img_ext", help="extension of the --images files (default: the run's img_ext)")
    p.add_argument("--output", help="output folder (default outputs/<name>, or outputs/<name>/predictions with --images)")
    p.add_argument("--threshold", type=float, default=0.5, help="sigmoid probability above which a pixel is foreground")
    p.add_argument("--tta", action="store_true", help="average over horizontal and vertical flips")
    p.add_argument("--save_probs", action="store_true", help="also write 8-bit probability maps to <output>/probs/")
    p.add_argument("--overlay", action="store_true", help="also write images with the predicted outline to <output>/overlay/")
    p.add_argument("--tile", action="store_true",
                   help="predict whole images at full resolution by overlapping tiles of the network's input size "
                        "(always on for runs trained with --crop)")
    p.add_argument("--overlap", type=float, default=0.5, help="tile overlap fraction with --tile (default: 0.5)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default: auto)")
    p.add_argument("--batch_size", type=int, default=16, help="images per forward pass (default: 16)")
    args = p.parse_args(argv)
    if not 0 < args.threshold < 1:
        p.error("--threshold must be between 0 and 1")
    if args.batch_size < 1:
        p.error("--batch_size must be at least 1")
    if not 0 <= args.overlap < 1:
        p.error("--overlap must be at least 0 and below 1")
    return args


def load_run(name, device_name):
    """models/<name>/config.yml and model.pth -> (config, Runtime, model in eval mode on the Runtime's device).

    The Runtime predicts with the precision and memory format the run trained with."""
    run_dir = os.path.join(config.RUNS_DIR, name)
    cfg_path, model_path = os.path.join(run_dir, "config.yml"), os.path.join(run_dir, "model.pth")
    if not os.path.isdir(run_dir):
        runs = sorted(os.listdir(config.RUNS_DIR)) if os.path.isdir(config.RUNS_DIR) else []
        raise UserError(f"there is no run {run_dir}" + (f" (runs here: {', '.join(runs)})" if runs else "") +
                        f". Train it first: python train.py --name {name}")
    if not os.path.isfile(model_path):
        raise UserError(f"{model_path} does not exist: the run has not finished an epoch yet. "
                        f"Train it (python train.py --name {name} --resume) first.")
    cfg = config.load_run_config(cfg_path)
    rt = runtime.for_inference(device_name, cfg)
    model = build_network(cfg, rt)
    checkpoint.load_weights(model, checkpoint.load(model_path), model_path)
    return cfg, rt, model.eval()


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


def write_outputs(out_dir, img_id, pred, probs, image, args):
    """Binary masks per class, and optionally probability maps and an outline overlay."""
    for c in range(pred.shape[0]):
        write_png(os.path.join(out_dir, str(c), img_id + ".png"), (pred[c] * 255).astype(np.uint8))
        if args.save_probs:
            write_png(os.path.join(out_dir, "probs", str(c), img_id + ".png"), np.round(probs[c] * 255).astype(np.uint8))
    if args.overlay:
        canvas = cv2.cvtColor(image if image.shape[2] == 3 else np.repeat(image, 3, 2), cv2.COLOR_RGB2BGR)
        for c in range(pred.shape[0]):
            contours, _ = cv2.findContours(pred[c].astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
            cv2.drawContours(canvas, contours, -1, OUTLINE_COLOURS[c % len(OUTLINE_COLOURS)], 1)
        write_png(os.path.join(out_dir, "overlay", img_id + ".png"), canvas)


def make_dirs(out_dir, num_classes, args):
    for c in range(num_classes):
        os.makedirs(os.path.join(out_dir, str(c)), exist_ok=True)
        if args.save_probs:
            os.makedirs(os.path.join(out_dir, "probs", str(c)), exist_ok=True)
    if args.overlay:
        os.makedirs(os.path.join(out_dir, "overlay"), exist_ok=True)


def resized_probs(model, data, cfg, rt, args):
    """Yields (k, image, probabilities (1, C, H, W) at the image's original size): batches resized to the input."""
    ds = AlbumentationsDataset(data, val_transform(cfg["input_h"], cfg["input_w"], cfg["input_channels"]))
    loader = DataLoader(ds, batch_size=args.batch_size, shuffle=False)
    k = 0
    for images, _, _ in loader:
        probs = predict_probs(model, images, cfg, rt, args.tta)                           # (B, C, h, w)
        for b in range(probs.shape[0]):
            image = data.image(k)
            yield k, image, F.interpolate(probs[b:b + 1], size=image.shape[:2], mode="bilinear", align_corners=False)
            k += 1


def tiled_probs(model, data, cfg, rt, args):
    """Yields (k, image, probabilities (1, C, H, W)): whole images at full resolution, by overlapping tiles."""
    normalize = normalize_transform(cfg["input_channels"])
    for k in range(len(data.ids)):
        image = data.image(k)
        x = torch.from_numpy(normalize(image=image)["image"]).permute(2, 0, 1)[None].to(rt.device)
        yield k, image, predict_tiled(lambda tiles: predict_probs(model, tiles, cfg, rt, args.tta), x,
                                      cfg["input_h"], cfg["input_w"], args.overlap, args.batch_size)


def run_inference(model, data, cfg, rt, args, out_dir, meter):
    """Predicts every image of `data`, writes its outputs, and (if labeled) adds its counts to `meter`."""
    tiled = args.tile or cfg["crop"]
    for k, image, probs in (tiled_probs if tiled else resized_probs)(model, data, cfg, rt, args):
        pred = to_prediction(probs, cfg, args.threshold)                                  # (1, C, H, W)
        if data.labeled:
            target = torch.from_numpy(data.mask(k)).permute(2, 0, 1)[None].float().to(rt.device)
            meter.update(pred, target)
        write_outputs(out_dir, data.ids[k], pred[0].cpu().numpy(), probs[0].cpu().numpy(), image, args)


def write_metrics(path, ids, iou, dice):
    """metrics.csv: id, then iou_<c> and dice_<c> per class."""
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    classes = range(iou.shape[1])
    writer.writerow(["id"] + [f"{m}_{c}" for c in classes for m in ("iou", "dice")])
    for n, img_id in enumerate(ids):
        writer.writerow([img_id] + [f"{v[n, c].item():.6f}" for c in classes for v in (iou, dice)])
    atomic_write(path, lambda f: f.write(buffer.getvalue()))


def report(meter, ids, out_dir):
    """Prints per-class data-set-level and per-image-mean IoU/Dice and their mean over classes."""
    ds_iou, ds_dice = meter.dataset_scores()
    img_iou, img_dice = meter.image_scores()
    write_metrics(os.path.join(out_dir, "metrics.csv"), ids, img_iou, img_dice)
    print(f"{'class':>6} {'IoU (data set)':>15} {'IoU (per-image mean)':>21} {'Dice (data set)':>16} {'Dice (per-image mean)':>22}")
    for c in range(ds_iou.shape[0]):
        print(f"{c:>6} {ds_iou[c]:>15.4f} {img_iou[:, c].mean():>21.4f} {ds_dice[c]:>16.4f} {img_dice[:, c].mean():>22.4f}")
    print(f"{'mean':>6} {ds_iou.mean():>15.4f} {img_iou.mean():>21.4f} {ds_dice.mean():>16.4f} {img_dice.mean():>22.4f}")
    print(f"IoU: {ds_iou.mean():.4f}")
    print(f"Dice: {ds_dice.mean():.4f}")


def evaluate(args):
    cfg, rt, model = load_run(args.name, args.device)
    if args.images:
        ext = args.img_ext or cfg["img_ext"]
        ids = find_ids(args.images, ext)
        data = SegmentationData(ids, [read_image(os.path.join(args.images, i + ext), cfg["input_channels"]) for i in ids], None)
        out_dir = args.output or os.path.join(OUTPUTS_DIR, args.name, "predictions")
    else:
        data = load_splits(cfg)[1]
        out_dir = args.output or os.path.join(OUTPUTS_DIR, args.name)
    make_dirs(out_dir, cfg["num_classes"], args)
    meter = SegMeter(cfg["num_classes"], rt.device, keep_per_image=True)
    run_inference(model, data, cfg, rt, args, out_dir, meter)
    if data.labeled:
        report(meter, data.ids, out_dir)
    print(f"{len(data.ids)} predicted masks in {out_dir}/<class>/" + (f"; metrics in {out_dir}/metrics.csv" if data.labeled else ""))


def main(argv=None):
    warnings.formatwarning = plain_warning
    with exit_on_user_error():
        evaluate(parse_args(argv))


if __name__ == "__main__":
    main()
