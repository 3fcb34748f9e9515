"""Benchmark training on dsb2018_96: one JSON line per case (a benchmark, not a test).

    python bench.py --device cuda                      # UNet and NestedUNet, the fast recipe's settings
    python bench.py --quick --device cpu               # a minute or two on 2 CPU cores
    python bench.py --recipe recipes/dsb2018_cpu.yml --amps auto,off --device cpu   # bf16 beside fp32
    python bench.py --device cuda --time_to_iou 0.82   # also train the recipe and time it to that IoU
    python bench.py --scaling --images 40 --archs UNet --batch_size 8 --epochs 1 --device cpu   # cost vs size
    python bench.py --decode --keep_tiff inputs/dsb2018_96_tif16   # start-up check: 8-bit PNG vs 16-bit TIFF

Per case: pure_img_s (the model's forward + backward + optimizer step on a batch already on the
device, same batch size and precision), e2e_img_s (train_one_epoch over the real data set, input
pipeline and metrics included), epoch_s (training + validation of one epoch), files_s_per_epoch
(what the training thread spends on an epoch's files: the state's copy and handing it to the
background writer, waiting if the previous epoch's files are still being written),
predict_img_s (val.py's prediction of the validation split, mask files included), peak memory,
startup_s (train.py's command start to its start-up line, after which the first step runs),
and optionally seconds from the command's start until validation IoU first reaches the target,
with the run's best IoU.
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import cv2
import torch

import config
import runtime
from dataset import SegmentationData, scan, split
from engine import Engine, build_network
from loaders import make_loaders
from metrics import SegMeter
from normalize import resolve_mode
from predictor import Predictor, describe
from predict import Member, output_subfolders, run_inference
from rundir import EpochWriter
from utils import UserError, exit_on_user_error, resolve_device

DEFAULT_DATA = "inputs/dsb2018_96"
HERE = os.path.dirname(os.path.abspath(__file__))
RECIPE = os.path.join(HERE, "recipes", "dsb2018_fast.yml")


def peak_memory_mb(rt):
    if rt.cuda:
        return torch.cuda.max_memory_allocated(rt.device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024   # Linux: KiB


def pure_rate(cfg, rt, steps):
    """Images/s of forward + backward + step alone, on one batch that already sits on the device."""
    engine = Engine(cfg, rt)
    x = torch.randn(cfg["batch_size"], cfg["input_channels"], cfg["input_h"], cfg["input_w"], device=rt.device)
    y = (torch.rand(cfg["batch_size"], cfg["num_classes"], cfg["input_h"], cfg["input_w"], device=rt.device) > 0.85).float()
    x, y = rt.place_batch(x, y)
    engine.net.train()
    for i in range(steps + 3):       # 3 warm-up steps (cudnn autotuning, compilation)
        if i == 3:
            rt.synchronize()
            t0 = time.perf_counter()
        engine.train_step(x, y)
    rt.synchronize()
    return steps * cfg["batch_size"] / (time.perf_counter() - t0)


def e2e_rate(cfg, rt, data, epochs):
    """Training epochs over the real data set (input pipeline and metrics included) -> {'e2e_img_s': images/s of
    train_one_epoch, 'epoch_s': seconds per training + validation epoch, 'loader': its kind, 'train_images'}."""
    train_data, val_data = split(data, cfg)
    train_loader, val_loader = make_loaders(cfg, train_data, val_data, rt)
    engine = Engine(cfg, rt)
    images = len(train_loader) * cfg["batch_size"]
    train_s, epoch_s, files_s = 0.0, 0.0, 0.0
    with tempfile.TemporaryDirectory() as run_dir:
        writer = EpochWriter(run_dir)
        for epoch in range(epochs + 1):  # epoch 0 warms up
            train_loader.set_epoch(epoch)
            rt.synchronize()
            t0 = time.perf_counter()
            stats = engine.train_one_epoch(train_loader, epoch)
            rt.synchronize()
            t1 = time.perf_counter()
            stats.update(engine.validate(val_loader))
            t2 = time.perf_counter()
            engine.end_epoch(epoch, engine.lr, stats, t2 - t0)
            writer.save(engine.snapshot(), improved=True)   # what train.py's thread spends on an epoch's files
            if epoch:
                train_s, epoch_s, files_s = train_s + t1 - t0, epoch_s + t2 - t0, files_s + time.perf_counter() - t2
        writer.close([])
    return {"e2e_img_s": epochs * images / train_s, "epoch_s": epoch_s / epochs, "files_s_per_epoch": files_s / epochs,
            "loader": train_loader.kind, "train_images": len(train_data.ids)}


def timed_run(recipe, data, device, extra, target=None):
    """Runs train.py on the recipe in a scratch folder -> {'startup_s': seconds from the command's start to its
    start-up line (data loaded and checked, model built: the first training step comes next)}; with a target
    val IoU it trains to the end and adds seconds_to_iou (None if never reached), best_val_iou and run_s."""
    data, recipe = os.path.abspath(data), os.path.abspath(recipe)     # train.py runs in a scratch folder
    cmd = [sys.executable, os.path.join(HERE, "train.py"), "--config", recipe, "--data_dir", os.path.dirname(data),
           "--dataset", os.path.basename(data), "--device", str(device), "--name", "bench", *extra]
    with tempfile.TemporaryDirectory() as scratch:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=scratch, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        out, best = {"startup_s": None}, 0.0
        for line in proc.stdout:          # flushed line by line: the start-up line, then one per epoch
            if out["startup_s"] is None and "run folder" in line:
                out["startup_s"] = round(time.perf_counter() - t0, 2)
                if target is None:
                    proc.terminate()      # handled like Ctrl-C: it stops before its first epoch ends
            if target is not None and line.startswith("epoch ") and "val_iou" in line:
                best = max(best, float(line.split("val_iou")[1].split()[0]))
                if best >= target and "seconds_to_iou" not in out:
                    out["seconds_to_iou"] = round(time.perf_counter() - t0, 1)
        proc.wait()
    if target is not None:
        out.update(target_iou=target, seconds_to_iou=out.get("seconds_to_iou"), best_val_iou=round(best, 4),
                   run_s=round(time.perf_counter() - t0, 1))
    return out


# how bench.py's messages point at a fix (see dataset.TRAIN_HINTS): it reads one-class PNG data sets only
BENCH_HINTS = {
    "data": "pass --data DIR, a folder with images/ and masks/0/ (default: inputs/dsb2018_96)",
    "img_ext": "bench.py reads .png images only: convert them (or time train.py itself)",
    "mask_ext": "bench.py reads .png masks only: convert them (or time train.py itself)",
    "input_channels": "bench.py trains on RGB: convert the images",
    "num_classes": "bench.py trains one class: point --data at a data set with masks/0 only",
}


def predict_rate(cfg, rt, val_data):
    """Images/s of predicting the validation split as val.py does (resizing back, thresholds, metrics and the
    mask files included), with the network's weights as built."""
    model = Predictor(build_network(cfg, rt), describe(cfg, val_data.dtypes)).eval()
    options = argparse.Namespace(batch_size=16, tta=False, tile=False, overlap=0.5, threshold=0.5, save_probs=False,
                                 overlay=False, instances=None, min_size=4, output_format="png")
    meters = {"image": SegMeter(cfg["num_classes"], rt.device, keep_per_image=True),
              "input": SegMeter(cfg["num_classes"], rt.device)}
    members = [Member("bench", cfg, rt, model)]
    with tempfile.TemporaryDirectory() as out_dir:
        for sub in output_subfolders(cfg["num_classes"], options):
            os.makedirs(os.path.join(out_dir, sub))
        run_inference(members, val_data.subset(val_data.ids[:16]), options, out_dir, meters)   # warm-up
        rt.synchronize()
        t0 = time.perf_counter()
        run_inference(members, val_data, options, out_dir, meters)
        rt.synchronize()
        return len(val_data.ids) / (time.perf_counter() - t0)


