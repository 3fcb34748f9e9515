"""Turn the 2018 Data Science Bowl stage1_train set (folder or zip) into inputs/dsb2018_<size>/.

    python preprocess_dsb2018.py --src stage1_train.zip            # -> inputs/dsb2018_96/
    python preprocess_dsb2018.py --src inputs/stage1_train --size 128

Each sample <id>/images/<id>.png becomes images/<id>.png (RGBA -> RGB, grayscale -> 3 channels,
resized), and the union of its <id>/masks/*.png becomes masks/0/<id>.png (resized bilinearly,
as the reference does, so edges carry in-between values; the toolkit thresholds at 127).
"""
import argparse
import os
import zipfile

import cv2
import numpy as np
from tqdm import tqdm

from utils import UserError, exit_on_user_error, write_png


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


def convert(src, out, size):
    source = Source(src)
    os.makedirs(os.path.join(out, "images"), exist_ok=True)
    os.makedirs(os.path.join(out, "masks", "0"), exist_ok=True)
    for sample_id, (image_name, mask_names) in tqdm(sorted(source.samples.items()), desc="preprocessing"):
        img = source.read(image_name, cv2.IMREAD_UNCHANGED)
        if img.ndim == 2:
            img = np.repeat(img[:, :, None], 3, axis=2)
        img = img[:, :, :3]                                          # drop alpha
        mask = np.zeros(img.shape[:2], np.float32)
        for m in mask_names:
            mask[source.read(m, cv2.IMREAD_GRAYSCALE) > 127] = 1
        write_png(os.path.join(out, "images", sample_id + ".png"), cv2.resize(img, (size, size)))
        write_png(os.path.join(out, "masks", "0", sample_id + ".png"),
                  (cv2.resize(mask, (size, size)) * 255).astype(np.uint8))
    return len(source.samples)


def main(argv=None):
    p = argparse.ArgumentParser(description="stage1_train (folder or zip) -> inputs/dsb2018_<size>/")
    p.add_argument("--src", default="inputs/stage1_train", help="stage1_train folder or zip (default: inputs/stage1_train)")
    p.add_argument("--size", type=int, default=96, help="output side in pixels (default: 96)")
    p.add_argument("--out", help="output folder (default: inputs/dsb2018_<size>)")
    args = p.parse_args(argv)
    out = args.out or os.path.join("inputs", f"dsb2018_{args.size}")
    with exit_on_user_error():
        n = convert(args.src, out, args.size)
    print(f"wrote {n} images to {out}/images and masks to {out}/masks/0; train with: "
          f"python train.py --dataset {os.path.basename(out)}")


if __name__ == "__main__":
    main()
