"""The run folder models/<name>/: what a run writes there, and the rules that protect what is there.

    config.yml   the full resolved config                      log.csv     one row per epoch
    model.pth    best val_iou, a plain state_dict               curves.png  loss and IoU curves
    last.pth     Engine.state_dict(): everything --resume needs

Every file is written atomically (temporary file, then rename). An epoch's files are written in
the order last.pth, model.pth, log.csv, so a log.csv that lags behind last.pth means the process
died mid-epoch-save; repair() completes that epoch from last.pth (--resume and val.py call it).
"""
import csv
import errno
import json
import os
import socket
import stat
import threading
import time
from dataclasses import dataclass

import checkpoint
from runlog import plot_curves, read_log, write_log
from utils import UserError, atomic_write, process_alive, save_yaml

# The run folder's file names: spelled here only (RunFolder gives their paths).
CONFIG, LOG, MODEL, MODEL_JSON = "config.yml", "log.csv", "model.pth", "model.json"
LAST, CURVES, SPLIT = "last.pth", "curves.png", "split.csv"
RUN_FILES = (CONFIG, LOG, MODEL, MODEL_JSON, LAST, CURVES, SPLIT)
MARKS_A_RUN = (CONFIG, MODEL)     # a folder holding either is a run folder (scripts never write among its files)
READ_FILES = (CONFIG, MODEL, MODEL_JSON, LAST, LOG, SPLIT)   # what val.py, export.py and compare.py read of a run
ROLES = {CONFIG: "the run's settings", MODEL: "its best weights", MODEL_JSON: "what rebuilds its network",
         LAST: "the training state --resume continues from", LOG: "its log of epochs", CURVES: "its curves",
         SPLIT: "its training and validation images"}
LOCK = ".lock"       # <pid> <host> of the process training the run
CURVES_EVERY = 5.0   # seconds between curves.png redraws while training (matplotlib takes ~0.4 s a plot)


@dataclass(frozen=True)
class RunFolder:
    """A run folder's path and the paths of its files: the one place that names them."""
    path: str

    config = property(lambda self: os.path.join(self.path, CONFIG))
    log = property(lambda self: os.path.join(self.path, LOG))
    model = property(lambda self: os.path.join(self.path, MODEL))
    model_json = property(lambda self: os.path.join(self.path, MODEL_JSON))
    last = property(lambda self: os.path.join(self.path, LAST))
    curves = property(lambda self: os.path.join(self.path, CURVES))
    split = property(lambda self: os.path.join(self.path, SPLIT))

    def is_run(self):
        """Whether the folder holds a run (config.yml or model.pth), as a folder a colleague sent may hold only one."""
        return any(os.path.lexists(os.path.join(self.path, f)) for f in MARKS_A_RUN)   # a broken one too

    def description(self):
        """model.json (what train.py recorded of the Predictor it trained) as a dict, or None (older runs, or a file
        that is not a JSON object)."""
        try:
            with open(self.model_json) as f:
                description = json.load(f)
            return description if isinstance(description, dict) else None
        except (OSError, ValueError):
            return None


def what_is_wrong(path):
    """Why a run file that is there cannot be read as one ('is a folder, not a file', 'is a broken link (to X)',
    'cannot be read (Permission denied)', ...), or None: a readable file, or nothing there (a missing file is each
    script's own message)."""
    if not os.path.lexists(path):
        return None
    try:
        mode = os.stat(path).st_mode
    except OSError as e:            # a link to nothing, or to itself
        if e.errno == errno.ELOOP:
            return "is a link that leads back to itself"
        target = os.readlink(path) if os.path.islink(path) else None
        return f"is a broken link (to {target})" if target is not None else f"cannot be read ({e.strerror or e})"
    if stat.S_ISDIR(mode):
        return "is a folder, not a file"
    if not stat.S_ISREG(mode):
        return "is not a regular file (a device, a pipe or a socket)"
    try:
        with open(path, "rb"):
            return None
    except OSError as e:
        return f"cannot be read ({e.strerror or e})"


