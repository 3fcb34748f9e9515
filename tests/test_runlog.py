"""runlog.py: log.csv columns and rows, curves.png."""
import csv

import cv2

from runlog import COLUMNS, curves_figure, plot_curves, write_log


def rows(n):
    return [{"epoch": e, "lr": 1e-3, "loss": 1 / e, "iou": 0.1 * e, "val_loss": 1.1 / e, "val_iou": 0.09 * e,
             "val_dice": 0.12 * e, "seconds": 1.5} for e in range(1, n + 1)]


def test_write_log_rewrites_the_whole_file(tmp_path):
    path = str(tmp_path / "log.csv")
    write_log(path, rows(3))
    write_log(path, rows(2))                          # a resumed run rewrites from its own rows
    with open(path) as f:
        read = list(csv.DictReader(f))
    assert list(read[0]) == COLUMNS and [r["epoch"] for r in read] == ["1", "2"]
    assert float(read[1]["val_iou"]) == 0.18


def test_plot_curves_writes_a_png(tmp_path):
    path = str(tmp_path / "curves.png")
    plot_curves(path, rows(4))
    image = cv2.imread(path)
    assert image is not None and image.shape[0] > 100 and image.shape[1] > 200
    assert sorted(p.name for p in tmp_path.iterdir()) == ["curves.png"]


def test_curves_show_each_classs_validation_iou_labelled_with_its_name():
    multi = [{**r, "val_iou_0": 0.05 * r["epoch"], "val_iou_1": 0.1 * r["epoch"]} for r in rows(3)]
    labels = curves_figure(multi, ["nucleus", "membrane"]).axes[1].get_legend_handles_labels()[1]
    assert "validation, class nucleus" in labels and "validation, class membrane" in labels
    labels = curves_figure(multi).axes[1].get_legend_handles_labels()[1]
    assert "validation, class 0" in labels and "validation, class 1" in labels
    assert not any("class" in lab for lab in curves_figure(rows(3)).axes[1].get_legend_handles_labels()[1])
