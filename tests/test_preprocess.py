import os
import zipfile

import cv2
import numpy as np
import pytest

from preprocess_dsb2018 import convert
from utils import UserError


def make_stage1(root, n=3):
    """A miniature stage1_train: RGBA, grayscale and RGB images with several instance masks each."""
    rng = np.random.default_rng(0)
    for k in range(n):
        sid = f"sample{k}"
        os.makedirs(root / sid / "images")
        os.makedirs(root / sid / "masks")
        shape = [(64, 80, 4), (64, 80), (64, 80, 3)][k % 3]
        cv2.imwrite(str(root / sid / "images" / f"{sid}.png"), rng.integers(0, 255, shape, dtype=np.uint8))
        for j in range(2):
            m = np.zeros((64, 80), np.uint8)
            m[10 + 20 * j: 20 + 20 * j, 10:30] = 255
            cv2.imwrite(str(root / sid / "masks" / f"m{j}.png"), m)


@pytest.mark.parametrize("as_zip", [False, True])
def test_converts_folder_or_zip(tmp_path, as_zip):
    src = tmp_path / "stage1_train"
    make_stage1(src)
    if as_zip:
        with zipfile.ZipFile(tmp_path / "stage1_train.zip", "w") as z:
            for d, _, files in os.walk(src):
                for f in files:
                    z.write(os.path.join(d, f), os.path.relpath(os.path.join(d, f), src))
        src = tmp_path / "stage1_train.zip"
    out = tmp_path / "dsb2018_32"
    assert convert(str(src), str(out), 32) == 3
    for k in range(3):
        img = cv2.imread(str(out / "images" / f"sample{k}.png"), cv2.IMREAD_UNCHANGED)
        mask = cv2.imread(str(out / "masks" / "0" / f"sample{k}.png"), cv2.IMREAD_UNCHANGED)
        assert img.shape == (32, 32, 3) and mask.shape == (32, 32)
        fg = mask > 127
        assert 0.05 < fg.mean() < 0.2        # union of both instances: 2 x 200 of 5120 pixels
        assert fg[7, 8] and fg[17, 8] and not fg[12, 8] and not fg[25, 25]   # two instances, gap between


def test_missing_source_is_explained(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        convert(str(tmp_path / "nope"), str(tmp_path / "out"), 96)