def check_files(run_dir, names=READ_FILES):
    """A UserError naming the first of the run's files (names) that is there but is not a readable file: a run
    folder whose model.pth was a folder said "the run has not finished an epoch yet", and --resume did nothing."""
    for name in names:
        path = os.path.join(run_dir, name)
        why = what_is_wrong(path)
        if why:
            raise UserError(f"{path} ({ROLES[name]}) {why}: the run folder is damaged. Put the run's own {name} "
                            f"back (from a copy of the run), or move {path} away; the toolkit never removes what it "
                            "did not write")


def check_existing(run_dir, run):
    """Refuses to touch an existing run unless --resume or --overwrite says so; -> the run files present."""
    if os.path.exists(run_dir) and not os.path.isdir(run_dir):
        raise UserError(f"{run_dir} is a file, not a run folder. Train under another --name, or move the file away.")
    for f in RUN_FILES:     # a folder or a broken link named as a run file: train.py neither writes nor removes it
        path = os.path.join(run_dir, f)
        if os.path.lexists(path) and not os.path.isfile(path):
            raise UserError(f"{path} is {'a folder' if os.path.isdir(path) else 'not a file'}, where a run keeps its "
                            f"{f} file; train.py removes only files it wrote. Move it away, then run the same command "
                            "again")
    existing = [f for f in RUN_FILES if os.path.lexists(os.path.join(run_dir, f))]
    if run["resume"]:
        if not os.path.isfile(RunFolder(run_dir).last):
            raise UserError(f"--resume: {run_dir}/last.pth does not exist, so there is nothing to resume. "
                            "Train without --resume (add --overwrite to replace what is there).")
    elif existing and not run["overwrite"]:
        raise UserError(f"{run_dir} already holds a run ({', '.join(existing)}). Pass --resume to continue it, "
                        "--overwrite to replace it, or --name to train under another name.")
    return existing


def prepare(run_dir, run, write):
    """For the process that writes (the first one, under torchrun; the others follow it, and torchrun ends them
    if it fails): check_existing(), then for --overwrite clear the old run's files: only the files a run writes;
    anything else in the folder stays. The other processes check nothing: the first may be writing already."""
    if not write:
        return
    existing = check_existing(run_dir, run)
    try:
        os.makedirs(run_dir, exist_ok=True)
        stale = [] if run["resume"] else existing
        stale += [f for f in os.listdir(run_dir) if f.startswith(".") and f.endswith(".tmp")]   # cut-short writes
        for f in stale:
            os.remove(os.path.join(run_dir, f))
    except OSError as e:
        raise disk_error(run_dir, e) from None


def save_start(run_dir, engine, resume, start):
    """config.yml (what actually runs), model.json (start['model']: what rebuilds the Predictor from model.pth alone),
    and for a new run split.csv (start['split']: which images trained and which validate) and an epoch-0 last.pth,
    so that even a run stopped in its first epoch can --resume."""
    try:
        write_start(run_dir, engine, resume, start)
    except OSError as e:
        raise disk_error(run_dir, e) from None


def write_start(run_dir, engine, resume, start):
    save_yaml(RunFolder(run_dir).config, engine.cfg)
    atomic_write(RunFolder(run_dir).model_json, lambda f: json.dump(start["model"], f, indent=1))
    if resume:
        return
    atomic_write(RunFolder(run_dir).split, lambda f: write_split(f, start["split"]))
    checkpoint.save(engine.state_dict(), RunFolder(run_dir).last)


def write_split(f, split):
    """split.csv: id,subset per image, quoted by the csv module (an id may hold a comma, a quote or a newline). A run
    split by regions records each region as its id, '<image id>@y<top>-<bottom>_x<left>-<right>' (splits.py)."""
    writer = csv.writer(f, lineterminator="\n")
    writer.writerow(["id", "subset"])
    writer.writerows([i, subset] for subset in ("train", "val") for i in split[subset])


def read_split(run_dir):
    """split.csv -> {'train': [ids], 'val': [ids]}, or None for runs from before it was recorded. The ids are read as
    written: an image's, or a region's (splits.resolve tells them apart), so files written before regions read as
    they did. A file that is not a split.csv (no id and subset columns, a row short of them): a UserError."""
    path = RunFolder(run_dir).split
    if not os.path.isfile(path):
        return None
    try:
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
        broken = any(r.get("id") is None or r.get("subset") is None for r in rows)
    except (UnicodeDecodeError, csv.Error):
        broken = True
    if broken:
        raise UserError(f"{path} is not a split.csv as train.py writes it (a header 'id,subset', then one image or "
                        "region per row): it was damaged or edited. Restore it, or start a new run (another --name)")
    return {subset: [r["id"] for r in rows if r["subset"] == subset] for subset in ("train", "val")}


