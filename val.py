"""Evaluate trained runs on their validation split or on any labelled folder, or predict masks for new images.

    python val.py --name <exp>                    # its validation split: masks, metrics.csv, printed IoU/Dice
    python val.py --name <exp> --data DIR         # every image of a labelled folder (images/, masks/<class>/)
    python val.py --name <exp> --images DIR       # unlabelled images: masks only
    python val.py --name fold0 fold1 fold2 --tta  # an ensemble: the runs' probabilities averaged

Masks are written as <output>/<class>/<id>.png (binary 0/255) at each image's original size. The default
<output> is outputs/<name> (outputs/<name>/predictions for --images, outputs/<name>/on_<folder> for --data;
an ensemble's name is its runs' names joined by '+').
"""
import signal
import sys

if __name__ == "__main__":   # Ctrl-C or SIGTERM while the imports below load (seconds: torch) ends quietly
    signal.signal(signal.SIGINT, lambda *_: sys.exit(130))
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(130))

import argparse
import os
import warnings
from dataclasses import dataclass

import torch

import advice
import config
import rundir
from dataerror import worded
from dataset import SegmentationData, Targets
from figures import class_label
from evaluation import Scores, evaluate as evaluate_images
from imagefiles import read_image
from instances import METHODS
from outputs import OUTPUT_FORMATS, OUTPUTS_DIR, ImageWriter, OutputFolder, OutputOptions, files, run_folders, subfolders, summary, write_metrics, write_objects
from pairing import Sample, find_ids, scan
from predict import BORDER_THRESHOLD, PredictOptions, TrainedRun, how_predicted, objects_method
from splits import load_validation
from utils import ClosedPipeSafe, Interrupts, UserError, command, exit_on_user_error, plain_warning

EXAMPLES = """examples:
  python val.py --name dsb2018_96_UNet_woDS --overlay          # score the validation split, draw outlines
  python val.py --name cpu0 cpu1 cpu2 --tta                     # ensemble of three runs with test-time flips
  python val.py --name cells --data inputs/cells_batch2         # score another labelled folder
  python val.py --name cells --images new_images/ --tile        # predict unlabelled images at full resolution
"""


