"""Reading one image, mask or label file: decoding, its type and channels, and the checks that name the file.

Images are 8- or 16-bit PNG or TIFF, float32 TIFF or JPEG, with any number of channels (TIFF through tifffile),
returned in their own type (uint8, uint16 or float32: nothing is rounded to 8 bits). Masks are 8- or 16-bit single
channel, 0/255 (or 0/1); label images are integers, 0 the background and 1..N one number per object. Every problem
is a DataError that names the file (dataerror.py); which files make a data set is pairing.py's job.
"""
import os

import cv2
import numpy as np

from dataerror import DataError

TIFF_EXTS = (".tif", ".tiff")             # one extension for matching: --img_ext .tif finds .tiff and .TIF too
MAX_IMAGE_BYTES = 2 * 2**30               # a file whose pixels would take more is refused before it is decoded
IMAGE_TYPES = (np.uint8, np.uint16, np.float32)   # kept as they are; other integer and float types -> float32


def is_tiff(path):
    return os.path.splitext(path)[1].lower() in TIFF_EXTS


def unreadable(path, why="it is empty, truncated or not an image"):
    return DataError(f"cannot read image file {path}: {why}. Replace it or remove it (and its mask) from the data set.",
                     path=path)


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PNG_CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}     # by the colour type in the PNG header


def png_dimensions(header):
    """(width, height) from a PNG's IHDR (bytes 16-24 of the file)."""
    return int.from_bytes(header[16:20], "big"), int.from_bytes(header[20:24], "big")


def png_decoded_bytes(header):
    """The first 26 bytes of a PNG -> the bytes its pixels take decoded (from the header, before decoding), or None
    if they are not a PNG's. A few kilobytes of PNG can declare gigabytes of pixels."""
    if len(header) < 26 or not header.startswith(PNG_SIGNATURE) or header[12:16] != b"IHDR":
        return None
    width, height = png_dimensions(header)
    return width * height * PNG_CHANNELS.get(header[25], 4) * (2 if header[24] == 16 else 1)


def check_png_size(header, name):
    """A DataError for a PNG whose declared pixels would take more than MAX_IMAGE_BYTES decoded."""
    size = png_decoded_bytes(header)
    if size is not None:
        check_declared(name, *png_dimensions(header), size)


def check_declared(name, width, height, size):
    if size > MAX_IMAGE_BYTES:
        raise DataError(f"{name} declares {width}x{height} pixels ({size / 2**30:.1f} GiB decoded), more than "
                        f"{MAX_IMAGE_BYTES >> 30} GiB; this toolkit takes 2D images that fit in memory: crop or tile it "
                        "first (or replace the file if it is damaged)", path=name)


# A JPEG's start-of-frame markers (0xC0..0xCF, less the table markers among them), and those without a length
JPEG_FRAMES = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
JPEG_STANDALONE = frozenset(range(0xD0, 0xD9)) | {0x01}


def jpeg_dimensions(f):
    """(width, height, components) from a JPEG's frame header, found by walking its segments from the start and
    seeking past each (an EXIF block or padding does not hide it); None for a file that is not a JPEG or has none."""
    if f.read(2) != b"\xff\xd8":
        return None
    while True:
        marker = f.read(2)
        if len(marker) < 2 or marker[0] != 0xFF or marker[1] == 0xDA:      # not a marker, or the image data begins
            return None
        if marker[1] == 0xFF:                                              # a fill byte: the marker is the next one
            f.seek(-1, os.SEEK_CUR)
            continue
        if marker[1] in JPEG_STANDALONE:
            continue
        segment = f.read(8)                   # length (2), then in a frame: precision, height (2), width (2), components
        length = int.from_bytes(segment[:2], "big")
        if len(segment) < 8 or length < 2:
            return None
        if marker[1] in JPEG_FRAMES:
            return int.from_bytes(segment[5:7], "big"), int.from_bytes(segment[3:5], "big"), segment[7]
        f.seek(length - 8, os.SEEK_CUR)


