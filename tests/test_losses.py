import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from losses import LOSSES, SOFTMAX_LOSSES, BCEDiceLoss, BCEWithLogitsLoss, CEDiceLoss, CrossEntropyLoss, DiceLoss, LovaszHingeLoss, soft_dice_loss


def sigmoid(x):
    return 1 / (1 + math.exp(-x))


def test_bce_by_hand():
    logits = torch.tensor([0.0, 2.0, -1.0, 3.0]).view(1, 1, 2, 2)
    target = torch.tensor([0.0, 1.0, 1.0, 0.0]).view(1, 1, 2, 2)
    expected = (math.log(2) + math.log(1 + math.exp(-2)) + math.log(1 + math.exp(1)) + math.log(1 + math.exp(3))) / 4
    assert BCEWithLogitsLoss()(logits, target).item() == pytest.approx(expected, rel=1e-6)


def test_dice_and_bce_dice_by_hand():
    logits = torch.tensor([0.0, 2.0, -1.0, 3.0]).view(1, 1, 2, 2)
    target = torch.tensor([0.0, 1.0, 1.0, 0.0]).view(1, 1, 2, 2)
    p = [sigmoid(v) for v in (0.0, 2.0, -1.0, 3.0)]
    inter = p[1] + p[2]
    dice = (2 * inter + 1e-5) / (sum(p) + 2 + 1e-5)
    assert DiceLoss()(logits, target).item() == pytest.approx(1 - dice, rel=1e-6)
    bce = BCEWithLogitsLoss()(logits, target).item()
    assert BCEDiceLoss()(logits, target).item() == pytest.approx(0.5 * bce + 1 - dice, rel=1e-6)


def test_dice_is_per_image():
    # image 0 perfect, image 1 entirely wrong: per-image mean is 0.5, a pooled Dice would not be
    logits = torch.tensor([[20.0, 20.0], [-20.0, -20.0]]).view(2, 1, 1, 2)
    target = torch.tensor([[1.0, 1.0], [1.0, 1.0]]).view(2, 1, 1, 2)
    assert DiceLoss()(logits, target).item() == pytest.approx(0.5, abs=1e-4)


def jaccard_loss_of_mispredicted(S, T):
    """Δ(S): the Jaccard loss when exactly the pixels in S are predicted wrongly."""
    union = T | S
    return 0.0 if not union else 1 - len(T - S) / len(union)


def lovasz_brute_force(logits, labels):
    """The Lovász extension of Δ at the hinge errors, from its definition (sum over a sorted chain of sets)."""
    errors = [max(0.0, 1 - x * (2 * y - 1)) for x, y in zip(logits, labels)]
    T = {i for i, y in enumerate(labels) if y == 1}
    order = sorted(range(len(errors)), key=lambda i: -errors[i])
    total, prev = 0.0, 0.0
    for k in range(1, len(order) + 1):
        cur = jaccard_loss_of_mispredicted(set(order[:k]), T)
        total += errors[order[k - 1]] * (cur - prev)
        prev = cur
    return total


@pytest.mark.parametrize("seed", range(5))
def test_lovasz_hinge_matches_definition(seed):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(2, 1, 2, 3, generator=g) * 2
    labels = (torch.rand(2, 1, 2, 3, generator=g) > 0.5).float()
    labels[1] = 0  # an image without foreground
    expected = sum(lovasz_brute_force(logits[b].flatten().tolist(), labels[b].flatten().tolist()) for b in range(2)) / 2
    assert LovaszHingeLoss()(logits, labels).item() == pytest.approx(expected, rel=1e-5, abs=1e-6)


def test_lovasz_on_a_set_indicator_is_the_jaccard_loss():
    labels = [1, 1, 0, 0, 1, 0]
    for S in itertools.chain.from_iterable(itertools.combinations(range(6), k) for k in range(7)):
        # hinge error 1 on S (logit 0), error 0 elsewhere (logit = the label's sign)
        logits = [0.0 if i in S else (1.0 if y else -1.0) for i, y in enumerate(labels)]
        got = LovaszHingeLoss()(torch.tensor(logits).view(1, 1, 1, 6), torch.tensor(labels, dtype=torch.float).view(1, 1, 1, 6))
        assert got.item() == pytest.approx(jaccard_loss_of_mispredicted(set(S), {0, 1, 4}), abs=1e-6)


