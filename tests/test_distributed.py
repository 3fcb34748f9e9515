"""torchrun with 2 CPU processes (gloo): the same run as one process, resumable, and shards that cover the data;
and distributed.py in one process, as every run without torchrun uses it."""
import csv
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

import config
import distributed
import runtime
from conftest import ROOT, make_data

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
            os.path.join(ROOT, "train.py")]
FAST = ["--base_channels", "8", "--dataset", "tiny", "--arch", "UNet", "-b", "4", "--input_w", "32", "--input_h", "32",
        "--num_workers", "0", "--device", "cpu", "--optimizer", "Adam"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def rows(path):
    with open(path) as f:
        return list(csv.DictReader(f))


@pytest.mark.e2e
@pytest.mark.slow(seconds=35)
def test_two_processes_interrupted_and_resumed_make_one_runs_files_and_val_py_agrees(tmp_path):
    """Two processes: Ctrl-C after an epoch, --resume to the end; then the files are one run's, and val.py in one
    process scores model.pth as the two processes' sharded validation logged it."""
    make_data(tmp_path / "inputs", n=20)
    args = FAST + ["--epochs", "3", "--name", "ddp"]
    proc = subprocess.Popen(TORCHRUN + args, cwd=tmp_path, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    log = tmp_path / "models" / "ddp" / "log.csv"
    deadline = time.time() + 180
    while not (log.exists() and len(rows(log)) >= 1) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGINT)      # Ctrl-C in a terminal reaches torchrun and every worker
    proc.communicate(timeout=120)
    assert proc.returncode != 0
    done = len(rows(log))
    assert done < 3
    r = subprocess.run(TORCHRUN + args + ["--resume"], cwd=tmp_path, env=ENV, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"resuming after epoch {done}" in r.stdout
    assert "x 2 processes" in r.stdout and r.stdout.count("best val_iou") == 1    # one process prints
    run_dir = tmp_path / "models" / "ddp"
    assert sorted(os.listdir(run_dir)) == ["config.yml", "curves.png", "last.pth", "log.csv", "model.json", "model.pth", "split.csv"]
    log_rows = rows(log)
    assert [row["epoch"] for row in log_rows] == ["1", "2", "3"]
    best = max(float(row["val_iou"]) for row in log_rows)
    v = subprocess.run([sys.executable, os.path.join(ROOT, "val.py"), "--name", "ddp", "--device", "cpu"],
                       cwd=tmp_path, capture_output=True, text=True)
    assert v.returncode == 0, v.stderr
    single = float(re.search(r"^IoU: ([0-9.]+)$", v.stdout, re.M).group(1))
    assert abs(single - best) < 1e-4        # logged (sum over 2 shards) == one process on model.pth


@pytest.mark.e2e
def test_sync_bn_on_cpu_is_refused_clearly(tmp_path):
    make_data(tmp_path / "inputs", n=20)
    r = subprocess.run(TORCHRUN + FAST + ["--epochs", "1", "--sync_bn"], cwd=tmp_path, env=ENV,
                       capture_output=True, text=True)
    assert r.returncode != 0 and "--sync_bn needs CUDA GPUs" in r.stderr
    assert not (tmp_path / "models").exists()


@pytest.mark.e2e
def test_a_dying_process_ends_the_job_with_a_message(tmp_path):
    make_data(tmp_path / "inputs", n=20)
    proc = subprocess.Popen(TORCHRUN + FAST + ["--epochs", "10000", "--name", "ddp"], cwd=tmp_path, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    log = tmp_path / "models" / "ddp" / "log.csv"
    deadline = time.time() + 180
    while not (log.exists() and len(rows(log)) >= 1) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    victims = [p for p in os.listdir("/proc") if p.isdigit() and is_rank(int(p), "1", str(tmp_path))]
    assert len(victims) == 1
    os.kill(int(victims[0]), signal.SIGKILL)
    _, err = proc.communicate(timeout=120)                       # ends: no hang
    assert proc.returncode != 0
    assert "rank      : 1" in err and "SIGKILL" in err            # torchrun names the process that failed
    # rank 0 meets either the broken collective or torchrun's SIGTERM first; either way one message
    assert ("[rank 0] training stopped" in err or "interrupted: models/ddp/last.pth" in err) and "--resume" in err
    import checkpoint
    assert checkpoint.load(str(tmp_path / "models" / "ddp" / "last.pth"))["epoch"] >= 0


def is_rank(pid, rank, cwd):
    """Whether process `pid` is a torchrun worker with RANK=rank running in `cwd`."""
    try:
        env = open(f"/proc/{pid}/environ", "rb").read().split(b"\0")
        return f"RANK={rank}".encode() in env and os.readlink(f"/proc/{pid}/cwd") == cwd
    except OSError:
        return False


def test_without_torchrun_one_process_joins_no_group_and_nothing_is_wrapped_or_summed(monkeypatch):
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    assert distributed.setup("cpu") == (0, 1, torch.device("cpu"))
    assert not torch.distributed.is_initialized()
    rt = runtime.build(torch.device("cpu"), {**config.DEFAULTS, "device": "cpu"})
    model = torch.nn.Linear(2, 1)
    assert distributed.wrap(model, rt) is model                           # no DistributedDataParallel around it
    total = torch.tensor([1.0, 2.0])
    assert distributed.all_reduce_sum(total, rt) is total and total.tolist() == [1.0, 2.0]
    distributed.cleanup(rt)                                               # nothing to end: no error
