"""Export a trained run so that it runs outside this toolkit: ONNX and a BioImage.IO package.

    python export.py --name cells                         # -> models/cells/export/
    python export.py --name cells --output cells_model/

model.onnx is the run's Predictor (predictor.py): raw images of any height and width (the file's values, 0..255 or
0..65535 or float, channel-first) in, probabilities of the same size out, with the run's normalisation, network,
final head and sigmoid or softmax inside. It is checked on export: its output on a test image (the run's first
validation image when its data set is at hand, else a generated one) and on two other sizes must equal PyTorch's
within 1e-4.

The folder holds model.onnx, model.pth + model.json (the self-describing PyTorch model, see predictor.py),
test_input.npy / test_output.npy, a README.md on using them, and bioimageio.zip: the BioImage.IO package (format
0.5, TorchScript weights) for deepImageJ in Fiji, napari, QuPath and ilastik, validated with bioimageio.spec (see
bioimageio_package.py). Each weight format once: the folder is about three times model.pth.

Everything is built and checked in a hidden folder beside the export folder and moved into place only when every
check has passed: a failed or interrupted export leaves nothing, and an earlier export of the run stays as it was
until then. A user's mistake exits with status 2 and the fix; a failure of the toolkit itself (a file that differs
from PyTorch, a package that does not validate) with status 4, saying so and what to report.
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
import tempfile
import traceback
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
from predictor import ExportFault, fault_words, save_onnx, traced, within_tolerance
from splits import load_validation
from utils import (ClosedPipeSafe, Interrupts, UserError, atomic_write, current_umask, exit_on_user_error,
                   plain_warning)

ONNX, PACKAGE, README = "model.onnx", "bioimageio.zip", "README.md"
TEST_INPUT, TEST_OUTPUT = "test_input.npy", "test_output.npy"
EXPORT_FILES = (rundir.MODEL, rundir.MODEL_JSON, ONNX, TEST_INPUT, TEST_OUTPUT, README, PACKAGE)
EARLIER_FILES = ("model.torchscript.pt", "bioimageio")   # what exports before issue 35 also wrote: removed when
                                                         # such an export is replaced
MARKER = outputs.EXPORT_MARKER          # in a folder export.py writes: its files there may be replaced next time
FAULT_EXIT = ExportFault.exit_code      # a failure of the toolkit, not of the user (2)


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
    image as the run trained on it (at_input_size), if its data set is at hand; else a reproducible random image in
    the run's value range."""
    cfg, size = member.cfg, (member.cfg["input_h"], member.cfg["input_w"])
    try:
        data, _ = load_validation(cfg, [rundir.read_split(run_dir)])   # any data problem: the generated image
        image = at_input_size(data.image(0), size, cfg["crop"])
        return torch.from_numpy(image.astype(np.float32)).permute(2, 0, 1)[None].contiguous(), data.ids[0]
    except UserError:
        high = member.predictor.full_range
        g = torch.Generator().manual_seed(0)
        return torch.rand(1, cfg["input_channels"], *size, generator=g) * high, "a generated image"


def at_input_size(image, size, crop):
    """An image (H, W, C) at the network input size=(h, w) as the run saw its images: the centre crop for a --crop
    run (at the image's own scale, when it is that large), else resized to it."""
    h, w = size
    if crop and image.shape[0] >= h and image.shape[1] >= w:
        top, left = (image.shape[0] - h) // 2, (image.shape[1] - w) // 2
        return np.ascontiguousarray(image[top:top + h, left:left + w])
    return resize_image(image, size)


def check(name, got, expected):
    """The export check (predictor.within_tolerance), in export.py's words: the difference, or an ExportFault."""
    return within_tolerance(got, expected, f"the {name} export differs")


