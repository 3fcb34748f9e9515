"""The class that matters and classes as the data says: val.py's per-image column and the complement's line, the
many-class and membrane sets of make_demo_data.py, --invert_mask from training to val.py, and a many-class set
planned as softmax with its names."""
import csv
import json
import os

import cv2
import numpy as np
import pytest
import torch
import yaml

import config
import make_demo_data
import train
import val
from conftest import make_data, run_main
from evaluation import Scores
from metrics import SegMeter


def scored(truth, pred):
    """(N, C, H, W) 0/1 arrays -> the Scores val.py's report() reads (at each image's size only)."""
    meter = SegMeter(truth.shape[1], torch.device("cpu"), keep_per_image=True)
    for t, p in zip(truth, pred):
        meter.update(torch.from_numpy(p[None]).float(), torch.from_numpy(t[None]).float())
    return Scores(meter)


def iou(a, b):
    union = np.logical_or(a, b).sum()
    return np.logical_and(a, b).sum() / union if union else 1.0


def report(truth, pred, tmp_path, capsys, **cfg):
    cfg = {**config.DEFAULTS, "num_classes": truth.shape[1], **cfg}
    val.report(scored(truth, pred), [f"i{k}" for k in range(len(truth))], str(tmp_path), cfg,
               sizes=[truth.shape[2:]] * len(truth))
    rows = list(csv.DictReader(open(tmp_path / "metrics.csv")))
    return capsys.readouterr().out, rows


def table_row(out, label):
    return next(line.split() for line in out.splitlines() if line.split()[:1] == [label])


def test_the_per_image_mean_leaves_out_images_where_neither_truth_nor_prediction_has_the_class(tmp_path, capsys):
    rng = np.random.default_rng(0)
    truth = (rng.random((4, 2, 16, 16)) > 0.6).astype(np.uint8)
    pred = (rng.random((4, 2, 16, 16)) > 0.6).astype(np.uint8)
    truth[1:, 1], pred[1:, 1] = 0, 0                     # class 1 only in image 0: three images with neither
    pred[2, 1, 0, 0] = 1                                 # ... but image 2 predicts one pixel of it: a miss
    out, rows = report(truth, pred, tmp_path, capsys)
    present = [0, 2]
    expected = np.mean([iou(truth[k, 1], pred[k, 1]) for k in present])
    assert table_row(out, "1")[2:4] == [f"{expected:.4f}", f"({len(present)})"]
    assert [r["iou_1"] for r in rows][1::2] == ["", ""] and float(rows[2]["iou_1"]) == 0.0
    assert float(rows[0]["iou_1"]) == pytest.approx(iou(truth[0, 1], pred[0, 1]), abs=1e-6)
    whole = [iou(truth[k, 0], pred[k, 0]) for k in range(4)]
    assert table_row(out, "0")[2:4] == [f"{np.mean(whole):.4f}", "(4)"]
    # the data-set figure is as before: every image's pixels pooled
    assert table_row(out, "1")[1] == f"{iou(truth[:, 1], pred[:, 1]):.4f}"
    assert "an image where neither has it is left out" in out


def test_a_class_no_image_has_shows_a_dash_not_a_perfect_score(tmp_path, capsys):
    truth = np.zeros((2, 2, 8, 8), np.uint8)
    truth[:, 0, :4] = 1
    out, rows = report(truth, truth.copy(), tmp_path, capsys, class_names=["cell", "ghost"])
    assert table_row(out, "ghost")[1:] == ["1.0000", "-", "1.0000", "-"]
    assert all(r["iou_1"] == "" and r["dice_1"] == "" for r in rows)


def test_a_one_class_run_reports_its_complement_under_the_table_and_an_inverted_run_says_what_it_scored(
        tmp_path, capsys):
    rng = np.random.default_rng(1)
    truth = (rng.random((3, 1, 20, 20)) > 0.22).astype(np.uint8)          # the class covers ~78% of the pixels
    pred = truth.copy()
    pred[:, :, :2] = 1                                                    # two rows of the rest called class
    out, _ = report(truth, pred, tmp_path, capsys)
    line = next(x for x in out.splitlines() if x.startswith("complement"))
    share = 1 - truth.mean()
    assert f"{100 * share:.0f}% of them): IoU {iou(1 - truth, 1 - pred):.4f}" in line
    assert "--invert_mask trains a run on it" in line
    out, _ = report(1 - truth, 1 - pred, tmp_path, capsys, invert_mask=True)   # the same, learned inverted
    line = next(x for x in out.splitlines() if x.startswith("invert_mask:"))
    assert f"the masks' own class ({100 * truth.mean():.0f}% of the pixels): IoU {iou(truth, pred):.4f}" in line
    assert table_row(out, "not")[:2] == ["not", "0"]
    out, _ = report(1 - truth, 1 - pred, tmp_path, capsys)                # a class of 22%: no hint to invert
    assert "complement" in out and "--invert_mask" not in out
    out, _ = report(np.concatenate([truth, truth], 1), np.concatenate([pred, pred], 1), tmp_path, capsys)
    assert "complement" not in out                                        # several classes: each has its own row


