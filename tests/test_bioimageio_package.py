"""bioimageio_package.py: the package's model equals the Predictor and its architecture file stands alone (the
packages export.py writes, their validation and bioimageio.core's test: tests/test_export.py)."""
import os
import subprocess
import sys
from dataclasses import replace

import numpy as np
import torch

import archs
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
    model, kwargs = bp.network_part(p)
    x = torch.rand(2, 2, 32, 48) * 4000
    scaled = normalize(x, p.ranges(x), replace(p.norm, per_image=False))     # what rdf.yaml's steps give
    with torch.no_grad():
        assert torch.allclose(model(scaled), p(x), atol=1e-6)
    assert kwargs["per_image_eps"] is not None and kwargs["network"]["input_channels"] == 2


def test_preprocessing_names_the_runs_percentiles_and_the_imagenet_scaling():
    steps = bp.preprocessing(predictor().description)
    assert steps[1] == {"id": "scale_range", "kwargs": {"axes": ["y", "x"], "min_percentile": 2.0,
                                                         "max_percentile": 99.0}}
    rgb = predictor({**CFG, "input_channels": 3, "normalize": "imagenet", "per_image_norm": False}, "uint8")
    linear = bp.preprocessing(rgb.description)[1]["kwargs"]
    # 8-bit 255 -> (1 - mean) / std per channel, as normalize.py's imagenet mode gives
    got = [255 * g + o for g, o in zip(linear["gain"], linear["offset"])]
    assert np.allclose(got, [(1 - 0.485) / 0.229, (1 - 0.456) / 0.224, (1 - 0.406) / 0.225])


def test_the_architecture_file_rebuilds_the_model_with_nothing_but_torch(tmp_path):
    """A BioImage.IO consumer imports the package's archs.py alone: no other file of this toolkit beside it."""
    (tmp_path / "archs_copy.py").write_text(open(archs.__file__).read())
    model, kwargs = bp.network_part(predictor())
    torch.save(model.state_dict(), tmp_path / "weights.pt")
    code = ("import importlib.util, torch; assert importlib.util.find_spec('normalize') is None; "
            "import archs_copy; "
            f"m = archs_copy.Probabilities(**{kwargs!r}); "
            "m.load_state_dict(torch.load('weights.pt', weights_only=True)); m.eval(); "
            "print(tuple(m(torch.rand(1, 2, 32, 32)).shape))")
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "(1, 2, 32, 32)"
