"""export.py: every run kind the toolkit trains exports a checked ONNX file of any size and a valid BioImage.IO package;
a failed export leaves nothing; user mistakes and the toolkit's faults are told apart."""
import errno
import hashlib
import json
import os
import re
import zipfile

import numpy as np
import pytest
import torch

import bioimageio_package
import config
import export
import predictor
import train
from archs import activate, build_model, final_logits
from conftest import make_data, make_microscopy, run_main, write_tiff
from normalize import normalize
from predictor import EXPORT_TOLERANCE, ExportFault, Predictor, describe
from utils import UserError

FAST = ["--base_channels", "4", "--epochs", "1", "-b", "4", "--input_w", "32", "--input_h", "32", "--num_workers", "0",
        "--optimizer", "Adam", "--device", "cpu"]

# Every kind of run the toolkit trains, between them: 8-bit, 16-bit and float32 images; 1, 2 and 3 channels; sigmoid
# and softmax over several classes; --target objects; --crop; --per_image_norm; imagenet and percentile scaling;
# UNet and NestedUNet with deep supervision. Each: (its data set, train.py's flags, the image a user would give).
KINDS = {
    "rgb_softmax": ("three", ["--arch", "UNet", "--num_classes", "3", "--class_mode", "softmax", "--loss", "CEDiceLoss",
                              "--class_names", "background,nucleus,cell wall"], (np.uint8, 3)),
    "micro16": ("micro", ["--arch", "NestedUNet", "--deep_supervision", "--per_image_norm", "--img_ext", ".tif",
                          "--input_channels", "1"], (np.uint16, 1)),
    "float_objects_crop": ("float2", ["--arch", "UNet", "--img_ext", ".tif", "--input_channels", "2", "--target",
                                      "objects", "--crop"], (np.float32, 2)),
    "gray_percentile": ("gray", ["--arch", "UNet", "--input_channels", "1", "--num_classes", "2", "--normalize",
                                 "percentile"], (np.uint8, 1)),
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A tiny run of each kind in KINDS (1 epoch at 32 px, base_channels 4), in one runs folder."""
    root = tmp_path_factory.mktemp("export")
    make_data(root / "inputs", "three", num_classes=3, exclusive=True)
    make_data(root / "inputs", "gray", num_classes=2, channels=1)
    make_microscopy(root / "inputs", "micro")
    make_microscopy(root / "inputs", "float2", n=8, size=64, channels=2, dtype=np.float32)
    mp = pytest.MonkeyPatch()

    class NoCapture:                       # a module fixture cannot take capsys; the output goes to the log
        @staticmethod
        def readouterr():
            return "", ""
    for name, (dataset, argv, _) in KINDS.items():
        code, _, err = run_main(train.main, ["--dataset", dataset, *argv, *FAST, "--name", name], root, mp, NoCapture)
        assert code == 0, err
    yield root
    mp.undo()


def exported(runs, name, monkeypatch, capsys, flags=None):
    """The run's export folder and export.py's stdout: exported now when flags are given (a list, maybe empty) or
    no earlier test exported it."""
    folder = runs / "models" / name / "export"
    if flags is None and (folder / export.PACKAGE).exists():
        return folder, ""
    code, out, err = run_main(export.main, ["--name", name, *(flags or [])], runs, monkeypatch, capsys)
    assert code == 0, err
    return folder, out


def leftovers(folder):
    """Hidden build folders export.py left beside or inside `folder` (there should be none)."""
    def built(name):
        return name.startswith(f".{folder.name}.") and name.endswith(".partial") or name.startswith(".package-")
    return [f for f in os.listdir(folder.parent) if built(f)] + \
        ([f for f in os.listdir(folder) if built(f)] if folder.is_dir() else [])


@pytest.mark.e2e
@pytest.mark.slow(seconds=25)
@pytest.mark.parametrize("name", list(KINDS))
def test_every_run_kind_exports_checked_files_and_a_valid_package(runs, name, monkeypatch, capsys):
    flags = ["--speed", "--author", "Ada Lovelace", "--author", "Alan Turing", "--license", "MIT"] \
        if name == "rgb_softmax" else []
    folder, out = exported(runs, name, monkeypatch, capsys, flags)
    assert "ONNX: model.onnx checked" in out and "bioimageio.spec: valid-format" in out
    assert sorted(os.listdir(folder)) == sorted([*export.EXPORT_FILES, export.MARKER]) and not leftovers(folder)
    description = json.load(open(folder / "model.json"))
    rdf = check_package(folder / export.PACKAGE, description)
    if name == "rgb_softmax":                              # the flags, and the three ways to run it side by side
        assert [a["name"] for a in rdf["authors"]] == ["Ada Lovelace", "Alan Turing"] and rdf["license"] == "MIT"
        assert rdf["outputs"][0]["axes"][1]["channel_names"] == ["background", "nucleus", "cell wall"]
        rates = json.loads(out.strip().splitlines()[-1])
        assert rates["case"] == "predict" and rates["torchscript_fp32"] > 0 and rates["onnxruntime_fp32"] > 0
    x, expected = np.load(folder / "test_input.npy"), np.load(folder / "test_output.npy")
    import onnxruntime
    session = onnxruntime.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    assert np.abs(session.run(None, {"input": x})[0] - expected).max() < EXPORT_TOLERANCE
    dtype, channels = KINDS[name][2]
    assert description["input_dtype"] == np.dtype(dtype).name and description["input_channels"] == channels
    if description["arch"] == "UNet":                      # each weight format once: about 3x the weights
        size = sum(os.path.getsize(folder / f) for f in os.listdir(folder))
        assert size <= 3.5 * os.path.getsize(runs / "models" / name / "model.pth")


def check_package(zip_path, description):
    """The BioImage.IO package: valid for bioimageio.spec, and its rdf.yaml says what the run is -> rdf.yaml."""
    import yaml
    from bioimageio.spec import InvalidDescr, load_description
    descr = load_description(str(zip_path), perform_io_checks=True)
    assert not isinstance(descr, InvalidDescr), descr.validation_summary.format()
    with zipfile.ZipFile(zip_path) as z:
        rdf = yaml.safe_load(z.read("rdf.yaml"))
        assert sorted(z.namelist()) == sorted(["rdf.yaml", *bioimageio_package.FILES.values()])
    assert rdf["format_version"].startswith("0.5.") and rdf["type"] == "model"
    assert set(rdf["weights"]) == {"torchscript"}
    assert [a["size"] for a in rdf["inputs"][0]["axes"][2:]] == [{"min": 16, "step": 16}] * 2
    assert all(len(t["description"]) <= 128 for t in rdf["inputs"] + rdf["outputs"])
    steps = [p["id"] for p in rdf["inputs"][0]["preprocessing"]]
    percentile = description["normalize"]["mode"] == "percentile"
    assert steps == (["ensure_dtype", "scale_range", "clip", "scale_linear", "ensure_dtype"] if percentile else
                     ["ensure_dtype", "scale_linear", "ensure_dtype"])
    assert len(rdf["outputs"][0]["axes"][1]["channel_names"]) == description["num_classes"]
    return rdf


def user_image(dtype, channels, size=(500, 300), seed=0):
    """A raw image as a user's file holds it, (H, W), (H, W, 3) for RGB or (C, H, W): uneven background, bright
    disks, noise, in the type's usual range (8-bit 0..255, 16-bit a 12-bit signal, float about 0..1)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size[0], 0:size[1]]
    signal = 0.2 + 0.1 * xx / size[1] + rng.normal(0, 0.03, size)
    for _ in range(30):
        cy, cx, r = rng.integers(0, size[0]), rng.integers(0, size[1]), rng.integers(6, 20)
        signal = signal + 0.5 * ((yy - cy) ** 2 + (xx - cx) ** 2 < r ** 2)
    scale = {np.uint8: 255, np.uint16: 4000, np.float32: 1}[dtype]
    planes = [np.clip(signal * scale * (1 - 0.2 * c), 0, np.iinfo(dtype).max if scale > 1 else None)
              for c in range(channels)]
    image = np.stack(planes, axis=-1 if channels == 3 else 0) if channels > 1 else planes[0]
    return image.astype(dtype)


@pytest.mark.e2e
@pytest.mark.parametrize("name", list(KINDS))
def test_the_readme_python_runs_on_a_500x300_image_and_gives_the_predictors_probabilities(runs, name, monkeypatch,
                                                                                         capsys, tmp_path):
    """The README's onnxruntime snippet, extracted and run as it stands on a TIFF of a size the network cannot take
    (not a multiple of 16): probabilities and a mask of the image's own size, equal to PyTorch's Predictor."""
    import tifffile
    folder, _ = exported(runs, name, monkeypatch, capsys)
    readme = (folder / "README.md").read_text()
    code = readme.split("```python\n", 1)[1].split("```", 1)[0]
    dtype, channels = KINDS[name][2]
    meta = {"imagej": True, "metadata": {"axes": "CYX"}} if channels == 2 else {}
    write_tiff(str(tmp_path / "my_image.tif"), user_image(dtype, channels), **meta)
    os.symlink(folder / "model.onnx", tmp_path / "model.onnx")
    monkeypatch.chdir(tmp_path)
    namespace = {}
    exec(code, namespace)
    description = json.load(open(folder / "model.json"))
    probs = namespace["probs"]
    assert probs.shape == (1, description["num_classes"], 500, 300)
    model = Predictor.build(description)
    model.load_network(torch.load(folder / "model.pth", weights_only=True)).eval()
    with torch.no_grad():
        expected = model(torch.from_numpy(namespace["x"])).numpy()
    assert np.abs(probs - expected).max() < 1e-3
    written = "my_labels.tif" if description["class_mode"] == "softmax" else "my_mask.tif"
    assert tifffile.imread(tmp_path / written).shape == (500, 300)


def snapshot(folder):
    """{file name: sha256} of a folder's files (its hidden ones too), or None when there is no folder."""
    if not folder.exists():
        return None
    return {f: hashlib.sha256((folder / f).read_bytes()).hexdigest() for f in sorted(os.listdir(folder))}


def planted(monkeypatch, failure):
    """Makes the next export fail as `failure` says: a file that differs from PyTorch, a package bioimageio.spec
    rejects, an unexpected error, a full disk, Ctrl-C -> (the exit status, words the message must hold)."""
    def raise_(error):
        def fail(*args, **kwargs):
            raise error
        return fail
    if failure == "differs":
        monkeypatch.setattr(predictor, "max_difference", lambda got, expected: 0.5)
        return 4, "the ONNX export differs from PyTorch's output by 5.00e-01"
    if failure == "invalid":
        invalid = bioimageio_package.PackageInvalid(predictor.fault_words("the BioImage.IO package did not pass (planted)"))
        monkeypatch.setattr(bioimageio_package, "validate", raise_(invalid))
        return 4, "the BioImage.IO package did not pass (planted). This is a bug in unet-toolkit"
    if failure == "bug":
        monkeypatch.setattr(export, "test_image", raise_(RuntimeError("planted")))
        return 4, "export.py failed (RuntimeError: planted; the traceback is above). This is a bug in unet-toolkit"
    if failure == "disk full":
        monkeypatch.setattr(export, "atomic_write", raise_(OSError(errno.ENOSPC, "No space left on device")))
        return 2, "No space left on device. Nothing was written (an earlier export is as it was)"
    monkeypatch.setattr(export, "save_onnx", raise_(KeyboardInterrupt()))    # model.pth and more written by then
    return 130, "interrupted: an unfinished export is not kept"


@pytest.mark.e2e
@pytest.mark.slow(seconds=30)
def test_a_failed_export_leaves_nothing_and_an_earlier_export_as_it_was(runs, monkeypatch, capsys, tmp_path):
    earlier = tmp_path / "earlier"
    code, _, err = run_main(export.main, ["--name", "rgb_softmax", "--output", str(earlier)], runs, monkeypatch, capsys)
    assert code == 0, err
    (earlier / "my notes.txt").write_text("a user's file beside the export")
    before = snapshot(earlier)
    for failure in ("differs", "invalid", "bug", "disk full", "interrupt"):
        for out in (earlier, tmp_path / "new") if failure in ("bug", "interrupt") else (earlier,):
            with monkeypatch.context() as m:
                status, says = planted(m, failure)
                code, _, err = run_main(export.main, ["--name", "rgb_softmax", "--output", str(out)], runs, m, capsys)
            assert code == status and says in err, (failure, err)
            assert snapshot(earlier) == before and not (tmp_path / "new").exists() and not leftovers(out), failure
            if status == 4:                               # what to send with the report
                assert "config.yml and model.json" in err and "torch " in err and "onnxruntime " in err
            assert ("Traceback" in err) == (failure == "bug")


@pytest.mark.e2e
def test_an_export_of_an_earlier_version_is_replaced_whole(runs, monkeypatch, capsys, tmp_path):
    """Exports before issue 35 also wrote model.torchscript.pt and the unzipped package bioimageio/: an export over
    one leaves none of them behind (in a folder of export.py's own only), and a file of the user's stays."""
    out = tmp_path / "old"
    (out / "bioimageio").mkdir(parents=True)
    (out / "bioimageio" / "weights.pt").write_bytes(b"old")
    (out / "model.torchscript.pt").write_bytes(b"old")
    (out / export.MARKER).write_text(f"exported from {runs / 'models' / 'gray_percentile'}\n")
    (out / "my notes.txt").write_text("a user's file beside the export")
    code, _, err = run_main(export.main, ["--name", "gray_percentile", "--output", str(out)], runs, monkeypatch, capsys)
    assert code == 0, err
    assert sorted(os.listdir(out)) == sorted([*export.EXPORT_FILES, export.MARKER, "my notes.txt"])
    assert not leftovers(out)


@pytest.mark.e2e
@pytest.mark.slow
def test_bioimageio_core_reproduces_the_test_output(runs, monkeypatch, capsys):
    """bioimageio.core's own model test (what the model zoo runs): it applies rdf.yaml's preprocessing itself, so
    this checks that it equals normalize.py's, on the hardest case (16-bit percentile, per-image, NestedUNet-DS)."""
    core = pytest.importorskip("bioimageio.core", reason="bioimageio.core is not installed")
    folder, _ = exported(runs, "micro16", monkeypatch, capsys)
    summary = core.test_model(str(folder / export.PACKAGE))
    failed = [(d.name, [e.msg[:300] for e in d.errors]) for d in summary.details if d.status != "passed"]
    assert summary.status == "passed", failed
    assert "Reproduce test outputs from test inputs (torchscript)" in " ".join(d.name for d in summary.details)


@pytest.mark.e2e
def test_a_package_bioimageio_spec_rejects_is_a_fault_of_the_toolkit(runs, tmp_path, monkeypatch, capsys):
    folder, _ = exported(runs, "rgb_softmax", monkeypatch, capsys)
    with zipfile.ZipFile(folder / export.PACKAGE) as z:
        z.extractall(tmp_path / "pkg")
    assert bioimageio_package.validate(str(tmp_path / "pkg" / "rdf.yaml")) == "valid-format"
    with open(tmp_path / "pkg" / "weights_torchscript.pt", "ab") as f:   # no longer the recorded sha256
        f.write(b"0")
    with pytest.raises(bioimageio_package.PackageInvalid, match="did not pass bioimageio.spec.s validation.*SHA256 "
                       "mismatch for .*weights_torchscript.pt.*This is a bug in unet-toolkit") as e:
        bioimageio_package.validate(str(tmp_path / "pkg" / "rdf.yaml"))
    assert e.value.exit_code == 4 != UserError.exit_code


@pytest.mark.e2e
def test_bad_exports_get_one_clear_message(runs, monkeypatch, capsys, tmp_path):
    code, _, err = run_main(export.main, ["--name", "nothing"], runs, monkeypatch, capsys)
    assert code == 2 and "there is no run models/nothing" in err and "Traceback" not in err
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    for out in (blocker / "sub", blocker):
        code, _, err = run_main(export.main, ["--name", "micro16", "--output", str(out)], runs, monkeypatch, capsys)
        assert code == 2 and f"cannot write the export to {out}" in err and "Traceback" not in err
    assert blocker.read_text() == "x" and os.listdir(tmp_path) == ["a_file"]
    mine = tmp_path / "mine"                          # a folder of the user's, holding a README.md
    mine.mkdir()
    (mine / "README.md").write_text("my notes")
    code, _, err = run_main(export.main, ["--name", "micro16", "--output", str(mine)], runs, monkeypatch, capsys)
    assert code == 2 and "already holds README.md, not written by export.py" in err
    assert os.listdir(mine) == ["README.md"] and (mine / "README.md").read_text() == "my notes"
    import rundir
    monkeypatch.setattr(rundir, "in_use", lambda run_dir: True)
    code, _, err = run_main(export.main, ["--name", "micro16"], runs, monkeypatch, capsys)
    assert code == 2 and "is being trained right now" in err


def test_package_texts_fit_bioimageio_limits_for_every_run():
    """The texts the package builds fit bioimageio.spec's limits whatever the run: a 16-bit or float run at a large
    input size (its input description was 129 characters at 128x128 in 16-bit, and the export failed), a run name
    with characters a package name may not hold, or one too long for it."""
    for dtype in ("uint8", "uint16", "float32", "x" * 300):
        for size in ([32, 32], [128, 128], [4096, 4096]):
            d = {"input_dtype": dtype, "size_multiple": 16, "input_size": size, "class_mode": "softmax"}
            text = bioimageio_package.input_text(d)
            assert len(text) <= 128 and len(bioimageio_package.output_text(d)) <= 128
            assert (dtype in text and f"trained at {size[0]}x{size[1]}" in text) or len(dtype) > 100
    name = bioimageio_package.package_name("cells.v2 ü/x", "NestedUNet")
    assert name.startswith("cells-v2") and set(name) <= bioimageio_package.NAME_CHARACTERS and 5 <= len(name) <= 64
    long = bioimageio_package.package_name("a" * 200, "NestedUNet")
    assert len(long) == 64 and long.endswith(" NestedUNet segmentation")
    assert bioimageio_package.known_license("MIT") and not bioimageio_package.known_license("NOT-A-LICENSE")
    d = {"num_classes": 2, "class_names": ["objects", "borders"]}
    assert bioimageio_package.class_names(d) == ["objects", "borders"]
    assert bioimageio_package.class_names({**d, "class_names": ["a", "a"]}) == ["class0", "class1"]


@pytest.mark.parametrize("flags, says", [
    (["--license", "NOT-A-LICENSE"], "--license 'NOT-A-LICENSE' is not an SPDX licence identifier"),
    (["--description", "x" * 120_000], "--description is 120000 characters"),
    (["--author", ""], "--author '': give a name of 1 to 128 characters"),
])
def test_export_flags_are_checked_before_anything_is_written(flags, says, monkeypatch, capsys, tmp_path):
    """Before the run is even read: here there is none, so a flag checked later would meet 'there is no run'."""
    runs = tmp_path
    out = tmp_path / "never"
    code, _, err = run_main(export.main, ["--name", "micro", "--output", str(out), *flags], runs, monkeypatch, capsys)
    assert code == 2 and says in err and "Traceback" not in err and len(err) < 1000
    assert not out.exists()


@pytest.mark.e2e
@pytest.mark.parametrize("output, says", [
    ("inputs/three", "which holds a data set"), ("inputs/three/images", "which holds a data set"),
    ("models", "the runs folder"), ("models/rgb_softmax", "which holds a run folder"),
    ("models/rgb_softmax/export/sub", "which holds (a run folder|an export)"),   # its export, once exported: the nearest
])
def test_export_never_writes_into_a_data_set_a_run_or_the_runs_folder(runs, output, says, monkeypatch, capsys):
    """export.py --output into the run's data set, its images/ or models/ wrote model.pth, README.md and bioimageio/
    there (exit 0)."""
    before = sorted(os.walk(runs / output)) if (runs / output).exists() else None
    code, _, err = run_main(export.main, ["--name", "micro16", "--output", output], runs, monkeypatch, capsys)
    assert code == 2 and re.search(says, err) and "Traceback" not in err, err
    assert (sorted(os.walk(runs / output)) if (runs / output).exists() else None) == before


@pytest.mark.e2e
def test_an_export_of_another_run_is_not_replaced(runs, monkeypatch, capsys, tmp_path):
    theirs = tmp_path / "exports"
    theirs.mkdir()
    (theirs / ".unet_toolkit_export").write_text(f"exported from {runs / 'models' / 'rgb_softmax'}\n")
    (theirs / "README.md").write_text("the softmax run's export")
    code, _, err = run_main(export.main, ["--name", "micro16", "--output", str(theirs)], runs, monkeypatch, capsys)
    assert code == 2 and "holds another export" in err and (theirs / "README.md").read_text() == "the softmax run's export"


def test_an_export_off_by_more_than_the_tolerance_is_a_fault_of_the_toolkit_in_export_and_package_words():
    expected = torch.zeros(1, 1, 4, 4)
    assert export.check("ONNX", expected + EXPORT_TOLERANCE / 2, expected) == pytest.approx(EXPORT_TOLERANCE / 2)
    with pytest.raises(ExportFault) as e:
        export.check("ONNX", np.ones((1, 1, 4, 4), np.float32), expected)
    assert str(e.value).startswith("the ONNX export differs from PyTorch's output by 1.00e+00 (more than 0.0001). "
                                   "This is a bug in unet-toolkit, not a mistake in your run or flags; nothing was "
                                   "written (an earlier export is as it was). Please report it with this message, "
                                   "the run's config.yml and model.json, and these versions: torch ")
    assert e.value.exit_code == export.FAULT_EXIT == 4 != UserError.exit_code
    with pytest.raises(ExportFault, match="^the BioImage.IO package's torchscript weights differ from PyTorch's output "
                                          r"by 1.00e\+00 \(more than 0.0001\). This is a bug in unet-toolkit"):
        bioimageio_package.checked("torchscript", expected + 1, expected)


def tiny_predictor(mode="percentile", dtype="uint16", per_image=True, arch="UNet"):
    cfg = {**config.DEFAULTS, "arch": arch, "deep_supervision": arch == "NestedUNet", "base_channels": 4,
           "input_channels": 2, "num_classes": 3, "normalize": mode, "per_image_norm": per_image}
    torch.manual_seed(0)
    return Predictor(build_model(cfg), describe(cfg, {np.dtype(dtype)})).eval()


def test_sizes_that_are_multiples_of_16_are_predicted_as_they_always_were():
    """What val.py predicts (network inputs, tiles) takes the plain path: normalise -> network -> head -> activation,
    bit for bit; no padding, no crop."""
    model = tiny_predictor(arch="NestedUNet")
    x = torch.rand(2, 2, 32, 48) * 4000
    with torch.no_grad():
        plain = activate(final_logits(model.network(normalize(x, model.ranges(x), model.norm)), True), "sigmoid")
        assert torch.equal(model(x), plain)


@pytest.mark.parametrize("size", [(37, 45), (61, 35), (5, 7), (17, 1)])
def test_any_size_is_mirrored_to_a_multiple_of_16_and_cropped_back(size):
    """The intensity ranges taken from the image itself, then the image mirrored at the bottom and right edges as
    F.pad's reflect mode does (further than it can, for images under 9 px), normalised, predicted, cropped: what
    val.py does with an image it pads."""
    model = tiny_predictor()
    x = torch.rand(1, 2, *size) * 4000
    h, w = size
    pad_h, pad_w = -h % 16, -w % 16
    with torch.no_grad():
        probs = model(x)
        assert probs.shape == (1, 3, h, w) and torch.isfinite(probs).all()
        if pad_h < h and pad_w < w:                       # where F.pad's reflect mode can say what it should be
            mirrored = torch.nn.functional.pad(x, (0, pad_w, 0, pad_h), mode="reflect")
            assert torch.allclose(probs, model(mirrored, model.ranges(x))[:, :, :h, :w], atol=1e-6)
            z = normalize(mirrored, model.ranges(x), model.norm)
            assert torch.allclose(probs, torch.sigmoid(model.network(z))[:, :, :h, :w], atol=1e-6)
    padded = predictor.reflect_to_multiple(torch.arange(5.0).view(1, 1, 5, 1), 16)[0, 0, :, 0]
    assert padded.tolist() == [0, 1, 2, 3, 4, 3, 2, 1, 0, 1, 2, 3, 4, 3, 2, 1]    # bouncing: 11 more rows from 5


def test_traced_torchscript_and_onnx_keep_the_padding_dynamic(tmp_path):
    """Traced at 32x32 (where the padding is 0), the files pad whatever size they are given: two odd sizes give
    PyTorch's probabilities at their own size."""
    import onnxruntime
    model = tiny_predictor()
    x = torch.rand(1, 2, 32, 32) * 4000
    predictor.save_torchscript(model, x, str(tmp_path / "m.pt"))
    predictor.save_onnx(model, x, str(tmp_path / "m.onnx"), ("input", "probabilities", "height", "width"))
    scripted = torch.jit.load(str(tmp_path / "m.pt"))
    session = onnxruntime.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    for size in [(37, 45), (50, 30)]:
        y = torch.rand(2, 2, *size) * 4000
        with torch.no_grad():
            expected, got = model(y), scripted(y)
        assert got.shape == (2, 3, *size) and torch.allclose(got, expected, atol=1e-5)
        assert np.abs(session.run(None, {"input": y.numpy()})[0] - expected.numpy()).max() < 1e-5


def test_the_readme_python_brings_an_image_to_the_scale_the_run_learned(tmp_path, monkeypatch):
    """A run that learned images at half their size (model.json's scale): the snippet gives the model the image at
    that scale and the probabilities back at the image's own size, as val.py does."""
    import sys
    import types

    import tifffile
    seen = []

    class Session:                       # onnxruntime's part the snippet uses: probabilities = the first channel
        def __init__(self, *args, **kwargs):
            pass

        def run(self, outputs, feeds):
            seen.append(feeds["input"].shape)
            return [feeds["input"][:, :1] / 255]

    monkeypatch.setitem(sys.modules, "onnxruntime", types.SimpleNamespace(InferenceSession=Session))
    description = {"input_channels": 1, "num_classes": 1, "class_mode": "sigmoid", "scale": [2.0, 2.0]}
    image = np.zeros((500, 300), np.uint8)
    image[:250] = 255                                          # the top half bright
    tifffile.imwrite(tmp_path / "my_image.tif", image)
    monkeypatch.chdir(tmp_path)
    namespace = {}
    exec(export.python_snippet(description), namespace)
    assert seen == [(1, 1, 250, 150)]                          # the model saw the image at half its size
    probs = namespace["probs"]
    assert probs.shape == (1, 1, 500, 300) and probs[0, 0, :240].min() == 1 and probs[0, 0, 260:].max() == 0
    assert "cv2" not in export.python_snippet({**description, "scale": [1.0, 1.0]})     # own scale: as it was
