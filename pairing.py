"""Finding a data set's files and pairing them: images, masks per class, label images -> {id: Sample}.

Layout (as in the reference, plus label images):
    <root>/images/<id><img_ext>
    <root>/masks/<class>/<id><mask_ext>      class = 0 .. num_classes-1
    <root>/masks/names.txt                   optional: the classes' names, one a line in class order (line 1 names
                                             masks/0), used as class_names when the run is not given them
    <root>/labels/<id>.png|.tif|.tiff        label images (0 background, 1..N one number per object), as
                                             napari, Cellpose or StarDist write them: the target when there
                                             is no masks/ (foreground = label > 0), and the objects of
                                             val.py --instances (instances/ is the older name for the same);
                                             with --target objects the only target (objects and their borders)

Extensions match whatever their case, and .tif and .tiff are one. Nothing is decoded here (imagefiles.py reads the
files). A problem a setting fixes is a DataError naming that setting (dataerror.py).
"""
import os
from dataclasses import dataclass, field

from dataerror import DataError
from imagefiles import TIFF_EXTS

MAX_LISTED = 10                           # file names shown in one error message
LABEL_EXTS = (".png", ".tif", ".tiff")    # label images, whatever --mask_ext says
LABEL_FOLDERS = ("labels", "instances")   # the label-image folder; instances/ is its older name
IMAGE_EXTS = (".png", ".tif", ".tiff", ".jpg", ".jpeg", ".bmp")   # what a folder's one image type may be
NAMES_FILE = "names.txt"                  # masks/names.txt: the classes' names, one a line, in class order
NAMES_MAX_BYTES = 64 * 1024               # a names file larger than this is not a names file


def listing(names):
    """'a, b, c' with at most MAX_LISTED names, then '... and N more'."""
    names = sorted(names)
    shown = ", ".join(names[:MAX_LISTED])
    return shown + (f" ... and {len(names) - MAX_LISTED} more" if len(names) > MAX_LISTED else "")


def ext_family(ext):
    """The extensions that `ext` stands for, lower case: ('.tif', '.tiff') for either, else (ext,)."""
    ext = ext.lower()
    return TIFF_EXTS if ext in TIFF_EXTS else (ext,)


def split_ext(name, exts):
    """'a.TIF', ('.tif', '.tiff') -> 'a'; None if the name does not end in one of exts (any case)."""
    low = name.lower()
    for e in sorted(exts, key=len, reverse=True):
        if low.endswith(e) and len(name) > len(e):
            return name[: -len(e)]
    return None


def single_image_type(folder):
    """The extension of the files in `folder` when they are all images of one type (.tif and .tiff count as one,
    in any case), else None (also when the folder is missing or empty): a default a user need not type."""
    try:
        names = [f for f in os.listdir(folder) if not f.startswith(".")]
    except OSError:
        return None
    exts = {os.path.splitext(f)[1].lower() for f in names}
    families = {ext_family(e) for e in exts}
    if len(families) != 1 or not exts <= set(IMAGE_EXTS):
        return None
    return sorted(exts)[0]


def find_files(folder, exts, what):
    """{id: file name} of the files in `folder` ending in one of exts (any case); two files with one id (a.tif and
    a.TIFF) are a DataError. Hidden files are skipped; folders and broken links named like files are refused."""
    found = {}
    for f in sorted(os.listdir(folder)):
        i = split_ext(f, exts) if not f.startswith(".") else None
        if i is None:
            continue
        path = os.path.join(folder, f)
        if not os.path.isfile(path):
            kind = "a broken link" if os.path.islink(path) else "a folder"
            raise DataError(f"{path} is {kind}, not a file; {what} must be files. Remove or rename it.", path=path)
        if i in found:
            raise DataError(f"{folder} holds two files for the id '{i}' ({found[i]} and {f}); keep one of them",
                            path=folder)
        found[i] = f
    return found


