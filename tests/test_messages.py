"""Messages that mislead (issue 36, class 8): each message says what is true and what works, and every command the
toolkit prints for a person to paste runs as printed, whatever the run's name or folder."""
import ast
import os
import re
import shlex
import warnings

import cv2
import numpy as np
import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

import compare
import config
import plan
import predict
import preprocess_dsb2018
import rundir
import train
import val
from conftest import ROOT, make_data, make_microscopy, run_main, write_tiff
from splits import load_splits
from utils import UserError, command, save_yaml

NAMES = settings(max_examples=300, deadline=None)


# --- the run name rule, as printed and as enforced ---------------------------------------------------------------

@NAMES
@given(name=st.text(max_size=130))
def test_the_name_rule_is_what_the_message_prints(name):
    """valid_name accepts exactly NAME_RULE's names: ASCII letters, digits, '_ - .', beginning with a letter, digit
    or '_', at most 120 characters; each is a word a shell and argparse take as it is, and a readable folder."""
    allowed = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-.")
    printed = (0 < len(name) <= config.MAX_NAME_BYTES and set(name) <= allowed and name[0] not in "-.")
    assert config.valid_name(name) == printed
    if printed:
        assert shlex.quote(name) == name and config.readable_name(name)
    like = config.name_like(name)
    assert like == "" or config.valid_name(like)               # the name a refusal suggests is one the rule takes


@NAMES
@given(words=st.lists(st.text(min_size=0, max_size=20).filter(lambda w: "\0" not in w), min_size=1, max_size=5))
def test_a_printed_command_splits_back_into_its_words(words):
    assert shlex.split(command("python", "val.py", *words)) == ["python", "val.py", *words]


@pytest.mark.parametrize("name, like", [("my run", "my_run"), ("a\tb", "a_b"), ("ü", "u"), ("my run ü", "my_run_u"),
                                        ("-x", "x"), ("a$b", "a_b"), ("it's", "it_s"), ("日本", None),
                                        ("n" * 121, None)])
def test_a_new_run_name_that_breaks_the_rule_is_refused_with_one_that_keeps_it(tmp_path, monkeypatch, name, like):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError) as e:
        config.resolve([f"--name={name}"])
    said = str(e.value)
    assert said.startswith("the command line (--name): name must be a plain folder name of ASCII letters")
    assert f"not {name!r}" in said
    if like:
        assert f"(e.g. --name {like})" in said and config.valid_name(like)
    else:
        assert "e.g." not in said or "n" * 121 in said


def test_names_the_rule_allows_are_taken(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for name in ("run-1.b_2", "A", "_x", "7.5"):
        assert config.resolve(["--name", name])[0]["name"] == name


def test_a_name_from_a_config_file_is_refused_naming_the_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "my.yml").write_text("name: cells v2\n")
    with pytest.raises(UserError, match=r"^my.yml \(key name\): name must be a plain folder name.*e.g. --name cells_v2"):
        config.resolve(["--config", "my.yml"])


@pytest.mark.parametrize("argv, dataset_name, like", [
    (["--dataset", "../../etc"], "../../etc", "etc_NestedUNet_woDS"),
    (["--dataset", "my cells", "--arch", "UNet"], "my cells", "my_cells_UNet_woDS"),
    (["--dataset", "zellen_ü", "--deep_supervision"], "zellen_ü", "zellen_u_NestedUNet_wDS")])
def test_a_default_name_is_blamed_on_the_data_set_it_is_made_of_not_on_a_name_never_given(tmp_path, monkeypatch,
                                                                                          argv, dataset_name, like):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError) as e:
        config.resolve(argv)
    said = str(e.value)
    assert said.startswith("no --name was given, so the run is named after its data set and network")
    assert f"dataset {dataset_name!r} from the command line (--dataset)" in said and f"e.g. --name {like}" in said
    assert "(--name)" not in said


