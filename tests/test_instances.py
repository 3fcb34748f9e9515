"""instances.py and val.py --instances: objects from masks, the Data Science Bowl object score (checked against
hand computations), the label and CSV files, and the data set's optional instances/ folder."""
import csv
import json
import os

import cv2
import numpy as np
import pytest
import torch
import yaml

import instances
import train
import val
from conftest import make_data, run_main
from dataset import SegmentationData
from imagefiles import read_instances
from utils import UserError


def boxes(*rects, shape=(40, 40)):
    """A label image with object n+1 = rects[n] (y0, y1, x0, x1)."""
    labels = np.zeros(shape, np.int64)
    for n, (y0, y1, x0, x1) in enumerate(rects, 1):
        labels[y0:y1, x0:x1] = n
    return labels


A, B = (0, 10, 0, 10), (20, 30, 20, 30)
# case: true objects, predicted objects, (score, AP at 0.5 = TP/(TP+FP+FN) there, F1 at 0.5, counting error)
# computed by hand in the comments
CASES = [
    ("perfect", boxes(A, B), boxes(A, B), (1.0, 1.0, 1.0, 0)),
    # 1 of 2 found at every threshold: TP 1, FP 0, FN 1 -> 1/2; F1 = 2/(2+0+1)
    ("one-missed", boxes(A, B), boxes(A), (0.5, 0.5, 2 / 3, 1)),
    # TP 1, FP 1, FN 0 -> 1/2 at every threshold
    ("one-extra", boxes(A), boxes(A, B), (0.5, 0.5, 2 / 3, 1)),
    # a 10x20 nucleus predicted as 10x14 + 10x6: IoU 0.7 with the larger part, a match for t = 0.50 .. 0.65 only
    # (4 thresholds: TP 1, FP 1, FN 0 -> 1/2), none above (TP 0, FP 2, FN 1 -> 0): 4 x 0.5 / 10 = 0.2
    ("split", boxes((0, 10, 0, 20)), boxes((0, 10, 0, 14), (0, 10, 14, 20)), (0.2, 0.5, 2 / 3, 1)),
    # 10x15 and 10x5 nuclei predicted as one 10x20 object: IoU 0.75 with the larger, a match for t = 0.50 .. 0.70
    # (5 thresholds: TP 1, FP 0, FN 1 -> 1/2), none above: 5 x 0.5 / 10 = 0.25
    ("merged", boxes((0, 10, 0, 15), (0, 10, 15, 20)), boxes((0, 10, 0, 20)), (0.25, 0.5, 2 / 3, 1)),
    ("empty", boxes(), boxes(), (1.0, 1.0, 1.0, 0)),
    ("nothing-to-find-but-found", boxes(), boxes(A), (0.0, 0.0, 0.0, 1)),
]


@pytest.mark.parametrize("case, true, pred, expected", CASES, ids=[c[0] for c in CASES])
def test_object_score_agrees_with_a_hand_computation(case, true, pred, expected):
    r = instances.object_scores(true, pred)
    assert (r["score"], r["ap_50"], r["f1_50"], r["count_error"]) == pytest.approx(expected)
    assert (r["true_count"], r["pred_count"]) == (true.max(), pred.max())


def discs(centres, radius, shape=(64, 64)):
    """(mask of the union, labels with one number per disc; a later disc overwrites an earlier one's overlap)."""
    yy, xx = np.mgrid[:shape[0], :shape[1]]
    labels = np.zeros(shape, np.int64)
    for n, (y, x) in enumerate(centres, 1):
        labels[(yy - y) ** 2 + (xx - x) ** 2 <= radius ** 2] = n
    return (labels > 0).astype(np.uint8), labels


