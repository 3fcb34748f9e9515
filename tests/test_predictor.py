"""predictor.py: the prediction module (normalise -> network -> head -> activation) and its description."""
import json

import numpy as np
import pytest
import torch

import config
from archs import build_model
from normalize import Normalization, intensity_range, normalize
import predictor
from predictor import Predictor, describe
from utils import UserError


@pytest.mark.parametrize("mode, dtype, high", [("imagenet", "uint8", 255), ("percentile", "uint16", 4000),
                                               ("imagenet", "uint16", 65535)])
def test_a_whole_image_without_ranges_is_normalised_as_training_normalises_it(mode, dtype, high):
    cfg = {**config.DEFAULTS, "arch": "UNet", "input_channels": 2, "normalize": mode, "per_image_norm": True}
    predictor = Predictor(build_model(cfg), describe(cfg, {np.dtype(dtype)})).eval()
    image = (np.random.default_rng(0).random((32, 48, 2)) * high).astype(dtype)
    ranges = torch.from_numpy(intensity_range(image, Normalization.from_config(cfg)))[None]
    x = torch.from_numpy(image.astype(np.float32)).permute(2, 0, 1)[None]
    with torch.no_grad():
        assert torch.allclose(predictor(x), predictor(x, ranges), atol=1e-5)


@pytest.mark.parametrize("arch, ds, mode, width", [("UNet", False, "sigmoid", 32), ("NestedUNet", True, "softmax", 8)])
def test_the_description_rebuilds_the_same_predictor_from_json(tmp_path, arch, ds, mode, width):
    cfg = {**config.DEFAULTS, "arch": arch, "deep_supervision": ds, "class_mode": mode, "num_classes": 3,
           "base_channels": width,
           "loss": "CEDiceLoss" if mode == "softmax" else "BCEDiceLoss", "normalize": "imagenet", "input_channels": 1}
    original = Predictor(build_model(cfg), describe(cfg, {np.dtype("uint8")})).eval()
    (tmp_path / "model.json").write_text(json.dumps(original.description))
    torch.save(original.network.state_dict(), tmp_path / "model.pth")
    # the three lines of the README
    model = Predictor.build(json.load(open(tmp_path / "model.json")))
    model.load_network(torch.load(tmp_path / "model.pth", weights_only=True)).eval()
    x = torch.rand(1, 1, 32, 32) * 255
    with torch.no_grad():
        probs = model(x)
        assert torch.equal(probs, original(x)) and probs.shape == (1, 3, 32, 32)
        heads = model.network(normalize(x, model.ranges(x), model.norm))      # normalise -> network, by hand
    logits = heads[-1] if ds else heads                                     # deep supervision: the last head
    assert torch.allclose(probs, logits.softmax(1) if mode == "softmax" else torch.sigmoid(logits), atol=1e-6)
    if mode == "softmax":
        assert torch.allclose(probs.sum(1), torch.ones(1, 32, 32))


def test_a_model_json_from_before_base_channels_builds_the_reference_width():
    description = describe({**config.DEFAULTS, "arch": "UNet", "base_channels": 8}, {np.dtype("uint8")})
    assert Predictor.build(description).network.conv0_0.conv1.out_channels == 8
    del description["base_channels"]                                  # as train.py wrote it before the key existed
    assert Predictor.build(description).network.conv0_0.conv1.out_channels == 32


def test_the_scale_a_run_learned_is_recorded_and_read_back_checked():
    cfg = {**config.DEFAULTS, "input_h": 64, "input_w": 32}
    assert predictor.learned_scale({**cfg, "crop": True}, [(512, 512)]) == (1.0, 1.0)       # crops: full resolution
    assert predictor.learned_scale(cfg, [(256, 64), (128, 64), (256, 96)]) == (4.0, 2.0)    # the median side / input
    description = describe(cfg, {np.dtype("uint8")}, (4.0, 2.0))
    assert predictor.recorded_scale(description, cfg) == (4.0, 2.0)
    old = describe(cfg, {np.dtype("uint8")})                    # a run from before the scale was recorded
    assert "scale" not in old and predictor.recorded_scale(old, cfg) is None
    assert predictor.recorded_scale(old, {**cfg, "crop": True}) == (1.0, 1.0)
    for bad in ([0, 1], [1], "2", [float("nan"), 1.0], [1e9, 1.0], [True, 1.0]):
        with pytest.raises(UserError, match="model.json: scale must be two numbers"):
            predictor.recorded_scale({**description, "scale": bad}, cfg)


def test_the_description_records_an_inverted_mask_and_settings_of_reads_it_back():
    from predictor import settings_of
    inverted = describe({**config.DEFAULTS, "invert_mask": True}, {np.dtype("uint8")})
    assert inverted["invert_mask"] is True and settings_of(inverted)["invert_mask"] is True
    plain = describe(config.DEFAULTS, {np.dtype("uint8")})
    assert settings_of(plain)["invert_mask"] is False
    del plain["invert_mask"]                                          # a model.json from before the key
    assert settings_of(plain)["invert_mask"] is False
