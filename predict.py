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
from archs import SIZE_MULTIPLE, build_model, parameter_shapes
from instances import split, split_by_borders
from metrics import binarize
from normalize import as_batch, image_ranges, resize_image
from predictor import Predictor, describe, recorded_dtypes, recorded_scale, settings_of
from tiling import predict_tiled
from utils import UserError, command

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
    resize: bool = False          # each image resized to the network input (the reference's way), not at its scale


class TrainedRun:
    """One trained run, ready to predict: its name, config, Runtime, Predictor (network in eval mode, with its
    normalisation, head and activation) and the scale it learned (image pixels per network pixel, (y, x); None for a
    run from before it was recorded, which predicts images resized to its input)."""

    def __init__(self, name, cfg, rt, predictor, scale=None):
        self.name, self.cfg, self.rt, self.predictor, self.scale = name, cfg, rt, predictor, scale
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
        description = folder.description()
        scale = recorded_scale(description, cfg, folder.model_json)
        predictor = Predictor(network, describe(cfg, recorded_dtypes(description), scale)).eval()
        return cls(name, cfg, rt, predictor, scale)


def check_run_folder(name, folder, runs_dir):
    """A UserError unless --name names a run folder with a model.pth (an epoch a kill cut short is completed)."""
    if not config.readable_name(name):
        raise UserError(f"--name {name!r} is not a run name (a folder name under {runs_dir}/)")
    train = ["python", "train.py", "--name", name, *config.runs_dir_words(runs_dir)]
    if not os.path.isdir(folder.path):
        listed = sorted(os.listdir(runs_dir)) if os.path.isdir(runs_dir) else []
        raise UserError(f"there is no run {folder.path}" + (f" (runs there: {', '.join(listed)})" if listed else "") +
                        f". Train it first ({command(*train)}), or pass --runs_dir (or set "
                        f"${config.RUNS_DIR_ENV}) to the folder that holds your runs.")
    rundir.check_files(folder.path)     # a run file that is a folder, a broken link or unreadable: named
    if not rundir.in_use(folder.path):
        rundir.repair(folder.path)      # an epoch whose files a kill cut short (model.pth, log.csv) is completed
    if not os.path.isfile(folder.model):
        raise missing_weights(folder, train)


def missing_weights(folder, train):
    """The UserError for a run folder without a model.pth file, saying why and what goes on: train: the words of
    the command that trains the run."""
    again = command(*train[:2], "--config", folder.config, *train[2:], "--overwrite")   # the run's own settings
    if not os.path.isfile(folder.config):
        again = command(*train, "--overwrite") + " (with the settings it was trained with)"
    if os.path.lexists(folder.model):
        return UserError(f"{folder.model} is not a file (a folder or a broken link), so it is not the run's weights, "
                         "which train.py writes there as a file. Move it away, then put the file back (from a copy of "
                         f"the run) or train the run again: {again}")
    if os.path.isfile(folder.last):      # last.pth exists once an epoch has finished, and so does model.pth
        return UserError(f"{folder.model} is missing, though the run has finished epochs (it has a last.pth): it was "
                         f"moved or deleted. Put it back (from a copy of the run), or train the run again: {again}")
    if rundir.in_use(folder.path):
        return UserError(f"{folder.model} does not exist yet: the run is training its first epoch. Wait until it "
                         "has finished one.")
    return UserError(f"{folder.model} does not exist: the run stopped before it finished an epoch. Train it again: "
                     f"{again}")


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


WHOLE_MAX_PIXELS = 1024 * 1024   # an image larger than this (at the trained scale) is predicted by tiles: memory


def network_size(run, shape, options):
    """The size (h, w) `run` predicts an image of `shape` at: the image brought to the scale the run learned (its
    own size for a run trained on crops or on images at their own size), or the network input with options.resize
    and for runs from before the scale was recorded."""
    if options.resize or run.scale is None:
        return run.cfg["input_h"], run.cfg["input_w"]
    h, w = shape[:2]
    return max(1, round(h / run.scale[0])), max(1, round(w / run.scale[1]))