@pytest.mark.parametrize("centres", [[(32, 22), (32, 40)], [(20, 20), (20, 38), (36, 29)]], ids=["two", "three"])
def test_watershed_separates_touching_discs_that_components_merge(centres):
    mask, truth = discs(centres, 10)
    assert instances.components(mask, 4).max() == 1                     # one blob
    split = instances.watershed_split(mask, 4)
    assert split.max() == len(centres) and instances.object_scores(truth, split)["f1_50"] == 1.0
    assert (split > 0).sum() == mask.sum()                               # every foreground pixel is in an object
    assert instances.watershed_split(np.zeros((8, 8), np.uint8), 4).max() == 0


@pytest.mark.parametrize("centres", [[(32, 22), (32, 40)], [(20, 20), (20, 38), (36, 29)]], ids=["two", "three"])
@pytest.mark.parametrize("radius", [1, 2])
def test_the_border_plane_marks_where_discs_touch_and_nowhere_else(centres, radius):
    mask, labels = discs(centres, 10)
    target = instances.object_targets(labels, radius)
    assert target.dtype == np.uint8 and target.shape == (64, 64, 2)
    assert np.array_equal(target[:, :, 0], mask)                          # plane 0: the objects, as their mask
    borders = target[:, :, 1] > 0
    yy, xx = np.nonzero(labels)
    # every object pixel within `radius` of another disc's pixel is border, every other one is not
    near = np.zeros(len(yy), bool)
    for n in range(len(centres)):
        pixels = np.flatnonzero(labels[yy, xx] == n + 1)
        for m in range(len(centres)):
            if m != n:
                theirs = np.flatnonzero(labels[yy, xx] == m + 1)
                d = np.hypot(yy[pixels, None] - yy[None, theirs], xx[pixels, None] - xx[None, theirs]).min(1)
                near[pixels] |= d <= radius
    assert np.array_equal(borders[yy, xx], near) and not borders[labels == 0].any()
    assert near.any() and (~near).sum() > 0.8 * len(near)                # a thin band, not the outlines
    alone = instances.object_targets(discs([(32, 32)], 10)[1], radius)
    assert alone[:, :, 1].sum() == 0                                     # one object: no border at all


@pytest.mark.parametrize("centres", [[(32, 22), (32, 40)], [(20, 20), (20, 38), (36, 29)]], ids=["two", "three"])
def test_split_by_borders_gives_one_object_per_touching_disc(centres):
    mask, truth = discs(centres, 10)
    target = instances.object_targets(truth, 1)
    split = instances.split_by_borders(target[:, :, 0], target[:, :, 1], 4)
    assert split.max() == len(centres) and instances.object_scores(truth, split)["score"] > 0.9
    assert (split > 0).sum() == mask.sum()                               # border pixels go to a neighbour
    tiny = np.zeros((16, 16), np.uint8)
    tiny[2:5, 2:5] = 1                                                   # an object drawn all border: kept
    assert instances.split_by_borders(tiny, tiny, 4).max() == 1
    assert instances.split_by_borders(tiny, tiny, 10).max() == 0          # ... unless under min_size
    assert instances.split_by_borders(tiny * 0, tiny, 4).max() == 0


def test_a_border_splits_what_the_shape_alone_does_not():
    truth = np.zeros((40, 60), np.int64)
    truth[10:30, 10:30], truth[10:30, 30:50] = 1, 2                      # two squares side by side: one rectangle
    objects, borders = np.moveaxis(instances.object_targets(truth, 1), 2, 0)
    assert instances.watershed_split(objects, 4).max() == 1               # no neck: the shape gives one object
    assert instances.split_by_borders(objects, np.zeros_like(borders), 4).max() == 1
    split = instances.split_by_borders(objects, borders, 4)
    assert split.max() == 2 and instances.object_scores(truth, split)["score"] > 0.9
    faint = instances.split_by_borders(objects, 0.6 * borders, 4)        # a border probability, not a mask
    assert faint.max() == 2


def test_small_objects_are_dropped_and_the_rest_renumbered():
    mask = boxes((0, 1, 0, 2), (10, 20, 10, 20)) > 0                      # a 2-pixel speck and a 100-pixel box
    labels = instances.components(mask, 4)
    assert labels.max() == 1 and (labels == 1).sum() == 100
    assert instances.object_sizes(labels) == (1, 100.0, 100.0) and instances.object_sizes(labels * 0) == (0, 0.0, 0.0)


