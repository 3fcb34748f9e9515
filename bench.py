"""Benchmark training on dsb2018_96: one JSON line per case (a benchmark, not a test).

    python bench.py --device cuda                      # UNet and NestedUNet, the fast recipe's settings
    python bench.py --quick --device cpu               # a minute or two on 2 CPU cores
    python bench.py --recipe recipes/dsb2018_cpu.yml --amps auto,off --device cpu   # bf16 beside fp32
    python bench.py --device cuda --time_to_iou 0.82   # also train the recipe and time it to that IoU
    python bench.py --scaling --images 40 --archs UNet --batch_size 8 --epochs 1 --device cpu   # cost vs size
    python bench.py --decode --keep_tiff inputs/dsb2018_96_tif16   # start-up check: 8-bit PNG vs 16-bit TIFF
    python bench.py --profile --recipe recipes/dsb2018_cpu.yml --device cpu   # where a training epoch's time goes
    python bench.py --variants all --archs UNet --device cpu   # training-step variants beside a plain eager loop
    python bench.py --limits --recipe recipes/dsb2018_cpu.yml --device cpu   # the step's ceiling: its convolutions alone
    python bench.py --fixed_costs --archs UNet --device cpu   # an epoch's costs besides the network, part by part

Per case: pure_img_s (the model's forward + backward + optimizer step on a batch already on the
device, same batch size and precision), e2e_img_s (train_one_epoch over the real data set, input
pipeline and metrics included), e2e_over_adjacent_pure (each epoch's rate over the pure rate timed
right after it, the median over the epochs), epoch_s (training + validation of one epoch), files_s_per_epoch
(what the training thread spends on an epoch's files: the state's copy and handing it to the
background writer, waiting if the previous epoch's files are still being written),
predict_img_s (val.py's prediction of the validation split, mask files included), peak memory,
startup_s (train.py's command start to its start-up line, after which the first step runs),
and optionally seconds from the command's start until validation IoU first reaches the target,
with the run's best IoU.
"""
import signal
import sys

if __name__ == "__main__":   # Ctrl-C or SIGTERM while the imports below load (seconds: torch) ends quietly
    signal.signal(signal.SIGINT, lambda *_: sys.exit(130))
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(130))

import argparse
import contextlib
import json
import os
import resource
import statistics
import subprocess
import tempfile
import time
from dataclasses import dataclass

import cv2
import torch
from torch.profiler import record_function

import config
import runtime
from archs import build_model, final_logits
from dataerror import worded
from dataset import SegmentationData
from engine import Engine, build_network
from evaluation import Scores, evaluate
from losses import LOSSES
from loaders import make_loaders
from metrics import SegMeter, binarize
from normalize import resolve_mode
from outputs import ImageWriter, OutputOptions, check_place, subfolders
from pairing import scan
from predict import PredictOptions, TrainedRun
from predictor import Predictor, describe
from rundir import EpochWriter
from splits import split
from utils import UserError, exit_on_user_error, resolve_device

DEFAULT_DATA = "inputs/dsb2018_96"
HERE = os.path.dirname(os.path.abspath(__file__))
RECIPE = os.path.join(HERE, "recipes", "dsb2018_fast.yml")


