"""advice.py: the start-up notes and the trivial predictions a model has to beat."""
import os
from types import SimpleNamespace

import cv2
import numpy as np
import pytest

import advice
import train
import val
from conftest import make_data, run_main

CFG = {"crop": False, "input_w": 96, "input_h": 96, "batch_size": 16, "loss": "BCEWithLogitsLoss",
       "class_mode": "sigmoid"}


def ids(n):
    return [f"img{k:02d}" for k in range(n)]


def test_images_shrunk_more_than_twice_get_a_note_suggesting_crops():
    notes = advice.resize_notes(ids(3), [(512, 512)] * 3, CFG)
    assert len(notes) == 1 and "all 3 images (512x512) are shrunk 5.3x to the 96x96" in notes[0] and "--crop" in notes[0]
    assert "check them" not in notes[0]                                   # the whole set: not a few odd files
    assert advice.resize_notes(ids(3), [(512, 512)] * 3, {**CFG, "crop": True}) == []
    assert advice.resize_notes(ids(3), [(192, 192)] * 3, CFG) == []       # exactly 2x: no note
    assert advice.resize_notes(ids(3), [(48, 48)] * 3, CFG) == []         # exactly 2x the other way: none either


def test_each_image_is_judged_so_an_outlier_among_fitting_images_is_named_with_its_factor():
    """The median of 32x32 images fits a 32x32 input; one 20000x20 image is squashed 625x and one 1x1 image
    stretched 32x, and each note names its image, its size and its factor."""
    cfg = {**CFG, "input_w": 32, "input_h": 32}
    names, sizes = ids(20) + ["wide", "dot"], [(32, 32)] * 20 + [(20, 20000), (1, 1)]
    shrunk, stretched = advice.resize_notes(names, sizes, cfg)
    assert shrunk.startswith("1 of 22 images is shrunk more than 2x to the 32x32 network input: wide (20000x20, 625x)")
    assert stretched.startswith("1 of 22 images is stretched more than 2x to the 32x32 network input: dot (1x1, 32x)")
    assert "check them" in shrunk and "check them" in stretched           # a few odd files among many
    tall = advice.resize_notes(["tall"] + ids(4), [(300, 40)] + [(32, 32)] * 4, cfg)
    assert tall == [tall[0]] and "tall (40x300, 9.4x)" in tall[0]        # either side counts


def test_a_note_names_the_worst_few_images_first_and_counts_the_rest():
    sizes = [(96 * k, 96) for k in (3, 9, 4, 5, 6)] + [(96, 96)] * 5
    note = advice.resize_notes(ids(10), sizes, CFG)[0]
    assert "5 of 10 images are shrunk more than 2x" in note
    assert "img01 (96x864, 9.0x), img04 (96x576, 6.0x), img03 (96x480, 5.0x) and 2 more" in note


def test_a_set_of_small_images_is_told_a_smaller_input_that_fits_it():
    note, = advice.resize_notes(ids(12), [(30, 34)] * 10 + [(60, 60)] * 2, CFG)
    assert "10 of 12 images are stretched more than 2x" in note and "e.g. --input_w 32 --input_h 32" in note
    assert "check them" not in note
    note, = advice.resize_notes(ids(3), [(30, 34), (40, 40), (20, 20)], CFG)
    assert note.startswith("all 3 images are stretched more than 2x to the 96x96 network input: img02 (20x20, 4.8x)")


def test_one_rule_says_how_much_an_image_is_resized_either_way():
    """train.py's notes and val.py's note both ask resized_images, on each image."""
    assert advice.resize_factor((96, 480), CFG) == (5.0, "shrunk")
    assert advice.resize_factor((12, 96), CFG) == (8.0, "stretched")
    assert advice.resize_factor((20, 20000), {**CFG, "input_w": 32, "input_h": 32}) == (625.0, "shrunk")
    found = advice.resized_images(["a", "b", "c", "d"], [(193, 96), (96, 47), (192, 96), (48, 96)], CFG)
    assert [i for _, i, _ in found["shrunk"]] == ["a"] and [i for _, i, _ in found["stretched"]] == ["b"]