def test_instance_label_files_are_checked(tmp_path):
    cv2.imwrite(str(tmp_path / "ok.png"), np.array([[0, 7], [7, 300]], np.uint16))
    assert read_instances(str(tmp_path / "ok.png"), (2, 2)).tolist() == [[0, 1], [1, 2]]   # renumbered 1..N
    cv2.imwrite(str(tmp_path / "rgb.png"), np.zeros((2, 2, 3), np.uint8))
    with pytest.raises(UserError, match="rgb.png has 3 channels; label images must be single-channel"):
        read_instances(str(tmp_path / "rgb.png"), (2, 2))
    with pytest.raises(UserError, match="ok.png is 2x2 but its image is 3x2"):
        read_instances(str(tmp_path / "ok.png"), (2, 3))


def nuclei_set(root, n=10):
    """A one-class data set of touching disc pairs, with instances/ (one label per disc)."""
    rng = np.random.default_rng(0)
    for folder in ("images", "masks/0", "instances"):
        os.makedirs(root / folder, exist_ok=True)
    for k in range(n):
        y, x = rng.integers(22, 42, 2)
        mask, labels = discs([(y, x - 9), (y, x + 9)], 10)
        image = np.where(mask[..., None] > 0, 200, 30).astype(np.uint8) + rng.integers(0, 20, (64, 64, 3), dtype=np.uint8)
        cv2.imwrite(str(root / "images" / f"n{k}.png"), image)
        cv2.imwrite(str(root / "masks" / "0" / f"n{k}.png"), mask * 255)
        cv2.imwrite(str(root / "instances" / f"n{k}.png"), labels.astype(np.uint16))
    return root


def test_data_set_reads_its_instances_folder_or_falls_back_to_components(tmp_path):
    root = nuclei_set(tmp_path / "nuclei", n=3)
    data = SegmentationData.from_folder(str(root), ".png", ".png", 1, 3)
    assert data.instances(0).max() == 2 and data.subset(data.ids[1:]).instances(0).max() == 2
    os.remove(root / "instances" / "n1.png")
    with pytest.raises(UserError, match="have no label image in .*instances: n1"):
        SegmentationData.from_folder(str(root), ".png", ".png", 1, 3)
    os.rename(root / "instances", root / "elsewhere")
    assert SegmentationData.from_folder(str(root), ".png", ".png", 1, 3).instances(0).max() == 1   # one blob


@pytest.mark.e2e
def test_val_instances_writes_labels_counts_and_scores(tmp_path, monkeypatch, capsys):
    nuclei_set(tmp_path / "inputs" / "nuclei")
    argv = ["--dataset", "nuclei", "--arch", "UNet", "--base_channels", "8", "--epochs", "1", "-b", "4", "--input_w", "32", "--input_h", "32",
            "--device", "cpu", "--optimizer", "Adam", "--name", "n"]
    code, _, err = run_main(train.main, argv, tmp_path, monkeypatch, capsys)
    assert code == 0, err
    code, out, err = run_main(val.main, ["--name", "n", "--instances"], tmp_path, monkeypatch, capsys)
    assert code == 0, err
    assert "object score (Data Science Bowl)" in out and "AP at IoU 0.5" in out and "F1 at IoU 0.5" in out and "counting error" in out
    outputs = tmp_path / "outputs" / "n"
    metrics = list(csv.DictReader(open(outputs / "metrics.csv")))
    objects = list(csv.DictReader(open(outputs / "objects.csv")))
    assert [m["id"] for m in metrics] == [o["id"] for o in objects] and len(metrics) == 2
    assert all(m["true_count"] == "2" for m in metrics)                  # from instances/, not the one blob per mask
    for o in objects:
        labels = cv2.imread(str(outputs / "instances" / (o["id"] + ".png")), cv2.IMREAD_UNCHANGED)
        assert labels.dtype == np.uint16 and labels.shape == (64, 64)    # 16-bit, at the image's size
        assert int(o["count"]) == labels.max() and set(np.unique(labels)) == set(range(labels.min(), labels.max() + 1))
    code, _, err = run_main(val.main, ["--name", "n", "--instances", "--min_size", "0"], tmp_path, monkeypatch, capsys)
    assert code == 2 and "--min_size must be at least 1" in err