def check_header(path):
    """A DataError for a PNG, JPEG or BMP whose header declares more than MAX_IMAGE_BYTES of pixels, before OpenCV
    decodes it (631 bytes of JPEG declaring 30000x30000 pixels took 31 s and 6.5 GB); OpenCV refuses more than
    2**30 pixels in any other format itself."""
    with open(path, "rb") as f:
        header = f.read(30)
        check_png_size(header[:26], path)
        if header.startswith(b"BM") and len(header) >= 30:            # BMP: width, height (negative: top-down), bits
            width, height = int.from_bytes(header[18:22], "little", signed=True), \
                abs(int.from_bytes(header[22:26], "little", signed=True))
            check_declared(path, width, height, abs(width) * height * 4)
        f.seek(0)
        frame = jpeg_dimensions(f)
        if frame:
            check_declared(path, frame[0], frame[1], frame[0] * frame[1] * max(frame[2], 1))


def decode(path):
    """An image file -> array (H, W) or (H, W, C), colour channels in RGB order, alpha dropped; TIFF through tifffile,
    the rest through OpenCV (JPEGs turned as their EXIF orientation says). An unreadable file is a DataError."""
    if not os.path.isfile(path):
        raise unreadable(path, "it is not a file (a folder or a broken link)")
    if os.path.getsize(path) == 0:
        raise unreadable(path, "it is empty")
    if is_tiff(path):
        return read_tiff(path)
    check_header(path)
    try:
        if os.path.splitext(path)[1].lower() in (".jpg", ".jpeg"):
            img = cv2.imread(path, cv2.IMREAD_ANYCOLOR | cv2.IMREAD_ANYDEPTH)      # applies the EXIF orientation
        else:
            img = cv2.imread(path, cv2.IMREAD_UNCHANGED)
    except cv2.error as e:              # e.g. more than OpenCV's 2**30 pixels
        raise unreadable(path, f"OpenCV could not read it ({str(e).strip().splitlines()[-1][:200]})") from None
    if img is None:
        raise unreadable(path)
    if img.ndim == 3 and img.shape[2] == 4:
        img = cv2.cvtColor(img, cv2.COLOR_BGRA2RGB)                           # alpha dropped
    elif img.ndim == 3 and img.shape[2] == 3:
        img = cv2.cvtColor(img, cv2.COLOR_BGR2RGB)
    return img


def read_tiff(path):
    """A 2D TIFF -> (H, W) or (H, W, C). Channels are the axes the file names as such (S: samples such as RGB, C:
    channels as Fiji/ImageJ and OME write them); a stack (Z, T) or an axis the file does not name is refused with
    its shape and axes, because this toolkit segments 2D images and guessing would train on the wrong thing."""
    import tifffile    # here: PNG-only data sets never import it
    try:
        with open(path, "rb") as f, tifffile.TiffFile(f) as tif:
            if len(tif.pages) == 1:           # the common case, read without building the series (faster)
                page = tif.pages.first
                axes, shape, dtype, photometric, read = page.axes, page.shape, page.dtype, page.photometric, page.asarray
            else:
                if len(tif.series) > 1:
                    raise DataError(f"{path} holds {len(tif.series)} images of shapes "
                                    f"{', '.join(str(s.shape) for s in tif.series)}; save each as its own file",
                                    path=path)
                series = tif.series[0]
                axes, shape, dtype, read = series.axes, series.shape, series.dtype, series.asarray
                photometric = tif.pages.first.photometric
            if int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize > MAX_IMAGE_BYTES:
                raise DataError(f"{path} declares {shape} pixels of {dtype}, more than {MAX_IMAGE_BYTES >> 30} GiB "
                                "decoded; this toolkit takes 2D images that fit in memory: crop or tile it first",
                                path=path)
            data = tiff_layout(path, axes, shape)
            img = read()
    except DataError:
        raise
    except Exception as e:   # tifffile raises TiffFileError, ValueError, struct.error, ... on a damaged file
        raise unreadable(path, f"tifffile could not read it ({type(e).__name__}: {str(e)[:200]})") from None
    img = img.reshape(shape)
    if data["channel_axis"] is not None:
        img = np.moveaxis(img, data["channel_axis"], -1)
    if img.ndim == 3 and img.shape[2] == 4 and str(photometric).endswith("RGB"):
        img = img[:, :, :3]                                                   # RGBA: alpha dropped
    return np.ascontiguousarray(img)


