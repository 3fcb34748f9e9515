"""End-to-end: train.py and val.py run as a user runs them, as subprocesses (the variants of model and data: their
main() in this process), on generated data sets."""
import csv
import json
import os
import signal
import subprocess
import sys
import time

import cv2
import numpy as np
import pytest
import yaml

import train
import val
from conftest import ROOT, make_data, run_main

FAST = ["--base_channels", "8", "--epochs", "2", "-b", "4", "--input_w", "32", "--input_h", "32", "--num_workers", "0",
        "--optimizer", "Adam", "--device", "cpu"]


def run(script, args, cwd, ok=True):
    r = subprocess.run([sys.executable, os.path.join(ROOT, script), *args], cwd=cwd, capture_output=True, text=True)
    if ok:
        assert r.returncode == 0, r.stdout + r.stderr
    return r


def read_csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


@pytest.mark.e2e
@pytest.mark.slow
def test_unet_train_then_val_writes_every_output(tmp_path):
    make_data(tmp_path / "inputs", "cells", size=40)       # 40x40 images, network input 32x32
    r = run("train.py", ["--arch", "UNet", "--dataset", "cells", *FAST], tmp_path)
    run_dir = tmp_path / "models" / "cells_UNet_woDS"
    assert sorted(os.listdir(run_dir)) == ["config.yml", "curves.png", "last.pth", "log.csv", "model.json", "model.pth", "split.csv"]
    rows = read_csv(run_dir / "log.csv")
    assert list(rows[0]) == ["epoch", "lr", "loss", "iou", "val_loss", "val_iou", "val_dice", "seconds"]
    assert [r["epoch"] for r in rows] == ["1", "2"]
    assert float(rows[1]["lr"]) < float(rows[0]["lr"])          # cosine: the lr in force, not the initial one
    saved = yaml.safe_load(open(run_dir / "config.yml"))
    assert saved["arch"] == "UNet" and saved["input_w"] == 32 and saved["name"] == "cells_UNet_woDS"
    assert "best val_iou" in r.stdout

    r = run("val.py", ["--name", "cells_UNet_woDS", "--tta", "--overlay", "--save_probs"], tmp_path)
    out = tmp_path / "outputs" / "cells_UNet_woDS"
    metrics = read_csv(out / "metrics.csv")
    assert list(metrics[0]) == ["id", "iou_0", "dice_0"] and len(metrics) == 2   # 20% of 10 images
    for row in metrics:
        mask = cv2.imread(str(out / "0" / (row["id"] + ".png")), cv2.IMREAD_UNCHANGED)
        assert mask.shape == (40, 40) and set(np.unique(mask)) <= {0, 255}       # original size, binary
        assert cv2.imread(str(out / "probs" / "0" / (row["id"] + ".png"))).shape[:2] == (40, 40)
        assert cv2.imread(str(out / "overlay" / (row["id"] + ".png"))).shape == (40, 40, 3)
    mean_iou = np.mean([float(m["iou_0"]) for m in metrics])
    assert f"{mean_iou:.4f}" in r.stdout                          # the per-image mean is printed


@pytest.mark.e2e
@pytest.mark.parametrize("extra, data_kw, name", [
    (["--arch", "NestedUNet"], {}, "tiny_NestedUNet_woDS"),
    (["--arch", "NestedUNet", "--deep_supervision", "True"], {}, "tiny_NestedUNet_wDS"),
    (["--arch", "UNet", "--num_classes", "2"], {"num_classes": 2}, "tiny_UNet_woDS"),
    (["--arch", "UNet", "--num_classes", "3", "--class_mode", "softmax", "--loss", "CEDiceLoss"],
     {"num_classes": 3, "exclusive": True}, "tiny_UNet_woDS"),
    (["--arch", "UNet", "--input_channels", "1"], {"channels": 1}, "tiny_UNet_woDS"),
    (["--arch", "UNet", "--loader", "workers", "--num_workers", "2"], {}, "tiny_UNet_woDS"),
    (["--arch", "UNet", "--cache_mb", "0.01"], {}, "tiny_UNet_woDS"),
    (["--arch", "UNet", "--amp", "bf16"], {}, "tiny_UNet_woDS"),
], ids=["nested", "nested-ds", "two-classes", "softmax", "grayscale", "worker-loader", "cache-smaller-than-data",
        "bf16-autocast-on-cpu"])
