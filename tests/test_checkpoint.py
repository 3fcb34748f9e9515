"""checkpoint.py: atomic saves, safe loading, clear messages, RNG states."""
import os
import random

import numpy as np
import pytest
import torch

import checkpoint
from utils import UserError


def test_save_then_load_round_trip(tmp_path):
    path = str(tmp_path / "c.pth")
    checkpoint.save({"w": torch.arange(4.0), "epoch": 3, "log": [{"epoch": 1}]}, path)
    state = checkpoint.load(path)
    assert torch.equal(state["w"], torch.arange(4.0)) and state["epoch"] == 3 and state["log"] == [{"epoch": 1}]
    assert os.listdir(tmp_path) == ["c.pth"]                 # no temporary file left behind


def test_a_failed_save_keeps_the_previous_file(tmp_path):
    path = str(tmp_path / "c.pth")
    checkpoint.save({"epoch": 1}, path)
    with pytest.raises(Exception):
        checkpoint.save({"bad": lambda: 0}, path)            # cannot be pickled: fails mid-save
    assert checkpoint.load(path) == {"epoch": 1} and os.listdir(tmp_path) == ["c.pth"]


@pytest.mark.parametrize("content, expected", [
    (b"", "is not a checkpoint"),
    (b"plain text", "is not a checkpoint"),
], ids=["empty", "text"])
def test_load_refuses_what_is_not_a_checkpoint(tmp_path, content, expected):
    path = tmp_path / "bad.pth"
    path.write_bytes(content)
    with pytest.raises(UserError, match=expected):
        checkpoint.load(str(path))


def test_load_refuses_code_and_missing_files(tmp_path):
    torch.save({"payload": os.system}, tmp_path / "evil.pth")
    with pytest.raises(UserError, match="not a checkpoint this toolkit can load safely"):
        checkpoint.load(str(tmp_path / "evil.pth"))
    with pytest.raises(UserError, match="does not exist"):
        checkpoint.load(str(tmp_path / "none.pth"))


def test_load_weights_names_a_mismatch():
    with pytest.raises(UserError, match="does not fit the network"):
        checkpoint.load_weights(torch.nn.Linear(2, 2), torch.nn.Linear(3, 2).state_dict(), "model.pth")


def test_rng_state_round_trip_repeats_every_generator(tmp_path):
    state = checkpoint.rng_state()
    path = str(tmp_path / "rng.pth")
    checkpoint.save(state, path)
    first = (random.random(), np.random.rand(), torch.rand(1).item())
    checkpoint.set_rng_state(checkpoint.load(path))
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == first


def test_weights_are_compared_with_the_network_before_it_is_built():
    """archs.parameter_shapes describes a network without allocating it (meta device); check_shapes refuses weights
    of another network, naming the first tensor that differs."""
    from archs import build_model, parameter_shapes
    cfg = {"arch": "UNet", "num_classes": 1, "input_channels": 3, "deep_supervision": False, "base_channels": 8}
    state = build_model(cfg).state_dict()
    checkpoint.check_shapes(state, parameter_shapes(cfg), "model.pth")             # the same network: accepted
    huge = parameter_shapes({**cfg, "base_channels": 100000})                      # 10^11 weights, none allocated
    assert huge["conv0_0.conv1.weight"] == (100000, 3, 3, 3)
    with pytest.raises(UserError, match=r"model.pth does not fit .* is \(8,\) in the file, \(100000,\) in the settings"):
        checkpoint.check_shapes(state, huge, "model.pth")
    with pytest.raises(UserError, match="does not hold a model's weights"):
        checkpoint.check_shapes([1, 2], huge, "model.pth")