def test_an_existing_run_folder_whose_name_breaks_the_rule_is_still_resumed_and_read(tmp_path, monkeypatch):
    """A run named before the rule was enforced ('my run ü'): --resume and --overwrite name a folder that exists;
    val.py, export.py and compare.py read it. A new run of that name is refused."""
    monkeypatch.chdir(tmp_path)
    os.makedirs(tmp_path / "models" / "my run ü")
    save_yaml(str(tmp_path / "models" / "my run ü" / "config.yml"), {**config.DEFAULTS, "name": "my run ü"})
    cfg, run = config.resolve(["--name", "my run ü", "--resume"])
    assert cfg["name"] == "my run ü" and run["resume"]
    assert config.resolve(["--name", "my run ü", "--overwrite"])[0]["name"] == "my run ü"
    with pytest.raises(UserError, match="not a plain folder name|name must be"):
        config.resolve(["--name", "my run u"])                  # no such folder: a new run, the rule applies
    assert config.readable_name("my run ü") and not config.valid_name("my run ü")
    assert compare.load("models", "my run ü")["config"]["name"] == "my run ü"
    with pytest.raises(UserError, match="models/my run ü/model.pth does not exist"):   # read, up to its weights
        predict.check_run_folder("my run ü", rundir.RunFolder("models/my run ü"), "models")


# --- every printed command is quoted -------------------------------------------------------------------------------

def pasted(text, after):
    """The command a message prints after `after`, to the end of its line, split as a shell splits it."""
    return shlex.split(text.split(after, 1)[1].splitlines()[0])


def test_train_prints_pasteable_commands_for_any_run_name_and_runs_folder(tmp_path):
    cfg = {**config.DEFAULTS, "name": "my run ü"}
    run = {"runs_dir": "my runs", "resume": False}
    text = train.finished_message(cfg, run, {"iou": 0.5, "epoch": 3}, "my runs/my run ü")
    assert "evaluate with: python val.py --name 'my run ü' --runs_dir 'my runs'" in text
    assert pasted(text, "evaluate with: ") == [
        "python", "val.py", "--name", "my run ü", "--runs_dir", "my runs"]
    os.makedirs(tmp_path / "my runs" / "my run ü")
    (tmp_path / "my runs" / "my run ü" / "last.pth").write_bytes(b"")
    run = {"runs_dir": str(tmp_path / "my runs"), "resume": False}
    again = train.interrupted_message(cfg, run).splitlines()[-1].strip()
    assert shlex.split(again) == ["python", "train.py", "--name", "my run ü", "--runs_dir", run["runs_dir"], "--resume"]
    failure = train.torchrun_failure(RuntimeError("broken"), cfg, run)
    assert f"{run['runs_dir']}/my run ü/last.pth holds the last finished epoch" in failure   # not models/...


def test_a_resume_refusal_gives_a_pasteable_command_to_start_a_new_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    runs = tmp_path / "runs $HOME"
    os.makedirs(runs / "r")
    save_yaml(str(runs / "r" / "config.yml"), {**config.DEFAULTS, "name": "r"})
    with pytest.raises(UserError) as e:
        config.resolve(["--name", "r", "--resume", "--runs_dir", str(runs), "--milestones", "30,60"])
    said = str(e.value)
    start = said[said.index("python train.py"):said.index(". Only")]
    words = shlex.split(start.replace("<new name>", "NEW"))
    assert words == ["python", "train.py", "--config", str(runs / "r" / "config.yml"), "--name", "NEW",
                     "--milestones", "30,60"]


def test_where_a_value_came_from_is_said_so_that_an_empty_one_shows(tmp_path):
    assert config.whence({"img_ext": "the command line"}, "img_ext", "") == "--img_ext '' was given on the command line"
    assert config.whence({"img_ext": "the command line"}, "img_ext", ".tif") == "--img_ext .tif was given on the command line"


