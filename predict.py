"""Prediction as a library: trained runs in, one result per image out; nothing is written here.

    runs = [TrainedRun.load("cells", device="auto", runs_dir="models")]
    for result in predict_images(runs, data, PredictOptions(tta=True)):
        result.probs, result.mask          # (C, H, W) at the image's own size
        result.objects()                   # with PredictOptions(instances="watershed"): labels (H, W)

Probabilities come at each image's own size, from resized batches or from overlapping tiles at full resolution,
averaged over test-time symmetries and over the runs of an ensemble. Batches are prepared without a DataLoader
(each image's intensity range taken at its own size, resized with OpenCV, normalised by normalize.py exactly as
the training loaders do) and predicted with the run's autocast and memory format (the Runtime). val.py, bench.py
and export.py build PredictOptions from their own flags; outputs.py writes what val.py keeps.
"""
import os
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import torch
import torch.nn.functional as F

import checkpoint
import config
import rundir
import runtime
from archs import build_model, parameter_shapes
from instances import split, split_by_borders
from metrics import binarize
from normalize import as_batch, image_ranges, resize_image
from predictor import Predictor, describe, recorded_dtypes, settings_of
from tiling import predict_tiled
from utils import UserError

BORDER_THRESHOLD = 0.5   # val.py --border_threshold's default: see BENCHMARKS.md, "Objects ... (issue 20)"


@dataclass(frozen=True)
class PredictOptions:
    """How to predict: what val.py's flags say (bench.py and export.py take the defaults)."""
    batch_size: int = 16          # images (or tiles) per forward pass
    tta: bool = False             # average over the input's flips and quarter turns
    tile: bool = False            # whole images at full resolution by overlapping tiles (always for --crop runs)
    overlap: float = 0.5          # tile overlap fraction
    threshold: float = 0.5        # sigmoid probability above which a pixel is foreground
    border_threshold: float = None    # --target objects: the borders plane's threshold (None: BORDER_THRESHOLD)
    instances: str = None         # split the foreground into objects: an instances.METHODS name, or None
    min_size: int = 4             # the smallest object kept, in pixels


class TrainedRun:
    """One trained run, ready to predict: its name, config, Runtime and Predictor (network in eval mode, with its
    normalisation, head and activation)."""

    def __init__(self, name, cfg, rt, predictor):
        self.name, self.cfg, self.rt, self.predictor = name, cfg, rt, predictor
        self.norm = predictor.norm

    @classmethod
    def load(cls, name, device, runs_dir):
        """<runs_dir>/<name>/: config.yml (or model.json alone) and model.pth -> a TrainedRun on `device`, predicting
        with the precision and memory format the run trained with. A missing or broken run is a UserError."""
        folder = rundir.RunFolder(os.path.join(runs_dir, name))
        check_run_folder(name, folder, runs_dir)
        cfg = trained_config(folder)
        rt = runtime.for_inference(device, cfg)
        state = checkpoint.load(folder.model)
        checkpoint.check_shapes(state, parameter_shapes(cfg), folder.model)   # before a network of that size is built
        network = rt.place_model(build_model(cfg))
        checkpoint.load_weights(network, state, folder.model)
        return cls(name, cfg, rt, Predictor(network, describe(cfg, recorded_dtypes(folder.description()))).eval())


def check_run_folder(name, folder, runs_dir):
    """A UserError unless --name names a run folder with a model.pth (an epoch a kill cut short is completed)."""
    if not config.valid_name(name):
        raise UserError(f"--name {name!r} is not a run name (a folder name under {runs_dir}/)")
    if not os.path.isdir(folder.path):
        listed = sorted(os.listdir(runs_dir)) if os.path.isdir(runs_dir) else []
        raise UserError(f"there is no run {folder.path}" + (f" (runs there: {', '.join(listed)})" if listed else "") +
                        f". Train it first (python train.py --name {name}), or pass --runs_dir (or set "
                        f"${config.RUNS_DIR_ENV}) to the folder that holds your runs.")
    rundir.check_files(folder.path)     # a run file that is a folder, a broken link or unreadable: named
    if not rundir.in_use(folder.path):
        rundir.repair(folder.path)      # an epoch whose files a kill cut short (model.pth, log.csv) is completed
    if not os.path.isfile(folder.model):
        raise UserError(f"{folder.model} does not exist: the run has not finished an epoch yet. "
                        f"Train it (python train.py --name {name} --resume) first.")


def trained_config(folder):
    """The checked config a run folder predicts with: config.yml (or last.pth's copy, or model.json alone) with
    what model.json records of the network and its normalisation."""
    saved, cfg_path = config.saved_config(folder.path)
    description = folder.description()
    if saved is None:               # model.pth and model.json alone, as a colleague sends a model
        saved, cfg_path = settings_from_description(description, folder)
    cfg = config.check(saved, cfg_path)
    if cfg["normalize"] == "auto":
        raise UserError(f"{cfg_path}: normalize is auto, but a trained run records the mode it chose (imagenet or "
                        f"percentile; train.py printed it); set it back in {cfg_path}")
    return as_trained(cfg, description, cfg_path, folder.model_json)


