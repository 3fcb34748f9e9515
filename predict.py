"""Prediction over a data set, shared by val.py and bench.py: probabilities at each image's own
size (resized batches, or overlapping tiles at full resolution), averaged over test-time
symmetries and over the runs of an ensemble, thresholded masks, and the files written for them
(masks, probability maps, outline overlays).

Batches are prepared here without a DataLoader (each image's intensity range taken at its own size, resized
with OpenCV, normalised by normalize.py exactly as the training loaders do), predicted with the run's autocast and memory format (the Runtime),
and the PNG files are encoded and written by a few threads while the next batch is predicted.
"""
import json
import os
from concurrent.futures import ThreadPoolExecutor

import cv2
import numpy as np
import torch
import torch.nn.functional as F

import checkpoint
import config
import rundir
import runtime
from archs import parameter_shapes
from engine import build_network
from figures import TRUTH, class_label, colour, outlined, panel
from instances import measure, object_scores, object_sizes, split, split_by_borders
from loaders import image_ranges, resize_image
from metrics import binarize
from normalize import as_batch
from predictor import Predictor, base_channels, describe
from tiling import predict_tiled
from utils import UserError, progress_bar, write_png, write_tiff

WRITER_THREADS = 4   # PNG encoding releases the GIL: a few threads write while the network predicts
BORDER_THRESHOLD = 0.5   # val.py --border_threshold's default: see BENCHMARKS.md, "Objects ... (issue 20)"


class Member:
    """One trained run of a prediction: its Predictor (network in eval mode, with its normalisation, head and
    activation), config and Runtime."""

    def __init__(self, name, cfg, rt, predictor):
        self.name, self.cfg, self.rt, self.predictor = name, cfg, rt, predictor
        self.norm = predictor.norm


def load_run(name, device_name, runs):
    """<runs>/<name>/config.yml and model.pth -> a predict.Member: config, Runtime, model in eval mode.

    The Runtime predicts with the precision and memory format the run trained with."""
    run_dir = os.path.join(runs, name)
    model_path = os.path.join(run_dir, "model.pth")
    if not config.valid_name(name):
        raise UserError(f"--name {name!r} is not a run name (a folder name under {runs}/)")
    if not os.path.isdir(run_dir):
        listed = sorted(os.listdir(runs)) if os.path.isdir(runs) else []
        raise UserError(f"there is no run {run_dir}" + (f" (runs there: {', '.join(listed)})" if listed else "") +
                        f". Train it first (python train.py --name {name}), or pass --runs_dir (or set "
                        f"${config.RUNS_DIR_ENV}) to the folder that holds your runs.")
    if not rundir.in_use(run_dir):
        rundir.repair(run_dir)      # an epoch whose files a kill cut short (model.pth, log.csv) is completed
    if not os.path.isfile(model_path):
        raise UserError(f"{model_path} does not exist: the run has not finished an epoch yet. "
                        f"Train it (python train.py --name {name} --resume) first.")
    saved, cfg_path = config.saved_config(run_dir)
    description = recorded_description(run_dir)
    if saved is None:               # model.pth and model.json alone, as a colleague sends a model
        saved, cfg_path = settings_from_description(description, run_dir)
    cfg = config.check(saved, cfg_path)
    if cfg["normalize"] == "auto":
        raise UserError(f"{cfg_path}: normalize is auto, but a trained run records the mode it chose (imagenet or "
                        f"percentile; train.py printed it); set it back in {cfg_path}")
    cfg = as_trained(cfg, description, cfg_path, os.path.join(run_dir, "model.json"))
    rt = runtime.for_inference(device_name, cfg)
    state = checkpoint.load(model_path)
    checkpoint.check_shapes(state, parameter_shapes(cfg), model_path)   # before a network of that size is built
    network = build_network(cfg, rt)
    checkpoint.load_weights(network, state, model_path)
    return Member(name, cfg, rt, Predictor(network, describe(cfg, recorded_dtypes(description))).eval())


def recorded_description(run_dir):
    """The run's model.json (what train.py recorded of the Predictor it trained), or None (older runs)."""
    try:
        with open(os.path.join(run_dir, "model.json")) as f:
            description = json.load(f)
        return description if isinstance(description, dict) else None
    except (OSError, ValueError):
        return None