def by_tiles(run, size, options):
    """Whether an image predicted at `size` goes by overlapping tiles of the network input: --tile, a run trained on
    crops, or an image too large to predict whole; never with options.resize."""
    return not options.resize and (options.tile or run.cfg["crop"] or size[0] * size[1] > WHOLE_MAX_PIXELS)


def padded(x):
    """(B, C, h, w) -> reflect-padded (replicated where too small to reflect) at the bottom and right to multiples
    of SIZE_MULTIPLE, which the network's four poolings need."""
    h, w = x.shape[2:]
    pad_h, pad_w = -h % SIZE_MULTIPLE, -w % SIZE_MULTIPLE
    if not (pad_h or pad_w):
        return x
    return F.pad(x, (0, pad_w, 0, pad_h), mode="reflect" if pad_h < h and pad_w < w else "replicate")


def at_own_size(probs, shape):
    """Probabilities (1, C, h, w) resized (bilinear) to an image's own (H, W)."""
    size = tuple(shape[:2])
    return probs if tuple(probs.shape[2:]) == size else F.interpolate(probs, size=size, mode="bilinear",
                                                                      align_corners=False)


def tiled_image(run, image, size, options):
    """One image by overlapping tiles of the network input, at `size` -> probabilities (1, C, H, W) at its own size."""
    x, ranges = prepared([image], run.norm, None if tuple(size) == image.shape[:2] else size)
    x = x.to(run.rt.device)
    probs = predict_tiled(lambda tiles: predict_probs(run.predictor, tiles, ranges.expand(len(tiles), -1, -1), run.rt,
                                                      options.tta),
                          x, run.cfg["input_h"], run.cfg["input_w"], options.overlap, options.batch_size)
    return at_own_size(probs, image.shape)


def run_probs(run, images, options):
    """One run's probabilities for a few images -> ([(1, C, H, W) at each image's own size], [(1, C, h, w) at the
    network input, or None where the image was not predicted at it]). Images predicted whole at the same size go
    through the network as one batch."""
    own, at_input, batches = [None] * len(images), [None] * len(images), {}
    for b, image in enumerate(images):
        size = network_size(run, image.shape, options)
        if by_tiles(run, size, options):
            own[b] = tiled_image(run, image, size, options)
        else:
            batches.setdefault(size, []).append(b)
    for size, picked in batches.items():
        x, ranges = prepared([images[b] for b in picked], run.norm, size)
        probs = predict_probs(run.predictor, padded(x), ranges, run.rt, options.tta)[:, :, :size[0], :size[1]]
        for i, b in enumerate(picked):
            own[b] = at_own_size(probs[i:i + 1], images[b].shape)
            at_input[b] = probs[i:i + 1] if size == (run.cfg["input_h"], run.cfg["input_w"]) else None
    return own, at_input


def image_probs(runs, data, options):
    """Yields (k, image, probabilities (1, C, H, W) at the image's own size, averaged over the runs, the first run's
    probabilities (1, C, h, w) at its network input or None), a few images (options.batch_size) at a time."""
    for start in range(0, len(data.ids), options.batch_size):
        images = [data.image(k) for k in range(start, min(start + options.batch_size, len(data.ids)))]
        per_run = [run_probs(run, images, options) for run in runs]
        for b, image in enumerate(images):
            yield start + b, image, sum(own[b] for own, _ in per_run) / len(runs), per_run[0][1][b]


def how_predicted(runs, options):
    """How images are brought to the network, as val.py's score table says it."""
    run = runs[0]
    if options.resize or run.scale is None:
        return "the prediction resized back to it"
    where = "at full resolution" if tuple(run.scale) == (1.0, 1.0) else "at the trained scale, resized back to it"
    if options.tile or run.cfg["crop"]:
        return f"predicted by tiles {where}"
    return f"predicted whole {where}, by tiles when larger than {WHOLE_MAX_PIXELS // 1024 ** 2} Mpx"


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
    for k, image, probs, at_input in image_probs(runs, data, options):
        mask = to_prediction(probs, cfg, thresholds)                                      # (1, C, H, W)
        yield ImageResult(k, data.ids[k], image, probs[0].cpu().numpy(), mask[0].cpu().numpy(), mask, at_input,
                          cfg, options)
