"""Evaluate a trained run on its validation split, or predict masks for new images.

    python val.py --name <exp>                    # validation split: masks, metrics.csv, printed IoU/Dice
    python val.py --name <exp> --images DIR       # unlabeled images: masks only

Masks are written as outputs/<name>/<class>/<id>.png (binary 0/255) at each image's original size;
predictions for --images go to outputs/<name>/predictions/<class>/<id>.png unless --output says otherwise.
"""
import argparse
import csv
import io
import os
import sys
import warnings


import checkpoint
import config
import rundir
import runtime
from dataset import SegmentationData, find_ids, load_validation, read_image
from engine import build_network
from metrics import SegMeter
from predict import make_dirs, run_inference
from utils import ClosedPipeSafe, UserError, atomic_write, exit_on_user_error, plain_warning

OUTPUTS_DIR = "outputs"


def parse_args(argv):
    p = argparse.ArgumentParser(description="Evaluate a trained run, or predict masks for new images.")
    p.add_argument("--name", required=True, help="run name: models/<name>/")
    p.add_argument("--images", help="folder of unlabeled images to predict instead of the validation split")
    p.add_argument("--img_ext", help="extension of the --images files (default: the run's img_ext)")
    p.add_argument("--output", help="output folder (default outputs/<name>, or outputs/<name>/predictions with --images)")
    p.add_argument("--threshold", type=float, default=0.5, help="sigmoid probability above which a pixel is foreground")
    p.add_argument("--tta", action="store_true", help="average over horizontal and vertical flips")
    p.add_argument("--save_probs", action="store_true", help="also write 8-bit probability maps to <output>/probs/")
    p.add_argument("--overlay", action="store_true", help="also write images with the predicted outline to <output>/overlay/")
    p.add_argument("--tile", action="store_true",
                   help="predict whole images at full resolution by overlapping tiles of the network's input size "
                        "(always on for runs trained with --crop)")
    p.add_argument("--overlap", type=float, default=0.5, help="tile overlap fraction with --tile (default: 0.5)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default: auto)")
    p.add_argument("--batch_size", type=int, default=16, help="images per forward pass (default: 16)")
    args = p.parse_args(argv)
    if not 0 < args.threshold < 1:
        p.error("--threshold must be between 0 and 1")
    if args.batch_size < 1:
        p.error("--batch_size must be at least 1")
    if not 0 <= args.overlap < 1:
        p.error("--overlap must be at least 0 and below 1")
    return args


def load_run(name, device_name):
    """models/<name>/config.yml and model.pth -> (config, Runtime, model in eval mode on the Runtime's device).

    The Runtime predicts with the precision and memory format the run trained with."""
    run_dir = os.path.join(config.RUNS_DIR, name)
    model_path = os.path.join(run_dir, "model.pth")
    if not config.valid_name(name):
        raise UserError(f"--name {name!r} is not a run name (a folder name under {config.RUNS_DIR}/)")
    if not os.path.isdir(run_dir):
        runs = sorted(os.listdir(config.RUNS_DIR)) if os.path.isdir(config.RUNS_DIR) else []
        raise UserError(f"there is no run {run_dir}" + (f" (runs here: {', '.join(runs)})" if runs else "") +
                        f". Train it first: python train.py --name {name}")
    if not rundir.in_use(run_dir):
        rundir.repair(run_dir)      # an epoch whose files a kill cut short (model.pth, log.csv) is completed
    if not os.path.isfile(model_path):
        raise UserError(f"{model_path} does not exist: the run has not finished an epoch yet. "
                        f"Train it (python train.py --name {name} --resume) first.")
    saved, cfg_path = config.saved_config(run_dir)
    cfg = config.check(saved, cfg_path)
    rt = runtime.for_inference(device_name, cfg)
    model = build_network(cfg, rt)
    checkpoint.load_weights(model, checkpoint.load(model_path), model_path)
    return cfg, rt, model.eval()


def clear_outputs(out_dir, num_classes):
    """Removes what an earlier evaluation wrote in out_dir (masks, probability maps, overlays, metrics.csv), so
    that the folder holds this evaluation alone. Nothing else in it is touched."""
    folders = [str(c) for c in range(num_classes)] + [os.path.join("probs", str(c)) for c in range(num_classes)]
    for folder in folders + ["overlay"]:
        path = os.path.join(out_dir, folder)
        for f in os.listdir(path) if os.path.isdir(path) else []:
            if f.endswith(".png"):
                os.remove(os.path.join(path, f))
    if os.path.isfile(os.path.join(out_dir, "metrics.csv")):
        os.remove(os.path.join(out_dir, "metrics.csv"))


def write_metrics(path, ids, iou, dice):
    """metrics.csv: id, then iou_<c> and dice_<c> per class."""
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    classes = range(iou.shape[1])
    writer.writerow(["id"] + [f"{m}_{c}" for c in classes for m in ("iou", "dice")])
    for n, img_id in enumerate(ids):
        writer.writerow([img_id] + [f"{v[n, c].item():.6f}" for c in classes for v in (iou, dice)])
    atomic_write(path, lambda f: f.write(buffer.getvalue()))


def report(meter, ids, out_dir):
    """Prints per-class data-set-level and per-image-mean IoU/Dice and their mean over classes."""
    ds_iou, ds_dice = meter.dataset_scores()
    img_iou, img_dice = meter.image_scores()
    write_metrics(os.path.join(out_dir, "metrics.csv"), ids, img_iou, img_dice)
    print(f"{'class':>6} {'IoU (data set)':>15} {'IoU (per-image mean)':>21} {'Dice (data set)':>16} {'Dice (per-image mean)':>22}")
    for c in range(ds_iou.shape[0]):
        print(f"{c:>6} {ds_iou[c]:>15.4f} {img_iou[:, c].mean():>21.4f} {ds_dice[c]:>16.4f} {img_dice[:, c].mean():>22.4f}")
    print(f"{'mean':>6} {ds_iou.mean():>15.4f} {img_iou.mean():>21.4f} {ds_dice.mean():>16.4f} {img_dice.mean():>22.4f}")
    print(f"IoU: {ds_iou.mean():.4f}")
    print(f"Dice: {ds_dice.mean():.4f}")


def evaluate(args):
    cfg, rt, model = load_run(args.name, args.device)
    if args.images:
        ext = args.img_ext or cfg["img_ext"]
        ids = find_ids(args.images, ext)
        data = SegmentationData(ids, [read_image(os.path.join(args.images, i + ext), cfg["input_channels"]) for i in ids], None)
        out_dir = args.output or os.path.join(OUTPUTS_DIR, args.name, "predictions")
    else:
        data, note = load_validation(cfg, rundir.read_split(os.path.join(config.RUNS_DIR, args.name)))
        if note:
            print(f"note: {note}")
        out_dir = args.output or os.path.join(OUTPUTS_DIR, args.name)
    try:
        clear_outputs(out_dir, cfg["num_classes"])
        make_dirs(out_dir, cfg["num_classes"], args)
    except OSError as e:
        raise UserError(f"cannot write the outputs in {out_dir}: {e.strerror or e}. Make it writable, or pass "
                        "--output DIR") from None
    meter = SegMeter(cfg["num_classes"], rt.device, keep_per_image=True)
    run_inference(model, data, cfg, rt, args, out_dir, meter)
    if data.labeled:
        report(meter, data.ids, out_dir)
    print(f"{len(data.ids)} predicted masks in {out_dir}/<class>/" + (f"; metrics in {out_dir}/metrics.csv" if data.labeled else ""))


def main(argv=None):
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
    main()
