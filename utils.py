"""Small shared helpers: user errors, atomic file writes, YAML config I/O, seeding, device."""
import argparse
import contextlib
import functools
import os
import random
import re
import shlex
import signal
import sys
import tempfile
import traceback

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


class ClosedPipeSafe:
    """sys.stdout that goes quiet instead of raising once its reader has gone (train.py ... | head): the run
    goes on and saves its files; only the printing stops."""

    def __init__(self, stream):
        self.stream, self.closed_pipe = stream, False

    def write(self, text):
        if not self.closed_pipe:
            try:
                return self.stream.write(text)
            except BrokenPipeError:
                self.closed_pipe = True
        return len(text)

    def flush(self):
        if not self.closed_pipe:
            try:
                self.stream.flush()
            except BrokenPipeError:
                self.closed_pipe = True

    def __getattr__(self, name):
        return getattr(self.stream, name)


def plain_warning(message, category, filename, lineno, line=None):
    """warnings.formatwarning for users: 'warning: <message>' without a source line."""
    return f"warning: {message}\n"


def quiet_worker_disconnects(hook):
    """sys.excepthook that stays silent for a connection to a DataLoader worker that dropped in multiprocessing's
    resource sharer thread (a worker stopped by Ctrl-C or SIGTERM while it asked for a file descriptor): the run
    stops with its own message, not a thread's traceback. Every other exception goes to `hook`."""
    def excepthook(kind, value, tb):
        frames = traceback.extract_tb(tb)
        if issubclass(kind, (EOFError, OSError)) and frames and frames[0].filename.endswith("resource_sharer.py"):
            return
        hook(kind, value, tb)
    return excepthook


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


def duration(seconds):
    """'42s', '3m05s', '2h07m'."""
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


PROGRESS_AFTER = 3.0   # seconds a loop runs before its progress bar appears (short ones show none)


def progress_bar(iterable, desc, total=None, show=True):
    """A tqdm bar on stderr for a loop a person may wait on: shown only on a terminal (never in a log file), only
    once the loop has run PROGRESS_AFTER seconds, and gone when it ends. show=False: none (other processes than
    the first under torchrun)."""
    from tqdm import tqdm
    return tqdm(iterable, desc=desc, total=total, leave=False, dynamic_ncols=True, delay=PROGRESS_AFTER,
                file=sys.stderr, disable=None if show else True)


def command(*words):
    """A command the toolkit prints for a person to paste, as one line: each word shell-quoted where a shell would
    split or change it (a run name with a space, a path with '$'), so that it runs as printed:
    command("python", "val.py", "--name", "my run") -> "python val.py --name 'my run'"."""
    return " ".join(shlex.quote(str(w)) for w in words)


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


TMP_NAME_CHARS = 80   # of the target's name kept in its temporary file's name


def atomic_write(path, write_fn, mode="w", durable=True):
    """Write `path` through a temporary file in the same folder, then rename it into place.

    A crash, SIGKILL or Ctrl-C mid-write leaves either the old file or the new one, never half
    of one. `write_fn(f)` receives the open temporary file. durable: also flush it to the disk
    before the rename (checkpoints and logs; predicted masks can simply be predicted again).
    """
    folder = os.path.dirname(os.path.abspath(path))
    # the temporary name is the file's own, cut short: a 250-byte name plus a suffix would exceed the 255 bytes
    # a file name may have (ENAMETOOLONG)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix="." + os.path.basename(path)[:TMP_NAME_CHARS] + ".", suffix=".tmp")
    try:
        os.chmod(tmp, 0o666 & ~current_umask())   # mkstemp makes it private (0600); give what open() would
        with os.fdopen(fd, mode) as f:
            write_fn(f)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def process_alive(pid):
    """Whether process `pid` on this machine is running (a lock's or a partial folder's owner)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True                            # alive, owned by someone else
    return True


def current_umask():
    """The process's umask, read without changing it (os.umask sets it, which threads would race on)."""
    try:
        with open("/proc/self/status") as f:
            return int(next(line for line in f if line.startswith("Umask:")).split()[1], 8)
    except (OSError, StopIteration, ValueError):
        mask = os.umask(0o022)
        os.umask(mask)
        return mask


def save_yaml(path, data):
    atomic_write(path, lambda f: yaml.safe_dump(data, f, sort_keys=False))


