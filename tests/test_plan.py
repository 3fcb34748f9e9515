"""plan.py: the survey of a data set, each planning rule, and train.py --plan auto as a user runs it."""
import os
from dataclasses import replace

import cv2
import numpy as np
import pytest
import yaml

import advice
import config
import plan
import train
from conftest import make_data, make_microscopy, run_main
from dataset import region_id
from splits import REGION_MARGIN, crops_per_epoch, image_regions, largest_crop, region_length, windows
from utils import UserError

CPU = plan.Machine(cuda=False, memory=24 * 2**30)
GPU = plan.Machine(cuda=True, memory=140 * 2**30)
SMALL = plan.Survey(images=670, height=96, width=96, smallest=96, largest=96, channels=3, dtype="uint8", classes=1,
                    foreground=(0.15,), object_size=9.0)
LARGE = replace(SMALL, images=30, height=512, width=512, smallest=512, largest=512, channels=1, object_size=14.0)


def planned(s, m=CPU, **given):
    """The settings make_plan chooses for survey s on machine m, with the user's keys `given` kept."""
    choices = plan.make_plan(s, m, {**config.DEFAULTS, **given}, set(given))
    return {k: v for c in choices for k, v in c.settings.items()}, choices


def reason(choices, key):
    return next(c.reason for c in choices if key in c.settings)


def test_small_images_of_one_size_train_whole_at_their_own_size():
    got, choices = planned(SMALL)
    assert (got["crop"], got["input_h"], got["input_w"]) == (False, 96, 96)
    assert "96x96: trained whole, at their own size" in reason(choices, "crop")
    assert got["batch_size"] == 16 and got["epochs"] == 46          # 536 // 16 = 33 steps per epoch, ~1500 steps
    assert got["arch"] == "UNet" and got["ema"] == 0.995            # 1518 steps: averaged over about the last 200


def test_sizes_off_the_multiple_of_16_are_rounded_to_the_nearest():
    got, _ = planned(replace(SMALL, height=100, width=70, smallest=70, largest=100))
    assert (got["crop"], got["input_h"], got["input_w"]) == (False, 96, 64)


def test_large_images_train_on_crops_and_few_images_get_small_batches_and_more_epochs():
    got, choices = planned(LARGE)
    assert (got["crop"], got["input_h"], got["input_w"]) == (True, 128, 128)
    assert "512x512, objects median 14 px: trained on 128x128 crops" in reason(choices, "crop")
    assert got["batch_size"] == 2 and "12 optimizer steps per epoch" in reason(choices, "batch_size")
    assert got["epochs"] == 125 and got["ema"] == 0.995              # ceil(1500 / 12)
    assert advice.steps_note(24, {**config.DEFAULTS, **got}) == ""    # the plan never earns its own warning
    assert advice.resize_notes(["a"], [(512, 512)], {**config.DEFAULTS, **got}) == []


def test_large_objects_get_larger_crops_and_small_images_smaller_ones():
    got, _ = planned(replace(LARGE, object_size=60.0))
    assert got["input_w"] == 176                                      # 3 objects of 60 px across, a multiple of 16
    got, _ = planned(replace(LARGE, object_size=200.0))
    assert got["input_w"] == 256                                      # at most twice the 128 crop
    got, choices = planned(replace(LARGE, smallest=100, largest=400))
    assert got["crop"] and got["input_w"] == 96                       # never larger than the smallest image
    assert "from 100 to 400 px a side" in reason(choices, "crop")


def test_images_of_very_different_sizes_train_on_crops_even_when_small():
    got, _ = planned(replace(SMALL, smallest=40, largest=200))
    assert got["crop"] and got["input_w"] == 32


def test_very_few_images_get_the_smallest_batch_and_the_most_epochs():
    got, choices = planned(replace(SMALL, images=3))               # 2 training images: 1 step per epoch
    assert got["batch_size"] == 2 and "smallest batch" in reason(choices, "batch_size")
    assert got["epochs"] == plan.EPOCHS[1]


def test_many_images_get_large_batches_and_the_fewest_epochs():
    got, _ = planned(replace(SMALL, images=20000, height=64, width=64, smallest=64, largest=64))
    assert got["batch_size"] == 32 and got["epochs"] == plan.EPOCHS[0]


def test_a_gpu_gets_unet_plus_plus_larger_inputs_and_batches_that_fit_its_memory():
    got, _ = planned(LARGE, GPU)
    assert got["arch"] == "NestedUNet" and (got["crop"], got["input_w"]) == (False, 512)
    assert got["batch_size"] == 2                                     # 24 images: 12 steps
    many = replace(LARGE, images=2000)
    assert planned(many, GPU)[0]["batch_size"] == 8                   # 8 x 512 x 512 pixels per step at most
    small_gpu = replace(GPU, memory=8 * 2**30)                         # NestedUNet: 8 KB a pixel -> 2 GiB an image
    assert planned(many, small_gpu)[0]["batch_size"] == 2


