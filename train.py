"""Train a U-Net / UNet++ on <data_dir>/<dataset>; everything the run produces goes to models/<name>/.

    python train.py --arch NestedUNet --dataset dsb2018_96
    python train.py --config models/<name>/config.yml --name other --epochs 5
    python train.py --name <name> --resume

Writes config.yml, log.csv, model.pth (best val_iou, plain state_dict), last.pth (full training
state) and curves.png, each atomically, every epoch.
"""
import math
import os
import shutil
import sys
import time
import warnings

import torch
from tqdm import tqdm

import checkpoint
import config
import distributed
from archs import build_model
from dataset import SegmentationData, cache_budget, choose_loader, make_loader, split_ids
from losses import LOSSES
from metrics import SegMeter, binarize
from runlog import plot_curves, write_log
from utils import Interrupts, UserError, count_params, plain_warning, save_yaml, seed_everything

RUN_FILES = ("config.yml", "log.csv", "model.pth", "last.pth", "curves.png")
SYNC_EVERY = 10  # batches between host syncs (progress bar, NaN check): syncing each batch stalls a GPU


class TrainingDiverged(UserError):
    """The loss became NaN or Inf."""


def build_optimizer(cfg, params, device):
    """The optimizer; on CUDA the fused (single-kernel) implementations where torch has them."""
    name, lr, wd, fused = cfg["optimizer"], cfg["lr"], cfg["weight_decay"], device.type == "cuda"
    if name == "SGD":
        return torch.optim.SGD(params, lr=lr, momentum=cfg["momentum"], nesterov=cfg["nesterov"], weight_decay=wd,
                               fused=fused or None)
    if name == "Adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=wd, fused=fused or None)
    if name == "AdamW":
        return torch.optim.AdamW(params, lr=lr, weight_decay=wd, fused=fused or None)
    return torch.optim.RMSprop(params, lr=lr, momentum=cfg["momentum"], weight_decay=wd)


def build_scheduler(cfg, optimizer):
    """Stepped once per epoch (ReduceLROnPlateau on the validation loss)."""
    name = cfg["scheduler"]
    if name == "CosineAnnealingLR":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=cfg["epochs"], eta_min=cfg["min_lr"])
    if name == "ReduceLROnPlateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, factor=cfg["factor"], patience=cfg["patience"],
                                                          min_lr=cfg["min_lr"])
    if name == "MultiStepLR":
        return torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=cfg["milestones"], gamma=cfg["gamma"])
    return torch.optim.lr_scheduler.ConstantLR(optimizer, factor=1.0, total_iters=0)


def resolve_amp(amp, device):
    """--amp -> autocast dtype, or None for full precision."""
    if amp == "off" or (amp == "auto" and device.type != "cuda"):
        return None
    if amp == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if amp == "fp16" and device.type != "cuda":
        raise UserError("--amp fp16 needs a CUDA GPU; on CPU use --amp bf16 or --amp off")
    return torch.bfloat16 if amp == "bf16" else torch.float16


def forward_loss(model, images, masks, criterion, deep_supervision):
    """-> (loss, logits of the final head). Deep supervision averages the loss over the 4 heads."""
    outputs = model(images)
    if deep_supervision:
        loss = sum(criterion(o, masks) for o in outputs) / len(outputs)
        return loss, outputs[-1]
    return criterion(outputs, masks), outputs


def train_one_epoch(model, loader, criterion, optimizer, scaler, device, amp_dtype, cfg, epoch, ctx=None):
    """One pass over the training split; returns {'loss', 'iou'} (data-set-level IoU of the batches seen)."""
    ctx = ctx or distributed.Context()
    model.train()
    meter = SegMeter(cfg["num_classes"], device)
    batch_losses, sizes = [], []   # kept on the device; read every SYNC_EVERY batches
    bar = tqdm(loader, desc=f"epoch {epoch}/{cfg['epochs']}", leave=False, dynamic_ncols=True,
               disable=None if ctx.main else True)   # no bar in logs, nor on other processes than the first
    for step, (images, masks, _) in enumerate(bar, 1):
        images = images.to(device, non_blocking=True)   # (B, C_in, H, W)
        masks = masks.to(device, non_blocking=True)     # (B, C, H, W)
        if device.type == "cuda":
            images = images.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            loss, logits = forward_loss(model, images, masks, criterion, cfg["deep_supervision"])
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()    # the scaler is a no-op unless --amp fp16; under DDP this all-reduces gradients
        scaler.step(optimizer)
        scaler.update()

        batch_losses.append(loss.detach())
        sizes.append(images.shape[0])
        meter.update(binarize(logits.detach(), cfg["class_mode"]), masks)
        if step % SYNC_EVERY == 0 or step == len(loader):
            mean_loss = check_finite(batch_losses, sizes, epoch)
            bar.set_postfix(loss=f"{mean_loss:.4f}", iou=f"{meter.iou():.4f}")
    loss_sum = check_finite(batch_losses, sizes, epoch) * sum(sizes)
    mean_loss = reduce_totals(meter, loss_sum, sum(sizes), ctx)   # over all processes: then the IoU
    return {"loss": mean_loss, "iou": meter.iou()}


