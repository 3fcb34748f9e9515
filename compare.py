"""Compare runs: one table of several runs' settings and results, and optionally one plot of their curves.

    python compare.py                         # every run in models/
    python compare.py unet_a unet_b nested    # these runs
    python compare.py --plot runs.png         # and their validation IoU per epoch in one figure

Per run: its name, architecture, the settings that differ between the runs compared, the epochs it
trained, its best val_iou (at the network input, as train.py logs it) and that epoch, the per-image
mean IoU val.py wrote to outputs/<name>/metrics.csv if the run was evaluated, and its training time
(the sum of log.csv's seconds). A run whose config.yml or log.csv cannot be read is named in the table with
what is wrong, below it; the others are shown. Nothing is written except the --plot file, which must not exist
yet, in a folder that does.
"""
import signal
import sys

if __name__ == "__main__":   # Ctrl-C or SIGTERM while the imports below load (seconds: torch) ends quietly
    signal.signal(signal.SIGINT, lambda *_: sys.exit(130))
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(130))

import argparse
import csv
import io
import math
import os
import statistics

import config
from outputs import OUTPUTS_DIR, check_place, inside
from rundir import RunFolder, check_files
from runlog import read_log
from utils import UserError, atomic_write, command, duration, exit_on_user_error, load_yaml

NOT_SETTINGS = ("name", "data_dir", "device", "num_workers", "cache_mb", "loader", "runs_dir")   # not what a run is
MAX_SETTINGS = 6        # differing settings shown per run
MAX_FILE_BYTES = 64 * 2**20   # a log.csv or metrics.csv larger than this is not read (a run's is kilobytes)
LOG_NUMBERS = ("epoch", "val_iou", "seconds")   # log.csv's columns that the table and the plot read


def load(runs_dir, name):
    """{'name', 'config', 'log', 'val_py'} of one run, or {'name', 'problem'} when its config.yml or log.csv cannot
    be read (the table shows the other runs and names what is wrong with this one); a folder without config.yml is
    a UserError."""
    run_dir = os.path.join(runs_dir, name)
    path = RunFolder(run_dir).config
    if not os.path.lexists(path):
        raise UserError(f"{run_dir} is not a run (no config.yml); "
                        f"`{command('python', 'compare.py', *config.runs_dir_words(runs_dir))}` with no names lists "
                        f"every run in {runs_dir}/")
    try:
        check_files(run_dir)                # a run file that is a folder, a broken link or unreadable: named
        return {"name": name, "config": load_yaml(path), "log": checked_log(RunFolder(run_dir).log),
                "val_py": val_py_iou(os.path.join(OUTPUTS_DIR, name, "metrics.csv"))}
    except UserError as e:
        return {"name": name, "problem": str(e)}


def checked_log(path):
    """log.csv's rows, each with a finite number in every column the table and the plot read; [] when there is no
    log.csv yet. A log.csv that is not a file, too large, not UTF-8 text or not such a table is a UserError that
    names the file (and the line and column)."""
    if not os.path.lexists(path):
        return []
    if not os.path.isfile(path):
        raise UserError(f"{path} is not a file")
    if os.path.getsize(path) > MAX_FILE_BYTES:
        raise UserError(f"{path} is {os.path.getsize(path) / 2**20:.0f} MB, more than any run's log.csv "
                        f"({MAX_FILE_BYTES // 2**20} MB at most)")
    try:
        rows = read_log(path)
    except UnicodeDecodeError:
        raise UserError(f"{path} is not UTF-8 text") from None
    except (OSError, csv.Error) as e:
        raise UserError(f"{path} cannot be read ({e})") from None
    for line, r in enumerate(rows, 2):
        for key in LOG_NUMBERS:
            if key not in r:
                raise UserError(f"{path} has no {key} column")
            if not finite_number(r[key]):
                raise UserError(f"{path} line {line}: {key} is {r[key]!r}, not a number")
    return rows


def finite_number(text):
    try:
        return math.isfinite(float(text))
    except (TypeError, ValueError):
        return False


def val_py_iou(path):
    """The per-image mean IoU (over images and classes) in a val.py metrics.csv, or None (also when the file cannot
    be read as one)."""
    try:
        if os.path.getsize(path) > MAX_FILE_BYTES:
            return None
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
        values = [float(v) for r in rows for k, v in r.items()
                  if isinstance(k, str) and k.startswith("iou_") and v not in ("", None)]
    except (OSError, ValueError, TypeError, csv.Error):      # UnicodeDecodeError is a ValueError
        return None
    values = [v for v in values if math.isfinite(v)]
    return statistics.fmean(values) if values else None


