"""Train a U-Net / UNet++ on <data_dir>/<dataset>; everything the run produces goes to models/<name>/.

    python train.py --arch NestedUNet --dataset dsb2018_96
    python train.py --config models/<name>/config.yml --name other --epochs 5
    python train.py --name <name> --resume

Writes config.yml, log.csv, model.pth (best val_iou, plain state_dict), last.pth (full training
state) and curves.png, each atomically, every epoch. The training step, the epoch and the
validation pass are in engine.py; this script is the command line, the run folder and the loop.
"""
import signal
import sys

if __name__ == "__main__":   # Ctrl-C or SIGTERM while the imports below load (seconds: torch) ends quietly
    signal.signal(signal.SIGINT, lambda *_: sys.exit(130))
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(130))

import os
import time
import warnings

import torch

import advice
import checkpoint
import config
import distributed
import outputs
import pretrained
import rundir
import runtime
from dataerror import worded
from engine import Engine
from loaders import make_loaders
from normalize import resolve_mode
from predictor import describe, learned_scale
from splits import load_splits, region_note
from utils import (ClosedPipeSafe, Interrupts, UserError, command, count_params, duration, exit_on_user_error,
                   plain_warning, quiet_worker_disconnects)


def check_batch_size(cfg, train_data, val_data):
    """A batch larger than the training split would drop every batch (the last partial one is dropped)."""
    n_train, n_all = len(train_data.ids), len(train_data.ids) + len(val_data.ids)
    if cfg["batch_size"] > n_train:
        regions = (" With one or two large images, train on crops of them (--crop, with --input_h and --input_w): a "
                   "region of each image is then held out for validation and the crops fill the batches."
                   if n_train < advice.MIN_BATCH and not cfg["crop"] else "")
        raise UserError(f"--batch_size {cfg['batch_size']} is larger than the training split ({n_train} of "
                        f"{n_all} images in {os.path.join(cfg['data_dir'], cfg['dataset'])}); every batch would be "
                        f"dropped. Use --batch_size {n_train} or less.{regions}")


DEPTHS = {"uint8": "8-bit", "uint16": "16-bit", "float32": "float32"}


def choose_normalization(cfg, dtypes, verbose):
    """normalize auto -> the mode for these images (in cfg, so config.yml and the checkpoint record it), said in a
    line; a note when imagenet scaling meets images that are not 8-bit."""
    depths = ", ".join(sorted(DEPTHS.get(str(d), str(d)) for d in dtypes))
    if cfg["normalize"] == "auto":
        cfg["normalize"] = resolve_mode("auto", dtypes)
        why = "every image is 8-bit" if cfg["normalize"] == "imagenet" else f"the images are {depths}"
        if verbose:
            print(f"normalize: {cfg['normalize']} (auto: {why}; --normalize sets it)", flush=True)
    elif cfg["normalize"] == "imagenet" and verbose and any(str(d) != "uint8" for d in dtypes):
        print(f"note: normalize imagenet divides {depths} images by their type's full range (65535 for 16-bit, 1 for "
              "float); microscopy images whose signal uses a small part of it train better with --normalize "
              "percentile", flush=True)


def resolve(argv=None):
    """The command line -> (config, run flags), as config.resolve gives them, with --init's source read and what
    follows from it (pretrained.follow_init before --plan, pretrained.fine_tuning after it)."""
    cfg, run = config.resolve(argv, start_from=pretrained.follow_init)
    if run["init"] is not None:
        cfg = pretrained.fine_tuning(cfg, run)
    return cfg, run


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