def tiff_layout(path, axes, shape):
    """{'channel_axis': the index of the channel axis or None} for a TIFF with these axes (tifffile's letters, with
    singleton axes already dropped); anything but YX plus at most one channel axis is a DataError."""
    axes = axes.upper()
    extra = [a for a in axes if a not in "YX"]
    if "Y" in axes and "X" in axes and not extra:
        return {"channel_axis": None}
    if "Y" in axes and "X" in axes and len(extra) == 1 and extra[0] in "SC":
        return {"channel_axis": axes.index(extra[0])}
    names = {"Z": "depth (a Z stack)", "T": "time (a time series)", "Q": "an axis the file does not name",
             "I": "an axis the file does not name (several pages)", "C": "channels", "S": "samples (channels)"}
    said = ", ".join(f"{a} {n}: {names.get(a, 'another axis')}" for a, n in zip(axes, shape) if a not in "YX")
    raise DataError(
        f"{path} is not a 2D image: its shape is {tuple(shape)} with axes {axes} ({said}). This toolkit segments 2D "
        "images with channels. Save each plane as its own 2D file (e.g. tifffile.imwrite(f'{id}_z{k}.tif', "
        "stack[k])) or a projection (stack.max(axis=0)); if the extra axis is channels, save it with its axes named, "
        "e.g. tifffile.imwrite(path, image, imagej=True, metadata={'axes': 'CYX'}) for an image of shape (C, H, W), "
        "as Fiji writes a multi-channel image", path=path)


def image_type(img, path):
    """An image's pixels in a type the toolkit keeps: uint8, uint16 and float32 as they are; other integers and
    floats as float32 (exact for int16, float16); complex, bool or non-finite floats are refused."""
    if img.dtype.type in IMAGE_TYPES:
        out = img
    elif img.dtype.kind in "uif":
        out = img.astype(np.float32)
    else:
        raise DataError(f"image {path} has pixels of type {img.dtype}; images must be 8- or 16-bit integers or "
                        "float32", path=path)
    if out.dtype.kind == "f" and not np.isfinite(out).all():
        raise DataError(f"image {path} holds NaN or infinite values; replace them (e.g. np.nan_to_num) first",
                        path=path)
    return out


def read_image(path, input_channels):
    """An image file -> (H, W, input_channels) in its own type (uint8, uint16 or float32), RGB order, alpha dropped.
    Grayscale is replicated for an RGB run, and an RGB file whose channels are equal is grayscale for a 1-channel run;
    any other channel count must equal input_channels."""
    img = image_type(decode(path), path)
    if img.ndim == 2:
        img = img[:, :, None]
    channels = img.shape[2]
    if channels == input_channels:
        return np.ascontiguousarray(img)
    if input_channels == 3 and channels == 1:
        return np.repeat(img, 3, axis=2)                      # grayscale replicated
    if input_channels == 1 and channels == 3:
        if (img[:, :, 0] == img[:, :, 1]).all() and (img[:, :, 1] == img[:, :, 2]).all():
            return np.ascontiguousarray(img[:, :, :1])        # grayscale stored as RGB
        raise DataError(f"image {path} is in colour but input_channels is 1", setting="input_channels", path=path,
                        found=3, around=(": ", ""))
    raise DataError(f"image {path} has {channels} channel(s) but input_channels is {input_channels}",
                    setting="input_channels", path=path, found=channels, around=(": ", ""))


def read_mask(path):
    """An 8- or 16-bit single-channel mask file -> (H, W) with its raw values."""
    m = decode(path)
    if m.dtype not in (np.uint8, np.uint16):
        raise DataError(f"mask {path} is {m.dtype}; masks must be 8- or 16-bit single-channel images with foreground "
                        "> 127 (8-bit) or > 32767 (16-bit), or 0/1. Convert it (e.g. (mask > 0) * 255 as uint8).",
                        path=path)
    if m.ndim == 3 and not is_tiff(path) and is_palette_png(path):
        raise DataError(f"mask {path} is a palette (indexed-colour) PNG; masks must be 8-bit grayscale with "
                        "foreground > 127. Save it as grayscale, one mask per class (e.g. with PIL: "
                        "Image.fromarray(((np.array(Image.open(p)) == k) * 255).astype('uint8')) for class k).",
                        path=path)
    if m.ndim == 3:
        raise DataError(f"mask {path} has {m.shape[2]} channels; masks must be single-channel (grayscale) with "
                        "foreground > 127. Save it as grayscale.", path=path)
    return m


