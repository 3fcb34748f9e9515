"""Never lose a run, never answer a user mistake with a traceback (train.py and val.py as subprocesses)."""
import csv
import hashlib
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time

import cv2
import numpy as np
import pytest
import torch
import yaml

import checkpoint
from conftest import ROOT, make_data
from runlog import COLUMNS

TRAIN = [sys.executable, os.path.join(ROOT, "train.py")]
VAL = [sys.executable, os.path.join(ROOT, "val.py")]
FAST = ["--dataset", "tiny", "--arch", "UNet", "--epochs", "2", "-b", "4", "--input_w", "32", "--input_h", "32",
        "--num_workers", "0", "--device", "cpu", "--optimizer", "Adam"]


def snapshot(folder):
    """{relative path: sha1} of every file under folder."""
    out = {}
    for d, _, files in os.walk(folder):
        for f in files:
            p = os.path.join(d, f)
            out[os.path.relpath(p, folder)] = hashlib.sha1(open(p, "rb").read()).hexdigest()
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
    ("16-bit-mask", ("masks/0/img0001.png", lambda p: cv2.imwrite(p, np.zeros((32, 32), np.uint16))), [], "masks/0/img0001.png is uint16"),
    ("wrong-img-ext", None, ["--img_ext", ".jpg"], "--img_ext .png"),
    ("num-classes", None, ["--num_classes", "2"], "--num_classes 2"),
    ("input-size", None, ["--input_w", "40"], "input_w 40 is not a multiple of 16"),
    ("batch-too-large", None, ["-b", "9"], "--batch_size 9 is larger than the training split (8"),
    ("no-validation-left", "one-image", [], "leaves 1 validation and 0 training"),
    ("config-not-yaml", ("bad.yml", "epochs: [1\n"), ["--config", "bad.yml"], "bad.yml is not valid YAML"),
    ("config-unknown-key", ("bad.yml", "learning_rate: 0.1\n"), ["--config", "bad.yml"], "unknown key 'learning_rate'"),
    ("config-wrong-type", ("bad.yml", "batch_size: many\n"), ["--config", "bad.yml"], "key 'batch_size' has the value 'many'"),
    ("resume-nothing", None, ["--resume", "--name", "never_trained"], "never_trained/last.pth does not exist"),
    ("device", None, ["--device", "tpu"], "--device 'tpu'"),
]


@pytest.mark.parametrize("case, breakage, extra, expected", BAD_TRAIN_INPUTS, ids=[c[0] for c in BAD_TRAIN_INPUTS])
def test_bad_input_gets_one_clear_message(workdir, case, breakage, extra, expected):
    data = workdir / "inputs" / "tiny"
    if breakage == "empty":
        for f in os.listdir(data / "images"):
            os.remove(data / "images" / f)
    elif breakage == "one-image":
        for k in range(1, 10):
            os.remove(data / "images" / f"img{k:04d}.png")
            os.remove(data / "masks" / "0" / f"img{k:04d}.png")
    elif breakage and breakage[0].endswith(".yml"):
        (workdir / breakage[0]).write_text(breakage[1])
    elif breakage:
        breakage[1](str(data / breakage[0]))
    before = snapshot(workdir / "models")
    # --name old --overwrite: even a run the user asked to replace must survive a bad data set
    args = FAST + extra if "--resume" in extra else FAST + ["--name", "old", "--overwrite"] + extra
    r = subprocess.run(TRAIN + args, cwd=workdir, capture_output=True, text=True)
    assert r.returncode != 0
    assert "Traceback" not in r.stderr
    assert expected in r.stderr, r.stderr
    assert snapshot(workdir / "models") == before