def trained_settings(d):
    """The config keys that decide predictions, as a model.json description records them."""
    n = d["normalize"]
    return {"arch": d["arch"], "deep_supervision": d["deep_supervision"], "base_channels": base_channels(d),
            "input_channels": d["input_channels"],
            "num_classes": d["num_classes"], "class_mode": d["class_mode"], "input_h": d["input_size"][0],
            "input_w": d["input_size"][1], "normalize": n["mode"], "norm_pmin": n["pmin"], "norm_pmax": n["pmax"],
            "per_image_norm": n["per_image"], "crop": d["crop"], "target": d.get("target", "masks")}


def recorded_settings(description):
    """trained_settings of a model.json description, or None when there is none or it lacks what they need."""
    try:
        return trained_settings(description) if description else None
    except (KeyError, TypeError, IndexError):
        return None


def as_trained(cfg, description, cfg_path, json_path="model.json"):
    """The config with the prediction settings the run trained with (model.json) where config.yml was edited
    since: a note names each difference and says which is used. model.json is untrusted input (a run folder comes
    from colleagues): its values are converted and range-checked as a config file's are, and a bad one is a
    UserError naming json_path and the key."""
    trained = recorded_settings(description)
    if trained is None:
        return cfg
    converted = config.merge(trained, json_path, {})     # converted as a config file's values, or refused by key
    trained = {k: converted[k] for k in trained}
    edited = {k: v for k, v in trained.items() if k in cfg and cfg[k] != v}
    if edited:
        config.check({**cfg, **edited}, {**{k: cfg_path for k in cfg}, **{k: json_path for k in edited}})
        said = ", ".join(f"{k} {cfg[k]!r} (trained with {v!r})" for k, v in edited.items())
        print(f"note: {cfg_path} was edited after training: {said}; evaluating with what the run trained with "
              f"(its model.json). To evaluate other settings, train a run with them.")
    return {**cfg, **edited}


def settings_from_description(description, run_dir):
    """A run folder without config.yml or last.pth: the config defaults with what its model.json records of the
    network and its normalisation -> (config, the path messages name); a UserError when model.json is missing too."""
    path = os.path.join(run_dir, "model.json")
    trained = recorded_settings(description)
    if trained is None:
        raise UserError(f"{run_dir} has model.pth but neither config.yml nor last.pth, and no readable model.json to "
                        "rebuild the network from; copy the run's config.yml (or model.json) beside its model.pth")
    return config.merge(trained, path, {}), path       # each value checked and converted as a config file's are


def recorded_dtypes(description):
    """The image type the run trained on, as its model.json description records it (runs from before it: 8-bit)."""
    dtype = description.get("input_dtype") if description else None
    return {dtype if isinstance(dtype, str) else "uint8"}


def symmetries(square):
    """(quarter turns, flip) pairs for test-time augmentation: the eight symmetries of a square input,
    the four (0 or 180 degrees, flipped or not) of a rectangular one."""
    return [(turns, flip) for turns in ((0, 1, 2, 3) if square else (0, 2)) for flip in (False, True)]


def transform(x, turns, flip):
    x = torch.rot90(x, turns, dims=(2, 3)) if turns else x
    return x.flip(3) if flip else x


def untransform(x, turns, flip):
    x = x.flip(3) if flip else x
    return torch.rot90(x, -turns, dims=(2, 3)) if turns else x


@torch.no_grad()
def predict_probs(predictor, images, ranges, rt, tta):
    """Raw images (B, C_in, H, W) float32 with their whole images' intensity ranges (B, 2, C_in) -> class
    probabilities (B, C, H, W) from the Predictor; with tta, averaged over the input's symmetries (each prediction
    turned back into place first; the normalisation does not change under them)."""
    images, _ = rt.place_batch(images)
    ranges = ranges.to(images.device)
    views = symmetries(images.shape[2] == images.shape[3]) if tta else [(0, False)]
    total = 0
    for turns, flip in views:
        with rt.autocast():
            probs = predictor(transform(images, turns, flip), ranges)
        total = total + untransform(probs, turns, flip)
    return total / len(views)


def class_thresholds(cfg, threshold, border_threshold=None):
    """The probability above which each class is predicted: `threshold`, except the borders plane of a --target
    objects run, whose probabilities stay low (2-pixel bands): border_threshold, BORDER_THRESHOLD if not given.
    -> a float, or a tuple with one per class."""
    if cfg["target"] != "objects":
        return threshold
    return (threshold, BORDER_THRESHOLD if border_threshold is None else border_threshold)