def test_grayscale_and_16_bit_images_get_one_channel_and_percentile_normalisation():
    got, choices = planned(replace(SMALL, channels=1, dtype="uint16"))
    assert got["input_channels"] == 1 and got["normalize"] == "percentile"
    assert "uint16 images" in reason(choices, "normalize")
    assert planned(SMALL)[0]["normalize"] == "imagenet"


def test_8_bit_images_are_standardised_one_by_one_and_wider_types_by_percentiles():
    for brightness in ((0.02, 0.62), (0.51, 0.56)):                  # dsb2018_96's spread, and images alike (em)
        got, choices = planned(replace(SMALL, brightness=brightness))
        assert got["normalize"] == "imagenet" and got["per_image_norm"] is True
        assert f"{100 * brightness[0]:.0f}% to {100 * brightness[1]:.0f}% of the range" in reason(choices, "per_image_norm")
    assert planned(replace(SMALL, dtype="uint16"))[0]["per_image_norm"] is False     # percentiles already
    assert "per_image_norm" not in planned(SMALL, per_image_norm=False)[0]           # the user's kept


def test_the_weights_are_always_averaged_over_about_a_seventh_of_the_run():
    for s, m, steps in ((SMALL, CPU, 1500), (LARGE, GPU, 3000), (replace(SMALL, images=20000), CPU, 5000)):
        got, choices = planned(s, m)
        total = plan.steps_per_epoch(s, {**config.DEFAULTS, **got}) * got["epochs"]
        assert total >= steps * 0.95
        assert got["ema"] == round(min(0.995, max(0.99, 1 - 7 / total)), 3) and 0.99 <= got["ema"] <= 0.995
        assert f"of the run's {total} steps" in reason(choices, "ema")
    assert planned(replace(SMALL, images=3))[0]["ema"] == 0.99      # 400 steps: the least averaging
    assert planned(replace(LARGE, images=2000), GPU)[0]["ema"] == 0.995


def test_classes_that_share_pixels_get_a_sigmoid_each_and_a_rare_class_a_loss_that_sees_it():
    got, choices = planned(replace(SMALL, classes=3, foreground=(0.2, 0.1, 0.004), overlap=(0.03, 0.05), unmarked=0.7))
    assert (got["num_classes"], got["class_mode"], got["loss"]) == (3, "sigmoid", "BCEDiceLoss")
    assert "3.0% of the marked pixels are in two or more classes" in reason(choices, "loss")
    assert "class 2 (0.40% of the pixels)" in reason(choices, "loss")  # a rare class, and why the loss suits it


def test_exclusive_classes_get_softmax_and_the_unmarked_pixels_are_said_to_be_class_0():
    street = replace(SMALL, classes=11, foreground=(0.3,) + (0.062,) * 10, overlap=(0.0, 0.0), unmarked=0.08)
    got, choices = planned(street)
    assert (got["num_classes"], got["class_mode"], got["loss"]) == (11, "softmax", "CEDiceLoss")
    assert "the classes are exclusive" in reason(choices, "loss")
    assert "the 8.0% of the pixels no class marks count as class 0, the background" in reason(choices, "loss")
    # the same classes sharing 1% of their pixels, or with most pixels in none while masks/0 is a class of its own
    assert planned(replace(street, overlap=(plan.OVERLAP, plan.OVERLAP)))[0]["class_mode"] == "sigmoid"
    got, choices = planned(replace(street, unmarked=0.6))
    assert got["class_mode"] == "sigmoid" and "60% of the pixels are in none" in reason(choices, "loss")
    assert "make masks/0 the background" in reason(choices, "loss")


def test_a_background_in_masks_0_gives_softmax_whether_drawn_under_the_other_classes_or_beside_them():
    beside = replace(SMALL, classes=3, foreground=(0.7, 0.2, 0.1), overlap=(0.004, 0.04), unmarked=0.0)
    under = replace(beside, foreground=(1.0, 0.2, 0.1), overlap=(0.3, 0.0))     # masks/0 marks every pixel
    for s in (beside, under):
        got, choices = planned(s)
        assert (got["class_mode"], got["loss"]) == ("softmax", "CEDiceLoss")
        assert f"masks/0 covers {100 * s.foreground[0]:.0f}%" in reason(choices, "loss")
    assert planned(replace(under, overlap=(0.3, 0.2)))[0]["class_mode"] == "sigmoid"   # classes 1.. overlap too


