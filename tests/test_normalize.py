import numpy as np
import pytest
import torch

from normalize import Normalization, as_batch, intensity_range, normalize, resolve_mode, standardize, to_unit


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