def parse_args(argv):
    p = argparse.ArgumentParser(description="Evaluate trained runs, or predict masks for new images.",
                                epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--name", required=True, nargs="+", metavar="NAME",
                   help="run name(s) under the runs folder; several: an ensemble (their probabilities averaged)")
    config.add_runs_dir(p)
    what = p.add_argument_group("what to predict (default: the run's validation split)")
    what.add_argument("--data", metavar="DIR", help="a labelled folder in the data layout (images/, masks/<class>/): "
                      "score every image in it")
    what.add_argument("--images", metavar="DIR", help="a folder of unlabelled images to predict")
    what.add_argument("--img_ext", help="extension of the images (default: the run's img_ext)")
    what.add_argument("--mask_ext", help="extension of the --data masks (default: the run's mask_ext)")
    how = p.add_argument_group("prediction")
    how.add_argument("--threshold", type=float, default=0.5, help="sigmoid probability above which a pixel is "
                     "foreground (default: 0.5)")
    how.add_argument("--border_threshold", type=float, default=None, help="a run trained with --target objects: "
                     f"probability above which a pixel of its borders plane is a border in the masks written and "
                     f"scored (default: {BORDER_THRESHOLD}; --instances uses the probabilities themselves)")
    how.add_argument("--tta", action="store_true", help="test-time augmentation: average over the eight flips and "
                     "quarter turns of a square input (four for a rectangular one)")
    how.add_argument("--tile", action="store_true", help="predict each image by overlapping tiles of the network's "
                     "input size (always on for runs trained with --crop; without it, an image is predicted whole "
                     "unless it is larger than 1 Mpx)")
    how.add_argument("--resize", action="store_true", help="resize each image to the network input and the masks "
                     "back, as the reference's val.py (loses large images' detail); default: the scale the run learned")
    how.add_argument("--overlap", type=float, default=0.5, help="tile overlap fraction with --tile (default: 0.5)")
    how.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default: auto)")
    how.add_argument("--batch_size", type=int, default=16, help="images per forward pass (default: 16)")
    out = p.add_argument_group("outputs")
    out.add_argument("--output", metavar="DIR", help="output folder (default: outputs/<name>/; with --images: "
                     "outputs/<name>/predictions/; with --data DIR: outputs/<name>/on_<DIR's name>/)")
    out.add_argument("--output_format", choices=OUTPUT_FORMATS, default="png",
                     help="file format of the masks, probability maps and object labels: png (the default; 8-bit "
                          "probabilities, 16-bit labels) or tif (TIFF: float32 probabilities, 16-bit labels or 32-bit "
                          "past 65,535 objects; what Fiji and napari open as images and label layers)")
    out.add_argument("--save_probs", action="store_true", help="also write probability maps to <output>/probs/ "
                     "(8-bit PNG, or float32 TIFF with --output_format tif)")
    out.add_argument("--instances", nargs="?", const="watershed", choices=METHODS, metavar="METHOD",
                     help="also split the predicted foreground into objects (nuclei): 16-bit labels in "
                          "<output>/instances/, counts and areas in objects.csv and, with masks, the Data Science "
                          "Bowl object score, AP and F1 at IoU 0.5 and the counting error. METHOD: watershed (the default: "
                          "separates touching nuclei) or components (connected components)")
    out.add_argument("--min_size", type=int, default=4, help="--instances: smallest object kept, in pixels at the "
                     "image's size; raise it with the objects' size (default: 4)")
    out.add_argument("--overlay", action="store_true", help="also write the images with outlines drawn on them to "
                     "<output>/overlay/: the prediction in green (one colour per class), the true mask in magenta")
    out.add_argument("--panels", action="store_true", help="also write a figure per image to <output>/panels/: the "
                     "image, the ground truth, the prediction and the errors (false positives red, false negatives "
                     "blue), class colours and names in a legend; with --instances each object outlined")
    args = p.parse_args(argv)
    check_args(p, args)
    return Request(
        names=tuple(args.name), runs_dir=config.runs_dir(args.runs_dir), device=args.device, data=args.data,
        images=args.images, img_ext=args.img_ext, mask_ext=args.mask_ext, output=args.output,
        predict=PredictOptions(batch_size=args.batch_size, tta=args.tta, tile=args.tile, overlap=args.overlap,
                               threshold=args.threshold, border_threshold=args.border_threshold,
                               instances=args.instances, min_size=args.min_size, resize=args.resize),
        write=OutputOptions(output_format=args.output_format, save_probs=args.save_probs, overlay=args.overlay,
                            panels=args.panels, instances=bool(args.instances)))


@dataclass(frozen=True)
class Request:
    """What val.py is asked to do, from its flags: which runs, which images, where the files go and how."""
    names: tuple                  # the runs (several: an ensemble)
    runs_dir: str
    device: str
    data: str = None              # a labelled folder to score
    images: str = None            # a folder of unlabelled images
    img_ext: str = None           # None: the run's
    mask_ext: str = None
    output: str = None            # None: outputs/<name>/...
    predict: PredictOptions = PredictOptions()
    write: OutputOptions = OutputOptions()


def check_args(p, args):
    """The flag values parse_args' parser cannot check by type alone; p.error names the flag."""
    if not 0 < args.threshold < 1:
        p.error("--threshold must be between 0 and 1")
    if args.border_threshold is not None and not 0 < args.border_threshold < 1:
        p.error("--border_threshold must be between 0 and 1")
    if args.batch_size < 1:
        p.error("--batch_size must be at least 1")
    if not 0 <= args.overlap < 1:
        p.error("--overlap must be at least 0 and below 1")
    if args.tile and args.resize:
        p.error("--tile predicts images by tiles at the run's scale and --resize shrinks them to the network input: "
                "pass one of them")
    if args.data and args.images:
        p.error("--data scores a labelled folder and --images predicts unlabelled images: pass one of them")
    if args.min_size < 1:
        p.error("--min_size must be at least 1")
    if len(set(args.name)) < len(args.name):
        p.error("--name lists a run twice")


