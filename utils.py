"""Small shared helpers: user errors, atomic file writes, YAML config I/O, seeding, device."""
import argparse
import contextlib
import os
import random
import signal
import sys
import tempfile

import cv2
import numpy as np
import torch
import yaml


class UserError(Exception):
    """A mistake the user can fix (bad data, bad flag, bad config).

    The entry scripts catch it at the command-line boundary (exit_on_user_error) and print its
    message alone, without a traceback, then exit with its exit_code.
    """
    exit_code = 2


@contextlib.contextmanager
def exit_on_user_error(quiet=False):
    """The command-line boundary of every script: a UserError prints 'error: <message>' on stderr
    (unless quiet: torchrun's other processes) and exits with its exit_code, never a traceback."""
    try:
        yield
    except UserError as e:
        if not quiet:
            print(f"error: {e}", file=sys.stderr)
        sys.exit(e.exit_code)


def plain_warning(message, category, filename, lineno, line=None):
    """warnings.formatwarning for users: 'warning: <message>' without a source line."""
    return f"warning: {message}\n"


class Interrupts:
    """SIGINT (Ctrl-C) and SIGTERM -> KeyboardInterrupt, held back while a group of files is being saved.

    A second signal exits at once (every file is written atomically, so none is left torn).
    """

    def __init__(self):
        self.pending = False
        self.saving = False

    def install(self):
        signal.signal(signal.SIGINT, self.handle)
        signal.signal(signal.SIGTERM, self.handle)

    def handle(self, signum, frame):
        if self.pending:
            os._exit(130)
        self.pending = True
        if not self.saving:
            raise KeyboardInterrupt

    @contextlib.contextmanager
    def deferred(self):
        """Run the block to its end even if a signal comes; raise KeyboardInterrupt after it if one did."""
        self.saving = True
        try:
            yield
        finally:
            self.saving = False
        if self.pending:
            raise KeyboardInterrupt


def str2bool(v):
    """'true/false/yes/no/1/0' in any case (and real bools) -> bool; anything else is refused."""
    if isinstance(v, bool):
        return v
    s = str(v).strip().lower()
    if s in ("true", "yes", "y", "1", "on"):
        return True
    if s in ("false", "no", "n", "0", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean (true/false/yes/no/1/0), got {v!r}")


def count_params(model):
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def seed_everything(seed):
    """Seed Python, NumPy and torch (all devices) from one integer."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def resolve_device(name):
    """'auto' -> cuda if available else cpu; 'cpu', 'cuda', 'cuda:N' are checked and returned."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name!r} is not a device; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name} was asked for but this machine has no usable CUDA GPU; "
                        "use --device cpu (or auto)")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise UserError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) here")
    if device.type not in ("cpu", "cuda"):
        raise UserError(f"--device {name!r}: only cpu and cuda devices are supported")
    return device


def atomic_write(path, write_fn, mode="w"):
    """Write `path` through a temporary file in the same folder, then rename it into place.

    A crash, SIGKILL or Ctrl-C mid-write leaves either the old file or the new one, never half
    of one. `write_fn(f)` receives the open temporary file.
    """
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix="." + os.path.basename(path) + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, mode) as f:
            write_fn(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def save_yaml(path, data):
    atomic_write(path, lambda f: yaml.safe_dump(data, f, sort_keys=False))


def load_yaml(path):
    """Read a YAML mapping; a file that is missing, not YAML or not a mapping is a UserError."""
    if not os.path.isfile(path):
        raise UserError(f"config file {path} does not exist")
    with open(path) as f:
        try:
            data = yaml.safe_load(f)
        except yaml.YAMLError as e:
            raise UserError(f"config file {path} is not valid YAML ({e}). "
                            "Fix the line shown, or delete the file and pass flags instead.") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"config file {path} must hold 'key: value' lines, not a {type(data).__name__}")
    return data


def write_png(path, array):
    """uint8 array (H, W) or (H, W, 3 in BGR) -> PNG file, atomically."""
    ok, encoded = cv2.imencode(".png", array)
    if not ok:
        raise OSError(f"could not encode {path} as PNG")
    atomic_write(path, lambda f: f.write(encoded.tobytes()), mode="wb")