def read_labels(path, size):
    """A label image (integer, single channel, 0 background, one number per object) of size (H, W) -> int64 labels
    renumbered 1..N (0 stays the background)."""
    labels = checked_labels(path, size)
    _, inverse = np.unique(labels, return_inverse=True)
    renumbered = inverse.reshape(labels.shape).astype(np.int64)
    return renumbered if labels.min() == 0 else renumbered + 1     # keep 0 as the background


def checked_labels(path, size):
    """A label image of size (H, W) as stored, after every check (integer, one channel, size, not negative)."""
    labels = decode(path)
    where = f"label image {path}"
    if labels.dtype.kind not in "ui" or labels.dtype.itemsize > 8:
        raise DataError(f"{where} is {labels.dtype}; label images must hold whole numbers (8-, 16- or 32-bit "
                        "integers: 0 background, 1..N one per object). Save it as an integer image, e.g. "
                        "tifffile.imwrite(path, labels.astype('uint16')) after rounding", path=path)
    if labels.ndim != 2:
        raise DataError(f"{where} has {labels.shape[2]} channels; label images must be single-channel (0 background, "
                        "1..N one number per object), not colour: save the label layer itself (napari: "
                        "File > Save Selected Layer; Fiji: Image > Type > 16-bit)", path=path)
    if labels.shape != tuple(size):
        raise DataError(f"{where} is {labels.shape[1]}x{labels.shape[0]} but its image is {size[1]}x{size[0]}; "
                        "labels must match their image's size", path=path)
    if labels.dtype.kind == "i" and labels.min() < 0:
        raise DataError(f"{where} holds negative values; labels are 0 (background) and 1..N (one per object)",
                        path=path)
    return labels


read_instances = read_labels   # the name val.py --instances used first


def is_palette_png(path):
    """Whether the file is a PNG whose colour type (byte 25 of its IHDR) is 3: indexed colour with a palette."""
    with open(path, "rb") as f:
        head = f.read(26)
    return head.startswith(PNG_SIGNATURE) and len(head) == 26 and head[25] == 3


def binarize_mask(m, path):
    """Raw 8- or 16-bit mask -> (0/1 uint8 mask, whether it was stored as 0/1). Decided per mask: foreground is above
    half the type's range (> 127 for 8-bit; > 32767 for 16-bit, or > 127 in a 16-bit mask whose values stay within
    0..255), or 1 in a mask that holds only 0 and 1; a mask whose largest value is 2..half would read as empty: refused."""
    top = int(m.max())
    if top <= 1:
        return m.astype(np.uint8), top == 1
    half = 127 if m.dtype == np.uint8 or top <= 255 else 32767
    if top <= half:
        raise DataError(f"mask {path} has no value above {half} (its largest is {top}), so it would be read as empty. "
                        f"Masks mark foreground with values > {half} (e.g. {2 * half + 1}) or hold only 0 and 1; values "
                        "such as 1, 2, 3 look like labels: put label images (one number per object) in labels/, or "
                        "one 0/255 mask per class in masks/<class>/.", path=path)
    return (m > half).astype(np.uint8), False


def read_masks(mask_paths, img_path, size):
    """[mask path per class] of the image img_path of size (H, W) -> (0/1 uint8 (H, W, C), whether any was
    stored as 0/1)."""
    planes = []
    for p in mask_paths:
        m = read_mask(p)
        if m.shape != size:
            raise DataError(f"mask {p} is {m.shape[1]}x{m.shape[0]} but its image {img_path} is "
                            f"{size[1]}x{size[0]}; masks must match their image's size", path=p)
        planes.append(binarize_mask(m, p))
    return np.stack([m for m, _ in planes], axis=2), any(zero_one for _, zero_one in planes)


