"""The BioImage.IO model package of an export (format 0.5): rdf.yaml and its files, zipped, and validated.

BioImage.IO consumers (deepImageJ in Fiji, napari, QuPath, ilastik, bioimageio.core) apply a model's
preprocessing themselves, to the whole image, before they tile it. So the package's weights are the part of the
Predictor after the intensity scaling (archs.Probabilities: network, final head, sigmoid or softmax), and rdf.yaml
says with BioImage.IO's own operations what normalize.py does before it:

    imagenet     scale_linear per channel: gain 1 / (full range * std), offset -mean / std
    percentile   scale_range (the run's percentiles, per image and channel), clip 0..1, scale_linear 4, -2

per_image_norm stays inside the model (Probabilities' per_image_eps): it standardises each network input (a tile,
as in training each crop), and BioImage.IO's zero_mean_unit_variance would take its statistics from the raw image
(bioimageio.core computes a sample's statistics before any preprocessing step).

The weights are in one format, TorchScript, which every one of those tools runs: each further format would store
the weights again (an export holds three copies at most: model.pth, model.onnx and this). The package is built in
a folder of its own that is removed once zipped; only the zip is kept.

The test tensors are the raw test image and the Predictor's probabilities for it, so a consumer that runs the
package's preprocessing and weights reproduces what val.py gives; bioimageio.core's model test checks exactly that.
"""
import hashlib
import os
import string
import tempfile
import typing
import warnings
import zipfile
from dataclasses import dataclass, replace

import cv2
import numpy as np
import torch

import archs
from figures import display_image
from normalize import STANDARDIZE_EPS, Normalization, mean_std, normalize
from predictor import EXPORT_TOLERANCE, ExportFault, fault_words, network_settings, save_torchscript, within_tolerance
from utils import atomic_write

FORMAT_VERSION = "0.5.12"
CITE = {
    "UNet": {"text": "Ronneberger, Fischer and Brox. U-Net: Convolutional networks for biomedical image "
                     "segmentation. MICCAI 2015.", "doi": "10.1007/978-3-319-24574-4_28"},
    "NestedUNet": {"text": "Zhou, Rahman Siddiquee, Tajbakhsh and Liang. UNet++: A nested U-Net architecture for "
                           "medical image segmentation. DLMIA 2018.", "doi": "10.1007/978-3-030-00889-5_1"},
}
FILES = {"torchscript": "weights_torchscript.pt", "test_input": "test_input.npy", "test_output": "test_output.npy",
         "cover": "cover.png", "documentation": "README.md"}


TEXT_LIMITS = {"name": 128, "description": 1024, "tensor": 128}   # bioimageio.spec 0.5's longest texts
NAME_LIMIT = 64                   # a package name longer than this is reported by bioimageio.spec (INFO)
NAME_CHARACTERS = set(string.ascii_letters + string.digits + "_+- ()")    # what a package's name may hold


class PackageInvalid(ExportFault):
    """The package export.py wrote did not validate: a fault of the toolkit, not of the user's input."""


def package_name(run_name, arch):
    """'<run> <arch> segmentation' in the characters a package name may hold (others become '-'), at most 64: the
    run name shortened first, so that the name always ends in what the model is."""
    tail = f" {arch} segmentation"
    run = "".join(c if c in NAME_CHARACTERS else "-" for c in run_name)
    return (run[:NAME_LIMIT - len(tail)] + tail).strip()


def known_license(license_id):
    """Whether license_id is an SPDX identifier bioimageio.spec accepts (True where the list cannot be read)."""
    try:
        from bioimageio.spec._internal._generated_spdx_license_literals import LicenseId
    except ImportError:
        return True
    return license_id in typing.get_args(LicenseId)


@dataclass(frozen=True)
class PackageInfo:
    """What the user says about the model (export.py's flags)."""
    name: str
    description: str
    authors: tuple
    license: str = "CC-BY-4.0"


