"""rundir.py: the run folder's rules, the background epoch writer, and the repair of an epoch cut short."""
import os
import threading

import pytest
import torch

import checkpoint
import rundir
from runlog import read_log
from utils import UserError


def state(epoch, best_epoch, weight=0.0):
    """A last.pth-like state after `epoch` epochs, the best at best_epoch."""
    rows = [{"epoch": e, "lr": 1e-3, "loss": 1.0, "iou": 0.5, "val_loss": 1.0, "val_iou": 0.1 * e, "val_dice": 0.5,
             "seconds": 1.0} for e in range(1, epoch + 1)]
    return {"model": {"w": torch.full((2,), weight)}, "epoch": epoch, "best_epoch": best_epoch, "best_iou": 0.5,
            "stale_epochs": 0, "log": rows}


def test_prepare_refuses_an_existing_run_unless_told(tmp_path):
    run_dir = str(tmp_path / "r")
    rundir.prepare(run_dir, {"resume": False, "overwrite": False}, write=True)
    rundir.write_epoch(run_dir, state(1, 1), True)
    (tmp_path / "r" / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="already holds a run"):
        rundir.prepare(run_dir, {"resume": False, "overwrite": False}, write=True)
    rundir.prepare(run_dir, {"resume": False, "overwrite": True}, write=True)
    assert os.listdir(run_dir) == ["notes.txt"]          # --overwrite removes the run's files, nothing else


def test_writer_writes_in_the_background_one_epoch_at_a_time(tmp_path, monkeypatch):
    run_dir = str(tmp_path)
    gate, started = threading.Event(), []
    real_write = rundir.write_epoch

    def slow_write(*args):
        started.append(args[1]["epoch"])
        gate.wait(10)
        real_write(*args)

    monkeypatch.setattr(rundir, "write_epoch", slow_write)
    writer = rundir.EpochWriter(run_dir)
    writer.save(state(1, 1), True)                      # returns at once: the write waits on the gate
    assert started == [1] and not os.path.exists(tmp_path / "log.csv")
    threading.Timer(0.3, gate.set).start()
    writer.save(state(2, 1, weight=2.0), False)          # waits for epoch 1's files first
    assert len(read_log(tmp_path / "log.csv")) >= 1
    writer.close(state(2, 1)["log"])
    assert started == [1, 2] and len(read_log(tmp_path / "log.csv")) == 2
    assert torch.equal(checkpoint.load(str(tmp_path / "model.pth"))["w"], torch.zeros(2))   # epoch 1 was the best
    assert checkpoint.load(str(tmp_path / "last.pth"))["epoch"] == 2 and (tmp_path / "curves.png").exists()


def test_a_failed_write_is_reported_by_the_next_save(tmp_path):
    blocker = tmp_path / "not_a_folder"
    blocker.write_text("")
    writer = rundir.EpochWriter(str(blocker))            # every file under it fails to be created
    writer.save(state(1, 1), True)
    with pytest.raises(UserError, match="could not write the run's files .* run the same command again"):
        writer.save(state(2, 1), False)


@pytest.mark.parametrize("best_epoch, model_rewritten", [(3, True), (2, False)])
def test_repair_completes_an_epoch_cut_short(tmp_path, best_epoch, model_rewritten):
    run_dir = str(tmp_path)
    rundir.write_epoch(run_dir, state(2, 2, weight=2.0), True)
    checkpoint.save(state(3, best_epoch, weight=3.0), os.path.join(run_dir, "last.pth"))   # killed right after this
    assert rundir.repair(run_dir) == 3
    assert [r["epoch"] for r in read_log(tmp_path / "log.csv")] == ["1", "2", "3"]
    expected = 3.0 if model_rewritten else 2.0
    assert torch.equal(checkpoint.load(os.path.join(run_dir, "model.pth"))["w"], torch.full((2,), expected))
    assert rundir.repair(run_dir) is None                # nothing left to repair


def test_split_csv_keeps_ids_with_commas_quotes_and_newlines(tmp_path):
    split = {"train": ["plain", "a,b", 'say "hi"', "two\nlines"], "val": ["x, y", "é"]}
    with open(tmp_path / "split.csv", "w") as f:
        rundir.write_split(f, split)
    assert rundir.read_split(str(tmp_path)) == split


def test_writer_writes_at_most_every_interval_and_the_last_epoch_on_close(tmp_path):
    """--save_every: the first epoch is written at once, later ones only once the interval has passed, and close()
    writes the last finished one; model.pth then holds the best epoch's weights even if that epoch was never written
    on its own."""
    writer = rundir.EpochWriter(str(tmp_path), every=3600.0)
    writer.save(state(1, 1, weight=1.0), True)
    writer.wait()
    assert checkpoint.load(str(tmp_path / "last.pth"))["epoch"] == 1
    writer.save(state(2, 2, weight=2.0), True)           # the best so far, but within the interval: not written
    writer.save(state(3, 2, weight=3.0), False)
    writer.wait()
    assert checkpoint.load(str(tmp_path / "last.pth"))["epoch"] == 1 and len(read_log(tmp_path / "log.csv")) == 1
    writer.close(state(3, 2)["log"])
    assert checkpoint.load(str(tmp_path / "last.pth"))["epoch"] == 3 and len(read_log(tmp_path / "log.csv")) == 3
    assert torch.equal(checkpoint.load(str(tmp_path / "model.pth"))["w"], torch.full((2,), 2.0))   # epoch 2's


def test_writer_with_no_interval_writes_every_epoch(tmp_path, monkeypatch):
    written = []
    real_write = rundir.write_epoch
    monkeypatch.setattr(rundir, "write_epoch", lambda *a: (written.append(a[1]["epoch"]), real_write(*a)))
    writer = rundir.EpochWriter(str(tmp_path), every=0.0)
    for epoch in (1, 2, 3):
        writer.save(state(epoch, 1), epoch == 1)
    writer.close(state(3, 1)["log"])
    assert written == [1, 2, 3]
