"""export.py: TorchScript and ONNX exports of tiny runs, each checked against PyTorch, and its refusals."""
import json
import os
import re

import numpy as np
import pytest
import torch

import export
import train
from conftest import make_data, make_microscopy, run_main

FAST = ["--base_channels", "8", "--epochs", "1", "-b", "4", "--input_w", "32", "--input_h", "32", "--num_workers", "0", "--optimizer", "Adam",
        "--device", "cpu"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two tiny runs that between them cover NestedUNet with deep supervision, grayscale, per-image normalisation,
    16-bit images with percentile normalisation (micro), and a multi-class softmax UNet on 8-bit RGB (softmax)."""
    root = tmp_path_factory.mktemp("export")
    make_data(root / "inputs", "three", num_classes=3, exclusive=True)
    make_microscopy(root / "inputs", "micro")
    mp = pytest.MonkeyPatch()

    class NoCapture:                       # a module fixture cannot take capsys; the output goes to the log
        @staticmethod
        def readouterr():
            return "", ""
    capsys = NoCapture()
    variants = {
        "softmax": ["--dataset", "three", "--arch", "UNet", "--num_classes", "3", "--class_mode", "softmax",
                    "--loss", "CEDiceLoss"],
        "micro": ["--dataset", "micro", "--arch", "NestedUNet", "--deep_supervision", "--per_image_norm",
                  "--img_ext", ".tif", "--input_channels", "1"],
    }
    for name, argv in variants.items():
        code, _, err = run_main(train.main, argv + FAST + ["--name", name], root, mp, capsys)
        assert code == 0, err
    yield root
    mp.undo()


@pytest.mark.e2e
@pytest.mark.slow
@pytest.mark.parametrize("name", ["softmax", "micro"])
def test_export_writes_checked_torchscript_and_onnx_that_match_pytorch(runs, name, monkeypatch, capsys):
    import onnxruntime
    flags = ["--speed", "--author", "Ada Lovelace", "--author", "Alan Turing", "--license", "MIT"] if name == "softmax" else []
    code, out, err = run_main(export.main, ["--name", name] + flags, runs, monkeypatch, capsys)
    assert code == 0, err
    if name == "softmax":                                  # the three ways to run it, side by side
        rates = json.loads(out.strip().splitlines()[-1])
        assert rates["case"] == "predict" and all(rates[k] > 0 for k in rates if k.endswith(("fp32", "bfloat16")))
        assert {"torchscript_fp32", "onnxruntime_fp32"} <= set(rates)
    folder = runs / "models" / name / "export"
    assert {"model.onnx", "model.torchscript.pt", "model.pth", "model.json", "README.md", "test_input.npy",
            "test_output.npy", "bioimageio.zip"} <= set(os.listdir(folder))
    rdf = check_package(folder / "bioimageio.zip", name)
    if name == "softmax":
        assert [a["name"] for a in rdf["authors"]] == ["Ada Lovelace", "Alan Turing"] and rdf["license"] == "MIT"
    assert "BioImage.IO package:" in out and "valid-format" in out
    assert "TorchScript:" in out and "ONNX:" in out
    x, expected = np.load(folder / "test_input.npy"), np.load(folder / "test_output.npy")
    session = onnxruntime.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    assert np.abs(session.run(None, {"input": x})[0] - expected).max() < 1e-4
    with torch.no_grad():
        scripted = torch.jit.load(str(folder / "model.torchscript.pt"))(torch.from_numpy(x)).numpy()
    assert np.abs(scripted - expected).max() < 1e-4
    description = json.load(open(folder / "model.json"))
    assert description["input_size"] == [32, 32] and description["size_multiple"] == 16
    if name == "micro":
        assert description["normalize"] == {"mode": "percentile", "pmin": 1.0, "pmax": 99.8, "per_image": True,
                                             "full_range": 65535.0}
        assert description["arch"] == "NestedUNet" and description["deep_supervision"] and description["input_dtype"] == "uint16"
        assert x.max() > 255                               # the test input holds the file's 16-bit values
    if name == "softmax":
        assert np.allclose(expected.sum(1), 1, atol=1e-5)


def check_package(zip_path, name):
    """The BioImage.IO package: valid for bioimageio.spec, and its rdf.yaml says what the run is."""
    import zipfile

    import yaml
    from bioimageio.spec import InvalidDescr, load_description
    descr = load_description(str(zip_path), perform_io_checks=True)
    assert not isinstance(descr, InvalidDescr), descr.validation_summary.format()
    with zipfile.ZipFile(zip_path) as z:
        rdf = yaml.safe_load(z.read("rdf.yaml"))
        assert {"archs.py", "weights.pt", "weights_torchscript.pt", "weights.onnx", "test_input.npy",
                "test_output.npy", "cover.png", "README.md"} <= set(z.namelist())
    assert rdf["format_version"].startswith("0.5.") and rdf["type"] == "model"
    assert set(rdf["weights"]) == {"pytorch_state_dict", "torchscript", "onnx"}
    space = rdf["inputs"][0]["axes"][2:]
    assert [a["size"] for a in space] == [{"min": 16, "step": 16}] * 2
    steps = [p["id"] for p in rdf["inputs"][0]["preprocessing"]]
    kwargs = rdf["weights"]["pytorch_state_dict"]["architecture"]["kwargs"]
    if name == "micro":     # percentile scaling in rdf.yaml; the per-image standardisation inside the model
        assert steps == ["ensure_dtype", "scale_range", "clip", "scale_linear", "ensure_dtype"]
        assert kwargs["per_image_eps"] == 1e-3 and kwargs["network"]["deep_supervision"] and kwargs["network"]["arch"] == "NestedUNet"
    else:
        assert steps == ["ensure_dtype", "scale_linear", "ensure_dtype"] and kwargs["class_mode"] == "softmax"
        assert len(rdf["outputs"][0]["axes"][1]["channel_names"]) == 3
    return rdf


@pytest.mark.e2e
@pytest.mark.slow
def test_bioimageio_core_reproduces_the_test_output_with_every_weight_format(runs, monkeypatch, capsys):
    """bioimageio.core's own model test (what the model zoo runs): it applies rdf.yaml's preprocessing itself, so
    this checks that it equals normalize.py's, on the hardest case (16-bit percentile, per-image, NestedUNet-DS)."""
    core = pytest.importorskip("bioimageio.core", reason="bioimageio.core is not installed")
    folder = runs / "models" / "micro" / "export"
    if not (folder / "bioimageio.zip").exists():
        code, _, err = run_main(export.main, ["--name", "micro"], runs, monkeypatch, capsys)
        assert code == 0, err
    summary = core.test_model(str(folder / "bioimageio.zip"))
    failed = [(d.name, [e.msg[:300] for e in d.errors]) for d in summary.details if d.status != "passed"]
    assert summary.status == "passed", failed
    names = " ".join(d.name for d in summary.details)
    assert all(f"Reproduce test outputs from test inputs ({w})" in names for w in ("onnx", "torchscript",
                                                                                    "pytorch_state_dict"))


@pytest.mark.e2e
def test_a_package_bioimageio_spec_rejects_is_one_clear_error(runs, tmp_path, monkeypatch, capsys):
    import shutil

    import bioimageio_package
    from utils import UserError
    folder = runs / "models" / "softmax" / "export" / "bioimageio"
    if not folder.exists():
        code, _, err = run_main(export.main, ["--name", "softmax"], runs, monkeypatch, capsys)
        assert code == 0, err
    shutil.copytree(folder, tmp_path / "pkg")
    assert bioimageio_package.validate(str(tmp_path / "pkg" / "rdf.yaml")) == "valid-format"
    with open(tmp_path / "pkg" / "weights.pt", "ab") as f:       # the file no longer has the recorded sha256
        f.write(b"0")
    with pytest.raises(UserError, match="did not pass bioimageio.spec.s validation.*SHA256 mismatch for .*weights.pt"):
        bioimageio_package.validate(str(tmp_path / "pkg" / "rdf.yaml"))


@pytest.mark.e2e
def test_bad_exports_get_one_clear_message(runs, monkeypatch, capsys, tmp_path):
    code, _, err = run_main(export.main, ["--name", "nothing"], runs, monkeypatch, capsys)
    assert code == 2 and "there is no run models/nothing" in err and "Traceback" not in err
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    code, _, err = run_main(export.main, ["--name", "micro", "--output", str(blocker / "sub")], runs, monkeypatch, capsys)
    assert code == 2 and "cannot write the export to" in err
    mine = tmp_path / "mine"                          # a folder of the user's, holding a README.md
    mine.mkdir()
    (mine / "README.md").write_text("my notes")
    code, _, err = run_main(export.main, ["--name", "micro", "--output", str(mine)], runs, monkeypatch, capsys)
    assert code == 2 and "already holds README.md, not written by export.py" in err
    assert os.listdir(mine) == ["README.md"] and (mine / "README.md").read_text() == "my notes"
    import rundir
    monkeypatch.setattr(rundir, "in_use", lambda run_dir: True)
    code, _, err = run_main(export.main, ["--name", "micro"], runs, monkeypatch, capsys)
    assert code == 2 and "is being trained right now" in err


def test_package_texts_fit_bioimageio_limits_for_every_run():
    """The texts the package builds fit bioimageio.spec's limits whatever the run: a 16-bit or float run at a large
    input size (its input description was 129 characters at 128x128 in 16-bit, and the export failed), a run name
    with characters a package name may not hold."""
    import bioimageio_package
    for dtype in ("uint8", "uint16", "float32"):
        for size in ([32, 32], [128, 128], [4096, 4096]):
            text = bioimageio_package.input_text({"input_dtype": dtype, "size_multiple": 16, "input_size": size})
            assert dtype in text and len(text) <= 128
    name = bioimageio_package.package_name("cells.v2 ü/x", "NestedUNet")
    assert name.startswith("cells-v2") and set(name) <= bioimageio_package.NAME_CHARACTERS and 5 <= len(name) <= 64
    assert bioimageio_package.known_license("MIT") and not bioimageio_package.known_license("NOT-A-LICENSE")


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
@pytest.mark.slow
def test_an_invalid_package_is_a_fault_of_the_toolkit_and_is_not_left(runs, monkeypatch, capsys, tmp_path):
    import bioimageio_package

    def invalid(path):
        raise bioimageio_package.PackageInvalid(f"the BioImage.IO package {path} did not pass (planted)")
    monkeypatch.setattr(bioimageio_package, "validate", invalid)
    out = tmp_path / "exported"
    code, _, err = run_main(export.main, ["--name", "softmax", "--output", str(out)], runs, monkeypatch, capsys)
    assert code == 4 and "did not pass" in err                  # not 2, the code of a user's mistake
    assert not (out / "bioimageio.zip").exists() and not (out / "bioimageio").exists()


@pytest.mark.e2e
@pytest.mark.parametrize("output, says", [
    ("inputs/three", "which holds a data set"), ("inputs/three/images", "which holds a data set"),
    ("models", "the runs folder"), ("models/softmax", "which holds a run folder"),
    ("models/softmax/export/sub", "which holds (a run folder|an export)"),   # its export, once exported: the nearest
])
def test_export_never_writes_into_a_data_set_a_run_or_the_runs_folder(runs, output, says, monkeypatch, capsys):
    """export.py --output into the run's data set, its images/ or models/ wrote model.pth, README.md and bioimageio/
    there (exit 0)."""
    before = sorted(os.walk(runs / output)) if (runs / output).exists() else None
    code, _, err = run_main(export.main, ["--name", "micro", "--output", output], runs, monkeypatch, capsys)
    assert code == 2 and re.search(says, err) and "Traceback" not in err, err
    assert (sorted(os.walk(runs / output)) if (runs / output).exists() else None) == before


@pytest.mark.e2e
def test_an_export_of_another_run_is_not_replaced(runs, monkeypatch, capsys, tmp_path):
    theirs = tmp_path / "exports"
    theirs.mkdir()
    (theirs / ".unet_toolkit_export").write_text(f"exported from {runs / 'models' / 'softmax'}\n")
    (theirs / "README.md").write_text("the softmax run's export")
    code, _, err = run_main(export.main, ["--name", "micro", "--output", str(theirs)], runs, monkeypatch, capsys)
    assert code == 2 and "holds another export" in err and (theirs / "README.md").read_text() == "the softmax run's export"


def test_an_export_off_by_more_than_the_tolerance_is_refused_in_export_and_package_words():
    import bioimageio_package
    from predictor import EXPORT_TOLERANCE
    from utils import UserError
    expected = torch.zeros(1, 1, 4, 4)
    assert export.check("ONNX", expected + EXPORT_TOLERANCE / 2, expected) == pytest.approx(EXPORT_TOLERANCE / 2)
    with pytest.raises(UserError) as e:
        export.check("ONNX", np.ones((1, 1, 4, 4), np.float32), expected)
    assert str(e.value) == ("the ONNX export differs from PyTorch's output by 1.00e+00 (more than 0.0001); it was not "
                            "kept. Please report this with the run's config.yml")
    with pytest.raises(UserError) as e:
        bioimageio_package.checked("onnx", expected + 1, expected)
    assert str(e.value) == ("the BioImage.IO package's onnx weights differ from PyTorch's output by 1.00e+00 (more than "
                            "0.0001); the package was not written. Please report this with the run's config.yml")
