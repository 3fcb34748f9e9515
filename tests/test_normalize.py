"""normalize.py: the two steps (to_unit, standardize), the intensity ranges and their one percentile function."""
import ast
import inspect

import numpy as np
import pytest
import torch

import archs
import normalize as normalize_module
from normalize import (Normalization, as_batch, intensity_range, normalize, percentile_ranges, resolve_mode, standardize,
                       to_unit)


def test_imagenet_mode_is_the_reference_normalisation_on_8_bit_images():
    img = np.random.default_rng(0).integers(0, 256, (8, 9, 3), dtype=np.uint8)
    norm = Normalization("imagenet", channels=3)
    x = normalize(as_batch([img]), torch.from_numpy(intensity_range(img, norm))[None], norm)
    mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
    expected = (img / 255.0 - mean) / std
    assert np.allclose(x[0].permute(1, 2, 0).numpy(), expected, atol=1e-5)


def test_imagenet_mode_scales_16_bit_by_its_full_range_without_rounding_to_8_bits():
    img = np.array([[1000, 1001]], np.uint16)[:, :, None]
    norm = Normalization("imagenet", channels=1)
    x = to_unit(as_batch([img]), torch.from_numpy(intensity_range(img, norm))[None], norm)
    assert x[0, 0, 0, 1] > x[0, 0, 0, 0]                     # one grey level of 65535 still counts
    assert torch.allclose(x[0, 0, 0], torch.tensor([1000, 1001]) / 65535.0)


def test_percentile_mode_maps_each_channel_by_its_own_percentiles_and_clips():
    rng = np.random.default_rng(1)
    dim = rng.normal(300, 20, (64, 64)).clip(0)              # a 12-bit-like signal in a few hundred grey levels
    bright = rng.normal(3000, 400, (64, 64)).clip(0)
    img = np.stack([dim, bright], axis=2).astype(np.uint16)
    norm = Normalization("percentile", 1.0, 99.8, channels=2)
    ranges = intensity_range(img, norm)
    assert np.allclose(ranges[0], np.percentile(img.reshape(-1, 2), 1.0, axis=0))
    assert np.allclose(ranges[1], np.percentile(img.reshape(-1, 2), 99.8, axis=0))
    x = to_unit(as_batch([img]), torch.from_numpy(ranges)[None], norm)
    assert x.min() == 0 and x.max() == 1
    expected = np.clip((img - ranges[0]) / (ranges[1] - ranges[0]), 0, 1)      # both channels now span 0..1 alike
    assert np.allclose(x[0].permute(1, 2, 0).numpy(), expected, atol=1e-6)
    assert len(torch.unique(x[0, 0])) > 100                  # the dim channel kept its grey levels
    assert torch.allclose(standardize(x, norm), (x - 0.5) / 0.25)   # then centred: about -2..2, as ImageNet's are


def test_percentile_of_a_flat_image_is_finite():
    img = np.full((5, 5, 1), 7, np.uint16)
    norm = Normalization("percentile", channels=1)
    x = to_unit(as_batch([img]), torch.from_numpy(intensity_range(img, norm))[None], norm)
    assert torch.isfinite(x).all()


def test_float_images_are_taken_as_0_to_1_in_imagenet_mode():
    img = np.full((2, 2, 1), 0.25, np.float32)
    norm = Normalization("imagenet", channels=1)
    assert intensity_range(img, norm).tolist() == [[0.0], [1.0]]


def test_auto_chooses_imagenet_only_when_every_image_is_8_bit():
    assert resolve_mode("auto", {np.dtype(np.uint8)}) == "imagenet"
    assert resolve_mode("auto", {np.dtype(np.uint8), np.dtype(np.uint16)}) == "percentile"
    assert resolve_mode("auto", {np.dtype(np.float32)}) == "percentile"
    assert resolve_mode("imagenet", {np.dtype(np.uint16)}) == "imagenet"
    with pytest.raises(ValueError):
        Normalization.from_config({"normalize": "auto", "norm_pmin": 1, "norm_pmax": 99, "per_image_norm": False,
                                   "input_channels": 1})


def test_per_image_standardisation_ignores_each_images_brightness_and_contrast():
    norm = Normalization("imagenet", per_image=True, channels=3)
    x = torch.rand(2, 3, 32, 32)
    scale, shift = torch.tensor([3.0, 0.5, 2.0]).view(1, 3, 1, 1), torch.tensor([5.0, -1.0, 0.2]).view(1, 3, 1, 1)
    assert torch.allclose(standardize(x, norm), standardize(x * scale + shift, norm), atol=5e-3)   # up to the eps
    plain = Normalization("imagenet", channels=3)
    assert not torch.allclose(standardize(x, plain), standardize(x * scale + shift, plain), atol=1e-3)


