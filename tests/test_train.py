"""train.py's pieces, run in-process on tiny generated data (fast), and the learning test on real data."""
import csv
import os
import sys

import pytest
import torch

import config
import runtime
import train
from conftest import ROOT, make_data, run_main
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


def test_a_time_budget_stops_before_an_epoch_that_would_end_after_it():
    import time
    rt = runtime.build(torch.device("cpu"), config.DEFAULTS)
    now = time.monotonic()
    assert not train.out_of_time(None, [5.0], rt)                       # no budget
    assert not train.out_of_time(now - 100, [], rt)                     # the first epoch always runs
    assert train.out_of_time(now + 100, [50.0, 150.0, 20.0, 30.0], rt)  # the longest recent epoch would end after it
    assert not train.out_of_time(now + 100, [150.0, 20.0, 30.0, 40.0], rt)   # ... but 150 s was not recent
    assert not train.out_of_time(now + 1e6, [150.0, 250.0], rt)
    assert train.progress(60, 2, 3, now + 1e6) == "(elapsed 1m00s, about 1m30s left)"   # the budget ends later
    assert train.progress(60, 2, 3, now - 5) == "(elapsed 1m00s, about 0s left: the time budget)"
    assert train.process_age() > 0


def test_a_long_epoch_prints_progress_lines_unless_the_bar_shows_on_the_same_terminal(monkeypatch, capsys):
    import engine
    monkeypatch.setattr(engine, "PROGRESS_EVERY", 0.0)
    lines = engine.ProgressLines("epoch 2/5", total=4)
    for done in (1, 2, 3, 4):
        lines.tick(done, loss=0.5)
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("  epoch 2/5: batch 1 of 4, loss 0.5000 (") and "left of it" in out[0]
    assert len(out) == 4 and "left of it" not in out[3]                 # the last batch: nothing left
    monkeypatch.setattr(engine, "PROGRESS_EVERY", 1e9)
    engine.ProgressLines("validation", total=4).tick(1)
    assert capsys.readouterr().out == ""                                # not yet time for a line
    monkeypatch.setattr(engine, "PROGRESS_EVERY", 0.0)
    for stream in (sys.stdout, sys.stderr):
        monkeypatch.setattr(stream, "isatty", lambda: True, raising=False)
    engine.ProgressLines("validation", total=4).tick(1)                 # tqdm's bar is on the terminal: no lines
    engine.ProgressLines("validation", total=4, show=False).tick(1)
    assert capsys.readouterr().out == ""


@pytest.mark.e2e
def test_progress_lines_reach_a_log_file(tmp_path):
    """train.py ... > train.log: the log says how far a long epoch is, not only tqdm's bar on a terminal (the interval
    is set to 0 here, through engine.PROGRESS_EVERY, so every batch prints one)."""
    import subprocess
    make_data(tmp_path / "inputs")
    hook = "import sys, engine; engine.PROGRESS_EVERY = 0; import train; train.main(sys.argv[1:])"
    with open(tmp_path / "train.log", "w") as log:
        done = subprocess.run([sys.executable, "-c", hook, *TINY, "--epochs", "2", "--name", "logged"], cwd=tmp_path,
                              stdout=log, stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": ROOT})
    assert done.returncode == 0, done.stderr
    lines = open(tmp_path / "train.log").read().splitlines()
    batches = [i for i, line in enumerate(lines) if line.startswith("  epoch 2/2: batch ")]
    assert [lines[i][:25] for i in batches] == ["  epoch 2/2: batch 1 of 2", "  epoch 2/2: batch 2 of 2"]
    assert ", loss " in lines[batches[-1]]                             # the mean loss, once it is known
    assert any(line.startswith("  validation: batch 1 of 1") for line in lines)
    assert lines[batches[-1] + 2].startswith("epoch 2/2 ")              # then validation, then the epoch's line


@pytest.mark.e2e
def test_a_run_out_of_time_budget_stops_with_its_files_and_a_resume_trains_the_rest(tmp_path, monkeypatch, capsys):
    make_data(tmp_path / "inputs")
    argv = TINY + ["--epochs", "3", "--time_budget", "0.01", "--name", "short"]   # 0.6 s: spent before epoch 2
    code, out, err = run_main(train.main, argv, tmp_path, monkeypatch, capsys)
    assert code == 0, err
    assert "time budget reached after epoch 1 of 3" in out and "its files are written" in out
    assert "python train.py --name short --resume" in out
    assert len(log_rows(tmp_path, "short")) == 1 and os.path.isfile(tmp_path / "models" / "short" / "last.pth")
    code, out, err = run_main(train.main, ["--name", "short", "--resume", "--time_budget", "0"], tmp_path, monkeypatch,
                              capsys)
    assert code == 0 and "time_budget 0.01 -> 0" in out and "time budget reached" not in out, err
    assert [int(r["epoch"]) for r in log_rows(tmp_path, "short")] == [1, 2, 3]
