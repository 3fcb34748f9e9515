"""What a new user trips over: figures that say what they are, messages that name only the running script's
flags and where a bad value came from, a runs folder that can be anywhere, outputs people can use, --help."""
import csv
import os
import re
import shutil

import cv2
import numpy as np
import pytest

import bench
import config
import figures
import train
import val
from conftest import make_data, run_main
from splits import split_for

FAST = ["--base_channels", "8", "--dataset", "tiny", "--arch", "UNet", "--epochs", "1", "-b", "4", "--input_w", "32", "--input_h", "32",
        "--num_workers", "0", "--device", "cpu", "--optimizer", "Adam"]


def read_csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def named_flags(text):
    """The --flags a message tells the user to pass, leaving out those inside a 'python train.py ...' command
    (naming another script's flag is fine when the command is spelled out)."""
    text = re.sub(r"python train\.py[^;\n]*", "", text)
    return set(re.findall(r"(?<![\w-])--[a-z_]+", text))


VAL_FLAGS = {"--name", "--runs_dir", "--data", "--images", "--img_ext", "--mask_ext", "--threshold", "--tta", "--tile",
             "--overlap", "--device", "--batch_size", "--output", "--save_probs", "--overlay", "--instances",
             "--min_size", "--help"}


@pytest.fixture(scope="module")
def template(tmp_path_factory):
    """inputs/tiny (40x40 images: larger than the 32x32 network input), inputs/gray, and runs old (RGB) and
    gray (input_channels 1), each one epoch."""
    root = tmp_path_factory.mktemp("newuser")
    make_data(root / "inputs", size=40, n=12)
    make_data(root / "inputs", "gray", channels=1)
    mp = pytest.MonkeyPatch()
    for extra in (["--name", "old"], ["--name", "gray", "--dataset", "gray", "--input_channels", "1"]):
        code, _, err = run_main(train.main, FAST + extra, root, mp, CaptureNothing())
        assert code == 0, err
    mp.undo()
    return root


class CaptureNothing:
    def readouterr(self):
        return "", ""


@pytest.fixture
def work(template, tmp_path):
    shutil.copytree(template, tmp_path, dirs_exist_ok=True)
    return tmp_path


@pytest.fixture
def data_only(tmp_path):
    """The template's inputs/tiny without its runs: for the messages given before anything trains."""
    make_data(tmp_path / "inputs", size=40, n=12)
    return tmp_path


def write_images(folder, n, ext=".png", size=32, channels=3):
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(0)
    for k in range(n):
        cv2.imwrite(os.path.join(folder, f"x{k}{ext}"), rng.integers(0, 255, (size, size, channels), dtype=np.uint8))


def labelled_folder(work, name, mask_ext=".png", classes=1):
    """A copy of inputs/tiny under <work>/<name>, its masks renamed to mask_ext and `classes` class folders."""
    dst = work / name
    shutil.copytree(work / "inputs" / "tiny", dst)
    for c in range(1, classes):
        shutil.copytree(dst / "masks" / "0", dst / "masks" / str(c))
    if mask_ext != ".png":
        for f in os.listdir(dst / "masks" / "0"):
            cv2.imwrite(str(dst / "masks" / "0" / f.replace(".png", mask_ext)), cv2.imread(str(dst / "masks" / "0" / f), 0))
            os.remove(dst / "masks" / "0" / f)
    return dst


VAL_MISTAKES = [
    ("images-missing", lambda w: None, ["--name", "old", "--images", "nowhere"], "nowhere does not exist"),
    ("images-tif", lambda w: write_images(w / "tifs", 2, ".tif"), ["--name", "old", "--images", "tifs"],
     "--img_ext .tif"),
    ("colour-into-gray-run", lambda w: write_images(w / "rgb", 2), ["--name", "gray", "--images", "rgb"],
     "trained with input_channels 1"),
    ("data-mask-ext", lambda w: labelled_folder(w, "tifmasks", ".tif"), ["--name", "old", "--data", "tifmasks"],
     "--mask_ext .tif"),
    ("data-classes", lambda w: labelled_folder(w, "two", classes=2), ["--name", "old", "--data", "two"],
     "predicts 1 class(es)"),
    ("data-moved", lambda w: shutil.move(w / "inputs" / "tiny", w / "elsewhere"), ["--name", "old"],
     "edit data_dir in old's config.yml"),
    ("no-run", lambda w: None, ["--name", "nope"], "--runs_dir"),
]


