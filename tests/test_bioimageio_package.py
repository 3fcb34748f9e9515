"""bioimageio_package.py: the package's model equals the Predictor after rdf.yaml's steps, and its TorchScript weights
are built and checked in a folder that is not left (the packages export.py writes, their validation and
bioimageio.core's test: tests/test_export.py)."""
import os
import zipfile
from dataclasses import replace

import numpy as np
import torch

import bioimageio_package as bp
from archs import build_model
from normalize import normalize
from predictor import Predictor, describe

CFG = {"arch": "NestedUNet", "deep_supervision": True, "base_channels": 8, "input_channels": 2, "num_classes": 2, "class_mode": "sigmoid",
       "input_h": 32, "input_w": 32, "normalize": "percentile", "norm_pmin": 2.0, "norm_pmax": 99.0,
       "per_image_norm": True, "crop": False, "target": "masks"}


def predictor(cfg=CFG, dtype="uint16"):
    torch.manual_seed(0)
    return Predictor(build_model(cfg), describe(cfg, {np.dtype(dtype)})).eval()


def test_the_packages_model_after_the_rdf_scaling_equals_the_predictor():
    p = predictor()
    model = bp.network_part(p)
    x = torch.rand(2, 2, 32, 48) * 4000
    scaled = normalize(x, p.ranges(x), replace(p.norm, per_image=False))     # what rdf.yaml's steps give
    with torch.no_grad():
        assert torch.allclose(model(scaled), p(x), atol=1e-6)
    assert model.per_image_eps is not None


def test_preprocessing_names_the_runs_percentiles_and_the_imagenet_scaling():
    steps = bp.preprocessing(predictor().description)
    assert steps[1] == {"id": "scale_range", "kwargs": {"axes": ["y", "x"], "min_percentile": 2.0,
                                                         "max_percentile": 99.0}}
    rgb = predictor({**CFG, "input_channels": 3, "normalize": "imagenet", "per_image_norm": False}, "uint8")
    linear = bp.preprocessing(rgb.description)[1]["kwargs"]
    # 8-bit 255 -> (1 - mean) / std per channel, as normalize.py's imagenet mode gives
    got = [255 * g + o for g, o in zip(linear["gain"], linear["offset"])]
    assert np.allclose(got, [(1 - 0.485) / 0.229, (1 - 0.456) / 0.224, (1 - 0.406) / 0.225])


def test_the_package_is_its_zip_alone_with_torchscript_weights_that_take_any_multiple_of_16(tmp_path):
    """The files are built in a hidden folder beside the zip and removed once zipped; the weights, checked against
    PyTorch on the test input, reproduce the test output (after rdf.yaml's steps) at another size too."""
    p = predictor({**CFG, "arch": "UNet", "deep_supervision": False, "base_channels": 4})
    x = torch.rand(1, 2, 32, 32) * 4000
    with torch.no_grad():
        expected = p(x)
    info = bp.PackageInfo("cells NestedUNet segmentation", "Nuclei.", ("Ada Lovelace",))
    diff = bp.write(p, x, expected, str(tmp_path / "package.zip"), info)
    assert diff <= 1e-4 and os.listdir(tmp_path) == ["package.zip"]
    with zipfile.ZipFile(tmp_path / "package.zip") as z:
        assert sorted(z.namelist()) == sorted(["rdf.yaml", *bp.FILES.values()])
        z.extract(bp.FILES["torchscript"], tmp_path)
    weights = torch.jit.load(str(tmp_path / bp.FILES["torchscript"]))
    y = torch.rand(1, 2, 48, 64) * 4000
    with torch.no_grad():
        got = weights(normalize(y, p.ranges(y), replace(p.norm, per_image=False)))
        assert torch.allclose(got, p(y), atol=1e-5)
