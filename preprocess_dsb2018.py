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

import outputs
from imagefiles import check_png_size, png_decoded_bytes, png_dimensions
from utils import Interrupts, UserError, command, exit_on_user_error, process_alive, progress_bar, write_png

OUTPUT_FOLDERS = ("images", "masks", "instances")
MARKER = ".made_by_preprocess_dsb2018"   # in a data set this script wrote: --overwrite replaces only those
MAX_MEMBER_BYTES = 256 * 2**20       # a zip member declaring more is refused before it is read (stage1 PNGs: < 1 MB)
MAX_LABELS = 65535                   # nuclei in one sample that a 16-bit label image can number
# Memory one sample takes while it is converted, per pixel: of the source (decoded RGB image, uint16 labels, a
# decoded mask and its comparison, the float32 union) and of the output (resized image and its BGR copy, resized
# union, x255, uint8, resized labels, and the PNG encodings of each).
SOURCE_BYTES_PER_PIXEL, OUTPUT_BYTES_PER_PIXEL = 12, 16
DISK_MARGIN = 1.1                    # the data set's projected size, padded for the images larger than the first


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


UNREADABLE = (zipfile.BadZipFile, zlib.error, EOFError, OSError, NotImplementedError)   # a damaged file or member


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

    def dimensions(self, name):
        """(width, height) that a sample's PNG declares in its header, read without decoding it (and refused past
        imagefiles' limit); None for a file that is not a PNG (its decoding names it later)."""
        try:
            if self.zip:
                self.check_member(name)
                with self.zip.open(name) as f:
                    header = f.read(26)
            else:
                with open(os.path.join(self.root, name), "rb") as f:
                    header = f.read(26)
        except UNREADABLE as e:
            raise self.damaged(name, e) from None
        check_png_size(header, f"{name} in {self.root}")
        return png_dimensions(header) if png_decoded_bytes(header) is not None else None

    def damaged(self, name, e):
        return UserError(f"cannot read {name} from {self.root} ({e}); the download is damaged or incomplete: "
                         "download it again")

    def check_member(self, name):
        """What a zip member declares, checked before it is read: its size, and no encryption."""
        info = self.zip.getinfo(name)
        if info.flag_bits & 0x1:
            raise UserError(f"{name} in {self.root} is encrypted; unzip the archive with its password and pass the "
                            "unpacked folder to --src")
        if info.file_size > MAX_MEMBER_BYTES:
            raise UserError(f"{name} in {self.root} declares {info.file_size / 2**20:.0f} MB, more than any image of "
                            f"the set ({MAX_MEMBER_BYTES >> 20} MB at most); the archive is damaged or not stage1_train")

    def zip_member(self, name):
        """One member's bytes, after checking what it declares."""
        self.check_member(name)
        try:
            return self.zip.read(name)
        except UNREADABLE as e:
            raise self.damaged(name, e) from None


def open_zip(src):
    """A zip archive, or a UserError for a file that is not one (or is cut short: its index is at the end)."""
    try:
        return zipfile.ZipFile(src)
    except (zipfile.BadZipFile, OSError) as e:
        raise UserError(f"{src} is not a readable zip archive ({e}); if it is a download, it may be incomplete: "
                        "download it again, or pass the unpacked stage1_train folder to --src") from None


def prepare_out(out, overwrite):
    """--out guarded as every folder the toolkit writes (outputs.check_place), and a folder: a data set there is
    refused unless --overwrite and this script wrote it (its MARKER); then, once the new data set is complete, the
    folders this script writes - images/, masks/, instances/ - are replaced, and anything else stays."""
    path = os.path.abspath(out)
    while not os.path.lexists(path):
        path = os.path.dirname(path)
    if not os.path.isdir(path):
        what = "is a file" if path == os.path.abspath(out) else f"is inside {path}, which is a file"
        raise UserError(f"--out {out} {what}, not a folder; pass a folder (it is created if missing)")
    outputs.check_place(out, f"--out {out}", "preprocess_dsb2018.py", "Pass --out to a folder of its own (the default "
                        "is inputs/dsb2018_<size>)", own={out: "a data set"})
    present = [d for d in OUTPUT_FOLDERS if os.path.isdir(os.path.join(out, d)) and os.listdir(os.path.join(out, d))]
    if present and not os.path.isfile(os.path.join(out, MARKER)):
        raise UserError(f"--out {out} already holds {', '.join(d + '/' for d in present)} that this script did not "
                        "write; it never replaces a data set it did not write. Pass --out to another folder (or move "
                        "that data set away yourself)")
    if present and not overwrite:
        raise UserError(f"{out} already holds a data set ({', '.join(d + '/' for d in present)}); pass --overwrite "
                        "to replace it, or --out to write somewhere else")


