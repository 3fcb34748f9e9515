"""predict.py (and val.py's metrics.csv): prediction with flips, thresholds, resizing back to each image's size."""
import argparse
import csv

import numpy as np
import pytest
import torch

import config
import figures
import predict
import runtime
import val
from dataset import SegmentationData
from engine import build_network
from metrics import SegMeter
from predictor import Predictor, describe

CFG = {**config.DEFAULTS, "arch": "UNet", "input_w": 32, "input_h": 32, "normalize": "imagenet"}


def args(**kw):
    return argparse.Namespace(**{"batch_size": 3, "tta": False, "tile": False, "overlap": 0.5, "threshold": 0.5,
                                 "save_probs": False, "overlay": False, "instances": None, "min_size": 4, **kw})


def wrap(network):
    """A network as the Predictor val.py predicts through (8-bit RGB images, ImageNet normalisation)."""
    return Predictor(network, describe(CFG, {np.dtype(np.uint8)})).eval()


def unit_ranges(x):
    """Intensity ranges that leave x as it is (0 -> 0, 1 -> 1)."""
    return torch.stack([torch.zeros(x.shape[:2]), torch.ones(x.shape[:2])], dim=1)


class Doubler(torch.nn.Module):
    """A 'network' whose logit is the first input channel: its flips are easy to follow."""

    def forward(self, x):
        return x[:, :1] * 2


@pytest.mark.parametrize("h,w", [(32, 32), (32, 48)], ids=["square", "rectangular"])
def test_predict_probs_averages_the_symmetries_back_into_place(h, w):
    rt = runtime.build(torch.device("cpu"), CFG)
    x = torch.randn(2, 3, h, w)
    plain = predict.predict_probs(wrap(Doubler()), x, unit_ranges(x), rt, tta=False)
    averaged = predict.predict_probs(wrap(Doubler()), x, unit_ranges(x), rt, tta=True)
    network_input = (x - 0.485) / 0.229                   # the Predictor standardises (ImageNet's red channel here)
    assert plain.shape == (2, 1, h, w) and torch.allclose(plain, torch.sigmoid(network_input[:, :1] * 2), atol=1e-6)
    assert torch.allclose(averaged, plain, atol=1e-6)    # a pointwise network: every view turned back matches


def test_tta_uses_all_eight_symmetries_of_a_square_and_four_of_a_rectangle():
    assert len(set(predict.symmetries(True))) == 8 and len(set(predict.symmetries(False))) == 4
    x = torch.arange(12.0).view(1, 1, 3, 4)
    views = {tuple(predict.transform(x, t, f).flatten().tolist()) for t, f in predict.symmetries(False)}
    assert len(views) == 4                               # four different pictures
    for t, f in predict.symmetries(True):
        sq = torch.arange(9.0).view(1, 1, 3, 3)
        assert torch.equal(predict.untransform(predict.transform(sq, t, f), t, f), sq)


class Shift(torch.nn.Module):
    """A 'network' that is not symmetric: a different logit for each run of an ensemble."""

    def __init__(self, bias):
        super().__init__()
        self.bias = bias

    def forward(self, x):
        return x[:, :1] * 0 + self.bias


def test_an_ensemble_averages_the_runs_probabilities():
    rt = runtime.build(torch.device("cpu"), CFG)
    images = [np.zeros((32, 32, 3), np.uint8)]
    data = SegmentationData(["a"], images, None)
    members = [predict.Member("a", CFG, rt, wrap(Shift(2.0))), predict.Member("b", CFG, rt, wrap(Shift(-1.0)))]
    (_, _, probs, first), = predict.resized_probs(members, data, args())
    expected = (torch.sigmoid(torch.tensor(2.0)) + torch.sigmoid(torch.tensor(-1.0))) / 2
    assert torch.allclose(probs, expected.expand_as(probs)) and torch.allclose(first, torch.sigmoid(torch.tensor(2.0)))


def test_overlay_outlines_prediction_and_truth_in_two_colours_and_not_softmax_class_0():
    image = np.zeros((20, 20, 3), np.uint8)
    pred = np.zeros((2, 20, 20), np.uint8)
    truth = np.zeros((2, 20, 20), np.uint8)
    pred[1, 2:8, 2:8] = 1
    truth[1, 10:16, 10:16] = 1
    pred[0], truth[0] = 1 - pred[1], 1 - truth[1]       # softmax: class 0 is everything else
    colours = lambda canvas: {tuple(int(v) for v in px) for px in canvas.reshape(-1, 3)}  # noqa: E731
    bgr = lambda rgb: rgb[::-1]                          # noqa: E731 - the overlay is written by OpenCV, in BGR
    drawn = colours(predict.outline_overlay(image, pred, truth, skip_class0=True))
    assert bgr(figures.TRUTH[1]) in drawn and bgr(figures.colour(1)[1]) in drawn
    assert bgr(figures.colour(0)[1]) not in drawn        # the catch-all class is not outlined
    assert bgr(figures.colour(0)[1]) in colours(predict.outline_overlay(image, pred, None))
    assert bgr(figures.TRUTH[1]) not in colours(predict.outline_overlay(image, pred, None))


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
    members = [predict.Member("m", CFG, rt, wrap(build_network(CFG, rt)))]
    produce = predict.tiled_probs if tile else predict.resized_probs
    out = list(produce(members, data, args()))
    assert [k for k, *_ in out] == [0, 1, 2, 3]
    assert [tuple(p.shape) for _, _, p, _ in out] == [(1, 1, h, w) for h, w in sizes]
    # the image of the network input's size, in one piece or one tile: the probabilities of one forward of it
    with torch.no_grad(), rt.autocast():
        direct = members[0].predictor(torch.from_numpy(images[3]).permute(2, 0, 1)[None].float())
    assert torch.allclose(out[3][2], direct, atol=1e-5)
    assert all((q is None) if tile else q.shape == (1, 1, 32, 32) for *_, q in out)   # at the network input


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