def all_runs(runs_dir):
    if not os.path.isdir(runs_dir):
        raise UserError(f"there is no runs folder {runs_dir}/; train a run first, or pass --runs_dir")
    names = sorted(n for n in os.listdir(runs_dir) if os.path.lexists(RunFolder(os.path.join(runs_dir, n)).config))
    if not names:
        raise UserError(f"{runs_dir}/ holds no run (a folder with config.yml)")
    return names


def differing(runs):
    """The config keys whose values differ between the runs, in the config's order."""
    if not runs:
        return []
    keys = [k for k in runs[0]["config"] if k not in NOT_SETTINGS]
    return [k for k in keys if len({repr(r["config"].get(k)) for r in runs}) > 1]


def row(run, keys):
    """One run's table row, as strings (a broken run's: its name and 'cannot be read, see below')."""
    if "problem" in run:
        return [run["name"], "-", "cannot be read, see below", "-", "-", "-", "-"]
    log = run["log"]
    best = max(log, key=lambda r: float(r["val_iou"])) if log else None
    settings = ", ".join(f"{k}={run['config'].get(k)}" for k in keys[:MAX_SETTINGS])
    if len(keys) > MAX_SETTINGS:
        settings += f", ... {len(keys) - MAX_SETTINGS} more"
    seconds = sum(float(r["seconds"]) for r in log)
    return [run["name"], str(run["config"].get("arch")), settings or "-",
            f"{len(log)}/{run['config'].get('epochs')}",
            f"{float(best['val_iou']):.4f} (epoch {best['epoch']})" if best else "-",
            f"{run['val_py']:.4f}" if run["val_py"] is not None else "-",
            duration(seconds) if log else "-"]


HEADER = ["name", "arch", "settings that differ", "epochs", "best val_iou", "val.py per-image IoU", "train time"]


def table(runs):
    """The comparison as aligned text, then a line per run that cannot be read saying why."""
    keys = differing([r for r in runs if "problem" not in r])
    rows = [HEADER] + [row(r, keys) for r in runs]
    widths = [max(len(r[c]) for r in rows) for c in range(len(HEADER))]
    lines = ["  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip() for r in rows]
    return "\n".join(lines + [f"{r['name']}: {r['problem']}" for r in runs if "problem" in r])


def plot(path, runs):
    """Validation IoU per epoch of every run, one labelled line each, written atomically to `path`."""
    from matplotlib.figure import Figure   # here: a table alone never imports matplotlib
    fig = Figure(figsize=(8, 5))
    ax = fig.add_subplot()
    for r in runs:
        ax.plot([int(x["epoch"]) for x in r["log"]], [float(x["val_iou"]) for x in r["log"]], label=r["name"])
    ax.set_xlabel("epoch")
    ax.set_ylabel("val_iou (at the network input)")
    ax.grid(alpha=0.3)
    ax.legend()
    buffer = io.BytesIO()
    fig.savefig(buffer, format=os.path.splitext(path)[1][1:] or "png", dpi=100)
    atomic_write(path, lambda f: f.write(buffer.getvalue()), mode="wb")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog="\n".join(__doc__.splitlines()[2:5]),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("names", nargs="*", help="runs to compare (default: every run in the runs folder)")
    config.add_runs_dir(p)
    p.add_argument("--plot", metavar="FILE", help="also write their validation IoU curves to FILE (.png, .pdf, .svg)")
    args = p.parse_args(argv)
    runs_dir = config.runs_dir(args.runs_dir)
    with exit_on_user_error():
        if args.plot and os.path.lexists(args.plot):
            raise UserError(f"--plot {args.plot} exists; compare.py does not replace files: pass a new file name")
        if args.plot and os.path.splitext(args.plot)[1].lower() not in (".png", ".pdf", ".svg"):
            raise UserError(f"--plot {args.plot}: give a file name ending in .png, .pdf or .svg")
        if args.plot:
            check_place(args.plot, f"--plot {args.plot}", "compare.py", "Pass --plot to a file of its own, e.g. "
                        "runs.png", [] if inside(os.getcwd(), runs_dir) else [(runs_dir, "the runs folder")])
        folder = os.path.dirname(os.path.abspath(args.plot)) if args.plot else None
        if folder and not os.path.isdir(folder):
            raise UserError(f"--plot {args.plot}: the folder {os.path.dirname(args.plot)} does not exist; create it "
                            "or pass a file in an existing folder")
        runs = [load(runs_dir, n) for n in (args.names or all_runs(runs_dir))]
        print(table(runs))
        readable = [r for r in runs if "problem" not in r]
        if not readable:
            raise UserError(f"none of the {len(runs)} run(s) can be read (see above)")
        if args.plot:
            plot(args.plot, readable)
            print(f"curves of {len(readable)} run(s) in {args.plot}")


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.default_int_handler)   # from here on, main() handles Ctrl-C and SIGTERM
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    main()