def to_prediction(probs, cfg, threshold):
    """Probabilities (1, C, H, W) -> 0/1 masks: threshold per class (a float, or one per class as class_thresholds
    gives), or one-hot argmax in softmax mode."""
    if cfg["class_mode"] == "softmax":
        return binarize(probs, "softmax")  # argmax of probabilities = argmax of logits
    if isinstance(threshold, (tuple, list)):
        threshold = torch.tensor(threshold, dtype=probs.dtype, device=probs.device).view(1, -1, 1, 1)
    return (probs > threshold).float()


def prepared(images, norm, size=None):
    """Raw images (H, W, C_in) -> (float32 (B, C_in, h, w) of their raw values, each resized to size=(h, w) if given,
    as the training loaders resize; their intensity ranges (B, 2, C_in), taken on each whole image at its own size)."""
    ranges = image_ranges(images, norm)
    if size is not None:
        images = [resize_image(im, size) for im in images]
    return as_batch(images), ranges


def resized_probs(members, data, args):
    """Yields (k, image, probabilities (1, C, H, W) at the image's original size, the first run's probabilities
    (1, C, h, w) at its network input size): batches resized to each run's input, the runs' probabilities averaged."""
    for start in range(0, len(data.ids), args.batch_size):
        images = [data.image(k) for k in range(start, min(start + args.batch_size, len(data.ids)))]
        at_input = [predict_probs(m.predictor, *prepared(images, m.norm, (m.cfg["input_h"], m.cfg["input_w"])),
                                  m.rt, args.tta) for m in members]                            # per run (B, C, h, w)
        for b, image in enumerate(images):
            size = image.shape[:2]
            p = sum(F.interpolate(q[b:b + 1], size=size, mode="bilinear", align_corners=False)
                    if q.shape[2:] != size else q[b:b + 1] for q in at_input) / len(members)
            yield start + b, image, p, at_input[0][b:b + 1]


def tiled_probs(members, data, args):
    """Yields (k, image, probabilities (1, C, H, W), None): whole images at full resolution, by overlapping tiles."""
    for k in range(len(data.ids)):
        image, total = data.image(k), 0
        for m in members:
            x, ranges = prepared([image], m.norm)
            x = x.to(m.rt.device)
            total = total + predict_tiled(lambda tiles: predict_probs(m.predictor, tiles, ranges.expand(len(tiles), -1, -1),
                                                                      m.rt, args.tta), x,
                                          m.cfg["input_h"], m.cfg["input_w"], args.overlap, args.batch_size)
        yield k, image, total / len(members), None


def display_image(image):
    """An image (H, W, C) of any type and channel count -> 8-bit RGB (H, W, 3) for a person to look at: 8-bit images
    as they are, others stretched per channel from their 1st to 99.8th percentile (as Fiji's auto contrast does);
    RGB as it is, one channel as grey, any other count as the mean of its channels."""
    if image.dtype != np.uint8:
        flat = image.reshape(-1, image.shape[2]).astype(np.float32)
        lo, hi = np.percentile(flat, [1.0, 99.8], axis=0)
        image = np.clip((image - lo) / np.maximum(hi - lo, 1e-6) * 255, 0, 255).astype(np.uint8)
    if image.shape[2] == 3:
        return image
    grey = image[:, :, :1] if image.shape[2] == 1 else image.mean(axis=2, keepdims=True).astype(np.uint8)
    return np.repeat(grey, 3, axis=2)


