"""Export a trained run so that it runs outside this toolkit: TorchScript and ONNX.

    python export.py --name cells                         # -> models/cells/export/
    python export.py --name cells --output cells_model/

Every exported model is the run's Predictor (predictor.py): raw images (the file's values, 0..255 or 0..65535 or
float, channel-first) in, probabilities out, with the run's normalisation, network, final head and sigmoid or
softmax inside. Each is checked on export: its output on a test image (the run's first validation image when
its data set is at hand, else a generated one) must equal PyTorch's within 1e-4, or the export fails.

The folder holds model.pth + model.json (the self-describing PyTorch model, see predictor.py), model.torchscript.pt,
model.onnx, test_input.npy / test_output.npy, a README.md on using them, and bioimageio.zip (with its unzipped
folder bioimageio/): the BioImage.IO package (format 0.5) for deepImageJ in Fiji, napari, QuPath and ilastik,
validated with bioimageio.spec on export (see bioimageio_package.py).
"""
import signal
import sys

if __name__ == "__main__":   # Ctrl-C or SIGTERM while the imports below load (seconds: torch) ends quietly
    signal.signal(signal.SIGINT, lambda *_: sys.exit(130))
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(130))

import argparse
import json
import os
import shutil
import warnings
from dataclasses import dataclass

import numpy as np
import torch

import bioimageio_package
import config
import outputs
import rundir
from normalize import PERCENTILE_MEAN_STD, resize_image
from predict import TrainedRun
from predictor import save_onnx, save_torchscript, within_tolerance
from splits import load_validation
from utils import ClosedPipeSafe, Interrupts, UserError, atomic_write, exit_on_user_error, plain_warning

EXPORT_FILES = (rundir.MODEL, rundir.MODEL_JSON, "model.torchscript.pt", "model.onnx", "test_input.npy", "test_output.npy",
                "README.md", "bioimageio", "bioimageio.zip")
MARKER = outputs.EXPORT_MARKER          # in a folder export.py writes: its files there may be replaced next time


