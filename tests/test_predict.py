"""predict.py: prediction with flips, thresholds, resizing back to each image's size, one result per image."""

import numpy as np
import pytest
import torch

import config
import predict
import runtime
from dataset import SegmentationData
from engine import build_network
from predictor import Predictor, describe

CFG = {**config.DEFAULTS, "arch": "UNet", "input_w": 32, "input_h": 32, "normalize": "imagenet"}


def args(**kw):
    return predict.PredictOptions(**{"batch_size": 3, **kw})


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
    members = [predict.TrainedRun("a", CFG, rt, wrap(Shift(2.0))), predict.TrainedRun("b", CFG, rt, wrap(Shift(-1.0)))]
    (_, _, probs, first), = predict.image_probs(members, data, args())
    expected = (torch.sigmoid(torch.tensor(2.0)) + torch.sigmoid(torch.tensor(-1.0))) / 2
    assert torch.allclose(probs, expected.expand_as(probs)) and torch.allclose(first, torch.sigmoid(torch.tensor(2.0)))


def test_to_prediction_thresholds_or_takes_the_argmax():
    probs = torch.tensor([0.2, 0.6, 0.9]).view(1, 3, 1, 1)
    assert predict.to_prediction(probs, CFG, 0.5).flatten().tolist() == [0, 1, 1]
    assert predict.to_prediction(probs, CFG, 0.7).flatten().tolist() == [0, 0, 1]
    assert predict.to_prediction(probs, {**CFG, "class_mode": "softmax"}, 0.5).flatten().tolist() == [0, 0, 1]


@pytest.mark.parametrize("how", ["resized", "tiled", "whole"])
def test_probabilities_come_back_at_each_images_own_size(how):
    rng = np.random.default_rng(0)
    sizes = [(40, 40), (24, 56), (64, 32), (32, 32)]
    images = [rng.integers(0, 255, (h, w, 3), dtype=np.uint8) for h, w in sizes]
    data = SegmentationData([f"i{k}" for k in range(4)], images, None)
    rt = runtime.build(torch.device("cpu"), CFG)
    scale = None if how == "resized" else (1.0, 1.0)      # a run from before the scale was recorded: resized
    members = [predict.TrainedRun("m", CFG, rt, wrap(build_network(CFG, rt)), scale)]
    out = list(predict.image_probs(members, data, args(tile=how == "tiled")))
    assert [k for k, *_ in out] == [0, 1, 2, 3]
    assert [tuple(p.shape) for _, _, p, _ in out] == [(1, 1, h, w) for h, w in sizes]
    # the image of the network input's size, in one piece or one tile: the probabilities of one forward of it
    with torch.no_grad(), rt.autocast():
        direct = members[0].predictor(torch.from_numpy(images[3]).permute(2, 0, 1)[None].float())
    assert torch.allclose(out[3][2], direct, atol=1e-5)
    at_input = [q is not None for *_, q in out]            # scored at the network input: only images predicted at it
    assert at_input == {"resized": [True] * 4, "tiled": [False] * 4, "whole": [False, False, False, True]}[how]


class Box(torch.nn.Module):
    """A 'network' whose logit is high where the input's first channel is bright: what it finds has the size the
    network sees, so a resize shows in the mask."""

    def forward(self, x):
        return (x[:, :1] - x[:, :1].mean()) * 20


def test_whole_images_are_predicted_at_their_own_size_never_shrunk_unless_asked():
    image = np.zeros((96, 80, 3), np.uint8)
    image[40:43, 30:33] = 255                              # a 3x3 spot: shrunk to 32 px it would be 1 px
    data = SegmentationData(["big"], [image], None)
    rt = runtime.build(torch.device("cpu"), CFG)
    run = predict.TrainedRun("m", CFG, rt, wrap(Box()), (1.0, 1.0))
    (whole,) = predict.predict_images([run], data, args())
    assert whole.mask.shape == (1, 96, 80) and whole.mask[0].sum() == 9 and whole.mask[0, 40:43, 30:33].all()
    (shrunk,) = predict.predict_images([run], data, args(resize=True))
    assert shrunk.mask[0].sum() != 9                        # the old way: through a 32x32 input and back
    assert predict.network_size(run, (96, 80), args()) == (96, 80)
    half = predict.TrainedRun("m", CFG, rt, wrap(Box()), (2.0, 2.5))     # learned at half and 2/5 the image size
    assert predict.network_size(half, (96, 80), args()) == (48, 32)
    (scaled,) = predict.predict_images([half], data, args())
    assert scaled.mask.shape == (1, 96, 80)


def test_odd_sizes_are_padded_to_the_networks_multiple_and_cropped_back():
    x = torch.arange(2 * 3 * 5 * 7, dtype=torch.float32).view(2, 3, 5, 7)
    y = predict.padded(x)
    assert y.shape == (2, 3, 16, 16) and torch.equal(y[:, :, :5, :7], x)
    assert predict.padded(torch.zeros(1, 1, 32, 48)).shape == (1, 1, 32, 48)        # multiples: untouched


def test_predict_images_yields_a_result_per_image_in_order_and_objects_only_when_asked():
    images = [np.zeros((40, 24, 3), np.uint8), np.zeros((32, 32, 3), np.uint8)]
    data = SegmentationData(["x", "y"], images, None)
    rt = runtime.build(torch.device("cpu"), CFG)
    runs = [predict.TrainedRun("m", CFG, rt, wrap(Shift(3.0)))]      # every pixel foreground (p = 0.95)
    results = list(predict.predict_images(runs, data, args(threshold=0.9)))
    assert [r.id for r in results] == ["x", "y"] and [r.index for r in results] == [0, 1]
    assert results[0].probs.shape == (1, 40, 24) and results[0].mask.shape == (1, 40, 24)
    assert results[0].mask.min() == 1 and results[0].labels is None                 # no instances asked for
    assert torch.equal(results[0].mask_tensor[0].cpu(), torch.from_numpy(results[0].mask))
    high = list(predict.predict_images(runs, data, args(threshold=0.97, instances="components", min_size=1)))
    assert high[0].mask.max() == 0 and high[0].labels.shape == (40, 24) and high[0].labels.max() == 0
    one = list(predict.predict_images(runs, data, args(instances="components", min_size=1)))
    assert one[1].labels.max() == 1                    # the whole image is one object