class RunLock:
    """Holds models/<name>/.lock while this process trains the run: a second process is refused, naming the
    first one's process id. A lock whose process is gone (killed) is taken over. `active`: False for the
    processes of a torchrun job other than the first, which do not write."""

    def __init__(self, run_dir, active, doing="trained", fix="train under another --name"):
        self.path, self.active, self.held = os.path.join(run_dir, LOCK), active, False
        self.doing, self.fix = doing, fix          # the wording of the refusal: val.py locks its output folder too

    def __enter__(self):
        if not self.active:
            return self
        folder = os.path.dirname(self.path)
        if os.path.exists(folder) and not os.path.isdir(folder):
            raise UserError(f"{folder} is a file, not a folder. {self.fix[0].upper()}{self.fix[1:]}, or move the file away.")
        me = f"{os.getpid()} {socket.gethostname()}"
        for _ in range(3):
            try:
                os.makedirs(os.path.dirname(self.path), exist_ok=True)
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
            except FileExistsError:
                self.refuse_or_clear()
                continue
            except OSError as e:
                raise disk_error(os.path.dirname(self.path), e) from None
            with os.fdopen(fd, "w") as f:
                f.write(me + "\n")
            self.held = True
            return self
        raise UserError(f"could not take {self.path}; another process keeps creating it. {self.fix[0].upper()}{self.fix[1:]}.")

    def refuse_or_clear(self):
        """Raises while the lock's process is alive (or on another machine); removes a dead process's lock."""
        holder = lock_holder(self.path)
        if holder is None:
            return
        pid, host = holder
        run_dir = os.path.dirname(self.path)
        if host != socket.gethostname():
            raise UserError(f"{run_dir} is being {self.doing} by process {pid} on {host}. Wait for it, stop it, or "
                            f"{self.fix} (if nothing is using it, delete {self.path}).")
        if pid.isdigit() and process_alive(int(pid)):
            raise UserError(f"{run_dir} is being {self.doing} right now by process {pid} on this machine. Wait for it "
                            f"to finish, stop it, or {self.fix}.")
        os.remove(self.path)                   # its process was killed: the lock is stale

    def __exit__(self, *exc):
        if self.held and os.path.exists(self.path):
            os.remove(self.path)
        self.held = False


def lock_holder(path):
    """(pid, host) written in a lock file, or None if there is none."""
    try:
        with open(path) as f:
            pid, host = (f.read().split() + ["0", ""])[:2]
    except FileNotFoundError:
        return None
    return pid, host


def in_use(run_dir):
    """Whether a live process (or one on another machine) is training the run now: its lock is held."""
    holder = lock_holder(os.path.join(run_dir, LOCK))
    if holder is None:
        return False
    pid, host = holder
    return host != socket.gethostname() or (pid.isdigit() and process_alive(int(pid)))


def disk_error(run_dir, e):
    """An OSError while writing a run (full disk, read-only or unwritable folder) as the UserError to show."""
    return UserError(f"could not write the run's files in {run_dir}: {e.strerror or e}. Whatever it had already "
                     f"saved is intact; free space or make the folder writable, then {restart_advice(run_dir)}.")


def restart_advice(run_dir):
    """How to go on after a run stopped: --resume once last.pth exists; before that, the start files it left
    (config.yml, model.json, split.csv) make a plain rerun refuse, so --overwrite (which removes only those)."""
    if os.path.isfile(RunFolder(run_dir).last):
        return "run the same command again with --resume"
    if any(os.path.exists(os.path.join(run_dir, f)) for f in RUN_FILES):
        return "run the same command again with --overwrite (the run had not started; only its start files are there)"
    return "run the same command again"


def evaluated_weights(state):
    """The weights an epoch was validated with (model.pth): the weight average under --ema, else the network's."""
    return state.get("ema") or state["model"]


