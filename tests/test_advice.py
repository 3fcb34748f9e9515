"""advice.py: the start-up notes and the trivial predictions a model has to beat."""
import os

import cv2
import numpy as np
import pytest

import advice
import train
import val
from conftest import make_data, run_main

CFG = {"crop": False, "input_w": 96, "input_h": 96, "batch_size": 16, "loss": "BCEWithLogitsLoss",
       "class_mode": "sigmoid"}


def test_images_shrunk_more_than_twice_get_a_note_suggesting_crops():
    note = advice.shrunk_note([(512, 512)] * 3, CFG)
    assert "median 512x512" in note and "shrunk 5.3x" in note and "--crop" in note
    assert advice.shrunk_note([(512, 512)] * 3, {**CFG, "crop": True}) == ""
    assert advice.shrunk_note([(192, 192)] * 3, CFG) == ""               # exactly 2x: no note


def test_one_rule_says_when_an_image_is_shrunk_enough_to_warn():
    """train.py's note (on the median size) and val.py's --tile note (on each image) both ask this."""
    assert not advice.shrunk_enough_to_warn((192, 192), CFG)              # exactly SHRINK_WARN: no note
    assert advice.shrunk_enough_to_warn((193, 10), CFG) and advice.shrunk_enough_to_warn((10, 193), CFG)  # either side
    assert advice.shrink_factor((96, 480), CFG) == 5.0


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