def test_the_class_names_of_the_data_set_come_with_the_classes_unless_given():
    named = replace(SMALL, classes=3, foreground=(0.8, 0.1, 0.1), names=("background", "cell", "vesicle"))
    got, choices = planned(named)
    assert got["class_names"] == ["background", "cell", "vesicle"] and "names from masks/names.txt" in reason(choices, "loss")
    assert "--class_names background,cell,vesicle" in next(c for c in choices if "loss" in c.settings).flags()
    assert "class_names" not in planned(named, class_names=["a", "b", "c"])[0]
    assert "class_names" not in planned(replace(named, names=()))[0]


def test_one_class_covering_most_pixels_is_said_and_its_inverse_offered():
    got, choices = planned(replace(SMALL, foreground=(0.78,)))
    assert "class 0 covers 78% of the pixels" in reason(choices, "loss") and "--invert_mask" in reason(choices, "loss")
    for s, given in ((replace(SMALL, foreground=(0.4,)), {}), (replace(SMALL, foreground=(0.78,)), {"invert_mask": True})):
        assert "--invert_mask" not in reason(planned(s, **given)[1], "loss")


def test_target_objects_plans_a_sigmoid_per_plane_and_surveys_the_label_images(tmp_path, monkeypatch):
    monkeypatch.setattr(plan, "time_training", lambda cfg, device: plan.Speed(0.1, 0.01))   # not what this tests
    got, choices = planned(replace(SMALL, classes=2, foreground=(0.15, 0.01)), target="objects", num_classes=2,
                           class_mode="sigmoid")
    assert got["loss"] == "BorderWeightedLoss" and "--target objects: a sigmoid per plane (objects, borders)" in reason(
        choices, "loss")
    micro = make_microscopy(tmp_path, n=6, size=48)
    cfg = config.DEFAULTS | {"img_ext": ".tif", "target": "objects", "num_classes": 2}
    s = plan.survey(micro, cfg, {"num_classes": "the command line"})
    assert s.classes == 2 and len(s.foreground) == 2 and 0 <= s.foreground[1] < s.foreground[0]
    given, sources = config.follow_target({**cfg, "dataset": os.path.basename(micro), "data_dir": str(tmp_path)},
                                          {"target": "the command line"})
    lines = plan.planned(given, sources)[2]
    assert "  set by --target objects: class_mode, class_names, loss, num_classes" in lines
    assert "  kept as given: target" in lines                           # the keys the target set are not "yours"


def test_the_users_settings_are_kept_and_the_rules_after_them_use_them():
    got, _ = planned(LARGE, batch_size=4)
    assert "batch_size" not in got and got["epochs"] == 250          # ceil(1500 / (24 // 4))
    got, _ = planned(LARGE, input_w=256)
    assert "input_w" not in got and got["input_h"] == 256 and got["crop"] is True
    got, _ = planned(SMALL, crop=True)
    assert "crop" not in got and got["input_w"] == 96
    got, _ = planned(replace(SMALL, classes=3, foreground=(0.2, 0.1, 0.1)), loss="CEDiceLoss")
    assert got["class_mode"] == "softmax" and "loss" not in got
    got, _ = planned(replace(SMALL, classes=3, foreground=(0.7, 0.2, 0.1)), class_mode="sigmoid")   # a background
    assert got["loss"] == "BCEDiceLoss"


@pytest.mark.parametrize("s", [SMALL, LARGE, replace(SMALL, images=3), replace(LARGE, smallest=17, largest=900),
                               replace(SMALL, classes=4, foreground=(0.9, 0.0, 0.05, 0.05)),
                               replace(SMALL, height=8, width=8, smallest=8, largest=8),
                               replace(LARGE, images=1, sizes=(("one", (512, 512)),))])
@pytest.mark.parametrize("m", [CPU, GPU])
def test_every_plan_is_a_valid_config(s, m):
    got, choices = planned(s, m)
    config.check({**config.DEFAULTS, **got})
    assert all(c.reason for c in choices) and len(got) == sum(len(c.settings) for c in choices)