@pytest.mark.e2e
def test_instances_need_a_one_class_run(tmp_path, monkeypatch, capsys):
    make_data(tmp_path / "inputs", "two", num_classes=2)
    argv = ["--dataset", "two", "--num_classes", "2", "--arch", "UNet", "--base_channels", "8", "--epochs", "1", "-b", "4", "--input_w", "32",
            "--input_h", "32", "--device", "cpu", "--optimizer", "Adam", "--name", "two"]
    assert run_main(train.main, argv, tmp_path, monkeypatch, capsys)[0] == 0
    code, _, err = run_main(val.main, ["--name", "two", "--instances"], tmp_path, monkeypatch, capsys)
    assert code == 2 and "one-class run" in err


def test_each_object_is_measured_in_pixels_and_the_images_own_units():
    from instances import measure
    labels = np.zeros((40, 50), np.int64)
    yy, xx = np.mgrid[0:40, 0:50]
    labels[(yy - 20) ** 2 + (xx - 12) ** 2 <= 36] = 1                  # a disc of radius 6
    labels[30:34, 25:45] = 2                                            # a 4 x 20 bar
    image = np.zeros((40, 50, 2), np.uint16)
    image[labels == 1] = (1000, 10)
    image[labels == 2] = (3000, 30)
    disc, bar = measure(labels, image)
    assert (disc["object"], bar["object"]) == (1, 2)
    assert disc["area"] == (labels == 1).sum() and (disc["centroid_y"], disc["centroid_x"]) == (20.0, 12.0)
    assert (bar["bbox_top"], bar["bbox_left"], bar["bbox_bottom"], bar["bbox_right"], bar["area"]) == (30, 25, 34, 45, 80)
    # the ellipse of the same second moments: a circle for the disc; for the bar, variances (20² - 1) / 12 along it
    # and (4² - 1) / 12 across, so sqrt(1 - 1.25 / 33.25)
    assert disc["eccentricity"] == pytest.approx(0, abs=1e-3) and bar["eccentricity"] == pytest.approx(
        (1 - 1.25 / 33.25) ** 0.5, abs=1e-3)
    assert (disc["mean_intensity_0"], disc["mean_intensity_1"], bar["mean_intensity_0"]) == (1000, 10, 3000)
    assert measure(np.zeros((5, 5), np.int64), np.zeros((5, 5, 1))) == []


@pytest.mark.e2e
def test_target_objects_trains_objects_and_borders_and_val_seeds_objects_from_the_bodies(tmp_path, monkeypatch,
                                                                                        capsys):
    nuclei_set(tmp_path / "inputs" / "nuclei")
    argv = ["--dataset", "nuclei", "--arch", "UNet", "--base_channels", "8", "--epochs", "1", "-b", "4", "--input_w",
            "32", "--input_h", "32", "--device", "cpu", "--optimizer", "Adam", "--name", "sep", "--target", "objects"]
    code, _, err = run_main(train.main, argv, tmp_path, monkeypatch, capsys)
    assert code == 0, err
    run = tmp_path / "models" / "sep"
    saved = yaml.safe_load(open(run / "config.yml"))
    assert (saved["target"], saved["num_classes"], saved["class_mode"]) == ("objects", 2, "sigmoid")
    assert saved["class_names"] == ["objects", "borders"] and saved["loss"] == "BorderWeightedLoss"
    assert json.load(open(run / "model.json"))["target"] == "objects"
    assert "iou_1" in open(run / "log.csv").readline()                  # the borders plane is trained and scored
    code, out, err = run_main(val.main, ["--name", "sep", "--instances"], tmp_path, monkeypatch, capsys)
    assert code == 0, err
    assert "objects (watershed, lowered along the predicted borders" in out
    outputs = tmp_path / "outputs" / "sep"
    assert sorted(os.listdir(outputs / "1")) == sorted(os.listdir(outputs / "0"))   # a borders mask per image
    metrics = list(csv.DictReader(open(outputs / "metrics.csv")))
    assert len(metrics) == 2 and all(m["true_count"] == "2" for m in metrics) and "iou_1" in metrics[0]
    assert len(list(csv.DictReader(open(outputs / "objects.csv")))) == 2


