"""Input normalisation: how raw intensities (8- or 16-bit integers, float32) become network inputs.

The one place where this is done, for training (both loaders), val.py, bench.py and any export, with the one
preprocess they share before it: each image's intensity range taken at its own size (image_ranges), then the
image resized to the network input (resize_image) unless it is cropped or tiled. Two steps,
so that training's augmentation fits between them as the reference's albumentations pipeline has it
(colour changes on the 0..1 image, Normalize last):

    to_unit       raw intensities -> about 0..1, with the image's intensity range (intensity_range, computed
                  on the whole image at its own size, before any resize, crop or tile)
    standardize   0..1 -> what the network takes: (x - mean) / std per channel, with ImageNet's mean and std
                  (imagenet mode) or 0.5 and 0.25 (percentile mode: about -2..2, centred as ImageNet's are, which
                  keeps weight averaging (--ema) and its BatchNorm statistics working), and with per_image, each
                  network input standardised per channel (zero mean, unit variance)

    normalize = standardize(to_unit(x, ranges))

Modes (config key `normalize`):
    imagenet    the reference's: x / the type's full range (255 for 8-bit, 65535 for 16-bit, 1 for float),
                then ImageNet's mean/std. On 8-bit data, exactly what the toolkit always did.
    percentile  per image and channel, the pmin-th percentile -> 0 and the pmax-th -> 1 (the CSBDeep/StarDist
                convention, 1 and 99.8 by default), clipped to 0..1; for 12/16-bit and float microscopy images
                whose signal uses a small, varying part of the type's range.
    auto        (training only) imagenet when every image is 8-bit, percentile otherwise; train.py saves the
                resolved mode with the run, so val.py and an export apply what the run trained with.
"""
from dataclasses import dataclass

import cv2
import numpy as np
import torch

MODES = ("auto", "imagenet", "percentile")
IMAGENET_MEAN = (0.485, 0.456, 0.406)     # albumentations' Normalize defaults, per RGB channel
IMAGENET_STD = (0.229, 0.224, 0.225)
STANDARDIZE_EPS = 1e-3                    # per_image: added to the std, so a flat image is not blown up
FLAT_WIDTH = 1e-6                         # a flat channel's range (pmax-th percentile = pmin-th): this much wide,
                                          # relative to the intensity (at least 1), so that to_unit never divides by 0


@dataclass(frozen=True)
class Normalization:
    """What normalisation a run applies: the mode (never 'auto' here), its percentiles, per-image standardisation."""
    mode: str = "imagenet"
    pmin: float = 1.0
    pmax: float = 99.8
    per_image: bool = False
    channels: int = 3

    @classmethod
    def from_config(cls, cfg, dtypes=None):
        """The config's normalisation; 'auto' is resolved for images of these types (an error without them)."""
        mode = cfg["normalize"] if dtypes is None else resolve_mode(cfg["normalize"], dtypes)
        if mode not in MODES[1:]:
            raise ValueError(f"normalize {mode!r} must be resolved for the images (resolve_mode) before use")
        return cls(mode, cfg["norm_pmin"], cfg["norm_pmax"], bool(cfg["per_image_norm"]), cfg["input_channels"])


def resolve_mode(mode, dtypes):
    """'auto' -> 'imagenet' if every image type in `dtypes` is 8-bit, else 'percentile'; other modes as they are."""
    if mode != "auto":
        return mode
    return "imagenet" if all(np.dtype(d) == np.uint8 for d in dtypes) else "percentile"


def full_range(dtype):
    """The largest value of an integer image type (255, 65535, ...); 1.0 for float images (taken as 0..1)."""
    dtype = np.dtype(dtype)
    return float(np.iinfo(dtype).max) if dtype.kind in "ui" else 1.0


def intensity_range(image, norm):
    """Raw image (H, W, C) -> float32 (2, C): per channel the intensity that maps to 0 (row 0) and to 1 (row 1).

    Always computed on the whole image at its own size, so that a resized copy, a training crop and a
    prediction tile of the same file are normalised alike. Percentiles: percentile_ranges, in float64 here (the
    figures numpy.percentile gave), in the Predictor in its input's float32."""
    channels = image.shape[2]
    if norm.mode == "imagenet":
        return np.array([[0.0] * channels, [full_range(image.dtype)] * channels], np.float32)
    x = torch.from_numpy(np.asarray(image, np.float64)).permute(2, 0, 1)[None]
    return percentile_ranges(x, norm.pmin, norm.pmax)[0].numpy().astype(np.float32)