def check_finite(batch_losses, sizes, epoch):
    """Mean loss so far (weighted by batch size); raises TrainingDiverged naming the first bad batch."""
    values = torch.stack(batch_losses).float().tolist()
    for i, v in enumerate(values, 1):
        if not math.isfinite(v):
            raise TrainingDiverged(f"the loss became {v} at epoch {epoch}, batch {i}; training stopped. "
                                   "The checkpoints on disk are from the last good epoch. Lower --lr "
                                   "(or try --amp off), then rerun with --overwrite or --resume.")
    return sum(v * n for v, n in zip(values, sizes)) / sum(sizes)


def reduce_totals(meter, loss_sum, count, ctx):
    """Sums the metric counts, loss and image count over all processes (in place in meter); -> mean loss."""
    totals = torch.tensor([float(loss_sum), float(count)], dtype=torch.float64, device=meter.sums.device)
    distributed.all_reduce_sum(meter.sums, ctx)
    distributed.all_reduce_sum(totals, ctx)
    return (totals[0] / totals[1]).item()


@torch.no_grad()
def validate(model, loader, criterion, device, amp_dtype, cfg, ctx=None):
    """Loss and data-set-level IoU/Dice (mean over classes) on the validation split (all processes' shards)."""
    model.eval()
    meter = SegMeter(cfg["num_classes"], device)
    total_loss, count = torch.zeros((), device=device), 0
    for images, masks, _ in loader:
        images, masks = images.to(device, non_blocking=True), masks.to(device, non_blocking=True)
        if device.type == "cuda":
            images = images.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            loss, logits = forward_loss(model, images, masks, criterion, cfg["deep_supervision"])
        total_loss += loss.float() * images.shape[0]
        count += images.shape[0]
        meter.update(binarize(logits.float(), cfg["class_mode"]), masks)
    val_loss = reduce_totals(meter, total_loss.item(), count, ctx or distributed.Context())
    iou, dice = meter.dataset_scores()
    return {"val_loss": val_loss, "val_iou": iou.mean().item(), "val_dice": dice.mean().item()}


def load_data(cfg):
    """Validated, decoded train and validation splits (every data problem is reported here)."""
    root = os.path.join(cfg["data_dir"], cfg["dataset"])
    data = SegmentationData.from_folder(root, cfg["img_ext"], cfg["mask_ext"], cfg["num_classes"], cfg["input_channels"],
                                        cache_budget(cfg["cache_mb"]))
    train_ids, val_ids = split_ids(data.ids, cfg["val_split"], cfg["split_seed"])
    if cfg["batch_size"] > len(train_ids):
        raise UserError(f"--batch_size {cfg['batch_size']} is larger than the training split ({len(train_ids)} of "
                        f"{len(data.ids)} images in {root}); every batch would be dropped. Use --batch_size "
                        f"{len(train_ids)} or less.")
    return data.subset(train_ids), data.subset(val_ids)


def make_loaders(cfg, train_data, val_data, device, ctx=None):
    """Training loader (reshuffled per epoch, last partial batch dropped) and validation loader, of one kind."""
    ctx = ctx or distributed.Context()
    kind = choose_loader(cfg["loader"], train_data, cfg, device)
    return (make_loader(kind, train_data, cfg, device, True, ctx.rank, ctx.world),
            make_loader(kind, val_data, cfg, device, False, ctx.rank, ctx.world))