def outline_overlay(image, pred, truth=None, skip_class0=False, objects=None):
    """The image (BGR, as display_image shows it) with each class's predicted outline in its colour and, if given,
    the true outline in TRUTH's; skip_class0: the catch-all class of softmax mode is not outlined. objects: a
    label image (H, W) of the predicted objects, each outlined in its own colour instead of the class's."""
    canvas = cv2.cvtColor(display_image(image), cv2.COLOR_RGB2BGR)
    first = 1 if skip_class0 else 0
    for c in range(first, pred.shape[0]):
        if truth is not None:
            contours, _ = cv2.findContours(truth[c].astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
            cv2.drawContours(canvas, contours, -1, TRUTH[1][::-1], 1)
        if objects is None:
            contours, _ = cv2.findContours(pred[c].astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
            cv2.drawContours(canvas, contours, -1, colour(c)[1][::-1], 1)
    return canvas if objects is None else outlined(canvas, objects, 1, bgr=True)


def legend(cfg, labeled):
    """The overlay's colours in words, for the summary line."""
    classes = range(1 if cfg["class_mode"] == "softmax" else 0, cfg["num_classes"])
    names = cfg["class_names"]
    words = ([f"class {class_label(names, c)} {colour(c)[0]}" for c in classes] if cfg["num_classes"] > 1 or names
             else [f"prediction {colour(0)[0]}"])
    return ", ".join(words + ([f"ground truth {TRUTH[0]}"] if labeled else []))


OUTPUT_FORMATS = ("png", "tif")    # val.py --output_format


def write_outputs(out_dir, img_id, arrays, image, args, cfg, objects=None):
    """Binary masks per class (0/255, 8-bit), and optionally probability maps and an outline overlay, as PNG or (with
    args.output_format 'tif') TIFF, where probabilities are float32 instead of 8-bit. The overlay, a picture for a
    person, is always PNG, as are the panels (figures.panel). arrays: (prediction (C, H, W), probabilities
    (C, H, W), ground truth (C, H, W) or None); objects: with --instances, (predicted labels, true labels or None)."""
    pred, probs, truth = arrays
    tif = getattr(args, "output_format", "png") == "tif"
    for c in range(pred.shape[0]):
        mask = (pred[c] * 255).astype(np.uint8)
        if tif:
            write_tiff(os.path.join(out_dir, str(c), img_id + ".tif"), mask, durable=False)
        else:
            write_png(os.path.join(out_dir, str(c), img_id + ".png"), mask, durable=False)
        if args.save_probs and tif:
            write_tiff(os.path.join(out_dir, "probs", str(c), img_id + ".tif"), probs[c].astype(np.float32), durable=False)
        elif args.save_probs:
            write_png(os.path.join(out_dir, "probs", str(c), img_id + ".png"),
                      np.round(probs[c] * 255).astype(np.uint8), durable=False)
    if args.overlay:
        overlay = outline_overlay(image, pred, truth, cfg["class_mode"] == "softmax",
                                  None if objects is None else objects[0])
        write_png(os.path.join(out_dir, "overlay", img_id + ".png"), overlay, durable=False)
    if getattr(args, "panels", False):
        figure = panel(display_image(image), pred, truth, cfg["class_names"], cfg["class_mode"] == "softmax", objects)
        write_png(os.path.join(out_dir, "panels", img_id + ".png"), cv2.cvtColor(figure, cv2.COLOR_RGB2BGR),
                  durable=False)


LABELS_16BIT_MAX = int(np.iinfo(np.uint16).max)   # objects in one image a 16-bit label image holds; 32-bit TIFF past it


def write_labels(out_dir, img_id, labels, fmt):
    """Object labels (H, W) -> instances/<id>.png (16-bit) or .tif (16-bit, or 32-bit past 65,535 objects; a PNG
    cannot hold more, so such an image is written as TIFF whatever the format) -> the file's name."""
    wide = labels.max() > LABELS_16BIT_MAX
    name = img_id + (".tif" if fmt == "tif" or wide else ".png")
    path = os.path.join(out_dir, "instances", name)
    if name.endswith(".tif"):
        write_tiff(path, labels.astype(np.uint32 if wide else np.uint16), durable=False)
    else:
        write_png(path, labels.astype(np.uint16), durable=False)
    return name


def object_labels(pred, probs, cfg, method, min_size):
    """A predicted (C, H, W) 0/1 mask and its probabilities -> its objects (H, W) int32. A run trained with
    --target objects: the watershed of plane 0, lowered where plane 1's probability says border; any other run:
    `method` on its mask."""
    if cfg["target"] == "objects" and method == "watershed":
        return split_by_borders(pred[0], probs[1], min_size)
    return split(pred[0], method, min_size)


def objects_method(cfg, method):
    """How object_labels finds objects, as val.py reports it."""
    if cfg["target"] == "objects" and method == "watershed":
        return "watershed, lowered along the predicted borders"
    return method


def finish_image(out_dir, data, k, image, arrays, args, cfg):
    """Everything after the network for image k (run in a writer thread): its files, and with --instances its
    objects (instances/<id>.png or .tif, label images) -> the image's row for objects.csv (with its objects'
    measurements, instances.measure), or None.
    arrays: as write_outputs takes them."""
    if not args.instances:
        write_outputs(out_dir, data.ids[k], arrays, image, args, cfg)
        return None
    labels = object_labels(arrays[0], arrays[1], cfg, args.instances, args.min_size)     # (H, W) int32
    truth = data.instances(k) if data.labeled else None
    write_outputs(out_dir, data.ids[k], arrays, image, args, cfg, (labels, truth))
    write_labels(out_dir, data.ids[k], labels, getattr(args, "output_format", "png"))
    count, mean_area, median_area = object_sizes(labels)
    row = {"id": data.ids[k], "count": count, "mean_area": round(mean_area, 2), "median_area": median_area,
           "measurements": [{"id": data.ids[k], **m} for m in measure(labels, image)]}
    if truth is not None:
        row.update(object_scores(truth, labels))
    return row


def output_subfolders(num_classes, args):
    """The subfolders of the output folder that write_outputs and write_labels write into."""
    classes = [str(c) for c in range(num_classes)]
    return (classes + ([f"probs/{c}" for c in classes] if args.save_probs else []) +
            (["overlay"] if args.overlay else []) + (["panels"] if getattr(args, "panels", False) else []) +
            (["instances"] if args.instances else []))


def output_files(ids, num_classes, args):
    """Every file write_outputs and write_labels may write for these images, relative to the output folder."""
    ext = "." + getattr(args, "output_format", "png")
    files = []
    for i in ids:
        for c in range(num_classes):
            files += [f"{c}/{i}{ext}"] + ([f"probs/{c}/{i}{ext}"] if args.save_probs else [])
        files += ([f"overlay/{i}.png"] if args.overlay else []) + ([f"instances/{i}.png", f"instances/{i}.tif"]
                                                                    if args.instances else [])
        files += [f"panels/{i}.png"] if getattr(args, "panels", False) else []
    return files


def run_inference(members, data, args, out_dir, meters):
    """Predicts every image of `data` with the runs in `members` (their probabilities averaged), writes its outputs,
    and, if the data has masks, adds its counts to meters['image'] (at each image's size) and, when given, to
    meters['input'] (at the first run's network input size, as training scores its validation split).
    -> with args.instances, a row per image for objects.csv (counts, areas, and object scores if labelled)."""
    cfg, rt = members[0].cfg, members[0].rt
    tiled = args.tile or any(m.cfg["crop"] for m in members)
    with ThreadPoolExecutor(WRITER_THREADS) as pool:
        pending = []
        predictions = (tiled_probs if tiled else resized_probs)(members, data, args)
        thresholds = class_thresholds(cfg, args.threshold, getattr(args, "border_threshold", None))
        for k, image, probs, at_input in progress_bar(predictions, "predicting", total=len(data.ids)):
            pred = to_prediction(probs, cfg, thresholds)                                  # (1, C, H, W)
            truth = data.mask(k) if data.labeled else None                                # (H, W, C) 0/1
            if truth is not None:
                meters["image"].update(pred, torch.from_numpy(truth).permute(2, 0, 1)[None].float().to(rt.device))
            if truth is not None and at_input is not None and meters.get("input") is not None:
                score_at_input(meters["input"], at_input, truth, cfg, thresholds)
            arrays = (pred[0].cpu().numpy(), probs[0].cpu().numpy(), None if truth is None else truth.transpose(2, 0, 1))
            pending.append(pool.submit(finish_image, out_dir, data, k, image, arrays, args, cfg))
        rows = [job.result() for job in pending]      # a failed write raises here
    return rows if args.instances else None


def score_at_input(meter, probs, truth, cfg, threshold):
    """Adds one image scored at the network input size: its mask resized with nearest neighbour, as the
    training loaders do."""
    h, w = probs.shape[2:]
    target = cv2.resize(truth, (w, h), interpolation=cv2.INTER_NEAREST).reshape(h, w, -1)
    meter.update(to_prediction(probs, cfg, threshold), torch.from_numpy(target).permute(2, 0, 1)[None].float().to(probs.device))