def check_ensemble(members):
    """The runs of an ensemble must predict the same classes from the same kind of image."""
    first = members[0]
    for m in members[1:]:
        for key in ("num_classes", "class_mode", "input_channels", "target", "invert_mask"):
            if m.cfg[key] != first.cfg[key]:
                raise UserError(f"--name: runs {first.name} and {m.name} differ in {key} ({first.cfg[key]} and "
                                f"{m.cfg[key]}), so their predictions cannot be averaged; ensemble runs trained "
                                "for the same classes and images")


def folder_fix(flag, folder):
    """The fix for a folder given to --data or --images that is not what it must be."""
    if flag == "--images":
        return "pass --images the folder that holds the image files"
    parent = os.path.dirname(os.path.normpath(folder))
    inside = os.path.basename(os.path.normpath(folder)) in ("images", "masks", "labels", "instances")
    like = f" (e.g. {command('--data', parent or '.')})" if inside and os.path.isdir(os.path.join(parent, "images")) else ""
    return f"pass --data the folder that holds images/ and masks/<class>/ (or labels/){like}"


def data_fix(error, cfg, name, given=None):
    """val.py's words for the change that fixes a data problem (dataerror.DataError), for the run `name` (its config
    cfg): its flags, and what the run takes. A run's target is what it trained on: no fix names it. given: the
    (flag, folder) of --data or --images, where the images come from, else None (the run's own data set)."""
    n, found = cfg["num_classes"], error.found
    return {
        "data": folder_fix(*given) if given else
                f"if the data set moved, edit data_dir in {name}'s config.yml, or pass --data DIR to score a "
                "labelled folder (images/, masks/<class>/) or --images DIR to predict unlabelled images",
        "img_ext": f"pass {command('--img_ext', found)}",
        "mask_ext": f"pass {command('--mask_ext', found)}",
        "input_channels": f"the run {name} was trained with input_channels {cfg['input_channels']} and takes only "
                          f"such images: convert them to grayscale, or train a run on them with "
                          f"{command('python', 'train.py', '--input_channels', found)} ...",
        "num_classes": f"the run {name} predicts {n} class(es), so a folder scored with it needs masks/0 .. "
                       f"masks/{n - 1}",
    }.get(error.setting, "")


def report_objects(rows, options, cfg):
    """The object scores over the data set: mean over images of the Bowl's score, of its AP and F1 at 0.5, and the
    mean absolute counting error."""
    mean = lambda key: sum(r[key] for r in rows) / len(rows)  # noqa: E731
    counts = f"{sum(r['true_count'] for r in rows)} true, {sum(r['pred_count'] for r in rows)} predicted objects"
    print(f"objects ({objects_method(cfg, options.instances)}, min_size {options.min_size}): object score (Data Science Bowl) "
          f"{mean('score'):.4f}, AP at IoU 0.5 {mean('ap_50'):.4f}, F1 at IoU 0.5 {mean('f1_50'):.4f}, "
          f"counting error {mean('count_error'):.2f} per image ({counts})")