def write_epoch(run_dir, state, improved, best=None):
    """One epoch's files from a last.pth state: last.pth, then model.pth (if the score improved: `best`, the weights
    of the best epoch since the last write, else the state's own), then log.csv."""
    checkpoint.save(state, RunFolder(run_dir).last)
    if improved:
        checkpoint.save(evaluated_weights(state) if best is None else best, RunFolder(run_dir).model)
    write_log(RunFolder(run_dir).log, state["log"])


def repair(run_dir):
    """Completes an epoch whose files a kill cut short (log.csv behind last.pth); -> the epoch repaired, or None."""
    last = RunFolder(run_dir).last
    if not os.path.isfile(last):
        return None
    state = checkpoint.load(last)
    if len(read_log(RunFolder(run_dir).log)) >= len(state["log"]):
        return None
    improved = state["best_epoch"] == state["epoch"] > 0
    write_epoch(run_dir, state, improved)
    return state["epoch"]


class EpochWriter:
    """Writes the epochs' files in a background thread while training goes on, at most every `every` seconds.

    save() is called after every epoch with its snapshot. The first epoch of the process is written at once (val.py
    can use the run early, and a run stopped soon after its start resumes from it); later ones when `every` seconds
    have passed since the last write began, and close() writes the last finished epoch. So a killed process loses at
    most `every` seconds of training (--save_every); an interrupt, an error or the end of the run loses nothing. On a
    GPU an epoch can take a fraction of a second, and copying and pickling 110 MB of state every epoch slowed it.
    The files of one write always belong to one epoch (last.pth, model.pth if a better epoch came since the last
    write, with that epoch's weights, then log.csv), so repair() still finds a cut-short write. One write is in
    flight at a time; the thread is not a daemon, so even an interrupted process finishes the files it started.
    """

    def __init__(self, run_dir, class_names=(), every=0.0):
        self.run_dir, self.thread, self.error, self.curves_at = run_dir, None, None, 0.0
        self.class_names = class_names     # the curves' labels for the classes
        self.plotted = None        # the log rows curves.png shows now
        self.every, self.written_at = every, None
        self.pending = self.best = None    # the last epoch not yet written; a better epoch's weights since the last write

    def save(self, state, improved):
        """state: a snapshot (Engine.snapshot()) that training no longer changes; improved: its score is the best."""
        due = self.written_at is None or time.monotonic() - self.written_at >= self.every
        if due:
            self.wait()     # the write in flight first: its error stops the run before a newer epoch is queued
        self.pending = state
        if improved:
            self.best = evaluated_weights(state)
        if due:
            self.flush()

    def flush(self):
        """Starts writing the pending epoch (after the write in flight, whose error it raises)."""
        self.wait()
        if self.pending is None:
            return
        state, best, self.pending, self.best = self.pending, self.best, None, None
        self.written_at = time.monotonic()
        self.thread = threading.Thread(target=self.write, args=(state, best), name="epoch-writer")
        self.thread.start()

    def write(self, state, best):
        try:
            state, best = checkpoint.to_cpu(state), checkpoint.to_cpu(best)
            write_epoch(self.run_dir, state, best is not None, best)
            # one epoch is no curve, and drawing it (importing matplotlib) took a second of CPU while epoch 2 trained
            if len(state["log"]) > 1 and time.monotonic() - self.curves_at >= CURVES_EVERY:
                plot_curves(RunFolder(self.run_dir).curves, state["log"], self.class_names)
                self.curves_at, self.plotted = time.monotonic(), list(state["log"])
        except OSError as e:
            self.error = disk_error(self.run_dir, e)
        except BaseException as e:  # noqa: BLE001 - handed to the training thread, which raises it
            self.error = e

    def wait(self):
        """Blocks until the epoch in flight is written; raises the error it met, if any."""
        if self.thread is not None:
            self.thread.join()
            self.thread = None
        if self.error is not None:
            error, self.error = self.error, None
            raise error

    def close(self, rows):
        """Writes the last finished epoch and waits for its files, then draws the final curves (unless the last
        epoch's are those)."""
        self.flush()
        self.wait()
        if rows and rows != self.plotted:
            plot_curves(RunFolder(self.run_dir).curves, rows, self.class_names)
