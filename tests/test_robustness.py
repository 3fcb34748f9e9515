"""Never lose a run, never answer a user mistake with a traceback (train.py and val.py as subprocesses)."""
import csv
import hashlib
import json
import os
import resource
import random
import re
import shutil
import signal
import subprocess
import sys
import time
import warnings

import cv2
import numpy as np
import pytest
import torch
import yaml

import checkpoint
import train
import val
from conftest import ROOT, make_data, run_main
from runlog import COLUMNS

TRAIN = [sys.executable, os.path.join(ROOT, "train.py")]
VAL = [sys.executable, os.path.join(ROOT, "val.py")]
FAST = ["--base_channels", "8", "--dataset", "tiny", "--arch", "UNet", "--epochs", "2", "-b", "4", "--input_w", "32", "--input_h", "32",
        "--num_workers", "0", "--device", "cpu", "--optimizer", "Adam"]


def snapshot(folder):
    """{relative path: sha1} of every file under folder ('-> target' for a link, 'folder' for a folder)."""
    out = {}
    for d, dirs, files in os.walk(folder):
        for f in files + dirs:
            p = os.path.join(d, f)
            out[os.path.relpath(p, folder)] = "-> " + os.readlink(p) if os.path.islink(p) else "folder" \
                if os.path.isdir(p) else hashlib.sha1(open(p, "rb").read()).hexdigest()
    return out