def test_cross_entropy_and_ce_dice_by_hand():
    logits = torch.tensor([[1.0, 0.0], [0.0, 2.0]]).view(1, 2, 1, 2)   # two pixels, two classes
    target = torch.tensor([[1.0, 0.0], [0.0, 1.0]]).view(1, 2, 1, 2)   # pixel 0 class 0, pixel 1 class 1
    ce = (-math.log(math.exp(1) / (math.exp(1) + 1)) - math.log(math.exp(2) / (1 + math.exp(2)))) / 2
    assert CrossEntropyLoss()(logits, target).item() == pytest.approx(ce, rel=1e-6)
    p = F.softmax(logits, 1)[0]                                        # (2 classes, 1, 2)
    dice0 = (2 * p[0, 0, 0] + 1e-5) / (p[0].sum() + 1 + 1e-5)
    dice1 = (2 * p[1, 0, 1] + 1e-5) / (p[1].sum() + 1 + 1e-5)
    expected = ce + 1 - (dice0 + dice1).item() / 2
    assert CEDiceLoss()(logits, target).item() == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_every_loss_takes_multiclass_batches_and_backpropagates(name):
    logits = torch.randn(2, 3, 8, 8, requires_grad=True)
    target = (torch.rand(2, 3, 8, 8) > 0.5).float()
    if name in SOFTMAX_LOSSES:
        target = F.one_hot(torch.randint(0, 3, (2, 8, 8)), 3).permute(0, 3, 1, 2).float()
    loss = LOSSES[name]()(logits, target)
    assert loss.dim() == 0 and torch.isfinite(loss)
    loss.backward()
    assert logits.grad.abs().sum() > 0
    perfect = target * 20 - 10                                          # confident and right
    assert LOSSES[name]()(perfect, target) < loss


def test_batch_dice_pools_the_images_so_a_class_absent_from_most_of_them_counts_where_it_is():
    from losses import BCEBatchDiceLoss, batch_dice_loss
    target = torch.zeros(4, 2, 8, 8)
    target[:, 0, 2:6, 2:6] = 1
    target[0, 1, 3, 2:6] = 1                                   # a thin class in one image of four
    found = target.clone()
    nothing = target.clone()
    nothing[:, 1] = 0                                          # the objects right, the thin class missed
    # per-image Dice rewards predicting nothing of the thin class in the three images without it; pooled Dice does not
    per_image = [soft_dice_loss(p, target).item() for p in (nothing, found)]
    pooled = [batch_dice_loss(p, target).item() for p in (nothing, found)]
    assert pooled[0] - pooled[1] > per_image[0] - per_image[1] > 0
    assert pooled[1] == pytest.approx(0.0, abs=1e-6) and pooled[0] == pytest.approx(0.5, abs=1e-5)
    assert per_image[0] == pytest.approx(0.125, abs=1e-5)     # 3 of 4 images "perfect" for the missed class
    logits = torch.randn(4, 2, 8, 8)
    bce = torch.nn.functional.binary_cross_entropy_with_logits(logits, target).item()
    assert BCEBatchDiceLoss()(logits, target).item() == pytest.approx(
        0.5 * bce + batch_dice_loss(torch.sigmoid(logits), target).item(), rel=1e-6)
    assert "BCEBatchDiceLoss" in LOSSES


def test_border_weighted_loss_weighs_a_missed_border_pixel_ten_times_a_missed_background_pixel():
    from losses import BORDER_WEIGHT, BorderWeightedLoss, batch_dice_loss
    target = torch.zeros(2, 2, 8, 8)
    target[:, 0, 2:6, 2:6] = 1
    target[:, 1, 3, 2:6] = 1                                   # the borders plane, last
    logits = torch.randn(2, 2, 8, 8)
    weight = 1 + (BORDER_WEIGHT - 1) * target[:, 1:]
    per_pixel = torch.nn.functional.binary_cross_entropy_with_logits(logits, target, reduction="none")
    expected = 0.5 * (per_pixel * weight).mean() + batch_dice_loss(torch.sigmoid(logits), target)
    assert BorderWeightedLoss()(logits, target).item() == pytest.approx(expected.item(), rel=1e-6)
    # the cross-entropy of one wrong pixel: on a border it costs BORDER_WEIGHT times what it costs on the background
    right = target * 20 - 10
    on_border, on_background = right.clone(), right.clone()
    on_border[0, 1, 3, 2] = -10                                # a border pixel called no border
    on_background[0, 1, 0, 0] = 10                             # a background pixel called border
    base = BorderWeightedLoss()(right, target)
    dice = [batch_dice_loss(torch.sigmoid(x), target) for x in (on_border, on_background, right)]
    extra = [(BorderWeightedLoss()(x, target) - d - (base - dice[2])).item() for x, d in zip((on_border, on_background), dice)]
    assert extra[0] == pytest.approx(BORDER_WEIGHT * extra[1], rel=1e-3) and extra[1] > 0
    assert LOSSES["BorderWeightedLoss"] is BorderWeightedLoss
