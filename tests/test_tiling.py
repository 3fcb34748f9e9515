"""Tiled prediction of images larger than the network input, and training on crops."""
import json
import os
import subprocess
import sys

import cv2
import pytest
import torch

from archs import UNet
from conftest import ROOT, make_data, make_microscopy, run_main
from tiling import predict_tiled, starts

TOLERANCE = 0.005   # max |tiled - direct| of probabilities in the interior, for a 7-pixel receptive field


def small_net():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(),
                               torch.nn.Conv2d(8, 8, 3, padding=1), torch.nn.ReLU(),
                               torch.nn.Conv2d(8, 2, 3, padding=1)).eval()


@pytest.mark.parametrize("size, tile, stride", [(100, 32, 16), (32, 32, 16), (20, 32, 16), (97, 32, 32)])
def test_tiles_cover_every_pixel(size, tile, stride):
    s = starts(size, tile, stride)
    covered = set()
    for p in s:
        covered |= set(range(p, min(p + tile, size)))
    assert covered == set(range(size)) and s[0] == 0


@torch.no_grad()
def test_tiled_prediction_matches_a_direct_forward():
    net = small_net()
    image = torch.randn(1, 3, 200, 136)                  # several times the 32x32 tile, not a multiple of it
    predict = lambda x: torch.sigmoid(net(x))            # noqa: E731
    direct = predict(image)
    tiled = predict_tiled(predict, image, 32, 32, overlap=0.5, batch_size=8)
    assert tiled.shape == direct.shape
    assert (tiled - direct)[:, :, 4:-4, 4:-4].abs().max() < TOLERANCE


@torch.no_grad()
def test_images_smaller_than_a_tile_are_padded_and_cropped_back():
    model = UNet(1, 3).eval()
    out = predict_tiled(lambda x: torch.sigmoid(model(x)), torch.randn(1, 3, 20, 45), 32, 32)
    assert out.shape == (1, 1, 20, 45) and torch.isfinite(out).all()


@torch.no_grad()
def test_network_memory_is_bounded_by_the_tile_batch_not_the_image():
    net = small_net()
    largest = []
    hook = net.register_forward_pre_hook(lambda m, args: largest.append(args[0].numel()))
    for side in (64, 512):                               # 64x as many pixels
        largest.clear()
        predict_tiled(lambda x: torch.sigmoid(net(x)), torch.randn(1, 3, side, side), 32, 32, batch_size=4)
        assert max(largest) <= 4 * 3 * 32 * 32           # never more than 4 tiles at once
    hook.remove()


@pytest.mark.e2e
def test_train_on_crops_then_predict_whole_images(tmp_path, monkeypatch, capsys):
    """Training in this process (train.py's main), val.py as a process of its own."""
    import train
    make_data(tmp_path / "inputs", size=64)              # 64x64 images, 32x32 crops
    args = ["--dataset", "tiny", "--arch", "UNet", "--base_channels", "8", "--epochs", "2", "-b", "4", "--input_w", "32", "--input_h", "32",
            "--num_workers", "0", "--device", "cpu", "--optimizer", "Adam", "--crop", "--name", "crops"]
    code, out, err = run_main(train.main, args, tmp_path, monkeypatch, capsys)
    assert code == 0, err
    assert "loader workers" in out                          # crops stream through the albumentations path
    r = subprocess.run([sys.executable, os.path.join(ROOT, "val.py"), "--name", "crops", "--batch_size", "3"],
                       cwd=tmp_path, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    out = tmp_path / "outputs" / "crops" / "0"
    masks = [cv2.imread(str(out / f), cv2.IMREAD_UNCHANGED) for f in sorted(os.listdir(out))]
    assert len(masks) == 2 and all(m.shape == (64, 64) for m in masks)   # whole images, full resolution
    assert "IoU:" in r.stdout and "(predicted by tiles at full resolution)" in r.stdout, r.stdout


def iou_of(stdout):
    return float(next(line.split()[1] for line in stdout.splitlines() if line.startswith("IoU:")))


@pytest.mark.e2e
def test_larger_images_are_predicted_at_the_trained_scale_whole_not_shrunk(tmp_path, monkeypatch, capsys):
    """A run trained on 32x32 16-bit images (nuclei of 4-9 px) scores 96x96 images of the same nuclei whole at full
    resolution by default, at least as well as by tiles; --resize (the reference's way) shrinks them 3x and says so."""
    import train
    make_microscopy(tmp_path / "inputs", n=24, size=32)
    make_microscopy(tmp_path / "inputs", name="large", n=4, size=96, seed=1)
    args = ["--dataset", "micro", "--img_ext", ".tif", "--mask_ext", ".tif", "--arch", "UNet", "--base_channels", "8",
            "--epochs", "8", "-b", "4", "--input_w", "32", "--input_h", "32", "--num_workers", "0", "--device", "cpu",
            "--optimizer", "Adam", "--lr", "3e-3", "--input_channels", "1", "--name", "small"]
    code, out, err = run_main(train.main, args, tmp_path, monkeypatch, capsys)
    assert code == 0, err
    with open(tmp_path / "models" / "small" / "model.json") as f:
        assert json.load(f)["scale"] == [1.0, 1.0]          # 32x32 images at a 32x32 input: their own scale
    val = [sys.executable, os.path.join(ROOT, "val.py"), "--name", "small", "--data", "inputs/large"]
    runs = {how: subprocess.run(val + flags + ["--output", f"out_{how}"], cwd=tmp_path, capture_output=True, text=True)
            for how, flags in (("whole", []), ("tiles", ["--tile"]), ("resized", ["--resize"]))}
    assert all(r.returncode == 0 for r in runs.values()), {h: r.stderr for h, r in runs.items()}
    assert "shrunk" not in runs["whole"].stdout and "predicted whole at full resolution" in runs["whole"].stdout
    assert "are shrunk 3.0x to the 32x32 network input" in runs["resized"].stdout
    masks = os.listdir(tmp_path / "out_whole" / "0")
    assert len(masks) == 4 and cv2.imread(str(tmp_path / "out_whole" / "0" / masks[0]), cv2.IMREAD_UNCHANGED).shape == (96, 96)
    whole, tiles, resized = (iou_of(runs[h].stdout) for h in ("whole", "tiles", "resized"))
    # whole images see the most context; tiles of the 32-px input lose a little at their borders; nuclei shrunk 3x
    # are lost
    assert whole >= tiles - 0.01 and tiles > resized + 0.05 and whole > resized + 0.1, (whole, tiles, resized)