def find_ids(folder, ext, *, ext_key="img_ext"):
    """{id: file name} (ids sorted) of the files ending in `ext` in `folder`; an empty or wrong-extension folder is
    a DataError. ext_key: the setting `ext` came from (img_ext or mask_ext), which the message suggests changing."""
    what = "masks" if ext_key == "mask_ext" else "images"
    if not os.path.isdir(folder):
        reason = "is a file, not a folder" if os.path.exists(folder) else "does not exist"
        raise DataError(f"folder {folder} {reason}", setting="data", path=folder,
                        around=(f"; put your {what} there, or ", ""))
    if not ext.startswith(".") or ext == ".":
        bare = ext.strip(".")
        found = sorted({os.path.splitext(f)[1] for f in os.listdir(folder) if os.path.splitext(f)[1]})
        suggestion = "." + bare if bare else (found[0] if found else ".png")
        problem = "has no leading dot" if bare else "is empty"
        raise DataError(f"the extension '{ext}' {problem}", setting=ext_key, path=folder, found=suggestion)
    ids = find_files(folder, ext_family(ext), what)
    if ids:
        return ids
    entries = [f for f in os.listdir(folder) if not f.startswith(".")]
    if not entries:
        raise DataError(f"No input file found in {folder}, make sure you put your {what} there", path=folder)
    files = [f for f in entries if os.path.isfile(os.path.join(folder, f))]
    found = sorted({os.path.splitext(f)[1] for f in files if os.path.splitext(f)[1]})
    if not found:        # no extension to suggest: folders (a data set's images/, masks/), or files without one
        held = (f"only folders ({listing(entries)})" if not files else
                f"{len(files)} file(s) without an extension ({listing(files)}), which --{ext_key} cannot choose")
        here = f"; for a data set's images, give its images/ folder ({os.path.join(folder, 'images')})" \
            if "images" in entries and not files else ""
        raise DataError(f"no file ending in '{ext}' in {folder}: it holds {held}; the {what} must be files directly "
                        f"inside it, named <id>{ext}{here}", path=folder)
    raise DataError(f"no file ending in '{ext}' in {folder} (it holds files ending in {', '.join(found)})",
                    setting=ext_key, path=folder, found=found[0],
                    around=("; ", f" if that is the extension of your {what}"))


@dataclass
class Sample:
    """One image's files: the image, its mask per class ([] when the label image is the target), its label image
    (labels/ or instances/; None if the data set has none)."""
    image: str
    masks: list = field(default_factory=list)
    labels: str = None


def class_folders(mask_root, num_classes):
    """Checks masks/0 .. masks/<num_classes-1> exist and no other class folder does."""
    if not os.path.isdir(mask_root):
        raise DataError(f"mask folder {mask_root} does not exist; put each class's masks in "
                        f"{mask_root}/<class>/ (class 0 .. num_classes-1), named like the images, or label images "
                        f"(0 background, 1..N one per object) in {os.path.join(os.path.dirname(mask_root), 'labels')}/",
                        path=mask_root)
    present = sorted((d for d in os.listdir(mask_root)   # hidden folders (.ipynb_checkpoints...) are not classes
                      if os.path.isdir(os.path.join(mask_root, d)) and not d.startswith(".")),
                     key=lambda d: (not d.isdigit(), int(d) if d.isdigit() else 0, d))   # 2 before 10
    expected = [str(c) for c in range(num_classes)]
    if present != expected:
        fact = (f"{mask_root} holds class folders [{', '.join(present)}] but num_classes {num_classes} "
                f"expects [{', '.join(expected)}]")
        if present == [str(c) for c in range(len(present))] and present:     # numbered: num_classes is the fix
            raise DataError(fact, setting="num_classes", path=mask_root, found=len(present))
        raise DataError(f"{fact}; name the class folders 0, 1, 2, ... (one per class)", path=mask_root)
    return [os.path.join(mask_root, c) for c in expected]


def class_names_file(root):
    """The class names that <root>/masks/names.txt gives -> (names, its path), or ([], None) without one. One name
    a line, in the order of masks/0, masks/1, ...; spaces around a name and empty lines at the end are dropped.
    A names file that is not one name per class folder (or not UTF-8 text, or a name twice, an empty line, a comma
    in a name) is a DataError naming the file and the line."""
    path = os.path.join(root, "masks", NAMES_FILE)
    if not os.path.isfile(path):
        return [], None
    if os.path.getsize(path) > NAMES_MAX_BYTES:
        raise DataError(f"{path} is larger than {NAMES_MAX_BYTES // 1024} KB, which is no list of class names; it "
                        "should hold one name a line, in the order of masks/0, masks/1, ...", path=path)
    try:
        with open(path, encoding="utf-8-sig") as f:
            lines = [line.strip() for line in f.read().splitlines()]
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path} cannot be read as text ({e.__class__.__name__}); save it as UTF-8 text, one class "
                        "name a line", path=path) from None
    while lines and not lines[-1]:
        lines.pop()
    folders = [d for d in os.listdir(os.path.dirname(path)) if d.isdigit() and os.path.isdir(os.path.join(
        os.path.dirname(path), d))]
    for n, name in enumerate(lines, 1):
        problem = ("is empty" if not name else "holds a comma" if "," in name else
                   f"repeats the name '{name}' of line {lines.index(name) + 1}" if lines.index(name) < n - 1 else "")
        if problem:
            raise DataError(f"{path}: line {n} {problem}; the file names each class once, one name a line (line 1 "
                            "names masks/0, line 2 masks/1, ...)", path=path)
    if len(lines) != len(folders):
        raise DataError(f"{path} names {len(lines)} class(es) but {os.path.dirname(path)} holds {len(folders)} class "
                        f"folder(s); give one name a line for each of masks/0 .. masks/{max(0, len(folders) - 1)}, "
                        "in that order", path=path)
    return lines, path


