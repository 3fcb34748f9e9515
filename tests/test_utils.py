import argparse
import io
import os
import sys

import pytest
import torch

import utils
from utils import UserError, atomic_write, count_params, load_yaml, resolve_device, save_yaml, seed_everything, str2bool


@pytest.mark.parametrize("text, value", [("true", True), ("True", True), ("YES", True), ("1", True),
                                         ("false", False), ("No", False), ("0", False), (True, True)])
def test_str2bool(text, value):
    assert str2bool(text) is value


def test_str2bool_refuses_other_words():
    with pytest.raises(argparse.ArgumentTypeError):
        str2bool("maybe")


def test_count_params():
    assert count_params(torch.nn.Linear(3, 2)) == 8


def test_seeding_repeats():
    seed_everything(3)
    a = torch.rand(3)
    seed_everything(3)
    assert torch.equal(a, torch.rand(3))


def test_resolve_device():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(UserError, match="not a device"):
        resolve_device("gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="no usable CUDA"):
            resolve_device("cuda")


def test_atomic_write_keeps_old_file_on_failure(tmp_path):
    p = tmp_path / "f.txt"
    p.write_text("old")

    def half_then_crash(f):
        f.write("new, partial")
        raise RuntimeError("crash")

    with pytest.raises(RuntimeError):
        atomic_write(str(p), half_then_crash)
    assert p.read_text() == "old" and os.listdir(tmp_path) == ["f.txt"]


def test_yaml_round_trip_and_errors(tmp_path):
    p = str(tmp_path / "c.yml")
    save_yaml(p, {"lr": 0.001, "milestones": [1, 2], "name": None})
    assert load_yaml(p) == {"lr": 0.001, "milestones": [1, 2], "name": None}
    (tmp_path / "bad.yml").write_text("lr: [1, 2\n")
    with pytest.raises(UserError, match="not valid YAML"):
        load_yaml(str(tmp_path / "bad.yml"))
    (tmp_path / "list.yml").write_text("- 1\n- 2\n")
    with pytest.raises(UserError, match="key: value"):
        load_yaml(str(tmp_path / "list.yml"))
    with pytest.raises(UserError, match="does not exist"):
        load_yaml(str(tmp_path / "none.yml"))


def test_atomic_write_takes_a_name_of_the_longest_length_a_file_may_have(tmp_path):
    path = tmp_path / ("n" * 251 + ".png")                 # 255 bytes: a temporary name adding to it would fail
    atomic_write(str(path), lambda f: f.write("x"))
    assert path.read_text() == "x" and os.listdir(tmp_path) == [path.name]


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_a_progress_bar_shows_on_a_terminal_after_a_while_and_never_in_a_log(monkeypatch):
    import utils
    for stream, delay, shown in ((Terminal(), 0.0, True), (io.StringIO(), 0.0, False), (Terminal(), 60.0, False)):
        monkeypatch.setattr(sys, "stderr", stream)
        monkeypatch.setattr(utils, "PROGRESS_AFTER", delay)
        assert list(utils.progress_bar(range(3), "predicting")) == [0, 1, 2]      # every item, in order
        assert ("predicting" in stream.getvalue()) == shown, (delay, stream.getvalue())


def test_a_dropped_worker_connection_in_the_resource_sharer_thread_is_quiet_and_nothing_else_is():
    import multiprocessing.resource_sharer as resource_sharer
    seen = []
    hook = utils.quiet_worker_disconnects(lambda *exc: seen.append(exc[0]))
    caught_there = "try:\n    raise ConnectionResetError(104, 'reset')\nexcept ConnectionResetError:\n    hook(*sys.exc_info())\n"
    exec(compile(caught_there, resource_sharer.__file__, "exec"), {"hook": hook, "sys": sys})   # as its thread does
    assert seen == []
    for error in (ConnectionResetError(104, "reset"), ValueError("a bug")):
        try:
            raise error                         # raised here: not the resource sharer
        except Exception:
            hook(*sys.exc_info())
    assert seen == [ConnectionResetError, ValueError]
