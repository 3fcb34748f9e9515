"""The run's log.csv (one row per epoch) and curves.png, both rewritten atomically each epoch."""
import csv
import io

from figures import class_label, colour
from utils import atomic_write

COLUMNS = ["epoch", "lr", "loss", "iou", "val_loss", "val_iou", "val_dice", "seconds"]


def columns(rows):
    """COLUMNS, with the per-class validation IoU (val_iou_0, val_iou_1, ...) before seconds when a run has them."""
    per_class = sorted((k for k in (rows[0] if rows else {}) if k.startswith("val_iou_")), key=lambda k: int(k[8:]))
    return COLUMNS[:-1] + per_class + COLUMNS[-1:]


def write_log(path, rows):
    """rows: list of dicts with COLUMNS keys (and val_iou_<c> per class with several classes)."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns(rows))
    writer.writeheader()
    writer.writerows(rows)
    atomic_write(path, lambda f: f.write(buffer.getvalue()))


def read_log(path):
    """log.csv's rows as dicts of strings; [] when the file does not exist yet."""
    try:
        with open(path, newline="") as f:
            return list(csv.DictReader(f))
    except FileNotFoundError:
        return []


def plot_curves(path, rows, class_names=()):
    """curves_figure, written to path as a PNG."""
    fig = curves_figure(rows, class_names)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=80)
    atomic_write(path, lambda f: f.write(buffer.getvalue()), mode="wb")


def curves_figure(rows, class_names=()):
    """Loss and IoU (train and validation) against epoch, with the learning rate; the best epoch marked; with
    several classes each one's validation IoU too, in its figures.colour, labelled with its class_names name."""
    from matplotlib.figure import Figure   # here: only runs that draw curves pay for the import
    from matplotlib.ticker import MaxNLocator
    epochs = [int(r["epoch"]) for r in rows]
    col = lambda key: [float(r[key]) for r in rows]  # noqa: E731 - rows may come from the CSV, as strings
    fig = Figure(figsize=(10, 4))                      # no pyplot: safe in the background writer's thread
    ax_loss, ax_iou = fig.subplots(1, 2)
    ax_loss.plot(epochs, col("loss"), label="train")
    ax_loss.plot(epochs, col("val_loss"), label="validation")
    ax_loss.set(xlabel="epoch", ylabel="loss", title="loss")
    ax_lr = ax_loss.twinx()
    ax_lr.plot(epochs, col("lr"), color="grey", linestyle=":", label="learning rate")
    ax_lr.set_ylabel("learning rate", color="grey")
    ax_iou.plot(epochs, col("iou"), label="train")
    ax_iou.plot(epochs, col("val_iou"), label="validation (at the network's input size)")
    ax_iou.plot(epochs, col("val_dice"), label="validation Dice", linestyle="--")
    for key in columns(rows):
        if key.startswith("val_iou_"):
            c = int(key[8:])
            ax_iou.plot(epochs, col(key), color=[v / 255 for v in colour(c)[1]], linewidth=1, alpha=0.8,
                        label=f"validation, class {class_label(class_names, c)}")
    best = max(range(len(rows)), key=lambda k: float(rows[k]["val_iou"]))
    ax_iou.plot([epochs[best]], [float(rows[best]["val_iou"])], "k*", markersize=12,
                label=f"best: {float(rows[best]['val_iou']):.4f} at epoch {epochs[best]}")
    ax_iou.set(xlabel="epoch", ylabel="IoU", title="IoU", ylim=(0, 1))
    for ax in (ax_loss, ax_iou):
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    return fig
