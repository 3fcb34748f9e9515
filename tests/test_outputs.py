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
from conftest import make_data, run_main
from metrics import SegMeter
from outputs import RECORD, OutputFolder, check_place, run_folders
from utils import UserError


def test_a_folder_inside_or_equal_to_a_protected_one_is_refused(tmp_path):
    data = tmp_path / "inputs" / "cells"
    (data / "masks" / "0").mkdir(parents=True)
    protected = [(str(data), "the data set")]
    for bad in (data, data / "masks", data / "masks" / "0", tmp_path / "inputs" / "x" / ".." / "cells"):
        with pytest.raises(UserError, match=f"^--output {bad} is inside .*the data set"):
            check_place(str(bad), f"--output {bad}", "val.py", "", protected)
    os.symlink(data, tmp_path / "alias")                  # a link to the data set is the data set
    with pytest.raises(UserError, match="inside"):
        check_place(str(tmp_path / "alias" / "masks"), "--output", "val.py", "", protected)
    check_place(str(tmp_path / "outputs" / "cells"), "--output", "val.py", "", protected)      # beside it: fine
    check_place(str(tmp_path / "inputs"), "--output", "val.py", "", protected)  # holding it: fine (only recorded files go)


def users_folders(root):
    """A data set, a run folder (its model.pth a folder: still a run), the runs folder and an export under root;
    -> {case: (path a script is asked to write, the folder the guard names, what it says that folder holds)}."""
    cells = make_data(root / "inputs", "cells", n=2)
    os.remove(os.path.join(cells, ".made_by_make_demo_data"))          # a user's data set
    run = root / "models" / "old"
    (run / "model.pth").mkdir(parents=True)
    (run / "config.yml").write_text("arch: UNet\n")
    export = root / "exports" / "theirs"
    export.mkdir(parents=True)
    (export / outputs.EXPORT_MARKER).write_text(f"exported from {run}\n")
    (export / "model.pth").write_bytes(b"weights")                      # an export holds model.pth too
    images, masks = os.path.join(cells, "images"), os.path.join(cells, "masks", "0")
    return {"data set": (cells, cells, "a data set"), "its images": (images, cells, "a data set"),
            "its masks": (masks, cells, "a data set"), "run": (str(run), str(run), "a run folder"),
            "in a run": (str(run / "sub"), str(run), "a run folder"),
            "runs folder": (str(root / "models"), str(root / "models"), outputs.RUNS),
            "export": (str(export), str(export), "an export"), "in an export": (str(export / "x"), str(export),
                                                                                 "an export")}


def test_one_guard_knows_every_folder_that_holds_a_users_files(tmp_path, monkeypatch):
    root = tmp_path / "work"
    folders = users_folders(root)
    monkeypatch.chdir(root)
    for case, (path, named, holds) in folders.items():
        with pytest.raises(UserError) as e:
            check_place(path, f"--flag {path}", "a script", "Pass another --flag")
        assert str(e.value).startswith(f"--flag {path} is inside {os.path.realpath(named)}, which holds {holds}; "
                                       "a script does not write") and str(e.value).endswith("Pass another --flag"), case
    check_place(str(root / "models" / "new"), "--flag", "train.py", "")       # a new run in the runs folder: fine
    check_place(str(root / "outputs" / "x"), "--flag", "val.py", "")
    check_place(str(root / "models" / "old"), "--flag", "train.py", "", own={"models/old": "a run folder"})
    check_place(str(root / "exports" / "theirs"), "--flag", "export.py", "", own={"exports/theirs": "an export"})
    with pytest.raises(UserError, match="which holds a data set"):      # own: only what the script itself writes
        check_place(folders["data set"][0], "--flag", "train.py", "", own={folders["data set"][0]: "a run folder"})
    with pytest.raises(UserError, match="which holds a run folder"):    # ... and only there, not above
        check_place(str(root / "models" / "old" / "x"), "--flag", "train.py", "", own={"models/old/x": "a run folder"})


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


def tree(root):
    """{relative path: file bytes or None for a folder} of everything under root."""
    found = {}
    for d, dirs, files in os.walk(root):
        found.update({os.path.relpath(os.path.join(d, x), root): None for x in dirs})
        found.update({os.path.relpath(os.path.join(d, f), root): open(os.path.join(d, f), "rb").read() for f in files})
    return found


@pytest.mark.parametrize("script", ["make_demo_data", "preprocess_dsb2018", "compare"])
def test_every_script_refuses_to_write_among_a_users_files(tmp_path, monkeypatch, capsys, script):
    """make_demo_data.py --out, preprocess_dsb2018.py --out and compare.py --plot into a data set, its images/ or
    masks/, a run folder, the runs folder or an export: one message naming the flag and the folder, nothing written
    (preprocess wrote images/, masks/ and instances/ into a run folder and the runs folder)."""
    from test_preprocess import make_stage1
    main = __import__(script).main
    root = tmp_path / "work"
    folders = users_folders(root)
    make_stage1(tmp_path / "stage1", n=1)
    monkeypatch.delenv("UNET_RUNS_DIR", raising=False)
    for case, (path, named, holds) in folders.items():
        target = os.path.relpath(path, root)
        flag, value = ("--plot", os.path.join(target, "runs.png")) if script == "compare" else ("--out", target)
        argv = [flag, value] + (["--src", str(tmp_path / "stage1")] if script == "preprocess_dsb2018" else [])
        before = tree(root)
        code, out, err = run_main(main, argv, root, monkeypatch, capsys)
        assert tree(root) == before, case
        if case == "data set" and script != "compare":      # a data set is what they write: not one they did not
            assert code == 2 and f"--out {value} already holds images/, masks/ that this script did not write" in err
            continue
        assert code == 2 and err.startswith(f"error: {flag} {value} is inside ") and err.count("\n") == 1, (case, err)
        if script == "compare" and case == "runs folder":       # the runs folder it reads: a plot among them too
            assert "is inside models (the runs folder); compare.py does not write" in err, (case, err)
        else:
            assert f"is inside {os.path.realpath(named)}, which holds {holds}; {script}.py does not write" in err, case
