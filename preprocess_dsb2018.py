"""Turn the 2018 Data Science Bowl stage1_train set (folder or zip) into inputs/dsb2018_<size>/.

    python preprocess_dsb2018.py --src stage1_train.zip            # -> inputs/dsb2018_96/
    python preprocess_dsb2018.py --src inputs/stage1_train --size 128

Each sample <id>/images/<id>.png becomes images/<id>.png (RGBA -> RGB, grayscale -> 3 channels,
resized), and the union of its <id>/masks/*.png becomes masks/0/<id>.png (resized bilinearly,
as the reference does, so edges carry in-between values; the toolkit thresholds at 127). The
nuclei themselves go to instances/<id>.png: a 16-bit label image (0 background, 1..N one per
nucleus), resized by nearest neighbour, for val.py --instances. A source without masks (the
stage-1 test set) is written as images only, for prediction.

The data set is written into a hidden folder beside --out and moved into place once complete, so
Ctrl-C, a kill or a full disk never leaves a half data set that train.py would take for a whole one.
"""
import signal
import sys

if __name__ == "__main__":   # Ctrl-C or SIGTERM while the imports below load (seconds: torch) ends quietly
    signal.signal(signal.SIGINT, lambda *_: sys.exit(130))
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(130))

import argparse
import os
import shutil
import zipfile
import zlib

import cv2
import numpy as np

from imagefiles import check_png_size
from pairing import missing_reason
from utils import Interrupts, UserError, command, exit_on_user_error, process_alive, progress_bar, write_png

OUTPUT_FOLDERS = ("images", "masks", "instances")
MAX_MEMBER_BYTES = 256 * 2**20       # a zip member declaring more is refused before it is read (stage1 PNGs: < 1 MB)


def sample_files(names):
    """{id: [image name or None, [mask names]]} from the archive's file names (<top>/<id>/images|masks/<x>.png).
    macOS's __MACOSX/ copies and hidden files (._x.png) are skipped; one id in two places is a UserError."""
    samples, where = {}, {}
    for name in names:
        parts = name.split("/")
        if "__MACOSX" in parts or any(p.startswith(".") for p in parts) or len(parts) < 3 \
                or not parts[-1].lower().endswith(".png") or parts[-2] not in ("images", "masks"):
            continue
        sample_id, place = parts[-3], "/".join(parts[:-2])
        if where.setdefault(sample_id, place) != place:
            first, second = sorted((where[sample_id], place))
            raise UserError(f"the sample id {sample_id} is in two places, {first}/ and {second}/; their "
                            "masks would be merged into one. Keep one copy of the sample and pass that source")
        entry = samples.setdefault(sample_id, [None, []])   # [image, masks]
        if parts[-2] == "images":
            entry[0] = name
        else:
            entry[1].append(name)
    return {k: v for k, v in samples.items() if v[0] is not None}


