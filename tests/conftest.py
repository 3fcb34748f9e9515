"""Shared fixtures: tiny generated data sets, and the path of the real dsb2018_96 set."""
import os
import signal
import sys
import warnings

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from make_demo_data import Classes, generate, generate_microscopy  # noqa: E402

DSB = os.path.join(ROOT, "..", "shared", "datasets", "dsb2018_96")


def pytest_collection_modifyitems(config, items):
    """The slow tests first, longest first (@pytest.mark.slow(seconds=N): about how long, on 2 cores), then the other
    end-to-end ones: spread over the workers from the start instead of one finishing alone at the end."""
    def order(item):
        slow = item.get_closest_marker("slow")
        return (slow is None, item.get_closest_marker("e2e") is None, -(slow.kwargs.get("seconds", 15) if slow else 0))
    items.sort(key=order)


def pytest_configure(config):
    """The markers 'e2e' and 'slow' are declared in pytest.ini (`pytest -m "not e2e"` is the quick loop). Under
    pytest-xdist (make test runs one worker per core), each worker and the scripts it starts compute on one thread:
    two workers of two threads each on two cores were slower than one thread each."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        os.environ["OMP_NUM_THREADS"] = "1"
        import torch
        torch.set_num_threads(1)


def make_data(root, name="tiny", num_classes=1, exclusive=False, void=False, names=False, **kw):
    """Generate a data set at <root>/<name> and return its path (the classes as make_demo_data.Classes, kw as in
    make_demo_data.generate)."""
    kw = {"n": 10, "size": 32, **kw}
    path = os.path.join(root, name)
    generate(path, classes=Classes(num_classes, exclusive, void, names), **kw)
    return path


@pytest.fixture
def tiny(tmp_path):
    """10 RGB 32x32 images with one mask class, at tmp_path/inputs/tiny."""
    return make_data(tmp_path / "inputs")


def make_microscopy(root, name="micro", n=12, size=32, channels=1, dtype=np.uint16, seed=0):
    """A microscopy-style data set at <root>/<name>: 16-bit (or float32) TIFF images with a 12-bit dynamic range
    (background about 100, nuclei 300-3000, noise), and uint16 TIFF label images in labels/ -> its path."""
    path = os.path.join(root, name)
    generate_microscopy(path, n=n, size=size, channels=channels, seed=seed, dtype=dtype)
    return path


def write_tiff(path, array, **kw):
    """Writes array as the TIFF file `path` (its folder made if missing) -> path."""
    import tifffile
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tifffile.imwrite(path, array, **kw)
    return path


@pytest.fixture
def micro(tmp_path):
    """12 16-bit one-channel 32x32 TIFF images with TIFF label images, at tmp_path/inputs/micro."""
    return make_microscopy(tmp_path / "inputs")


@pytest.fixture
def dsb_path():
    if not os.path.isdir(DSB):
        pytest.skip("../shared/datasets/dsb2018_96 is not present")
    return DSB


def run_main(main, argv, cwd, monkeypatch, capsys):
    """An entry script's main() in this process, as the command line runs it (faster than a subprocess):
    -> (exit status, stdout, stderr). Signal handlers and warning format are restored afterwards."""
    monkeypatch.chdir(cwd)
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    monkeypatch.setattr(warnings, "formatwarning", warnings.formatwarning)
    try:
        main(argv)
        code = 0
    except SystemExit as e:
        code = e.code
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    out, err = capsys.readouterr()
    return code, out, err