def report(scores, ids, out_dir, cfg, objects=None, how="the prediction resized back to it", sizes=None):
    """Prints per class the data-set-level IoU/Dice at the images' own size and their per-image mean over the images
    where the truth or the prediction has the class (with their count; an image where neither has it says nothing
    of the class: metrics.csv leaves its cell empty), their mean over classes (and without class 0, the catch-all
    class in softmax mode), for a one-class run its complement's IoU (sizes: each image's (H, W)), then the IoU at
    the network input."""
    ds_iou, ds_dice = scores.image.dataset_scores()
    inter, psum, tsum = torch.cat(scores.image.per_image, 1)
    present = psum + tsum > 0                       # (N, C): the truth or the prediction has the class
    img_iou, img_dice = (torch.where(present, v, torch.nan) for v in scores.image.image_scores())
    write_metrics(os.path.join(out_dir, "metrics.csv"), ids, img_iou, img_dice, objects)
    iou_means, dice_means = img_iou.nanmean(0), img_dice.nanmean(0)   # NaN for a class no image has
    print(f"scored at each image's own size ({how}):")
    print(f"{'class':>10} {'IoU (data set)':>15} {'IoU (per-image mean)':>21} {'Dice (data set)':>16} {'Dice (per-image mean)':>22}")
    for c in range(ds_iou.shape[0]):
        label = class_label(cfg["class_names"], c)
        label = f"not {label}" if cfg.get("invert_mask") and not cfg["class_names"] else label
        n = int(present[:, c].sum())
        print(f"{label[:10]:>10} {ds_iou[c]:>15.4f} {mean_cell(iou_means[c], n):>21} {ds_dice[c]:>16.4f} "
              f"{mean_cell(dice_means[c], n):>22}")
    rows = [("mean", slice(None))]
    if cfg["class_mode"] == "softmax":
        rows.append(("mean w/o 0", slice(1, None)))      # class 0: the pixels no mask marks
    for label, cls in rows:
        print(f"{label:>10} {ds_iou[cls].mean():>15.4f} {mean_cell(iou_means[cls].nanmean()):>21} "
              f"{ds_dice[cls].mean():>16.4f} {mean_cell(dice_means[cls].nanmean()):>22}")
    if cfg["class_mode"] == "softmax":
        print("(softmax mode: each pixel is one class: class 0 holds the pixels no other class marks, and a pixel two "
              "masks mark is the higher class, as in training; 'mean w/o 0' is the mean over classes 1 and up)")
    print("(per-image mean: over the images where the truth or the prediction has the class, their count in brackets; "
          "an image where neither has it is left out, and its cell in metrics.csv is empty)")
    if ds_iou.shape[0] == 1 and cfg["target"] == "masks" and sizes:
        print(complement_line([x.sum().item() for x in (inter, psum, tsum)], sum(h * w for h, w in sizes), cfg))
    print(f"IoU: {ds_iou.mean():.4f}")
    print(f"Dice: {ds_dice.mean():.4f}")
    if scores.input is not None and scores.input_images == len(ids):     # every image was predicted at the input
        net_iou = scores.input.dataset_scores()[0].mean().item()
        print(f"IoU at the {cfg['input_w']}x{cfg['input_h']} network input (what train.py logs as val_iou): "
              f"{net_iou:.4f}")


def mean_cell(value, count=None):
    """A per-image mean as report()'s table shows it: '0.6123', with count '0.6123 (12)'; '-' when no image has the
    class (value NaN)."""
    if torch.isnan(value):
        return "-"
    return f"{value:.4f}" + (f" ({count})" if count is not None else "")


def complement_line(sums, pixels, cfg):
    """One-class runs: the data-set IoU and Dice of the class's complement (every pixel the class leaves out), from
    its summed counts (intersection, predicted, true pixels) over `pixels` pixels. With invert_mask the run's class
    is that complement already, and its complement is masks/0 as drawn."""
    inter, predicted, true = sums
    both_out, either_out = pixels - (predicted + true - inter), pixels - inter     # pixels outside both / either
    iou = both_out / either_out if either_out > 0 else 1.0
    dice = 2 * both_out / (2 * pixels - predicted - true) if 2 * pixels > predicted + true else 1.0
    share = 1 - true / max(1, pixels)
    if cfg.get("invert_mask"):
        return (f"invert_mask: this run learned the complement of the masks (the pixels they do not mark), so the masks "
                f"written and the scores above are of that complement; the masks' own class ({100 * share:.0f}% of the "
                f"pixels): IoU {iou:.4f}, Dice {dice:.4f} (data set)")
    hint = "; --invert_mask trains a run on it" if share < 1 - advice.MAJORITY else ""
    return (f"complement (the pixels the masks do not mark, {100 * share:.0f}% of them): IoU {iou:.4f}, Dice "
            f"{dice:.4f} (data set){hint}")


