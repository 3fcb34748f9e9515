"""predict.py (and val.py's metrics.csv): prediction with flips, thresholds, resizing back to each image's size."""
import argparse
import csv

import numpy as np
import pytest
import torch

import config
import runtime
import predict
import val
from dataset import SegmentationData
from engine import build_network
from metrics import SegMeter

CFG = {**config.DEFAULTS, "arch": "UNet", "input_w": 32, "input_h": 32}


def args(**kw):
    return argparse.Namespace(**{"batch_size": 3, "tta": False, "tile": False, "overlap": 0.5, "threshold": 0.5,
                                 "save_probs": False, "overlay": False, **kw})


class Doubler(torch.nn.Module):
    """A 'network' whose logit is the first input channel: its flips are easy to follow."""

    def forward(self, x):
        return x[:, :1] * 2


def test_predict_probs_averages_the_flips_back_into_place():
    rt = runtime.build(torch.device("cpu"), CFG)
    x = torch.randn(2, 3, 32, 32)
    plain = predict.predict_probs(Doubler(), x, CFG, rt, tta=False)
    flipped = predict.predict_probs(Doubler(), x, CFG, rt, tta=True)
    assert plain.shape == (2, 1, 32, 32) and torch.allclose(plain, torch.sigmoid(x[:, :1] * 2))
    assert torch.allclose(flipped, plain, atol=1e-6)     # an equivariant network: flips change nothing


def test_to_prediction_thresholds_or_takes_the_argmax():
    probs = torch.tensor([0.2, 0.6, 0.9]).view(1, 3, 1, 1)
    assert predict.to_prediction(probs, CFG, 0.5).flatten().tolist() == [0, 1, 1]
    assert predict.to_prediction(probs, CFG, 0.7).flatten().tolist() == [0, 0, 1]
    assert predict.to_prediction(probs, {**CFG, "class_mode": "softmax"}, 0.5).flatten().tolist() == [0, 0, 1]


@pytest.mark.parametrize("tile", [False, True], ids=["resized", "tiled"])
def test_probabilities_come_back_at_each_images_own_size(tile):
    rng = np.random.default_rng(0)
    sizes = [(40, 40), (24, 56), (64, 32), (32, 32)]
    images = [rng.integers(0, 255, (h, w, 3), dtype=np.uint8) for h, w in sizes]
    data = SegmentationData([f"i{k}" for k in range(4)], images, None)
    rt = runtime.build(torch.device("cpu"), CFG)
    model = build_network(CFG, rt).eval()
    produce = predict.tiled_probs if tile else predict.resized_probs
    out = list(produce(model, data, CFG, rt, args()))
    assert [k for k, _, _ in out] == [0, 1, 2, 3]
    assert [tuple(p.shape) for _, _, p in out] == [(1, 1, h, w) for h, w in sizes]
    assert all(0 <= p.min() and p.max() <= 1 for _, _, p in out)


def test_write_metrics_has_a_row_per_image_and_columns_per_class(tmp_path):
    meter = SegMeter(2, torch.device("cpu"), keep_per_image=True)
    target = torch.zeros(2, 2, 4, 4)
    target[0, 0, :2] = 1
    pred = target.clone()
    pred[0, 0, 0] = 0                                    # image 0, class 0: 4 of 8 pixels found
    meter.update(pred, target)
    iou, dice = meter.image_scores()
    val.write_metrics(str(tmp_path / "metrics.csv"), ["a", "b"], iou, dice)
    rows = list(csv.DictReader(open(tmp_path / "metrics.csv")))
    assert list(rows[0]) == ["id", "iou_0", "dice_0", "iou_1", "dice_1"] and [r["id"] for r in rows] == ["a", "b"]
    assert float(rows[0]["iou_0"]) == 0.5 and float(rows[0]["dice_0"]) == pytest.approx(2 / 3, abs=1e-6)
    assert float(rows[1]["iou_0"]) == 1.0                # nothing to find and nothing found