def scaled(data, copies, side):
    """The data set repeated `copies` times with every image and mask resized to side x side."""
    resize = lambda a, interp: cv2.resize(a, (side, side), interpolation=interp).reshape(side, side, -1)  # noqa: E731
    ids = [f"{i}_{c}" for c in range(copies) for i in data.ids]
    images = [resize(data.image(k), cv2.INTER_LINEAR) for _ in range(copies) for k in range(len(data.ids))]
    masks = [resize(data.mask(k), cv2.INTER_NEAREST) for _ in range(copies) for k in range(len(data.ids))]
    return SegmentationData(ids, images, masks)


def scaling_rows(base, data, device, args):
    """How an epoch's cost grows with the image count (x1, x4) and the pixels per image (96, 192, 384)."""
    for arch in args.archs.split(","):
        for copies, side in ((1, 96), (4, 96), (1, 192), (1, 384)):
            cfg = config.check({**base, "device": str(device), "arch": arch, "deep_supervision": False,
                                "input_h": side, "input_w": side, "batch_size": args.batch_size or base["batch_size"]})
            rt = runtime.build(device, cfg)
            if rt.cuda:
                torch.cuda.reset_peak_memory_stats(device)
            d = scaled(data, copies, side)
            e2e = e2e_rate(cfg, rt, d, args.epochs)
            yield {"case": f"scaling-{arch}-x{copies}-{side}px", "device": device_name(rt), "arch": arch,
                   "images": len(d.ids), "train_images": e2e["train_images"], "input": side,
                   "batch_size": cfg["batch_size"], "loader": e2e["loader"], "e2e_img_s": round(e2e["e2e_img_s"], 1),
                   "train_epoch_s": round(e2e["train_images"] / e2e["e2e_img_s"], 3),
                   "epoch_s": round(e2e["epoch_s"], 3), "peak_mem_mb": round(peak_memory_mb(rt), 1)}


