"""Tiled prediction of images larger than the network input, and training on crops."""
import os
import subprocess
import sys

import cv2
import pytest
import torch

from archs import UNet
from conftest import ROOT, make_data, run_main
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