def peak_memory_mb(rt):
    if rt.cuda:
        return torch.cuda.max_memory_allocated(rt.device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024   # Linux: KiB


def fixed_batch(cfg, rt):
    """A random batch of the config's shape already on the device, images in the runtime's memory format."""
    x = torch.randn(cfg["batch_size"], cfg["input_channels"], cfg["input_h"], cfg["input_w"])
    y = (torch.rand(cfg["batch_size"], cfg["num_classes"], cfg["input_h"], cfg["input_w"]) > 0.85).float()
    return rt.place_batch(x, y)


def timed_steps(step, rt, steps, batch_size):
    """-> (images/s of `steps` calls of step() after 3 warm-up calls, seconds of the warm-up: cudnn autotuning,
    compilation)."""
    t0 = time.perf_counter()
    for i in range(steps + 3):
        if i == 3:
            rt.synchronize()
            t1 = time.perf_counter()
        step()
    rt.synchronize()
    return steps * batch_size / (time.perf_counter() - t1), t1 - t0


def pure_rate(cfg, rt, steps):
    """Images/s of forward + backward + step alone, on one batch that already sits on the device (the toolkit's
    own step: variant_step's "toolkit")."""
    step, batch_size = variant_step(cfg, rt, "toolkit")
    return timed_steps(step, rt, steps, batch_size)[0]


REFERENCE_BATCH = 16   # the reference loop's batch, whatever the config's: its rate is a fixed yardstick


def reference_step(cfg, rt):
    """One step of a plain eager PyTorch loop on the config's network, precision, layout and input size: forward
    under autocast, the config's loss, backward, AdamW step on one fixed batch of REFERENCE_BATCH (a closure)."""
    cfg = {**cfg, "batch_size": REFERENCE_BATCH}
    torch.manual_seed(0)
    net = build_model(cfg).to(rt.device, memory_format=rt.memory_format).train()
    optimizer = torch.optim.AdamW(net.parameters(), lr=cfg["lr"], weight_decay=cfg["weight_decay"])
    criterion = LOSSES[cfg["loss"]]()
    x, y = fixed_batch(cfg, rt)

    def step():
        with rt.autocast():
            loss = criterion(net(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return step


def reference_rate(cfg, rt, steps):
    """Images/s of reference_step. Machines' load moves absolute rates from hour to hour; a rate over this one,
    measured in the same run, holds."""
    return timed_steps(reference_step(cfg, rt), rt, steps, REFERENCE_BATCH)[0]


# the training-step variants that `--variants` sets side by side (BENCHMARKS.md says which were adopted)
VARIANTS = {
    "reference": "plain eager loop (reference_step)",
    "toolkit": "engine.train_step as the config sets it",
    "graph": "engine.train_step with --cuda_graph on (one CUDA graph per step)",
    "fused_adamw": "AdamW(fused=True): one kernel for the whole update",
    "batch32": "batch 32 instead of the config's",
    "batch64": "batch 64 instead of the config's",
    "batch128": "batch 128 instead of the config's",
    "bf16_weights": "the network's weights held in bf16 (no fp32 master copy: an upper bound of the casts' cost)",
    "compile": "torch.compile (inductor, default mode)",
    "compile_max_autotune": "torch.compile(mode='max-autotune')",
    "compile_reduce_overhead": "torch.compile(mode='reduce-overhead'): inductor's kernels replayed as CUDA graphs",
}


def variant_step(cfg, rt, name):
    """-> (step closure, batch size) of one of VARIANTS."""
    if name == "reference":
        return reference_step(cfg, rt), REFERENCE_BATCH
    if name.startswith("batch"):
        cfg = {**cfg, "batch_size": int(name[len("batch"):])}
    if name == "graph":
        cfg = {**cfg, "cuda_graph": "on"}
    if name in ("compile", "compile_max_autotune", "compile_reduce_overhead"):
        cfg = {**cfg, "cuda_graph": "off"}
    if name == "fused_adamw":
        rt = runtime.Runtime(rt.device, rt.amp_dtype, rt.channels_last, True)
    engine = Engine({**cfg, "compile": name == "compile"}, rt)
    if name == "bf16_weights":
        for module in (engine.model, engine.ema and engine.ema.module):
            if module is not None:
                module.to(torch.bfloat16)
    if name in ("compile_max_autotune", "compile_reduce_overhead"):
        engine.net = torch.compile(engine.model, mode=name[len("compile_"):].replace("_", "-"))
    engine.net.train()
    x, y = fixed_batch(cfg, rt)
    return (lambda: engine.train_step(x, y)), cfg["batch_size"]


def variant_rows(base, device, opts):
    """Every variant's training-step rate beside the reference loop's, measured just before it (its ratio holds
    under a moving load), with its warm-up seconds (compilation) and TFLOP/s."""
    names = opts.variants.split(",") if opts.variants != "all" else list(VARIANTS)
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        raise UserError(f"--variants: unknown {', '.join(unknown)}; choose from {', '.join(VARIANTS)} (or all)")
    for arch in opts.archs.split(","):
        cfg = config.check({**base, **overrides_from(opts, device), "arch": arch, "deep_supervision": False})
        rt = runtime.build(device, cfg)
        tflop = train_flop_per_image(cfg) / 1e12
        for name in names:
            reference = reference_rate(cfg, rt, opts.steps)
            step, batch = variant_step(cfg, rt, name)
            rate, warm_s = timed_steps(step, rt, opts.steps, batch)
            yield {"case": f"variant-{arch}-{name}", "variant": VARIANTS[name], "device": device_name(rt),
                   "arch": arch, "batch_size": batch, "input": cfg["input_h"], "precision": rt.precision_name(),
                   "img_s": round(rate, 1), "reference_img_s": round(reference, 1),
                   "over_reference": round(rate / reference, 3), "tflop_s": round(rate * tflop, 3),
                   "warmup_s": round(warm_s, 1), "torch": torch.__version__}


def network_convolutions(cfg, rt):
    """-> [(name, module, input shape)] of every convolution of the config's network, in the order a forward pass
    at the config's batch and input size runs them."""
    net = build_model(cfg).to(rt.device, memory_format=rt.memory_format).train()
    names = {m: n for n, m in net.named_modules()}
    seen = []
    hooks = [m.register_forward_hook(lambda m, inp, out: seen.append((names[m], m, tuple(inp[0].shape))))
             for m in net.modules() if isinstance(m, torch.nn.modules.conv._ConvNd)]
    with torch.no_grad(), rt.autocast():
        net(fixed_batch(cfg, rt)[0])
    for hook in hooks:
        hook.remove()
    return seen


def convolution_step(conv, shape, rt, input_grad):
    """A training step of one convolution alone (forward under the runtime's autocast, backward to its weights and,
    unless it reads the images, to its input), on a fixed input of its shape in the runtime's memory format."""
    x = torch.randn(shape, device=rt.device).to(memory_format=rt.memory_format).requires_grad_(input_grad)
    with rt.autocast():
        grad = torch.randn_like(conv(x))

    def step():
        conv.weight.grad = None
        with rt.autocast():
            out = conv(x)
        out.backward(grad)
    return step


def limit_rows(base, device, opts):
    """The machine's ceiling for the network's training step: every convolution timed alone (forward and backward,
    the config's precision and layout), and the images/s the network would reach if nothing but its convolutions
    took time, beside the toolkit's own step measured just before; with the square matmul's TFLOP/s."""
    for arch in opts.archs.split(","):
        cfg = config.check({**base, **overrides_from(opts, device), "arch": arch, "deep_supervision": False})
        rt = runtime.build(device, cfg)
        pure = pure_rate(cfg, rt, opts.steps)
        layers = []
        for i, (name, conv, shape) in enumerate(network_convolutions(cfg, rt)):
            rate = timed_steps(convolution_step(conv, shape, rt, input_grad=i > 0), rt, opts.steps, shape[0])[0]
            layers.append((1 / rate, name, shape))
        per_image_s = sum(s for s, _, _ in layers)
        tflop = train_flop_per_image(cfg) / 1e12
        matmul = matmul_tflop_s(rt, opts.steps)
        slowest = sorted(layers, reverse=True)[:6]
        yield {"case": f"limit-{arch}-b{cfg['batch_size']}-{rt.precision_name()}-{cfg['input_h']}px",
               "device": device_name(rt), "arch": arch, "batch_size": cfg["batch_size"], "input": cfg["input_h"],
               "precision": rt.precision_name(), "convolutions": len(layers),
               "convolutions_only_img_s": round(1 / per_image_s, 1), "pure_img_s": round(pure, 1),
               "pure_over_convolutions_only": round(pure * per_image_s, 3),
               "convolutions_only_tflop_s": round(tflop / per_image_s, 3), "pure_tflop_s": round(pure * tflop, 3),
               "matmul_tflop_s": round(matmul, 3),
               "slowest_convolutions": {f"{n} {'x'.join(map(str, shape[1:]))}": round(s / per_image_s, 3)
                                        for s, n, shape in slowest},
               "torch": torch.__version__}


FIXED_COST_NETWORK = {"base_channels": 4, "input_h": 32, "input_w": 32}   # a network that costs almost nothing


def mean_seconds(fn, rt, repeats):
    """Seconds per call of fn() over `repeats` calls after one warm-up call (the device's queue drained around)."""
    fn()
    rt.synchronize()
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    rt.synchronize()
    return (time.perf_counter() - t0) / repeats


def fixed_cost_rows(base, data, device, opts):
    """What a training epoch costs besides the network's step, on a network that costs almost nothing
    (FIXED_COST_NETWORK): the loop of train.py (train, validate, schedule, log row, files) timed part by part over
    `opts.epochs` epochs after a warm-up epoch, and each per-batch cost of train_one_epoch timed alone (the loader's
    batch, the step on a batch already on the device, the metrics update, the weight average's update). The files
    are written as train.py writes them, every --save_every seconds (the recipe's, or bench.py's flag): `files_s` is
    what the training thread spends on them, and a background write's competition for the cores (and Python's lock)
    shows in the next epoch's `train_s`."""
    for arch in opts.archs.split(","):
        cfg = config.check({**base, **overrides_from(opts, device), **FIXED_COST_NETWORK, "arch": arch,
                            "deep_supervision": False})
        rt = runtime.build(device, cfg)
        train_data, val_data = split(data, cfg)
        train_loader, val_loader = make_loaders(cfg, train_data, val_data, rt)
        engine = Engine(cfg, rt)
        batches, b = len(train_loader), cfg["batch_size"]
        parts = loop_parts(engine, (train_loader, val_loader), rt, cfg["save_every"], opts.epochs)
        per_batch = per_batch_seconds(engine, cfg, rt, train_loader, opts.steps)
        pure_epoch_s = per_batch["step"] * batches
        epoch_s = sum(parts.values())
        yield {"case": f"fixed-{arch}-w{cfg['base_channels']}-{cfg['input_h']}px-b{b}", "device": device_name(rt),
               "arch": arch, "batch_size": b, "batches": batches, "precision": rt.precision_name(),
               "loader": train_loader.kind, "cuda_graph": engine.graphed, "save_every": cfg["save_every"],
               "epoch_s": round(epoch_s, 4), "pure_train_s": round(pure_epoch_s, 4),
               "e2e_over_pure": round(pure_epoch_s / parts["train"], 3),
               "epoch_over_pure": round(pure_epoch_s / epoch_s, 3),
               "per_epoch_s": {f"{k}_s": round(v, 4) for k, v in parts.items()},
               "train_beyond_step_s": round(parts["train"] - pure_epoch_s, 4),
               "per_batch_ms": {**{k: round(v * 1e3, 3) for k, v in per_batch.items()},
                                "train_loop_beyond_step": round((parts["train"] - pure_epoch_s) / batches * 1e3, 3)},
               "torch": torch.__version__}


def loop_parts(engine, loaders, rt, save_every, epochs):
    """train.py's loop over `epochs` epochs after a warm-up one -> mean seconds per epoch of each part: train,
    validate, schedule_and_log, files (the training thread's share: the snapshot and handing it to the writer)."""
    train_loader, val_loader = loaders
    parts = {"train": 0.0, "validate": 0.0, "schedule_and_log": 0.0, "files": 0.0}
    with tempfile.TemporaryDirectory() as run_dir:
        writer = rundir_writer(run_dir, save_every)
        for epoch in range(epochs + 1):     # epoch 0 warms up (and captures a CUDA graph where one is used)
            times, t0 = {}, time.perf_counter()
            rt.synchronize()
            train_loader.set_epoch(epoch)
            stats = engine.train_one_epoch(train_loader, epoch)
            rt.synchronize()
            times["train"], t0 = time.perf_counter() - t0, time.perf_counter()
            stats.update(engine.validate(val_loader))
            rt.synchronize()
            times["validate"], t0 = time.perf_counter() - t0, time.perf_counter()
            lr = engine.lr
            engine.step_scheduler(stats["val_loss"])
            improved = engine.end_epoch(epoch + 1, lr, stats, 1.0)
            times["schedule_and_log"], t0 = time.perf_counter() - t0, time.perf_counter()
            writer.save(engine.snapshot(), improved)
            rt.synchronize()
            times["files"] = time.perf_counter() - t0
            for k in parts if epoch else ():
                parts[k] += times[k] / epochs
        writer.close([])
    return parts


def per_batch_seconds(engine, cfg, rt, train_loader, steps):
    """Seconds per batch of each part of train_one_epoch timed alone: the step (on a fixed batch), the loader's
    batch, the metrics update and the weight average's update."""
    x, y = fixed_batch(cfg, rt)
    train_loader.set_epoch(1)
    meter = SegMeter(cfg["num_classes"], rt.device)
    logits = torch.randn(y.shape).to(y.device)
    return {"step": mean_seconds(lambda: engine.train_step(x, y), rt, max(steps, 20)),
            "loader": mean_seconds(lambda: [None for _ in train_loader], rt, 2) / len(train_loader),
            "metrics": mean_seconds(lambda: meter.update(binarize(logits, cfg["class_mode"]), y), rt, 50),
            "ema": mean_seconds(lambda: engine.ema.update(), rt, 50) if engine.ema is not None else 0.0}


def rundir_writer(run_dir, every):
    """train.py's EpochWriter writing every `every` seconds."""
    return EpochWriter(run_dir, (), every)


def matmul_tflop_s(rt, steps):
    """TFLOP/s of a square matrix product in the runtime's precision (2048 on a CPU, 8192 on a GPU): the machine's
    arithmetic ceiling, measured in the same run as the rates beside it."""
    side = 8192 if rt.cuda else 2048
    a = torch.randn(side, side).to(rt.device, rt.amp_dtype or torch.float32)
    return timed_steps(lambda: a @ a, rt, steps, 1)[0] * 2 * side ** 3 / 1e12


def train_flop_per_image(cfg):
    """Floating-point operations of one training image (forward + backward, counted by torch's FlopCounterMode on
    the config's network at its input size, an FMA counted as two): the TFLOP/s beside each rate."""
    from torch.utils.flop_counter import FlopCounterMode
    net = build_model(cfg)
    x = torch.randn(2, cfg["input_channels"], cfg["input_h"], cfg["input_w"])
    with FlopCounterMode(display=False) as counter:
        out = net(x)
        final_logits(out, cfg["deep_supervision"]).sum().backward()
    return counter.get_total_flops() / 2


def e2e_rate(cfg, rt, data, epochs, steps=0):
    """Training epochs over the real data set (input pipeline and metrics included) -> {'e2e_img_s': images/s of
    train_one_epoch, 'epoch_s': seconds per training + validation epoch, 'loader': its kind, 'train_images',
    'e2e_over_adjacent_pure': the median over epochs of the epoch's rate over the same engine's pure rate (`steps`
    steps on a fixed batch) measured right after it, a ratio that a load moving between minutes does not blur;
    None with steps 0}."""
    train_data, val_data = split(data, cfg)
    train_loader, val_loader = make_loaders(cfg, train_data, val_data, rt)
    engine = Engine(cfg, rt)
    images = len(train_loader) * cfg["batch_size"]
    x, y = fixed_batch(cfg, rt)
    train_s, epoch_s, files_s, ratios = 0.0, 0.0, 0.0, []
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
                if steps:
                    pure = timed_steps(lambda: engine.train_step(x, y), rt, steps, cfg["batch_size"])[0]
                    ratios.append(images / (t1 - t0) / pure)
        writer.close([])
    return {"e2e_img_s": epochs * images / train_s, "epoch_s": epoch_s / epochs, "files_s_per_epoch": files_s / epochs,
            "loader": train_loader.kind, "train_images": len(train_data.ids),
            "e2e_over_adjacent_pure": statistics.median(ratios) if ratios else None}


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


# How bench.py tells a user to change a data setting (a DataError's setting): it reads one-class PNG data sets only
DATA_FIXES = {
    "data": "pass --data DIR, a folder with images/ and masks/0/ (default: inputs/dsb2018_96)",
    "img_ext": "bench.py reads .png images only: convert them (or time train.py itself)",
    "mask_ext": "bench.py reads .png masks only: convert them (or time train.py itself)",
    "input_channels": "bench.py trains on RGB: convert the images",
    "num_classes": "bench.py trains one class: point --data at a data set with masks/0 only",
}


def data_fix(error):
    """bench.py's words for the change that fixes a data problem (dataerror.DataError)."""
    return DATA_FIXES.get(error.setting, "")


def predict_rate(cfg, rt, val_data):
    """Images/s of predicting the validation split as val.py does (resizing back, thresholds, metrics and the
    mask files included), with the network's weights as built."""
    model = Predictor(build_network(cfg, rt), describe(cfg, val_data.dtypes)).eval()
    runs, options, opts = [TrainedRun("bench", cfg, rt, model)], PredictOptions(), OutputOptions()
    with tempfile.TemporaryDirectory() as out_dir:
        for sub in subfolders(cfg["num_classes"], opts):
            os.makedirs(os.path.join(out_dir, sub))
        with ImageWriter(out_dir, opts) as writer:                                            # warm-up
            evaluate(runs, val_data.subset(val_data.ids[:16]), options, writer, Scores.new(runs))
        rt.synchronize()
        t0 = time.perf_counter()
        with ImageWriter(out_dir, opts) as writer:
            evaluate(runs, val_data, options, writer, Scores.new(runs))
        rt.synchronize()
        return len(val_data.ids) / (time.perf_counter() - t0)


def scaled(data, copies, side):
    """The data set repeated `copies` times with every image and mask resized to side x side."""
    resize = lambda a, interp: cv2.resize(a, (side, side), interpolation=interp).reshape(side, side, -1)  # noqa: E731
    ids = [f"{i}_{c}" for c in range(copies) for i in data.ids]
    images = [resize(data.image(k), cv2.INTER_LINEAR) for _ in range(copies) for k in range(len(data.ids))]
    masks = [resize(data.mask(k), cv2.INTER_NEAREST) for _ in range(copies) for k in range(len(data.ids))]
    return SegmentationData(ids, images, masks)


def scaling_rows(base, data, device, opts):
    """How an epoch's cost grows with the image count (x1, x4) and the pixels per image (96, 192, 384)."""
    for arch in opts.archs.split(","):
        for copies, side in ((1, 96), (4, 96), (1, 192), (1, 384)):
            cfg = config.check({**base, "device": str(device), "arch": arch, "deep_supervision": False,
                                "input_h": side, "input_w": side, "batch_size": opts.batch_size or base["batch_size"]})
            rt = runtime.build(device, cfg)
            if rt.cuda:
                torch.cuda.reset_peak_memory_stats(device)
            d = scaled(data, copies, side)
            e2e = e2e_rate(cfg, rt, d, opts.epochs)
            yield {"case": f"scaling-{arch}-x{copies}-{side}px", "device": device_name(rt), "arch": arch,
                   "images": len(d.ids), "train_images": e2e["train_images"], "input": side,
                   "batch_size": cfg["batch_size"], "loader": e2e["loader"], "e2e_img_s": round(e2e["e2e_img_s"], 1),
                   "train_epoch_s": round(e2e["train_images"] / e2e["e2e_img_s"], 3),
                   "epoch_s": round(e2e["epoch_s"], 3), "peak_mem_mb": round(peak_memory_mb(rt), 1)}


PHASES = ("data", "place", "forward", "backward", "optimizer", "ema", "metrics", "sync")   # engine's labels


class Labelled:
    """A loader whose batches are fetched inside a profiler range named `name` (the loader's own work: batching,
    augmentation, normalisation, or waiting for the workers)."""

    def __init__(self, loader, name="data"):
        self.loader, self.name = loader, name

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        batches = iter(self.loader)
        while True:
            with record_function(self.name):
                batch = next(batches, None)
            if batch is None:
                return
            yield batch


def profile_rows(base, data, device, opts):
    """One training epoch under the torch profiler (after a warm-up epoch) per architecture: seconds and share of
    the epoch in each phase that engine.train_one_epoch labels, the unlabelled rest (the loop, tqdm, Python), the
    same epoch's rate unprofiled, the pure rate of the step beside it, and the operators with most self time."""
    for arch in opts.archs.split(","):
        cfg = config.check({**base, **overrides_from(opts, device), "arch": arch, "deep_supervision": False})
        rt = runtime.build(device, cfg)
        pure = pure_rate(cfg, rt, opts.steps)
        train_data, val_data = split(data, cfg)
        train_loader, _ = make_loaders(cfg, train_data, val_data, rt)
        engine = Engine(cfg, rt)
        loader = Labelled(train_loader)
        seconds = []
        for epoch in range(3):                     # 0 warms up, 1 unprofiled, 2 profiled
            train_loader.set_epoch(epoch)
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) if epoch == 2 \
                    else contextlib.nullcontext() as prof:
                t0 = time.perf_counter()
                engine.train_one_epoch(loader, epoch)
                rt.synchronize()
                seconds.append(time.perf_counter() - t0)
        yield profile_row(cfg, rt, prof, seconds[1], seconds[2], len(train_loader) * cfg["batch_size"], pure)


def profile_row(cfg, rt, prof, plain_s, profiled_s, images, pure):
    """The JSON row of profile_rows from the profiler's averages (times in its microseconds)."""
    events = prof.key_averages()
    phase_s = {e.key: e.cpu_time_total / 1e6 for e in events if e.key in PHASES}
    phase_s = {k: phase_s.get(k, 0.0) for k in PHASES}
    rest = profiled_s - sum(phase_s.values())
    top = sorted((e for e in events if e.key not in PHASES), key=lambda e: e.self_cpu_time_total, reverse=True)
    return {"case": f"profile-{cfg['arch']}-b{cfg['batch_size']}-{rt.precision_name()}-{cfg['input_h']}px",
            "device": device_name(rt), "images": images, "epoch_s": round(plain_s, 3),
            "e2e_img_s": round(images / plain_s, 1), "pure_img_s": round(pure, 1),
            "e2e_over_pure": round(images / plain_s / pure, 3), "profiled_epoch_s": round(profiled_s, 3),
            "phases_s": {k: round(v, 4) for k, v in {**phase_s, "rest": rest}.items()},
            "phases_share": {k: round(v / profiled_s, 4) for k, v in {**phase_s, "rest": rest}.items()},
            "top_self_ops_s": {e.key: round(e.self_cpu_time_total / 1e6, 3) for e in top[:12]},
            "torch": torch.__version__}


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


def decode_rows(data, opts):
    """Seconds of the start-up check (scan + decode + every check, as train.py does it) of the PNG data set and of
    its 16-bit TIFF copy, best of 5 each, interleaved so that both see the same machine load."""
    out = opts.keep_tiff or tempfile.mkdtemp(prefix="tif16_")
    write_tiff16(data, out)
    sets = {"png8": (opts.data, ".png"), "tiff16_labels": (out, ".tif")}
    best = {name: float("inf") for name in sets}
    for _ in range(5):
        for name, (root, ext) in sets.items():
            t0 = time.perf_counter()
            SegmentationData.decode(scan(root, ext, ".png", 1), 3, None, root)
            best[name] = min(best[name], time.perf_counter() - t0)
    yield {"case": "decode", "images": len(data.ids), "png8_s": round(best["png8"], 3),
           "tiff16_labels_s": round(best["tiff16_labels"], 3),
           "tiff_over_png": round(best["tiff16_labels"] / best["png8"], 2), "threads": os.cpu_count(),
           "tiff_copy": out if opts.keep_tiff else None}
    if not opts.keep_tiff:
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
    p.add_argument("--cuda_graph", choices=("on", "off"), help="override the recipe's --cuda_graph")
    p.add_argument("--save_every", type=float, help="override the recipe's --save_every (seconds; 0: every epoch)")
    p.add_argument("--epochs", type=int, default=3, help="timed epochs for e2e_img_s (after one warm-up)")
    p.add_argument("--steps", type=int, default=30, help="timed steps for pure_img_s")
    p.add_argument("--quick", action="store_true", help="64 images at 64x64, batch 8, 1 epoch: a CPU smoke run")
    p.add_argument("--time_to_iou", type=float, help="also run train.py on the recipe and time it to this val IoU")
    p.add_argument("--seeds", type=config.parse_int_list, metavar="S,S,...",
                   help="with --time_to_iou: one timed training per seed (e.g. 0,1,2), instead of the recipe's seed")
    p.add_argument("--scaling", action="store_true",
                   help="instead: epoch cost against image count (x1, x4) and image side (96, 192, 384)")
    p.add_argument("--decode", action="store_true",
                   help="instead: the start-up check's seconds for the data set and for its 16-bit TIFF copy")
    p.add_argument("--variants", metavar="NAMES",
                   help=f"instead: training-step variants beside a plain eager loop: all, or some of {','.join(VARIANTS)}")
    p.add_argument("--profile", action="store_true",
                   help="instead: where one training epoch's time goes (torch profiler), per architecture")
    p.add_argument("--limits", action="store_true",
                   help="instead: each convolution of the network timed alone, and the images/s of its convolutions only")
    p.add_argument("--fixed_costs", action="store_true",
                   help="instead: what an epoch costs besides the network (a 4-channel network at 32 px), part by part")
    p.add_argument("--keep_tiff", metavar="DIR", help="with --decode: write the 16-bit TIFF copy here and keep it")
    p.add_argument("--images", type=int, help="use only the first N images of the data set")
    p.add_argument("--out", help="append the JSON lines to this file too")
    args = p.parse_args(argv)
    for flag in ("epochs", "steps", "images"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            p.error(f"--{flag} must be at least 1")
    if args.time_to_iou is not None and not 0 < args.time_to_iou <= 1:
        p.error("--time_to_iou is a validation IoU: between 0 and 1")
    if args.quick:
        args.epochs, args.steps = 1, 12       # --quick: one timed epoch, a few steps
    opts = BenchOptions(**vars(args))
    if opts.amps and instead_of_rates(opts):
        p.error(f"--amps compares precisions in the rate rows; --{instead_of_rates(opts)} measures one: pass --amp "
                "(e.g. --amp off)")
    return opts


@dataclass(frozen=True)
class BenchOptions:
    """bench.py's flags, as its functions take them (see parse_args for each one's meaning)."""
    device: str = "auto"
    data: str = DEFAULT_DATA
    archs: str = "UNet,NestedUNet"
    recipe: str = RECIPE
    batch_size: int = None        # None: the recipe's (so too amp, loader, memory_format, cuda_graph, save_every)
    amp: str = None
    amps: str = None
    loader: str = None
    memory_format: str = None
    compile: bool = False
    cuda_graph: str = None
    save_every: float = None
    epochs: int = 3
    steps: int = 30
    quick: bool = False
    time_to_iou: float = None
    seeds: list = None
    scaling: bool = False
    decode: bool = False
    variants: str = None
    profile: bool = False
    limits: bool = False
    fixed_costs: bool = False
    keep_tiff: str = None
    images: int = None
    out: str = None


def instead_of_rates(opts):
    """The mode asked for instead of the rate rows (scaling, decode, variants, profile, limits, fixed_costs), or None."""
    return next((m for m in ("scaling", "decode", "variants", "profile", "limits", "fixed_costs") if getattr(opts, m)),
                None)


def overrides_from(opts, device):
    """The recipe settings that the command line changes."""
    overrides = {"device": str(device)}
    for key in ("batch_size", "amp", "loader", "memory_format", "cuda_graph", "save_every"):
        if getattr(opts, key) is not None:
            overrides[key] = getattr(opts, key)
    if opts.compile:
        overrides["compile"] = True
    if opts.quick:
        overrides.update(input_h=64, input_w=64, batch_size=opts.batch_size or 8)
    return overrides


def case_row(cfg, rt, data, opts):
    """One JSON row: the pure and end-to-end rates of cfg's architecture (and, if asked, its time to an IoU)."""
    arch = cfg["arch"]
    if rt.cuda:
        torch.cuda.reset_peak_memory_stats(rt.device)
    pure = pure_rate(cfg, rt, opts.steps)
    reference = reference_rate(cfg, rt, opts.steps)
    e2e = e2e_rate(cfg, rt, data, opts.epochs, opts.steps)
    tflop = train_flop_per_image(cfg) / 1e12
    row = {"case": f"{arch}-b{cfg['batch_size']}-{rt.precision_name()}{'-compile' if cfg['compile'] else ''}"
                   f"-{cfg['input_h']}px",
           "device": device_name(rt), "arch": arch, "batch_size": cfg["batch_size"], "input": cfg["input_h"],
           "precision": rt.precision_name(), "channels_last": rt.channels_last, "loader": e2e["loader"],
           "train_images": e2e["train_images"], "pure_img_s": round(pure, 1), "e2e_img_s": round(e2e["e2e_img_s"], 1),
           "e2e_over_pure": round(e2e["e2e_img_s"] / pure, 3),
           "e2e_over_adjacent_pure": round(e2e["e2e_over_adjacent_pure"], 3), "reference_img_s": round(reference, 1),
           "e2e_over_reference": round(e2e["e2e_img_s"] / reference, 3),
           "e2e_tflop_s": round(e2e["e2e_img_s"] * tflop, 3), "gflop_per_image": round(tflop * 1e3, 2),
           "matmul_tflop_s": round(matmul_tflop_s(rt, opts.steps), 1), "cuda_graph": cfg["cuda_graph"],
           "epoch_s": round(e2e["epoch_s"], 3),
           "files_s_per_epoch": round(e2e["files_s_per_epoch"], 4),
           "predict_img_s": round(predict_rate(cfg, rt, split(data, cfg)[1]), 1),
           "peak_mem_mb": round(peak_memory_mb(rt), 1), "torch": torch.__version__}
    extra = ["--arch", arch, "--amp", cfg["amp"], "--memory_format", cfg["memory_format"]]
    extra += ["--input_h", "64", "--input_w", "64"] if opts.quick else []
    if opts.time_to_iou is None or opts.seeds is None:
        row.update(timed_run(opts.recipe, opts.data, rt.device, extra, opts.time_to_iou))
    else:                                     # one timed training per seed, one after the other
        runs = [{"seed": seed, **timed_run(opts.recipe, opts.data, rt.device, extra + ["--seed", str(seed)],
                                           opts.time_to_iou)} for seed in opts.seeds]
        row.update(startup_s=runs[0]["startup_s"], target_iou=opts.time_to_iou, runs=runs)
    return row


def check_outputs(opts):
    """--out (a file the JSON lines are appended to) and --keep_tiff (a new folder), checked before minutes of
    measuring: never inside a data set, a run folder or an export (outputs.check_place), a file where a file goes
    and a folder where a folder goes, in a folder that exists."""
    if opts.out:
        check_place(opts.out, f"--out {opts.out}", "bench.py", "Pass --out to a file of its own, e.g. bench.jsonl")
        folder = os.path.dirname(os.path.abspath(opts.out))
        if os.path.isdir(opts.out) or not os.path.isdir(folder):
            why = "is a folder" if os.path.isdir(opts.out) else \
                f"is in {folder}, which {'is not a folder' if os.path.exists(folder) else 'does not exist'}"
            raise UserError(f"--out {opts.out} {why}; pass a file (the JSON lines are appended to it) in a folder "
                            "that exists")
    if opts.keep_tiff:
        if os.path.exists(opts.keep_tiff) and (not os.path.isdir(opts.keep_tiff) or os.listdir(opts.keep_tiff)):
            raise UserError(f"--keep_tiff {opts.keep_tiff} is not an empty folder; pass a new folder (nothing in it "
                            "is replaced)")
        check_place(opts.keep_tiff, f"--keep_tiff {opts.keep_tiff}", "bench.py", "Pass --keep_tiff to a new folder "
                    "of its own")


def benchmark(opts):
    check_outputs(opts)
    if opts.seeds and opts.time_to_iou is None:
        raise UserError("--seeds times one training per seed to --time_to_iou: pass --time_to_iou too (e.g. 0.80)")
    device = resolve_device(opts.device)
    base = config.load_run_config(opts.recipe)
    data = SegmentationData.decode(scan(opts.data, ".png", ".png", 1), 3, None, opts.data)
    base["normalize"] = resolve_mode(base["normalize"], data.dtypes)
    overrides = overrides_from(opts, device)
    if opts.images:
        data = data.subset(data.ids[:opts.images])
    if opts.quick:
        data = data.subset(data.ids[:64])
    if instead_of_rates(opts):
        rows = (scaling_rows(base, data, device, opts) if opts.scaling else
                profile_rows(base, data, device, opts) if opts.profile else
                variant_rows(base, device, opts) if opts.variants else
                limit_rows(base, device, opts) if opts.limits else
                fixed_cost_rows(base, data, device, opts) if opts.fixed_costs else decode_rows(data, opts))
        for row in rows:
            emit(row, opts.out)
        return
    for arch in opts.archs.split(","):
        for amp in opts.amps.split(",") if opts.amps else [overrides.get("amp", base["amp"])]:
            cfg = config.check({**base, **overrides, "amp": amp, "arch": arch, "deep_supervision": False})
            emit(case_row(cfg, runtime.build(device, cfg), data, opts), opts.out)


def main(argv=None):
    with exit_on_user_error(), worded(data_fix):
        benchmark(parse_args(argv))


def emit(row, path):
    """One JSON line on stdout (and appended to `path`)."""
    line = json.dumps(row)
    print(line, flush=True)
    if path:
        with open(path, "a") as f:
            f.write(line + "\n")


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.default_int_handler)   # from here on, main() handles Ctrl-C and SIGTERM
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    main()