class Source:
    """Read-only access to stage1_train as a folder or a zip: samples -> {id: [image name, [mask names]]}."""

    def __init__(self, src):
        if not os.path.exists(src):
            raise UserError(f"{src} does not exist; download stage1_train.zip from the 2018 Data Science Bowl "
                            "and pass its path (the zip or the unpacked folder) to --src")
        self.root, self.zip = src, None
        if os.path.isdir(src):
            names = [os.path.relpath(os.path.join(d, f), src).replace(os.sep, "/")
                     for d, _, fs in os.walk(src) for f in fs]
        else:
            self.zip = open_zip(src)
            names = self.zip.namelist()
        self.samples = sample_files(names)
        if not self.samples:
            raise UserError(f"no <id>/images/<id>.png found in {src}; is it the stage1_train set?")

    def read(self, name, flags):
        data = self.zip_member(name) if self.zip else open(os.path.join(self.root, name), "rb").read()
        check_png_size(data[:26], f"{name} in {self.root}")
        img = cv2.imdecode(np.frombuffer(data, np.uint8), flags)
        if img is None:
            raise UserError(f"cannot decode {name} in {self.root}; the download may be damaged")
        return img

    def zip_member(self, name):
        """One member's bytes, after checking what it declares: its size, and no encryption."""
        info = self.zip.getinfo(name)
        if info.flag_bits & 0x1:
            raise UserError(f"{name} in {self.root} is encrypted; unzip the archive with its password and pass the "
                            "unpacked folder to --src")
        if info.file_size > MAX_MEMBER_BYTES:
            raise UserError(f"{name} in {self.root} declares {info.file_size / 2**20:.0f} MB, more than any image of "
                            f"the set ({MAX_MEMBER_BYTES >> 20} MB at most); the archive is damaged or not stage1_train")
        try:
            return self.zip.read(name)
        except (zipfile.BadZipFile, zlib.error, EOFError, OSError, NotImplementedError) as e:
            raise UserError(f"cannot read {name} from {self.root} ({e}); the download is damaged or incomplete: "
                            "download it again") from None


def open_zip(src):
    """A zip archive, or a UserError for a file that is not one (or is cut short: its index is at the end)."""
    try:
        return zipfile.ZipFile(src)
    except (zipfile.BadZipFile, OSError) as e:
        raise UserError(f"{src} is not a readable zip archive ({e}); if it is a download, it may be incomplete: "
                        "download it again, or pass the unpacked stage1_train folder to --src") from None


def prepare_out(out, overwrite):
    """Refuses to write into a folder that already holds files, unless --overwrite (then, once the new data set is
    complete, the folders this script writes - images/, masks/, instances/ - are replaced; anything else stays)."""
    if not os.path.isdir(out) and missing_reason(out) != "does not exist":     # a file where a folder goes
        raise UserError(f"--out {out} {missing_reason(out)}; pass a folder (it is created if missing)")
    present = [d for d in OUTPUT_FOLDERS if os.path.isdir(os.path.join(out, d)) and os.listdir(os.path.join(out, d))]
    if present and not overwrite:
        raise UserError(f"{out} already holds a data set ({', '.join(d + '/' for d in present)}); pass --overwrite "
                        "to replace it, or --out to write somewhere else")


def partial_folder(out):
    """Where the data set is written until it is complete: a hidden folder beside --out, named for this process.
    Those left by a process that was killed are removed (this script made them)."""
    parent, name = os.path.split(os.path.abspath(out))
    prefix = f".{name}.partial-"
    for f in os.listdir(parent) if os.path.isdir(parent) else []:
        pid = f[len(prefix):]
        if f.startswith(prefix) and pid.isdigit() and not process_alive(int(pid)):
            shutil.rmtree(os.path.join(parent, f), ignore_errors=True)
    return os.path.join(parent, prefix + str(os.getpid()))


def publish(partial, out):
    """Moves the complete data set from `partial` into place: a rename when --out does not exist yet; otherwise
    each of its folders replaces the one of the same name (anything else in --out stays)."""
    if not os.path.exists(out):
        os.rename(partial, out)
        return
    for d in os.listdir(partial):
        if os.path.isdir(os.path.join(out, d)):
            shutil.rmtree(os.path.join(out, d))
        os.rename(os.path.join(partial, d), os.path.join(out, d))
    os.rmdir(partial)


def instance_labels(source, mask_names, shape):
    """The sample's nucleus masks -> a uint16 label image: 0 background, 1..N one per nucleus (file name order)."""
    labels = np.zeros(shape, np.uint16)
    for n, m in enumerate(sorted(mask_names), 1):
        labels[source.read(m, cv2.IMREAD_GRAYSCALE) > 127] = n
    return labels


