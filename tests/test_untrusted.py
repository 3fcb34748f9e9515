"""Property tests (Hypothesis): every file the toolkit reads from a user or a colleague - a config file, a run's
model.json, a log.csv - ends in success or one UserError, never a traceback, whatever the document holds."""
import json
import os
import tempfile

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import compare
import config
import outputs
import predict
import predictor
import rundir
from utils import UserError

SCALARS = st.one_of(st.none(), st.booleans(), st.integers(min_value=-10**30, max_value=10**30),
                    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=20))
VALUES = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                                             max_size=4), max_leaves=12)
KEYS = st.sampled_from(sorted(config.DEFAULTS)) | st.text(min_size=1, max_size=12)
BOUNDED = settings(max_examples=int(os.environ.get("UNTRUSTED_EXAMPLES", 60)), deadline=2000, suppress_health_check=[HealthCheck.function_scoped_fixture])


@BOUNDED
@given(document=st.dictionaries(KEYS, VALUES, max_size=6))
def test_any_config_file_is_accepted_or_refused_with_one_message(tmp_path, document):
    path = tmp_path / "cfg.yml"
    path.write_text(yaml.safe_dump(document, allow_unicode=True))
    try:
        cfg, _ = config.resolve(["--config", str(path)])
    except UserError:
        return
    config.check(cfg)                      # what was accepted is a valid config


DESCRIPTION = {"format": "unet-toolkit-model/1", "arch": "UNet", "deep_supervision": False, "base_channels": 8,
               "input_channels": 1, "num_classes": 1, "class_mode": "sigmoid", "class_names": ["0"],
               "input_size": [32, 32], "size_multiple": 16, "input_dtype": "uint8",
               "normalize": {"mode": "imagenet", "pmin": 1.0, "pmax": 99.8, "per_image": False, "full_range": 255.0},
               "crop": False, "target": "masks", "scale": [1.0, 1.0]}


@BOUNDED
@given(changes=st.dictionaries(st.sampled_from(sorted(DESCRIPTION)), VALUES, max_size=4))
def test_any_model_json_gives_a_checked_config_or_one_message(tmp_path, changes):
    description = {**DESCRIPTION, **changes}
    cfg_path = str(tmp_path / "config.yml")
    try:
        cfg = predict.as_trained(dict(config.DEFAULTS, normalize="imagenet"), description, cfg_path,
                                 str(tmp_path / "model.json"))
        config.check(cfg)
        settings_cfg, _ = predict.settings_from_description(json.loads(json.dumps(description, default=str)),
                                                            rundir.RunFolder(str(tmp_path)))
        config.check(settings_cfg)
        scale = predictor.recorded_scale(description, cfg, str(tmp_path / "model.json"))
        assert scale is None or all(0 < s <= predictor.MAX_SCALE for s in scale)
    except UserError:
        return


@BOUNDED
@given(content=st.binary(max_size=300) | st.builds(
    lambda rows: ("epoch,lr,val_iou,seconds\n" + "\n".join(rows)).encode("utf-8"), st.lists(st.text(max_size=30), max_size=5)))
def test_any_log_csv_is_read_or_named_as_broken(tmp_path, content):
    path = tmp_path / "log.csv"
    path.write_bytes(content)
    try:
        rows = compare.checked_log(str(path))
    except UserError:
        return
    assert all(float(r["val_iou"]) == float(r["val_iou"]) for r in rows)    # numbers where the table reads them


NAMES = ("a", "b", "images", "masks")
MAKE = {"plain": lambda p: None, "data set": lambda p: [os.makedirs(os.path.join(p, d)) for d in ("images", "masks")],
        "run": lambda p: open(os.path.join(p, rundir.CONFIG), "w").close(),
        "export": lambda p: open(os.path.join(p, outputs.EXPORT_MARKER), "w").close()}


def holds(folder):
    """What the guard must see in folder, said independently of outputs.py: a data set, a run or an export."""
    isdir, exists = os.path.isdir, os.path.lexists
    return (isdir(os.path.join(folder, "images")) and isdir(os.path.join(folder, "masks"))) or \
        exists(os.path.join(folder, rundir.CONFIG)) or exists(os.path.join(folder, outputs.EXPORT_MARKER))


@BOUNDED
@given(layout=st.dictionaries(st.lists(st.sampled_from(NAMES), min_size=1, max_size=3).map(tuple),
                              st.sampled_from(sorted(MAKE)), max_size=6), data=st.data())
def test_the_guard_refuses_exactly_the_places_among_a_users_files(layout, data):
    """Any tree of data sets, runs and exports, any folder a script is asked to write (mostly one of the tree's, or
    a new one in it): refused (one UserError) if and only if it or a folder above it holds one of them, or it holds
    a run folder; never anything else."""
    anywhere = st.lists(st.sampled_from(NAMES + ("new",)), min_size=1, max_size=4).map(tuple)
    in_tree = sorted({parts[:k] for parts in layout for k in range(1, len(parts) + 1)})
    target = data.draw(st.one_of(st.sampled_from(in_tree), anywhere) if in_tree else anywhere)
    target += data.draw(st.lists(st.sampled_from(NAMES + ("new",)), max_size=1).map(tuple))
    with tempfile.TemporaryDirectory() as root:
        cwd = os.getcwd()
        os.chdir(root)
        try:
            for parts, kind in sorted(layout.items()):
                os.makedirs(os.path.join(*parts), exist_ok=True)
                MAKE[kind](os.path.join(*parts))
            path = os.path.join(*target)
            above = [os.path.join(*target[:k]) for k in range(1, len(target) + 1)]
            expected = any(holds(f) for f in above if os.path.isdir(f)) or (os.path.isdir(path) and any(
                os.path.lexists(os.path.join(path, c, rundir.CONFIG)) for c in os.listdir(path)))
            try:
                outputs.check_place(path, f"--flag {path}", "a script", "Pass another --flag")
                refused = False
            except UserError as e:
                refused = str(e).startswith(f"--flag {path} is inside ")
            assert refused == expected, (layout, target)
        finally:
            os.chdir(cwd)