def unlabelled(req, cfg):
    """--images: every file with the image extension, and a note on the files skipped for another extension."""
    ext = req.img_ext or cfg["img_ext"]
    files = find_ids(req.images, ext)
    taken = set(files.values())
    others = sorted(f for f in os.listdir(req.images) if f not in taken and not f.startswith(".")
                    and os.path.isfile(os.path.join(req.images, f)))
    if others:
        suffixes = {os.path.splitext(f)[1] for f in others}
        exts = sorted(suffixes - {""})
        kinds = ", ".join(exts + (["no extension"] if "" in suffixes else []))
        # a file without an extension cannot be chosen by --img_ext: only the extensions found are suggested
        instead = f"; pass {command('--img_ext', exts[0])} to predict those instead" if exts else ""
        print(f"note: skipped {len(others)} file(s) in {req.images} that do not end in {ext} ({kinds}){instead}")
    samples = [Sample(os.path.join(req.images, f)) for f in files.values()]
    return SegmentationData(list(files), [read_image(s.image, cfg["input_channels"]) for s in samples], None, samples)


def load_data(req, members):
    """The images to predict -> (SegmentationData, default output folder)."""
    cfg = members[0].cfg
    label = "+".join(m.name for m in members)
    if req.images:
        return unlabelled(req, cfg), os.path.join(OUTPUTS_DIR, label, "predictions")
    if req.data:
        folder = os.path.normpath(req.data)
        targets = Targets.of(cfg)
        scanned = scan(folder, req.img_ext or cfg["img_ext"], req.mask_ext or cfg["mask_ext"], cfg["num_classes"],
                       objects=targets.objects)
        data = SegmentationData.decode(scanned, cfg["input_channels"], None, folder, targets=targets)
        return data, os.path.join(OUTPUTS_DIR, label, "on_" + os.path.basename(folder))
    recorded = [rundir.read_split(os.path.join(req.runs_dir, m.name)) for m in members]
    data, note = load_validation(cfg, recorded)
    if note:
        print(f"note: {note}")
    if len(members) > 1:
        print(f"ensemble of {', '.join(m.name for m in members)} (their probabilities averaged): evaluating on the "
              f"{len(data.ids)} images none of the {len(members)} runs trained on (to compare runs instead: "
              f"{command('python', 'compare.py', *(m.name for m in members), *config.runs_dir_words(req.runs_dir))})")
    return data, os.path.join(OUTPUTS_DIR, label)


def resize_notes(data, members, options):
    """A note on the images shrunk or stretched to the network input by more than advice.RESIZE_WARN (the rule
    train.py warns by), naming the worst: --tile predicts them at their own size instead."""
    cfg = members[0].cfg
    if options.tile or cfg["crop"] or not (options.resize or members[0].scale is None):
        return                  # images are predicted at the run's scale, not resized to its input
    sizes = data.sizes or [data.image(k).shape[:2] for k in range(len(data.ids))]
    effect = {"shrunk": "which loses small detail", "stretched": "so the network sees them magnified, made of "
              "interpolated pixels"}
    fix = ("without --resize, they are predicted at the scale the run learned" if options.resize else
           "pass --tile to predict images at their own size, in overlapping tiles (an image smaller than a tile is "
           "padded)")
    for how, images in advice.resized_images(data.ids, sizes, cfg).items():
        if images:
            print(f"note: {advice.resized_line(how, images, len(sizes), cfg)}, {effect[how]}; "
                  f"{advice.odd_ones(images, len(sizes))}{fix}")


def scale_note(members, options):
    """What val.py does with images of any size, when the run learned another scale than its images' own."""
    run = members[0]
    if options.resize or run.scale is None or tuple(run.scale) == (1.0, 1.0):
        return
    sy, sx = run.scale
    print(f"note: {run.name} learned images at {sx:.3g}x{sy:.3g} their network size (image pixels per network "
          f"pixel, x by y): each image is resized by that factor, predicted, and its masks resized back to it")