def odd_sizes(predictor, x):
    """Two more test inputs, with PyTorch's outputs, at sizes that are not multiples of 16, so that an exported
    file is seen to take any batch and size: two images 5 and 11 px smaller than x (a crop of x and its mirror image)
    and one 13 and 7 px larger (x mirrored below and beside itself, cut)."""
    h, w = x.shape[2:]
    small = x[:, :, :h - 5, :w - 11]
    large = torch.cat([x, x.flip(2)], 2)
    large = torch.cat([large, large.flip(3)], 3)[:, :, :h + 13, :w + 7]
    with torch.no_grad():
        return [(y, predictor(y)) for y in (torch.cat([small, small.flip(3)]), large)]


def export_onnx(predictor, x, expected, path):
    """The Predictor as ONNX at `path`, checked against PyTorch on x and on odd_sizes -> the largest difference."""
    import onnxruntime   # here: training and val.py never import it
    save_onnx(predictor, x, path, ("input", "probabilities", "height", "width"))
    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    cases = [(x, expected), *odd_sizes(predictor, x)]
    return max(check("ONNX", session.run(None, {"input": y.numpy()})[0], y_expected) for y, y_expected in cases)


def normalisation_words(d):
    """What the model does to its input before the network, in words for the README."""
    n, (mean, std) = d["normalize"], PERCENTILE_MEAN_STD
    norm = (f"per image and channel, percentile {n['pmin']:g} -> 0 and percentile {n['pmax']:g} -> 1, clipped, "
            f"then (x - {mean:g}) / {std:g}"
            if n["mode"] == "percentile" else f"x / {n['full_range']:g}, then ImageNet's mean and standard deviation")
    return norm + ("; then each image standardised per channel" if n["per_image"] else "")


def python_snippet(d):
    """The README's Python with onnxruntime: a TIFF of any size in, a mask (or class labels) of that size out. The
    tests run it as it stands."""
    c = d["input_channels"]
    if d["class_mode"] == "softmax":
        result = ("labels = probs[0].argmax(0).astype(np.uint8)          # the most probable class of each pixel\n"
                  'tifffile.imwrite("my_labels.tif", labels)')
    else:
        result = ("mask = (probs[0, 0] > 0.5).astype(np.uint8) * 255    # the first class; probs[0, k]: class k\n"
                  'tifffile.imwrite("my_mask.tif", mask)')
    sy, sx = d.get("scale") or (1.0, 1.0)
    if (sy, sx) == (1.0, 1.0):
        run = f"""probs = session.run(None, {{"input": x}})[0]                 # (1, {d['num_classes']}, H, W): the image's own size"""
    else:       # the run learned images at another scale than their own: predicted at it, as val.py does
        run = f"""h, w = x.shape[2:]                                         # the model learned images {sx:g}x{sy:g} smaller (x, y):
at_scale = cv2.resize(np.moveaxis(x[0], 0, -1), (max(1, round(w / {sx:g})), max(1, round(h / {sy:g}))))
x = np.moveaxis(at_scale.reshape(*at_scale.shape[:2], -1), -1, 0)[None]
probs = session.run(None, {{"input": x}})[0]
probs = np.stack([cv2.resize(p, (w, h)) for p in probs[0]])[None]   # (1, {d['num_classes']}, H, W): the image's own size"""
    imports = "import cv2, numpy as np, onnxruntime, tifffile" if (sy, sx) != (1.0, 1.0) else \
        "import numpy as np, onnxruntime, tifffile"
    return f"""{imports}
session = onnxruntime.InferenceSession("model.onnx", providers=["CPUExecutionProvider"])
image = tifffile.imread("my_image.tif").astype(np.float32)  # raw values, any height and width
if image.ndim == 3 and image.shape[0] != {c}:
    image = np.moveaxis(image, -1, 0)                      # (H, W, C) -> (C, H, W)
x = image.reshape(1, {c}, *image.shape[-2:])                # (1, C, H, W)
{run}
{result}"""