def read_log(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def log_rows(path):
    try:
        return len(read_log(path))
    except FileNotFoundError:
        return 0


@pytest.fixture(scope="module")
def template(tmp_path_factory):
    """inputs/tiny and a finished earlier run models/old/, made once for the module."""
    root = tmp_path_factory.mktemp("template")
    make_data(root / "inputs")
    r = subprocess.run(TRAIN + FAST + ["--name", "old", "--epochs", "1"], cwd=root, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return root


@pytest.fixture
def workdir(template, tmp_path):
    """A fresh copy of the template: data, and a run models/old/ that bad input must never change."""
    shutil.copytree(template, tmp_path, dirs_exist_ok=True)
    return tmp_path


def drop(p):
    os.remove(p)


def halve(p):
    data = open(p, "rb").read()
    open(p, "wb").write(data[: len(data) // 2])


# (id, how to break the data or what to write, extra train.py arguments, text the message must contain)
BAD_TRAIN_INPUTS = [
    ("missing-folder", None, ["--dataset", "nothing_here"], "inputs/nothing_here does not exist"),
    ("empty-folder", "empty", [], "No input file found in inputs/tiny/images"),
    ("image-without-mask", ("masks/0/img0003.png", drop), [], "img0003"),
    ("mask-without-image", ("images/img0004.png", drop), [], "have no image: img0004"),
    ("zero-byte-image", ("images/img0002.png", lambda p: open(p, "wb").close()), [], "images/img0002.png"),
    ("truncated-image", ("images/img0002.png", halve), [], "images/img0002.png"),
    ("size-mismatch", ("masks/0/img0001.png", lambda p: cv2.imwrite(p, np.zeros((16, 32), np.uint8))), [], "masks/0/img0001.png is 32x16"),
    ("rgb-mask", ("masks/0/img0001.png", lambda p: cv2.imwrite(p, np.zeros((32, 32, 3), np.uint8))), [], "masks/0/img0001.png has 3 channels"),
    ("label-like-16-bit-mask", ("masks/0/img0001.png", lambda p: cv2.imwrite(p, np.arange(1024, dtype=np.uint16).reshape(32, 32) % 3)), [], "masks/0/img0001.png has no value above 127"),
    ("wrong-img-ext", None, ["--img_ext", ".jpg"], "--img_ext .png"),
    ("num-classes", None, ["--num_classes", "2"], "num_classes 2 expects [0, 1]; pass --num_classes 1"),
    ("input-size", None, ["--input_w", "40"], "input_w 40 is not a multiple of 16"),
    ("batch-too-large", None, ["-b", "9"], "--batch_size 9 is larger than the training split (8"),
    ("no-validation-left", "one-image", [], "leaves 1 validation and 0 training images; both need at least one. "
     "Add images or change --val_split. With one or two large images, train on crops of them (--crop"),
    ("config-not-yaml", ("bad.yml", "epochs: [1\n"), ["--config", "bad.yml"], "bad.yml is not valid YAML"),
    ("config-unknown-key", ("bad.yml", "learning_rate: 0.1\n"), ["--config", "bad.yml"], "unknown key 'learning_rate'"),
    ("config-wrong-type", ("bad.yml", "batch_size: many\n"), ["--config", "bad.yml"], "key 'batch_size' has the value 'many'"),
    ("resume-nothing", None, ["--resume", "--name", "never_trained"], "never_trained/last.pth does not exist"),
    ("device", None, ["--device", "tpu"], "--device 'tpu'"),
    # second pass (issue 11): names that are not one folder inside models/, checks that came after the deletion,
    # values that were taken wrongly, files that gave tracebacks, and flags --resume may not change
    ("name-empty", None, ["--name", ""], "name must be a plain folder name"),
    ("name-dot", None, ["--name", "."], "name must be a plain folder name"),
    ("name-parent", None, ["--name", ".."], "name must be a plain folder name"),
    ("name-path", None, ["--name", "x/../.."], "name must be a plain folder name"),
    ("name-too-long", None, ["--name", "n" * 250], "at most 120 characters"),
    ("memory-loader-crop", None, ["--loader", "memory", "--crop"], "with --crop use --loader workers"),
    ("seed-too-large", None, ["--seed", str(2**64)], "seed must be between 0 and 2**63-1"),
    ("negative-weight-decay", None, ["--weight_decay", "-1"], "(--weight_decay): weight_decay must be 0 or a positive"),
    ("lr-nan", None, ["--lr", "nan"], "lr must be a positive number, not nan"),
    ("split-seed-negative", None, ["--split_seed", "-1"], "split_seed must be between 0 and 2**32-1"),
    ("config-not-utf8", ("bad.yml", b"epochs: \xff\xfe\x00\x01"), ["--config", "bad.yml"], "bad.yml is not UTF-8 text"),
    ("palette-mask", ("masks/0/img0001.png", lambda p: palette_png(p)), [], "img0001.png is a palette (indexed-colour)"),
    ("label-valued-mask", ("masks/0/img0001.png", lambda p: cv2.imwrite(p, np.tile([0, 1, 2], (32, 11))[:, :32]
                                                                        .astype(np.uint8))), [], "no value above 127"),
    ("resume-new-optimizer", None, ["--resume", "--name", "old", "--optimizer", "SGD"], "sets optimizer to 'SGD'"),
    ("resume-new-lr", None, ["--resume", "--name", "old", "--lr", "0.1"], "(--lr) sets lr to 0.1"),
    ("runs-folder-is-a-file", "models-file", ["--name", "new"], "could not write the run's files in models/new"),
    # third pass (issue 24): messages that hid the real cause, and small files that cost gigabytes
    ("run-folder-is-a-file", "name-file", ["--name", "new"], "models/new is a file, not a run folder"),
    ("data-dir-is-a-file", "data-dir-file", ["--data_dir", "notes.txt"], "notes.txt is a file, not a folder"),
    ("config-twice", ("bad.yml", "epochs: 1\n"), ["--config", "bad.yml", "--config", "bad.yml"], "--config was given twice"),
    ("config-duplicate-key", ("bad.yml", "epochs: 1\nlr: 0.1\nepochs: 3\n"), ["--config", "bad.yml"],
     "the key 'epochs' is given twice"),
    ("config-alias-bomb", ("bad.yml", "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{k}: &{k} [{', '.join(['*' + p] * 9)}]\n" for p, k in zip("abcdefgh", "bcdefghi")) + "name: *i\n"),
     ["--config", "bad.yml"], "an alias (*name) is not allowed"),
    ("png-declares-gigapixels", ("images/img0002.png", lambda p: declare_size(p, 60000, 60000)), [],
     "images/img0002.png declares 60000x60000 pixels"),
    ("input-cannot-fit", None, ["--input_w", "4096", "--input_h", "4096", "-b", "4096"],
     "a training step of UNet needs at least"),
    ("input-too-large", None, ["--input_w", "20000", "--input_h", "20000"], "between 16 and 4096 (for larger images train on crops"),
    ("min-lr-above-lr", None, ["--lr", "1e-4", "--min_lr", "1e-3"], "min_lr 0.001 is above lr 0.0001"),
]


def declare_size(path, width, height):
    """A PNG whose header says width x height (a few bytes to change; decoding it would take gigabytes)."""
    data = bytearray(open(path, "rb").read())
    data[16:24] = width.to_bytes(4, "big") + height.to_bytes(4, "big")
    open(path, "wb").write(bytes(data))


def palette_png(path):
    """An indexed-colour PNG (what many annotation tools save): OpenCV expands it to 3 channels."""
    from PIL import Image
    image = Image.fromarray((cv2.imread(path, 0) > 127).astype(np.uint8), mode="P")
    image.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    image.save(path)


@pytest.mark.e2e
@pytest.mark.parametrize("case, breakage, extra, expected", BAD_TRAIN_INPUTS, ids=[c[0] for c in BAD_TRAIN_INPUTS])
def test_bad_input_gets_one_clear_message(workdir, monkeypatch, capsys, case, breakage, extra, expected):
    data = workdir / "inputs" / "tiny"
    if breakage == "empty":
        for f in os.listdir(data / "images"):
            os.remove(data / "images" / f)
    elif breakage == "one-image":
        for k in range(1, 10):
            os.remove(data / "images" / f"img{k:04d}.png")
            os.remove(data / "masks" / "0" / f"img{k:04d}.png")
    elif breakage == "name-file":
        (workdir / "models" / "new").write_text("not a run")
    elif breakage == "data-dir-file":
        (workdir / "notes.txt").write_text("not a folder")
    elif breakage == "models-file":
        shutil.move(workdir / "models", workdir / "models_moved")
        (workdir / "models").write_text("not a folder")
    elif breakage and breakage[0].endswith(".yml"):
        (workdir / breakage[0]).write_bytes(breakage[1] if isinstance(breakage[1], bytes) else breakage[1].encode())
    elif breakage:
        breakage[1](str(data / breakage[0]))
    before = snapshot(workdir)
    # --name old --overwrite: even a run the user asked to replace must survive a bad data set
    args = FAST + extra if "--resume" in extra else FAST + ["--name", "old", "--overwrite"] + extra
    code, _, err = run_main(train.main, args, workdir, monkeypatch, capsys)
    assert code == 2                                    # a clean exit: any other exception would fail the test
    assert expected in err, err
    assert snapshot(workdir) == before                 # nothing anywhere changed: models/, inputs/, the project


@pytest.mark.e2e
def test_zero_one_masks_train_with_one_warning(workdir, monkeypatch, capsys):
    masks = workdir / "inputs" / "tiny" / "masks" / "0"
    for f in os.listdir(masks):
        cv2.imwrite(str(masks / f), (cv2.imread(str(masks / f), 0) > 127).astype(np.uint8))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        code, out, err = run_main(train.main, FAST + ["--name", "zero_one", "--epochs", "1"], workdir, monkeypatch, capsys)
    assert code == 0, err
    assert sum(str(w.message).startswith("all masks under") for w in caught) == 1
    # the 1s were read as foreground: "foreground everywhere" overlaps the validation masks
    everywhere = re.search(r"and ([0-9.]+) \(foreground everywhere\)", out)
    assert everywhere and float(everywhere.group(1)) > 0.05, out


@pytest.mark.e2e
def test_existing_run_is_not_overwritten(workdir, monkeypatch, capsys):
    before = snapshot(workdir / "models")
    code, _, err = run_main(train.main, FAST + ["--name", "old"], workdir, monkeypatch, capsys)
    assert code == 2
    assert "--resume" in err and "--overwrite" in err and "models/old" in err
    assert snapshot(workdir / "models") == before
    code, _, err = run_main(train.main, FAST + ["--name", "old", "--overwrite"], workdir, monkeypatch, capsys)
    assert code == 0 and len(read_log(workdir / "models" / "old" / "log.csv")) == 2, err


@pytest.mark.e2e
@pytest.mark.parametrize("case, args, expected", [
    ("no-run", ["--name", "nope"], "there is no run models/nope"),
    ("no-model", ["--name", "partial"], "models/partial/model.pth does not exist"),
    ("not-a-checkpoint", ["--name", "forged"], "models/forged/model.pth is not a checkpoint"),
    ("code-in-checkpoint", ["--name", "evil"], "models/evil/model.pth is not a checkpoint"),
    ("empty-images", ["--name", "old", "--images", "empty_dir"], "No input file found in empty_dir"),
], ids=["no-run", "no-model", "not-a-checkpoint", "code-in-checkpoint", "empty-images"])
def test_val_mistakes_get_one_clear_message(workdir, monkeypatch, capsys, case, args, expected):
    os.makedirs(workdir / "empty_dir")
    for name in ("partial", "forged", "evil"):
        os.makedirs(workdir / "models" / name)
        (workdir / "models" / name / "config.yml").write_text((workdir / "models" / "old" / "config.yml").read_text())
    (workdir / "models" / "forged" / "model.pth").write_text("this is not a checkpoint")
    torch.save({"payload": os.system}, workdir / "models" / "evil" / "model.pth")  # would run code if unpickled freely
    code, _, err = run_main(val_main(), args, workdir, monkeypatch, capsys)
    assert code == 2                                    # a clean exit: any other exception would fail the test
    assert expected in err, err


@pytest.mark.e2e
def test_nan_loss_stops_and_keeps_last_good_checkpoint(workdir, monkeypatch, capsys):
    code, _, err = run_main(train.main, FAST + ["--name", "boom", "--optimizer", "SGD", "--lr", "1e30", "--epochs", "4"],
                            workdir, monkeypatch, capsys)
    assert code == 3                                    # not an uncaught exception
    found = re.search(r"the loss became (nan|inf|-inf) at epoch (\d+), batch (\d+)", err)
    assert found, err
    state = checkpoint.load(str(workdir / "models" / "boom" / "last.pth"))
    assert state["epoch"] == int(found.group(2)) - 1                       # the last good epoch
    assert all(torch.isfinite(v.float()).all() for v in state["model"].values())


def final_state(run_dir):
    state = checkpoint.load(os.path.join(run_dir, "last.pth"))
    log = [{k: v for k, v in row.items() if k != "seconds"} for row in read_log(os.path.join(run_dir, "log.csv"))]
    return state, log


def interrupt_when(proc, log_path, rows, sig=signal.SIGINT):
    """Sends `sig` once log.csv has `rows` rows; returns (returncode, stderr)."""
    deadline = time.time() + 120
    while log_rows(log_path) < rows and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    return proc.returncode, err


@pytest.mark.e2e
@pytest.mark.slow(seconds=35)
@pytest.mark.parametrize("sig, loader", [(signal.SIGINT, ["--loader", "memory"]),
                                         (signal.SIGTERM, ["--loader", "workers", "--num_workers", "2"])],
                         ids=["sigint-memory-loader", "sigterm-worker-loader"])
def test_interrupt_then_resume_equals_uninterrupted_run(workdir, sig, loader, monkeypatch, capsys):
    """The signal goes to a real process; the uninterrupted run and the resume run train.py's main here."""
    # every epoch's files (--save_every 0), so that log.csv shows the epochs as they end and the signal comes mid-run
    args = FAST + ["--epochs", "10", "--seed", "7", "--scheduler", "CosineAnnealingLR", "--save_every", "0"] + loader
    code, _, err = run_main(train.main, args + ["--name", "straight"], workdir, monkeypatch, capsys)
    assert code == 0, err

    proc = subprocess.Popen(TRAIN + args + ["--name", "broken"], cwd=workdir, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    code, err = interrupt_when(proc, workdir / "models" / "broken" / "log.csv", 2, sig)
    assert code == 130 and "Traceback" not in err
    assert "python train.py --name broken --resume" in err
    done = checkpoint.load(str(workdir / "models" / "broken" / "last.pth"))["epoch"]
    assert 2 <= done < 10        # mid-run: 10 epochs, so a loaded machine still signals before the end
    code, out, err = run_main(train.main, ["--name", "broken", "--resume"], workdir, monkeypatch, capsys)
    assert code == 0, err
    assert f"resuming after epoch {done}" in out

    a, log_a = final_state(workdir / "models" / "straight")
    b, log_b = final_state(workdir / "models" / "broken")
    assert [row["epoch"] for row in log_b] == [str(e) for e in range(1, 11)]   # appended, not duplicated
    assert log_a == log_b
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    best_a = torch.load(workdir / "models" / "straight" / "model.pth", weights_only=True)
    best_b = torch.load(workdir / "models" / "broken" / "model.pth", weights_only=True)
    assert all(torch.equal(best_a[k], best_b[k]) for k in best_a)


@pytest.mark.e2e
@pytest.mark.slow(seconds=30)
def test_between_interval_writes_an_interrupt_saves_the_last_finished_epoch(workdir, monkeypatch, capsys):
    """At the default --save_every (30 s) a short run writes its files after epoch 1 and at its end only; Ctrl-C in
    between writes the last finished epoch, and resuming from it ends as the uninterrupted run does."""
    args = FAST + ["--epochs", "12", "--seed", "3"]
    code, _, err = run_main(train.main, args + ["--name", "straight"], workdir, monkeypatch, capsys)
    assert code == 0, err
    proc = subprocess.Popen(TRAIN + args + ["--name", "cut"], cwd=workdir, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    for line in proc.stdout:
        if line.startswith("epoch 3/"):
            break
    log_then = log_rows(workdir / "models" / "cut" / "log.csv")
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "Traceback" not in err, err
    assert log_then == 1                                  # epochs 2 and 3 had ended, but within the interval
    done = checkpoint.load(str(workdir / "models" / "cut" / "last.pth"))["epoch"]
    assert 3 <= done < 12 and log_rows(workdir / "models" / "cut" / "log.csv") == done
    code, _, err = run_main(train.main, ["--name", "cut", "--resume"], workdir, monkeypatch, capsys)
    assert code == 0, err
    a, log_a = final_state(workdir / "models" / "straight")
    b, log_b = final_state(workdir / "models" / "cut")
    assert log_a == log_b and all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


@pytest.mark.e2e
def test_resuming_a_finished_run_for_longer_stretches_the_cosine(workdir, monkeypatch, capsys):
    code, out, err = run_main(train.main, ["--name", "old", "--resume", "--epochs", "3"], workdir, monkeypatch, capsys)
    assert code == 0, err
    assert "(epochs 1 -> 3)" in out                                 # what changed is said
    log = read_log(workdir / "models" / "old" / "log.csv")
    assert [row["epoch"] for row in log] == ["1", "2", "3"]
    lrs = [float(row["lr"]) for row in log]
    assert lrs[1] == pytest.approx(1e-5 + (1e-3 - 1e-5) * 0.75, rel=1e-4)   # not stuck at min_lr
    assert yaml.safe_load(open(workdir / "models" / "old" / "config.yml"))["epochs"] == 3


@pytest.mark.e2e
def test_resume_and_overwrite_together_are_refused(workdir, monkeypatch, capsys):
    code, _, err = run_main(train.main, ["--name", "old", "--resume", "--overwrite"], workdir, monkeypatch, capsys)
    assert code == 2 and "not both" in err


@pytest.mark.e2e
@pytest.mark.slow(seconds=30)
def test_sigkill_at_random_moments_never_corrupts_files(workdir):
    """SIGKILL a long run at 4 random moments (resuming after each); every file left must load."""
    rng = random.Random(0)
    run_dir = workdir / "models" / "killme"
    args = FAST + ["--name", "killme", "--epochs", "10000"]
    kills = 0
    while kills < 4:
        first = not (run_dir / "last.pth").exists()
        proc = subprocess.Popen(TRAIN + args + ([] if first else ["--resume"]), cwd=workdir,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            start_rows = log_rows(run_dir / "log.csv")
            while log_rows(run_dir / "log.csv") <= start_rows and proc.poll() is None:   # wait until it writes
                time.sleep(0.02)
            time.sleep(rng.uniform(0, 0.8))   # somewhere in the next epoch: training, or writing its files
        finally:
            proc.kill()                       # also when the test itself is stopped: no orphan keeps training
            proc.wait()
        kills += 1
        for name in ("last.pth", "model.pth"):
            if (run_dir / name).exists():
                checkpoint.load(str(run_dir / name))        # a torn file would raise here
        rows = read_log(run_dir / "log.csv")
        assert list(rows[0]) == COLUMNS and [int(r["epoch"]) for r in rows] == list(range(1, len(rows) + 1))
        assert isinstance(yaml.safe_load(open(run_dir / "config.yml")), dict)
        assert len(rows) > start_rows          # the process really trained (and resumed) before the kill


@pytest.mark.e2e
@pytest.mark.slow
def test_deterministic_runs_give_identical_logs(workdir, monkeypatch, capsys):
    """One run as a process of its own, the other inside this one (after every test before it): same log."""
    logs = []
    for name in ("d1", "d2"):
        argv = FAST + ["--name", name, "--deterministic", "--seed", "5"]
        if name == "d1":
            r = subprocess.run(TRAIN + argv, cwd=workdir, capture_output=True, text=True)
            assert r.returncode == 0, r.stderr
        else:
            code, _, err = run_main(train.main, argv, workdir, monkeypatch, capsys)
            assert code == 0, err
        logs.append(final_state(workdir / "models" / name)[1])
        assert yaml.safe_load(open(workdir / "models" / name / "config.yml"))["deterministic"] is True
    assert logs[0] == logs[1]


# ---- second pass (issue 11): what a hostile afternoon of use found ----

@pytest.mark.e2e
def test_overwrite_removes_only_the_runs_own_files(workdir, monkeypatch, capsys):
    (workdir / "models" / "old" / "notes.txt").write_text("my notes")
    code, _, err = run_main(train.main, FAST + ["--name", "old", "--overwrite", "--epochs", "1"], workdir,
                            monkeypatch, capsys)
    assert code == 0, err
    assert (workdir / "models" / "old" / "notes.txt").read_text() == "my notes"
    assert (workdir / "models" / "other_run_untouched").exists() is False      # and nothing beside it was made


@pytest.mark.e2e
def test_a_run_in_use_is_refused_and_a_dead_ones_lock_is_taken_over(workdir, monkeypatch, capsys):
    args = FAST + ["--name", "race", "--epochs", "10000"]
    first = subprocess.Popen(TRAIN + args, cwd=workdir, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        log = workdir / "models" / "race" / "log.csv"
        deadline = time.time() + 120
        while log_rows(log) < 1 and first.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        code, _, err = run_main(train.main, args + ["--overwrite", "--seed", "3"], workdir, monkeypatch, capsys)
        assert code == 2 and "Traceback" not in err
        assert f"being trained right now by process {first.pid}" in err
        assert yaml.safe_load(open(workdir / "models" / "race" / "config.yml"))["seed"] == 0   # the first run's
    finally:
        first.kill()                                    # SIGKILL: its lock stays behind
        first.wait()
    assert (workdir / "models" / "race" / ".lock").exists()
    code, _, err = run_main(train.main, ["--name", "race", "--resume", "--epochs", str(log_rows(log) + 1)], workdir,
                            monkeypatch, capsys)
    assert code == 0, err                               # a dead process's lock does not block
    assert not (workdir / "models" / "race" / ".lock").exists()


@pytest.mark.e2e
def test_files_get_the_permissions_of_an_ordinary_write(workdir):
    r = subprocess.run(["bash", "-c", "umask 022 && exec \"$@\"", "-", *TRAIN, *FAST, "--name", "perm", "--epochs", "1"],
                       cwd=workdir, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    for f in ("config.yml", "log.csv", "model.pth", "last.pth", "split.csv", "curves.png"):
        assert oct(os.stat(workdir / "models" / "perm" / f).st_mode & 0o777) == "0o644", f


KILL_AFTER = """
import os, signal, sys
sys.path.insert(0, {root!r})
import checkpoint, rundir, train
target = sys.argv[1]
real_save, real_log = checkpoint.save, rundir.write_log
def save(obj, path):
    real_save(obj, path)
    if path.endswith(target) and (target == "model.pth" or obj.get("epoch") == 1):
        os.kill(os.getpid(), signal.SIGKILL)      # the instant right after this file of epoch 1 is in place
def write_log(path, rows):
    real_log(path, rows)
    if target == "log.csv" and len(rows) == 1:
        os.kill(os.getpid(), signal.SIGKILL)
checkpoint.save, rundir.write_log = save, write_log
train.main(sys.argv[2:])
"""


@pytest.mark.e2e
@pytest.mark.parametrize("instant", ["last.pth", "model.pth", "log.csv"])
def test_killed_between_an_epochs_files_the_folder_is_repaired(workdir, instant, monkeypatch, capsys):
    """SIGKILL right after each of an epoch's files: val.py and --resume find (or repair to) one whole epoch."""
    script = KILL_AFTER.format(root=ROOT)
    r = subprocess.run([sys.executable, "-c", script, instant, *FAST, "--name", "k", "--epochs", "3"], cwd=workdir,
                       capture_output=True, text=True)
    assert r.returncode == -signal.SIGKILL, r.stderr
    run_dir = workdir / "models" / "k"
    assert checkpoint.load(str(run_dir / "last.pth"))["epoch"] == 1
    code, _, err = run_main(val.main, ["--name", "k"], workdir, monkeypatch, capsys)
    assert code == 0, err                               # model.pth is there (repaired if it was not yet written)
    assert [row["epoch"] for row in read_log(run_dir / "log.csv")] == ["1"]
    code, out, err = run_main(train.main, ["--name", "k", "--resume"], workdir, monkeypatch, capsys)
    assert code == 0 and "resuming after epoch 1" in out, err
    assert [row["epoch"] for row in read_log(run_dir / "log.csv")] == ["1", "2", "3"]


@pytest.mark.e2e
def test_a_full_disk_ends_with_a_message_and_the_previous_epoch_intact(workdir, monkeypatch, capsys):
    real_save = checkpoint.save

    def save(obj, path):
        if isinstance(obj, dict) and obj.get("epoch") == 2:
            raise OSError(28, "No space left on device")
        real_save(obj, path)

    monkeypatch.setattr(checkpoint, "save", save)
    code, _, err = run_main(train.main, FAST + ["--name", "full", "--epochs", "4", "--save_every", "0"], workdir,
                            monkeypatch, capsys)
    assert code == 2 and "No space left on device" in err and "intact" in err
    assert checkpoint.load(str(workdir / "models" / "full" / "last.pth"))["epoch"] == 1
    assert len(read_log(workdir / "models" / "full" / "log.csv")) == 1
    assert "again with --resume" in err


@pytest.mark.e2e
def test_a_full_disk_before_the_first_epoch_advises_a_command_that_works(workdir, monkeypatch, capsys):
    """config.yml is written before the epoch-0 last.pth: a plain rerun would be refused ('already holds a run')."""
    real_save = checkpoint.save

    def full(obj, path):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoint, "save", full)
    code, _, err = run_main(train.main, FAST + ["--name", "early"], workdir, monkeypatch, capsys)
    assert code == 2 and "No space left on device" in err, err
    assert os.path.exists(workdir / "models" / "early" / "config.yml")
    advice = re.search(r"run the same command again(?: with (--\w+))?", err)
    monkeypatch.setattr(checkpoint, "save", real_save)
    code, _, err = run_main(train.main, FAST + ["--name", "early"] + ([advice[1]] if advice[1] else []),
                            workdir, monkeypatch, capsys)
    assert code == 0, err


@pytest.mark.e2e
def test_resume_without_config_yml_uses_the_copy_in_last_pth(workdir, monkeypatch, capsys):
    os.remove(workdir / "models" / "old" / "config.yml")
    code, _, err = run_main(train.main, ["--name", "old", "--resume", "--epochs", "2"], workdir, monkeypatch, capsys)
    assert code == 0, err
    assert yaml.safe_load(open(workdir / "models" / "old" / "config.yml"))["arch"] == "UNet"


@pytest.mark.e2e
def test_a_model_folder_with_only_model_pth_and_model_json_evaluates(workdir, monkeypatch, capsys):
    """What a colleague sends: model.pth and model.json, no config.yml, no last.pth. val.py rebuilds the network from
    model.json and predicts as the run did; a folder without model.json either gets one message naming the fix."""
    probs = ["--data", "inputs/tiny", "--save_probs"]
    code, _, err = run_main(val.main, ["--name", "old", *probs], workdir, monkeypatch, capsys)
    assert code == 0, err
    sent = workdir / "models" / "sent"
    os.makedirs(sent)
    for f in ("model.pth", "model.json"):
        shutil.copy(workdir / "models" / "old" / f, sent / f)
    code, out, err = run_main(val.main, ["--name", "sent", *probs], workdir, monkeypatch, capsys)
    assert code == 0 and "Traceback" not in err, err
    old_maps, sent_maps = (workdir / "outputs" / n / "on_tiny" / "probs" / "0" for n in ("old", "sent"))
    maps = sorted(os.listdir(old_maps))
    assert maps and all((old_maps / m).read_bytes() == (sent_maps / m).read_bytes() for m in maps)   # same model
    os.remove(sent / "model.json")
    code, _, err = run_main(val.main, ["--name", "sent", "--data", "inputs/tiny"], workdir, monkeypatch, capsys)
    assert code == 2 and "Traceback" not in err and "copy the run's config.yml (or model.json)" in err
    with open(sent / "model.json", "w") as f:                     # a crafted description: refused by key
        json.dump({**json.load(open(workdir / "models" / "old" / "model.json")), "num_classes": 100000000}, f)
    code, _, err = run_main(val.main, ["--name", "sent", "--data", "inputs/tiny"], workdir, monkeypatch, capsys)
    assert code == 2 and "model.json" in err and "num_classes" in err and "Traceback" not in err


@pytest.mark.e2e
@pytest.mark.parametrize("key, value, named", [
    ("num_classes", 100000000, "num_classes"), ("base_channels", 400, "base_channels"),
    ("base_channels", 100000, "base_channels"), ("input_size", [16000000, 16000000], "between 16 and 4096"),
    ("arch", "__import__", "arch"), ("num_classes", "abc", "num_classes"), ("normalize", "evil", "normalize"),
    ("base_channels", 16, "(16,) in the settings"),           # in range, but not the network model.pth holds
])
def test_a_crafted_model_json_is_refused_by_key_before_anything_is_allocated(workdir, key, value, named, monkeypatch,
                                                                              capsys):
    """A run folder is something users receive: every value of model.json is checked (range, type, registry)
    and model.pth's tensors are compared with the network it describes before that network is built."""
    path = workdir / "models" / "old" / "model.json"
    description = json.load(open(path))
    if key == "normalize":
        description["normalize"]["mode"] = value
    else:
        description[key] = value
    path.write_text(json.dumps(description))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    code, _, err = run_main(val.main, ["--name", "old", "--data", "inputs/tiny"], workdir, monkeypatch, capsys)
    assert code == 2 and "Traceback" not in err, err
    assert named in err and ("model.json" in err or "model.pth" in err)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 500_000     # KiB: nothing like GBs


@pytest.mark.e2e
def test_eleven_classes_hidden_folders_and_mixed_zero_one_masks(workdir, monkeypatch, capsys):
    data = workdir / "inputs" / "tiny"
    for c in range(1, 11):
        shutil.copytree(data / "masks" / "0", data / "masks" / str(c))
    os.makedirs(data / "masks" / ".ipynb_checkpoints")
    masks = data / "masks" / "0"
    for f in sorted(os.listdir(masks))[:4]:                 # 4 of 10 masks stored as 0/1, the rest 0/255
        cv2.imwrite(str(masks / f), (cv2.imread(str(masks / f), 0) > 127).astype(np.uint8))
    with pytest.warns(UserWarning, match=r"4 of 10 images' masks \(e.g. img0000"):
        code, _, err = run_main(train.main, FAST + ["--name", "c11", "--num_classes", "11", "--epochs", "1"], workdir,
                                monkeypatch, capsys)
    assert code == 0, err
    from dataset import SegmentationData
    d = SegmentationData.from_folder(str(data), ".png", ".png", 11, 3)
    assert all(d.masks[k][:, :, 0].sum() == d.masks[k][:, :, 1].sum() > 0 for k in range(4))   # 0/1 read as 0/255


@pytest.mark.e2e
def test_val_uses_the_recorded_split_and_clears_stale_outputs(workdir, monkeypatch, capsys):
    data = workdir / "inputs" / "tiny"
    for k in range(3):                                    # images added after training
        shutil.copy(data / "images" / "img0000.png", data / "images" / f"new{k}.png")
        shutil.copy(data / "masks" / "0" / "img0000.png", data / "masks" / "0" / f"new{k}.png")
    out = workdir / "outputs" / "old"
    os.makedirs(out / "0")
    (out / "0" / "stale.png").write_bytes(b"")            # an earlier evaluation's mask (recorded): removed
    (out / ".val_files").write_text("0/stale.png\n")
    (out / "0" / "mine.png").write_bytes(b"")             # the user's file (not recorded): kept
    code, stdout, err = run_main(val_main(), ["--name", "old"], workdir, monkeypatch, capsys)
    assert code == 0, err
    assert "3 image(s) more and 0 fewer than when the run trained" in stdout
    recorded = [line.split(",")[0] for line in (workdir / "models" / "old" / "split.csv").read_text().splitlines()
                if line.endswith(",val")]
    assert [row["id"] for row in read_log(out / "metrics.csv")] == recorded
    assert sorted(os.listdir(out / "0")) == sorted([i + ".png" for i in recorded] + ["mine.png"])


@pytest.mark.e2e
@pytest.mark.parametrize("output, what", [("inputs/tiny/masks", "the labelled folder --data names"),
                                          ("inputs/tiny", "the labelled folder --data names"),
                                          ("models/old", "the run folder of old"),
                                          ("models", "the runs folder")])
def test_val_never_writes_into_the_data_or_a_run(workdir, monkeypatch, capsys, output, what):
    before = snapshot(workdir)
    code, _, err = run_main(val_main(), ["--name", "old", "--data", "inputs/tiny", "--output", output], workdir,
                            monkeypatch, capsys)
    assert code == 2 and f"--output {output} is inside" in err and what in err and "Traceback" not in err
    assert snapshot(workdir) == before                  # nothing written, nothing removed


@pytest.mark.e2e
@pytest.mark.parametrize("output, what", [("inputs/other/masks", "a data set"), ("inputs/other/masks/0", "a data set"),
                                          ("inputs/other", "a data set"), ("inputs/other/labels", "a data set"),
                                          ("exports/x/sub", "an export"), ("elsewhere/run_copy", "a run folder")])
def test_val_never_writes_into_another_data_set_a_run_or_an_export(workdir, monkeypatch, capsys, output, what):
    """Not only the data val.py reads and the runs it knows: any folder that holds a data set (images/ beside masks/,
    labels/ or instances/), a run or an export, wherever it is (val.py --output inputs/v/masks overwrote five
    ground-truth masks of another data set, and a second call deleted them as its own)."""
    shutil.copytree(workdir / "inputs" / "tiny", workdir / "inputs" / "other")
    os.makedirs(workdir / "inputs" / "other" / "labels")
    os.makedirs(workdir / "exports" / "x")
    (workdir / "exports" / "x" / ".unet_toolkit_export").write_text("exported from models/old\n")
    shutil.copytree(workdir / "models" / "old", workdir / "elsewhere" / "run_copy")
    before = snapshot(workdir)
    code, _, err = run_main(val_main(), ["--name", "old", "--data", "inputs/tiny", "--output", output], workdir,
                            monkeypatch, capsys)
    assert code == 2 and f"--output {output} is inside" in err and what in err and "Traceback" not in err, err
    assert snapshot(workdir) == before                  # nothing written, nothing removed


@pytest.mark.e2e
def test_an_output_subfolder_that_is_a_link_is_refused(workdir, monkeypatch, capsys):
    elsewhere = workdir / "my_masks"
    elsewhere.mkdir()
    (elsewhere / "img0001.png").write_bytes(b"mine")
    os.makedirs(workdir / "outputs" / "old")
    os.symlink(elsewhere, workdir / "outputs" / "old" / "0")
    code, _, err = run_main(val_main(), ["--name", "old"], workdir, monkeypatch, capsys)
    assert code == 2 and "is a symbolic link" in err
    assert os.listdir(elsewhere) == ["img0001.png"] and (elsewhere / "img0001.png").read_bytes() == b"mine"


def val_main():
    import val
    return val.main


@pytest.mark.e2e
def test_yaml_values_stay_what_the_user_wrote(workdir, monkeypatch, capsys):
    (workdir / "c.yml").write_text("name: no\nseed: 0123\n")
    code, _, err = run_main(train.main, FAST + ["--config", "c.yml", "--epochs", "1"], workdir, monkeypatch, capsys)
    assert code == 0, err
    saved = yaml.safe_load(open(workdir / "models" / "no" / "config.yml"))
    assert saved["name"] == "no" and saved["seed"] == 123


@pytest.mark.e2e
def test_interrupts_before_the_first_save_and_during_val_say_what_is_left(workdir, monkeypatch, capsys):
    def stop(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(train, "build", stop)
    code, _, err = run_main(train.main, FAST + ["--name", "fresh"], workdir, monkeypatch, capsys)
    assert code == 130 and "before the run saved anything" in err and "last.pth" not in err
    import val
    monkeypatch.setattr(val, "evaluate_images", stop)
    code, _, err = run_main(val.main, ["--name", "old"], workdir, monkeypatch, capsys)
    assert code == 130 and "interrupted" in err


@pytest.mark.e2e
def test_a_closed_stdout_does_not_stop_the_run(workdir):
    proc = subprocess.Popen(TRAIN + FAST + ["--name", "piped"], cwd=workdir, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    proc.stdout.readline()                                 # like `| head -1`
    proc.stdout.close()
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0 and "Traceback" not in err, err
    assert len(read_log(workdir / "models" / "piped" / "log.csv")) == 2


@pytest.mark.e2e
def test_a_copied_or_renamed_run_folder_resumes_as_itself(workdir, monkeypatch, capsys):
    """cp -a models/old models/copy, then --name copy --resume: the copy trains on; models/old is not touched."""
    shutil.copytree(workdir / "models" / "old", workdir / "models" / "copy", symlinks=True)
    before = snapshot(workdir / "models" / "old")
    code, out, err = run_main(train.main, ["--name", "copy", "--resume", "--epochs", "2"], workdir, monkeypatch, capsys)
    assert code == 0, err
    assert "name old -> copy" in out and snapshot(workdir / "models" / "old") == before
    assert len(read_log(workdir / "models" / "copy" / "log.csv")) == 2
    assert yaml.safe_load(open(workdir / "models" / "copy" / "config.yml"))["name"] == "copy"
    os.rename(workdir / "models" / "copy", workdir / "models" / "renamed")
    code, out, err = run_main(train.main, ["--name", "renamed", "--resume", "--epochs", "3"], workdir, monkeypatch, capsys)
    assert code == 0, err
    assert len(read_log(workdir / "models" / "renamed" / "log.csv")) == 3


@pytest.mark.e2e
def test_resume_after_images_were_added_keeps_the_recorded_split(workdir, monkeypatch, capsys):
    """New images since the run started are left out of a resumed run: none of its validation images is trained on."""
    data = workdir / "inputs" / "tiny"
    for k in range(4):
        shutil.copy(data / "images" / "img0000.png", data / "images" / f"aaa{k}.png")      # sort first: a new split
        shutil.copy(data / "masks" / "0" / "img0000.png", data / "masks" / "0" / f"aaa{k}.png")
    before = (workdir / "models" / "old" / "split.csv").read_text()
    with pytest.warns(UserWarning, match="4 image.s. more and 0 fewer than when the run started.*recorded split"):
        code, out, err = run_main(train.main, ["--name", "old", "--resume", "--epochs", "2"], workdir, monkeypatch,
                                  capsys)
    assert code == 0, err
    assert (workdir / "models" / "old" / "split.csv").read_text() == before
    assert "8 training, 2 validation images" in out      # the recorded 8 + 2, not a new split of 14


@pytest.mark.e2e
def test_val_notices_a_config_edited_after_training_and_evaluates_as_trained(workdir, monkeypatch, capsys):
    code, out, err = run_main(val_main(), ["--name", "old"], workdir, monkeypatch, capsys)
    assert code == 0, err
    before = (workdir / "outputs" / "old" / "metrics.csv").read_text()
    cfg_path = workdir / "models" / "old" / "config.yml"
    cfg = yaml.safe_load(open(cfg_path))
    yaml.safe_dump({**cfg, "input_w": 64, "normalize": "percentile"}, open(cfg_path, "w"))
    code, out, err = run_main(val_main(), ["--name", "old"], workdir, monkeypatch, capsys)
    assert code == 0, err
    assert "was edited after training: input_w 64 (trained with 32), normalize 'percentile' (trained with 'imagenet')" in out
    assert (workdir / "outputs" / "old" / "metrics.csv").read_text() == before     # the trained settings, not the edit


@pytest.mark.e2e
@pytest.mark.parametrize("error", [OSError(28, "No space left on device"), PermissionError(13, "Permission denied")])
def test_val_on_a_full_disk_or_read_only_folder_ends_with_one_message(workdir, monkeypatch, capsys, error):
    import outputs

    def write_png(path, array, durable=True):             # what a writer thread meets
        raise error

    monkeypatch.setattr(outputs, "write_png", write_png)
    code, _, err = run_main(val_main(), ["--name", "old"], workdir, monkeypatch, capsys)
    assert code == 2 and error.strerror in err and "cannot write the outputs in outputs/old" in err, err
    assert not os.path.exists(workdir / "outputs" / "old" / ".lock")      # the folder is free for the rerun


@pytest.mark.e2e
def test_sigterm_during_val_exits_130_with_a_message(workdir, monkeypatch, capsys):
    import val

    def killed(*args):
        os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(val, "predict_into", killed)
    code, _, err = run_main(val.main, ["--name", "old"], workdir, monkeypatch, capsys)
    assert code == 130 and "interrupted" in err and "Traceback" not in err


def test_softmax_targets_are_one_definition_for_loss_and_metrics(tmp_path):
    """Masks that overlap, and pixels no mask marks: the loss's target and the metrics' target are one one-hot
    target, so the loss's perfect prediction scores IoU 1 (before, overlaps and unmarked pixels scored below 1)."""
    from splits import load_splits
    from losses import CrossEntropyLoss
    from metrics import SegMeter, binarize
    data = make_data(tmp_path, "three", n=8, num_classes=3, exclusive=True)
    for k in range(8):
        for c, rows in ((0, slice(0, 4)), (2, slice(4, 8))):      # masks/0 empties rows 0-3; masks/2 overlaps rows 4-7
            path = os.path.join(data, "masks", str(c), f"img{k:04d}.png")
            mask = cv2.imread(path, 0)
            mask[rows] = 0 if c == 0 else 255
            cv2.imwrite(path, mask)
    cfg = {"data_dir": str(tmp_path), "dataset": "three", "img_ext": ".png", "mask_ext": ".png", "num_classes": 3,
           "input_channels": 3, "cache_mb": 0, "val_split": 0.25, "split_seed": 0, "folds": 1, "fold": 0,
           "class_mode": "softmax"}
    with pytest.warns(UserWarning, match="8 of 8 images .* two class masks .* the higher-numbered class"):
        train_data, val_data = load_splits(cfg)
    for split_data in (train_data, val_data):
        for k in range(len(split_data.ids)):
            target = split_data.mask(k)
            assert (target.sum(2) == 1).all()                     # one class per pixel
            assert (target[4:8, :, 2] == 1).all()                 # the overlap went to the higher class
    target = torch.from_numpy(np.stack([val_data.mask(k) for k in range(len(val_data.ids))])).permute(0, 3, 1, 2).float()
    perfect = 50 * target                                          # logits whose argmax is the loss's target
    assert CrossEntropyLoss()(perfect, target).item() < 1e-6
    meter = SegMeter(3, "cpu")
    meter.update(binarize(perfect, "softmax"), target)
    assert meter.dataset_scores()[0].tolist() == [1.0, 1.0, 1.0]


@pytest.mark.e2e
def test_masks_that_mark_nothing_are_refused_and_an_empty_class_is_named(workdir, monkeypatch, capsys):
    data = workdir / "inputs" / "tiny"
    for f in os.listdir(data / "masks" / "0"):
        cv2.imwrite(str(data / "masks" / "0" / f), np.zeros((32, 32), np.uint8))
    code, _, err = run_main(train.main, FAST + ["--name", "empty"], workdir, monkeypatch, capsys)
    assert code == 2 and "no mask under inputs/tiny marks any pixel" in err, err
    assert not os.path.exists(workdir / "models" / "empty")
    two = make_data(workdir / "inputs", "two", n=10, num_classes=2)
    for f in os.listdir(os.path.join(two, "masks", "1")):
        cv2.imwrite(os.path.join(two, "masks", "1", f), np.zeros((32, 32), np.uint8))
    with pytest.warns(UserWarning, match="class 1 has no foreground pixel in any mask"):
        code, _, err = run_main(train.main, FAST + ["--name", "two", "--dataset", "two", "--num_classes", "2",
                                                    "--epochs", "1"], workdir, monkeypatch, capsys)
    assert code == 0, err


@pytest.mark.e2e
def test_a_killed_loader_worker_ends_with_a_message_and_a_resumable_run(workdir, monkeypatch, capsys):
    import loaders
    real = loaders.AlbumentationsDataset.__getitem__

    def getitem(self, idx):
        if torch.utils.data.get_worker_info() is not None and self.train and self.epoch >= 2:
            os.kill(os.getpid(), signal.SIGKILL)          # what the kernel's out-of-memory killer does
        return real(self, idx)

    monkeypatch.setattr(loaders.AlbumentationsDataset, "__getitem__", getitem)
    code, _, err = run_main(train.main, FAST + ["--name", "oom", "--loader", "workers", "--num_workers", "1",
                                                "--epochs", "3"], workdir, monkeypatch, capsys)
    assert code == 1 and "DataLoader worker" in err and "lower --num_workers" in err and "Traceback" not in err, err
    assert "again with --resume" in err
    monkeypatch.setattr(loaders.AlbumentationsDataset, "__getitem__", real)
    code, _, err = run_main(train.main, ["--name", "oom", "--resume"], workdir, monkeypatch, capsys)
    assert code == 0 and len(read_log(workdir / "models" / "oom" / "log.csv")) == 3, err


def test_make_demo_data_never_replaces_a_data_set_it_did_not_write(tiny, tmp_path, monkeypatch, capsys):
    import make_demo_data
    workdir = tmp_path                                                 # inputs/tiny, no run needed
    os.remove(workdir / "inputs" / "tiny" / make_demo_data.MARKER)      # now it is a user's data set
    before = snapshot(workdir / "inputs")
    code, _, err = run_main(make_demo_data.main, ["--out", "inputs/tiny", "--n", "3"], workdir, monkeypatch, capsys)
    assert code == 2 and "it never replaces a data set" in err, err
    assert snapshot(workdir / "inputs") == before
    for n in (5, 3):                                      # its own folder it rewrites whole: no stale images
        code, _, err = run_main(make_demo_data.main, ["--out", "inputs/demo", "--n", str(n)], workdir, monkeypatch,
                                capsys)
        assert code == 0, err
    assert len(os.listdir(workdir / "inputs" / "demo" / "images")) == 3


@pytest.mark.e2e
def test_train_never_makes_its_run_folder_among_a_users_files(workdir, monkeypatch, capsys):
    """--runs_dir and --name that put the run folder in a data set, its images/, another run's folder, the runs
    folder itself or an export: one message naming both flags and the folder, nothing written (train.py wrote
    model.pth, log.csv and config.yml into inputs/tiny and its images/, where curves.png became an image)."""
    os.makedirs(workdir / "exports" / "x")
    (workdir / "exports" / "x" / ".unet_toolkit_export").write_text("exported from models/old\n")
    cases = [("inputs", "tiny", "inputs/tiny", "a data set"), ("inputs/tiny", "images", "inputs/tiny", "a data set"),
             ("inputs/tiny/masks", "0", "inputs/tiny", "a data set"), ("models/old", "x", "models/old", "a run folder"),
             (".", "models", "models", "run folders"), ("exports", "x", "exports/x", "an export"),
             ("exports/x", "y", "exports/x", "an export")]
    before = snapshot(workdir)
    for runs_dir, name, folder, holds in cases:
        for resume in ([], ["--overwrite"]):
            code, out, err = run_main(train.main, FAST + ["--runs_dir", runs_dir, "--name", name, *resume], workdir,
                                      monkeypatch, capsys)
            run_dir = os.path.join(runs_dir, name)
            assert code == 2 and err.startswith(f"error: the run folder {run_dir} (--runs_dir {runs_dir}, --name "
                                                f"{name}) is inside {workdir / folder}, which holds {holds}"), err
            assert err.count("\n") == 1 and "Pass another --name or --runs_dir" in err
            assert snapshot(workdir) == before, (runs_dir, name)


@pytest.mark.e2e
def test_bench_out_and_keep_tiff_are_refused_among_a_users_files_before_measuring(workdir, monkeypatch, capsys):
    import bench
    before = snapshot(workdir)
    for flag, value, says in [("--out", "inputs/tiny/bench.jsonl", "which holds a data set"),
                              ("--out", "inputs/tiny/images/bench.jsonl", "which holds a data set"),
                              ("--out", "models/old/bench.jsonl", "which holds a run folder"),
                              ("--out", "models", "which holds run folders"),
                              ("--out", "nowhere/bench.jsonl", "which does not exist"),
                              ("--keep_tiff", "inputs/tiny/masks/tif", "which holds a data set"),
                              ("--keep_tiff", "models/old/tif", "which holds a run folder")]:
        code, out, err = run_main(bench.main, ["--quick", "--device", "cpu", "--data", "inputs/tiny", flag, value],
                                  workdir, monkeypatch, capsys)
        assert code == 2 and err.startswith(f"error: {flag} {value} ") and says in err and not out, err
        assert snapshot(workdir) == before


BROKEN = {"folder": lambda p: os.makedirs(p), "broken link": lambda p: os.symlink("/nonexistent/x", p),
          "link to itself": lambda p: os.symlink(os.path.basename(p), p)}
SAYS = {"folder": "is a folder, not a file", "broken link": "is a broken link (to /nonexistent/x)",
        "link to itself": "is a link that leads back to itself"}


@pytest.mark.e2e
@pytest.mark.parametrize("name", ["model.pth", "last.pth", "config.yml", "model.json", "log.csv", "split.csv"])
def test_a_run_file_that_is_not_a_readable_file_is_named_by_every_script(workdir, monkeypatch, capsys, name):
    """model.pth replaced by a folder said "the run has not finished an epoch yet" and --resume did nothing: val.py,
    export.py, compare.py and train.py --resume (and --overwrite, which would remove it) now name the file and what
    is wrong with it, and change nothing."""
    import compare
    import export
    for kind, make in BROKEN.items():
        run = workdir / "models" / "b"
        shutil.rmtree(run, ignore_errors=True)
        shutil.copytree(workdir / "models" / "old", run, symlinks=True)
        os.remove(run / name)
        make(str(run / name))
        before = snapshot(workdir)
        expected = f"models/b/{name} ({train.rundir.ROLES[name]}) {SAYS[kind]}: the run folder is damaged"
        for main, argv in [(val.main, ["--name", "b"]), (export.main, ["--name", "b"]),
                           (train.main, ["--name", "b", "--resume", "--epochs", "3"]),
                           (train.main, FAST + ["--name", "b", "--overwrite"])]:
            code, out, err = run_main(main, argv, workdir, monkeypatch, capsys)
            assert code == 2 and err.startswith(f"error: {expected}") and err.count("\n") == 1, (kind, argv, err)
        code, out, err = run_main(compare.main, [], workdir, monkeypatch, capsys)
        assert code == 0 and f"\nb: {expected}" in out and re.search(r"\nold +UNet", out), (kind, out)
        assert snapshot(workdir) == before, kind


def test_make_demo_data_bounds_what_a_few_flags_ask_for(tmp_path, monkeypatch, capsys):
    """--size 60000 asked for gigabytes per image and --n 10**9 for more than any disk, silently."""
    import make_demo_data
    code, _, err = run_main(make_demo_data.main, ["--size", "60000"], tmp_path, monkeypatch, capsys)
    assert code == 2 and f"--size between 16 and {make_demo_data.MAX_SIZE}" in err
    for argv, per_pixel in [(["--n", "1000000000"], 3 + 1), (["--n", "100000000", "--microscopy", "--float32"], 4 + 2),
                            (["--n", "100000000", "--membranes", "--size", "512"], 2)]:
        code, _, err = run_main(make_demo_data.main, argv, tmp_path, monkeypatch, capsys)
        n, size = int(argv[1]), int(argv[-1]) if "--size" in argv else 64
        assert code == 2 and err.startswith(f"error: --n {n}: {n} images of {size}x{size} and their masks or labels "
                                            f"take up to {n * size * size * per_pixel / 2**30:.1f} GiB on disk"), err
        assert "pass a smaller --n or --size" in err and os.listdir(tmp_path) == []


def test_what_is_wrong_with_a_run_file_names_each_way_it_can_be_unreadable(tmp_path, monkeypatch):
    import rundir
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yml").write_text("arch: UNet\n")
    rundir.check_files(str(run))                                # readable files and missing ones: nothing to say
    os.mkfifo(run / "log.csv")                                  # opening it would wait forever
    with pytest.raises(rundir.UserError, match=r"log.csv \(its log of epochs\) is not a regular file"):
        rundir.check_files(str(run))
    os.remove(run / "log.csv")

    def denied(path, *args, **kw):
        raise PermissionError(13, "Permission denied", path)
    monkeypatch.setattr(rundir, "open", denied, raising=False)  # root reads any file: an unreadable one, as it fails
    with pytest.raises(rundir.UserError, match=r"config.yml \(the run's settings\) cannot be read \(Permission denied\)"
                                               r": the run folder is damaged"):
        rundir.check_files(str(run))


def test_a_small_jpeg_or_bmp_declaring_a_huge_image_is_refused_before_it_is_decoded(tmp_path, monkeypatch):
    """631 bytes of JPEG declaring 30000x30000 pixels took 31 s and 6.5 GB to decode, and 65000x65000 ended in an
    OpenCV traceback: the header is read first, past any EXIF block, as a PNG's is."""
    import imagefiles
    from dataerror import DataError
    ok, jpeg = cv2.imencode(".jpg", np.zeros((8, 8, 3), np.uint8))
    jpeg = jpeg.tobytes()
    exif = b"\xff\xe1" + (20002).to_bytes(2, "big") + bytes(20000)           # an APP1 block before the frame
    frame = jpeg.index(b"\xff\xc0")
    ok, bmp = cv2.imencode(".bmp", np.zeros((8, 8, 3), np.uint8))
    bmp = bytearray(bmp.tobytes())
    bmp[18:22], bmp[22:26] = (40000).to_bytes(4, "little"), (-40000).to_bytes(4, "little", signed=True)
    cases = {"big.jpg": (jpeg[:frame + 5] + (30000).to_bytes(2, "big") * 2 + jpeg[frame + 9:], "30000x30000"),
             "exif.jpeg": (jpeg[:2] + exif + jpeg[2:frame + 5] + (65000).to_bytes(2, "big") * 2 + jpeg[frame + 9:],
                           "65000x65000"),
             "big.bmp": (bytes(bmp), "40000x40000")}
    decoded = []
    real = cv2.imread
    monkeypatch.setattr(imagefiles.cv2, "imread", lambda *a: decoded.append(a) or real(*a))
    for name, (data, declared) in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(DataError, match=f"{name} declares {declared} pixels .* more than 2 GiB"):
            imagefiles.decode(str(tmp_path / name))
    assert decoded == []
    (tmp_path / "fine.jpg").write_bytes(jpeg[:2] + exif + jpeg[2:])           # an ordinary JPEG still reads
    assert imagefiles.decode(str(tmp_path / "fine.jpg")).shape == (8, 8, 3) and len(decoded) == 1