def preprocessing(d):
    """BioImage.IO preprocessing steps equal to normalize.normalize for a model.json description `d`."""
    n = d["normalize"]
    mean, std = mean_std(Normalization(n["mode"], n["pmin"], n["pmax"], n["per_image"], d["input_channels"]))
    steps = [{"id": "ensure_dtype", "kwargs": {"dtype": "float32"}}]
    if n["mode"] == "percentile":
        steps += [{"id": "scale_range", "kwargs": {"axes": ["y", "x"], "min_percentile": float(n["pmin"]),
                                                   "max_percentile": float(n["pmax"])}},
                  {"id": "clip", "kwargs": {"min": 0.0, "max": 1.0}},
                  {"id": "scale_linear", "kwargs": {"gain": 1 / std[0], "offset": -mean[0] / std[0]}}]
    else:
        full = float(n["full_range"])
        steps.append({"id": "scale_linear", "kwargs": {"axis": "channel", "gain": [1 / (full * s) for s in std],
                                                       "offset": [-m / s for m, s in zip(mean, std)]}})
    return steps + [{"id": "ensure_dtype", "kwargs": {"dtype": "float32"}}]


def channel_names(d):
    c = d["input_channels"]
    return ["red", "green", "blue"] if c == 3 else [f"channel{k}" for k in range(c)]


def class_names(d):
    """The output channels' names: the run's class names where they are distinct non-empty texts, else class0, ..."""
    names = [str(n).strip() for n in d.get("class_names") or []]
    if len(names) == d["num_classes"] and all(names) and len(set(names)) == len(names):
        return names
    return [f"class{c}" for c in range(d["num_classes"])]


def network_part(predictor):
    """The Predictor's network, head and activation as archs.Probabilities (the package's model), same weights."""
    d = predictor.description
    network = {**network_settings(d), "deep_supervision": bool(d["deep_supervision"])}
    model = archs.Probabilities(network, d["class_mode"], STANDARDIZE_EPS if d["normalize"]["per_image"] else None)
    model.network.load_state_dict(predictor.network.state_dict())
    return model.float().eval()


