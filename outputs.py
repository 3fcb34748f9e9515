"""Everything val.py writes, in one place: the output folder (guarded, locked, its last files replaced), the layout
of its files, masks, probability maps, object labels, overlays and panels, the CSVs, and the closing summary of what
was written.

The folder:

- Refused: a folder that is, or is inside, a data set (the one val.py reads and the runs' own, or any other), a
  run folder, an export or the runs folder itself; and an output subfolder that is a symbolic link (its files
  would land in, and be removed from, the link's target). That guard, check_place(), is every script's: train.py's
  run folder, export.py's --output, preprocess_dsb2018.py's and make_demo_data.py's --out, bench.py's --out and
  compare.py's --plot pass it too.
- Locked while val.py writes it (<output>/.lock, as a run folder is while it trains): a second evaluation into
  the same folder is refused instead of interleaving its files with the first's.
- Recorded: the files an evaluation will write are listed in <output>/.val_files before any is written; the
  next evaluation into the folder removes exactly those (so a smaller data set leaves no stale masks), and
  nothing else: a file the user put there, or one written by a version before the record, stays.
"""
import csv
import io
import math
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import cv2
import numpy as np

import rundir
from figures import display_image, legend, outline_overlay, panel
from instances import MEASUREMENTS, measure, object_scores, object_sizes
from utils import UserError, atomic_write, write_png, write_tiff

RECORD = ".val_files"
OUTPUTS_DIR = "outputs"   # val.py writes under outputs/<name> by default; compare.py reads metrics.csv there


def inside(path, folder):
    """Whether path is folder or lies under it (both resolved: links and '..' cannot hide it)."""
    path, folder = os.path.realpath(path), os.path.realpath(folder)
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def run_folders(runs_dir):
    """Every run in the runs folder (a folder with config.yml or model.pth), then the runs folder itself (unless it
    holds the current folder, as `--runs_dir .` does: then only its runs)."""
    found = []
    for name in sorted(os.listdir(runs_dir)) if os.path.isdir(runs_dir) else []:
        path = os.path.join(runs_dir, name)
        if rundir.RunFolder(path).is_run():
            found.append((path, f"the run folder of {name}"))
    return found + ([] if inside(os.getcwd(), runs_dir) else [(runs_dir, "the runs folder")])


EXPORT_MARKER = ".unet_toolkit_export"   # in a folder export.py writes (export.py's MARKER)
TARGET_FOLDERS = ("masks", "labels", "instances")   # beside images/, what makes a folder a labelled data set
RUNS = "run folders"      # what a folder that holds runs holds (what_it_holds of a write's own folder)


def holds_runs(folder):
    """Whether a subfolder of folder is a run folder (folder is a runs folder, such as models/)."""
    try:
        with os.scandir(folder) as entries:
            return any(e.is_dir() and rundir.RunFolder(e.path).is_run() for e in entries)
    except OSError:
        return False


def what_it_holds(folder, itself=False):
    """'a data set' (images/ beside masks/, labels/ or instances/), 'an export' (export.py's marker), 'a run folder'
    (config.yml or model.pth, even broken), or None: a folder whose files a toolkit script must not write among.
    itself: the folder a script writes into (not one above it), which must not hold run folders either (RUNS): files
    written there would lie among the runs."""
    if os.path.isdir(os.path.join(folder, "images")) and any(os.path.isdir(os.path.join(folder, t))
                                                               for t in TARGET_FOLDERS):
        return "a data set"
    if os.path.isfile(os.path.join(folder, EXPORT_MARKER)):
        return "an export"                       # before the run folder: an export holds model.pth too
    if any(os.path.lexists(os.path.join(folder, f)) for f in rundir.MARKS_A_RUN):
        return "a run folder"
    return RUNS if itself and holds_runs(folder) else None


def guarded_ancestor(path, own=None):
    """(folder, what it holds) for the first of path and its parents that holds a data set, a run or an export
    (path itself: or run folders), whoever made it; None if none does. own {folder: what it holds}: what the script
    itself writes there (train.py's run folder, make_demo_data.py's data set), whose own rules say whether it is
    replaced. Folders that hold the current folder are where the user works and are not guarded."""
    path, cwd = os.path.realpath(path), os.getcwd()
    own = {os.path.realpath(k): v for k, v in (own or {}).items()}
    itself = True
    while True:
        if os.path.isdir(path) and not inside(cwd, path):
            held = what_it_holds(path, itself)
            if held and own.get(path) != held:
                return path, held
        parent, itself = os.path.dirname(path), False
        if parent == path:
            return None
        path = parent