@pytest.mark.parametrize("channels", [1, 2, 3, 4])
def test_any_channel_count_gets_a_mean_and_std_per_channel(channels):
    norm = Normalization("imagenet", channels=channels)
    assert standardize(torch.rand(1, channels, 4, 4), norm).shape == (1, channels, 4, 4)


@pytest.mark.parametrize("shape", [(1, 1, 7, 9), (2, 3, 16, 16), (1, 2, 5, 1)])
def test_percentile_ranges_equal_numpys(shape):
    x = torch.rand(*shape) * 4000
    got = percentile_ranges(x, 1.0, 99.8)
    for b in range(shape[0]):
        expected = np.percentile(x[b].flatten(1).numpy().T, [1.0, 99.8], axis=0)
        assert np.allclose(got[b].numpy(), expected, rtol=1e-5)


def numpy_range(image, pmin, pmax):
    """What intensity_range computed with NumPy before percentile_ranges was its one function (its flat guard
    widened every channel by the image's largest |pmin-th percentile|)."""
    lo, hi = np.percentile(image.reshape(-1, image.shape[2]), [pmin, pmax], axis=0)
    hi = np.where(hi > lo, hi, lo + 1e-6 * max(1.0, float(abs(lo).max())))
    return np.stack([lo, hi]).astype(np.float32)


RNG = np.random.default_rng(3)
IMAGES = {
    "8-bit RGB": RNG.integers(0, 256, (37, 23, 3)).astype(np.uint8),
    "16-bit": np.stack([RNG.gamma(2, 300, (64, 48)), RNG.normal(30000, 5000, (64, 48)).clip(0, 65535)], 2).astype(np.uint16),
    "float": RNG.normal(0.3, 0.1, (20, 31, 1)).astype(np.float32),
    "flat 16-bit": np.full((9, 9, 1), 7, np.uint16),
    "flat 8-bit RGB": np.full((6, 7, 3), 200, np.uint8),
    "flat zero float": np.zeros((5, 5, 1), np.float32),
    "flat but for a few pixels": np.pad(np.full((40, 40, 1), 100, np.uint16), ((0, 1), (0, 0), (0, 0)), constant_values=9000),
}


@pytest.mark.parametrize("name", IMAGES)
def test_training_and_the_predictor_take_the_same_percentile_ranges(name):
    """One function for both: intensity_range (training, val.py) in float64, the Predictor (and an export) in its
    float32 input; both as NumPy's percentiles gave, and a flat channel widened alike."""
    image = IMAGES[name]
    norm = Normalization("percentile", 1.0, 99.8, channels=image.shape[2])
    training = intensity_range(image, norm)
    predictor = percentile_ranges(as_batch([image]), norm.pmin, norm.pmax)[0].numpy()   # Predictor.ranges
    assert training.dtype == np.float32 and training.shape == (2, image.shape[2])
    assert np.allclose(training, numpy_range(image, norm.pmin, norm.pmax), rtol=1e-6, atol=0)
    assert np.allclose(predictor, training, rtol=1e-5, atol=0)     # float32's position between two sorted values
    assert (training[1] > training[0]).all()
    x = to_unit(as_batch([image]), torch.from_numpy(training)[None], norm)
    assert torch.isfinite(x).all() and x.min() >= 0 and x.max() <= 1


def test_a_flat_channel_is_widened_by_its_own_level():
    image = np.stack([np.full((8, 8), 7), RNG.integers(1000, 2000, (8, 8)), np.full((8, 8), 0)], 2).astype(np.uint16)
    lo, hi = intensity_range(image, Normalization("percentile", channels=3))
    assert lo[0] == 7 and hi[0] == np.float32(7 + 7e-6) and hi[2] == np.float32(1e-6)   # not 7 + 1e-6 * 1000


def test_the_per_image_step_of_archs_is_normalizes():
    """archs.py keeps a copy (a BioImage.IO package rebuilds the model from archs.py alone): the same code."""
    def body(f):
        tree = ast.parse(inspect.getsource(f).strip()).body[0]
        return [ast.dump(node) for node in tree.body[1:]]                      # without the docstring
    assert body(archs.standardize_each) == body(normalize_module.standardize_each)
    imported = set()
    for node in ast.walk(ast.parse(inspect.getsource(normalize_module))):
        if isinstance(node, ast.Import):
            imported |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            imported.add(node.module)
    assert "archs" not in imported                                            # normalisation needs no network