def sha256(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def tensor_axes(d, space):
    return [{"type": "batch"}, {"type": "channel", "channel_names": channel_names(d) if space == "input" else
                                class_names(d)},
            *({"type": "space", "id": a, "size": {"min": d["size_multiple"], "step": d["size_multiple"]}
               if space == "input" else {"tensor_id": "raw", "axis_id": a}} for a in ("y", "x"))]


def fitted(parts, limit):
    """The first parts joined by '; ', as many as fit in `limit` characters (the first cut to fit, if alone too long)."""
    text = parts[0][:limit]
    for part in parts[1:]:
        if len(text) + 2 + len(part) > limit:
            break
        text += "; " + part
    return text


def input_text(d):
    """The input tensor's description, within bioimageio.spec's 128 characters for any type and input size."""
    h, w = d["input_size"]
    return fitted([f"raw {d['input_dtype']} image values", f"height and width multiples of {d['size_multiple']}",
                   f"trained at {h}x{w}"], TEXT_LIMITS["tensor"])


def output_text(d):
    how = "softmax over the classes" if d["class_mode"] == "softmax" else "sigmoid per class"
    return fitted([how, "threshold at 0.5 for masks"], TEXT_LIMITS["tensor"])


def rdf(d, info, folder):
    """rdf.yaml's content for the files written in `folder`."""
    h = lambda key: sha256(os.path.join(folder, FILES[key]))  # noqa: E731
    return {
        "format_version": FORMAT_VERSION, "type": "model", "name": info.name, "description": info.description,
        "authors": [{"name": a} for a in info.authors], "license": info.license,
        "cite": [CITE[d["arch"]]], "covers": [{"source": FILES["cover"]}], "documentation": {"source": FILES["documentation"]},
        "tags": ["segmentation", "unet" if d["arch"] == "UNet" else "unet++", "2d", "pytorch", "unet-toolkit"],
        "inputs": [{"id": "raw", "description": input_text(d), "axes": tensor_axes(d, "input"),
                    "test_tensor": {"source": FILES["test_input"], "sha256": h("test_input")},
                    "data": {"type": "float32"}, "preprocessing": preprocessing(d)}],
        "outputs": [{"id": "probabilities", "description": output_text(d), "axes": tensor_axes(d, "output"),
                     "test_tensor": {"source": FILES["test_output"], "sha256": h("test_output")},
                     "data": {"type": "float32", "range": [0.0, 1.0]}}],
        "weights": {"torchscript": {"source": FILES["torchscript"], "sha256": h("torchscript"),
                                    "pytorch_version": torch.__version__.split("+")[0]}},
        "config": {"bioimageio": {"reproducibility_tolerance": [
            {"absolute_tolerance": EXPORT_TOLERANCE, "relative_tolerance": EXPORT_TOLERANCE}]}},
    }


def checked(name, got, expected):
    """The export check (predictor.within_tolerance), in the package's words: the difference, or an ExportFault."""
    return within_tolerance(got, expected, f"the BioImage.IO package's {name} weights differ")


def write_weights(model, z, expected, folder):
    """The package's model as TorchScript, checked on the normalised test input z and on a larger input (z mirrored
    beside and under itself, 16 px more each way: a consumer gives any multiple of 16) -> the largest difference."""
    path = os.path.join(folder, FILES["torchscript"])
    save_torchscript(model, z, path)
    larger = torch.cat([z, z.flip(2)], 2)
    larger = torch.cat([larger, larger.flip(3)], 3)[:, :, :z.shape[2] + 16, :z.shape[3] + 16]
    loaded = torch.jit.load(path)
    with torch.no_grad():
        return max(checked("torchscript", loaded(z), expected), checked("torchscript", loaded(larger), model(larger)))


def write_cover(x, expected, path):
    """A 2:1 cover: the test image as a person sees it, and the first class's probabilities, side by side."""
    image = display_image(x[0].permute(1, 2, 0).numpy())
    probs = (expected[0, 0].numpy() * 255).round().astype(np.uint8)
    side = 256
    tiles = [cv2.resize(image, (side, side), interpolation=cv2.INTER_NEAREST),
             cv2.resize(cv2.cvtColor(probs, cv2.COLOR_GRAY2RGB), (side, side), interpolation=cv2.INTER_NEAREST)]
    ok, png = cv2.imencode(".png", cv2.cvtColor(np.concatenate(tiles, axis=1), cv2.COLOR_RGB2BGR))
    atomic_write(path, lambda f: f.write(png.tobytes()), mode="wb")


def documentation(d, info):
    """The package's README.md."""
    steps = ", ".join(s["id"] for s in preprocessing(d)[1:-1])
    return (f"# {info.name}\n\n{info.description}\n\nA {d['arch']} trained with unet-toolkit. Input `raw`: "
            f"(batch, {d['input_channels']}, y, x), the image's raw values, y and x multiples of {d['size_multiple']}; "
            f"the consumer applies the preprocessing in rdf.yaml ({steps}) to the whole image. Output "
            f"`probabilities`: (batch, {d['num_classes']}, y, x), in 0..1; threshold at 0.5 for masks.\n")


def write_files(predictor, x, expected, folder, info):
    """rdf.yaml and the files it names, in `folder`; the weights checked against `expected` -> their difference."""
    import yaml
    z = normalize(x, predictor.ranges(x), replace(predictor.norm, per_image=False))    # per_image: in the model
    diff = write_weights(network_part(predictor), z, expected, folder)
    np.save(os.path.join(folder, FILES["test_input"]), x.numpy())
    np.save(os.path.join(folder, FILES["test_output"]), expected.numpy())
    write_cover(x, expected, os.path.join(folder, FILES["cover"]))
    atomic_write(os.path.join(folder, FILES["documentation"]), lambda f: f.write(documentation(predictor.description, info)))
    content = rdf(predictor.description, info, folder)
    atomic_write(os.path.join(folder, "rdf.yaml"), lambda f: yaml.safe_dump(content, f, sort_keys=False))
    return diff


def write(predictor, x, expected, zip_path, info):
    """The package zip for a Predictor, its raw test input x (1, C, H, W) and output expected (1, K, H, W), built
    in a folder beside zip_path that is removed once zipped -> the weights' largest difference to `expected`."""
    with tempfile.TemporaryDirectory(prefix=".package-", dir=os.path.dirname(zip_path) or ".") as folder:
        diff = write_files(predictor, x, expected, folder, info)
        with zipfile.ZipFile(zip_path, "w", zipfile.ZIP_DEFLATED) as zf:
            for name in ["rdf.yaml", *FILES.values()]:
                zf.write(os.path.join(folder, name), name)
    return diff


def validate(path):
    """bioimageio.spec's validation of a package (offline: every file is in it) -> its status; a PackageInvalid
    (a fault of the toolkit) with the validation's report when it is not valid."""
    from bioimageio.spec import InvalidDescr, load_description
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        descr = load_description(path, perform_io_checks=True)
    summary = descr.validation_summary
    if isinstance(descr, InvalidDescr) or summary.status not in ("valid-format", "passed"):
        found = "; ".join(f"{'.'.join(map(str, e.loc))}: {e.msg}" for e in summary.errors) or summary.status
        raise PackageInvalid(fault_words(f"the BioImage.IO package did not pass bioimageio.spec's validation "
                                         f"({found[:2000]})"))
    return summary.status
