import os

import pytest

import config
from conftest import ROOT
from utils import UserError, save_yaml


def test_defaults_and_reference_name():
    cfg, run = config.resolve([])
    assert cfg["arch"] == "NestedUNet" and cfg["batch_size"] == 16 and cfg["lr"] == 1e-3
    assert cfg["name"] == "dsb2018_96_NestedUNet_woDS" and run == {"config": None, "resume": False, "overwrite": False, "runs_dir": "models", "changes": [], "sources": {}, "plan": None, "plan_lines": [], "init": None}
    cfg, _ = config.resolve(["-a", "NestedUNet", "--deep_supervision", "True", "-b", "4"])
    assert cfg["name"] == "dsb2018_96_NestedUNet_wDS" and cfg["batch_size"] == 4


def test_bool_flag_alone_or_with_value():
    assert config.resolve(["--nesterov"])[0]["nesterov"] is True
    assert config.resolve(["--nesterov", "FALSE"])[0]["nesterov"] is False


def test_config_file_then_flags_win(tmp_path):
    p = str(tmp_path / "config.yml")
    save_yaml(p, {**config.DEFAULTS, "name": "a", "epochs": 7, "lr": "1e-2", "milestones": "3,5"})
    cfg, run = config.resolve(["--config", p, "--epochs", "5", "--name", "b"])
    assert (cfg["epochs"], cfg["name"], cfg["lr"], cfg["milestones"]) == (5, "b", 0.01, [3, 5])
    assert run["config"] == p


@pytest.mark.parametrize("content, pattern", [
    ("lrr: 0.1\n", "unknown key 'lrr'.*Did you mean 'lr'"),
    ("epochs: ten\n", "key 'epochs' has the value 'ten'.*whole number"),
    ("epochs: 2.5\n", "key 'epochs'"),
    ("nesterov: perhaps\n", "key 'nesterov'.*true or false"),
    ("milestones: [1, x]\n", "key 'milestones'"),
    ("optimizer: Adagrad\n", "optimizer must be one of SGD, Adam, AdamW, RMSprop"),
    ("input_w: 100\n", "input_w 100 is not a multiple of 16"),
    ("arch: UNet\ndeep_supervision: true\n", "deep_supervision needs --arch NestedUNet"),
    ("class_mode: softmax\nnum_classes: 3\n", "softmax needs a softmax loss"),
    ("loss: CEDiceLoss\n", "is for --class_mode softmax"),
    ("arch: a/b\n", "arch must be one of UNet, NestedUNet, not 'a/b'"),   # not the run name made from it
    ("epochs: [\n", "not valid YAML"),
])
def test_bad_config_files_name_the_key(tmp_path, content, pattern):
    p = tmp_path / "config.yml"
    p.write_text(content)
    with pytest.raises(UserError, match=pattern) as e:
        config.resolve(["--config", str(p)])
    assert str(p) in str(e.value)


def test_bad_flag_values_are_refused_by_argparse():
    with pytest.raises(SystemExit):
        config.resolve(["--arch", "ResNet"])
    with pytest.raises(UserError, match="input_h 50"):
        config.resolve(["--input_h", "50"])


@pytest.mark.parametrize("recipe", sorted(os.listdir(os.path.join(os.path.dirname(__file__), "..", "recipes"))))
def test_every_recipe_is_a_valid_config(recipe):
    cfg = config.load_run_config(os.path.join(os.path.dirname(__file__), "..", "recipes", recipe))
    assert cfg["optimizer"] != "SGD" and cfg["epochs"] >= 20          # the recipes are not the reference defaults


def test_the_readme_flag_table_lists_every_setting():
    with open(os.path.join(ROOT, "docs", "flags.md")) as f:
        readme = f.read()
    missing = [k for k in config.DEFAULTS if f"| `--{k}" not in readme]
    assert missing == []


