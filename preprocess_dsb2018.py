"""Turn the 2018 Data Science Bowl stage1_train set (folder or zip) into inputs/dsb2018_<size>/.

    python preprocess_dsb2018.py --src stage1_train.zip            # -> inputs/dsb2018_96/
    python preprocess_dsb2018.py --src inputs/stage1_train --size 128

Each sample <id>/images/<id>.png becomes images/<id>.png (RGBA -> RGB, grayscale -> 3 channels,
resized), and the union of its <id>/masks/*.png becomes masks/0/<id>.png (resized bilinearly,
as the reference does, so edges carry in-between values; the toolkit thresholds at 127). The
nuclei themselves go to instances/<id>.png: a 16-bit label image (0 background, 1..N one per
nucleus), resized by nearest neighbour, for val.py --instances. A source without masks (the
stage-1 test set) is written as images only, for prediction.
"""
import argparse
import os
import shutil
import zipfile

import cv2
import numpy as np
from tqdm import tqdm

from utils import UserError, exit_on_user_error, write_png

OUTPUT_FOLDERS = ("images", "masks", "instances")


class Source:
    """Read-only access to stage1_train as a folder or a zip: samples() -> {id: (image path, [mask paths])}."""

    def __init__(self, src):
        if not os.path.exists(src):
            raise UserError(f"{src} does not exist; download stage1_train.zip from the 2018 Data Science Bowl "
                            "and pass its path (the zip or the unpacked folder) to --src")
        self.zip = zipfile.ZipFile(src) if zipfile.is_zipfile(src) else None
        self.root = src
        names = self.zip.namelist() if self.zip else [os.path.relpath(os.path.join(d, f), src).replace(os.sep, "/")
                                                       for d, _, fs in os.walk(src) for f in fs]
        self.samples = {}
        for name in names:
            parts = name.split("/")
            if len(parts) >= 3 and parts[-1].endswith(".png") and parts[-2] in ("images", "masks"):
                sample_id = parts[-3]
                entry = self.samples.setdefault(sample_id, [None, []])   # [image, masks]
                if parts[-2] == "images":
                    entry[0] = name
                else:
                    entry[1].append(name)
        self.samples = {k: v for k, v in self.samples.items() if v[0] is not None}
        if not self.samples:
            raise UserError(f"no <id>/images/<id>.png found in {src}; is it the stage1_train set?")

    def read(self, name, flags):
        data = self.zip.read(name) if self.zip else open(os.path.join(self.root, name), "rb").read()
        img = cv2.imdecode(np.frombuffer(data, np.uint8), flags)
        if img is None:
            raise UserError(f"cannot decode {name} in {self.root}; the download may be damaged")
        return img


def prepare_out(out, overwrite):
    """Refuses to write into a folder that already holds files, unless --overwrite (then the folders this script
    writes - images/, masks/, instances/ - are emptied first; anything else there stays)."""
    present = [d for d in OUTPUT_FOLDERS if os.path.isdir(os.path.join(out, d)) and os.listdir(os.path.join(out, d))]
    if present and not overwrite:
        raise UserError(f"{out} already holds a data set ({', '.join(d + '/' for d in present)}); pass --overwrite "
                        "to replace it, or --out to write somewhere else")
    for d in present:
        shutil.rmtree(os.path.join(out, d))


def instance_labels(source, mask_names, shape):
    """The sample's nucleus masks -> a uint16 label image: 0 background, 1..N one per nucleus (file name order)."""
    labels = np.zeros(shape, np.uint16)
    for n, m in enumerate(sorted(mask_names), 1):
        labels[source.read(m, cv2.IMREAD_GRAYSCALE) > 127] = n
    return labels


def convert_sample(source, sample, out, size):
    """One sample: images/<id>.png, and if it has nucleus masks, masks/0/<id>.png (their union, resized
    bilinearly as the reference does) and instances/<id>.png (16-bit labels, resized by nearest neighbour)."""
    sample_id, (image_name, mask_names) = sample
    img = source.read(image_name, cv2.IMREAD_UNCHANGED)
    if img.ndim == 2:
        img = np.repeat(img[:, :, None], 3, axis=2)
    img = img[:, :, :3]                                          # drop alpha
    write_png(os.path.join(out, "images", sample_id + ".png"), cv2.resize(img, (size, size)))
    if not mask_names:
        return
    labels = instance_labels(source, mask_names, img.shape[:2])
    union = (labels > 0).astype(np.float32)
    write_png(os.path.join(out, "masks", "0", sample_id + ".png"), (cv2.resize(union, (size, size)) * 255).astype(np.uint8))
    write_png(os.path.join(out, "instances", sample_id + ".png"),
              cv2.resize(labels, (size, size), interpolation=cv2.INTER_NEAREST_EXACT))


def convert(src, out, size, overwrite=False):
    """-> (number of images, whether they have masks). A set without any masks (the stage-1 test set's layout)
    is written as images only, for prediction; a set where only some images have masks is refused."""
    source = Source(src)
    unlabelled = sorted(k for k, (_, masks) in source.samples.items() if not masks)
    if unlabelled and len(unlabelled) < len(source.samples):
        raise UserError(f"{len(unlabelled)} of the {len(source.samples)} samples in {src} have no masks/ "
                        f"({', '.join(unlabelled[:5])}{' ...' if len(unlabelled) > 5 else ''}); a training set "
                        "needs masks for every image. Remove those samples or fix the download.")
    labeled = not unlabelled
    prepare_out(out, overwrite)
    for folder in ("images", os.path.join("masks", "0"), "instances") if labeled else ("images",):
        os.makedirs(os.path.join(out, folder), exist_ok=True)
    for sample in tqdm(sorted(source.samples.items()), desc="preprocessing"):
        convert_sample(source, sample, out, size)
    return len(source.samples), labeled


def next_step(out, n, labeled):
    """What was written, and the command that uses it."""
    parent, name = os.path.split(os.path.normpath(out))
    if not labeled:
        return (f"no sample in the source has masks (the layout of the stage-1 test set): wrote {n} images only, "
                f"to {out}/images, for prediction: python val.py --name <run> --images {out}/images")
    where = "" if os.path.normpath(parent) == "inputs" else f" --data_dir {parent or '.'}"
    return (f"wrote {n} images to {out}/images, their masks to {out}/masks/0 and nucleus labels to {out}/instances; "
            f"train with: python train.py{where} --dataset {name}")


def main(argv=None):
    p = argparse.ArgumentParser(description="stage1_train (folder or zip) -> inputs/dsb2018_<size>/")
    p.add_argument("--src", default="inputs/stage1_train", help="stage1_train folder or zip (default: inputs/stage1_train)")
    p.add_argument("--size", type=int, default=96, help="output side in pixels (default: 96)")
    p.add_argument("--out", help="output folder (default: inputs/dsb2018_<size>)")
    p.add_argument("--overwrite", action="store_true", help="replace the data set already in --out")
    args = p.parse_args(argv)
    if args.size < 16:
        p.error("--size must be at least 16")
    out = args.out or os.path.join("inputs", f"dsb2018_{args.size}")
    with exit_on_user_error():
        n, labeled = convert(args.src, out, args.size, args.overwrite)
    print(next_step(out, n, labeled))


if __name__ == "__main__":
    main()
