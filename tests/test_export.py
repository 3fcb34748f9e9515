"""export.py: TorchScript and ONNX exports of tiny runs, each checked against PyTorch, and its refusals."""
import json
import os

import numpy as np
import pytest
import torch

import export
import train
from conftest import make_data, make_microscopy, run_main

FAST = ["--epochs", "1", "-b", "4", "--input_w", "32", "--input_h", "32", "--num_workers", "0", "--optimizer", "Adam",
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


@pytest.mark.parametrize("name", ["softmax", "micro"])
def test_export_writes_checked_torchscript_and_onnx_that_match_pytorch(runs, name, monkeypatch, capsys):
    import onnxruntime
    code, out, err = run_main(export.main, ["--name", name] + (["--speed"] if name == "softmax" else []), runs,
                              monkeypatch, capsys)
    assert code == 0, err
    if name == "softmax":                                  # the three ways to run it, side by side
        rates = json.loads(out.strip().splitlines()[-1])
        assert rates["case"] == "predict" and all(rates[k] > 0 for k in rates if k.endswith(("fp32", "bfloat16")))
        assert {"torchscript_fp32", "onnxruntime_fp32"} <= set(rates)
    folder = runs / "models" / name / "export"
    assert {"model.onnx", "model.torchscript.pt", "model.pth", "model.json", "README.md", "test_input.npy",
            "test_output.npy"} <= set(os.listdir(folder))
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


def test_bad_exports_get_one_clear_message(runs, monkeypatch, capsys, tmp_path):
    code, _, err = run_main(export.main, ["--name", "nothing"], runs, monkeypatch, capsys)
    assert code == 2 and "there is no run models/nothing" in err and "Traceback" not in err
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    code, _, err = run_main(export.main, ["--name", "micro", "--output", str(blocker / "sub")], runs, monkeypatch, capsys)
    assert code == 2 and "cannot write the export to" in err
    import rundir
    monkeypatch.setattr(rundir, "in_use", lambda run_dir: True)
    code, _, err = run_main(export.main, ["--name", "micro"], runs, monkeypatch, capsys)
    assert code == 2 and "is being trained right now" in err