def test_target_objects_needs_label_images_and_its_two_planes(tmp_path, monkeypatch, capsys):
    root = nuclei_set(tmp_path / "inputs" / "nuclei", n=4)
    base = ["--dataset", "nuclei", "--epochs", "1", "--device", "cpu", "--target", "objects"]
    code, _, err = run_main(train.main, base + ["--num_classes", "3"], tmp_path, monkeypatch, capsys)
    assert code == 2 and "target objects trains 2 sigmoid planes (objects, borders)" in err and "num_classes 3" in err
    code, _, err = run_main(train.main, base + ["--class_mode", "softmax", "--loss", "CEDiceLoss"], tmp_path,
                            monkeypatch, capsys)
    assert code == 2 and "class_mode softmax" in err
    code, _, err = run_main(train.main, base[:-2] + ["--loss", "BorderWeightedLoss"], tmp_path, monkeypatch, capsys)
    assert code == 2 and "loss BorderWeightedLoss weighs the border plane of --target objects" in err
    os.rename(root / "instances", root / "elsewhere")
    code, _, err = run_main(train.main, base, tmp_path, monkeypatch, capsys)
    assert code == 2 and "has no label images (labels/ or instances/)" in err and "--target masks" in err
    assert "Traceback" not in err and not os.path.exists(tmp_path / "models")


def test_an_ensemble_of_an_objects_run_and_a_masks_run_is_refused():
    from types import SimpleNamespace
    cfg = {"num_classes": 2, "class_mode": "sigmoid", "input_channels": 3, "invert_mask": False}
    masks = SimpleNamespace(name="two_classes", cfg={**cfg, "target": "masks"})
    objects = SimpleNamespace(name="sep", cfg={**cfg, "target": "objects"})
    val.check_ensemble([objects, SimpleNamespace(name="sep2", cfg=dict(objects.cfg))])     # alike: accepted
    with pytest.raises(UserError, match="runs sep and two_classes differ in target"):
        val.check_ensemble([objects, masks])
    inverted = SimpleNamespace(name="inv", cfg={**masks.cfg, "invert_mask": True})   # predicts the complement
    with pytest.raises(UserError, match="runs two_classes and inv differ in invert_mask"):
        val.check_ensemble([masks, inverted])


def test_the_borders_plane_has_its_own_threshold_and_other_runs_one_for_all():
    from predict import BORDER_THRESHOLD, class_thresholds, objects_method, to_prediction
    objects, masks = {"target": "objects", "class_mode": "sigmoid"}, {"target": "masks", "class_mode": "sigmoid"}
    assert class_thresholds(masks, 0.4, 0.1) == 0.4
    assert class_thresholds(objects, 0.4, 0.1) == (0.4, 0.1)
    assert class_thresholds(objects, 0.5) == (0.5, BORDER_THRESHOLD)
    probs = torch.tensor([0.45, 0.45]).view(1, 2, 1, 1).expand(1, 2, 2, 3)
    pred = to_prediction(probs, objects, (0.5, 0.3))
    assert pred[0, 0].sum() == 0 and pred[0, 1].sum() == 6                # the same probability, two answers
    assert "lowered along the predicted borders" in objects_method(objects, "watershed")
    assert objects_method(masks, "watershed") == "watershed"