def test_val_notes_the_images_it_resizes_by_the_same_rule_and_suggests_tiles(capsys):
    from types import SimpleNamespace
    cfg = {**CFG, "input_w": 32, "input_h": 32}
    data = SimpleNamespace(ids=ids(10) + ["wide", "dot"], sizes=[(32, 32)] * 10 + [(20, 20000), (1, 1)])
    from predict import PredictOptions
    members = [SimpleNamespace(cfg=cfg, scale=None)]      # a run from before the scale was recorded: images resized
    val.resize_notes(data, members, PredictOptions())
    out = capsys.readouterr().out
    assert "wide (20000x20, 625x), which loses small detail" in out and "dot (1x1, 32x)" in out
    assert out.count("pass --tile") == 2
    val.resize_notes(data, members, PredictOptions(tile=True))
    assert capsys.readouterr().out == ""                                  # tiles: no image is resized
    val.resize_notes(data, [SimpleNamespace(cfg=cfg, scale=(1.0, 1.0))], PredictOptions())
    assert capsys.readouterr().out == ""                                  # at the run's own scale: none either
    val.resize_notes(data, members, PredictOptions(resize=True))
    assert capsys.readouterr().out.count("without --resize") == 2         # asked for: said, with the way back


def test_every_loss_but_the_plain_cross_entropies_weighs_classes_by_overlap():
    from losses import LOSSES, OVERLAP_LOSSES
    assert set(OVERLAP_LOSSES) == set(LOSSES) - {"BCEWithLogitsLoss", "CrossEntropyLoss"}


def test_few_optimizer_steps_get_a_note_with_a_batch_size_that_gives_more():
    note = advice.steps_note(24, CFG)
    assert "only 1 optimizer step(s)" in note and "--batch_size 2 gives 12 per epoch" in note
    assert advice.steps_note(160, CFG) == ""
    assert "only 2 optimizer" in advice.steps_note(160, CFG, processes=4)  # 16 per process, 4 processes


def test_the_steps_note_never_suggests_a_batch_below_the_plans_smallest():
    """One place (advice.batch_for_steps) decides how small a batch goes: at MIN_BATCH the note says nothing, where
    it once suggested --batch_size 1 right after the plan had said why 2 is the smallest."""
    for n_train in range(2, 400):
        for batch in (1, 2, 3, 4, 8, 16, 32):
            note = advice.steps_note(n_train, {**CFG, "batch_size": batch})
            if note:
                suggested = int(note.split("; --batch_size ")[1].split()[0])
                assert advice.MIN_BATCH <= suggested < batch and n_train // suggested > n_train // batch
    assert advice.steps_note(12, {**CFG, "batch_size": 2}) == ""            # 6 steps, but 2 is as small as it goes
    assert advice.batch_for_steps(1) == 1 and advice.batch_for_steps(19) == 2 and advice.batch_for_steps(400) == 40


def test_a_rare_class_gets_a_note_unless_the_loss_weighs_overlap():
    pixels = np.array([[50, 5000]])                                        # 0.5% and 50% of 100x100
    notes = advice.rare_class_notes(pixels, [(100, 100)], {**CFG, "num_classes": 2})
    assert len(notes) == 1 and notes[0].startswith("class 0 covers 0.50%") and "--loss BCEDiceLoss" in notes[0]
    assert advice.rare_class_notes(pixels, [(100, 100)], {**CFG, "loss": "BCEDiceLoss"}) == []


