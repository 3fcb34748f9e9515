"""Nuclei as objects: a predicted mask split into separate objects, and the object scores of the 2018 Data
Science Bowl.

Objects come from the foreground of a mask either as its connected components, or by a seeded
watershed on the distance transform, which separates touching nuclei: each nucleus's centre is a
peak of the (smoothed) distance to the background, and each regional maximum at least
SEED_HEIGHT above its surroundings seeds one object. Objects smaller than min_size pixels are
dropped. All with scipy/scikit-image.

SEED_HEIGHT and SMOOTHING were chosen on the ground-truth masks of stage1_train at 96 pixels,
split and scored against its nucleus labels: object score 0.73 against 0.66 for the connected
components (BENCHMARKS.md).

The object score of an image (the Bowl's metric): predicted and true objects are matched by IoU;
at each threshold t in 0.50, 0.55, ..., 0.95 a true object is found (TP) when a predicted one
overlaps it with IoU > t (above 0.5 a match is one-to-one), the other predicted objects are FP
and the other true ones FN; the image scores the mean over t of TP / (TP + FP + FN), and 1 when
it has no true and no predicted object.
"""
import numpy as np
from scipy import ndimage as ndi

THRESHOLDS = np.round(np.arange(0.5, 0.96, 0.05), 2)      # 0.50 .. 0.95
METHODS = ("watershed", "components")
SEED_HEIGHT = 0.1    # pixels: a (smoothed) distance peak this far above its saddle seeds its own object
SMOOTHING = 0.25     # the distance transform's smoothing, as a fraction of the median nucleus radius
BORDER_DEPTH = 0.5   # split_by_borders: how far a sure border lowers the distance (0.3-1 scored alike, BENCHMARKS.md)


def components(mask, min_size):
    """0/1 mask (H, W) -> int32 labels 0 (background), 1..N: its connected components (4-connected), those of
    fewer than min_size pixels dropped."""
    from skimage.measure import label
    return drop_small(label(mask > 0, connectivity=1), min_size)


def watershed_split(mask, min_size):
    """0/1 mask (H, W) -> int32 labels: a seeded watershed on the smoothed distance transform, so that touching
    nuclei (one component with two or more distance peaks) become separate objects."""
    from skimage.morphology import h_maxima
    from skimage.segmentation import watershed
    foreground = mask > 0
    if not foreground.any():
        return np.zeros(mask.shape, np.int32)
    distance = ndi.gaussian_filter(ndi.distance_transform_edt(foreground), smoothing(foreground))   # (H, W)
    seeds, _ = ndi.label(h_maxima(distance, SEED_HEIGHT) if distance.max() > SEED_HEIGHT else foreground)
    labels = watershed(-distance, seeds, mask=foreground)
    missed, _ = ndi.label(foreground & (labels == 0))          # components too thin to hold a seed: kept whole
    labels = np.where(missed > 0, missed + labels.max(), labels)
    return drop_small(labels, min_size)


def smoothing(foreground):
    """The distance transform's smoothing (pixels): a quarter of the median component's radius, so that the
    split does not depend on the image's scale, and a ridge along one elongated nucleus does not cut it."""
    components_, n = ndi.label(foreground)
    radius = np.sqrt(np.median(np.bincount(components_.ravel())[1:]) / np.pi)
    return max(0.5, SMOOTHING * radius)


def drop_small(labels, min_size):
    """Removes objects of fewer than min_size pixels and renumbers the rest 1..N (int32)."""
    from skimage.segmentation import relabel_sequential
    sizes = np.bincount(labels.ravel())
    small = np.flatnonzero(sizes < min_size)
    labels = np.where(np.isin(labels, small[small > 0]), 0, labels)
    return relabel_sequential(labels.astype(np.int32))[0]


def split(mask, method, min_size):
    """A mask's objects by `method` (one of METHODS)."""
    return watershed_split(mask, min_size) if method == "watershed" else components(mask, min_size)


def object_targets(labels, radius):
    """Label image (H, W) (0 background, one number per object) -> uint8 (H, W, 2) of 0/1, the training target of
    --target objects: plane 0 the objects (label > 0, the same as their mask), plane 1 their borders: the pixels of
    an object within `radius` pixels (a disc) of a pixel of another object, so a band 2 * radius wide where two
    objects touch and nothing along an object's edge with the background. The bodies (objects minus borders) of
    touching objects are then apart."""
    labels = np.asarray(labels)
    objects = labels > 0
    yy, xx = np.mgrid[-radius:radius + 1, -radius:radius + 1]
    disc = yy ** 2 + xx ** 2 <= radius ** 2
    highest = ndi.maximum_filter(labels, footprint=disc, mode="constant", cval=0)
    # the lowest object label nearby: the background counts as above every label
    lowest = ndi.minimum_filter(np.where(objects, labels, np.iinfo(np.int64).max).astype(np.int64), footprint=disc,
                                mode="constant", cval=np.iinfo(np.int64).max)
    borders = objects & ((highest != labels) | (lowest != labels))
    return np.stack([objects, borders], axis=2).astype(np.uint8)