def depth_note(data, members):
    """A note when a run that normalises the reference's way (trained on 8-bit images) is given other images."""
    other = sorted(str(d) for d in data.dtypes if str(d) != "uint8")
    if other and any(m.norm.mode == "imagenet" for m in members):
        print(f"note: these images are {', '.join(other)}, and the run normalises the reference's way (normalize "
              "imagenet: divided by the type's full range, e.g. 65535), as it trained on 8-bit images; a run trained "
              "on such images (normalize auto or percentile) will predict them better")


def evaluate(req):
    members = [TrainedRun.load(name, req.device, req.runs_dir) for name in req.names]
    check_ensemble(members)
    cfg = members[0].cfg
    if req.predict.instances and cfg["target"] != "objects" and (cfg["num_classes"] > 1 or cfg["class_mode"] == "softmax"):
        raise UserError(f"--instances splits one class's mask into objects; the run {members[0].name} predicts "
                        f"{cfg['num_classes']} classes ({cfg['class_mode']}). Use it with a one-class run.")
    # a data problem met here, or while an image is read again during prediction, is worded with val.py's flags
    given = ("--data", req.data) if req.data else ("--images", req.images) if req.images else None
    with worded(lambda error: data_fix(error, cfg, members[0].name, given)):
        data, default_out = load_data(req, members)
        if req.images or req.data:
            resize_notes(data, members, req.predict)
            scale_note(members, req.predict)
            depth_note(data, members)
        out_dir, opts = req.output or default_out, req.write
        with OutputFolder(out_dir, protected_folders(req, members), subfolders(cfg["num_classes"], opts)) as out:
            try:
                out.record(files(data.ids, cfg["num_classes"], opts))
                predict_into(out_dir, members, data, req.predict, opts)
            except OSError as e:        # a full disk or a read-only folder, met by a writer thread or the reports
                raise out.unwritable(e) from None


def protected_folders(req, members):
    """[(folder, what it is)] that val.py must not write into: the data it reads, the runs' data sets, the runs."""
    found = [(req.data, "the labelled folder --data names")] if req.data else []
    found += [(req.images, "the folder --images names")] if req.images else []
    found += [(os.path.join(m.cfg["data_dir"], m.cfg["dataset"]), f"the data set run {m.name} trained on")
              for m in members]
    return found + run_folders(req.runs_dir)


def compare_with_trivial(meter, data, cfg):
    """The IoU of predicting background or foreground everywhere on these images, and a warning when the model
    does not beat the better of them by a margin."""
    if data.sizes is None:
        return
    baseline = advice.trivial(data.target_pixels, data.sizes, cfg["class_mode"])
    print(f"{baseline.line()} on these images")
    warning = advice.beats(meter.dataset_scores()[0].mean().item(), baseline)
    if warning:
        warnings.warn(warning, stacklevel=2)


def predict_into(out_dir, runs, data, options, opts):
    """Predicts and scores `data` into out_dir (checked, locked and cleared): files, metrics, objects, summary."""
    cfg = runs[0].cfg
    scores = Scores.new(runs)
    with ImageWriter(out_dir, opts) as writer:
        objects = evaluate_images(runs, data, options, writer, scores)
    if objects:
        write_objects(out_dir, objects)
    if data.labeled:
        report(scores, data.ids, out_dir, cfg, objects, how_predicted(runs, options), sizes=data.sizes)
        compare_with_trivial(scores.image, data, cfg)
    if objects and data.labeled:
        report_objects(objects, options, cfg)
    most = max((row["count"] for row in objects or ()), default=0)
    print(summary(out_dir, len(data.ids), cfg, opts, data.labeled, most))


def main(argv=None):
    Interrupts().install()        # SIGTERM (kill, a job scheduler) stops as Ctrl-C does: a message and exit 130
    warnings.formatwarning = plain_warning
    sys.stdout = ClosedPipeSafe(sys.stdout)
    try:
        with exit_on_user_error():
            evaluate(parse_args(argv))
    except KeyboardInterrupt:
        print("\ninterrupted: the outputs folder holds what was written so far; run val.py again for all of it",
              file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.default_int_handler)   # from here on, main() handles Ctrl-C and SIGTERM
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    main()
