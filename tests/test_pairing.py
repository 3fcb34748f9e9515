"""pairing.py: finding a data set's files and pairing them, and the problems it reports as facts (DataError) that
each script words with its own flags."""
import os

import numpy as np
import pytest

import bench
import train
import val
from conftest import write_tiff
from dataerror import DataError, worded
from dataset import SegmentationData
from pairing import find_ids, scan
from utils import UserError


def load(root, num_classes=1, input_channels=3, img_ext=".png"):
    """The data set as train.py reads it: a problem's fix in train.py's words."""
    with worded(train.data_fix):
        return SegmentationData.from_folder(str(root), img_ext, ".png", num_classes, input_channels)


def test_wrong_extension_suggests_the_right_one(tiny):
    with pytest.raises(UserError, match="--img_ext .png"):
        load(tiny, img_ext=".tif")


def test_extensions_match_in_any_case_and_tif_is_tiff(tmp_path):
    root = tmp_path / "set"
    for name in ("a.TIF", "b.tiff", "c.tif"):
        write_tiff(str(root / "images" / name), np.zeros((8, 8), np.uint16))
        write_tiff(str(root / "labels" / (name.split(".")[0] + ".PNG.tif")), np.zeros((8, 8), np.uint16))
    for name in ("a", "b", "c"):
        os.rename(root / "labels" / f"{name}.PNG.tif", root / "labels" / f"{name}.TIFF")
    data = SegmentationData.from_folder(str(root), ".tif", ".png", 1, 1)
    assert data.ids == ["a", "b", "c"]
    write_tiff(str(root / "images" / "a.tif"), np.zeros((8, 8), np.uint16))      # a second file for id a
    with pytest.raises(UserError, match="two files for the id 'a'"):
        SegmentationData.from_folder(str(root), ".tif", ".png", 1, 1)


def test_label_images_without_masks_give_one_class(micro):
    with pytest.raises(UserError, match="no masks/, which gives one class .*num_classes is 2: pass --num_classes 1"), \
            worded(train.data_fix):
        scan(micro, ".tif", ".png", 2)
    os.rename(os.path.join(micro, "labels"), os.path.join(micro, "instances"))
    os.makedirs(os.path.join(micro, "labels"))
    with pytest.raises(UserError, match="both labels/ and instances/"):
        scan(micro, ".tif", ".png", 1)


@pytest.mark.parametrize("make, pattern", [
    (lambda d: os.makedirs(os.path.join(d, "images", "img0003.png")), "img0003.png is a folder, not a file"),
    (lambda d: os.symlink(os.path.join(d, "nowhere.png"), os.path.join(d, "images", "img0099.png")), "img0099.png is a broken link"),
])
def test_folders_and_broken_links_named_like_images_are_named(tiny, make, pattern):
    if "img0003" in pattern:
        os.remove(os.path.join(tiny, "images", "img0003.png"))
    make(tiny)
    with pytest.raises(UserError, match=pattern):
        load(tiny)


def test_an_extension_without_its_dot_and_a_data_set_that_is_a_file_are_explained(tiny, tmp_path):
    with pytest.raises(UserError, match="the extension 'png' has no leading dot; pass --img_ext .png"):
        load(tiny, img_ext="png")
    (tmp_path / "afile").write_text("x")
    with pytest.raises(UserError, match="afile is a file, not a folder"):
        load(str(tmp_path / "afile"))


def problem(call):
    """The DataError that call() raises, unworded."""
    with pytest.raises(DataError) as raised:
        call()
    return raised.value


def test_a_data_problem_carries_its_setting_path_and_what_was_found(tiny):
    images = os.path.join(tiny, "images")
    e = problem(lambda: find_ids(images, ".tif"))
    assert (e.setting, e.path, e.found) == ("img_ext", images, ".png")
    assert e.fact == f"no file ending in '.tif' in {images} (it holds files ending in .png)"
    assert str(e) == f"{e.fact} (setting img_ext, found .png)"            # unworded: the facts alone
    masks = os.path.join(tiny, "masks", "0")
    assert problem(lambda: find_ids(masks, ".tif", ext_key="mask_ext")).setting == "mask_ext"
    os.makedirs(os.path.join(tiny, "masks", "1"))
    e = problem(lambda: scan(tiny, ".png", ".png", 1))
    assert (e.setting, e.found, e.path) == ("num_classes", 2, os.path.join(tiny, "masks"))
    e = problem(lambda: scan(os.path.join(tiny, "gone"), ".png", ".png", 1))
    assert (e.setting, e.found) == ("data", None) and e.fact.endswith("gone does not exist")
    e = problem(lambda: scan(tiny, ".png", ".png", 2, objects=True))
    assert e.setting == "target" and e.fact.startswith(f"{tiny} has no label images")