def test_zero_one_masks_train_with_one_warning(workdir):
    masks = workdir / "inputs" / "tiny" / "masks" / "0"
    for f in os.listdir(masks):
        cv2.imwrite(str(masks / f), (cv2.imread(str(masks / f), 0) > 127).astype(np.uint8))
    r = subprocess.run(TRAIN + FAST + ["--name", "zero_one", "--epochs", "1"], cwd=workdir, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stderr.count("warning: the masks under") == 1 and "Traceback" not in r.stderr
    assert float(read_log(workdir / "models" / "zero_one" / "log.csv")[0]["val_iou"]) > 0.05   # not all-background


def test_existing_run_is_not_overwritten(workdir):
    before = snapshot(workdir / "models")
    r = subprocess.run(TRAIN + FAST + ["--name", "old"], cwd=workdir, capture_output=True, text=True)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "--resume" in r.stderr and "--overwrite" in r.stderr and "models/old" in r.stderr
    assert snapshot(workdir / "models") == before
    r = subprocess.run(TRAIN + FAST + ["--name", "old", "--overwrite"], cwd=workdir, capture_output=True, text=True)
    assert r.returncode == 0 and len(read_log(workdir / "models" / "old" / "log.csv")) == 2


@pytest.mark.parametrize("case, args, expected", [
    ("no-run", ["--name", "nope"], "there is no run models/nope"),
    ("no-model", ["--name", "partial"], "models/partial/model.pth does not exist"),
    ("not-a-checkpoint", ["--name", "forged"], "models/forged/model.pth is not a checkpoint"),
    ("code-in-checkpoint", ["--name", "evil"], "models/evil/model.pth is not a checkpoint"),
    ("empty-images", ["--name", "old", "--images", "empty_dir"], "No input file found in empty_dir"),
], ids=["no-run", "no-model", "not-a-checkpoint", "code-in-checkpoint", "empty-images"])
def test_val_mistakes_get_one_clear_message(workdir, case, args, expected):
    os.makedirs(workdir / "empty_dir")
    for name in ("partial", "forged", "evil"):
        os.makedirs(workdir / "models" / name)
        (workdir / "models" / name / "config.yml").write_text((workdir / "models" / "old" / "config.yml").read_text())
    (workdir / "models" / "forged" / "model.pth").write_text("this is not a checkpoint")
    torch.save({"payload": os.system}, workdir / "models" / "evil" / "model.pth")  # would run code if unpickled freely
    r = subprocess.run(VAL + args, cwd=workdir, capture_output=True, text=True)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert expected in r.stderr, r.stderr


def test_nan_loss_stops_and_keeps_last_good_checkpoint(workdir):
    r = subprocess.run(TRAIN + FAST + ["--name", "boom", "--optimizer", "SGD", "--lr", "1e30", "--epochs", "4"],
                       cwd=workdir, capture_output=True, text=True)
    assert r.returncode == 3 and "Traceback" not in r.stderr
    found = re.search(r"the loss became (nan|inf|-inf) at epoch (\d+), batch (\d+)", r.stderr)
    assert found, r.stderr
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


@pytest.mark.parametrize("sig, loader", [(signal.SIGINT, ["--loader", "memory"]),
                                         (signal.SIGTERM, ["--loader", "workers", "--num_workers", "2"])],
                         ids=["sigint-memory-loader", "sigterm-worker-loader"])
def test_interrupt_then_resume_equals_uninterrupted_run(workdir, sig, loader):
    args = FAST + ["--epochs", "5", "--seed", "7", "--scheduler", "CosineAnnealingLR"] + loader
    r = subprocess.run(TRAIN + args + ["--name", "straight"], cwd=workdir, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr

    proc = subprocess.Popen(TRAIN + args + ["--name", "broken"], cwd=workdir, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    code, err = interrupt_when(proc, workdir / "models" / "broken" / "log.csv", 2, sig)
    assert code == 130 and "Traceback" not in err
    assert "python train.py --name broken --resume" in err
    done = checkpoint.load(str(workdir / "models" / "broken" / "last.pth"))["epoch"]
    assert 2 <= done < 5
    r = subprocess.run(TRAIN + ["--name", "broken", "--resume"], cwd=workdir, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert f"resuming after epoch {done}" in r.stdout

    a, log_a = final_state(workdir / "models" / "straight")
    b, log_b = final_state(workdir / "models" / "broken")
    assert [row["epoch"] for row in log_b] == ["1", "2", "3", "4", "5"]       # appended, not duplicated
    assert log_a == log_b
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    best_a = torch.load(workdir / "models" / "straight" / "model.pth", weights_only=True)
    best_b = torch.load(workdir / "models" / "broken" / "model.pth", weights_only=True)
    assert all(torch.equal(best_a[k], best_b[k]) for k in best_a)


def test_resume_with_more_epochs(workdir):
    r = subprocess.run(TRAIN + ["--name", "old", "--resume", "--epochs", "3"], cwd=workdir, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert [row["epoch"] for row in read_log(workdir / "models" / "old" / "log.csv")] == ["1", "2", "3"]
    assert yaml.safe_load(open(workdir / "models" / "old" / "config.yml"))["epochs"] == 3


def test_resume_and_overwrite_together_are_refused(workdir):
    r = subprocess.run(TRAIN + ["--name", "old", "--resume", "--overwrite"], cwd=workdir, capture_output=True, text=True)
    assert r.returncode == 2 and "not both" in r.stderr and "Traceback" not in r.stderr


def test_sigkill_at_random_moments_never_corrupts_files(workdir):
    """SIGKILL a long run at 20+ random moments (resuming after each); every file left must load."""
    rng = random.Random(0)
    run_dir = workdir / "models" / "killme"
    args = FAST + ["--name", "killme", "--epochs", "10000"]
    kills = 0
    while kills < 20:
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


def test_deterministic_runs_give_identical_logs(workdir):
    logs = []
    for name in ("d1", "d2"):
        r = subprocess.run(TRAIN + FAST + ["--name", name, "--deterministic", "--seed", "5"], cwd=workdir,
                           capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        logs.append(final_state(workdir / "models" / name)[1])
        assert yaml.safe_load(open(workdir / "models" / name / "config.yml"))["deterministic"] is True
    assert logs[0] == logs[1]