@pytest.mark.e2e
@pytest.mark.parametrize("case, setup, argv, expected", VAL_MISTAKES, ids=[c[0] for c in VAL_MISTAKES])
def test_val_messages_name_only_flags_val_has(work, monkeypatch, capsys, case, setup, argv, expected):
    setup(work)
    code, _, err = run_main(val.main, argv, work, monkeypatch, capsys)
    assert code == 2 and expected in err, err
    assert named_flags(err) <= VAL_FLAGS, f"{err} names {named_flags(err) - VAL_FLAGS}"


def test_train_messages_name_the_right_flag_and_where_the_value_came_from(data_only, monkeypatch, capsys):
    work = data_only
    data = work / "inputs" / "tifs"
    shutil.copytree(work / "inputs" / "tiny", data)
    for folder in (data / "images", data / "masks" / "0"):        # .tif images and masks, mask_ext left at .png
        for f in os.listdir(folder):
            os.rename(folder / f, folder / f.replace(".png", ".tif"))
    (data / "masks" / "0" / "notes.txt").write_text("x")   # not of one image type: mask_ext is not taken from it
    code, _, err = run_main(train.main, FAST + ["--dataset", "tifs", "--img_ext", ".tif"], work, monkeypatch, capsys)
    assert code == 2 and "pass --mask_ext .tif (mask_ext .png is the default) if that is the extension of your masks" in err, err
    assert "--img_ext" not in err
    (work / "exts.yml").write_text("img_ext: .jpg\n")
    code, _, err = run_main(train.main, FAST + ["--config", "exts.yml"], work, monkeypatch, capsys)
    assert code == 2 and "pass --img_ext .png (img_ext .jpg comes from exts.yml)" in err, err
    code, _, err = run_main(train.main, FAST + ["--num_classes", "2"], work, monkeypatch, capsys)
    assert code == 2 and "pass --num_classes 1 (--num_classes 2 was given on the command line)" in err, err
    (work / "partial.yml").write_text("arch: UNet\nepochs: 0\n")
    code, _, err = run_main(train.main, ["--config", "partial.yml"], work, monkeypatch, capsys)
    assert code == 2 and "partial.yml (key epochs)" in err, err
    (work / "partial.yml").write_text("arch: UNet\n")
    code, _, err = run_main(train.main, ["--config", "partial.yml", "--epochs", "0"], work, monkeypatch, capsys)
    assert code == 2 and "the command line (--epochs)" in err and "partial.yml" not in err, err


def test_bench_names_its_own_data_flag(data_only, monkeypatch, capsys):
    work = data_only
    code, _, err = run_main(bench.main, ["--data", "nowhere", "--device", "cpu"], work, monkeypatch, capsys)
    assert code == 2 and "--data DIR" in err and "--data_dir" not in err, err


@pytest.mark.e2e
def test_runs_folder_by_flag_and_by_environment_variable(work, tmp_path_factory, monkeypatch, capsys):
    runs = tmp_path_factory.mktemp("runs_elsewhere")
    code, out, err = run_main(train.main, FAST + ["--data_dir", str(work / "inputs"), "--runs_dir", str(runs),
                                                  "--name", "r"], work / "inputs", monkeypatch, capsys)
    assert code == 0, err
    assert (runs / "r" / "model.pth").is_file() and not (work / "inputs" / "models").exists()
    assert f"--runs_dir {runs}" in out                          # the end line's val.py command finds it
    code, _, err = run_main(val.main, ["--name", "r"], work, monkeypatch, capsys)
    assert code == 2 and "--runs_dir" in err and config.RUNS_DIR_ENV in err
    monkeypatch.setenv(config.RUNS_DIR_ENV, str(runs))
    code, out, err = run_main(val.main, ["--name", "r"], work, monkeypatch, capsys)
    assert code == 0 and "IoU:" in out, err
    code, _, err = run_main(train.main, ["--name", "r", "--resume", "--epochs", "2"], work, monkeypatch, capsys)
    assert code == 0 and len(read_csv(runs / "r" / "log.csv")) == 2, err