def prepare_run_dir(run_dir, run, write):
    """Refuses to touch an existing run unless --resume or --overwrite says so (checked in every process);
    `write`: this process clears and creates the folder (the first process only, under torchrun)."""
    existing = [f for f in RUN_FILES if os.path.exists(os.path.join(run_dir, f))]
    if run["resume"]:
        if not os.path.isfile(os.path.join(run_dir, "last.pth")):
            raise UserError(f"--resume: {run_dir}/last.pth does not exist, so there is nothing to resume. "
                            "Train without --resume (add --overwrite to replace what is there).")
        for f in os.listdir(run_dir) if write else []:   # temporary files of writes that a kill cut short
            if f.startswith(".") and f.endswith(".tmp"):
                os.remove(os.path.join(run_dir, f))
        return
    if existing and not run["overwrite"]:
        raise UserError(f"{run_dir} already holds a run ({', '.join(existing)}). Pass --resume to continue it, "
                        "--overwrite to replace it, or --name to train under another name.")
    if not write:
        return
    if existing:
        shutil.rmtree(run_dir)
    os.makedirs(run_dir, exist_ok=True)


def training_state(model, optimizer, scheduler, scaler, cfg, epoch, best, rows):
    return {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict(), "epoch": epoch, "best_iou": best["iou"], "best_epoch": best["epoch"],
            "stale_epochs": best["stale"], "log": rows, "rng": checkpoint.rng_state(), "config": cfg}


def restore(path, model, optimizer, scheduler, scaler, cfg):
    """Loads last.pth into the objects; returns (epoch done, best dict, log rows)."""
    state = checkpoint.load(path)
    checkpoint.load_weights(model, state["model"], path)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    if hasattr(scheduler, "T_max"):
        scheduler.T_max = cfg["epochs"]  # --epochs may be raised on resume: the cosine stretches to the new end
    scaler.load_state_dict(state["scaler"])
    checkpoint.set_rng_state(state["rng"])
    best = {"iou": state["best_iou"], "epoch": state["best_epoch"], "stale": state["stale_epochs"]}
    return state["epoch"], best, state["log"]


def build_training(cfg, ctx):
    """-> model (whose weights are saved), net (what runs the steps: DDP and/or compiled), loss, optimizer,
    scheduler, AMP scaler."""
    seed_everything(cfg["seed"])   # the same initial weights in every process
    if cfg["deterministic"]:
        torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = not cfg["deterministic"]
    model = build_model(cfg)
    if ctx.active and cfg["sync_bn"]:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model = model.to(ctx.device)
    if ctx.device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)   # cudnn's fastest layout for these convolutions
    net = distributed.wrap(model, ctx)
    net = torch.compile(net) if cfg["compile"] else net
    optimizer = build_optimizer(cfg, model.parameters(), ctx.device)
    scaler = torch.amp.GradScaler(ctx.device.type, enabled=resolve_amp(cfg["amp"], ctx.device) == torch.float16)
    return model, net, LOSSES[cfg["loss"]](), optimizer, build_scheduler(cfg, optimizer), scaler


def train(cfg, run, interrupts=None):
    """The whole run: data, model, loop, files. Returns the best validation IoU.

    interrupts (an installed utils.Interrupts) keeps Ctrl-C from splitting an epoch's files.
    Under torchrun every process trains its shard; only the first writes files and prints.
    """
    interrupts = interrupts or Interrupts()
    ctx = distributed.setup(cfg["device"])
    try:
        return fit(cfg, run, ctx, interrupts)
    finally:
        distributed.cleanup(ctx)