def test_variants_train_and_evaluate(tmp_path, extra, data_kw, name, monkeypatch, capsys):
    """In this process (train.py's and val.py's main, as the command line calls them): the subprocess path is the
    test above; here what varies is the model and data, not the process."""
    make_data(tmp_path / "inputs", **data_kw)
    code, _, err = run_main(train.main, ["--dataset", "tiny", *FAST, "--epochs", "1", *extra], tmp_path, monkeypatch, capsys)
    assert code == 0, err
    code, _, err = run_main(val.main, ["--name", name], tmp_path, monkeypatch, capsys)
    assert code == 0, err
    classes = data_kw.get("num_classes", 1)
    metrics = read_csv(tmp_path / "outputs" / name / "metrics.csv")
    assert list(metrics[0]) == ["id"] + [f"{m}_{c}" for c in range(classes) for m in ("iou", "dice")]
    for c in range(classes):
        assert len(os.listdir(tmp_path / "outputs" / name / str(c))) == 2
    if "softmax" in extra:   # mutually exclusive: every pixel in exactly one class
        ids = [m["id"] for m in metrics]
        stack = np.stack([cv2.imread(str(tmp_path / "outputs" / name / str(c) / (ids[0] + ".png")), 0) for c in range(3)])
        assert ((stack > 0).sum(0) == 1).all()


@pytest.mark.e2e
def test_config_rerun_with_override(tmp_path, monkeypatch, capsys):
    make_data(tmp_path / "inputs")
    code, _, err = run_main(train.main, ["--dataset", "tiny", "--arch", "UNet", "--name", "first", *FAST], tmp_path,
                            monkeypatch, capsys)
    assert code == 0, err
    cfg_path = str(tmp_path / "models" / "first" / "config.yml")
    edited = yaml.safe_load(open(cfg_path))
    edited["lr"] = 0.0005                                          # the documented edit-and-rerun workflow
    yaml.safe_dump(edited, open(tmp_path / "edited.yml", "w"))
    run("train.py", ["--config", "edited.yml", "--name", "second", "--epochs", "1"], tmp_path)
    second = yaml.safe_load(open(tmp_path / "models" / "second" / "config.yml"))
    assert (second["lr"], second["epochs"], second["arch"], second["name"]) == (0.0005, 1, "UNet", "second")
    assert len(read_csv(tmp_path / "models" / "second" / "log.csv")) == 1


@pytest.mark.e2e
def test_predict_unlabeled_images(tmp_path, monkeypatch, capsys):
    make_data(tmp_path / "inputs")
    code, _, err = run_main(train.main, ["--dataset", "tiny", "--arch", "UNet", "--name", "m", *FAST, "--epochs", "1"],
                            tmp_path, monkeypatch, capsys)
    assert code == 0, err
    new = tmp_path / "new"
    make_data(tmp_path, "new_set", n=3, size=48)
    os.rename(tmp_path / "new_set" / "images", new)
    r = run("val.py", ["--name", "m", "--images", str(new), "--overlay"], tmp_path)
    pred = tmp_path / "outputs" / "m" / "predictions"
    assert sorted(os.listdir(pred / "0")) == ["img0000.png", "img0001.png", "img0002.png"]
    assert cv2.imread(str(pred / "0" / "img0000.png"), 0).shape == (48, 48)
    assert len(os.listdir(pred / "overlay")) == 3
    assert not (pred / "metrics.csv").exists() and "IoU" not in r.stdout