@pytest.mark.e2e
def test_val_says_which_size_each_figure_is_at(work, monkeypatch, capsys):
    code, out, err = run_main(val.main, ["--name", "old"], work, monkeypatch, capsys)
    assert code == 0, err
    logged = max(float(r["val_iou"]) for r in read_csv(work / "models" / "old" / "log.csv"))
    at_input = float(re.search(r"IoU at the 32x32 network input \(what train.py logs as val_iou\): ([0-9.]+)", out)[1])
    assert at_input == pytest.approx(logged, abs=2e-3)          # the figure training logged, reproduced
    assert "scored at each image's own size" in out


@pytest.mark.e2e
def test_val_outputs_notes_and_where_things_went(work, monkeypatch, capsys):
    write_images(work / "new", 3, size=96)                      # 3x the network input
    write_images(work / "new", 2, ".jpg")
    code, out, err = run_main(val.main, ["--name", "old", "--images", "new", "--save_probs", "--overlay"], work,
                              monkeypatch, capsys)
    assert code == 0, err
    assert "skipped 2 file(s)" in out and "--img_ext .jpg" in out
    assert "shrunk" not in out                                   # predicted whole at the scale the run learned
    assert all(cv2.imread(str(p), cv2.IMREAD_UNCHANGED).shape == (96, 96)
               for p in (work / "outputs" / "old" / "predictions" / "0").iterdir())
    pred = "outputs/old/predictions"
    assert f"probability maps in {pred}/probs/<class>/" in out and f"outlines in {pred}/overlay/" in out
    assert len(os.listdir(work / pred / "probs" / "0")) == 3 and "ground truth" not in out   # no masks, no truth
    code, out, err = run_main(val.main, ["--name", "old", "--images", "new", "--resize"], work, monkeypatch, capsys)
    assert code == 0 and "all 3 images (96x96) are shrunk 3.0x to the 32x32 network input" in out, err  # asked
    assert "without --resize" in out
    code, out, err = run_main(val.main, ["--name", "old", "--overlay"], work, monkeypatch, capsys)
    assert code == 0 and "ground truth magenta" in out, err
    overlays = [cv2.imread(str(p)) for p in (work / "outputs" / "old" / "overlay").iterdir()]
    magenta = figures.TRUTH[1][::-1]                                        # BGR, as OpenCV reads it
    assert any(((o == magenta).all(axis=2)).any() for o in overlays)         # the true outline is drawn


@pytest.mark.e2e
def test_val_scores_any_labelled_folder(work, monkeypatch, capsys):
    labelled_folder(work, "batch2")
    code, out, err = run_main(val.main, ["--name", "old", "--data", "batch2"], work, monkeypatch, capsys)
    assert code == 0, err
    assert len(read_csv(work / "outputs" / "old" / "on_batch2" / "metrics.csv")) == 12     # every image


@pytest.mark.e2e
def test_softmax_runs_report_the_mean_without_class_0_and_log_each_class(work, monkeypatch, capsys):
    make_data(work / "inputs", "three", num_classes=3, exclusive=True)
    argv = FAST + ["--dataset", "three", "--num_classes", "3", "--class_mode", "softmax", "--loss", "CEDiceLoss",
                   "--name", "sm"]
    code, _, err = run_main(train.main, argv, work, monkeypatch, capsys)
    assert code == 0, err
    row = read_csv(work / "models" / "sm" / "log.csv")[0]
    per_class = [float(row[f"val_iou_{c}"]) for c in range(3)]
    assert np.mean(per_class) == pytest.approx(float(row["val_iou"]), abs=1e-5)
    code, out, err = run_main(val.main, ["--name", "sm"], work, monkeypatch, capsys)
    assert code == 0 and "mean w/o 0" in out and "class 0 holds the pixels no other class marks" in out, err


