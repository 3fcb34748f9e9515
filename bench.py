"""Benchmark training speed on dsb2018_96: one JSON line per case (a benchmark, not a test).

    python bench.py --device cuda                      # UNet and NestedUNet, the fast recipe's settings
    python bench.py --quick --device cpu               # a minute or two on 2 CPU cores
    python bench.py --device cuda --time_to_iou 0.82   # also run recipes/dsb2018_fast.yml and time it
    python bench.py --scaling --images 40 --archs UNet --batch_size 8 --epochs 1 --device cpu   # cost vs size

Per case: pure_img_s (the model's forward + backward + optimizer step on a batch already on the
device, same batch size and precision), e2e_img_s (train_one_epoch over the real data set, input
pipeline and metrics included), epoch_s (training + validation of one epoch, files excluded),
peak memory, and optionally seconds from the command's start until validation IoU first reaches
the target, with the run's best IoU.
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import time

import cv2
import torch

import config
import train
from archs import build_model
from dataset import SegmentationData, split_ids
from losses import LOSSES
from utils import resolve_device, seed_everything

DEFAULT_DATA = next((p for p in ("../shared/datasets/dsb2018_96", "inputs/dsb2018_96") if os.path.isdir(p)),
                    "inputs/dsb2018_96")
RECIPE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "recipes", "dsb2018_fast.yml")


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory_mb(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024   # Linux: KiB


def setup(cfg, device):
    """Model (channels_last on CUDA, optionally compiled), loss, optimizer, scaler, autocast dtype."""
    seed_everything(cfg["seed"])
    model = build_model(cfg).to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    net = torch.compile(model) if cfg["compile"] else model
    amp_dtype = train.resolve_amp(cfg["amp"], device)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    return net, LOSSES[cfg["loss"]](), train.build_optimizer(cfg, model.parameters(), device), scaler, amp_dtype


def pure_rate(cfg, device, steps):
    """Images/s of forward + backward + step alone, on one batch that already sits on the device."""
    net, criterion, optimizer, scaler, amp_dtype = setup(cfg, device)
    x = torch.randn(cfg["batch_size"], cfg["input_channels"], cfg["input_h"], cfg["input_w"], device=device)
    y = (torch.rand(cfg["batch_size"], cfg["num_classes"], cfg["input_h"], cfg["input_w"], device=device) > 0.85).float()
    if device.type == "cuda":
        x = x.contiguous(memory_format=torch.channels_last)
    net.train()
    for i in range(steps + 3):       # 3 warm-up steps (cudnn autotuning, compilation)
        if i == 3:
            sync(device)
            t0 = time.perf_counter()
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            loss, _ = train.forward_loss(net, x, y, criterion, cfg["deep_supervision"])
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
    sync(device)
    return steps * cfg["batch_size"] / (time.perf_counter() - t0)


def e2e_rate(cfg, device, data, epochs):
    """Images/s of train_one_epoch (input pipeline and metrics included) and seconds per train+val epoch."""
    train_data, val_data = (data.subset(ids) for ids in split_ids(data.ids, cfg["val_split"], cfg["split_seed"]))
    train_loader, val_loader = train.make_loaders(cfg, train_data, val_data, device)
    net, criterion, optimizer, scaler, amp_dtype = setup(cfg, device)
    images = len(train_loader) * cfg["batch_size"]
    train_s, epoch_s = 0.0, 0.0
    for epoch in range(epochs + 1):  # epoch 0 warms up
        train_loader.set_epoch(epoch)
        sync(device)
        t0 = time.perf_counter()
        train.train_one_epoch(net, train_loader, criterion, optimizer, scaler, device, amp_dtype, cfg, epoch)
        sync(device)
        t1 = time.perf_counter()
        train.validate(net, val_loader, criterion, device, amp_dtype, cfg)
        if epoch:
            train_s += t1 - t0
            epoch_s += time.perf_counter() - t0
    return epochs * images / train_s, epoch_s / epochs, type(train_loader).__name__, len(train_data.ids)


def time_to_iou(recipe, data_dir, dataset, device, target, extra):
    """Runs train.py on the recipe; seconds from its start until a logged val_iou >= target, and the best."""
    cmd = [sys.executable, os.path.join(os.path.dirname(os.path.abspath(__file__)), "train.py"), "--config", recipe,
           "--data_dir", data_dir, "--dataset", dataset, "--device", str(device), "--name", "bench_time_to_iou",
           "--overwrite", *extra]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    reached, best = None, 0.0
    for line in proc.stdout:          # one line per epoch, flushed as it ends
        if line.startswith("epoch ") and "val_iou" in line:
            iou = float(line.split("val_iou")[1].split()[0])
            best = max(best, iou)
            if reached is None and iou >= target:
                reached = time.perf_counter() - t0
    proc.wait()
    return reached, best, time.perf_counter() - t0


def scaled(data, copies, side):
    """The data set repeated `copies` times with every image and mask resized to side x side."""
    resize = lambda a, interp: cv2.resize(a, (side, side), interpolation=interp).reshape(side, side, -1)  # noqa: E731
    ids = [f"{i}_{c}" for c in range(copies) for i in data.ids]
    images = [resize(data.image(k), cv2.INTER_LINEAR) for _ in range(copies) for k in range(len(data.ids))]
    masks = [resize(data.mask(k), cv2.INTER_NEAREST) for _ in range(copies) for k in range(len(data.ids))]
    return SegmentationData(ids, images, masks)


def scaling_rows(base, data, device, args, device_name):
    """How an epoch's cost grows with the image count (x1, x4) and the pixels per image (96, 192, 384)."""
    for arch in args.archs.split(","):
        for copies, side in ((1, 96), (4, 96), (1, 192), (1, 384)):
            cfg = config.validate({**base, "device": str(device), "arch": arch, "deep_supervision": False,
                                   "input_h": side, "input_w": side, "batch_size": args.batch_size or base["batch_size"]})
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            d = scaled(data, copies, side)
            e2e, epoch_s, loader, n_train = e2e_rate(cfg, device, d, args.epochs)
            yield {"case": f"scaling-{arch}-x{copies}-{side}px", "device": device_name, "arch": arch,
                   "images": len(d.ids), "train_images": n_train, "input": side, "batch_size": cfg["batch_size"],
                   "loader": loader, "e2e_img_s": round(e2e, 1), "train_epoch_s": round(n_train / e2e, 3),
                   "epoch_s": round(epoch_s, 3), "peak_mem_mb": round(peak_memory_mb(device), 1)}