def build(cfg, rt, recorded=None, init=None):
    """Every check, the data, the network and the loaders, before anything on disk changes:
    -> (engine, (training loader, validation loader), what the run folder records at the start: {'split':
    {'train': ids, 'val': ids}, 'model': model.json's description of the Predictor}).
    recorded: a resumed run's split.csv, whose split it keeps. init: the --init source (pretrained.Source) whose
    weights the network starts from (model.json records where they came from)."""
    if cfg["sync_bn"] and rt.active and not rt.cuda:
        raise UserError("--sync_bn needs CUDA GPUs (torch's SyncBatchNorm has no CPU implementation); drop it on CPU")
    runtime.check_fits(cfg, rt)                                  # an input size that cannot fit: before any work
    train_data, val_data = load_splits(cfg, recorded=recorded)  # bad data is reported here, with nothing changed
    check_batch_size(cfg, train_data, val_data)
    regions = region_note(train_data, val_data, cfg)
    if rt.main and regions:
        print(regions, flush=True)
    if rt.main:
        for note in advice.startup_notes(cfg, train_data, rt.world, val_data):
            warnings.warn(note, stacklevel=2)
    choose_normalization(cfg, train_data.dtypes | val_data.dtypes, rt.main)
    engine = Engine(cfg, rt)
    engine.progress_lines = rt.main      # a long epoch says how far it is in a log file too
    if init is not None:
        engine.start_from(pretrained.adapted(init, cfg, engine.model.state_dict(), rt.main))
    loaders = make_loaders(cfg, train_data, val_data, rt)
    dtypes = train_data.dtypes | val_data.dtypes
    description = describe(cfg, dtypes, learned_scale(cfg, train_data.sizes))
    if init is not None:
        description["init"] = init.provenance()
    split = {"train": train_data.recorded_ids, "val": val_data.recorded_ids}    # regions: each once, not their crops
    return engine, loaders, {"split": split, "model": description,
                             "trivial": advice.trivial(val_data.target_pixels, val_data.sizes, cfg["class_mode"])}


def check_run_place(cfg, run, run_dir):
    """The run folder, guarded as every folder the toolkit writes (outputs.check_place): not inside a data set, another
    run folder or an export, and not a folder that holds runs; an existing run there is check_existing()'s."""
    outputs.check_place(run_dir, f"the run folder {run_dir} (--runs_dir {run['runs_dir']}, --name {cfg['name']})",
                        "train.py", f"Pass another --name or --runs_dir (runs go to {config.RUNS_DIR}/<name>/ by "
                        "default)", own={run_dir: "a run folder"})
    if run["resume"] or run["overwrite"]:
        rundir.check_files(run_dir, rundir.RUN_FILES)      # what it reads and replaces: readable files


def fit(cfg, run, rt, interrupts):
    started = run.get("started", time.monotonic())     # the time budget counts from here: train.py's start
    deadline = started + 60 * cfg["time_budget"] - FINISH_SECONDS if cfg["time_budget"] else None
    run_dir = os.path.join(run["runs_dir"], cfg["name"])
    check_run_place(cfg, run, run_dir)                                    # before the data is read
    recorded = rundir.read_split(run_dir) if run["resume"] else None       # a resumed run keeps its split
    engine, loaders, start = build(cfg, rt, recorded, run.get("init"))
    if run["resume"]:
        start["model"] = pretrained.still_recorded(start["model"], run_dir)   # where it started, in model.json
    if rt.main:
        rundir.check_existing(run_dir, run)           # before the lock creates the folder
    with rundir.RunLock(run_dir, rt.main):             # a second process training the same run is refused
        rundir.prepare(run_dir, run, write=rt.main)
        if run["resume"]:
            if rt.main:
                rundir.repair(run_dir)    # an epoch whose files a kill cut short is completed first
            last = rundir.RunFolder(run_dir).last
            engine.load_state_dict(checkpoint.load(last), last)
        if rt.main:
            rundir.save_start(run_dir, engine, run["resume"], start)
            announce(cfg, run, rt, engine, loaders, run_dir)
        writer = rundir.EpochWriter(run_dir, cfg["class_names"], cfg["save_every"])   # written while training goes on
        try:
            budget_ended = loop(cfg, engine, loaders, writer, interrupts, deadline)
        finally:
            if rt.main:
                writer.close(engine.rows)       # a finished, failed or interrupted run: its last files complete
    if rt.main and engine.should_stop():
        print(f"early stopping: no better val_iou for {engine.best['stale']} epochs")
    if rt.main and budget_ended:
        print(budget_message(cfg, run, engine.epoch, time.monotonic() - started), flush=True)
    if rt.main:
        print(finished_message(cfg, run, engine.best, run_dir))
        print(f"{start['trivial'].line()} on the validation split")
        warning = advice.beats(engine.best["iou"], start["trivial"], "best val_iou", cfg["crop"])
        if warning:
            warnings.warn(warning, stacklevel=2)
    return engine.best["iou"]