def write_tiff16(data, out):
    """The PNG data set as a microscope and an annotation tool would give it: 16-bit TIFF images (values x 257, so
    x / 65535 is exactly x / 255) and 16-bit TIFF label images (the connected components of the mask) in labels/."""
    import tifffile
    from scipy import ndimage
    for d in ("images", "labels"):
        os.makedirs(os.path.join(out, d), exist_ok=True)
    for k, i in enumerate(data.ids):
        tifffile.imwrite(os.path.join(out, "images", i + ".tif"), data.image(k).astype("uint16") * 257)
        labels = ndimage.label(data.mask(k)[:, :, 0])[0].astype("uint16")
        tifffile.imwrite(os.path.join(out, "labels", i + ".tif"), labels)


def decode_rows(data, args):
    """Seconds of the start-up check (scan + decode + every check, as train.py does it) of the PNG data set and of
    its 16-bit TIFF copy, best of 5 each, interleaved so that both see the same machine load."""
    if args.keep_tiff and os.path.exists(args.keep_tiff) and os.listdir(args.keep_tiff):
        raise UserError(f"--keep_tiff {args.keep_tiff} is not empty; pass a new folder (nothing in it is replaced)")
    out = args.keep_tiff or tempfile.mkdtemp(prefix="tif16_")
    write_tiff16(data, out)
    sets = {"png8": (args.data, ".png"), "tiff16_labels": (out, ".tif")}
    best = {name: float("inf") for name in sets}
    for _ in range(5):
        for name, (root, ext) in sets.items():
            t0 = time.perf_counter()
            SegmentationData.decode(scan(root, ext, ".png", 1, BENCH_HINTS), 3, None, root, BENCH_HINTS)
            best[name] = min(best[name], time.perf_counter() - t0)
    yield {"case": "decode", "images": len(data.ids), "png8_s": round(best["png8"], 3),
           "tiff16_labels_s": round(best["tiff16_labels"], 3),
           "tiff_over_png": round(best["tiff16_labels"] / best["png8"], 2), "threads": os.cpu_count(),
           "tiff_copy": out if args.keep_tiff else None}
    if not args.keep_tiff:
        import shutil
        shutil.rmtree(out)


def device_name(rt):
    return torch.cuda.get_device_name(rt.device) if rt.cuda else f"cpu ({os.cpu_count()} cores)"


def parse_args(argv):
    p = argparse.ArgumentParser(description="Training throughput benchmark (JSON lines).")
    p.add_argument("--device", default="auto")
    p.add_argument("--data", default=DEFAULT_DATA, help=f"data set folder (default: {DEFAULT_DATA})")
    p.add_argument("--archs", default="UNet,NestedUNet")
    p.add_argument("--recipe", default=RECIPE, help="config whose batch size, optimizer and precision are measured")
    p.add_argument("--batch_size", type=int, help="override the recipe's batch size")
    p.add_argument("--amp", choices=("auto", "bf16", "fp16", "off"), help="override the recipe's precision")
    p.add_argument("--amps", help="several precisions side by side, e.g. auto,off (one row each)")
    p.add_argument("--loader", choices=("auto", "memory", "workers"), help="override the recipe's loader")
    p.add_argument("--memory_format", choices=("auto", "channels_last", "contiguous"),
                   help="override the recipe's memory format")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--epochs", type=int, default=3, help="timed epochs for e2e_img_s (after one warm-up)")
    p.add_argument("--steps", type=int, default=30, help="timed steps for pure_img_s")
    p.add_argument("--quick", action="store_true", help="64 images at 64x64, batch 8, 1 epoch: a CPU smoke run")
    p.add_argument("--time_to_iou", type=float, help="also run train.py on the recipe and time it to this val IoU")
    p.add_argument("--scaling", action="store_true",
                   help="instead: epoch cost against image count (x1, x4) and image side (96, 192, 384)")
    p.add_argument("--decode", action="store_true",
                   help="instead: the start-up check's seconds for the data set and for its 16-bit TIFF copy")
    p.add_argument("--keep_tiff", metavar="DIR", help="with --decode: write the 16-bit TIFF copy here and keep it")
    p.add_argument("--images", type=int, help="use only the first N images of the data set")
    p.add_argument("--out", help="append the JSON lines to this file too")
    return p.parse_args(argv)


