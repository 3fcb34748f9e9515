"""What a problem with the data set's files is, told as facts, and how the running script words its fix.

The data modules (imagefiles, pairing, dataset, splits) know the files, not the command line: train.py says
`--img_ext .tif`, val.py speaks of the run's config.yml, bench.py reads PNG only. So a problem that a setting fixes
is raised as a DataError that names the setting (a config key, or 'data' for the data set's folder, data_dir and
dataset) and the value the files suggest; each script words the fix with its own flags in one function, applied
where it calls the data layer (`with worded(its_function): ...`).
"""
import contextlib

from utils import UserError


class DataError(UserError):
    """A data problem: `fact` (what is wrong, with the file or folder), `path` (that file or folder), `setting`
    (the config key whose change fixes it: data, img_ext, mask_ext, input_channels, num_classes, target; None when
    the fix is in the files, which the fact then says) and `found` (the value the files suggest for it, e.g. the
    extension they have). The message is fact + around[0] + the script's fix + around[1]; `fix` is None until a
    script words it (worded)."""

    def __init__(self, fact, setting=None, path=None, found=None, around=("; ", "")):
        super().__init__(fact)
        self.fact, self.setting, self.path, self.found, self.around = fact, setting, path, found, around
        self.fix = None

    def __str__(self):
        if self.setting is None:
            return self.fact
        if self.fix is None:     # a caller that words nothing (a library user, a test): the structured facts
            found = "" if self.found is None else f", found {self.found}"
            return f"{self.fact} (setting {self.setting}{found})"
        return f"{self.fact}{self.around[0]}{self.fix}{self.around[1]}"


@contextlib.contextmanager
def worded(fix):
    """Words each DataError raised inside: fix(error) -> the running script's words for changing error.setting
    (its flag names; '' where it has none), which complete the error's message."""
    try:
        yield
    except DataError as e:
        if e.setting is not None and e.fix is None:
            e.fix = fix(e)
        raise
