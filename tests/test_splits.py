"""splits.py: the reference's train/validation split, k folds inside its training part, and the loaded split."""
import pytest

from conftest import make_data
from splits import fold_ids, load_splits, split_for, split_ids
from utils import UserError


def test_split_is_the_reference_split():
    ids = [f"{i:03d}" for i in range(50)]
    tr, va = split_ids(ids, 0.2, 41)
    assert len(va) == 10 and sorted(tr + va) == ids
    assert split_ids(ids, 0.2, 41) == (tr, va)
    with pytest.raises(UserError, match="val_split"):
        split_ids(ids[:1], 0.2, 41)


@pytest.mark.parametrize("n,val_split,seed", [(50, 0.2, 41), (670, 0.2, 41), (7, 0.3, 0), (101, 0.5, 12345)])
def test_split_and_folds_equal_scikit_learns(n, val_split, seed):
    """The splits are written with NumPy (no scikit-learn import at start-up) but must stay the reference's."""
    from sklearn.model_selection import KFold, train_test_split
    ids = [f"img{i:04d}" for i in range(n)]
    assert split_ids(ids, val_split, seed) == tuple(train_test_split(ids, test_size=val_split, random_state=seed))
    train_ids = split_ids(ids, val_split, seed)[0]
    for folds in [k for k in (2, 3, 5) if k <= len(train_ids)]:
        for fold, (tr, va) in enumerate(KFold(folds, shuffle=True, random_state=seed).split(train_ids)):
            assert fold_ids(train_ids, folds, fold, seed) == ([train_ids[k] for k in tr], [train_ids[k] for k in va])


def test_load_splits_is_the_configs_split(tmp_path):
    make_data(tmp_path, "set", n=20)
    cfg = {"data_dir": str(tmp_path), "dataset": "set", "img_ext": ".png", "mask_ext": ".png", "num_classes": 1,
           "input_channels": 3, "cache_mb": 0, "val_split": 0.25, "split_seed": 3, "folds": 1, "fold": 0,
           "class_mode": "sigmoid"}
    train, val = load_splits(cfg)
    assert (train.ids, val.ids) == tuple(list(s) for s in split_ids([f"img{i:04d}" for i in range(20)], 0.25, 3))
    assert len(val.ids) == 5 and val.masks[0].shape == (32, 32, 1)


def test_folds_partition_the_training_split_and_never_touch_the_held_out_images():
    ids = [f"img{i:04d}" for i in range(50)]
    cfg = {"val_split": 0.2, "split_seed": 41, "folds": 4}
    outer_train, held_out = split_ids(ids, 0.2, 41)
    folds = [split_for(ids, {**cfg, "fold": i}) for i in range(4)]
    vals = [set(v) for _, v in folds]
    assert set().union(*vals) == set(outer_train) and sum(map(len, vals)) == len(outer_train)   # each image once
    for train, val in folds:
        assert not set(train) & set(val) and not (set(train) | set(val)) & set(held_out)
    assert split_for(ids, {**cfg, "fold": 2}) == folds[2]                                       # repeatable
    with pytest.raises(UserError, match="--folds 60 on a training split of 40 images"):
        split_for(ids, {**cfg, "folds": 60, "fold": 0})