def test_a_run_saved_before_normalize_existed_loads_as_imagenet(tmp_path):
    run_dir = tmp_path / "old"
    run_dir.mkdir()
    saved = {k: v for k, v in config.DEFAULTS.items() if k not in ("normalize", "norm_pmin", "norm_pmax")}
    save_yaml(str(run_dir / "config.yml"), {**saved, "name": "old"})
    cfg, _ = config.saved_config(str(run_dir))
    assert cfg["normalize"] == "imagenet"                  # what every run trained on 8-bit PNGs used
    save_yaml(str(run_dir / "config.yml"), {**saved, "name": "old", "normalize": "percentile"})
    assert config.saved_config(str(run_dir))[0]["normalize"] == "percentile"


@pytest.mark.parametrize("argv, pattern", [
    (["--norm_pmin", "99", "--norm_pmax", "1"], "norm_pmin 99 must be below norm_pmax 1"),
    (["--norm_pmax", "101"], "norm_pmax must be a percentile"),
    (["--input_channels", "0"], "input_channels must be between 1 and 64"),
])
def test_normalisation_and_channel_settings_are_checked(argv, pattern):
    with pytest.raises(UserError, match=pattern):
        config.resolve(argv)


@pytest.mark.parametrize("text, says", [
    ("milestones: " + "[" * 100_000 + "]" * 100_000 + "\n", "nested more than 16 levels"),
    ("class_names: [[[[[[[[[[[[[[[[[[a]]]]]]]]]]]]]]]]]]\n", "nested more than 16 levels"),
    ("epochs: 99999999999999999999999999\n", "epochs must be between 1 and 1000000"),
    ("batch_size: 10000000000\n", "batch_size must be between 1 and 1000000"),
    ("patience: 123456789012\n", "patience must be between 0 and 1000000"),
    ("num_workers: 100000\n", "num_workers must be between 0 and 1024"),
    ("milestones: [" + ", ".join(["5"] * 1001) + "]\n", "a list of at most 1000 epochs"),
    ("class_names: {a: 1}\n", "class_names"),
    ("lr: 0.1\n" + "# padding\n" * 40_000, "a config is a few KB"),
])
def test_config_files_without_bounds_are_refused_by_key(tmp_path, text, says):
    """A config file is untrusted input: nesting depth, file size, list lengths and every number are bounded, and
    each refusal is one UserError (no RecursionError, no run of 10^26 epochs, no class named "{'a': 1}")."""
    path = tmp_path / "cfg.yml"
    path.write_text(text)
    with pytest.raises(UserError, match=says):
        config.resolve(["--config", str(path)])


def test_the_image_type_comes_from_the_folder_when_not_given(tmp_path):
    """A folder of TIFFs trains without --img_ext .tif (said in a line); a given --img_ext, a folder of mixed types
    and a folder of the default's type keep the setting."""
    data = tmp_path / "inputs" / "cells"
    for folder, names in (("images", ["a.TIF", "b.tiff"]), ("masks/0", ["a.png", "b.png"])):
        os.makedirs(data / folder)
        for n in names:
            (data / folder / n).write_bytes(b"")
    base = ["--data_dir", str(tmp_path / "inputs"), "--dataset", "cells"]
    cfg, run = config.resolve(base)
    assert cfg["img_ext"] == ".tif" and cfg["mask_ext"] == ".png"
    assert any(line.startswith("img_ext: .tif (every file in") for line in run["plan_lines"])
    assert config.resolve(base + ["--img_ext", ".tiff"])[0]["img_ext"] == ".tiff"        # the user's word wins
    (data / "images" / "c.png").write_bytes(b"")
    cfg, run = config.resolve(base)
    assert cfg["img_ext"] == ".png" and run["plan_lines"] == []                          # mixed: the default stays



def test_a_plan_says_the_image_type_came_from_the_folder_not_from_the_user(tmp_path):
    from conftest import make_microscopy
    make_microscopy(tmp_path / "inputs", "micro")                     # 16-bit TIFF images and label images
    cfg, run = config.resolve(["--data_dir", str(tmp_path / "inputs"), "--dataset", "micro", "--plan", "auto",
                               "--device", "cpu"])
    assert cfg["img_ext"] == ".tif"
    assert any("set by the files in" in line and line.endswith(": img_ext") for line in run["plan_lines"])
    assert not any("kept as given" in line and "img_ext" in line for line in run["plan_lines"])