def test_the_survey_reads_sizes_channels_depth_classes_cover_and_objects(tmp_path):
    import tifffile
    micro = make_microscopy(tmp_path, n=12, size=48)
    s = plan.survey(micro, config.DEFAULTS | {"img_ext": ".tif"}, {})
    assert (s.images, s.height, s.width, s.channels, s.dtype, s.classes) == (12, 48, 48, 1, "uint16", 1)
    folder = os.path.join(micro, "labels")
    labels = [tifffile.imread(os.path.join(folder, f)) for f in sorted(os.listdir(folder))]
    assert s.foreground[0] == pytest.approx(np.mean([(image > 0).mean() for image in labels]))   # all 12 are read
    areas = np.concatenate([np.bincount(image.ravel())[1:] for image in labels])
    diameters = np.sqrt(4 * areas[areas > 0] / np.pi)
    objects = diameters[(diameters >= plan.SPECK) & (diameters < 24)]       # not specks, below half the image's side
    assert s.object_size == pytest.approx(np.median(objects)) and len(objects) < len(diameters)   # some were specks
    three = make_data(tmp_path, "three", num_classes=3, exclusive=True, size=40)
    s = plan.survey(three, config.DEFAULTS, {})
    assert (s.classes, s.channels, s.dtype, s.height) == (3, 3, "uint8", 40)
    files = sorted(os.listdir(os.path.join(three, "images")))
    cover = [(cv2.imread(os.path.join(three, "masks", "0", f), 0) > 127).mean() for f in files]
    means = [cv2.imread(os.path.join(three, "images", f)).mean() / 255 for f in files]
    assert s.foreground[0] == pytest.approx(np.mean(cover)) and s.foreground[0] > 0.5
    assert s.brightness == pytest.approx(tuple(np.percentile(means, (10, 90))))    # of the images' mean intensities


def test_the_survey_measures_how_much_the_classes_share_and_leave_unmarked_and_reads_their_names(tmp_path):
    root = make_data(tmp_path, "shapes", n=12, size=64, num_classes=6, exclusive=True, void=True, names=True)
    s = plan.survey(root, config.DEFAULTS, {})
    files = sorted(os.listdir(os.path.join(root, "images")))
    stacks = [np.stack([cv2.imread(os.path.join(root, "masks", str(c), f), 0) > 127 for c in range(6)], 2)
              for f in files]
    marks = np.concatenate([m.sum(2).ravel() for m in stacks])
    above_0 = np.concatenate([m[:, :, 1:].sum(2).ravel() for m in stacks])
    assert s.classes == 6 and s.names == ("background", "ellipse", "square", "triangle", "ellipse 2", "square 2")
    assert s.unmarked == pytest.approx((marks == 0).mean()) and 0 < s.unmarked < plan.UNMARKED     # the void rings
    assert s.overlap == pytest.approx(((marks > 1).sum() / (marks > 0).sum(), (above_0 > 1).sum() / (above_0 > 0).sum()))
    got, choices = planned(s)
    assert got["class_mode"] == "softmax" and got["class_names"] == list(s.names)
    assert f"{100 * s.unmarked:.1f}% of the pixels in none" in s.line()


@pytest.mark.e2e
def test_train_plan_auto_prints_the_plan_and_saves_it_as_ordinary_keys(tmp_path, monkeypatch, capsys):
    make_data(tmp_path / "inputs", "cells", n=12, size=48, channels=1)
    argv = ["--dataset", "cells", "--plan", "auto", "--epochs", "1", "--base_channels", "8", "--num_workers", "0",
            "--name", "planned"]
    code, out, err = run_main(train.main, argv, tmp_path, monkeypatch, capsys)
    assert code == 0, err
    assert "plan for inputs/cells (12 images, median 48x48, 1 channel of uint8" in out
    assert "--crop false --input_h 48 --input_w 48" in out and "kept as given: base_channels, epochs" in out
    said = [line for line in out.splitlines() if line.startswith("expected: about ")]   # timed before training
    assert len(said) == 1 and "s a step, 4 steps, plus validation)" in said[0]          # 1 epoch of 4 steps
    assert out.index(said[0]) < out.index("\nconfig: ") < out.index("\nepoch 1/1 ")
    saved = yaml.safe_load(open(tmp_path / "models" / "planned" / "config.yml"))
    assert (saved["input_w"], saved["input_channels"], saved["batch_size"], saved["epochs"]) == (48, 1, 2, 1)
    assert saved["optimizer"] == "AdamW" and "plan" not in saved
    # a rerun from the saved config needs no plan and trains the same settings
    code, out, err = run_main(train.main, ["--config", "models/planned/config.yml", "--name", "again"], tmp_path,
                              monkeypatch, capsys)
    assert code == 0 and "plan for" not in out, err
    again = yaml.safe_load(open(tmp_path / "models" / "again" / "config.yml"))
    assert {k: v for k, v in again.items() if k != "name"} == {k: v for k, v in saved.items() if k != "name"}