def fit(cfg, run, ctx, interrupts):
    run_dir = os.path.join(config.RUNS_DIR, cfg["name"])
    device, amp_dtype = ctx.device, resolve_amp(cfg["amp"], ctx.device)
    if cfg["sync_bn"] and ctx.active and device.type != "cuda":
        raise UserError("--sync_bn needs CUDA GPUs (torch's SyncBatchNorm has no CPU implementation); drop it on CPU")
    train_data, val_data = load_data(cfg)           # before touching models/: bad data changes nothing
    prepare_run_dir(run_dir, run, write=ctx.main)
    model, net, criterion, optimizer, scheduler, scaler = build_training(cfg, ctx)
    train_loader, val_loader = make_loaders(cfg, train_data, val_data, device, ctx)

    start, best, rows = 0, {"iou": -1.0, "epoch": 0, "stale": 0}, []
    if run["resume"]:
        start, best, rows = restore(os.path.join(run_dir, "last.pth"), model, optimizer, scheduler, scaler, cfg)
    if ctx.main:
        save_yaml(os.path.join(run_dir, "config.yml"), cfg)
        if not run["resume"]:  # an epoch-0 state, so that even a run stopped in its first epoch can --resume
            checkpoint.save(training_state(model, optimizer, scheduler, scaler, cfg, 0, best, rows), os.path.join(run_dir, "last.pth"))
        print(f"{cfg['arch']} ({count_params(model) / 1e6:.2f} M parameters) on {device}"
              f"{f' x {ctx.world} processes' if ctx.active else ''}"
              f"{', ' + str(amp_dtype).replace('torch.', '') + ' autocast' if amp_dtype else ''}; "
              f"{len(train_data.ids)} training, {len(val_data.ids)} validation images "
              f"({type(train_loader).__name__}); run folder {run_dir}"
              + (f"; resuming after epoch {start}" if run["resume"] else ""), flush=True)

    for epoch in range(start + 1, cfg["epochs"] + 1):
        if 0 < cfg["early_stopping"] <= best["stale"]:
            break
        t0 = time.time()
        train_loader.set_epoch(epoch)   # the epoch's shuffle and augmentation depend on (seed, epoch) only
        lr = optimizer.param_groups[0]["lr"]
        stats = train_one_epoch(net, train_loader, criterion, optimizer, scaler, device, amp_dtype, cfg, epoch, ctx)
        stats.update(validate(net, val_loader, criterion, device, amp_dtype, cfg, ctx))
        if cfg["scheduler"] == "ReduceLROnPlateau":
            scheduler.step(stats["val_loss"])
        else:
            scheduler.step()

        improved = stats["val_iou"] > best["iou"]
        best = {"iou": stats["val_iou"], "epoch": epoch, "stale": 0} if improved else {**best, "stale": best["stale"] + 1}
        rows.append({"epoch": epoch, "lr": float(f"{lr:.6g}"), **{k: round(v, 6) for k, v in stats.items()},
                     "seconds": round(time.time() - t0, 3)})
        if not ctx.main:
            continue
        with interrupts.deferred():   # the epoch's files are saved as a whole, even if Ctrl-C comes now
            write_log(os.path.join(run_dir, "log.csv"), rows)
            if improved:
                checkpoint.save(model.state_dict(), os.path.join(run_dir, "model.pth"))
            checkpoint.save(training_state(model, optimizer, scheduler, scaler, cfg, epoch, best, rows),
                            os.path.join(run_dir, "last.pth"))
            plot_curves(os.path.join(run_dir, "curves.png"), rows)
        print(f"epoch {epoch}/{cfg['epochs']}  lr {lr:.2e}  loss {stats['loss']:.4f}  iou {stats['iou']:.4f}  "
              f"val_loss {stats['val_loss']:.4f}  val_iou {stats['val_iou']:.4f}  val_dice {stats['val_dice']:.4f}  "
              f"{rows[-1]['seconds']:.1f}s{'  *best*' if improved else ''}", flush=True)

    if ctx.main and 0 < cfg["early_stopping"] <= best["stale"]:
        print(f"early stopping: no better val_iou for {best['stale']} epochs")
    if ctx.main:
        print(f"best val_iou {best['iou']:.4f} at epoch {best['epoch']}; model: {run_dir}/model.pth; "
              f"evaluate with: python val.py --name {cfg['name']}")
    return best["iou"]


def main(argv=None):
    interrupts = Interrupts()
    interrupts.install()          # Ctrl-C and SIGTERM (e.g. from a job scheduler) stop cleanly
    warnings.formatwarning = plain_warning
    cfg = None
    try:
        cfg, run = config.resolve(argv)
        print("config: " + ", ".join(f"{k}={v}" for k, v in cfg.items()), flush=True)
        train(cfg, run, interrupts)
    except UserError as e:
        if os.environ.get("RANK", "0") == "0":   # under torchrun every process meets the same data: one message
            print(f"error: {e}", file=sys.stderr)
        sys.exit(3 if isinstance(e, TrainingDiverged) else 2)
    except RuntimeError as e:
        if int(os.environ.get("WORLD_SIZE", "1")) == 1:
            raise
        # under torchrun: usually another process died and the collective operations broke off
        name = cfg["name"] if cfg else "<name>"
        first_line = str(e).strip().splitlines()[0][:300]
        print(f"error: [rank {os.environ.get('RANK')}] training stopped: {first_line}\n"
              f"If another process failed, torchrun's summary below names it. models/{name}/last.pth holds the last "
              "finished epoch: rerun the same torchrun command with --resume.", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        if cfg is not None and os.environ.get("RANK", "0") == "0":
            again = (f"python train.py --name {cfg['name']} --resume" if "WORLD_SIZE" not in os.environ
                     else "the same torchrun command with --resume added")
            print(f"\ninterrupted: models/{cfg['name']}/last.pth holds the last finished epoch; continue with\n"
                  f"    {again}", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