def test_the_many_class_set_has_a_grey_level_per_repeated_shape_void_rings_and_names(tmp_path):
    root = make_data(tmp_path, "shapes", n=12, size=96, num_classes=8, exclusive=True, void=True, names=True,
                     channels=1)
    names = open(os.path.join(root, "masks", "names.txt")).read().splitlines()
    assert names == ["background", "ellipse", "square", "triangle", "ellipse 2", "square 2", "triangle 2", "ellipse 3"]
    files = sorted(os.listdir(os.path.join(root, "images")))
    images = [cv2.imread(os.path.join(root, "images", f), 0).astype(float) for f in files]
    masks = [np.stack([cv2.imread(os.path.join(root, "masks", str(c), f), 0) > 127 for c in range(8)], 2) for f in files]
    marks = np.stack([m.sum(2) for m in masks])
    assert 0 < (marks == 0).mean() < 0.1                                  # the void rings, in no class
    inner = [[cv2.erode(m[:, :, c].astype(np.uint8), np.ones((5, 5), np.uint8)) > 0 for m in masks] for c in range(8)]
    level = {c: np.median(np.concatenate([im[i] for im, i in zip(images, inner[c])])) for c in range(1, 8)}
    assert level[1] < level[4] < level[7] and level[2] < level[5] and level[3] < level[6]   # brighter repeats
    code = run_main_quiet(["--out", str(tmp_path / "x"), "--void"])
    assert code == 2


def run_main_quiet(argv):
    try:
        make_demo_data.main(argv)
    except SystemExit as e:
        return e.code
    return 0


@pytest.mark.e2e
def test_invert_mask_trains_on_the_membranes_and_val_py_scores_them_with_or_without_config_yml(
        tmp_path, monkeypatch, capsys):
    make_demo_data.generate_membranes(str(tmp_path / "inputs" / "em"), n=5, size=64)
    argv = ["--dataset", "em", "--arch", "UNet", "--base_channels", "8", "--epochs", "1", "-b", "2", "--input_w", "64",
            "--input_h", "64", "--num_workers", "0", "--name", "membranes", "--invert_mask"]
    code, out, err = run_main(train.main, argv, tmp_path, monkeypatch, capsys)
    assert code == 0, err
    run = tmp_path / "models" / "membranes"
    assert yaml.safe_load(open(run / "config.yml"))["invert_mask"] is True
    assert json.load(open(run / "model.json"))["invert_mask"] is True
    for without_config in (False, True):
        if without_config:
            os.remove(run / "config.yml")
            os.remove(run / "last.pth")                    # model.pth and model.json, as a colleague receives them
        code, out, err = run_main(val.main, ["--name", "membranes", "--output", "scored", "--data", "inputs/em"],
                                  tmp_path, monkeypatch, capsys)
        assert code == 0, err
        assert "invert_mask: this run learned the complement of the masks" in out and table_row(out, "not")
        masks = [cv2.imread(str(tmp_path / "inputs" / "em" / "masks" / "0" / f), 0) > 127
                 for f in sorted(os.listdir(tmp_path / "inputs" / "em" / "masks" / "0"))]
        assert f"the masks' own class ({100 * np.mean(masks):.0f}% of the pixels)" in out   # the truth: the complement
        rows = list(csv.DictReader(open(tmp_path / "scored" / "metrics.csv")))
        for row in rows:                                   # scored against the complement of the masks
            pred = cv2.imread(str(tmp_path / "scored" / "0" / f"{row['id']}.png"), 0) > 127
            mask = cv2.imread(str(tmp_path / "inputs" / "em" / "masks" / "0" / f"{row['id']}.png"), 0) > 127
            assert float(row["iou_0"]) == pytest.approx(iou(pred, ~mask), abs=1e-5)


@pytest.mark.e2e
def test_a_many_class_set_is_planned_as_softmax_with_its_names_and_val_py_names_them(tmp_path, monkeypatch, capsys):
    make_data(tmp_path / "inputs", "shapes", n=10, size=48, num_classes=6, exclusive=True, void=True, names=True)
    argv = ["--dataset", "shapes", "--plan", "auto", "--epochs", "1", "--base_channels", "8", "--num_workers", "0",
            "--name", "shapes"]
    code, out, err = run_main(train.main, argv, tmp_path, monkeypatch, capsys)
    assert code == 0, err
    assert ("--class_mode softmax --loss CEDiceLoss --class_names 'background,ellipse,square,triangle,ellipse 2,"
            "square 2'") in out
    assert "no class marks count as class 0, the background" in out
    saved = yaml.safe_load(open(tmp_path / "models" / "shapes" / "config.yml"))
    assert saved["class_mode"] == "softmax" and saved["class_names"][4] == "ellipse 2"
    code, out, err = run_main(val.main, ["--name", "shapes"], tmp_path, monkeypatch, capsys)
    assert code == 0, err
    rows = list(csv.DictReader(open(tmp_path / "outputs" / "shapes" / "metrics.csv")))
    for c, name in enumerate(saved["class_names"]):
        present = []
        for row in rows:
            pred = cv2.imread(str(tmp_path / "outputs" / "shapes" / str(c) / f"{row['id']}.png"), 0) > 127
            masks = np.stack([cv2.imread(str(tmp_path / "inputs" / "shapes" / "masks" / str(k) / f"{row['id']}.png"),
                                         0) > 127 for k in range(6)], 2)
            index = np.where(masks.any(2), 5 - np.argmax(masks[:, :, ::-1], 2), 0)      # softmax mode's target
            present.append(bool(pred.any() or (index == c).any()))
            assert (row[f"iou_{c}"] == "") == (not present[-1])
        cells = table_row(out, name.split()[0]) if " " not in name else None
        if cells and sum(present):
            assert cells[3] == f"({sum(present)})"