def parse_args(argv):
    p = argparse.ArgumentParser(description="Export a trained run: TorchScript, ONNX and a BioImage.IO package.",
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n")[1])
    p.add_argument("--name", required=True, help="the run to export (a folder under the runs folder)")
    config.add_runs_dir(p)
    p.add_argument("--output", metavar="DIR", help="export folder (default: <runs_dir>/<name>/export)")
    p.add_argument("--author", action="append", metavar="NAME", help="BioImage.IO package: an author's name (repeat "
                   "the flag for several; default: the user name of this account)")
    p.add_argument("--license", default="CC-BY-4.0", help="BioImage.IO package: the model's licence, an SPDX "
                   "identifier such as CC-BY-4.0 or MIT (default: CC-BY-4.0)")
    p.add_argument("--description", help="BioImage.IO package: one sentence on what the model segments (default: "
                   "the architecture and data set it was trained on)")
    p.add_argument("--speed", action="store_true", help="also measure prediction images/s of PyTorch (the run's "
                   "precision and layout), TorchScript and ONNX Runtime side by side, batches of 16 at the input size")
    args = p.parse_args(argv)
    return Request(name=args.name, runs_dir=config.runs_dir(args.runs_dir), output=args.output,
                   authors=tuple(args.author or ()), license=args.license, description=args.description,
                   speed=args.speed)


@dataclass(frozen=True)
class Request:
    """What export.py is asked to do, from its flags."""
    name: str                     # the run
    runs_dir: str
    output: str = None            # None: <runs_dir>/<name>/export
    authors: tuple = ()           # the package's authors (none given: this account's user name)
    license: str = "CC-BY-4.0"    # an SPDX identifier
    description: str = None       # None: the architecture and data set
    speed: bool = False           # also time PyTorch, TorchScript and ONNX Runtime


def test_image(member, run_dir):
    """(raw image (1, C, H, W) float32 at the network input size, where it came from): the run's first validation
    image, resized, if its data set is at hand; else a reproducible random image in the run's value range."""
    cfg, size = member.cfg, (member.cfg["input_h"], member.cfg["input_w"])
    try:
        data, _ = load_validation(cfg, [rundir.read_split(run_dir)])   # any data problem: the generated image
        image = resize_image(data.image(0), size)
        return torch.from_numpy(image.astype(np.float32)).permute(2, 0, 1)[None].contiguous(), data.ids[0]
    except UserError:
        high = member.predictor.full_range
        g = torch.Generator().manual_seed(0)
        return torch.rand(1, cfg["input_channels"], *size, generator=g) * high, "a generated image"


def check(name, got, expected):
    """The export check (predictor.within_tolerance), in export.py's words: the difference, or a UserError."""
    return within_tolerance(got, expected, f"the {name} export differs", "it was not kept")


def other_size(predictor, x):
    """A second test input, two images of another size (a crop and a flip of x, 16 px narrower and shorter where x
    allows, else wider), with PyTorch's output: the exported models must take any batch and size."""
    h, w = x.shape[2:]
    crop = x[:, :, :h - 16, :w - 16] if min(h, w) > 16 else torch.cat([x, x.flip(3)], 3)[:, :, :, :w + 16]
    y = torch.cat([crop, crop.flip(2)])
    with torch.no_grad():
        return y, predictor(y)


def export_torchscript(predictor, x, expected, path):
    save_torchscript(predictor, x, path)
    loaded = torch.jit.load(path)
    y, y_expected = other_size(predictor, x)
    with torch.no_grad():
        return max(check("TorchScript", loaded(x), expected), check("TorchScript", loaded(y), y_expected))


def export_onnx(predictor, x, expected, path):
    import onnxruntime   # here: training and val.py never import it
    save_onnx(predictor, x, path, ("input", "probabilities", "height", "width"))
    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    y, y_expected = other_size(predictor, x)
    return max(check("ONNX", session.run(None, {"input": x.numpy()})[0], expected),
               check("ONNX", session.run(None, {"input": y.numpy()})[0], y_expected))


def usage(name, d):
    """The export folder's README.md: what the model takes and gives, and how to run it without this toolkit."""
    n, (mean, std) = d["normalize"], PERCENTILE_MEAN_STD
    norm = (f"per image and channel, the {n['pmin']:g}th percentile -> 0 and the {n['pmax']:g}th -> 1, clipped, "
            f"then (x - {mean:g}) / {std:g}"
            if n["mode"] == "percentile" else f"x / {n['full_range']:g}, then ImageNet's mean and standard deviation")
    h, w = d["input_size"]
    return f"""# {name}: a {d['arch']} segmentation model exported by unet-toolkit

Input: float32 `(batch, {d['input_channels']}, height, width)` with the image file's raw values ({d['input_dtype']} data;
channel-first), height and width multiples of {d['size_multiple']} (trained at {h} x {w}). The normalisation is inside
the model ({norm}{'; then each input standardised per channel' if n['per_image'] else ''}): do not normalise first.
Output: `(batch, {d['num_classes']}, height, width)` probabilities ({'softmax over the classes' if d['class_mode'] ==
'softmax' else 'sigmoid per class'}; classes {', '.join(d['class_names'])}); threshold at 0.5 for masks.
Images larger than the training size can be given whole (the network is fully convolutional) or in tiles.

Files: `model.onnx` (ONNX, opset 17, dynamic batch and size), `model.torchscript.pt` (TorchScript),
`model.pth` + `model.json` (PyTorch weights and the description that rebuilds the model with unet-toolkit's
predictor.py), `test_input.npy` / `test_output.npy` (an input and the output every file above must give, within 1e-4),
`bioimageio.zip` and its folder `bioimageio/` (the BioImage.IO package, below).

## Python with onnxruntime (no PyTorch needed)

```python
import numpy as np, onnxruntime, tifffile
session = onnxruntime.InferenceSession("model.onnx", providers=["CPUExecutionProvider"])
image = tifffile.imread("my_image.tif").astype(np.float32)        # (H, W) or (C, H, W), raw values
x = image.reshape(1, -1, *image.shape[-2:])                       # (1, C, H, W)
h, w = x.shape[2] // 16 * 16, x.shape[3] // 16 * 16               # sizes the network takes
probs = session.run(None, {{"input": x[:, :, :h, :w]}})[0]
mask = (probs[0, 0] > 0.5).astype(np.uint8) * 255
tifffile.imwrite("my_mask.tif", mask)
```

## Python with PyTorch

```python
import torch
model = torch.jit.load("model.torchscript.pt").eval()
probs = model(torch.from_numpy(x))                                # x as above
```

## Fiji (deepImageJ), napari, QuPath, ilastik: `bioimageio.zip`

`bioimageio.zip` is a BioImage.IO model package (rdf.yaml format 0.5, validated with bioimageio.spec when it was
written). Its weights (PyTorch state dict + architecture file, TorchScript, ONNX) take the image after the
preprocessing its rdf.yaml names, which the tool applies to the whole image; so give the tool the raw image.

- Fiji: with the deepImageJ plugin, "DeepImageJ Install Model" installs the zip from its local file; "DeepImageJ
  Run" then runs it on the open image.
- napari, QuPath, ilastik: their BioImage.IO support (napari's bioimageio plugin, QuPath's BioImage.IO extension,
  ilastik's neural network workflow) opens the zip or its rdf.yaml.
- Python: `bioimageio predict` / `bioimageio.core.predict` (pip install bioimageio.core) run it on any image;
  `bioimageio test bioimageio.zip` reproduces the test output with each weight format.
"""


def timed(predict, x, repeats=10):
    """Images/s of predict(x) over `repeats` calls after 2 warm-up calls."""
    import time
    with torch.no_grad():
        for _ in range(2):
            predict(x)
        t0 = time.perf_counter()
        for _ in range(repeats):
            predict(x)
    return repeats * x.shape[0] / (time.perf_counter() - t0)


def speed(member, out, x):
    """One JSON line: prediction images/s on this machine of the three ways to run the model, in one run."""
    import onnxruntime
    rt = member.rt
    batch = x.repeat(16, 1, 1, 1)
    placed = rt.place_batch(batch)[0]

    def pytorch(b):
        with rt.autocast():
            return member.predictor(b)
    rt.place_model(member.predictor)
    session = onnxruntime.InferenceSession(os.path.join(out, "model.onnx"), providers=["CPUExecutionProvider"])
    scripted = torch.jit.load(os.path.join(out, "model.torchscript.pt"))
    rates = {"pytorch_" + rt.precision_name(): timed(pytorch, placed),
             "torchscript_fp32": timed(scripted, batch),
             "onnxruntime_fp32": timed(lambda b: session.run(None, {"input": b.numpy()}), batch)}
    return json.dumps({"case": "predict", "arch": member.cfg["arch"], "input": list(x.shape[2:]), "batch": 16,
                       "threads": torch.get_num_threads(), **{k: round(v, 1) for k, v in rates.items()}})


def check_output(out, default, run_dir):
    """--output DIR refused where the export would write among a user's files: inside a data set, a run folder
    (the run's own export folder excepted) or the runs folder, over another run's export, or in a folder holding
    files named as the export's that an earlier export did not write."""
    if os.path.abspath(out) == os.path.abspath(default):
        return
    runs = os.path.dirname(run_dir) or "."
    outputs.check_place(out, f"--output {out}", "export.py", f"Pass --output to a folder of its own (the default is "
                        f"{default})", [] if outputs.inside(os.getcwd(), runs) else [(runs, "the runs folder")],
                        own={out: "an export"})         # an export: replaced if it is this run's (its marker says)
    marker = os.path.join(out, MARKER)
    if os.path.isfile(marker):
        with open(marker, errors="replace") as f:
            source = f.read(4096).strip()
        if os.path.realpath(source.removeprefix("exported from ")) != os.path.realpath(run_dir):
            raise UserError(f"--output {out} holds another export ({source[:200]}); nothing was replaced. Pass "
                            "--output to a new folder")
        return
    clash = [f for f in EXPORT_FILES if os.path.lexists(os.path.join(out, f))]
    if clash:
        raise UserError(f"--output {out} already holds {', '.join(clash)}, not written by export.py; nothing was "
                        "replaced. Pass --output to a new or empty folder")


def package_info(req, cfg):
    """The BioImage.IO package's name, description, authors and licence, from the flags or the run."""
    import getpass
    authors = req.authors or (getpass.getuser() or "unknown",)
    description = req.description or (f"{cfg['arch']} segmentation of {cfg['num_classes']} class(es), trained on "
                                       f"the {cfg['dataset']} data set with unet-toolkit")
    name = bioimageio_package.package_name(req.name, cfg["arch"])
    return bioimageio_package.PackageInfo(name, description[:bioimageio_package.TEXT_LIMITS["description"]], authors,
                                          req.license)


def check_package_flags(req):
    """The package's flags, checked before anything is built or written (they were refused only after TorchScript
    and ONNX had been written, with a 10 KB report)."""
    if not bioimageio_package.known_license(req.license):
        raise UserError(f"--license {req.license!r} is not an SPDX licence identifier that BioImage.IO accepts; "
                        "use e.g. CC-BY-4.0 (the default), MIT, Apache-2.0 or BSD-3-Clause (spdx.org/licenses)")
    limit = bioimageio_package.TEXT_LIMITS["description"]
    if req.description is not None and not 0 < len(req.description.strip()) <= limit:
        raise UserError(f"--description is {len(req.description)} characters; give one sentence of at most {limit} "
                        "(BioImage.IO's limit)")
    for author in req.authors:
        if not 0 < len(author.strip()) <= bioimageio_package.TEXT_LIMITS["name"]:
            raise UserError(f"--author {author[:40]!r}: give a name of 1 to "
                            f"{bioimageio_package.TEXT_LIMITS['name']} characters")


def export(req):
    check_package_flags(req)
    run_dir = os.path.join(req.runs_dir, req.name)
    if os.path.isdir(run_dir) and rundir.in_use(run_dir):
        raise UserError(f"{run_dir} is being trained right now; export it when the training has finished (its "
                        "model.pth may still change)")
    member = TrainedRun.load(req.name, "cpu", req.runs_dir)
    predictor = member.predictor.float().eval()
    out = req.output or os.path.join(run_dir, "export")
    check_output(out, os.path.join(run_dir, "export"), run_dir)
    try:
        os.makedirs(out, exist_ok=True)
        atomic_write(os.path.join(out, MARKER), lambda f: f.write(f"exported from {os.path.realpath(run_dir)}\n"))
    except OSError as e:
        why = "it is a file, not a folder" if os.path.isfile(out) else e.strerror or e
        raise UserError(f"cannot write the export to {out}: {why}. Pass --output DIR to a writable "
                        "folder") from None
    x, source = test_image(member, run_dir)
    with torch.no_grad():
        expected = predictor(x)
    np.save(os.path.join(out, "test_input.npy"), x.numpy())
    np.save(os.path.join(out, "test_output.npy"), expected.numpy())
    shutil.copyfile(rundir.RunFolder(run_dir).model, os.path.join(out, rundir.MODEL))
    atomic_write(os.path.join(out, rundir.MODEL_JSON), lambda f: json.dump(predictor.description, f, indent=1))
    ts = export_torchscript(predictor, x, expected, os.path.join(out, "model.torchscript.pt"))
    print(f"TorchScript: {out}/model.torchscript.pt (max difference to PyTorch {ts:.1e} on {source})", flush=True)
    onnx = export_onnx(predictor, x, expected, os.path.join(out, "model.onnx"))
    print(f"ONNX: {out}/model.onnx (max difference {onnx:.1e})", flush=True)
    package, diff = bioimageio_package.write(predictor, x, expected, os.path.join(out, "bioimageio"),
                                             package_info(req, member.cfg))
    try:
        status = bioimageio_package.validate(package)
    except bioimageio_package.PackageInvalid:
        for path in (package, os.path.join(out, "bioimageio")):    # this export's own invalid package: not left
            shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
        raise
    print(f"BioImage.IO package: {package} (max difference {diff:.1e}; bioimageio.spec: {status})", flush=True)
    atomic_write(os.path.join(out, "README.md"), lambda f: f.write(usage(req.name, predictor.description)))
    print(f"how to use them: {out}/README.md")
    if req.speed:
        print(speed(member, out, x))


def main(argv=None):
    Interrupts().install()        # SIGTERM (kill, a job scheduler) stops as Ctrl-C does: a message and exit 130
    warnings.formatwarning = plain_warning
    sys.stdout = ClosedPipeSafe(sys.stdout)
    try:
        with exit_on_user_error():
            export(parse_args(argv))
    except KeyboardInterrupt:
        print("\ninterrupted: the export folder may be incomplete; run export.py again", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.default_int_handler)   # from here on, main() handles Ctrl-C and SIGTERM
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    main()