def available_memory():
    """Bytes this process can still allocate before the kernel's out-of-memory killer ends it: Linux's MemAvailable,
    lowered to the room left under a cgroup (container, job scheduler) limit; None where neither can be read."""
    found = []
    try:
        with open("/proc/meminfo") as f:
            found += [int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:")]
    except (OSError, ValueError, IndexError):
        pass
    try:
        with open("/sys/fs/cgroup/memory.max") as f, open("/sys/fs/cgroup/memory.current") as g:
            limit = f.read().strip()
            if limit.isdigit():
                found.append(int(limit) - int(g.read().strip()))
    except (OSError, ValueError):
        pass
    return min(found) if found else None


def gib(n):
    return f"{n / 2**30:.1f} GiB"


def check_memory(source, size):
    """--size against the memory one sample takes, estimated from the largest image's header before anything is
    decoded (a 20-image zip at --size 60000 was killed by the kernel at 19 GB): a UserError naming --size and the
    figure when the machine has less available. -> {image name: output pixels}, for check_disk()."""
    sizes = {image: source.dimensions(image) for image, _ in source.samples.values()}
    sizes = {image: wh for image, wh in sizes.items() if wh is not None}
    if not sizes:
        return {}
    largest = max(sizes, key=lambda image: sizes[image][0] * sizes[image][1])
    width, height = sizes[largest]
    need = width * height * SOURCE_BYTES_PER_PIXEL + (size * size or width * height) * OUTPUT_BYTES_PER_PIXEL
    available = available_memory()
    if available is not None and need > available:
        side = f"at {size}x{size}" if size else f"at its own size, {width}x{height} ({largest})"
        raise UserError(f"--size {size}: converting one image {side} takes about {gib(need)} of memory (its masks "
                        f"and labels included), and this machine has {gib(available)} available; pass a smaller "
                        f"--size (the largest image here is {width}x{height}; the default is 96)")
    return {image: size * size or w * h for image, (w, h) in sizes.items()}


def check_disk(partial, first, out_pixels, size):
    """After the first sample: the data set's size projected from what its files took per pixel, against the free
    space; a UserError naming --size and both figures when it would not fit (before hours of writing)."""
    written = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(partial) for f in fs)
    if not out_pixels.get(first):
        return
    need = written / out_pixels[first] * sum(out_pixels.values()) * DISK_MARGIN
    free = shutil.disk_usage(partial).free + written
    if need > free:
        raise UserError(f"--size {size}: the data set would take about {gib(need)} on disk ({len(out_pixels)} images;"
                        f" the first one's files took {written / 2**20:.1f} MB), and {os.path.dirname(partial)} has "
                        f"{gib(free)} free; free space or pass a smaller --size")


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
    if len(mask_names) > MAX_LABELS:
        raise UserError(f"{os.path.dirname(mask_names[0])} in {source.root} holds {len(mask_names)} masks, more than "
                        f"a 16-bit label image numbers ({MAX_LABELS}); the archive is damaged or not stage1_train")
    labels = np.zeros(shape, np.uint16)
    for n, m in enumerate(sorted(mask_names), 1):
        mask = source.read(m, cv2.IMREAD_GRAYSCALE)
        if mask.shape != shape:
            raise UserError(f"{m} in {source.root} is {mask.shape[1]}x{mask.shape[0]} pixels, its image "
                            f"{shape[1]}x{shape[0]}; the archive is damaged or not stage1_train")
        labels[mask > 127] = n
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
    out_pixels = check_memory(source, size)          # before anything is decoded or written
    partial = partial_folder(out)
    try:
        for folder in ("images", os.path.join("masks", "0"), "instances") if labeled else ("images",):
            os.makedirs(os.path.join(partial, folder))
        with open(os.path.join(partial, MARKER), "w") as f:
            f.write("written by preprocess_dsb2018.py; --overwrite replaces it\n")
        for k, sample in enumerate(progress_bar(sorted(source.samples.items()), "preprocessing")):
            convert_sample(source, sample, partial, size)
            if k == 0:
                check_disk(partial, sample[1][0], out_pixels, size)
        publish(partial, out)
    except OSError as e:
        raise UserError(f"could not write the data set ({e.strerror or e}: {e.filename or out}); nothing was written "
                        f"to {out}. Free space or make the folder writable, then run the same command again") from None
    except MemoryError:
        raise UserError(f"--size {size}: the machine ran out of memory converting the images; nothing was written to "
                        f"{out}. Pass a smaller --size") from None
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
