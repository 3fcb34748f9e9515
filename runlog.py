"""The run's log.csv (one row per epoch) and curves.png, both rewritten atomically each epoch."""
import csv
import io

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from utils import atomic_write  # noqa: E402

COLUMNS = ["epoch", "lr", "loss", "iou", "val_loss", "val_iou", "val_dice", "seconds"]


def write_log(path, rows):
    """rows: list of dicts with COLUMNS keys."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=COLUMNS)
    writer.writeheader()
    writer.writerows(rows)
    atomic_write(path, lambda f: f.write(buffer.getvalue()))


def plot_curves(path, rows):
    """Loss and IoU (train and validation) against epoch."""
    epochs = [r["epoch"] for r in rows]
    fig, (ax_loss, ax_iou) = plt.subplots(1, 2, figsize=(10, 4))
    ax_loss.plot(epochs, [r["loss"] for r in rows], label="train")
    ax_loss.plot(epochs, [r["val_loss"] for r in rows], label="validation")
    ax_loss.set(xlabel="epoch", ylabel="loss", title="loss")
    ax_iou.plot(epochs, [r["iou"] for r in rows], label="train")
    ax_iou.plot(epochs, [r["val_iou"] for r in rows], label="validation")
    ax_iou.plot(epochs, [r["val_dice"] for r in rows], label="validation Dice", linestyle="--")
    ax_iou.set(xlabel="epoch", ylabel="IoU", title="IoU", ylim=(0, 1))
    for ax in (ax_loss, ax_iou):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=80)
    plt.close(fig)
    atomic_write(path, lambda f: f.write(buffer.getvalue()), mode="wb")