def test_plan_with_resume_is_refused_and_a_bad_plan_value_is_one_message(tmp_path, monkeypatch, capsys):
    make_data(tmp_path / "inputs", "cells")
    code, _, err = run_main(train.main, ["--dataset", "cells", "--plan", "auto", "--resume"], tmp_path, monkeypatch,
                            capsys)
    assert code == 2 and "drop --plan" in err and "Traceback" not in err
    code, _, err = run_main(train.main, ["--dataset", "cells", "--plan", "manual"], tmp_path, monkeypatch, capsys)
    assert code == 2 and "--plan" in err and "auto" in err
    code, _, err = run_main(train.main, ["--dataset", "nowhere", "--plan", "auto"], tmp_path, monkeypatch, capsys)
    assert code == 2 and "inputs/nowhere does not exist" in err and "Traceback" not in err
    assert not os.path.exists(tmp_path / "models")


def test_a_membrane_set_is_mostly_foreground_with_thin_lines_and_is_planned_on_crops(tmp_path):
    from make_demo_data import generate_membranes
    root = tmp_path / "em"
    generate_membranes(str(root), n=4, size=320)
    s = plan.survey(str(root), config.DEFAULTS, {})
    from scipy import ndimage
    assert (s.images, s.height, s.channels, s.dtype) == (4, 320, 1, "uint8") and s.foreground[0] > 0.6
    masks = [cv2.imread(str(root / "masks" / "0" / f), 0) > 127 for f in sorted(os.listdir(root / "masks" / "0"))]
    assert s.foreground[0] == pytest.approx(np.mean([m.mean() for m in masks]))
    areas = np.concatenate([np.bincount(ndimage.label(m)[0].ravel())[1:] for m in masks])
    diameters = np.sqrt(4 * areas / np.pi)
    cells = diameters[(diameters >= plan.SPECK) & (diameters < 160)]          # the cells, not the whole image
    assert s.object_size == pytest.approx(np.median(cells))
    assert 5 < s.object_size < 60                                     # cells of ~25 px
    got, _ = planned(s)
    assert got["crop"] and got["input_w"] == 128 and got["input_channels"] == 1


def test_weight_average_is_described_within_the_run():
    long_run, short_run = plan.plan_ema(1518), plan.plan_ema(48)
    assert long_run.settings == {"ema": 0.995} and "the last 200 of the run's 1518 steps" in long_run.reason
    # a run shorter than the average's span: the average covers the whole run, never "the last 100 of 48"
    assert short_run.settings == {"ema": 0.99} and "the run's 48 steps" in short_run.reason
    assert "last" not in short_run.reason


# --- one or two large images: crops, with a region of each image held out for validation ----------------------------

ONE = replace(LARGE, images=1, height=1024, width=1024, smallest=1024, largest=1024, dtype="uint16",
              sizes=(("big", (1024, 1024)),))


def test_one_large_image_is_planned_on_crops_of_one_region_and_validated_on_another():
    plan.check_enough(ONE, config.DEFAULTS, set(), "inputs/big")              # no longer refused
    got, choices = planned(ONE)
    cfg = {**config.DEFAULTS, **got}
    assert (got["crop"], got["input_h"], got["input_w"]) == (True, 128, 128)
    assert "1 image of 1024x1024, too few to validate on whole images" in reason(choices, "crop")
    train_region, val_region = image_regions((1024, 1024), (128, 128), 0.2)
    copies = crops_per_epoch([train_region.size], (128, 128), got["batch_size"])
    steps = plan.steps_per_epoch(ONE, cfg)
    assert steps == copies // got["batch_size"] >= advice.MIN_STEPS               # what train.py's epoch will make
    assert advice.steps_note(copies, cfg) == ""                                   # the plan never earns that warning
    assert f"give {steps} optimizer steps per epoch in batches of {got['batch_size']}" in reason(choices, "batch_size")
    assert got["epochs"] * steps >= 0.95 * plan.TARGET_STEPS[False]
    line, = plan.region_line(ONE, cfg, "inputs/big")
    assert (f"validation on the bottom {val_region.size[0]} rows of the image (20%), training on {copies} random "
            f"128x128 crops an epoch from the top {train_region.bottom} rows, {REGION_MARGIN} rows apart") in line


def test_small_large_images_get_the_largest_crop_that_leaves_both_regions():
    s = replace(ONE, height=256, width=256, smallest=256, largest=256, object_size=9.0, sizes=(("a", (256, 256)),))
    got, _ = planned(s)
    assert got["input_w"] == largest_crop((256, 256), 0.2) < plan.CROP_SIDE[False]   # 112, not the rule's 128
    two = replace(s, images=2, width=320, sizes=(("a", (256, 320)), ("b", (256, 320))))
    got, _ = planned(two)
    line, = plan.region_line(two, {**config.DEFAULTS, **got}, "inputs/two")
    assert "validation on the right" in line and "columns of each of the 2 images" in line   # wider than high