def split_by_borders(objects, borders, min_size):
    """The objects of a model trained with --target objects: its objects mask (H, W) and its borders plane (H, W),
    probabilities or 0/1 -> int32 labels. The watershed of watershed_split, on the distance transform of the
    objects mask lowered by up to BORDER_DEPTH of itself where the borders plane says border, then smoothed: a
    touching pair that the shape alone does not split (no neck between them) is split where the network sees their
    border, and
    a model that learned no border splits as watershed_split does. (Seeding one object per body, objects minus
    borders, recovers true objects almost exactly, 0.97, but on stage1_train a model's weak borders left small
    touching nuclei without a body, merged into their neighbours: 0.41 against 0.49 this way; BENCHMARKS.md.)"""
    from skimage.morphology import h_maxima
    from skimage.segmentation import watershed
    foreground = objects > 0
    if not foreground.any():
        return np.zeros(foreground.shape, np.int32)
    # lowered first, then smoothed: the border probabilities are noisy (0.05-0.2 where the network saw no border),
    # and multiplied into the smoothed distance it seeded spurious objects at full resolution (0.38 against 0.52)
    lowered = ndi.distance_transform_edt(foreground) * (1 - BORDER_DEPTH * np.clip(np.asarray(borders, np.float64), 0, 1))
    height = ndi.gaussian_filter(lowered, smoothing(foreground))
    seeds, _ = ndi.label(h_maxima(height, SEED_HEIGHT) if height.max() > SEED_HEIGHT else foreground)
    labels = watershed(-height, seeds, mask=foreground)
    missed, _ = ndi.label(foreground & (labels == 0))          # components too thin to hold a seed: kept whole
    labels = np.where(missed > 0, missed + labels.max(), labels)
    return drop_small(labels, min_size)


def iou_matrix(true, pred):
    """Label images (H, W) with objects 1..N and 1..M -> (N, M) IoU of every true/predicted pair."""
    n, m = int(true.max()), int(pred.max())
    pairs = np.bincount(true.ravel().astype(np.int64) * (m + 1) + pred.ravel(), minlength=(n + 1) * (m + 1))
    overlap = pairs.reshape(n + 1, m + 1)                                      # row: true label, column: predicted
    area_true, area_pred = overlap.sum(1)[1:], overlap.sum(0)[1:]
    inter = overlap[1:, 1:]
    return inter / np.maximum(area_true[:, None] + area_pred[None, :] - inter, 1)


def object_scores(true, pred):
    """Label images (true, predicted; 0 background, 1..N consecutive) -> {'score', 'ap_50', 'f1_50',
    'true_count', 'pred_count', 'count_error'}: the Bowl's score (mean over THRESHOLDS of TP/(TP+FP+FN)), that
    ratio at IoU 0.5 alone (the Bowl's "average precision" at 0.5), F1 at IoU 0.5, the object counts and the
    absolute counting error."""
    iou = iou_matrix(true, pred)
    n_true, n_pred = iou.shape
    per_threshold, f1, ap = [], 1.0, 1.0
    for t in THRESHOLDS:
        tp = int((iou > t).any(1).sum())
        fp, fn = n_pred - tp, n_true - tp
        per_threshold.append(1.0 if tp + fp + fn == 0 else tp / (tp + fp + fn))
        if t == 0.5:
            f1 = 1.0 if tp + fp + fn == 0 else 2 * tp / (2 * tp + fp + fn)
            ap = per_threshold[-1]
    return {"score": float(np.mean(per_threshold)), "ap_50": ap, "f1_50": f1, "true_count": n_true, "pred_count": n_pred,
            "count_error": abs(n_pred - n_true)}


def object_sizes(labels):
    """-> (count, mean area, median area) in pixels; (0, 0, 0) for an image without objects."""
    areas = np.bincount(labels.ravel())[1:]
    areas = areas[areas > 0]
    if not len(areas):
        return 0, 0.0, 0.0
    return len(areas), float(areas.mean()), float(np.median(areas))


MEASUREMENTS = ["id", "object", "area", "centroid_y", "centroid_x", "bbox_top", "bbox_left", "bbox_bottom",
                "bbox_right", "eccentricity"]   # then mean_intensity (one channel) or mean_intensity_<c>


def measure(labels, image):
    """Per object of a label image (H, W), on the raw image (H, W, C) it came from -> [{object, area, centroid_y,
    centroid_x, bbox_top, bbox_left, bbox_bottom, bbox_right (exclusive, as slices), eccentricity (of the ellipse
    with the same second moments: 0 a disc, towards 1 a line), mean_intensity or mean_intensity_<c> per channel
    (in the image's own units, e.g. 16-bit grey levels)}] in pixels, via scikit-image's regionprops."""
    from skimage.measure import regionprops_table
    if not labels.any():
        return []
    t = regionprops_table(labels.astype(np.int32), intensity_image=image.astype(np.float32),
                          properties=("label", "area", "centroid", "bbox", "intensity_mean", "eccentricity"))
    channels = image.shape[2] if image.ndim == 3 else 1
    rows = []
    for k in range(len(t["label"])):
        row = {"object": int(t["label"][k]), "area": int(t["area"][k]),
               "centroid_y": round(float(t["centroid-0"][k]), 2), "centroid_x": round(float(t["centroid-1"][k]), 2),
               "bbox_top": int(t["bbox-0"][k]), "bbox_left": int(t["bbox-1"][k]), "bbox_bottom": int(t["bbox-2"][k]),
               "bbox_right": int(t["bbox-3"][k]), "eccentricity": round(float(t["eccentricity"][k]), 4)}
        if channels == 1:
            row["mean_intensity"] = round(float(t["intensity_mean-0"][k] if "intensity_mean-0" in t
                                                else t["intensity_mean"][k]), 3)
        else:
            row.update({f"mean_intensity_{c}": round(float(t[f"intensity_mean-{c}"][k]), 3) for c in range(channels)})
        rows.append(row)
    return rows