@pytest.mark.e2e
@pytest.mark.slow
def test_16_bit_tiffs_with_label_images_train_evaluate_and_predict(tmp_path, monkeypatch, capsys):
    """A folder as it comes from the microscope and the annotation tool: 16-bit TIFF images, 16-bit TIFF labels."""
    import tifffile
    from conftest import make_microscopy
    make_microscopy(tmp_path / "inputs", "cells16", n=10, size=40)
    r = run("train.py", ["--arch", "UNet", "--dataset", "cells16", "--img_ext", ".tif", "--input_channels", "1",
                         "--name", "m", *FAST, "--epochs", "1"], tmp_path)
    assert "normalize: percentile (auto: the images are 16-bit" in r.stdout
    saved = yaml.safe_load(open(tmp_path / "models" / "m" / "config.yml"))
    assert saved["normalize"] == "percentile" and saved["norm_pmin"] == 1.0 and saved["norm_pmax"] == 99.8

    r = run("val.py", ["--name", "m", "--instances", "--output_format", "tif", "--save_probs", "--overlay",
                       "--panels"], tmp_path)
    assert "object score (Data Science Bowl)" in r.stdout
    out = tmp_path / "outputs" / "m"
    ids = [row["id"] for row in read_csv(out / "metrics.csv")]
    assert ids and {"object_score", "ap_50", "f1_50"} <= set(read_csv(out / "metrics.csv")[0])
    for i in ids:
        mask, probs = tifffile.imread(out / "0" / f"{i}.tif"), tifffile.imread(out / "probs" / "0" / f"{i}.tif")
        labels = tifffile.imread(out / "instances" / f"{i}.tif")
        assert mask.shape == probs.shape == labels.shape == (40, 40)
        assert mask.dtype == np.uint8 and probs.dtype == np.float32 and labels.dtype == np.uint16
        assert np.array_equal(mask > 0, probs > 0.5) and len(np.unique(probs)) > 256     # the mask's, not 8-bit
        assert cv2.imread(str(out / "overlay" / f"{i}.png")).dtype == np.uint8         # a picture for a person
        assert cv2.imread(str(out / "panels" / f"{i}.png")).shape[1] == 4 * 240 + 3 * 6    # 4 tiles of 40 px x 6
    counts = {row["id"]: int(row["count"]) for row in read_csv(out / "objects.csv")}
    measured = read_csv(out / "object_measurements.csv")
    assert sum(counts.values()) == len(measured) > 0
    assert all(sum(m["id"] == i for m in measured) == n for i, n in counts.items())
    assert max(float(m["mean_intensity"]) for m in measured) > 255            # the raw 16-bit grey levels

    unlabelled = tmp_path / "new"
    os.makedirs(unlabelled)
    for f in sorted(os.listdir(tmp_path / "inputs" / "cells16" / "images"))[:3]:
        os.link(tmp_path / "inputs" / "cells16" / "images" / f, unlabelled / f.replace(".tif", ".TIFF"))
    code, _, err = run_main(val.main, ["--name", "m", "--images", str(unlabelled), "--output_format", "tif"], tmp_path,
                            monkeypatch, capsys)
    assert code == 0, err
    predicted = sorted(os.listdir(tmp_path / "outputs" / "m" / "predictions" / "0"))
    assert len(predicted) == 3 and all(f.endswith(".tif") for f in predicted)


