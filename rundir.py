"""The run folder models/<name>/: what a run writes there, and the rules that protect what is there.

    config.yml   the full resolved config                      log.csv     one row per epoch
    model.pth    best val_iou, a plain state_dict               curves.png  loss and IoU curves
    last.pth     Engine.state_dict(): everything --resume needs

Every file is written atomically (temporary file, then rename). An epoch's files are written in
the order last.pth, model.pth, log.csv, so a log.csv that lags behind last.pth means the process
died mid-epoch-save; repair() completes that epoch from last.pth (--resume and val.py call it).
"""
import os
import shutil

import checkpoint
from runlog import plot_curves, read_log, write_log
from utils import UserError, save_yaml

RUN_FILES = ("config.yml", "log.csv", "model.pth", "last.pth", "curves.png")


def prepare(run_dir, run, write):
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


def save_start(run_dir, engine, resume):
    """config.yml, and for a new run an epoch-0 last.pth, so that even a run stopped in its first epoch can --resume."""
    save_yaml(os.path.join(run_dir, "config.yml"), engine.cfg)
    if not resume:
        checkpoint.save(engine.state_dict(), os.path.join(run_dir, "last.pth"))


def write_epoch(run_dir, state, improved):
    """One epoch's files from a last.pth state: last.pth, then model.pth (if the score improved), then log.csv."""
    checkpoint.save(state, os.path.join(run_dir, "last.pth"))
    if improved:
        checkpoint.save(state["model"], os.path.join(run_dir, "model.pth"))
    write_log(os.path.join(run_dir, "log.csv"), state["log"])


def save_epoch(run_dir, state, improved):
    """write_epoch(), then curves.png."""
    write_epoch(run_dir, state, improved)
    plot_curves(os.path.join(run_dir, "curves.png"), state["log"])


def repair(run_dir):
    """Completes an epoch whose files a kill cut short (log.csv behind last.pth); -> the epoch repaired, or None."""
    last = os.path.join(run_dir, "last.pth")
    if not os.path.isfile(last):
        return None
    state = checkpoint.load(last)
    if len(read_log(os.path.join(run_dir, "log.csv"))) >= len(state["log"]):
        return None
    improved = state["best_epoch"] == state["epoch"] > 0
    write_epoch(run_dir, state, improved)
    return state["epoch"]