def convert_sample(source, sample, out, size):
    """One sample: images/<id>.png, and if it has nucleus masks, masks/0/<id>.png (their union, resized
    bilinearly as the reference does) and instances/<id>.png (16-bit labels, resized by nearest neighbour).
    size 0: every file at the image's own size (full resolution, for --crop training and tiled prediction)."""
    sample_id, (image_name, mask_names) = sample
    img = source.read(image_name, cv2.IMREAD_UNCHANGED)
    if img.ndim == 2:
        img = np.repeat(img[:, :, None], 3, axis=2)
    img = img[:, :, :3]                                          # drop alpha
    side = (img.shape[1], img.shape[0]) if size == 0 else (size, size)
    write_png(os.path.join(out, "images", sample_id + ".png"), img if size == 0 else cv2.resize(img, side))
    if not mask_names:
        return
    labels = instance_labels(source, mask_names, img.shape[:2])
    union = (labels > 0).astype(np.float32)
    write_png(os.path.join(out, "masks", "0", sample_id + ".png"), (cv2.resize(union, side) * 255).astype(np.uint8))
    write_png(os.path.join(out, "instances", sample_id + ".png"),
              cv2.resize(labels, side, interpolation=cv2.INTER_NEAREST_EXACT))


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
    partial = partial_folder(out)
    try:
        for folder in ("images", os.path.join("masks", "0"), "instances") if labeled else ("images",):
            os.makedirs(os.path.join(partial, folder))
        for sample in progress_bar(sorted(source.samples.items()), "preprocessing"):
            convert_sample(source, sample, partial, size)
        publish(partial, out)
    except OSError as e:
        raise UserError(f"could not write the data set ({e.strerror or e}: {e.filename or out}); nothing was written "
                        f"to {out}. Free space or make the folder writable, then run the same command again") from None
    finally:
        shutil.rmtree(partial, ignore_errors=True)      # gone after publish; what a failure or Ctrl-C left
    return len(source.samples), labeled


def next_step(out, n, labeled):
    """What was written, and the command that uses it."""
    parent, name = os.path.split(os.path.normpath(out))
    if not labeled:
        return (f"no sample in the source has masks (the layout of the stage-1 test set): wrote {n} images only, "
                f"to {out}/images, for prediction: python val.py --name <run> "
                f"{command('--images', os.path.join(out, 'images'))}")
    where = [] if os.path.normpath(parent) == "inputs" else ["--data_dir", parent or "."]
    return (f"wrote {n} images to {out}/images, their masks to {out}/masks/0 and nucleus labels to {out}/instances; "
            f"train with: {command('python', 'train.py', *where, '--dataset', name)}")


def main(argv=None):
    p = argparse.ArgumentParser(description="stage1_train (folder or zip) -> inputs/dsb2018_<size>/")
    p.add_argument("--src", default="inputs/stage1_train", help="stage1_train folder or zip (default: inputs/stage1_train)")
    p.add_argument("--size", type=int, default=96, help="output side in pixels (default: 96); 0 keeps each image's "
                   "own size (full resolution: train with --crop, val.py predicts by tiles)")
    p.add_argument("--out", help="output folder (default: inputs/dsb2018_<size>, inputs/dsb2018_full for --size 0)")
    p.add_argument("--overwrite", action="store_true", help="replace the data set already in --out")
    args = p.parse_args(argv)
    if 0 < args.size < 16 or args.size < 0:
        p.error("--size must be at least 16, or 0 for full resolution")
    out = args.out or os.path.join("inputs", f"dsb2018_{args.size or 'full'}")
    Interrupts().install()        # SIGTERM as Ctrl-C: the partial output is removed, exit 130
    try:
        with exit_on_user_error():
            n, labeled = convert(args.src, out, args.size, args.overwrite)
    except KeyboardInterrupt:
        print(f"\ninterrupted: nothing was written to {out}; run the same command again", file=sys.stderr)
        sys.exit(130)
    print(next_step(out, n, labeled))


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.default_int_handler)   # from here on, main() handles Ctrl-C and SIGTERM
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    main()