def test_help_is_grouped_with_examples_and_human_defaults(capsys):
    with pytest.raises(SystemExit):
        config.build_parser("x").parse_args(["--help"])
    text = capsys.readouterr().out
    for group in ("run:", "model:", "data:", "optimisation:", "schedule:", "hardware:", "reliability:", "examples:"):
        assert group in text
    assert "(default: 2/3)" in text and "0.6666" not in text and "(default: 1e-05)" in text
    with pytest.raises(SystemExit):
        val.parse_args(["--help"])
    assert "examples:" in capsys.readouterr().out


@pytest.mark.e2e
def test_start_line_shows_what_differs_and_end_line_points_at_recipes(work, monkeypatch, capsys):
    sgd = [a for a in FAST if a not in ("--optimizer", "Adam")]
    code, out, err = run_main(train.main, sgd + ["--name", "sgd"], work, monkeypatch, capsys)
    assert code == 0, err
    line = next(x for x in out.splitlines() if x.startswith("config:"))
    assert "arch=UNet" in line and "momentum" not in line and "models/sgd/config.yml" in line and len(line) < 400
    assert "recipes/dsb2018_cpu.yml" in out
    code, out, err = run_main(train.main, FAST + ["--name", "adam"], work, monkeypatch, capsys)
    assert code == 0 and "recipes/" not in out, err


@pytest.mark.e2e
def test_folds_and_an_ensemble_of_them(work, monkeypatch, capsys):
    for fold in (0, 1):
        code, _, err = run_main(train.main, FAST + ["--folds", "3", "--fold", str(fold)], work, monkeypatch, capsys)
        assert code == 0, err
    ids = sorted(f[:-4] for f in os.listdir(work / "inputs" / "tiny" / "images"))
    cfg = {"val_split": 0.2, "split_seed": 41, "folds": 3, "fold": 1}
    recorded = read_csv(work / "models" / "tiny_UNet_woDS_fold1" / "split.csv")
    assert sorted(r["id"] for r in recorded if r["subset"] == "val") == sorted(split_for(ids, cfg)[1])
    code, out, err = run_main(val.main, ["--name", "tiny_UNet_woDS_fold0", "tiny_UNet_woDS_fold1"], work, monkeypatch,
                              capsys)
    assert code == 0, err
    unseen = set(ids) - {r["id"] for n in (0, 1) for r in read_csv(work / "models" / f"tiny_UNet_woDS_fold{n}" /
                                                                    "split.csv") if r["subset"] == "train"}
    scored = read_csv(work / "outputs" / "tiny_UNet_woDS_fold0+tiny_UNet_woDS_fold1" / "metrics.csv")
    assert {r["id"] for r in scored} == unseen and f"the {len(unseen)} images none of the 2 runs trained on" in out
    code, _, err = run_main(train.main, FAST + ["--folds", "3", "--fold", "3"], work, monkeypatch, capsys)
    assert code == 2 and "folds are numbered 0 .. 2" in err


@pytest.mark.parametrize("flags, says", [
    (["--img_ext", ""], "the extension '' is empty; pass --img_ext .png"),
    (["--img_ext", "."], "the extension '.' is empty; pass --img_ext .png"),
    (["--img_ext", "png"], "the extension 'png' has no leading dot; pass --img_ext .png"),
    (["--config", "a_folder"], "config file a_folder is a folder; pass a file, e.g. a_folder/config.yml"),
])
def test_messages_suggest_a_fix_that_works(data_only, flags, says, monkeypatch, capsys):
    work = data_only
    os.makedirs(work / "a_folder", exist_ok=True)
    code, _, err = run_main(train.main, FAST + flags, work, monkeypatch, capsys)
    assert code == 2 and says in err and "Traceback" not in err, err
