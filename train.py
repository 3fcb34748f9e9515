"""Train a U-Net / UNet++ on <data_dir>/<dataset>; everything the run produces goes to models/<name>/.

    python train.py --arch NestedUNet --dataset dsb2018_96
    python train.py --config models/<name>/config.yml --name other --epochs 5
    python train.py --name <name> --resume

Writes config.yml, log.csv, model.pth (best val_iou, plain state_dict), last.pth (full training
state) and curves.png, each atomically, every epoch. The training step, the epoch and the
validation pass are in engine.py; this script is the command line, the run folder and the loop.
"""
import os
import sys
import time
import warnings

import checkpoint
import config
import distributed
import rundir
import runtime
from dataset import load_splits
from engine import Engine
from loaders import make_loaders
from utils import Interrupts, UserError, count_params, exit_on_user_error, plain_warning


def check_batch_size(cfg, train_data, val_data):
    """A batch larger than the training split would drop every batch (the last partial one is dropped)."""
    n_train, n_all = len(train_data.ids), len(train_data.ids) + len(val_data.ids)
    if cfg["batch_size"] > n_train:
        raise UserError(f"--batch_size {cfg['batch_size']} is larger than the training split ({n_train} of "
                        f"{n_all} images in {os.path.join(cfg['data_dir'], cfg['dataset'])}); every batch would be "
                        f"dropped. Use --batch_size {n_train} or less.")


def train(cfg, run, interrupts=None):
    """The whole run: data, model, loop, files. Returns the best validation IoU.

    interrupts (an installed utils.Interrupts) keeps Ctrl-C from splitting an epoch's files.
    Under torchrun every process trains its shard; only the first writes files and prints.
    """
    rt = runtime.for_training(cfg)
    try:
        return fit(cfg, run, rt, interrupts or Interrupts())
    finally:
        distributed.cleanup(rt)


def start(cfg, run, rt):
    """Everything before the first epoch, every check first: -> (engine, train loader, validation loader)."""
    if cfg["sync_bn"] and rt.active and not rt.cuda:
        raise UserError("--sync_bn needs CUDA GPUs (torch's SyncBatchNorm has no CPU implementation); drop it on CPU")
    train_data, val_data = load_splits(cfg)           # before touching models/: bad data changes nothing
    check_batch_size(cfg, train_data, val_data)
    run_dir = os.path.join(config.RUNS_DIR, cfg["name"])
    rundir.prepare(run_dir, run, write=rt.main)
    engine = Engine(cfg, rt)
    train_loader, val_loader = make_loaders(cfg, train_data, val_data, rt)
    if run["resume"]:
        if rt.main:
            rundir.repair(run_dir)    # an epoch whose files a kill cut short is completed first
        last = os.path.join(run_dir, "last.pth")
        engine.load_state_dict(checkpoint.load(last), last)
    if rt.main:
        rundir.save_start(run_dir, engine, run["resume"])
        print(f"{cfg['arch']} ({count_params(engine.model) / 1e6:.2f} M parameters) on {rt.describe()}; "
              f"{len(train_data.ids)} training, {len(val_data.ids)} validation images (loader {train_loader.kind}); "
              f"run folder {run_dir}" + (f"; resuming after epoch {engine.epoch}" if run["resume"] else ""), flush=True)
    return engine, train_loader, val_loader


def fit(cfg, run, rt, interrupts):
    run_dir = os.path.join(config.RUNS_DIR, cfg["name"])
    engine, train_loader, val_loader = start(cfg, run, rt)
    loop(cfg, engine, (train_loader, val_loader), run_dir, interrupts)
    if rt.main and engine.should_stop():
        print(f"early stopping: no better val_iou for {engine.best['stale']} epochs")
    if rt.main:
        print(f"best val_iou {engine.best['iou']:.4f} at epoch {engine.best['epoch']}; model: {run_dir}/model.pth; "
              f"evaluate with: python val.py --name {cfg['name']}")
    return engine.best["iou"]


def loop(cfg, engine, loaders, run_dir, interrupts):
    """The epochs: train, validate, step the schedule, save the epoch's files, print a line."""
    train_loader, val_loader = loaders
    for epoch in range(engine.epoch + 1, cfg["epochs"] + 1):
        if engine.should_stop():
            break
        t0 = time.time()
        train_loader.set_epoch(epoch)   # the epoch's shuffle and augmentation depend on (seed, epoch) only
        lr = engine.lr
        stats = engine.train_one_epoch(train_loader, epoch)
        stats.update(engine.validate(val_loader))
        engine.step_scheduler(stats["val_loss"])
        improved = engine.end_epoch(epoch, lr, stats, time.time() - t0)
        if not engine.rt.main:
            continue
        with interrupts.deferred():   # the epoch's files are saved as a whole, even if Ctrl-C comes now
            rundir.save_epoch(run_dir, engine.state_dict(), improved)
        print(f"epoch {epoch}/{cfg['epochs']}  lr {lr:.2e}  loss {stats['loss']:.4f}  iou {stats['iou']:.4f}  "
              f"val_loss {stats['val_loss']:.4f}  val_iou {stats['val_iou']:.4f}  val_dice {stats['val_dice']:.4f}  "
              f"{engine.rows[-1]['seconds']:.1f}s{'  *best*' if improved else ''}", flush=True)


def torchrun_failure(e, cfg):
    """Under torchrun a RuntimeError usually means another process died and the collectives broke off."""
    name = cfg["name"] if cfg else "<name>"
    first_line = str(e).strip().splitlines()[0][:300]
    return (f"error: [rank {os.environ.get('RANK')}] training stopped: {first_line}\n"
            f"If another process failed, torchrun's summary below names it. models/{name}/last.pth holds the last "
            "finished epoch: rerun the same torchrun command with --resume.")


def main(argv=None):
    interrupts = Interrupts()
    interrupts.install()          # Ctrl-C and SIGTERM (e.g. from a job scheduler) stop cleanly
    warnings.formatwarning = plain_warning
    first_process = os.environ.get("RANK", "0") == "0"   # under torchrun every process meets the same error
    cfg = None
    try:
        with exit_on_user_error(quiet=not first_process):
            cfg, run = config.resolve(argv)
            print("config: " + ", ".join(f"{k}={v}" for k, v in cfg.items()), flush=True)
            train(cfg, run, interrupts)
    except RuntimeError as e:
        if int(os.environ.get("WORLD_SIZE", "1")) == 1:
            raise
        print(torchrun_failure(e, cfg), file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        if cfg is not None and first_process:
            again = (f"python train.py --name {cfg['name']} --resume" if "WORLD_SIZE" not in os.environ
                     else "the same torchrun command with --resume added")
            print(f"\ninterrupted: models/{cfg['name']}/last.pth holds the last finished epoch; continue with\n"
                  f"    {again}", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