def check_place(path, named, script, fix, protected=(), own=None):
    """The one guard of every folder or file a script writes (val.py's and export.py's --output, train.py's run
    folder, the data sets of preprocess_dsb2018.py and make_demo_data.py, bench.py's --out, compare.py's --plot).
    A UserError that starts with `named` (the flag and its value) when path is one of `protected` [(folder, what it
    is)] or inside one, or when it or a folder above it holds a data set, a run folder or an export, or it holds run
    folders (guarded_ancestor; own: what the script itself may find there). fix: what to pass instead."""
    found = guarded_ancestor(path, own)
    depth = len(found[0]) if found else -1
    for folder, what in sorted(protected, key=lambda p: -len(os.path.realpath(p[0]))):   # the nearest one named
        if inside(path, folder) and len(os.path.realpath(folder)) >= depth:
            raise UserError(f"{named} is inside {folder} ({what}); {script} does not write among the files it reads "
                            f"or a run's files. {fix}")
    if found:
        raise UserError(f"{named} is inside {found[0]}, which holds {found[1]}; {script} does not write among a data "
                        f"set's, a run's or an export's files, or beside the runs of a runs folder. {fix}")


def safe_relative(rel):
    return rel and not os.path.isabs(rel) and ".." not in rel.split("/")


class OutputFolder:
    """with OutputFolder(out_dir, protected, subfolders) as out: checked, locked, last evaluation's files removed;
    out.record(relative paths) before writing them."""

    def __init__(self, out_dir, protected, subfolders):
        self.dir, self.protected, self.subfolders = out_dir, protected, subfolders
        self.lock = rundir.RunLock(out_dir, True, doing="written by another val.py",
                                   fix="pass another --output")

    def __enter__(self):
        check_place(self.dir, f"--output {self.dir}", "val.py", "Pass --output to a folder of its own (the default "
                    "is outputs/<name>/)", self.protected)
        for sub in self.subfolders:
            path = os.path.join(self.dir, sub)
            if any(os.path.islink(p) for p in (path, os.path.dirname(path)) if p != self.dir):
                raise UserError(f"{path} is a symbolic link; val.py does not write (or remove files) through links. "
                                "Remove the link or pass --output to another folder")
        try:
            os.makedirs(self.dir, exist_ok=True)
            self.lock.__enter__()
        except OSError as e:
            raise self.unwritable(e) from None
        try:
            self.clear()
            for sub in self.subfolders:
                os.makedirs(os.path.join(self.dir, sub), exist_ok=True)
        except OSError as e:
            self.lock.__exit__()
            raise self.unwritable(e) from None
        except BaseException:
            self.lock.__exit__()
            raise
        return self

    def unwritable(self, e):
        return UserError(f"cannot write the outputs in {self.dir}: {e.strerror or e}. Free space or make it "
                         "writable and run val.py again, or pass --output DIR")

    def __exit__(self, *exc):
        self.lock.__exit__()

    def clear(self):
        """Removes the files the last evaluation recorded (regular files or links, in real subfolders only)."""
        record = os.path.join(self.dir, RECORD)
        if not os.path.isfile(record):
            return
        root = os.path.realpath(self.dir)
        with open(record) as f:
            for rel in f.read().splitlines():
                path = os.path.join(self.dir, rel)
                if not safe_relative(rel) or os.path.realpath(os.path.dirname(path)) != \
                        os.path.join(root, os.path.dirname(rel)).rstrip(os.sep):
                    continue                          # outside the folder, or through a link: not ours to remove
                if os.path.islink(path) or os.path.isfile(path):
                    os.remove(path)
        os.remove(record)

    def record(self, relpaths):
        """Lists the files about to be written (relative to the folder), so the next evaluation removes them."""
        atomic_write(os.path.join(self.dir, RECORD), lambda f: f.write("".join(p + "\n" for p in relpaths)))


OUTPUT_FORMATS = ("png", "tif")    # val.py --output_format
LABELS_16BIT_MAX = int(np.iinfo(np.uint16).max)   # objects in one image a 16-bit label image holds; 32-bit TIFF past it
WRITER_THREADS = 4   # PNG encoding releases the GIL: a few threads write while the network predicts
REPORTS = ("metrics.csv", "objects.csv", "object_measurements.csv")
OBJECT_COLUMNS = ["object_score", "ap_50", "f1_50", "true_count", "pred_count", "count_error"]