def usage(name, d):
    """The export folder's README.md: what the model takes and gives, and how to run it without this toolkit."""
    h, w = d["input_size"]
    activation = "softmax over the classes" if d["class_mode"] == "softmax" else "sigmoid per class"
    return f"""# {name}: a {d['arch']} segmentation model exported by unet-toolkit

Input: float32 `(batch, {d['input_channels']}, height, width)`, the image file's raw values ({d['input_dtype']} data),
channel-first, of any height and width (trained at {h} x {w}; inside, the model mirrors the image at its edges up to a
multiple of {d['size_multiple']} and crops its output back). The normalisation is inside the model too
({normalisation_words(d)}): do not normalise first.

Output: `(batch, {d['num_classes']}, height, width)` probabilities at the input's height and width ({activation};
classes {', '.join(d['class_names'])}); threshold at 0.5 for masks. Give the whole image at once, or tiles of an
image too large for memory.

Files: `model.onnx` (ONNX, opset 17, any batch and size), `model.pth` + `model.json` (PyTorch weights and the
description that rebuilds the model with unet-toolkit's predictor.py; this folder is also a model folder that
unet-toolkit's val.py evaluates with `--runs_dir` its parent folder and `--name` its name), `test_input.npy` /
`test_output.npy` (an input and the output model.onnx must give, within 1e-4), `bioimageio.zip` (the BioImage.IO
package, below).

## Python with onnxruntime (no PyTorch needed)

```python
{python_snippet(d)}
```

## Python with PyTorch and unet-toolkit

```python
import json, torch, predictor                                     # predictor.py of unet-toolkit
model = predictor.Predictor.build(json.load(open("model.json")))
model.load_network(torch.load("model.pth", weights_only=True)).eval()
probs = model(torch.from_numpy(x))                                # x as above; any height and width
```

## Fiji (deepImageJ), napari, QuPath, ilastik: `bioimageio.zip`

`bioimageio.zip` is a BioImage.IO model package (rdf.yaml format 0.5, validated with bioimageio.spec when it was
written). Its TorchScript weights take the image after the preprocessing its rdf.yaml names, which the tool applies
to the whole image; so give the tool the raw image.

- Fiji: with the deepImageJ plugin, "DeepImageJ Install Model" installs the zip from its local file; "DeepImageJ
  Run" then runs it on the open image.
- napari, QuPath, ilastik: their BioImage.IO support (napari's bioimageio plugin, QuPath's BioImage.IO extension,
  ilastik's neural network workflow) opens the zip.
- Python: `bioimageio predict` / `bioimageio.core.predict` (pip install bioimageio.core) run it on any image;
  `bioimageio test bioimageio.zip` reproduces the test output.
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
    scripted = traced(member.predictor, x)         # TorchScript (the package's format), traced here: not a file
    rt.place_model(member.predictor)
    session = onnxruntime.InferenceSession(os.path.join(out, ONNX), providers=["CPUExecutionProvider"])
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
    out = req.output or os.path.join(run_dir, "export")
    check_output(out, os.path.join(run_dir, "export"), run_dir)
    staging = staging_folder(out)
    try:
        x = build(req, member, run_dir, staging)
        written = move_into_place(staging, out)
    except UserError:
        raise
    except OSError as e:          # a full disk, a read-only or vanished folder
        raise UserError(f"could not write the export to {out}: {e.strerror or e}. Nothing was written (an earlier "
                        "export is as it was); free space or pass --output DIR to a writable folder") from None
    except Exception as e:        # anything else is the toolkit's fault: its traceback is what a report needs
        traceback.print_exc()
        raise ExportFault(fault_words(f"export.py failed ({type(e).__name__}: {str(e)[:300]}; the traceback is "
                                      "above)")) from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    size = sum(os.path.getsize(os.path.join(out, f)) for f in written)
    print(f"export: {out}/ ({', '.join(f for f in EXPORT_FILES if f in written)}; {size / 1e6:.1f} MB)")
    print(f"how to use them: {os.path.join(out, README)}")
    if req.speed:
        print(speed(member, out, x))


def build(req, member, run_dir, folder):
    """Every file of the export, written into `folder` and checked there; prints what each check found -> the test
    input. An ExportFault when a file's output differs from PyTorch's or the package does not validate."""
    predictor = member.predictor.float().eval()
    atomic_write(os.path.join(folder, MARKER), lambda f: f.write(f"exported from {os.path.realpath(run_dir)}\n"))
    x, source = test_image(member, run_dir)
    with torch.no_grad():
        expected = predictor(x)
    np.save(os.path.join(folder, TEST_INPUT), x.numpy())
    np.save(os.path.join(folder, TEST_OUTPUT), expected.numpy())
    shutil.copyfile(rundir.RunFolder(run_dir).model, os.path.join(folder, rundir.MODEL))
    atomic_write(os.path.join(folder, rundir.MODEL_JSON), lambda f: json.dump(predictor.description, f, indent=1))
    onnx = export_onnx(predictor, x, expected, os.path.join(folder, ONNX))
    h, w = x.shape[2:]
    print(f"ONNX: {ONNX} checked (max difference to PyTorch {onnx:.1e} on {source}, {h}x{w}, and at {h - 5}x{w - 11} "
          f"and {h + 13}x{w + 7})", flush=True)
    package = os.path.join(folder, PACKAGE)
    diff = bioimageio_package.write(predictor, x, expected, package, package_info(req, member.cfg))
    status = bioimageio_package.validate(package)
    print(f"BioImage.IO package: {PACKAGE} checked (max difference {diff:.1e}; bioimageio.spec: {status})", flush=True)
    atomic_write(os.path.join(folder, README), lambda f: f.write(usage(req.name, predictor.description)))
    return x


def staging_folder(out):
    """A new hidden folder for the export to be built in, beside `out` (on its file system, so that the files move
    into place by renaming), or inside it where only `out` itself is writable or on another device -> its path; a
    UserError when there is nowhere to write."""
    path = os.path.abspath(out)
    why = "it is a file, not a folder" if os.path.isfile(path) else None
    places = [] if why else [os.path.dirname(path)] + ([path] if os.path.isdir(path) else [])
    if len(places) == 2 and os.path.isdir(places[0]) and os.stat(places[0]).st_dev != os.stat(path).st_dev:
        places = [path]                       # out is a mount point: renaming from beside it would cross devices
    for parent in places:
        try:
            os.makedirs(parent, exist_ok=True)
            folder = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.", suffix=".partial", dir=parent)
            os.chmod(folder, 0o777 & ~current_umask())     # mkdtemp's is private; the export folder gets a folder's
            return folder
        except OSError as e:
            why = why or e.strerror or str(e)
    raise UserError(f"cannot write the export to {out}: {why}. Pass --output DIR to a writable folder")


def move_into_place(staging, out):
    """The checked export in `staging` becomes `out`: the folder renamed where `out` does not exist; else each file
    replaces its namesake (an atomic rename each), and an earlier export's files that this one does not write
    (EARLIER_FILES) are removed, in a folder export.py wrote (its marker) -> the names written."""
    written = sorted(os.listdir(staging))
    if not os.path.exists(out):
        os.rename(staging, out)
        return written
    ours = os.path.isfile(os.path.join(out, MARKER))
    for name in written:
        os.replace(os.path.join(staging, name), os.path.join(out, name))
    for name in EARLIER_FILES if ours else ():
        path = os.path.join(out, name)
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        elif os.path.lexists(path):
            os.remove(path)
    return written


def main(argv=None):
    Interrupts().install()        # SIGTERM (kill, a job scheduler) stops as Ctrl-C does: a message and exit 130
    warnings.formatwarning = plain_warning
    sys.stdout = ClosedPipeSafe(sys.stdout)
    try:
        with exit_on_user_error():
            export(parse_args(argv))
    except KeyboardInterrupt:
        print("\ninterrupted: an unfinished export is not kept (an earlier one is as it was); run export.py again",
              file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.default_int_handler)   # from here on, main() handles Ctrl-C and SIGTERM
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    main()