def main(argv=None):
    p = argparse.ArgumentParser(description="Training throughput benchmark (JSON lines).")
    p.add_argument("--device", default="auto")
    p.add_argument("--data", default=DEFAULT_DATA, help=f"data set folder (default: {DEFAULT_DATA})")
    p.add_argument("--archs", default="UNet,NestedUNet")
    p.add_argument("--recipe", default=RECIPE, help="config whose batch size, optimizer and precision are measured")
    p.add_argument("--batch_size", type=int, help="override the recipe's batch size")
    p.add_argument("--amp", choices=("auto", "bf16", "fp16", "off"), help="override the recipe's precision")
    p.add_argument("--loader", choices=("auto", "memory", "workers"), help="override the recipe's loader")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--epochs", type=int, default=3, help="timed epochs for e2e_img_s (after one warm-up)")
    p.add_argument("--steps", type=int, default=30, help="timed steps for pure_img_s")
    p.add_argument("--quick", action="store_true", help="64 images at 64x64, batch 8, 1 epoch: a CPU smoke run")
    p.add_argument("--time_to_iou", type=float, help="also run train.py on the recipe and time it to this val IoU")
    p.add_argument("--scaling", action="store_true",
                   help="instead: epoch cost against image count (x1, x4) and image side (96, 192, 384)")
    p.add_argument("--images", type=int, help="use only the first N images of the data set")
    p.add_argument("--out", help="append the JSON lines to this file too")
    args = p.parse_args(argv)

    device = resolve_device(args.device)
    torch.backends.cudnn.benchmark = True
    base = config.load_run_config(args.recipe)
    data = SegmentationData.from_folder(args.data, ".png", ".png", 1, 3)
    overrides = {"device": str(device)}
    for key in ("batch_size", "amp", "loader"):
        if getattr(args, key) is not None:
            overrides[key] = getattr(args, key)
    if args.compile:
        overrides["compile"] = True
    if args.images:
        data = data.subset(data.ids[:args.images])
    if args.quick:
        data = data.subset(data.ids[:64])
        overrides.update(input_h=64, input_w=64, batch_size=args.batch_size or 8)
        args.epochs, args.steps = 1, 12
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({os.cpu_count()} cores)"
    if args.scaling:
        for row in scaling_rows(base, data, device, args, device_name):
            emit(row, args.out)
        return
    for arch in args.archs.split(","):
        cfg = config.validate({**base, **overrides, "arch": arch, "deep_supervision": False})
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        pure = pure_rate(cfg, device, args.steps)
        e2e, epoch_s, loader, n_train = e2e_rate(cfg, device, data, args.epochs)
        amp_dtype = train.resolve_amp(cfg["amp"], device)
        row = {"case": f"{arch}-b{cfg['batch_size']}-{str(amp_dtype).replace('torch.', '') if amp_dtype else 'fp32'}"
                       f"{'-compile' if cfg['compile'] else ''}-{cfg['input_h']}px",
               "device": device_name, "arch": arch, "batch_size": cfg["batch_size"], "input": cfg["input_h"],
               "precision": str(amp_dtype).replace("torch.", "") if amp_dtype else "fp32", "loader": loader,
               "train_images": n_train, "pure_img_s": round(pure, 1), "e2e_img_s": round(e2e, 1),
               "e2e_over_pure": round(e2e / pure, 3), "epoch_s": round(epoch_s, 3),
               "peak_mem_mb": round(peak_memory_mb(device), 1), "torch": torch.__version__}
        if args.time_to_iou is not None:
            extra = ["--arch", arch] + (["--input_h", "64", "--input_w", "64"] if args.quick else [])
            reached, best, total = time_to_iou(args.recipe, os.path.dirname(os.path.abspath(args.data)),
                                               os.path.basename(os.path.abspath(args.data)), device, args.time_to_iou, extra)
            row.update(target_iou=args.time_to_iou, seconds_to_iou=reached and round(reached, 1),
                       best_val_iou=round(best, 4), run_s=round(total, 1))
        emit(row, args.out)


def emit(row, path):
    """One JSON line on stdout (and appended to `path`)."""
    line = json.dumps(row)
    print(line, flush=True)
    if path:
        with open(path, "a") as f:
            f.write(line + "\n")


if __name__ == "__main__":
    main()