def test_a_missing_or_broken_model_says_what_happened_and_how_to_go_on(tmp_path, monkeypatch):
    """model.pth a folder, model.pth deleted after epochs, a run stopped before its first epoch, no run at all:
    four different messages, each with a command that works (not '--resume', which does nothing there)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(rundir, "repair", lambda run_dir: None)
    runs = "my runs"
    folder = rundir.RunFolder(os.path.join(runs, "r"))
    with pytest.raises(UserError) as e:
        predict.check_run_folder("r", folder, runs)
    assert "Train it first (python train.py --name r --runs_dir 'my runs')" in str(e.value)
    os.makedirs(folder.path)
    save_yaml(folder.config, {**config.DEFAULTS, "name": "r"})
    with pytest.raises(UserError, match="the run stopped before it finished an epoch") as e:
        predict.check_run_folder("r", folder, runs)
    retrain = pasted(str(e.value), "Train it again: ")
    assert retrain == ["python", "train.py", "--config", folder.config, "--name", "r", "--runs_dir", runs, "--overwrite"]
    open(folder.last, "wb").close()
    with pytest.raises(UserError, match="is missing, though the run has finished epochs .* moved or deleted"):
        predict.check_run_folder("r", folder, runs)
    os.makedirs(folder.model)
    with pytest.raises(UserError) as e:
        predict.check_run_folder("r", folder, runs)
    assert "model.pth (its best weights) is a folder, not a file" in str(e.value) and "move" in str(e.value)
    assert "has not finished an epoch" not in str(e.value) and "--resume" not in str(e.value)


def test_val_suggests_only_an_extension_it_can_take(tmp_path, capsys):
    from types import SimpleNamespace
    folder = tmp_path / "new"
    os.makedirs(folder)
    image = (np.random.default_rng(0).random((64, 80)) * 60000).astype(np.uint16)
    for name in ("a.png", "b.png"):
        cv2.imwrite(str(folder / name), image)
    for name in ("README", "c.tif", "d.my ext"):                     # files val.py skips
        (folder / name).write_bytes(b"x")
    req = SimpleNamespace(images=str(folder), img_ext=None)
    data = val.unlabelled(req, {**config.DEFAULTS, "input_channels": 1})
    out = capsys.readouterr().out
    assert data.ids == ["a", "b"]
    assert "skipped 3 file(s)" in out and "(.my ext, .tif, no extension)" in out and "pass --img_ext '.my ext'" in out
    for name in ("c.tif", "d.my ext"):
        os.remove(folder / name)
    val.unlabelled(req, {**config.DEFAULTS, "input_channels": 1})
    out = capsys.readouterr().out
    assert "(no extension)" in out and "--img_ext" not in out          # never '--img_ext (none)'


def test_preprocess_names_a_file_where_its_output_folder_goes_and_quotes_its_commands(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "notes").write_text("x")
    for out, says in (("notes", "--out notes is a file, not a folder"),
                      ("notes/dsb", "--out notes/dsb is inside ")):
        with pytest.raises(UserError) as e:
            preprocess_dsb2018.prepare_out(out, overwrite=False)
        assert str(e.value).startswith(says) and "Free space" not in str(e.value)
    line = preprocess_dsb2018.next_step("my data/dsb 96", 3, labeled=True)
    assert shlex.split(line.split("train with: ")[1]) == ["python", "train.py", "--data_dir", "my data", "--dataset",
                                                           "dsb 96"]
    line = preprocess_dsb2018.next_step("my data/test", 3, labeled=False)
    assert line.endswith("python val.py --name <run> --images 'my data/test/images'")


def test_a_plan_line_is_quoted_where_a_value_needs_it():
    assert plan.Choice({"class_names": "a b", "lr": 0.001, "crop": False}, "").flags() == \
        "--class_names 'a b' --lr 0.001 --crop false"


def test_no_printed_command_puts_a_value_after_a_script_name_unquoted():
    """Every f-string that prints 'python <script>.py ...' with a value in it passes that value through
    utils.command (which shell-quotes it); a placeholder such as <name> stays literal text."""
    offenders = []
    for file in sorted(f for f in os.listdir(ROOT) if f.endswith(".py")):
        tree = ast.parse(open(os.path.join(ROOT, file), encoding="utf-8").read())
        for node in ast.walk(tree):
            if not isinstance(node, ast.JoinedStr):
                continue
            started = False
            for part in node.values:
                if isinstance(part, ast.Constant) and re.search(r"python [\w/]+\.py", str(part.value)):
                    started = True
                elif started and isinstance(part, ast.FormattedValue) and not (
                        isinstance(part.value, ast.Call) and getattr(part.value.func, "id", "") == "command"):
                    offenders.append(f"{file}:{node.lineno}")
    assert offenders == []


# --- the plan on a data set too small for it ------------------------------------------------------------------------

SURVEY = plan.Survey(images=2, height=512, width=512, smallest=512, largest=512, channels=1, dtype="uint16",
                     classes=1, foreground=(0.1,), object_size=12.0)


@pytest.mark.parametrize("images, given, says", [
    (2, {}, "needs at least 2 training images .* holds 2 image\\(s\\), of which --val_split 0.2 leaves 1 to train on"),
    (3, {"folds": 2}, "holds 3 image\\(s\\), of which --val_split 0.2 with fold 0 of --folds 2 held out too leaves 1"),
    (5, {"val_split": 0.7}, "holds 5 image\\(s\\), of which --val_split 0.7 leaves 1"),
    (1, {"batch_size": 1}, "a run needs at least one training image, and .* leaves 0 to train on")])
def test_the_plan_refuses_a_data_set_too_small_for_its_smallest_batch_before_planning(images, given, says):
    from dataclasses import replace
    cfg = {**config.DEFAULTS, **given}
    small = replace(SURVEY, images=images, height=64, width=64, smallest=64, largest=64)   # too small for regions
    with pytest.raises(UserError, match=says):
        plan.check_enough(small, cfg, set(given), "inputs/x")


def test_the_plan_takes_the_smallest_data_set_it_says_it_handles():
    from dataclasses import replace
    plan.check_enough(replace(SURVEY, images=3), config.DEFAULTS, set(), "inputs/x")          # 2 train, batch 2
    plan.check_enough(replace(SURVEY, images=2), {**config.DEFAULTS, "batch_size": 1}, {"batch_size"}, "inputs/x")
    choices = plan.make_plan(replace(SURVEY, images=3), plan.Machine(False, 2**34), config.DEFAULTS, set())
    batch = next(c.settings["batch_size"] for c in choices if "batch_size" in c.settings)
    assert batch <= 3 - int(np.ceil(0.2 * 3))                           # never a batch the training split refuses


def test_train_with_a_plan_on_two_images_prints_no_plan_it_would_refuse(tmp_path, monkeypatch, capsys):
    make_microscopy(tmp_path / "inputs", "two", n=2, size=64)
    code, out, err = run_main(train.main, ["--dataset", "two", "--plan", "auto"], tmp_path, monkeypatch, capsys)
    assert code == 2 and "plan for" not in out and "--plan auto needs at least 2 training images" in err, err
    assert not os.path.exists(tmp_path / "models")


# --- data sets of blank images, objects that never touch -----------------------------------------------------------

def load(root, **cfg):
    cfg = {**config.DEFAULTS, "data_dir": str(root.parent), "dataset": root.name, "img_ext": ".tif", "cache_mb": 64,
           "input_channels": 1, **cfg}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        load_splits(cfg)
    return [str(w.message) for w in caught]


def test_blank_images_get_a_warning_naming_them(tmp_path):
    root = make_microscopy(tmp_path / "inputs", n=8, size=256)
    images = sorted(os.listdir(os.path.join(root, "images")))
    for f, value in ((images[1], 0), (images[4], 65535)):            # an export that failed: one value throughout
        write_tiff(os.path.join(root, "images", f), np.full((256, 256), value, np.uint16))
    said = [m for m in load(tmp_path / "inputs" / "micro") if "blank" in m]
    assert len(said) == 1 and said[0].startswith("2 of 8 images are blank under") and "(cell0001, cell0004)" in said[0]
    for f in images:
        write_tiff(os.path.join(root, "images", f), np.full((256, 256), 7, np.uint16))
    said = [m for m in load(tmp_path / "inputs" / "micro") if "blank" in m]
    assert len(said) == 1 and said[0].startswith("every image is blank")


def test_masks_that_mark_nothing_in_most_images_get_a_warning_naming_them(tmp_path):
    root = make_microscopy(tmp_path / "inputs", n=8, size=128)
    labels = sorted(os.listdir(os.path.join(root, "labels")))
    for f in labels[:5]:                                              # 5 of 8 label images without an object
        write_tiff(os.path.join(root, "labels", f), np.zeros((128, 128), np.uint16))
    said = [m for m in load(tmp_path / "inputs" / "micro") if "mark nothing" in m]
    assert len(said) == 1 and said[0].startswith("5 of 8 images under") and "(cell0000, cell0001, cell0002, " in said[0]
    write_tiff(os.path.join(root, "labels", labels[0]), (np.arange(128 * 128).reshape(128, 128) % 2).astype(np.uint16))
    assert not [m for m in load(tmp_path / "inputs" / "micro") if "mark nothing" in m]   # 4 of 8: half, no warning


def test_softmax_masks_count_as_marking_something_only_in_a_class_other_than_the_background(tmp_path):
    root = make_data(tmp_path / "inputs", "soft", n=6, size=64, num_classes=2)
    for f in sorted(os.listdir(os.path.join(root, "masks", "1")))[:4]:
        cv2.imwrite(os.path.join(root, "masks", "1", f), np.zeros((64, 64), np.uint8))
        cv2.imwrite(os.path.join(root, "masks", "0", f), np.full((64, 64), 255, np.uint8))   # the background
    said = load(tmp_path / "inputs" / "soft", img_ext=".png", input_channels=3, num_classes=2, class_mode="softmax",
                loss="CEDiceLoss")
    assert any(m.startswith("4 of 6 images under") and "mark nothing" in m for m in said)


def separate_objects(root, touching=False, n=6, size=192):
    """16-bit images with 9 square nuclei each in label images: apart, or (touching) the middle pair sharing an edge."""
    rng = np.random.default_rng(1)
    for k in range(n):
        labels = np.zeros((size, size), np.uint16)
        for j, (y, x) in enumerate((y, x) for y in (10, 75, 140) for x in (10, 75, 140)):
            labels[y:y + 40, x:x + 40] = j + 1
        if touching:
            labels[75:115, 115:140] = 5                                # object 5 reaches object 6
        image = (rng.normal(120, 10, (size, size)) + 2000 * (labels > 0)).astype(np.uint16)
        write_tiff(os.path.join(root, "images", f"n{k}.tif"), image)
        write_tiff(os.path.join(root, "labels", f"n{k}.tif"), labels)
    return root


def test_objects_that_never_touch_say_what_an_empty_borders_plane_means(tmp_path):
    apart = separate_objects(str(tmp_path / "inputs" / "apart"))
    said = [m for m in load(tmp_path / "inputs" / "apart", target="objects", num_classes=2, loss="BorderWeightedLoss",
                            class_names=["objects", "borders"]) if "touch" in m]
    assert len(said) == 1 and "borders plane of --target objects is empty" in said[0]
    assert "val_iou averages in an empty plane" in said[0] and "--target masks" in said[0]
    assert os.path.isdir(apart)
    separate_objects(str(tmp_path / "inputs" / "near"), touching=True)
    assert not [m for m in load(tmp_path / "inputs" / "near", target="objects", num_classes=2,
                                loss="BorderWeightedLoss", class_names=["objects", "borders"]) if "touch" in m]


# --- end to end: a run named before the rule, in a runs folder with a space ----------------------------------------

@pytest.mark.e2e
@pytest.mark.slow(seconds=30)
def test_a_run_named_before_the_rule_is_resumed_evaluated_and_compared_with_the_commands_printed(tmp_path, monkeypatch,
                                                                                                capsys):
    make_data(tmp_path / "inputs", size=32, n=10)
    fast = ["--dataset", "tiny", "--arch", "UNet", "--base_channels", "8", "-b", "4", "--input_w", "32", "--input_h",
            "32", "--num_workers", "0", "--epochs", "1", "--runs_dir", "my runs"]
    code, out, err = run_main(train.main, fast + ["--name", "old"], tmp_path, monkeypatch, capsys)
    assert code == 0, err
    os.rename(tmp_path / "my runs" / "old", tmp_path / "my runs" / "my run ü")   # as an older version named it
    code, out, err = run_main(train.main, ["--name", "my run ü", "--runs_dir", "my runs", "--resume"], tmp_path,
                              monkeypatch, capsys)
    assert code == 0 and "nothing to do" in out, err
    longer = pasted(out, "To train it longer: ")
    assert longer[:7] == ["python", "train.py", "--name", "my run ü", "--runs_dir", "my runs", "--resume"]
    longer[longer.index("--epochs") + 1] = "2"                          # one epoch more than it has, not ten
    code, out, err = run_main(train.main, longer[2:], tmp_path, monkeypatch, capsys)      # pasted, it trains on
    assert code == 0 and "resuming after epoch 1" in out, err
    evaluate = pasted(out, "evaluate with: ")
    assert evaluate == ["python", "val.py", "--name", "my run ü", "--runs_dir", "my runs"]
    code, out, err = run_main(val.main, evaluate[2:], tmp_path, monkeypatch, capsys)
    assert code == 0 and "IoU:" in out, err
    code, out, err = run_main(compare.main, ["--runs_dir", "my runs"], tmp_path, monkeypatch, capsys)
    assert code == 0 and "my run ü" in out, err
    code, out, err = run_main(train.main, fast + ["--name", "my run 2"], tmp_path, monkeypatch, capsys)
    assert code == 2 and "e.g. --name my_run_2" in err and not os.path.exists(tmp_path / "my runs" / "my run 2")
    assert yaml.safe_load(open(tmp_path / "my runs" / "my run ü" / "config.yml"))["name"] == "my run ü"


# --- a run folder or a data folder that is not what it seems -------------------------------------------------------

@pytest.mark.parametrize("name, make", [("model.pth", os.makedirs), ("log.csv", os.makedirs),
                                        ("last.pth", lambda p: os.symlink("/nowhere/last.pth", p))])
@pytest.mark.parametrize("flags", [{"resume": True, "overwrite": False}, {"resume": False, "overwrite": True}])
def test_a_run_file_that_is_a_folder_or_a_broken_link_is_named_not_blamed_on_the_disk(tmp_path, name, make, flags):
    """model.pth replaced by a folder: --resume said 'nothing to do' and --overwrite 'free space or make the folder
    writable'; now both name the path and what it is, before anything is removed."""
    run_dir = tmp_path / "r"
    os.makedirs(run_dir)
    (run_dir / "config.yml").write_text("name: r\n")
    make(str(run_dir / name))
    with pytest.raises(UserError) as e:
        rundir.prepare(str(run_dir), flags, write=True)
    kind = "a folder" if name != "last.pth" else "not a file"
    assert str(e.value).startswith(f"{run_dir / name} is {kind}, where a run keeps its {name} file")
    assert "free space" not in str(e.value) and (run_dir / "config.yml").exists()


