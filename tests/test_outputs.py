"""outputs.py: val.py's output folder is never the user's data, is written by one evaluation at a time, and only
the files the last evaluation recorded are removed."""
import csv
import os
import subprocess
import sys

import pytest
import torch

import outputs
import rundir
from metrics import SegMeter
from outputs import RECORD, OutputFolder, check_place, run_folders
from utils import UserError


def test_a_folder_inside_or_equal_to_a_protected_one_is_refused(tmp_path):
    data = tmp_path / "inputs" / "cells"
    (data / "masks" / "0").mkdir(parents=True)
    protected = [(str(data), "the data set")]
    for bad in (data, data / "masks", data / "masks" / "0", tmp_path / "inputs" / "x" / ".." / "cells"):
        with pytest.raises(UserError, match="is inside .*the data set"):
            check_place(str(bad), protected)
    os.symlink(data, tmp_path / "alias")                  # a link to the data set is the data set
    with pytest.raises(UserError, match="inside"):
        check_place(str(tmp_path / "alias" / "masks"), protected)
    check_place(str(tmp_path / "outputs" / "cells"), protected)      # beside it: fine
    check_place(str(tmp_path / "inputs"), protected)                 # holding it: fine (only recorded files go)


def test_run_folders_are_the_runs_and_the_runs_folder(tmp_path, monkeypatch):
    runs = tmp_path / "models"
    (runs / "a").mkdir(parents=True)
    (runs / "a" / "config.yml").write_text("arch: UNet\n")
    (runs / "notes").mkdir()
    monkeypatch.chdir(tmp_path)
    assert [f for f, _ in run_folders(str(runs))] == [str(runs / "a"), str(runs)]
    monkeypatch.chdir(runs)                                   # --runs_dir .: only the runs themselves
    assert [f for f, _ in run_folders(".")] == ["./a"]


def test_only_the_recorded_files_are_removed_by_the_next_evaluation(tmp_path):
    out = tmp_path / "out"
    with OutputFolder(str(out), [], ["0", "overlay"]) as folder:
        folder.record(["0/a.png", "0/b.png", "overlay/a.png", "metrics.csv", "../escape.png"])
        for f in ("0/a.png", "0/b.png", "overlay/a.png", "metrics.csv"):
            (out / f).write_text("val")
    (out / "0" / "mine.png").write_text("the user's")           # put there by the user afterwards
    (tmp_path / "escape.png").write_text("outside")
    with OutputFolder(str(out), [], ["0"]) as folder:
        assert sorted(os.listdir(out / "0")) == ["mine.png"] and not (out / "metrics.csv").exists()
        assert os.listdir(out / "overlay") == [] and (tmp_path / "escape.png").exists()
        assert not (out / RECORD).exists()
        assert (out / rundir.LOCK).exists()                     # locked while it writes
    assert not (out / rundir.LOCK).exists()


def test_a_linked_subfolder_is_refused_and_its_target_untouched(tmp_path):
    target = tmp_path / "precious"
    target.mkdir()
    (target / "a.png").write_text("keep")
    out = tmp_path / "out"
    out.mkdir()
    os.symlink(target, out / "0")
    (out / RECORD).write_text("0/a.png\n")
    with pytest.raises(UserError, match="is a symbolic link"):
        with OutputFolder(str(out), [], ["0"]):
            pass
    assert (target / "a.png").read_text() == "keep"


def test_a_second_evaluation_into_a_folder_in_use_is_refused(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        import socket
        (out / rundir.LOCK).write_text(f"{sleeper.pid} {socket.gethostname()}\n")
        with pytest.raises(UserError, match=f"written by another val.py right now by process {sleeper.pid}.*--output"):
            with OutputFolder(str(out), [], ["0"]):
                pass
    finally:
        sleeper.kill()
        sleeper.wait()
    with OutputFolder(str(out), [], ["0"]):                      # its process gone: the lock is taken over
        pass


def test_write_metrics_has_a_row_per_image_and_columns_per_class(tmp_path):
    meter = SegMeter(2, torch.device("cpu"), keep_per_image=True)
    target = torch.zeros(2, 2, 4, 4)
    target[0, 0, :2] = 1
    pred = target.clone()
    pred[0, 0, 0] = 0                                    # image 0, class 0: 4 of 8 pixels found
    meter.update(pred, target)
    iou, dice = meter.image_scores()
    outputs.write_metrics(str(tmp_path / "metrics.csv"), ["a", "b"], iou, dice)
    rows = list(csv.DictReader(open(tmp_path / "metrics.csv")))
    assert list(rows[0]) == ["id", "iou_0", "dice_0", "iou_1", "dice_1"] and [r["id"] for r in rows] == ["a", "b"]
    assert float(rows[0]["iou_0"]) == 0.5 and float(rows[0]["dice_0"]) == pytest.approx(2 / 3, abs=1e-6)
    assert float(rows[1]["iou_0"]) == 1.0                # nothing to find and nothing found


def test_write_metrics_leaves_the_cell_of_a_score_that_is_not_there_empty(tmp_path):
    """report() passes NaN where neither the truth nor the prediction has the class: no score, so no number."""
    iou = torch.tensor([[0.5, float("nan")], [float("nan"), 1.0]])
    outputs.write_metrics(str(tmp_path / "metrics.csv"), ["a", "b"], iou, iou * 0.9)
    rows = list(csv.DictReader(open(tmp_path / "metrics.csv")))
    assert (rows[0]["iou_0"], rows[0]["iou_1"], rows[0]["dice_1"]) == ("0.500000", "", "")
    assert (rows[1]["iou_0"], rows[1]["dice_1"]) == ("", "0.900000")


def test_the_closing_line_says_32_bit_when_an_image_had_more_than_65535_objects():
    opts = outputs.OutputOptions(instances=True)
    cfg = {"num_classes": 1, "class_names": [], "class_mode": "sigmoid", "target": "masks"}
    assert "(PNG, 16-bit)" in outputs.summary("out", 3, cfg, opts, False, most_objects=65535)
    assert "32-bit TIFF for images of more than 65,535 objects" in outputs.summary("out", 3, cfg, opts, False,
                                                                                    most_objects=70000)