def test_each_setting_is_one_record_that_every_table_and_flag_comes_from():
    names = [s.name for s in config.SETTINGS]
    assert len(set(names)) == len(names) and list(config.DEFAULTS) == names == list(config.TYPES)
    assert all(s.group in config.GROUPS for s in config.SETTINGS)
    listed = [s.name for title in config.GROUPS for s in config.section(title)]       # each --help section once
    assert sorted(listed) == sorted(names)
    assert all(s.requirement(s.default) is None for s in config.SETTINGS if s.default is not None)
    assert set(config.RESUMABLE) == {s.name for s in config.SETTINGS if s.resumable}
    assert config.CHOICES["optimizer"] == config.OPTIMIZERS and "lr" not in config.CHOICES


def test_help_lists_the_sections_in_order_with_short_flags(capsys):
    with pytest.raises(SystemExit):
        config.build_parser("x").parse_args(["--help"])
    out = capsys.readouterr().out
    positions = [out.index(f"\n{title}:\n") for title in config.GROUPS]
    assert positions == sorted(positions)
    assert "--batch_size BATCH_SIZE, -b BATCH_SIZE" in out and "--arch {UNet,NestedUNet}, -a {UNet,NestedUNet}" in out
    assert "--name NAME" in out and "None" not in out          # the run name says its own default


def test_resume_changes_only_how_long_and_where_a_run_goes_on(tmp_path):
    runs = tmp_path / "runs"
    os.makedirs(runs / "r")
    save_yaml(str(runs / "r" / "config.yml"), {**config.DEFAULTS, "name": "r"})
    base = ["--name", "r", "--resume", "--runs_dir", str(runs)]
    cfg, run = config.resolve(base + ["--epochs", "5", "--device", "cpu"])
    assert cfg["epochs"] == 5 and run["changes"] == ["epochs 100 -> 5", "device auto -> cpu"]
    with pytest.raises(UserError) as e:
        config.resolve(base + ["--lr", "0.1"])
    assert str(e.value).startswith("--resume: the command line (--lr) sets lr to 0.1, but ")
    assert str(e.value).endswith(" --lr 0.1. Only epochs, early_stopping, time_budget, num_workers, cache_mb, loader, "
                                 "device, amp, memory_format, compile, cuda_graph, save_every, deterministic, data_dir, "
                                 "class_names may change on resume.")



def test_the_class_names_come_from_masks_names_txt_unless_given(tmp_path):
    from conftest import make_data
    root = make_data(tmp_path / "inputs", "three", num_classes=3, exclusive=True, names=True)
    base = ["--data_dir", str(tmp_path / "inputs"), "--dataset", "three", "--num_classes", "3"]
    cfg, run = config.resolve(base)
    assert cfg["class_names"] == ["background", "ellipse", "square"]
    assert any(line.startswith("class_names: background,ellipse,square (from ") for line in run["plan_lines"])
    assert config.resolve(base + ["--class_names", "a,b,c"])[0]["class_names"] == ["a", "b", "c"]
    # a count that is not num_classes: the file is left to the class folders' own message
    assert config.resolve(base[:-2])[0]["class_names"] == []
    with open(os.path.join(root, "masks", "names.txt"), "a") as f:
        f.write("extra\n")
    with pytest.raises(UserError, match="names.txt names 4 class"):
        config.resolve(base)


@pytest.mark.parametrize("argv, says", [
    (["--invert_mask", "--num_classes", "2"], "invert_mask trains on the complement of one class's mask, and this run "
                                              "has num_classes 2"),
    (["--invert_mask", "--target", "objects"], "this run has target objects"),
])
def test_invert_mask_is_for_one_class_of_masks(argv, says):
    assert config.resolve(["--invert_mask"])[0]["invert_mask"] is True
    with pytest.raises(UserError, match=says):
        config.resolve(argv)
