"""val.py's output folder: never the user's data, one evaluation at a time, and only its own files replaced.

- Refused: a folder that is, or is inside, a data set (the one val.py reads and the runs' own), a run folder or
  the runs folder itself; and an output subfolder that is a symbolic link (its files would land in, and be
  removed from, the link's target).
- Locked while val.py writes it (<output>/.lock, as a run folder is while it trains): a second evaluation into
  the same folder is refused instead of interleaving its files with the first's.
- Recorded: the files an evaluation will write are listed in <output>/.val_files before any is written; the
  next evaluation into the folder removes exactly those (so a smaller data set leaves no stale masks), and
  nothing else: a file the user put there, or one written by a version before the record, stays.
"""
import os

import rundir
from utils import UserError, atomic_write

RECORD = ".val_files"
OUTPUTS_DIR = "outputs"   # val.py writes under outputs/<name> by default; compare.py reads metrics.csv there


def inside(path, folder):
    """Whether path is folder or lies under it (both resolved: links and '..' cannot hide it)."""
    path, folder = os.path.realpath(path), os.path.realpath(folder)
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def run_folders(runs_dir):
    """Every run in the runs folder (a folder with config.yml or model.pth), then the runs folder itself (unless it
    holds the current folder, as `--runs_dir .` does: then only its runs)."""
    found = []
    for name in sorted(os.listdir(runs_dir)) if os.path.isdir(runs_dir) else []:
        path = os.path.join(runs_dir, name)
        if any(os.path.exists(os.path.join(path, f)) for f in ("config.yml", "model.pth")):
            found.append((path, f"the run folder of {name}"))
    return found + ([] if inside(os.getcwd(), runs_dir) else [(runs_dir, "the runs folder")])


EXPORT_MARKER = ".unet_toolkit_export"   # in a folder export.py writes (export.py's MARKER)
TARGET_FOLDERS = ("masks", "labels", "instances")   # beside images/, what makes a folder a labelled data set


def what_it_holds(folder):
    """'a data set' (images/ beside masks/, labels/ or instances/), 'a run folder' (config.yml or model.pth), 'an
    export' (export.py's marker), or None: a folder whose files a toolkit script must not write among."""
    if os.path.isdir(os.path.join(folder, "images")) and any(os.path.isdir(os.path.join(folder, t))
                                                               for t in TARGET_FOLDERS):
        return "a data set"
    if any(os.path.isfile(os.path.join(folder, f)) for f in ("config.yml", "model.pth")):
        return "a run folder"
    if os.path.isfile(os.path.join(folder, EXPORT_MARKER)):
        return "an export"
    return None


def guarded_ancestor(out_dir):
    """(folder, what it holds) for the first of out_dir and its parents that holds a data set, a run or an export,
    whoever made it; None if none does. Folders that hold the current folder are where the user works and are not
    guarded."""
    path, cwd = os.path.realpath(out_dir), os.getcwd()
    while True:
        if os.path.isdir(path) and not inside(cwd, path):
            held = what_it_holds(path)
            if held:
                return path, held
        parent = os.path.dirname(path)
        if parent == path:
            return None
        path = parent


def check_place(out_dir, protected):
    """protected: [(folder, what it is)]. A UserError if out_dir is one of them or inside one, or inside any folder
    that holds a data set, a run or an export (guarded_ancestor)."""
    for folder, what in protected:
        if inside(out_dir, folder):
            raise UserError(f"--output {out_dir} is inside {folder} ({what}); val.py does not write among the "
                            "files it reads or a run's files. Pass --output to a folder of its own (the default is "
                            "outputs/<name>/)")
    found = guarded_ancestor(out_dir)
    if found:
        raise UserError(f"--output {out_dir} is inside {found[0]}, which holds {found[1]}; val.py does not write "
                        "among a data set's, a run's or an export's files. Pass --output to a folder of its own (the "
                        "default is outputs/<name>/)")


def safe_relative(rel):
    return rel and not os.path.isabs(rel) and ".." not in rel.split("/")


class OutputFolder:
    """with OutputFolder(out_dir, protected, subfolders) as out: checked, locked, last evaluation's files removed;
    out.record(relative paths) before writing them."""

    def __init__(self, out_dir, protected, subfolders):
        self.dir, self.protected, self.subfolders = out_dir, protected, subfolders
        self.lock = rundir.RunLock(out_dir, True, doing="written by another val.py",
                                   fix="pass another --output")

    def __enter__(self):
        check_place(self.dir, self.protected)
        for sub in self.subfolders:
            path = os.path.join(self.dir, sub)
            if any(os.path.islink(p) for p in (path, os.path.dirname(path)) if p != self.dir):
                raise UserError(f"{path} is a symbolic link; val.py does not write (or remove files) through links. "
                                "Remove the link or pass --output to another folder")
        try:
            os.makedirs(self.dir, exist_ok=True)
            self.lock.__enter__()
        except OSError as e:
            raise self.unwritable(e) from None
        try:
            self.clear()
            for sub in self.subfolders:
                os.makedirs(os.path.join(self.dir, sub), exist_ok=True)
        except OSError as e:
            self.lock.__exit__()
            raise self.unwritable(e) from None
        except BaseException:
            self.lock.__exit__()
            raise
        return self

    def unwritable(self, e):
        return UserError(f"cannot write the outputs in {self.dir}: {e.strerror or e}. Free space or make it "
                         "writable and run val.py again, or pass --output DIR")

    def __exit__(self, *exc):
        self.lock.__exit__()

    def clear(self):
        """Removes the files the last evaluation recorded (regular files or links, in real subfolders only)."""
        record = os.path.join(self.dir, RECORD)
        if not os.path.isfile(record):
            return
        root = os.path.realpath(self.dir)
        with open(record) as f:
            for rel in f.read().splitlines():
                path = os.path.join(self.dir, rel)
                if not safe_relative(rel) or os.path.realpath(os.path.dirname(path)) != \
                        os.path.join(root, os.path.dirname(rel)).rstrip(os.sep):
                    continue                          # outside the folder, or through a link: not ours to remove
                if os.path.islink(path) or os.path.isfile(path):
                    os.remove(path)
        os.remove(record)

    def record(self, relpaths):
        """Lists the files about to be written (relative to the folder), so the next evaluation removes them."""
        atomic_write(os.path.join(self.dir, RECORD), lambda f: f.write("".join(p + "\n" for p in relpaths)))
