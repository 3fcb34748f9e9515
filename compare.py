"""Compare runs: one table of several runs' settings and results, and optionally one plot of their curves.

    python compare.py                         # every run in models/
    python compare.py unet_a unet_b nested    # these runs
    python compare.py --plot runs.png         # and their validation IoU per epoch in one figure

Per run: its name, architecture, the settings that differ between the runs compared, the epochs it
trained, its best val_iou (at the network input, as train.py logs it) and that epoch, the per-image
mean IoU val.py wrote to outputs/<name>/metrics.csv if the run was evaluated, and its training time
(the sum of log.csv's seconds). Nothing is written except the --plot file, which must not exist yet.
"""
import argparse
import csv
import io
import os
import statistics

import config
from runlog import read_log
from utils import UserError, atomic_write, duration, exit_on_user_error, load_yaml

OUTPUTS_DIR = "outputs"
NOT_SETTINGS = ("name", "data_dir", "device", "num_workers", "cache_mb", "loader", "runs_dir")   # not what a run is
MAX_SETTINGS = 6        # differing settings shown per run


def load(runs_dir, name):
    """{'name', 'config', 'log', 'val_py'} of one run; a folder without config.yml is a UserError."""
    run_dir = os.path.join(runs_dir, name)
    path = os.path.join(run_dir, "config.yml")
    if not os.path.isfile(path):
        raise UserError(f"{run_dir} is not a run (no config.yml); `python compare.py` with no names lists every "
                        f"run in {runs_dir}/")
    return {"name": name, "config": load_yaml(path), "log": read_log(os.path.join(run_dir, "log.csv")),
            "val_py": val_py_iou(os.path.join(OUTPUTS_DIR, name, "metrics.csv"))}


def val_py_iou(path):
    """The per-image mean IoU (over images and classes) in a val.py metrics.csv, or None."""
    try:
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
    except OSError:
        return None
    values = [float(v) for r in rows for k, v in r.items() if k.startswith("iou_") and v not in ("", None)]
    return statistics.fmean(values) if values else None


def all_runs(runs_dir):
    if not os.path.isdir(runs_dir):
        raise UserError(f"there is no runs folder {runs_dir}/; train a run first, or pass --runs_dir")
    names = sorted(n for n in os.listdir(runs_dir) if os.path.isfile(os.path.join(runs_dir, n, "config.yml")))
    if not names:
        raise UserError(f"{runs_dir}/ holds no run (a folder with config.yml)")
    return names


def differing(runs):
    """The config keys whose values differ between the runs, in the config's order."""
    keys = [k for k in runs[0]["config"] if k not in NOT_SETTINGS]
    return [k for k in keys if len({repr(r["config"].get(k)) for r in runs}) > 1]


def row(run, keys):
    """One run's table row, as strings."""
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
    """The comparison as aligned text."""
    rows = [HEADER] + [row(r, differing(runs)) for r in runs]
    widths = [max(len(r[c]) for r in rows) for c in range(len(HEADER))]
    return "\n".join("  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip() for r in rows)


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
        if args.plot and os.path.exists(args.plot):
            raise UserError(f"--plot {args.plot} exists; compare.py does not replace files: pass a new file name")
        if args.plot and os.path.splitext(args.plot)[1].lower() not in (".png", ".pdf", ".svg"):
            raise UserError(f"--plot {args.plot}: give a file name ending in .png, .pdf or .svg")
        runs = [load(runs_dir, n) for n in (args.names or all_runs(runs_dir))]
        print(table(runs))
        if args.plot:
            plot(args.plot, runs)
            print(f"curves of {len(runs)} run(s) in {args.plot}")


if __name__ == "__main__":
    main()
