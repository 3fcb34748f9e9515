"""Pictures for a person: the class colours, any image shown as 8-bit RGB, val.py's outline overlays and its panels
(image, ground truth, prediction, errors).

Colours are RGB. The 20 class colours are distinct from each other and from the three kept for other
meanings: the true outline of an overlay (magenta), false positives (red) and false negatives (blue).
"""
import cv2
import numpy as np

PALETTE = [("green", (60, 180, 75)), ("yellow", (255, 225, 25)), ("orange", (245, 130, 48)),
           ("purple", (145, 30, 180)), ("cyan", (70, 240, 240)), ("lime", (210, 245, 60)), ("pink", (250, 190, 212)),
           ("teal", (0, 128, 128)), ("lavender", (220, 190, 255)), ("brown", (170, 110, 40)),
           ("beige", (255, 250, 200)), ("maroon", (128, 0, 0)), ("mint", (170, 255, 195)), ("olive", (128, 128, 0)),
           ("apricot", (255, 215, 180)), ("navy", (0, 0, 128)), ("grey", (128, 128, 128)), ("white", (255, 255, 255)),
           ("black", (0, 0, 0)), ("dark green", (0, 100, 0))]
TRUTH = ("magenta", (240, 50, 230))
FALSE_POSITIVE = ("red", (230, 25, 75))
FALSE_NEGATIVE = ("blue", (0, 130, 200))
TILE_SIDE = 256          # a panel's tiles are scaled (by whole numbers) to at least this on their short side ...
MAX_TILE_SIDE = 1024     # ... and down to at most this on their long side
FILL = 0.5               # how strongly a class's colour covers the image in the truth and prediction tiles
FONT = cv2.FONT_HERSHEY_SIMPLEX


def colour(c):
    """Class c's (name, RGB) colour: the palette's, the same for a class in every figure."""
    return PALETTE[c % len(PALETTE)]


def class_label(names, c):
    """Class c as the figures and tables name it: 'nucleus' if class_names gives names, else '0', '1', ..."""
    return names[c] if c < len(names) else str(c)