@dataclass(frozen=True)
class OutputOptions:
    """What val.py writes besides the masks (its output flags)."""
    output_format: str = "png"    # masks, probability maps and labels as png or tif
    save_probs: bool = False      # probability maps in probs/<class>/
    overlay: bool = False         # outlines drawn on the images, overlay/
    panels: bool = False          # a figure per image, panels/
    instances: bool = False       # object labels, instances/ (and objects.csv, object_measurements.csv)


def subfolders(num_classes, opts):
    """The subfolders of the output folder that the images' files go into."""
    classes = [str(c) for c in range(num_classes)]
    return (classes + ([f"probs/{c}" for c in classes] if opts.save_probs else []) +
            (["overlay"] if opts.overlay else []) + (["panels"] if opts.panels else []) +
            (["instances"] if opts.instances else []))


def files(ids, num_classes, opts):
    """Every file an evaluation of these images may write, relative to the output folder."""
    ext = "." + opts.output_format
    found = []
    for i in ids:
        for c in range(num_classes):
            found += [f"{c}/{i}{ext}"] + ([f"probs/{c}/{i}{ext}"] if opts.save_probs else [])
        found += ([f"overlay/{i}.png"] if opts.overlay else []) + ([f"instances/{i}.png", f"instances/{i}.tif"]
                                                                     if opts.instances else [])
        found += [f"panels/{i}.png"] if opts.panels else []
    return found + list(REPORTS)


def write_image_files(out_dir, result, truth, opts, objects=None):
    """Binary masks per class (0/255, 8-bit), and optionally probability maps, an outline overlay and a panel, as PNG
    or (output_format 'tif') TIFF, where probabilities are float32 instead of 8-bit. The overlay and the panel,
    pictures for a person, are always PNG. truth: (C, H, W) 0/1 or None; objects: with instances, (predicted labels,
    true labels or None)."""
    pred, probs, image, img_id, cfg = result.mask, result.probs, result.image, result.id, result.cfg
    tif = opts.output_format == "tif"
    for c in range(pred.shape[0]):
        mask = (pred[c] * 255).astype(np.uint8)
        if tif:
            write_tiff(os.path.join(out_dir, str(c), img_id + ".tif"), mask, durable=False)
        else:
            write_png(os.path.join(out_dir, str(c), img_id + ".png"), mask, durable=False)
        if opts.save_probs and tif:
            write_tiff(os.path.join(out_dir, "probs", str(c), img_id + ".tif"), probs[c].astype(np.float32), durable=False)
        elif opts.save_probs:
            write_png(os.path.join(out_dir, "probs", str(c), img_id + ".png"),
                      np.round(probs[c] * 255).astype(np.uint8), durable=False)
    if opts.overlay:
        overlay = outline_overlay(image, pred, truth, cfg["class_mode"] == "softmax",
                                  None if objects is None else objects[0])
        write_png(os.path.join(out_dir, "overlay", img_id + ".png"), overlay, durable=False)
    if opts.panels:
        figure = panel(display_image(image), pred, truth, cfg["class_names"], cfg["class_mode"] == "softmax", objects)
        write_png(os.path.join(out_dir, "panels", img_id + ".png"), cv2.cvtColor(figure, cv2.COLOR_RGB2BGR),
                  durable=False)


def write_labels(out_dir, img_id, labels, fmt):
    """Object labels (H, W) -> instances/<id>.png (16-bit) or .tif (16-bit, or 32-bit past 65,535 objects; a PNG
    cannot hold more, so such an image is written as TIFF whatever the format) -> the file's name."""
    wide = labels.max() > LABELS_16BIT_MAX
    name = img_id + (".tif" if fmt == "tif" or wide else ".png")
    path = os.path.join(out_dir, "instances", name)
    if name.endswith(".tif"):
        write_tiff(path, labels.astype(np.uint32 if wide else np.uint16), durable=False)
    else:
        write_png(path, labels.astype(np.uint16), durable=False)
    return name