def recorded_settings(description):
    """settings_of a model.json description, or None when there is none or it lacks what they need."""
    try:
        return settings_of(description) if description else None
    except (KeyError, TypeError, IndexError):
        return None


def as_trained(cfg, description, cfg_path, json_path=rundir.MODEL_JSON):
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


def settings_from_description(description, folder):
    """A run folder without config.yml or last.pth: the config defaults with what its model.json records of the
    network and its normalisation -> (config, the path messages name); a UserError when model.json is missing too."""
    trained = recorded_settings(description)
    if trained is None:
        raise UserError(f"{folder.path} has model.pth but neither config.yml nor last.pth, and no readable model.json "
                        "to rebuild the network from; copy the run's config.yml (or model.json) beside its model.pth")
    return config.merge(trained, folder.model_json, {}), folder.model_json   # each value checked as a config file's


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


def resized_probs(runs, data, options):
    """Yields (k, image, probabilities (1, C, H, W) at the image's original size, the first run's probabilities
    (1, C, h, w) at its network input size): batches resized to each run's input, the runs' probabilities averaged."""
    for start in range(0, len(data.ids), options.batch_size):
        images = [data.image(k) for k in range(start, min(start + options.batch_size, len(data.ids)))]
        at_input = [predict_probs(m.predictor, *prepared(images, m.norm, (m.cfg["input_h"], m.cfg["input_w"])),
                                  m.rt, options.tta) for m in runs]                            # per run (B, C, h, w)
        for b, image in enumerate(images):
            size = image.shape[:2]
            p = sum(F.interpolate(q[b:b + 1], size=size, mode="bilinear", align_corners=False)
                    if q.shape[2:] != size else q[b:b + 1] for q in at_input) / len(runs)
            yield start + b, image, p, at_input[0][b:b + 1]


def tiled_probs(runs, data, options):
    """Yields (k, image, probabilities (1, C, H, W), None): whole images at full resolution, by overlapping tiles."""
    for k in range(len(data.ids)):
        image, total = data.image(k), 0
        for m in runs:
            x, ranges = prepared([image], m.norm)
            x = x.to(m.rt.device)
            total = total + predict_tiled(lambda tiles: predict_probs(m.predictor, tiles, ranges.expand(len(tiles), -1, -1),
                                                                      m.rt, options.tta), x,
                                          m.cfg["input_h"], m.cfg["input_w"], options.overlap, options.batch_size)
        yield k, image, total / len(runs), None


def tiled(runs, options):
    """Whether whole images are predicted by tiles: --tile, or a run trained on crops."""
    return options.tile or any(m.cfg["crop"] for m in runs)


def object_labels(mask, probs, cfg, method, min_size):
    """A predicted (C, H, W) 0/1 mask and its probabilities -> its objects (H, W) int32. A run trained with
    --target objects: the watershed of plane 0, lowered where plane 1's probability says border; any other run:
    `method` on its mask."""
    if cfg["target"] == "objects" and method == "watershed":
        return split_by_borders(mask[0], probs[1], min_size)
    return split(mask[0], method, min_size)


def objects_method(cfg, method):
    """How object_labels finds objects, as val.py reports it."""
    if cfg["target"] == "objects" and method == "watershed":
        return "watershed, lowered along the predicted borders"
    return method


@dataclass
class ImageResult:
    """One image's prediction. probs and mask: (C, H, W) float32 arrays at the image's own size (mask 0/1);
    mask_tensor: the mask (1, C, H, W) on the device, for scoring; at_input: the first run's probabilities at its
    network input (1, C, h, w), or None when predicted by tiles."""
    index: int
    id: str
    image: np.ndarray
    probs: np.ndarray
    mask: np.ndarray
    mask_tensor: torch.Tensor
    at_input: torch.Tensor
    cfg: dict
    options: PredictOptions

    @cached_property
    def labels(self):
        """The predicted objects (H, W) int32 when the options ask for instances, else None (computed once, when
        first asked: outputs.py asks in its writer threads)."""
        if not self.options.instances:
            return None
        return object_labels(self.mask, self.probs, self.cfg, self.options.instances, self.options.min_size)


def predict_images(runs, data, options):
    """Predicts every image of `data` with `runs` (their probabilities averaged) -> yields an ImageResult per image,
    in order. Writes nothing."""
    cfg = runs[0].cfg
    thresholds = class_thresholds(cfg, options.threshold, options.border_threshold)
    predictions = (tiled_probs if tiled(runs, options) else resized_probs)(runs, data, options)
    for k, image, probs, at_input in predictions:
        mask = to_prediction(probs, cfg, thresholds)                                      # (1, C, H, W)
        yield ImageResult(k, data.ids[k], image, probs[0].cpu().numpy(), mask[0].cpu().numpy(), mask, at_input,
                          cfg, options)
