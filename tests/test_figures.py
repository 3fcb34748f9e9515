"""figures.py: the class palette and val.py's panels."""
import numpy as np

import figures


def pixels(img):
    return {tuple(int(v) for v in px) for px in img.reshape(-1, 3)}


def test_twenty_classes_get_twenty_colours_none_kept_for_truth_or_errors():
    rgb = [figures.colour(c)[1] for c in range(20)]
    names = [figures.colour(c)[0] for c in range(20)]
    assert len(set(rgb)) == 20 and len(set(names)) == 20
    reserved = {figures.TRUTH[1], figures.FALSE_POSITIVE[1], figures.FALSE_NEGATIVE[1]}
    assert not reserved & set(rgb) and len(reserved) == 3


def test_class_labels_are_the_names_given_else_the_numbers():
    assert figures.class_label(["nucleus", "membrane"], 1) == "membrane"
    assert figures.class_label([], 1) == "1"


def scene():
    """A 32x32 image, a true square of class 0 and a prediction shifted 4 px: false positives and negatives."""
    image = np.full((32, 32, 3), 90, np.uint8)
    truth = np.zeros((1, 32, 32), np.uint8)
    pred = np.zeros((1, 32, 32), np.uint8)
    truth[0, 8:20, 8:20] = 1
    pred[0, 12:24, 12:24] = 1
    return image, pred, truth


def test_a_panel_has_four_titled_tiles_and_the_errors_in_two_colours():
    image, pred, truth = scene()
    fig = figures.panel(image, pred, truth, ["nucleus"])
    side = figures.TILE_SIDE                                     # 32 px scaled 8x, to 256
    assert fig.shape[1] == 4 * side + 3 * 6 and fig.shape[0] > side + 22
    errors = fig[22:22 + side, 3 * (side + 6):]                  # the fourth tile, below its title
    assert figures.FALSE_POSITIVE[1] in pixels(errors) and figures.FALSE_NEGATIVE[1] in pixels(errors)
    fp = (errors == figures.FALSE_POSITIVE[1]).all(axis=2).sum()
    assert fp == (pred[0] & ~truth[0].astype(bool)).sum() * 8 * 8     # exactly the predicted-not-true pixels
    legend = fig[22 + side:]
    assert figures.colour(0)[1] in pixels(legend) and figures.FALSE_NEGATIVE[1] in pixels(legend)


def test_without_truth_a_panel_is_image_and_prediction_and_softmax_class_0_is_not_coloured():
    image, pred, _ = scene()
    both = np.stack([1 - pred[0], pred[0]])                      # softmax: class 0 is everything else
    fig = figures.panel(image, both, None, skip_class0=True)
    assert fig.shape[1] == 2 * figures.TILE_SIDE + 6
    assert figures.FALSE_POSITIVE[1] not in pixels(fig)
    legend = fig[22 + figures.TILE_SIDE:]
    assert figures.colour(1)[1] in pixels(legend) and figures.colour(0)[1] not in pixels(legend)


def test_objects_are_outlined_each_in_its_own_colour():
    image, pred, truth = scene()
    labels = np.zeros((32, 32), np.int64)
    labels[12:24, 12:17], labels[12:24, 18:24] = 1, 2
    fig = figures.panel(image, pred, truth, objects=(labels, None))
    prediction = fig[22:22 + figures.TILE_SIDE, 2 * (figures.TILE_SIDE + 6):3 * figures.TILE_SIDE + 12]
    assert {figures.colour(1)[1], figures.colour(2)[1]} <= pixels(prediction)


def test_large_images_are_shown_at_most_max_tile_side():
    image = np.zeros((3000, 1500, 3), np.uint8)
    pred = np.zeros((1, 3000, 1500), np.uint8)
    fig = figures.panel(image, pred)
    assert fig.shape[0] < figures.MAX_TILE_SIDE + 100 and fig.shape[1] == 2 * 512 + 6


def test_overlay_outlines_prediction_and_truth_in_two_colours_and_not_softmax_class_0():
    image = np.zeros((20, 20, 3), np.uint8)
    pred = np.zeros((2, 20, 20), np.uint8)
    truth = np.zeros((2, 20, 20), np.uint8)
    pred[1, 2:8, 2:8] = 1
    truth[1, 10:16, 10:16] = 1
    pred[0], truth[0] = 1 - pred[1], 1 - truth[1]       # softmax: class 0 is everything else
    colours = lambda canvas: {tuple(int(v) for v in px) for px in canvas.reshape(-1, 3)}  # noqa: E731
    bgr = lambda rgb: rgb[::-1]                          # noqa: E731 - the overlay is written by OpenCV, in BGR
    drawn = colours(figures.outline_overlay(image, pred, truth, skip_class0=True))
    assert bgr(figures.TRUTH[1]) in drawn and bgr(figures.colour(1)[1]) in drawn
    assert bgr(figures.colour(0)[1]) not in drawn        # the catch-all class is not outlined
    assert bgr(figures.colour(0)[1]) in colours(figures.outline_overlay(image, pred, None))
    assert bgr(figures.TRUTH[1]) not in colours(figures.outline_overlay(image, pred, None))
