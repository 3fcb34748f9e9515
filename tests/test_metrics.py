import numpy as np
import pytest
import torch

from metrics import SegMeter, binarize, counts, dice_from_counts, iou_from_counts


def numpy_scores(pred, target):
    inter = np.logical_and(pred, target).sum()
    union = np.logical_or(pred, target).sum()
    total = pred.sum() + target.sum()
    return (1.0 if union == 0 else inter / union), (1.0 if total == 0 else 2 * inter / total)


def test_per_image_and_dataset_scores_match_numpy():
    rng = np.random.default_rng(0)
    pred = rng.random((6, 2, 16, 16)) > 0.6
    target = rng.random((6, 2, 16, 16)) > 0.5
    pred[2, 1] = False
    target[2, 1] = False   # both empty: 1
    target[3, 0] = False   # empty target, non-empty prediction: 0
    meter = SegMeter(2, "cpu", keep_per_image=True)
    for b in range(0, 6, 4):  # uneven batches: 4 + 2
        meter.update(torch.tensor(pred[b:b + 4]).float(), torch.tensor(target[b:b + 4]).float())
    iou, dice = meter.image_scores()
    for n in range(6):
        for c in range(2):
            ei, ed = numpy_scores(pred[n, c], target[n, c])
            assert iou[n, c].item() == pytest.approx(ei) and dice[n, c].item() == pytest.approx(ed)
    assert iou[2, 1] == 1 and iou[3, 0] == 0
    ds_iou, ds_dice = meter.dataset_scores()
    for c in range(2):
        ei, ed = numpy_scores(pred[:, c], target[:, c])
        assert ds_iou[c].item() == pytest.approx(ei) and ds_dice[c].item() == pytest.approx(ed)
    assert meter.iou() == pytest.approx(ds_iou.mean().item())


def test_dataset_score_does_not_depend_on_batch_size():
    rng = np.random.default_rng(1)
    pred = torch.tensor(rng.random((8, 1, 8, 8)) > 0.5).float()
    target = torch.tensor(rng.random((8, 1, 8, 8)) > 0.3).float()
    results = []
    for bs in (1, 3, 8):
        m = SegMeter(1, "cpu")
        for b in range(0, 8, bs):
            m.update(pred[b:b + bs], target[b:b + bs])
        results.append(m.iou())
    assert results[0] == pytest.approx(results[1]) == pytest.approx(results[2])


def test_binarize_sigmoid_and_softmax():
    logits = torch.tensor([[-1.0, 0.5], [2.0, -3.0]]).view(1, 2, 1, 2)
    assert binarize(logits).view(-1).tolist() == [0, 1, 1, 0]
    assert binarize(logits, threshold=0.7).view(-1).tolist() == [0, 0, 1, 0]
    onehot = binarize(logits, mode="softmax")
    assert onehot.view(2, 2).tolist() == [[0, 1], [1, 0]]


def test_empty_cases():
    z = torch.zeros(1, 1, 4, 4)
    o = torch.ones(1, 1, 4, 4)
    assert iou_from_counts(*counts(z, z)).item() == 1 and dice_from_counts(*counts(z, z)).item() == 1
    assert iou_from_counts(*counts(o, z)).item() == 0 and dice_from_counts(*counts(z, o)).item() == 0