@pytest.mark.parametrize("breakage, expected", [
    ("stack", "cell0002.tif is not a 2D image: its shape is (3, 40, 40) with axes ZYX"),
    ("label-size", "label image inputs/cells16/labels/cell0002.tif is 20x20 but its image is 40x40"),
    ("label-float", "label image inputs/cells16/labels/cell0002.tif is float32"),
    ("label-rgb", "label image inputs/cells16/labels/cell0002.tif has 3 channels"),
    ("unreadable", "cannot read image file inputs/cells16/images/cell0002.tif"),
])
def test_bad_microscopy_files_get_one_clear_message(tmp_path, breakage, expected, monkeypatch, capsys):
    import tifffile
    import train
    from conftest import make_microscopy, run_main
    root = make_microscopy(tmp_path / "inputs", "cells16", n=10, size=40)
    image, labels = os.path.join(root, "images", "cell0002.tif"), os.path.join(root, "labels", "cell0002.tif")
    if breakage == "stack":
        tifffile.imwrite(image, np.zeros((3, 40, 40), np.uint16), imagej=True, metadata={"axes": "ZYX"})
    elif breakage == "label-size":
        tifffile.imwrite(labels, np.zeros((20, 20), np.uint16))
    elif breakage == "label-float":
        tifffile.imwrite(labels, np.zeros((40, 40), np.float32))
    elif breakage == "label-rgb":
        tifffile.imwrite(labels, np.zeros((40, 40, 3), np.uint8))
    else:
        open(image, "wb").write(b"II*\x00" + b"\x00" * 20)
    # in this process (as the command line runs main()), which is faster than a subprocess
    code, _, err = run_main(train.main, ["--arch", "UNet", "--dataset", "cells16", "--img_ext", ".tif", *FAST], tmp_path,
                            monkeypatch, capsys)
    assert code == 2 and expected in err and "Traceback" not in err, err
    assert not os.path.exists(tmp_path / "models")


@pytest.mark.e2e
def test_class_names_name_the_classes_in_val_pys_table_and_the_panels(tmp_path, monkeypatch, capsys):
    make_data(tmp_path / "inputs", "two", num_classes=2)
    code, _, err = run_main(train.main, ["--dataset", "two", "--arch", "UNet", "--num_classes", "2", "--class_names",
                                         "nucleus,vesicle", "--name", "named", *FAST, "--epochs", "1"], tmp_path,
                            monkeypatch, capsys)
    assert code == 0, err
    assert json.load(open(tmp_path / "models" / "named" / "model.json"))["class_names"] == ["nucleus", "vesicle"]
    code, out, err = run_main(val.main, ["--name", "named", "--panels", "--overlay"], tmp_path, monkeypatch, capsys)
    assert code == 0, err
    rows = [line.split()[0] for line in out.splitlines() if line.strip().startswith(("nucleus", "vesicle"))]
    assert rows == ["nucleus", "vesicle"]
    assert "class nucleus green, class vesicle yellow, ground truth magenta" in out
    panels = sorted((tmp_path / "outputs" / "named" / "panels").iterdir())
    assert panels and all(cv2.imread(str(p)).shape[1] == 4 * 256 + 3 * 6 for p in panels)   # 32 px tiles x 8
    code, _, err = run_main(train.main, ["--dataset", "two", "--num_classes", "2", "--class_names", "a,a",
                                         "--name", "dup", *FAST], tmp_path, monkeypatch, capsys)
    assert code == 2 and "class_names a,a must name each of the 2 class(es) once" in err


def wait_until_importing_torch(pid, timeout=30):
    """Returns once the process has loaded torch's library (so its script's first lines have run and the imports are
    under way), read from /proc/<pid>/maps; where there is no /proc, after 0.25 s."""
    maps = f"/proc/{pid}/maps"
    if not os.path.exists(maps):
        time.sleep(0.25)
        return
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            with open(maps) as f:
                if "libtorch" in f.read():
                    return
        except OSError:
            return
        time.sleep(0.005)


@pytest.mark.parametrize("script, sig", [("train", signal.SIGINT), ("val", signal.SIGINT), ("bench", signal.SIGINT),
                                         ("export", signal.SIGINT), ("preprocess_dsb2018", signal.SIGINT),
                                         ("make_demo_data", signal.SIGINT), ("compare", signal.SIGINT),
                                         ("train", signal.SIGTERM)])
def test_ctrl_c_while_a_script_imports_torch_ends_quietly(tmp_path, script, sig):
    """The first second of every script is spent importing (torch): a Ctrl-C or SIGTERM then exits with 130 and
    no traceback (before, 12 of 12 tries printed a KeyboardInterrupt traceback)."""
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, f"{script}.py"), "--help"], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_until_importing_torch(proc.pid)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "Traceback" not in err, err