def percentile_ranges(x, pmin, pmax):
    """(B, C, H, W) -> (B, 2, C): per image and channel the pmin-th and pmax-th percentiles, linearly interpolated
    as numpy.percentile does (a flat channel widened by FLAT_WIDTH), written with tensor operations only so that a
    traced or exported graph (the Predictor's, with ranges=None) keeps the image size dynamic."""
    flat = x.flatten(2).sort(dim=2).values                                        # (B, C, N)
    last = torch.ones_like(flat[:1, :1]).sum(dim=2, keepdim=True) - 1             # N - 1, as a tensor
    rows = []
    for p in (pmin, pmax):
        position = last * (p / 100.0)
        below = position.floor()
        frac = position - below
        lo = flat.gather(2, below.long().expand(flat.shape[0], flat.shape[1], 1))
        hi = flat.gather(2, (below + 1).clamp(max=last).long().expand(flat.shape[0], flat.shape[1], 1))
        rows.append((lo + (hi - lo) * frac)[:, :, 0])
    lo, hi = rows
    hi = torch.where(hi > lo, hi, lo + FLAT_WIDTH * lo.abs().clamp(min=1.0))
    return torch.stack([lo, hi], dim=1)


def to_unit(x, ranges, norm):
    """Raw intensities (B, C, H, W) float32 and their ranges (B, 2, C) -> about 0..1 (clipped in percentile mode)."""
    lo = ranges[:, 0, :, None, None]
    hi = ranges[:, 1, :, None, None]
    x = (x - lo) / (hi - lo)
    return x.clamp(0, 1) if norm.mode == "percentile" else x


PERCENTILE_MEAN_STD = (0.5, 0.25)   # percentile mode: 0..1 -> about -2..2, centred like ImageNet-normalised inputs


def mean_std(norm):
    """Per-channel (mean, std) that standardize() applies: ImageNet's for RGB, their average for any other channel
    count (imagenet mode); 0.5 and 0.25 in percentile mode (uncentred 0..1 inputs left an --ema model's averaged
    BatchNorm statistics unusable: validation IoU 0.00 where the raw weights scored 0.70)."""
    if norm.mode == "percentile":
        mean, std = PERCENTILE_MEAN_STD
        return (mean,) * norm.channels, (std,) * norm.channels
    if norm.channels == 3:
        return IMAGENET_MEAN, IMAGENET_STD
    return (sum(IMAGENET_MEAN) / 3,) * norm.channels, (sum(IMAGENET_STD) / 3,) * norm.channels


def standardize(x, norm):
    """0..1 images (B, C, H, W) -> network inputs: (x - mean) / std per channel, then with per_image each input
    (a resized image, a crop, a tile) to zero mean and unit variance per channel."""
    mean, std = mean_std(norm)
    x = (x - torch.tensor(mean, device=x.device).view(1, -1, 1, 1)) / torch.tensor(std, device=x.device).view(1, -1, 1, 1)
    return standardize_each(x, STANDARDIZE_EPS) if norm.per_image else x


def standardize_each(x, eps):
    """Each input (B, C, H, W) to zero mean and unit variance per channel, eps added to the standard deviation (the
    per_image_norm step of standardize). archs.py holds the same function for archs.Probabilities, which a
    BioImage.IO package rebuilds from archs.py alone (tests/test_normalize.py checks that the two are the same)."""
    return (x - x.mean(dim=(2, 3), keepdim=True)) / (x.std(dim=(2, 3), keepdim=True) + eps)


def normalize(x, ranges, norm):
    """Raw intensities (B, C, H, W) float32 with their ranges (B, 2, C) -> network inputs."""
    return standardize(to_unit(x, ranges, norm), norm)


def as_batch(images):
    """Raw images [(H, W, C)] of one size -> float32 tensor (B, C, H, W) of the same values."""
    return torch.from_numpy(np.stack([np.asarray(im, dtype=np.float32) for im in images])).permute(0, 3, 1, 2)


def resize_image(image, size):
    """(H, W, C) image in any type -> (h, w, C) at size=(h, w), bilinear (what the memory loader and val.py do)."""
    h, w = size
    return cv2.resize(image, (w, h), interpolation=cv2.INTER_LINEAR).reshape(h, w, -1)


def image_ranges(images, norm):
    """[(H, W, C) raw image] -> float32 tensor (B, 2, C): each image's intensity range (normalize.intensity_range)."""
    return torch.from_numpy(np.stack([intensity_range(im, norm) for im in images]))