def test_the_plan_refuses_a_split_by_regions_it_cannot_make_before_planning():
    two = replace(ONE, images=2, sizes=(("a", (1024, 1024)), ("b", (1024, 1024))))
    with pytest.raises(UserError, match="leaves 1 to train on; one or two large images train on crops of a region of "
                                        "each image, validated on another region, which --crop false turns off"):
        plan.check_enough(two, {**config.DEFAULTS, "crop": False}, {"crop"}, "inputs/two")
    tiny = replace(two, height=100, width=100, smallest=100, largest=100, sizes=(("a", (100, 100)), ("b", (100, 100))))
    with pytest.raises(UserError, match=f"too small for that: crops of {plan.MIN_CROP} px, the smallest the plan "
                                        f"trains on, need {region_length(plan.MIN_CROP, 0.2)} px"):
        plan.check_enough(tiny, config.DEFAULTS, set(), "inputs/two")
    with pytest.raises(UserError, match="--folds needs whole images"):
        plan.check_enough(replace(two, images=3), {**config.DEFAULTS, "folds": 2}, {"folds"}, "inputs/two")


def test_crops_given_too_large_for_the_regions_are_refused_before_any_plan_is_printed(tmp_path, monkeypatch, capsys):
    make_microscopy(tmp_path / "inputs", "one", n=1, size=256)
    for extra in (["--plan", "auto"], []):
        code, out, err = run_main(train.main, ["--dataset", "one", "--crop", "--input_h", "128", "--input_w", "128",
                                               *extra], tmp_path, monkeypatch, capsys)
        assert code == 2 and "plan for" not in out and "Traceback" not in err
        assert "cell0000 (256x256) is too small for that with --input_h 128" in err
        assert "Train on smaller crops (--input_h 112 or less)" in err
    assert not os.path.exists(tmp_path / "models")


@pytest.mark.e2e
def test_one_large_16_bit_image_trains_with_a_plan_and_val_py_scores_its_held_out_region(tmp_path, monkeypatch,
                                                                                       capsys):
    import tifffile
    import val
    make_microscopy(tmp_path / "inputs", "one", n=1, size=256)
    argv = ["--dataset", "one", "--plan", "auto", "--epochs", "1", "--base_channels", "8", "--num_workers", "0",
            "--name", "one"]
    code, out, err = run_main(train.main, argv, tmp_path, monkeypatch, capsys)
    assert code == 0, err
    saved = yaml.safe_load(open(tmp_path / "models" / "one" / "config.yml"))
    side, batch = saved["input_h"], saved["batch_size"]
    assert f"--crop --input_h {side} --input_w {side}" in out and f"--batch_size {batch} " in out   # as printed
    train_region, val_region = image_regions((256, 256), (side, side), saved["val_split"])
    assert f"validation on the bottom {val_region.size[0]} rows of the image" in out
    assert "split by regions (1 image, too few to validate on whole images)" in out
    with open(tmp_path / "models" / "one" / "split.csv") as f:
        assert f.read() == (f"id,subset\n{region_id('cell0000', train_region)},train\n"
                            f"{region_id('cell0000', val_region)},val\n")
    code, out, err = run_main(val.main, ["--name", "one", "--instances"], tmp_path, monkeypatch, capsys)
    assert code == 0, err
    rows = (tmp_path / "outputs" / "one" / "metrics.csv").read_text().splitlines()
    assert [r.split(",")[0] for r in rows[1:]] == [region_id("cell0000", val_region)]
    written = cv2.imread(str(tmp_path / "outputs" / "one" / "0" / f"{region_id('cell0000', val_region)}.png"), 0)
    assert written.shape == val_region.size                                      # the region, not the whole image
    labels = tifffile.imread(tmp_path / "inputs" / "one" / "labels" / "cell0000.tif")
    true_count = len(set(np.unique(val_region.cut(labels)).tolist()) - {0})
    assert f"{true_count} true" in out                                           # the objects of the region alone


def timed(m=CPU):
    """Machine m with a stand-in for the timing of its steps: a step costs its pixels times the network's width
    squared (and a fixed part), a validation image a third of its share; every config timed is recorded."""
    asked = []

    def speed(cfg):
        asked.append(dict(cfg))
        work = cfg["input_h"] * cfg["input_w"] * (cfg["base_channels"] / 32) ** 2
        return plan.Speed(step=0.01 + 7.5e-6 * cfg["batch_size"] * work, image=2.5e-6 * work)
    return replace(m, speed=speed), asked


def planned_cfg(s, m, **given):
    got, choices = planned(s, m, **given)
    return {**config.DEFAULTS, **given, **got}, choices