@pytest.mark.parametrize("entries, says, not_said", [
    (["images/", "masks/"], "it holds only folders (images, masks); the images must be files directly inside it, "
     "named <id>.png; for a data set's images, give its images/ folder", "--img_ext"),
    (["README", "scan001"], "it holds 2 file(s) without an extension (README, scan001), which --img_ext cannot choose",
     "(none)"),
    (["a.tif", "notes/"], "(it holds files ending in .tif)", "only folders")])
def test_a_folder_without_the_images_asked_for_says_what_it_holds(tmp_path, entries, says, not_said):
    from pairing import find_ids
    for entry in entries:
        os.makedirs(tmp_path / entry) if entry.endswith("/") else (tmp_path / entry).write_bytes(b"x")
    with pytest.raises(UserError) as e:
        find_ids(str(tmp_path), ".png")
    assert says in str(e.value) and not_said not in str(e.value)


def test_val_words_a_missing_folder_by_the_flag_that_named_it(tmp_path):
    from dataerror import DataError
    os.makedirs(tmp_path / "cells" / "images")
    error = DataError("folder x does not exist", setting="data")
    cfg = config.DEFAULTS
    assert "edit data_dir in r's config.yml" in val.data_fix(error, cfg, "r")
    said = val.data_fix(error, cfg, "r", ("--data", str(tmp_path / "cells" / "images")))
    assert said == f"pass --data the folder that holds images/ and masks/<class>/ (or labels/) (e.g. --data " \
                   f"{tmp_path / 'cells'})" and "data_dir" not in said
    assert val.data_fix(error, cfg, "r", ("--images", "new")) == "pass --images the folder that holds the image files"
