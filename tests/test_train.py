"""train.py's pieces, run in-process on tiny generated data (fast), and the learning test on real data."""
import csv
import os

import pytest
import torch

import config
import runtime
import train
from conftest import make_data
from engine import Engine
from loaders import make_loaders
from splits import load_splits

TINY = ["--base_channels", "8", "--dataset", "tiny", "--arch", "UNet", "--epochs", "1", "-b", "4", "--input_w", "32", "--input_h", "32",
        "--num_workers", "0", "--device", "cpu"]


def train_in(tmp_path, monkeypatch, argv):
    monkeypatch.chdir(tmp_path)
    cfg, run = config.resolve(argv)
    return cfg, train.train(cfg, run)


def log_rows(tmp_path, name):
    with open(tmp_path / "models" / name / "log.csv") as f:
        return list(csv.DictReader(f))


@pytest.mark.e2e
@pytest.mark.parametrize("optimizer", config.OPTIMIZERS)
def test_every_optimizer_trains_an_epoch(tmp_path, monkeypatch, optimizer):
    make_data(tmp_path / "inputs")
    cfg, best = train_in(tmp_path, monkeypatch, TINY + ["--optimizer", optimizer, "--name", optimizer])
    rows = log_rows(tmp_path, optimizer)
    assert len(rows) == 1
    assert best == pytest.approx(float(rows[0]["val_iou"]))     # what train() returns is the epoch log.csv records


@pytest.mark.e2e
@pytest.mark.parametrize("scheduler, lrs", [
    ("CosineAnnealingLR", [1e-3, 7.525e-4, 2.575e-4]),   # T_max = epochs: min_lr is reached after the last epoch
    ("MultiStepLR", [1e-3, 2e-3 / 3, 1e-3 * 4 / 9]),      # milestones 1,2; gamma 2/3: stepped each epoch
    ("ConstantLR", [1e-3, 1e-3, 1e-3]),
])
def test_schedulers_change_the_logged_lr(tmp_path, monkeypatch, scheduler, lrs):
    make_data(tmp_path / "inputs")
    argv = TINY + ["--scheduler", scheduler, "--epochs", "3", "--name", scheduler]
    train_in(tmp_path, monkeypatch, argv)
    assert [float(r["lr"]) for r in log_rows(tmp_path, scheduler)] == pytest.approx(lrs, rel=1e-4)


@pytest.mark.e2e
def test_early_stopping_ends_the_run(tmp_path, monkeypatch):
    make_data(tmp_path / "inputs")
    train_in(tmp_path, monkeypatch, TINY + ["--epochs", "20", "--early_stopping", "1", "--lr", "1e-9", "--min_lr", "0", "--min_lr", "0",
                                            "--optimizer", "SGD", "--name", "es"])
    assert len(log_rows(tmp_path, "es")) < 20


@pytest.mark.e2e
@pytest.mark.slow(seconds=75)
def test_real_dsb2018_subset_actually_learns(tmp_path, monkeypatch, dsb_path):
    """64 real images: a short CPU run ends far above the untrained model's validation IoU."""
    subset = tmp_path / "inputs" / "dsb64"
    os.makedirs(subset / "images")
    os.makedirs(subset / "masks" / "0")
    for name in sorted(os.listdir(os.path.join(dsb_path, "images")))[:64]:
        os.symlink(os.path.join(dsb_path, "images", name), subset / "images" / name)
        os.symlink(os.path.join(dsb_path, "masks", "0", name), subset / "masks" / "0" / name)
    argv = ["--dataset", "dsb64", "--arch", "UNet", "--input_w", "64", "--input_h", "64", "-b", "8",
            "--optimizer", "Adam", "--lr", "1e-3", "--epochs", "15", "--num_workers", "0", "--device", "cpu"]
    monkeypatch.chdir(tmp_path)
    cfg, _ = config.resolve(argv)
    rt = runtime.build(torch.device("cpu"), cfg)
    _, val_loader = make_loaders(cfg, *load_splits(cfg), rt)
    untrained = Engine(cfg, rt).validate(val_loader)["val_iou"]
    trained = train_in(tmp_path, monkeypatch, argv)[1]
    print(f"untrained val IoU {untrained:.3f}, trained {trained:.3f}")
    assert trained > 0.6 and trained > untrained + 0.4


def test_epoch_lines_say_the_time_elapsed_and_an_estimate_of_what_is_left():
    from utils import duration
    assert duration(42) == "42s" and duration(185) == "3m05s" and duration(7620) == "2h07m"
    assert train.progress(60, 2, 3) == "(elapsed 1m00s, about 1m30s left)"   # 30 s an epoch so far, 3 to go


@pytest.mark.e2e
def test_resuming_a_finished_run_says_so_and_how_to_continue(tmp_path, monkeypatch, capsys):
    make_data(tmp_path / "inputs")
    train_in(tmp_path, monkeypatch, TINY + ["--epochs", "1", "--name", "done"])
    capsys.readouterr()
    train_in(tmp_path, monkeypatch, ["--name", "done", "--resume"])
    out = capsys.readouterr().out
    assert "has already trained all its 1 epochs: nothing to do" in out
    assert "python train.py --name done --resume --epochs 11" in out and "epoch 2/" not in out