def write_image(out_dir, result, truth, true_labels, opts):
    """Everything after the network for one image (run in a writer thread): its files, and with instances its
    objects (instances/<id>.png or .tif) -> the image's row for objects.csv (with its objects' measurements,
    instances.measure, and with true_labels (a callable giving them, or None) the object scores), or None."""
    if not opts.instances:
        write_image_files(out_dir, result, truth, opts)
        return None
    labels = result.labels                                                               # (H, W) int32
    true = true_labels() if true_labels is not None else None
    write_image_files(out_dir, result, truth, opts, (labels, true))
    write_labels(out_dir, result.id, labels, opts.output_format)
    count, mean_area, median_area = object_sizes(labels)
    row = {"id": result.id, "count": count, "mean_area": round(mean_area, 2), "median_area": median_area,
           "measurements": [{"id": result.id, **m} for m in measure(labels, result.image)]}
    if true is not None:
        row.update(object_scores(true, labels))
    return row


class ImageWriter:
    """with ImageWriter(out_dir, opts) as writer: writer.submit(result, truth, true_labels) per image; the files are
    encoded and written by a few threads while the next batch is predicted. writer.rows(): the objects.csv rows, in
    order (a failed write raises there)."""

    def __init__(self, out_dir, opts):
        self.out_dir, self.opts, self.pending = out_dir, opts, []
        self.pool = ThreadPoolExecutor(WRITER_THREADS)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.pool.shutdown(wait=True)

    def submit(self, result, truth=None, true_labels=None):
        self.pending.append(self.pool.submit(write_image, self.out_dir, result, truth, true_labels, self.opts))

    def rows(self):
        rows = [job.result() for job in self.pending]
        return rows if self.opts.instances else None


def write_csv(path, fieldnames, rows):
    """A CSV of dicts (keys beyond fieldnames ignored), written atomically."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=fieldnames, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write(path, lambda f: f.write(buffer.getvalue()))


def write_metrics(path, ids, iou, dice, objects=None):
    """metrics.csv: id, then iou_<c> and dice_<c> per class; with instances the object columns too. A score that is
    NaN (an image where neither the truth nor the prediction has the class: no score) is an empty cell."""
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    classes = range(iou.shape[1])
    writer.writerow(["id"] + [f"{m}_{c}" for c in classes for m in ("iou", "dice")] + (OBJECT_COLUMNS if objects else []))
    for n, img_id in enumerate(ids):
        extra = [objects[n]["score"]] + [objects[n][k] for k in OBJECT_COLUMNS[1:]] if objects else []
        scores = [v[n, c].item() for c in classes for v in (iou, dice)]
        writer.writerow([img_id] + ["" if math.isnan(x) else f"{x:.6f}" for x in scores] +
                        [f"{x:.6f}" if isinstance(x, float) else x for x in extra])
    atomic_write(path, lambda f: f.write(buffer.getvalue()))


def write_objects(out_dir, rows):
    """objects.csv: per image the object count, mean and median area (pixels, at the image's size); and
    object_measurements.csv: a row per object of every image (instances.measure's columns)."""
    write_csv(os.path.join(out_dir, "objects.csv"), ["id", "count", "mean_area", "median_area"], rows)
    objects = [m for r in rows for m in r["measurements"]]
    intensity = [k for k in (objects[0] if objects else {"mean_intensity": 0}) if k.startswith("mean_intensity")]
    write_csv(os.path.join(out_dir, "object_measurements.csv"), MEASUREMENTS + intensity, objects)


def summary(out_dir, n, cfg, opts, labeled, most_objects=0):
    """Where everything went (most_objects: the largest object count of an image, which decides the labels' depth)."""
    tif = opts.output_format == "tif"
    where = [f"{n} predicted masks in {out_dir}/<class>/" + (" (TIFF)" if tif else "")]
    if opts.save_probs:
        where.append(f"probability maps in {out_dir}/probs/<class>/ ({'float32 TIFF' if tif else '8-bit PNG'})")
    if opts.overlay:
        where.append(f"outlines in {out_dir}/overlay/ ({legend(cfg, labeled)})")
    if opts.panels:
        where.append(f"figures in {out_dir}/panels/ (" + ("image, ground truth, prediction, errors" if labeled else
                                                          "image, prediction") + ")")
    if opts.instances:
        depth = ("16-bit; 32-bit TIFF for images of more than 65,535 objects" if most_objects > LABELS_16BIT_MAX
                 else "16-bit")
        where.append(f"object labels in {out_dir}/instances/ ({'TIFF' if tif else 'PNG'}, {depth}), counts and areas in "
                     f"{out_dir}/objects.csv, each object's area, centroid, box, eccentricity and mean intensity in "
                     f"{out_dir}/object_measurements.csv")
    if labeled:
        where.append(f"per-image metrics in {out_dir}/metrics.csv")
    return "; ".join(where)