def check_pairs(image_ids, found, folder, ext, what):
    """Every image has a file in `found` ({id: file} of `folder`) and every file an image; mismatches listed by name."""
    no_file = set(image_ids) - set(found)
    no_image = set(found) - set(image_ids)
    if no_file:
        raise DataError(f"{len(no_file)} image(s) have no {what} in {folder}: {listing(no_file)}. "
                        f"Add them (named <id>{ext}) or remove those images.", path=folder)
    if no_image:
        raise DataError(f"{len(no_image)} {what}(s) in {folder} have no image: {listing(no_image)}. "
                        "Add the images or remove those files.", path=folder)


def label_folder(root):
    """<root>/labels or <root>/instances, whichever exists (None if neither); both is a DataError."""
    present = [os.path.join(root, d) for d in LABEL_FOLDERS if os.path.isdir(os.path.join(root, d))]
    if len(present) > 1:
        raise DataError(f"{root} has both labels/ and instances/; they hold the same thing (label images, one number "
                        "per object): keep one of them", path=root)
    return present[0] if present else None


def missing_reason(path):
    """Why the folder `path` is not there: it is a file, a folder above it is a file (--data_dir naming a file),
    or it does not exist."""
    if os.path.exists(path):
        return "is a file, not a folder"
    above = os.path.dirname(os.path.normpath(path))
    while above and not os.path.exists(above):
        above = os.path.dirname(above)
    if above and not os.path.isdir(above):
        return f"cannot exist: {above} is a file, not a folder"
    return "does not exist"


def scan(root, img_ext, mask_ext, num_classes, *, objects=False):
    """Finds the data set's files and checks that they pair up -> {id: Sample}, ids sorted. Nothing is decoded yet.
    Without masks/, the label images in labels/ are the target (one class: label > 0). objects (--target objects):
    the label images are the target whatever masks/ holds, and every image needs one."""
    if not os.path.isdir(root):
        raise DataError(f"data set folder {root} {missing_reason(root)}", setting="data", path=root,
                        around=("; create it with images/ and masks/0/ (or labels/) inside, or ", ""))
    images = find_ids(os.path.join(root, "images"), img_ext)
    ids = list(images)
    labels_dir = label_folder(root)
    labels = {}
    if labels_dir:
        labels = find_files(labels_dir, LABEL_EXTS, "label images")
        check_pairs(ids, labels, labels_dir, ".tif", "label image")
    mask_dirs = []                                            # with objects: masks/, if any, is not the target
    if objects and labels_dir is None:
        raise DataError(f"{root} has no label images (labels/ or instances/), which a run with target objects learns "
                        "from (one number per object, 0 the background, as napari, Cellpose or StarDist save them)",
                        setting="target", path=root, around=("; add them", ""))   # the fix: another target, if any
    if not objects and (labels_dir is None or os.path.isdir(os.path.join(root, "masks"))):
        mask_dirs = class_folders(os.path.join(root, "masks"), num_classes)
    elif not objects and num_classes != 1:
        raise DataError(f"{root} has label images ({labels_dir}/) and no masks/, which gives one class (label > 0), "
                        f"but num_classes is {num_classes}", setting="num_classes", path=root, found=1,
                        around=(": ", f", or add masks/0 .. masks/{num_classes - 1}"))
    masks = []
    for d in mask_dirs:
        found = find_ids(d, mask_ext, ext_key="mask_ext")
        check_pairs(ids, found, d, mask_ext, "mask")
        masks.append(found)
    return {i: Sample(os.path.join(root, "images", images[i]), [os.path.join(d, m[i]) for d, m in zip(mask_dirs, masks)],
                      os.path.join(labels_dir, labels[i]) if labels_dir else None)
            for i in ids}