def overrides_from(args, device):
    """The recipe settings that the command line changes."""
    overrides = {"device": str(device)}
    for key in ("batch_size", "amp", "loader", "memory_format"):
        if getattr(args, key) is not None:
            overrides[key] = getattr(args, key)
    if args.compile:
        overrides["compile"] = True
    if args.quick:
        overrides.update(input_h=64, input_w=64, batch_size=args.batch_size or 8)
        args.epochs, args.steps = 1, 12
    return overrides


def case_row(cfg, rt, data, args):
    """One JSON row: the pure and end-to-end rates of cfg's architecture (and, if asked, its time to an IoU)."""
    arch = cfg["arch"]
    if rt.cuda:
        torch.cuda.reset_peak_memory_stats(rt.device)
    pure = pure_rate(cfg, rt, args.steps)
    e2e = e2e_rate(cfg, rt, data, args.epochs)
    row = {"case": f"{arch}-b{cfg['batch_size']}-{rt.precision_name()}{'-compile' if cfg['compile'] else ''}"
                   f"-{cfg['input_h']}px",
           "device": device_name(rt), "arch": arch, "batch_size": cfg["batch_size"], "input": cfg["input_h"],
           "precision": rt.precision_name(), "channels_last": rt.channels_last, "loader": e2e["loader"],
           "train_images": e2e["train_images"], "pure_img_s": round(pure, 1), "e2e_img_s": round(e2e["e2e_img_s"], 1),
           "e2e_over_pure": round(e2e["e2e_img_s"] / pure, 3), "epoch_s": round(e2e["epoch_s"], 3),
           "files_s_per_epoch": round(e2e["files_s_per_epoch"], 4),
           "predict_img_s": round(predict_rate(cfg, rt, split(data, cfg)[1]), 1),
           "peak_mem_mb": round(peak_memory_mb(rt), 1), "torch": torch.__version__}
    extra = ["--arch", arch, "--amp", cfg["amp"], "--memory_format", cfg["memory_format"]]
    extra += ["--input_h", "64", "--input_w", "64"] if args.quick else []
    row.update(timed_run(args.recipe, args.data, rt.device, extra, args.time_to_iou))
    return row


def benchmark(args):
    device = resolve_device(args.device)
    base = config.load_run_config(args.recipe)
    data = SegmentationData.decode(scan(args.data, ".png", ".png", 1, BENCH_HINTS), 3, None, args.data, BENCH_HINTS)
    base["normalize"] = resolve_mode(base["normalize"], data.dtypes)
    overrides = overrides_from(args, device)
    if args.images:
        data = data.subset(data.ids[:args.images])
    if args.quick:
        data = data.subset(data.ids[:64])
    if args.scaling or args.decode:
        for row in (scaling_rows(base, data, device, args) if args.scaling else decode_rows(data, args)):
            emit(row, args.out)
        return
    for arch in args.archs.split(","):
        for amp in args.amps.split(",") if args.amps else [overrides.get("amp", base["amp"])]:
            cfg = config.check({**base, **overrides, "amp": amp, "arch": arch, "deep_supervision": False})
            emit(case_row(cfg, runtime.build(device, cfg), data, args), args.out)


def main(argv=None):
    with exit_on_user_error():
        benchmark(parse_args(argv))


def emit(row, path):
    """One JSON line on stdout (and appended to `path`)."""
    line = json.dumps(row)
    print(line, flush=True)
    if path:
        with open(path, "a") as f:
            f.write(line + "\n")


if __name__ == "__main__":
    main()