def seconds_said(line):
    """'expected: about 6m20s ...' -> 380."""
    import re
    h, m, sec = re.match(r"expected: about (?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?", line).groups()
    return 3600 * int(h or 0) + 60 * int(m or 0) + int(sec or 0)


def test_a_timed_plan_says_how_long_the_run_takes_and_plans_as_an_untimed_one_without_a_budget():
    m, asked = timed()
    cfg, _ = planned_cfg(LARGE, m)
    assert planned(LARGE, m)[0] == planned(LARGE)[0]                  # no budget: timing changes no setting
    line = plan.expected(LARGE, m, cfg)
    step = m.speed(cfg).step
    assert f"on this CPU ({step:.2f} s a step, 1500 steps, plus validation)" in line   # the planned network, timed
    assert asked[-1]["base_channels"] == 32 and asked[-1]["input_w"] == 128 and asked[-1]["batch_size"] == 2
    steps_alone = 1500 * step
    assert steps_alone <= seconds_said(line) <= 1.5 * steps_alone           # validation and loading are the rest
    assert plan.expected(LARGE, CPU, cfg) == ""                        # not timed: nothing said


@pytest.mark.parametrize("minutes", [30, 4, 1.5, 0.6])
def test_a_time_budget_plans_a_run_that_fits_making_it_cheaper_in_order_and_saying_what_it_gave_up(minutes):
    m, _ = timed()
    cfg, choices = planned_cfg(LARGE, m, time_budget=minutes)
    assert plan.run_seconds(LARGE, cfg, m.speed(cfg)) <= 60 * minutes * plan.BUDGET_USE
    line = plan.expected(LARGE, m, cfg)
    assert f"within the {minutes:g} min time budget" in line and seconds_said(line) <= 60 * minutes
    full, _ = planned_cfg(LARGE, m)
    narrower, smaller = cfg["base_channels"] < 32, cfg["input_w"] < full["input_w"]
    assert not smaller or cfg["base_channels"] == plan.NARROWER[-1]  # the width first, then the crops
    if narrower:
        assert f"{cfg['base_channels']} channels wide instead of 32, to fit the {minutes:g} min time budget" in reason(
            choices, "base_channels")
    if smaller:
        assert f"({full['input_w']}x{full['input_w']} without the time budget)" in reason(choices, "input_w")
    if cfg["epochs"] < full["epochs"]:
        assert f"{full['epochs'] - cfg['epochs']} given up" in reason(choices, "epochs")
    if minutes == 30:
        assert cfg == {**full, "time_budget": 30}                      # what fits is not made cheaper
    if minutes <= 1.5:
        assert narrower                                               # too few sensible epochs at full width


def test_a_time_budget_on_one_large_image_counts_the_validation_windows_of_its_region_and_fits():
    """Split by regions, an epoch validates on the crop-sized windows covering the validation region (splits.windows),
    not on one held-out image: the estimate counts them, and a tight budget shrinks the region crops too."""
    m, _ = timed()
    for minutes in (None, 0.6):
        cfg, choices = planned_cfg(ONE, m, **({"time_budget": minutes} if minutes else {}))
        crop = (cfg["input_h"], cfg["input_w"])
        _, val_region = image_regions((1024, 1024), crop, cfg["val_split"])
        inputs = len(windows(val_region, crop))
        assert plan.validation_inputs(ONE, cfg) == inputs > 1
        speed = m.speed(cfg)
        assert plan.epoch_seconds(ONE, cfg, speed) >= plan.steps_per_epoch(ONE, cfg) * speed.step + inputs * speed.image
        if minutes:
            assert plan.run_seconds(ONE, cfg, speed) <= 60 * minutes * plan.BUDGET_USE
            assert crop[0] < plan.CROP_SIDE[False] and "128x128 without the time budget" in reason(choices, "input_w")
            assert image_regions((1024, 1024), crop, cfg["val_split"])         # the smaller crops still fit both


def test_a_time_budget_keeps_the_users_settings_and_says_when_their_epochs_do_not_fit():
    m, _ = timed()
    cfg, _ = planned_cfg(LARGE, m, time_budget=1.5, base_channels=32)
    assert cfg["base_channels"] == 32 and cfg["input_w"] < 128          # the crops were made smaller instead
    cfg, choices = planned_cfg(LARGE, m, time_budget=1.5, epochs=400, input_w=128)
    assert cfg["epochs"] == 400 and "epochs" not in {k for c in choices for k in c.settings}
    line = plan.expected(LARGE, m, cfg)
    assert "more than the 1.5 min time budget, which stops training after about epoch" in line
    last = int(line.split("after about epoch ")[1].split()[0])
    assert 1 <= last < 400