def tile_scale(h, w):
    if max(h, w) > MAX_TILE_SIDE:
        return MAX_TILE_SIDE / max(h, w)
    return float(max(1, TILE_SIDE // max(1, min(h, w))))


def scaled(tile, scale):
    if scale == 1:
        return tile
    h, w = tile.shape[:2]
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return cv2.resize(tile, size, interpolation=cv2.INTER_NEAREST if scale > 1 else cv2.INTER_AREA)


def filled(grey, masks, classes):
    """The grey image with each class's mask (C, H, W) filled in its colour, FILL strong."""
    out = grey.astype(np.float32)
    for c in classes:
        on = masks[c].astype(bool)
        out[on] = (1 - FILL) * out[on] + FILL * np.array(colour(c)[1], np.float32)
    return out.astype(np.uint8)


def outlined(tile, labels, scale, bgr=False):
    """Each object of a label image (H, W) outlined in its own colour (cycling through the palette), on a tile
    already scaled by `scale` (RGB, or BGR for OpenCV's pictures)."""
    big = labels if scale == 1 else cv2.resize(labels.astype(np.float32), (tile.shape[1], tile.shape[0]),
                                               interpolation=cv2.INTER_NEAREST).astype(np.int64)
    from scipy import ndimage
    for k, box in enumerate(ndimage.find_objects(big), start=1):      # each object within its own box: fast
        if box is None:
            continue
        contours, _ = cv2.findContours((big[box] == k).astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE,
                                       offset=(box[1].start, box[0].start))
        cv2.drawContours(tile, contours, -1, colour(k)[1][::-1] if bgr else colour(k)[1], 1)
    return tile


def errors(grey, pred, truth, classes):
    """The grey image, dimmed, with the false positives (predicted, not true) in red and the false negatives
    (true, missed) in blue, over the classes shown."""
    out = (grey.astype(np.float32) * 0.6).astype(np.uint8)
    fp = np.zeros(grey.shape[:2], bool)
    fn = np.zeros(grey.shape[:2], bool)
    for c in classes:
        fp |= pred[c].astype(bool) & ~truth[c].astype(bool)
        fn |= truth[c].astype(bool) & ~pred[c].astype(bool)
    out[fp] = FALSE_POSITIVE[1]
    out[fn] = FALSE_NEGATIVE[1]
    return out


def titled(tile, title):
    """A tile with a title bar above it."""
    bar = np.full((22, tile.shape[1], 3), 255, np.uint8)
    cv2.putText(bar, title, (4, 16), FONT, 0.5, (0, 0, 0), 1, cv2.LINE_AA)
    return np.vstack([bar, tile])


def legend_row(entries, width):
    """A strip of colour swatches with their words ([(words, RGB)]), wrapped to `width` pixels."""
    rows, row, x = [], np.full((22, width, 3), 255, np.uint8), 4
    for words, rgb in entries:
        need = 18 + cv2.getTextSize(words, FONT, 0.45, 1)[0][0] + 14
        if x + need > width and x > 4:
            rows.append(row)
            row, x = np.full((22, width, 3), 255, np.uint8), 4
        cv2.rectangle(row, (x, 5), (x + 12, 17), rgb, -1)
        cv2.rectangle(row, (x, 5), (x + 12, 17), (0, 0, 0), 1)
        cv2.putText(row, words, (x + 18, 16), FONT, 0.45, (0, 0, 0), 1, cv2.LINE_AA)
        x += need
    return np.vstack(rows + [row])


def panel(image, pred, truth=None, names=(), skip_class0=False, objects=None):
    """One figure for an image: image | ground truth | prediction | errors (without truth: image | prediction),
    titled, with a legend of the class colours (and the error colours) below. image: RGB (H, W, 3) uint8 as
    display_image shows it; pred, truth: 0/1 (C, H, W); names: the class names; skip_class0: softmax mode's
    background class is not coloured; objects: (prediction, truth-or-None) label images to outline, or None.
    -> RGB uint8."""
    classes = range(1 if skip_class0 else 0, pred.shape[0])
    scale = tile_scale(*image.shape[:2])
    grey = np.repeat(cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)[:, :, None], 3, axis=2)
    pred_tile = scaled(filled(grey, pred, classes), scale)
    if objects is not None:
        pred_tile = outlined(pred_tile, objects[0], scale)
    tiles = [titled(scaled(image, scale), "image")]
    if truth is not None:
        truth_tile = scaled(filled(grey, truth, classes), scale)
        if objects is not None and objects[1] is not None:
            truth_tile = outlined(truth_tile, objects[1], scale)
        tiles.append(titled(truth_tile, "ground truth"))
    tiles.append(titled(pred_tile, "prediction" + (" (objects outlined)" if objects is not None else "")))
    if truth is not None:
        tiles.append(titled(scaled(errors(grey, pred, truth, classes), scale), "errors"))
    gap = np.full((tiles[0].shape[0], 6, 3), 255, np.uint8)
    strip = np.hstack([t for tile in tiles for t in (tile, gap)][:-1])
    entries = [(f"class {class_label(names, c)}" if not names else class_label(names, c), colour(c)[1])
               for c in classes]
    if truth is not None:
        entries += [("false positive", FALSE_POSITIVE[1]), ("false negative", FALSE_NEGATIVE[1])]
    return np.vstack([strip, legend_row(entries, strip.shape[1])])


def display_image(image):
    """An image (H, W, C) of any type and channel count -> 8-bit RGB (H, W, 3) for a person to look at: 8-bit images
    as they are, others stretched per channel from their 1st to 99.8th percentile (as Fiji's auto contrast does);
    RGB as it is, one channel as grey, any other count as the mean of its channels."""
    if image.dtype != np.uint8:
        flat = image.reshape(-1, image.shape[2]).astype(np.float32)
        lo, hi = np.percentile(flat, [1.0, 99.8], axis=0)
        image = np.clip((image - lo) / np.maximum(hi - lo, 1e-6) * 255, 0, 255).astype(np.uint8)
    if image.shape[2] == 3:
        return image
    grey = image[:, :, :1] if image.shape[2] == 1 else image.mean(axis=2, keepdims=True).astype(np.uint8)
    return np.repeat(grey, 3, axis=2)


def outline_overlay(image, pred, truth=None, skip_class0=False, objects=None):
    """The image (BGR, as display_image shows it) with each class's predicted outline in its colour and, if given,
    the true outline in TRUTH's; skip_class0: the catch-all class of softmax mode is not outlined. objects: a
    label image (H, W) of the predicted objects, each outlined in its own colour instead of the class's."""
    canvas = cv2.cvtColor(display_image(image), cv2.COLOR_RGB2BGR)
    first = 1 if skip_class0 else 0
    for c in range(first, pred.shape[0]):
        if truth is not None:
            contours, _ = cv2.findContours(truth[c].astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
            cv2.drawContours(canvas, contours, -1, TRUTH[1][::-1], 1)
        if objects is None:
            contours, _ = cv2.findContours(pred[c].astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
            cv2.drawContours(canvas, contours, -1, colour(c)[1][::-1], 1)
    return canvas if objects is None else outlined(canvas, objects, 1, bgr=True)


def legend(cfg, labeled):
    """The overlay's colours in words, for val.py's summary line."""
    classes = range(1 if cfg["class_mode"] == "softmax" else 0, cfg["num_classes"])
    names = cfg["class_names"]
    words = ([f"class {class_label(names, c)} {colour(c)[0]}" for c in classes] if cfg["num_classes"] > 1 or names
             else [f"prediction {colour(0)[0]}"])
    return ", ".join(words + ([f"ground truth {TRUTH[0]}"] if labeled else []))