def test_each_script_words_the_fix_with_its_own_flags(tiny):
    """One problem, the four wordings: train.py's (with where the value came from once the config is resolved),
    val.py's (the run it evaluates), bench.py's (PNG only)."""
    fact = f"no file ending in '.tif' in {tiny}/images (it holds files ending in .png)"
    cfg = {"img_ext": ".tif", "num_classes": 1, "input_channels": 3}

    def worded_by(fix):
        e = problem(lambda: find_ids(os.path.join(tiny, "images"), ".tif"))
        with pytest.raises(DataError) as raised, worded(fix):
            raise e
        return str(raised.value)

    assert worded_by(train.data_fix) == f"{fact}; pass --img_ext .png if that is the extension of your images"
    assert worded_by(lambda e: train.data_fix(e, cfg, {"sources": {"img_ext": "my.yml"}})) == (
        f"{fact}; pass --img_ext .png (img_ext .tif comes from my.yml) if that is the extension of your images")
    assert worded_by(lambda e: val.data_fix(e, cfg, "old")) == \
        f"{fact}; pass --img_ext .png if that is the extension of your images"
    assert worded_by(bench.data_fix) == (f"{fact}; bench.py reads .png images only: convert them (or time train.py "
                                         "itself) if that is the extension of your images")
    e = problem(lambda: scan(tiny, ".png", ".png", 2, objects=True))
    with pytest.raises(DataError, match="add them, or train on the masks with --target masks$"), worded(train.data_fix):
        raise e
    e = problem(lambda: scan(tiny, ".png", ".png", 2, objects=True))
    with pytest.raises(DataError, match="StarDist save them.; add them$"), worded(lambda e: val.data_fix(e, cfg, "old")):
        raise e


def names_file(root, text, encoding="utf-8"):
    path = os.path.join(root, "masks", "names.txt")
    with open(path, "w", encoding=encoding) as f:
        f.write(text)
    return path


def test_a_names_file_beside_the_masks_names_the_classes_in_their_order(tmp_path):
    from conftest import make_data
    from pairing import class_names_file
    root = make_data(tmp_path, "three", num_classes=3, exclusive=True)
    assert class_names_file(root) == ([], None)                             # no file: no names
    path = names_file(root, "  background\nnucleus  \r\nvesicle\n\n\n")     # spaces, CRLF, empty lines at the end
    assert class_names_file(root) == (["background", "nucleus", "vesicle"], path)
    assert scan(root, ".png", ".png", 3)["img0000"].masks[2].endswith(os.path.join("masks", "2", "img0000.png"))


@pytest.mark.parametrize("text, says", [
    ("background\nnucleus\n", r"names 2 class\(es\) but .* holds 3 class folder"),
    ("background\nnucleus\nvesicle\nmore\n", "names 4 class"),
    ("background\n\nvesicle\n", "line 2 is empty"),
    ("background\nnucleus\nbackground\n", "line 3 repeats the name 'background' of line 1"),
    ("background\nnuclei, large\nvesicle\n", "line 2 holds a comma"),
])
def test_a_names_file_that_does_not_name_each_class_folder_once_is_refused_with_the_line(tmp_path, text, says):
    from conftest import make_data
    from pairing import class_names_file
    root = make_data(tmp_path, "three", num_classes=3, exclusive=True)
    names_file(root, text)
    with pytest.raises(DataError, match=says):
        class_names_file(root)


def test_a_names_file_that_is_not_text_is_refused(tmp_path):
    from conftest import make_data
    from pairing import class_names_file
    root = make_data(tmp_path, "three", num_classes=3, exclusive=True)
    with open(os.path.join(root, "masks", "names.txt"), "wb") as f:
        f.write(b"\xff\xfe\x00b\x00a")
    with pytest.raises(DataError, match="cannot be read as text"):
        class_names_file(root)