@functools.cache
def config_loader():
    """A safe YAML loader that keeps values as the user wrote them (YAML 1.2's rules): only true/false are
    booleans (`name: no` is the name 'no'), and 0123 is the number 123, not octal 83."""
    bool_tag, int_tag = "tag:yaml.org,2002:bool", "tag:yaml.org,2002:int"
    loader = type("ConfigLoader", (yaml.SafeLoader,), {})
    loader.yaml_implicit_resolvers = {first: [(tag, rx) for tag, rx in resolvers if tag not in (bool_tag, int_tag)]
                                      for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
    loader.add_implicit_resolver(bool_tag, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))
    loader.add_implicit_resolver(int_tag, re.compile(r"^[-+]?[0-9]+$"), list("-+0123456789"))
    loader.add_constructor(int_tag, lambda self, node: int(self.construct_scalar(node)))
    loader.compose_node = refuse_aliases
    loader.construct_mapping = refuse_duplicate_keys
    return loader


MAX_YAML_DEPTH = 16            # lists and mappings nested in a config file, at most (a config needs 2)
MAX_YAML_BYTES = 256 * 2**10   # a config file's size, at most (one is a few kilobytes)


def refuse_aliases(self, parent, index):
    """Composer step: an alias (*name) is refused. A config has no use for one, and a few nested aliases can
    stand for billions of values (a 'billion laughs' file) that printing the config would expand. So is nesting
    deeper than MAX_YAML_DEPTH (a list nested 100,000 deep exhausted Python's recursion)."""
    if self.check_event(yaml.AliasEvent):
        raise yaml.composer.ComposerError(None, None, "an alias (*name) is not allowed in a config file; write "
                                          "the value itself", self.peek_event().start_mark)
    self.depth = getattr(self, "depth", 0) + 1
    try:
        if self.depth > MAX_YAML_DEPTH:
            raise yaml.composer.ComposerError(None, None, f"values nested more than {MAX_YAML_DEPTH} levels deep "
                                              "are not a config", self.peek_event().start_mark)
        return yaml.composer.Composer.compose_node(self, parent, index)
    finally:
        self.depth -= 1


def refuse_duplicate_keys(self, node, deep=False):
    """Constructor step: a key given twice in one mapping is refused (YAML loaders otherwise keep the last one)."""
    seen = set()
    for key_node, _ in node.value:
        if isinstance(key_node, yaml.ScalarNode) and key_node.value in seen:
            raise yaml.constructor.ConstructorError(None, None, f"the key '{key_node.value}' is given twice; "
                                                    "keep one of its lines", key_node.start_mark)
        seen.add(getattr(key_node, "value", None))
    return yaml.constructor.SafeConstructor.construct_mapping(self, node, deep)


def load_yaml(path):
    """Read a YAML mapping; a file that is missing, unreadable, not UTF-8 text, not YAML or not a mapping is a
    UserError."""
    if os.path.isdir(path):
        raise UserError(f"config file {path} is a folder; pass a file, e.g. {os.path.join(path, 'config.yml')}")
    if not os.path.isfile(path):
        raise UserError(f"config file {path} does not exist")
    if os.path.getsize(path) > MAX_YAML_BYTES:
        raise UserError(f"config file {path} is {os.path.getsize(path) / 2**10:.0f} KB; a config is a few KB of "
                        f"'key: value' lines ({MAX_YAML_BYTES // 2**10} KB at most). Is it the right file?")
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.load(f, Loader=config_loader())
    except UnicodeDecodeError:
        raise UserError(f"config file {path} is not UTF-8 text (is it a binary file?); pass a config.yml of "
                        "'key: value' lines") from None
    except PermissionError:
        raise UserError(f"config file {path} cannot be read (permission denied)") from None
    except yaml.YAMLError as e:
        raise UserError(f"config file {path} is not valid YAML ({e}). "
                        "Fix the line shown, or delete the file and pass flags instead.") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"config file {path} must hold 'key: value' lines, not a {type(data).__name__}")
    return data


def write_png(path, array, durable=True):
    """uint8 or uint16 array (H, W) or (H, W, 3 in BGR) -> PNG file, atomically."""
    ok, encoded = cv2.imencode(".png", array)
    if not ok:
        raise OSError(f"could not encode {path} as PNG")
    atomic_write(path, lambda f: f.write(encoded.tobytes()), mode="wb", durable=durable)


def write_tiff(path, array, durable=True):
    """A 2D array (H, W) of uint8, uint16, uint32 or float32 -> a plain single-page TIFF (what Fiji and napari open
    as an image, or as a label image when it holds integers), atomically."""
    import io

    import tifffile    # here: PNG outputs never import it
    buffer = io.BytesIO()
    tifffile.imwrite(buffer, array, photometric="minisblack")
    atomic_write(path, lambda f: f.write(buffer.getvalue()), mode="wb", durable=durable)