def finished_message(cfg, run, best, run_dir):
    """The end-of-run lines: best score and where, how to evaluate, and the recipes if the run used the
    reference's slow defaults."""
    evaluate = command("python", "val.py", "--name", cfg["name"], *config.runs_dir_words(run["runs_dir"]))
    text = (f"best val_iou {best['iou']:.4f} (at the {cfg['input_w']}x{cfg['input_h']} network input) at epoch "
            f"{best['epoch']}; model: {run_dir}/model.pth; evaluate with: {evaluate}")
    if config.reference_optimizer(cfg):
        text += ("\ntip: this run used the reference's optimizer defaults (SGD at lr 1e-3), which learn slowly. "
                 "The recipes in recipes/ reach a better model in fewer epochs, e.g. "
                 "python train.py --config recipes/dsb2018_best.yml (best model) or recipes/dsb2018_cpu.yml (sooner); "
                 "see README.md")
    return text


def announce(cfg, run, rt, engine, loaders, run_dir):
    """The start-up line: network, device and precision, data, loader, run folder, what resuming changed."""
    n_train, n_val = len(loaders[0].ids), len(loaders[1].ids)
    line = (f"{cfg['arch']} ({count_params(engine.model) / 1e6:.2f} M parameters) on {rt.describe()}; {n_train} training, "
            f"{n_val} validation images (loader {loaders[0].kind}); run folder {run_dir}")
    if run["resume"]:
        line += f"; resuming after epoch {engine.epoch}" + (f" ({', '.join(run['changes'])})" if run["changes"] else "")
    print(line, flush=True)
    if run["resume"] and (engine.epoch >= cfg["epochs"] or engine.should_stop()):
        why = f"all its {cfg['epochs']} epochs" if engine.epoch >= cfg["epochs"] else "until early stopping"
        longer = command("python", "train.py", "--name", cfg["name"], *config.runs_dir_words(run["runs_dir"]),
                         "--resume", "--epochs", engine.epoch + max(10, engine.epoch // 2),
                         *(["--early_stopping", 0] if engine.should_stop() else []))
        print(f"{run_dir} has already trained {why}: nothing to do. To train it longer: {longer}", flush=True)
    print(f"val_iou and val_dice: over the whole validation split, at the {cfg['input_w']}x{cfg['input_h']} network "
          "input; val.py scores at each image's own size (and prints both)", flush=True)


FINISH_SECONDS = 3.0    # kept from a time budget for what follows the last epoch: its files, curves.png, the summary


def budget_message(cfg, run, epoch, seconds):
    """What a run that its time budget stopped says: where it stopped, that its files are written, how to go on."""
    resume = command("python", "train.py", "--name", cfg["name"], *config.runs_dir_words(run["runs_dir"]), "--resume")
    return (f"time budget reached after epoch {epoch} of {cfg['epochs']}, {duration(seconds)} into the "
            f"{cfg['time_budget']:g} min of --time_budget (the next epoch would have ended after them); its files are "
            f"written. To train the other {cfg['epochs'] - epoch}: {resume} (the budget counts again from then; "
            "--time_budget sets another, 0 none)")


RECENT_EPOCHS = 3       # the next epoch is expected to take as long as the longest of this many recent ones: on a
                        # shared machine an epoch took up to twice the mean, and the mean let a run end 4 s late


def out_of_time(deadline, seconds, rt):
    """Whether the next epoch would end after the deadline (time.monotonic, FINISH_SECONDS before the budget's end;
    None: no time budget), if it takes as long as the longest of this process's RECENT_EPOCHS (`seconds`: their
    durations; none yet: the first epoch always runs). Under torchrun the processes decide together: one out of
    time stops them all, at the same epoch."""
    if deadline is None or not seconds:
        return False
    late = torch.tensor(float(time.monotonic() + max(seconds[-RECENT_EPOCHS:]) > deadline), device=rt.device)
    return distributed.all_reduce_sum(late, rt).item() > 0


def loop(cfg, engine, loaders, writer, interrupts, deadline=None):
    """The epochs: train, validate, step the schedule, hand the epoch's files to the writer, print a line.
    deadline: the time budget's end (time.monotonic), or None -> whether the budget ended the run before its last
    epoch."""
    train_loader, val_loader = loaders
    started, first, seconds = time.time(), engine.epoch, []
    for epoch in range(engine.epoch + 1, cfg["epochs"] + 1):
        if engine.should_stop():
            break
        if out_of_time(deadline, seconds, engine.rt):
            return True
        t0 = time.time()
        train_loader.set_epoch(epoch)   # the epoch's shuffle and augmentation depend on (seed, epoch) only
        lr = engine.lr
        stats = engine.train_one_epoch(train_loader, epoch)
        stats.update(engine.validate(val_loader))
        engine.step_scheduler(stats["val_loss"])
        improved = engine.end_epoch(epoch, lr, stats, time.time() - t0)
        seconds.append(time.time() - t0)
        if not engine.rt.main:
            continue
        with interrupts.deferred():   # the snapshot is taken whole, even if Ctrl-C comes now
            writer.save(engine.snapshot(), improved)
        print(f"epoch {epoch}/{cfg['epochs']}  lr {lr:.2e}  loss {stats['loss']:.4f}  iou {stats['iou']:.4f}  "
              f"val_loss {stats['val_loss']:.4f}  val_iou {stats['val_iou']:.4f}  val_dice {stats['val_dice']:.4f}  "
              f"{engine.rows[-1]['seconds']:.1f}s{'  *best*' if improved else ''}  "
              f"{progress(time.time() - started, epoch - first, cfg['epochs'] - epoch, deadline)}", flush=True)
    return False


def progress(elapsed, done, left, deadline=None):
    """'elapsed 1m05s, about 3m20s left' after `done` epochs of this process, `left` to go (the mean so far); with a
    time budget ending sooner (deadline, time.monotonic), '..., about 2m00s left: the time budget'."""
    expected = elapsed / max(done, 1) * left
    budget_left = None if deadline is None else max(0.0, deadline - time.monotonic())
    if left and budget_left is not None and budget_left < expected:
        return f"(elapsed {duration(elapsed)}, about {duration(budget_left)} left: the time budget)"
    return f"(elapsed {duration(elapsed)}, about {duration(expected)} left)"


WORKER_DIED = "DataLoader worker"     # how torch's RuntimeError begins when a loader process died


def worker_died(e, cfg, run):
    """A data-loading worker process killed (most often by the kernel, out of memory) or crashed."""
    first_line = str(e).strip().splitlines()[0][:300]
    return (f"error: training stopped: {first_line}\nA loader process is usually killed when the machine runs out of "
            f"memory: lower --num_workers or --batch_size (or the input size), then {rundir_advice(cfg, run)}.")


def rundir_advice(cfg, run):
    if not (cfg and run):
        return "run the same command again"
    return rundir.restart_advice(os.path.join(run["runs_dir"], cfg["name"]))


def torchrun_failure(e, cfg, run):
    """Under torchrun a RuntimeError usually means another process died and the collectives broke off."""
    last = rundir.RunFolder(os.path.join(run["runs_dir"], cfg["name"])).last if cfg and run else "<run folder>/last.pth"
    first_line = str(e).strip().splitlines()[0][:300]
    return (f"error: [rank {os.environ.get('RANK')}] training stopped: {first_line}\n"
            f"If another process failed, torchrun's summary below names it. {last} holds the last "
            "finished epoch: rerun the same torchrun command with --resume.")


def process_age():
    """Seconds since this process started (Linux: /proc; elsewhere 0), so that a time budget counts the imports too."""
    try:
        with open("/proc/self/stat") as f:
            ticks = int(f.read().rsplit(")", 1)[1].split()[19])     # field 22, starttime, in clock ticks after boot
        with open("/proc/uptime") as f:
            return max(0.0, float(f.read().split()[0]) - ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return 0.0


def main(argv=None, started=None):
    """The command line; started: when the run began (time.monotonic), for --time_budget (None: now)."""
    started = time.monotonic() if started is None else started
    interrupts = Interrupts()
    interrupts.install()          # Ctrl-C and SIGTERM (e.g. from a job scheduler) stop cleanly
    sys.excepthook = quiet_worker_disconnects(sys.excepthook)   # ... without a loader worker thread's traceback
    warnings.formatwarning = plain_warning
    sys.stdout = ClosedPipeSafe(sys.stdout)   # piped into head or a closed ssh: keep training
    first_process = os.environ.get("RANK", "0") == "0"   # under torchrun every process meets the same error
    cfg = run = None
    try:
        # a data problem's fix in train.py's words; the lambda reads cfg and run when the problem is met: None while
        # resolving (the --plan survey), then the config, whose fixes also say where each value came from
        with exit_on_user_error(quiet=not first_process), worded(lambda error: data_fix(error, cfg, run)):
            cfg, run = resolve(argv)
            run["started"] = started
            for line in run["plan_lines"]:
                print(line, flush=True)
            print(f"config: {', '.join(config.differences(cfg)) or 'the defaults'} (the rest at their defaults; "
                  f"the full config goes to {os.path.join(run['runs_dir'], cfg['name'], 'config.yml')})", flush=True)
            train(cfg, run, interrupts)
    except RuntimeError as e:
        if WORKER_DIED in str(e):
            print(worker_died(e, cfg, run), file=sys.stderr)
            sys.exit(1)
        if int(os.environ.get("WORLD_SIZE", "1")) == 1:
            raise
        print(torchrun_failure(e, cfg, run), file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        if first_process:
            print("\n" + interrupted_message(cfg, run), file=sys.stderr)
        sys.exit(130)


# How train.py tells a user to change a data setting (a DataError's setting): its flags. '{}': the value the files
# suggest (DataError.found).
DATA_FIXES = {
    "data": "pass --data_dir and --dataset so that <data_dir>/<dataset> is the folder with images/ and masks/ "
            "(or labels/)",
    "img_ext": "pass --img_ext {}",
    "mask_ext": "pass --mask_ext {}",
    "input_channels": "pass --input_channels {} (or convert the images to grayscale first)",
    "num_classes": "pass --num_classes {}",
    "target": ", or train on the masks with --target masks",
}
SAYS_WHENCE = ("img_ext", "mask_ext", "input_channels", "num_classes")   # fixes that say where the value came from


def data_fix(error, cfg=None, run=None):
    """train.py's words for the change that fixes a data problem (dataerror.DataError); with the resolved config
    and run, where the value to change came from too (config.whence: the default, a config file, a flag)."""
    fix = DATA_FIXES[error.setting].format(command(error.found))   # e.g. an extension with a space, quoted
    if run is not None and error.setting in SAYS_WHENCE:
        fix += f" ({config.whence(run.get('sources', {}), error.setting, cfg[error.setting])})"
    return fix


def interrupted_message(cfg, run):
    """What an interrupt left: the last finished epoch to --resume from, or nothing yet."""
    last = rundir.RunFolder(os.path.join(run["runs_dir"], cfg["name"])).last if cfg and run else None
    if last is None or not os.path.isfile(last):
        advice = rundir.restart_advice(os.path.dirname(last)) if last else "run the same command again"
        return f"interrupted before the run saved anything to resume from; {advice}"
    again = (command("python", "train.py", "--name", cfg["name"], *config.runs_dir_words(run["runs_dir"]), "--resume")
             if "WORLD_SIZE" not in os.environ else "the same torchrun command with --resume added")
    return f"interrupted: {last} holds the last finished epoch; continue with\n    {again}"


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.default_int_handler)   # from here on, main() handles Ctrl-C and SIGTERM
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    main(started=time.monotonic() - process_age())