def test_the_timer_times_each_network_once_and_never_one_that_cannot_fit(monkeypatch):
    timings = []
    monkeypatch.setattr(plan, "time_training", lambda cfg, device: timings.append(cfg) or plan.Speed(0.1, 0.01))
    timer = plan.Timer("cpu", memory=24 * 2**30)
    cfg = {**config.DEFAULTS, "arch": "UNet", "input_w": 128, "input_h": 128, "batch_size": 2}
    assert timer(cfg) == timer({**cfg, "epochs": 7, "ema": 0.995}) == plan.Speed(0.1, 0.01)
    assert len(timings) == 1                                            # the same network and batch: timed once
    timer({**cfg, "base_channels": 16})
    assert len(timings) == 2
    assert plan.Timer("cpu", memory=2**20)(cfg) is None and len(timings) == 2   # 1 MiB: not risked


def test_time_training_times_real_steps_and_leaves_the_random_state_alone():
    import torch
    cfg = {**config.DEFAULTS, "arch": "UNet", "base_channels": 4, "input_w": 32, "input_h": 32, "batch_size": 2,
           "input_channels": 1, "device": "cpu", "ema": 0.99}
    torch.manual_seed(5)
    before = torch.get_rng_state()
    speed = plan.time_training(cfg, "cpu")
    assert torch.equal(torch.get_rng_state(), before)
    assert speed.step > 0 and speed.image > 0


def test_the_batch_the_plan_falls_back_to_is_never_one_the_steps_note_argues_with():
    """The plan once said batch 2 was the smallest BatchNorm trains with, and then a note suggested --batch_size 1.
    On whole images (--crop false: two images would otherwise be split by regions, whose crops fill the batches)."""
    for images in (2, 3, 5, 8, 12, 19, 21, 25, 30, 60, 100, 670, 20000):
        s = replace(SMALL, images=images)
        got, choices = planned(s, crop=False)
        train_images = images - int(np.ceil(0.2 * images))
        assert advice.steps_note(train_images, {**config.DEFAULTS, **got}) == "", images
        assert got["batch_size"] <= train_images                        # never a batch that drops every image
        if got["batch_size"] == advice.MIN_BATCH and train_images // advice.MIN_BATCH < advice.MIN_STEPS:
            assert advice.MIN_BATCH_WHY in reason(choices, "batch_size")
    got, choices = planned(replace(SMALL, images=2), crop=False)        # one training image: batch 1, said plainly
    assert got["batch_size"] == 1 and "batch 1 (the one image)" in reason(choices, "batch_size")


def test_the_plan_says_a_rare_class_is_weighed_by_overlap_only_when_its_loss_does():
    s = replace(SMALL, classes=2, foreground=(0.2, 0.004))
    _, choices = planned(s)
    assert "weighs class 1 (0.40% of the pixels) by overlap" in reason(choices, "class_mode")
    cfg, choices = planned_cfg(s, CPU, loss="BCEWithLogitsLoss")
    assert "--loss BCEWithLogitsLoss (given)" in reason(choices, "class_mode")
    assert "by overlap" not in reason(choices, "class_mode")
    note = advice.rare_class_notes(np.array([[2000, 40]]), [(100, 100)], cfg)   # ... as the start-up note says
    assert len(note) == 1 and "with --loss BCEWithLogitsLoss a model can score well by missing it" in note[0]


def test_object_sizes_are_said_only_when_the_masks_are_objects(tmp_path):
    """Specks of a class and one region across the image are not objects: 'objects median 1 px' described nothing."""
    data = make_data(tmp_path, "specks", n=6, size=64, channels=1)
    rng = np.random.default_rng(0)
    for f in sorted(os.listdir(os.path.join(data, "masks", "0"))):
        mask = np.zeros((64, 64), np.uint8)
        mask[:40] = 255                                                 # a region as wide as the image (sky) ...
        mask[rng.integers(42, 64, 30), rng.integers(0, 64, 30)] = 255   # ... and specks of a pixel or two
        cv2.imwrite(os.path.join(data, "masks", "0", f), mask)
    s = plan.survey(data, config.DEFAULTS, {})
    assert s.object_size == 0 and "objects median" not in s.line()
    nuclei = plan.survey(make_data(tmp_path, "nuclei", n=6, size=64, channels=1), config.DEFAULTS, {})
    assert nuclei.object_size >= plan.SPECK and "objects median" in nuclei.line()
    assert plan.object_size(np.array([5.0, 6.0]), held=40, foreground=43) == 5.5               # specks aside
    assert plan.object_size(np.array([5.0]), held=20, foreground=4000) == 0.0                  # most not objects
