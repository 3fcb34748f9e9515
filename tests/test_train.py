"""train.py's pieces, run in-process on tiny generated data (fast), and the learning test on real data."""
import csv
import os

import pytest
import torch

import config
import train
from archs import build_model
from conftest import make_data
from losses import LOSSES

TINY = ["--dataset", "tiny", "--arch", "UNet", "--epochs", "1", "-b", "4", "--input_w", "32", "--input_h", "32",
        "--num_workers", "0", "--device", "cpu"]


def train_in(tmp_path, monkeypatch, argv):
    monkeypatch.chdir(tmp_path)
    cfg, run = config.resolve(argv)
    return cfg, train.train(cfg, run)


def log_rows(tmp_path, name):
    with open(tmp_path / "models" / name / "log.csv") as f:
        return list(csv.DictReader(f))


@pytest.mark.parametrize("optimizer", config.OPTIMIZERS)
def test_every_optimizer_trains_an_epoch(tmp_path, monkeypatch, optimizer):
    make_data(tmp_path / "inputs")
    cfg, best = train_in(tmp_path, monkeypatch, TINY + ["--optimizer", optimizer, "--name", optimizer])
    assert 0 <= best <= 1
    assert len(log_rows(tmp_path, optimizer)) == 1


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


def test_reduce_on_plateau_steps_on_validation_loss():
    model = torch.nn.Linear(1, 1)
    cfg = {**config.DEFAULTS, "scheduler": "ReduceLROnPlateau", "patience": 0, "factor": 0.5}
    opt = train.build_optimizer(cfg, model.parameters(), torch.device("cpu"))
    sched = train.build_scheduler(cfg, opt)
    sched.step(1.0)
    sched.step(2.0)   # worse: lr halves at once with patience 0
    assert opt.param_groups[0]["lr"] == pytest.approx(5e-4)


def test_early_stopping_ends_the_run(tmp_path, monkeypatch):
    make_data(tmp_path / "inputs")
    train_in(tmp_path, monkeypatch, TINY + ["--epochs", "20", "--early_stopping", "1", "--lr", "1e-9",
                                            "--optimizer", "SGD", "--name", "es"])
    assert len(log_rows(tmp_path, "es")) < 20


def test_forward_loss_averages_deep_supervision_heads():
    model = build_model({"arch": "NestedUNet", "num_classes": 1, "input_channels": 3, "deep_supervision": True})
    x, y = torch.randn(2, 3, 32, 32), (torch.rand(2, 1, 32, 32) > 0.5).float()
    loss, logits = train.forward_loss(model, x, y, LOSSES["BCEDiceLoss"](), True)
    heads = model(x)
    expected = sum(LOSSES["BCEDiceLoss"]()(h, y) for h in heads) / 4
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert torch.allclose(logits, heads[-1])


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
    train_data, val_data = train.load_data(cfg)
    device = torch.device("cpu")
    _, val_loader = train.make_loaders(cfg, train_data, val_data, device)
    torch.manual_seed(cfg["seed"])
    untrained = train.validate(build_model(cfg), val_loader, LOSSES[cfg["loss"]](), device, None, cfg)["val_iou"]
    trained = train_in(tmp_path, monkeypatch, argv)[1]
    print(f"untrained val IoU {untrained:.3f}, trained {trained:.3f}")
    assert trained > 0.6 and trained > untrained + 0.4