def test_one_class_covering_most_pixels_gets_a_note_offering_its_complement():
    cfg = {**CFG, "num_classes": 1, "target": "masks"}
    note = advice.majority_note(np.array([[78], [78]]), [(10, 10), (10, 10)], cfg)
    assert note.startswith("class 0 covers 78% of the training pixels") and "the other 22%" in note
    assert "--invert_mask" in note
    assert advice.majority_note(np.array([[50]]), [(10, 10)], cfg) == ""                       # half: no note
    assert advice.majority_note(np.array([[78]]), [(10, 10)], {**cfg, "invert_mask": True}) == ""
    assert advice.majority_note(np.array([[78, 5]]), [(10, 10)], {**cfg, "num_classes": 2}) == ""
    assert note in advice.startup_notes(cfg, SimpleNamespace(sizes=[(10, 10)] * 2, ids=["a", "b"] * 80,
                                                             target_pixels=np.array([[78], [78]])))


def test_trivial_predictions_score_as_the_metrics_count():
    pixels = np.array([[80, 0], [20, 0]])                                  # class 1 absent everywhere
    t = advice.trivial(pixels, [(10, 10), (10, 10)], "sigmoid")
    assert t.background == pytest.approx((0 + 1) / 2)                      # class 0: 0; absent class 1: 1
    assert t.foreground == pytest.approx((100 / 200 + 0) / 2)              # class 1 predicted where it is not: 0
    soft = advice.trivial(np.array([[60, 30, 10]]), [(10, 10)], "softmax")
    assert (soft.background, soft.foreground, soft.foreground_what) == (pytest.approx(0.6 / 3), pytest.approx(0.3 / 3),
                                                                        "class 1")


def test_beats_warns_below_the_margin_only():
    t = advice.Trivial(0.1, 0.8, "foreground")
    assert "does not beat predicting foreground everywhere (0.8000)" in advice.beats(0.82, t)
    assert advice.beats(0.86, t) == ""
    assert "--crop" in advice.beats(0.82, t) and "--crop" not in advice.beats(0.82, t, crop=True)  # crops already


@pytest.mark.parametrize("trivial, says", [(advice.Trivial(1.0, 0.0, "foreground"), "their masks mark (almost) nothing"),
                                           (advice.Trivial(0.97, 0.1, "foreground"), "mark (almost) nothing"),
                                           (advice.Trivial(0.0, 0.99, "foreground"), "mark (almost) every pixel")])
def test_a_trivial_score_no_model_can_beat_blames_the_masks_not_the_training(trivial, says):
    """Validation masks that mark nothing score 1 for 'background everywhere': 'train longer' would mislead."""
    warning = advice.beats(1.0, trivial)
    assert says in warning and "no model can beat it" in warning and "train longer" not in warning


@pytest.mark.e2e
def test_train_and_val_warn_when_the_model_does_not_beat_foreground_everywhere(tmp_path, monkeypatch, capsys):
    """Masks that cover most of each image: an untrained-looking run (lr 1e-9) scores about 'foreground
    everywhere', and both scripts say so."""
    data = make_data(tmp_path / "inputs")
    for f in os.listdir(os.path.join(data, "masks", "0")):                # 90% of each image is foreground
        mask = np.full((32, 32), 255, np.uint8)
        mask[:3] = 0
        cv2.imwrite(os.path.join(data, "masks", "0", f), mask)
    argv = ["--dataset", "tiny", "--arch", "UNet", "--base_channels", "8", "--epochs", "1", "-b", "4", "--input_w", "32", "--input_h", "32",
            "--num_workers", "0", "--optimizer", "SGD", "--lr", "1e-9", "--min_lr", "0", "--name", "lazy"]
    with pytest.warns(UserWarning, match="best val_iou .* does not beat predicting"):
        code, out, err = run_main(train.main, argv, tmp_path, monkeypatch, capsys)
    assert code == 0 and "trivial predictions score IoU" in out, err
    with pytest.warns(UserWarning, match="does not beat predicting"):
        code, out, err = run_main(val.main, ["--name", "lazy"], tmp_path, monkeypatch, capsys)
    assert code == 0 and "(foreground everywhere) on these images" in out, err
