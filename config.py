"""The training config: defaults -> config.yml (--config) -> command-line flags -> one validated dict.

Every setting is one record in SETTINGS (name, default, type, --help section and text, choices or range, short
flag, whether --resume may change it). The records build the argparse flags and their --help sections, check a
config file's keys, types and ranges, and decide what a resume may change; models/<name>/config.yml holds one
key per record, in their order.
"""
import argparse
import difflib
import fractions
import math
import os
import re
import unicodedata
from dataclasses import dataclass
from typing import Callable

import checkpoint
from archs import ARCHS
from dataset import OBJECT_PLANES, TARGETS
from losses import LOSSES, OBJECTS_LOSS, SIGMOID_LOSSES, SOFTMAX_LOSSES, TARGET_LOSSES
from normalize import MODES as NORMALIZE_MODES
from pairing import class_names_file, ext_family, single_image_type
from plan import planned
from rundir import RunFolder
from utils import UserError, command, load_yaml, str2bool

OPTIMIZERS = ("SGD", "Adam", "AdamW", "RMSprop")
SCHEDULERS = ("CosineAnnealingLR", "ReduceLROnPlateau", "MultiStepLR", "ConstantLR")
MAX_NAME_BYTES = 120   # the longest run name, in bytes (a file name may have 255)
MAX_COUNT = 10**6      # the largest epoch count, batch size, patience, milestone (a config's numbers are bounded)
MAX_PATH = 4096        # the longest path a setting may hold (PATH_MAX on Linux)
MAX_INPUT = 4096       # the largest network input side: one 4096x4096 training image is already several GB of activations
RUNS_DIR = "models"  # runs live in models/<name>/, relative to where the command is run
# A new run's name: a folder and a word of the commands the toolkit prints (val.py --name <name>), so nothing a
# shell would split or change, nothing argparse takes for a flag, nothing file systems spell differently.
NAME_PATTERN = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")
NAME_RULE = (f"ASCII letters, digits, '_', '-' and '.', beginning with a letter, digit or '_', at most "
             f"{MAX_NAME_BYTES} characters")
# the --help sections, in the order --help lists them; "run" also holds the flags that are not settings (--config ...)
GROUPS = ("run", "model", "data", "optimisation", "schedule", "hardware", "reliability")


@dataclass(frozen=True)
class Range:
    """The values a setting may take (every value is checked before anything else happens) and how a message
    says so: '<key> must be <says>, not <value>'."""
    test: Callable[[object], bool]
    says: str


def between(lo, hi, note=""):
    """lo <= value <= hi, said 'between lo and hi' (and the note)."""
    return Range(lambda v: lo <= v <= hi, f"between {lo} and {hi}{note}")


def network_side(key, value):
    """An input side the network's four 2x poolings can halve: a multiple of 16 -> None, else the message."""
    if value % 16:
        return (f"{key} {value} is not a multiple of 16, which the network's four 2x poolings need; use e.g. "
                f"{max(16, round(value / 16) * 16)}")
    return None


POSITIVE = Range(lambda v: finite(v) and v > 0, "a positive number")
NOT_NEGATIVE = Range(lambda v: finite(v) and v >= 0, "0 or a positive number")
OPEN_UNIT = Range(lambda v: finite(v) and 0 < v < 1, "between 0 and 1 (exclusive)")


@dataclass(frozen=True)
class Setting:
    """One config key: what it is, its flag, what values it takes, and whether a resumed run may change it."""
    name: str
    default: object               # None: made from other settings when left out (the run name)
    type: object                  # int, float, str, bool, "int_list" (30,60) or "str_list" (a,b)
    group: str                    # its --help section, one of GROUPS
    help: str
    choices: tuple | None = None  # the values it may take, or
    range: Range | None = None    # the test they must pass
    short: str | None = None      # a one-letter flag as well as --<name> (-b, -a)
    after_range: Callable[[str, object], str | None] | None = None   # run once all are in range: -> its message
    resumable: bool = False       # --resume may change it: how long and where the run goes on, not what it is
    # Where --help, or the resume refusal's list of what may change, names it when not in SETTINGS order: right
    # after this setting (both lists keep the order their readers know).
    help_after: str | None = None
    resume_after: str | None = None

    def requirement(self, value):
        """What the value must be, as a message says it ('one of SGD, Adam', 'a positive number'); None if it is."""
        if self.choices and value not in self.choices:
            return f"one of {', '.join(map(str, self.choices))}"
        if self.range and not self.range.test(value):
            return self.range.says
        return None

    def help_text(self):
        """Its --help line: the text and the default (a setting without one says in its text what it falls back to)."""
        return self.help if self.default is None else f"{self.help} (default: {human(self.default)})"


# One record per setting, in the order config.yml lists them.
SETTINGS = [
    Setting("name", None, str, "run", f"run name: <runs_dir>/<name>/, {NAME_RULE} (default "
            "<dataset>_<arch>_wDS|_woDS)",
            # what a run folder must be to be read at all; a new run's name must also follow NAME_RULE (check_name)
            range=Range(lambda v: v is None or readable_name(v), f"a plain folder name ({NAME_RULE})")),
    Setting("init", None, str, "run", "start from a trained model's weights instead of random ones: a run's name "
            "(under --runs_dir) or folder, a model.pth (described by the model.json beside it) or a BioImage.IO zip "
            "written by export.py. The network and its normalisation follow it; other input channels adapt its first "
            "convolution, another class count or target gets a new final layer; unless given, lr is a tenth and "
            "--plan auto's epochs a quarter (default: none, random weights)",
            range=Range(lambda v: v is None or (0 < len(v) <= MAX_PATH and "\0" not in v),
                        f"a run name or the path of a run folder, model.pth or .zip (at most {MAX_PATH} characters)")),
    Setting("time_budget", 0.0, float, "run", "minutes the run may take, counted from the start of train.py (a resumed "
            "run's from the resume): training stops after the last epoch that fits, its files written, and --plan auto "
            "chooses the epochs (if needed a narrower network or smaller crops) to finish within it (0: no limit)",
            range=Range(lambda v: finite(v) and 0 <= v <= MAX_COUNT, f"0 (no limit) or minutes up to {MAX_COUNT}"),
            resumable=True, resume_after="early_stopping"),
    Setting("epochs", 100, int, "schedule", "number of epochs", range=between(1, MAX_COUNT), resumable=True),
    Setting("batch_size", 16, int, "optimisation", "images per batch (-b)", range=between(1, MAX_COUNT), short="-b"),
    Setting("arch", "NestedUNet", str, "model", "network (-a)", choices=tuple(ARCHS), short="-a"),
    Setting("deep_supervision", False, bool, "model", "NestedUNet: a loss on each of its 4 heads"),
    Setting("base_channels", 32, int, "model", "channels of the network's first stage, doubled at each of its 4 "
            "depths (32 as in the reference; 16 or 8 make a network 4x or 16x smaller and faster, for small data sets "
            "or a slow CPU)", range=between(1, 256, " (32 is the reference network)")),
    Setting("input_channels", 3, int, "model", "channels of the images: 1 = grayscale, 3 = RGB (grayscale images are "
            "replicated), or any count a multi-channel TIFF has (e.g. 2 for two fluorescence channels)",
            range=between(1, 64)),
    Setting("num_classes", 1, int, "model", "number of mask classes (folders masks/0 .. masks/<n-1>)",
            range=between(1, 255)),
    Setting("class_names", [], "str_list", "model", "a name per class, in the order of masks/0, masks/1, ... (e.g. "
            "nucleus,membrane), used in val.py's tables, the legends of its figures and curves.png (default: the "
            "numbers)", resumable=True, resume_after="data_dir"),
    Setting("input_w", 96, int, "model", "network input width (multiple of 16)",
            range=between(16, MAX_INPUT, " (for larger images train on crops: --crop)"), after_range=network_side),
    Setting("input_h", 96, int, "model", "network input height (multiple of 16)",
            range=between(16, MAX_INPUT, " (for larger images train on crops: --crop)"), after_range=network_side),
    Setting("normalize", "auto", str, "model", "how raw intensities become network inputs: imagenet (the "
            "reference's: / 255 for 8-bit, / 65535 for 16-bit, then ImageNet's mean and std), percentile (per image "
            "and channel the norm_pmin-th percentile -> 0, the norm_pmax-th -> 1, clipped, as CSBDeep/StarDist do, "
            "then (x - 0.5) / 0.25; for 12/16-bit and float microscopy), auto (imagenet if every image is 8-bit, else "
            "percentile; the run saves what it chose)", choices=NORMALIZE_MODES),
    Setting("norm_pmin", 1.0, float, "model", "normalize percentile: the percentile that becomes 0",
            range=Range(lambda v: finite(v) and 0 <= v < 100, "a percentile, at least 0 and below 100")),
    Setting("norm_pmax", 99.8, float, "model", "normalize percentile: the percentile that becomes 1",
            range=Range(lambda v: finite(v) and 0 < v <= 100, "a percentile, above 0 and at most 100")),
    Setting("per_image_norm", False, bool, "model", "after normalize, standardise each network input per channel "
            "(zero mean, unit variance), so that dark and bright microscopy images look alike to it"),
    Setting("target", "masks", str, "model", "what the network learns: masks (the masks/ folders, or the label "
            "images' foreground), or objects, to count and measure touching objects: from the label images (labels/ "
            "or instances/), plane 0 the objects and plane 1 the borders where they touch (2 sigmoid classes, named "
            "objects and borders), so that val.py --instances splits objects where the network sees their border",
            choices=TARGETS),
    Setting("invert_mask", False, bool, "model", "train on the complement of the mask: the pixels masks/0 (or the "
            "label images) do not mark, e.g. the membranes between cells when the masks mark the cells; for a mask "
            "that covers most of each image when the rest is what matters. One-class runs; val.py and an export then "
            "predict, write and score that complement"),
    Setting("class_mode", "sigmoid", str, "model", "sigmoid: independent per-class masks; softmax: mutually "
            "exclusive classes (argmax)", choices=("sigmoid", "softmax")),
    Setting("loss", "BCEDiceLoss", str, "model", "loss function", choices=tuple(LOSSES)),
    Setting("dataset", "dsb2018_96", str, "data", "data set folder name under --data_dir"),
    Setting("data_dir", "inputs", str, "data", "folder that holds the data sets", resumable=True,
            resume_after="deterministic"),
    Setting("img_ext", ".png", str, "data", "image file extension (not given: the type of the files in images/ when "
            "they are all one type, e.g. .tif)"),
    Setting("mask_ext", ".png", str, "data", "mask file extension (not given: the type of the files in masks/0/ "
            "when they are all one type)"),
    Setting("crop", False, bool, "data", "train on random input_h x input_w crops of full-size images instead of "
            "resizing them (val.py then predicts whole images by tiling)"),
    Setting("val_split", 0.2, float, "data", "fraction of images held out for validation",
            range=Range(lambda v: 0 < v < 1, "between 0 and 1 (exclusive)")),
    Setting("split_seed", 41, int, "data", "random_state of the train/validation split",
            range=Range(lambda v: 0 <= v < 2**32, "between 0 and 2**32-1 (scikit-learn's random_state)")),
    Setting("affine", 0.0, float, "data", "probability per training image of a random scale (0.8-1.2), shift "
            "(+-6%) and rotation (+-45 deg) of image and mask together, as albumentations' Affine (0: off)",
            range=Range(lambda v: finite(v) and 0 <= v <= 1, "a probability between 0 and 1"), help_after="crop"),
    Setting("folds", 1, int, "data", "k-fold cross-validation: split the training split into this many folds (1: "
            "none)", range=Range(lambda v: 1 <= v <= 1000, "1 (no cross-validation) to 1000")),
    Setting("fold", 0, int, "data", "with --folds K: the fold (0 .. K-1) validated on; the run trains on the others",
            range=Range(lambda v: 0 <= v < 1000, "0 or more (a fold number, 0 .. folds-1)")),
    Setting("num_workers", 4, int, "hardware", "DataLoader worker processes (--loader workers; at most one per CPU "
            "core)", range=between(0, 1024), resumable=True, help_after="loader"),
    Setting("cache_mb", 0, float, "hardware", "memory for decoded images, MB; the rest is read from disk each epoch "
            "(0: half the available memory)",
            range=Range(lambda v: finite(v) and 0 <= v <= 2**40, "0 (automatic) or more"), resumable=True,
            help_after="num_workers"),
    Setting("loader", "auto", str, "hardware", "memory: data set as tensors on the device, augmented there in "
            "batches; workers: albumentations in DataLoader workers; auto: memory when it fits",
            choices=("auto", "memory", "workers"), resumable=True, help_after="memory_format"),
    Setting("optimizer", "SGD", str, "optimisation", "optimizer", choices=OPTIMIZERS),
    Setting("lr", 1e-3, float, "optimisation", "initial learning rate", range=POSITIVE),
    Setting("momentum", 0.9, float, "optimisation", "SGD/RMSprop momentum",
            range=Range(lambda v: finite(v) and 0 <= v < 1, "at least 0 and below 1")),
    Setting("weight_decay", 1e-4, float, "optimisation", "weight decay", range=NOT_NEGATIVE),
    Setting("nesterov", False, bool, "optimisation", "SGD Nesterov momentum"),
    Setting("scheduler", "CosineAnnealingLR", str, "schedule", "learning-rate schedule", choices=SCHEDULERS),
    Setting("min_lr", 1e-5, float, "schedule", "CosineAnnealingLR floor / ReduceLROnPlateau floor",
            range=NOT_NEGATIVE),
    Setting("factor", 0.1, float, "schedule", "ReduceLROnPlateau factor", range=OPEN_UNIT),
    Setting("patience", 2, int, "schedule", "ReduceLROnPlateau patience (epochs)", range=between(0, MAX_COUNT)),
    Setting("milestones", [1, 2], "int_list", "schedule", "MultiStepLR epochs, e.g. 30,60",
            range=Range(lambda v: len(v) <= 1000 and all(1 <= m <= MAX_COUNT for m in v),
                        f"a list of at most 1000 epochs, each between 1 and {MAX_COUNT}")),
    Setting("gamma", 2 / 3, float, "schedule", "MultiStepLR factor", range=POSITIVE),
    Setting("early_stopping", -1, int, "schedule", "stop after this many epochs without a better val_iou (-1: never)",
            range=Range(lambda v: -1 <= v <= MAX_COUNT, f"-1 (never) or a number of epochs up to {MAX_COUNT}"),
            resumable=True, resume_after="epochs"),
    Setting("ema", 0.0, float, "optimisation", "weight averaging: decay per optimizer step of an exponential moving "
            "average of the weights, which are then validated and saved as model.pth (0: off; e.g. 0.995)",
            range=Range(lambda v: finite(v) and (v == 0 or 0.5 <= v < 1),
                        "0 (off) or a decay between 0.5 and 1, e.g. 0.995")),
    Setting("device", "auto", str, "hardware", "auto | cpu | cuda | cuda:N", resumable=True),
    Setting("amp", "auto", str, "hardware", "mixed precision (auto: bf16 on a GPU that has it, else fp16; bf16 on a "
            "CPU with native bf16, else off)", choices=("auto", "bf16", "fp16", "off"), resumable=True),
    Setting("memory_format", "auto", str, "hardware", "tensor layout of the network (auto: channels_last, the faster "
            "one on CUDA and on CPU)", choices=("auto", "channels_last", "contiguous"), resumable=True),
    Setting("seed", 0, int, "reliability", "seed for weights, shuffling and augmentation",
            range=Range(lambda v: 0 <= v < 2**63, "between 0 and 2**63-1")),
    Setting("deterministic", False, bool, "reliability", "deterministic algorithms (slower on GPU)", resumable=True,
            resume_after="save_every"),
    Setting("compile", False, bool, "hardware", "torch.compile the model (slow first epoch; pays on long GPU runs)",
            resumable=True),
    Setting("cuda_graph", "off", str, "hardware", "on: capture the training step as one CUDA graph and replay it "
            "per batch (one CUDA GPU, Adam/AdamW, bf16 or fp32); a step that cannot be captured runs op by op with a "
            "warning. Off by default: on an H200 the capture failed at the fast recipe's size (BENCHMARKS.md)",
            choices=("on", "off"), resumable=True),
    Setting("save_every", 30.0, float, "reliability", "seconds between writes of the run's files (last.pth, "
            "model.pth, log.csv) after the first epoch; the last epoch is always written, and a kill loses at most "
            "this much training (0: every epoch)",
            range=Range(lambda v: finite(v) and 0 <= v <= 86400, "0 (every epoch) to 86400 seconds"), resumable=True),
    Setting("sync_bn", False, bool, "hardware", "under torchrun: SyncBatchNorm (batch statistics over all processes)"),
]
DEFAULTS = {s.name: s.default for s in SETTINGS}
TYPES = {s.name: s.type for s in SETTINGS}
CHOICES = {s.name: s.choices for s in SETTINGS if s.choices}


def arranged(settings, after):
    """The settings in SETTINGS order, except that one whose after(setting) names another comes right after it."""
    by_name = {s.name: s for s in settings}
    names = [s.name for s in settings if not after(s)]
    rest = [s for s in settings if after(s)]
    while rest:   # one that follows a moved one waits for it
        ready = [s for s in rest if after(s) in names]
        if not ready:
            raise ValueError(f"{', '.join(s.name for s in rest)}: listed after a setting not in the list")
        for s in ready:
            names.insert(names.index(after(s)) + 1, s.name)
        rest = [s for s in rest if s not in ready]
    return [by_name[name] for name in names]


# what --resume may change, in the order its refusal lists them
RESUMABLE = tuple(s.name for s in arranged([s for s in SETTINGS if s.resumable], lambda s: s.resume_after))


def parse_int_list(v):
    """[30, 60], '30,60' or 30 -> [30, 60]."""
    if isinstance(v, (list, tuple)):
        items = list(v)
    elif isinstance(v, int) and not isinstance(v, bool):
        items = [v]
    else:
        items = [s for s in str(v).replace(" ", "").split(",") if s]
    if any(isinstance(x, bool) or (isinstance(x, float) and not x.is_integer()) for x in items):
        raise argparse.ArgumentTypeError(f"expected a comma-separated list of integers, got {v!r}")
    try:
        return [int(x) for x in items]
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError(f"expected a comma-separated list of integers, got {v!r}") from None


def parse_str_list(v):
    """['a', 'b'], 'a,b' -> ['a', 'b'] (names trimmed; an empty string is the empty list)."""
    if isinstance(v, dict):
        raise argparse.ArgumentTypeError(f"expected a comma-separated list of names, got {v!r}")
    items = v if isinstance(v, (list, tuple)) else str(v).split(",")
    if any(isinstance(x, (dict, list, tuple)) or x is None for x in items):
        raise argparse.ArgumentTypeError(f"expected a comma-separated list of names, got {v!r}")
    return [str(x).strip() for x in items if str(x).strip()]


def coerce(key, value):
    """A value from YAML or the command line -> the key's type; raises ValueError/TypeError if it cannot be."""
    typ = TYPES[key]
    if value is None:
        if DEFAULTS[key] is None:          # the run name: made from other settings
            return None
        raise TypeError(key)
    if typ == "int_list":
        return parse_int_list(value)
    if typ == "str_list":
        return parse_str_list(value)
    if typ is bool:
        return str2bool(value)
    if typ is int:
        if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
            raise TypeError(key)
        return int(value)
    if typ is float:
        if isinstance(value, bool):
            raise TypeError(key)
        return float(value)   # also takes '1e-3', which YAML reads as a string
    if isinstance(value, (dict, list)):
        raise TypeError(key)
    return str(value)


def suggest(key):
    close = difflib.get_close_matches(key, DEFAULTS, n=1, cutoff=0.6)
    return f" Did you mean '{close[0]}'?" if close else ""


RUNS_DIR_ENV = "UNET_RUNS_DIR"   # where the runs folder is when --runs_dir is not given
EXAMPLES = """examples:
  python train.py --config recipes/dsb2018_cpu.yml                 # the recommended recipe on a CPU
  python train.py --arch UNet --dataset my_cells --optimizer Adam --lr 3e-4 --epochs 50
  python train.py --config models/<name>/config.yml --name again --seed 1   # rerun a saved config
  python train.py --name <name> --resume --epochs 80               # continue a run, longer
"""


def human(value):
    """A default as a person writes it: 2/3 not 0.6666666666666666, 1e-05, [30, 60] as 30,60, false."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        fraction = fractions.Fraction(value).limit_denominator(12)
        if fraction.denominator in (3, 6, 7, 9, 11, 12) and float(fraction) == value:
            return str(fraction)
        return f"{value:g}"
    if isinstance(value, list):
        return ",".join(map(str, value))
    return str(value)


def runs_dir(flag_value):
    """The runs folder: --runs_dir, else $UNET_RUNS_DIR, else models/ (relative to where the command is run)."""
    return flag_value or os.environ.get(RUNS_DIR_ENV) or RUNS_DIR


def runs_dir_words(folder):
    """The words a printed command needs to find runs in `folder`: none for the default models/, else --runs_dir."""
    return [] if folder == RUNS_DIR else ["--runs_dir", folder]


def add_runs_dir(parser):
    """The runs-folder flag that every script which reads or writes runs has."""
    parser.add_argument("--runs_dir", default=None, metavar="DIR",
                        help=f"folder that holds the runs (default: ${RUNS_DIR_ENV}, else {RUNS_DIR}/)")


class GivenOnce(argparse.Action):
    """A flag that may appear once: a second --config would silently drop the whole first file."""

    def __call__(self, parser, namespace, values, option_string=None):
        if getattr(namespace, self.dest, None) is not None:
            parser.error(f"{option_string} was given twice ({getattr(namespace, self.dest)} and {values}); give one "
                         "file (copy the keys you need into it), and flags for the rest")
        setattr(namespace, self.dest, values)


def build_parser(description):
    """Flags for every setting, in its --help section; none has an argparse default, so only what the user typed
    appears."""
    p = argparse.ArgumentParser(description=description, argument_default=argparse.SUPPRESS, epilog=EXAMPLES,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    run = p.add_argument_group("run")
    run.add_argument("--config", metavar="FILE", action=GivenOnce,
                     help="a config.yml (a saved run's or a recipe) to start from; flags given here override it")
    for setting in section("run"):
        add_option(run, setting)
    run.add_argument("--resume", action="store_true", help="continue <runs_dir>/<name>/ from its last.pth")
    run.add_argument("--overwrite", action="store_true", help="replace an existing <runs_dir>/<name>/")
    run.add_argument("--plan", choices=("auto",), help="auto: look at the data set first and choose the input size "
                     "(whole images or crops), batch size, epochs, network, optimizer and schedule, normalisation, "
                     "class mode and loss from it, saying why for each; any flag or --config key you give is kept "
                     "and the plan works around it. The chosen values are written to config.yml like any other")
    add_runs_dir(run)
    for title in GROUPS[1:]:
        group = p.add_argument_group(title)
        for setting in section(title):
            add_option(group, setting)
    return p


def section(title):
    """The settings one --help section lists, in its order."""
    return arranged([s for s in SETTINGS if s.group == title], lambda s: s.help_after)


def add_option(group, setting):
    flags = [f"--{setting.name}"] + ([setting.short] if setting.short else [])
    help_text = setting.help_text().replace("%", "%%")    # argparse formats help with %
    metavar = None if setting.choices else setting.name.upper()
    if setting.type is bool:   # '--flag' alone or '--flag true/false' as the reference writes it
        group.add_argument(*flags, type=str2bool, nargs="?", const=True, metavar="true|false", help=help_text)
    elif setting.type == "int_list":
        group.add_argument(*flags, type=parse_int_list, metavar=metavar, help=help_text)
    elif setting.type == "str_list":
        group.add_argument(*flags, type=parse_str_list, metavar="NAMES", help=help_text)
    else:
        group.add_argument(*flags, type=setting.type, choices=setting.choices, metavar=metavar, help=help_text)


def differences(cfg):
    """The settings that differ from the defaults, as 'key=value' (what the start-up line shows)."""
    return [f"{k}={human(v)}" for k, v in cfg.items() if k in DEFAULTS and v != DEFAULTS[k]]


def merge(file_cfg, source, overrides):
    """Defaults, then a config file's keys (checked; source: its name), then the command-line overrides."""
    cfg = dict(DEFAULTS)
    for key, value in file_cfg.items():
        if key not in DEFAULTS:
            raise UserError(f"{source}: unknown key '{key}'.{suggest(key)} Remove or rename it.")
        try:
            cfg[key] = coerce(key, value)
        except (TypeError, ValueError, argparse.ArgumentTypeError):
            raise UserError(f"{source}: key '{key}' has the value {value!r}, but it must be {describe_type(key)} "
                            f"(e.g. {key}: {DEFAULTS[key]!r}). Fix that line.") from None
    cfg.update(overrides)
    return cfg


def describe_type(key):
    typ = TYPES[key]
    return {"int_list": "a list of whole numbers", "str_list": "a list of names", bool: "true or false", int: "a whole number",
            float: "a number", str: "a string"}[typ]


def finite(v):
    return not isinstance(v, float) or math.isfinite(v)


def valid_name(name):
    """A new run's name: NAME_RULE (a readable_name too)."""
    return bool(NAME_PATTERN.fullmatch(name)) and len(name) <= MAX_NAME_BYTES


def readable_name(name):
    """A run folder the scripts read (--resume, val.py, export.py, compare.py): one folder strictly inside the runs
    folder, never the runs folder itself or outside it, and short enough for every file system (255 bytes a name)
    with room for val.py's '+'-joined ensemble names. Looser than valid_name: a run named before NAME_RULE was
    enforced ('my run') is still read."""
    return (bool(name) and not name.startswith(".") and "/" not in name and "\\" not in name and "\0" not in name
            and len(name.encode("utf-8", "surrogateescape")) <= MAX_NAME_BYTES)


def name_like(name):
    """A name that follows NAME_RULE, made from one that does not ('my run ü' -> 'my_run_u'); '' if none is left."""
    ascii_name = unicodedata.normalize("NFKD", name).encode("ascii", "ignore").decode()
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", ascii_name).lstrip("._-")[:MAX_NAME_BYTES]


def check_name(cfg, sources, given):
    """A new run's name follows NAME_RULE; a UserError naming where it came from (given: the user gave it, else it
    is the default <dataset>_<arch>_... name, whose parts came from other settings) and a name that does."""
    name = cfg["name"]
    if valid_name(name):
        return
    like = name_like(name)
    example = f" (e.g. --name {command(like)})" if like else ""
    if given:
        raise UserError(f"{origin(sources, 'name')}: name must be a plain folder name of {NAME_RULE}, not {name!r}; "
                        f"it is a folder and a word of the commands the toolkit prints. Pass another --name{example}")
    raise UserError(f"no --name was given, so the run is named after its data set and network "
                    f"(<dataset>_<arch>_wDS|woDS, with dataset {cfg['dataset']!r} from {origin(sources, 'dataset')}): "
                    f"{name!r}, which is not a plain folder name ({NAME_RULE}). Pass --name{example}")


def origin(source, *keys):
    """Where a key's value came from, as a message names it: 'the command line (--lr)' or 'my.yml (key lr)'.
    With several keys (settings that do not go together): the first one that was set, not left at its default."""
    given = [k for k in keys if not isinstance(source, dict) or k in source]
    key = (given or keys)[0]
    where = source.get(key, "the command line") if isinstance(source, dict) else source
    return f"the command line (--{key})" if where == "the command line" else f"{where} (key {key})"


def check(cfg, source="the command line"):
    """Range and cross-field checks; raises a UserError naming the key, where its value came from, and the fix.

    source: a file name or 'the command line', or a dict giving that per key."""
    check_values(cfg, source)
    check_combinations(cfg, source)
    return cfg


def check_values(cfg, source):
    """Each value among its choices or in its range, one key at a time; the run name last, since a name left out
    is made of other settings (<dataset>_<arch>_...), whose own message is the one that says what to fix."""
    for setting in sorted(SETTINGS, key=lambda s: s.default is None):
        requirement = setting.requirement(cfg[setting.name])
        if requirement:
            raise UserError(f"{origin(source, setting.name)}: {setting.name} must be {requirement}, "
                            f"not {cfg[setting.name]!r}")
    for setting in SETTINGS:
        problem = setting.after_range and setting.after_range(setting.name, cfg[setting.name])
        if problem:
            raise UserError(f"{origin(source, setting.name)}: {problem}")


# the memory loader resizes every image to the input once, up front, so it cannot train on crops (raised by
# check_combinations and by loaders.choose_loader)
MEMORY_CANNOT_CROP = "--loader memory resizes images to the input size; with --crop use --loader workers (or auto)"


def check_combinations(cfg, source):
    """Settings that do not go together."""
    if cfg["target"] == "objects" and (cfg["num_classes"] != len(OBJECT_PLANES) or cfg["class_mode"] != "sigmoid"):
        raise UserError(f"{origin(source, 'num_classes', 'class_mode')}: target objects trains {len(OBJECT_PLANES)} "
                        f"sigmoid planes ({', '.join(OBJECT_PLANES)}), not num_classes {cfg['num_classes']} in "
                        f"class_mode {cfg['class_mode']}; leave num_classes and class_mode out (they follow the target)")
    if cfg["loss"] in TARGET_LOSSES and cfg["target"] != TARGET_LOSSES[cfg["loss"]]:
        raise UserError(f"{origin(source, 'loss', 'target')}: loss {cfg['loss']} weighs the border plane of --target "
                        f"{TARGET_LOSSES[cfg['loss']]}, and this run's target is {cfg['target']}; add --target "
                        f"{TARGET_LOSSES[cfg['loss']]} or choose another loss (e.g. BCEDiceLoss)")
    if cfg["invert_mask"] and (cfg["num_classes"] != 1 or cfg["target"] != "masks"):
        raise UserError(f"{origin(source, 'invert_mask', 'num_classes', 'target')}: invert_mask trains on the "
                        "complement of one class's mask, and this run has "
                        + (f"target {cfg['target']}" if cfg["target"] != "masks" else f"num_classes {cfg['num_classes']}")
                        + "; drop invert_mask (with several classes, make the class that matters a mask folder of its "
                        "own)")
    names = cfg["class_names"]
    if names and (len(names) != cfg["num_classes"] or len(set(names)) != len(names)):
        raise UserError(f"{origin(source, 'class_names', 'num_classes')}: class_names {','.join(names)} must name each "
                        f"of the {cfg['num_classes']} class(es) once, in the order of masks/0, masks/1, ... (or leave "
                        "it out: the classes are then called by their numbers)")
    if cfg["norm_pmin"] >= cfg["norm_pmax"]:
        raise UserError(f"{origin(source, 'norm_pmin', 'norm_pmax')}: norm_pmin {cfg['norm_pmin']:g} must be below "
                        f"norm_pmax {cfg['norm_pmax']:g} (e.g. 1 and 99.8)")
    if cfg["fold"] >= cfg["folds"]:
        raise UserError(f"{origin(source, 'fold', 'folds')}: fold {cfg['fold']} does not exist with folds "
                        f"{cfg['folds']}; folds are numbered 0 .. {cfg['folds'] - 1}" +
                        ("" if cfg["folds"] > 1 else " (pass --folds K to cross-validate)"))
    if cfg["deep_supervision"] and cfg["arch"] != "NestedUNet":
        raise UserError(f"{origin(source, 'deep_supervision', 'arch')}: deep_supervision needs --arch NestedUNet "
                        f"({cfg['arch']} has one output head)")
    if cfg["loader"] == "memory" and cfg["crop"]:
        raise UserError(f"{origin(source, 'loader', 'crop')}: {MEMORY_CANNOT_CROP}")
    if cfg["scheduler"] in ("CosineAnnealingLR", "ReduceLROnPlateau") and cfg["min_lr"] > cfg["lr"]:
        raise UserError(f"{origin(source, 'min_lr', 'lr')}: min_lr {cfg['min_lr']:g} is above lr {cfg['lr']:g}, so "
                        f"{cfg['scheduler']} would raise the learning rate instead of lowering it; give a min_lr "
                        f"below lr (e.g. {cfg['lr'] / 100:g})")
    if cfg["class_mode"] == "softmax":
        if cfg["loss"] not in SOFTMAX_LOSSES:
            raise UserError(f"{origin(source, 'loss', 'class_mode')}: class_mode softmax needs a softmax loss "
                            f"({', '.join(SOFTMAX_LOSSES)}), not {cfg['loss']}")
        if cfg["num_classes"] < 2:
            raise UserError(f"{origin(source, 'num_classes', 'class_mode')}: class_mode softmax needs num_classes >= 2 (one mask "
                            "folder per class, background included)")
    elif cfg["loss"] not in SIGMOID_LOSSES:
        raise UserError(f"{origin(source, 'loss', 'class_mode')}: loss {cfg['loss']} is for --class_mode softmax; with sigmoid "
                        f"classes use one of {', '.join(SIGMOID_LOSSES)}")


def reference_optimizer(cfg):
    """Whether a run trains with the reference's optimizer defaults (SGD at lr 1e-3): slow to learn."""
    return cfg["optimizer"] == DEFAULTS["optimizer"] and cfg["lr"] == DEFAULTS["lr"]


def default_name(cfg):
    folds = f"_fold{cfg['fold']}" if cfg["folds"] > 1 else ""
    return f"{cfg['dataset']}_{cfg['arch']}_{'wDS' if cfg['deep_supervision'] else 'woDS'}{folds}"


def resolve(argv=None, description="Train a U-Net / UNet++ segmentation network.", start_from=None):
    """Command line -> (validated config dict, run flags {'resume', 'overwrite', 'config', 'runs_dir', 'changes',
    'init'}).

    With --resume the base is the run's own config (config.yml, or the copy inside last.pth), and
    only the RESUMABLE keys may differ from it.
    start_from: for a new run with --init, (cfg, sources, runs_dir) -> (cfg, sources, source) reads the model it
    starts from and sets what follows it, before --plan plans the rest (train.py: pretrained.follow_init); run['init']
    is that source (its .lines are printed with the plan's), None without --init and on --resume (last.pth holds
    the weights then).
    """
    args = vars(build_parser(description).parse_args(argv))
    run = {k: args.pop(k, default) for k, default in (("config", None), ("resume", False), ("overwrite", False),
                                                       ("runs_dir", None), ("plan", None))}
    run["runs_dir"] = runs_dir(run["runs_dir"])
    if run["resume"] and run["overwrite"]:
        raise UserError("--resume continues a run and --overwrite replaces it; pass one of them, not both")
    if run["resume"] and run["plan"]:
        raise UserError("--resume continues a run with the settings it was planned or given; drop --plan (it plans "
                        "a new run)")
    file_cfg = load_yaml(run["config"]) if run["config"] else {}
    sources = {**{k: run["config"] for k in file_cfg}, **{k: "the command line" for k in args}}
    cfg = merge(file_cfg, run["config"], args)
    cfg, sources = follow_target(cfg, sources)
    run["plan_lines"], run["init"] = [], None
    if not run["resume"]:
        cfg, sources, run["plan_lines"] = follow_folder(cfg, sources)
        if cfg["init"] is not None and start_from is not None:
            check_values(cfg, sources)     # the user's own values first, with their own messages
            cfg, sources, run["init"] = start_from(cfg, sources, run["runs_dir"])
            run["plan_lines"] += run["init"].lines
    if run["plan"]:
        check_values(cfg, sources)         # the user's own values first, with their own messages
        cfg, choices, plan_lines = planned(cfg, sources)
        run["plan_lines"] += plan_lines
        sources = {**{k: "the plan" for c in choices for k in c.settings}, **sources}
    given = cfg["name"] is not None
    if not given:
        check_values(cfg, sources)         # the settings the default name is made of, with their own messages
        cfg["name"] = default_name(cfg)
    if not (readable_name(cfg["name"]) and os.path.isdir(os.path.join(run["runs_dir"], cfg["name"]))):
        check_name(cfg, sources, given)    # a new folder's name; a run folder that exists is resumed or replaced as named
    check(cfg, sources)                    # the name too, before it is used as a path
    run["changes"], run["sources"] = [], sources
    if run["resume"]:
        cfg, run["changes"] = resumed(cfg, sources, run["runs_dir"])
        saved = RunFolder(os.path.join(run["runs_dir"], cfg["name"])).config
        run["sources"] = {**{k: saved for k in cfg}, **{k: "the command line" for k in args}}
    return cfg, run


def follow_target(cfg, sources):
    """--target objects: the two planes it trains (num_classes 2, sigmoid, named objects and borders) and the loss
    for its thin border plane (OBJECTS_LOSS), where the user left those keys out (given ones are checked by
    check_combinations). -> (cfg, sources)."""
    if cfg["target"] != "objects":
        return cfg, sources
    derived = {"num_classes": len(OBJECT_PLANES), "class_mode": "sigmoid", "class_names": list(OBJECT_PLANES),
               "loss": OBJECTS_LOSS}
    derived = {k: v for k, v in derived.items() if k not in sources}
    return {**cfg, **derived}, {**{k: f"--target {cfg['target']}" for k in derived}, **sources}


def follow_folder(cfg, sources):
    """img_ext and mask_ext that the user left out: the type of the files in images/ and masks/0/ when each holds
    images of one type other than the default's (a folder of TIFFs needs no --img_ext .tif); class_names left out:
    the names in masks/names.txt when it names num_classes classes (--plan auto takes them when it sets
    num_classes). -> (cfg, sources, a line saying what was chosen, for each)."""
    root = os.path.join(cfg["data_dir"], cfg["dataset"])
    lines = []
    names, path = class_names_file(root) if "class_names" not in sources else ([], None)
    if names and len(names) == cfg["num_classes"]:
        cfg, sources = {**cfg, "class_names": names}, {**sources, "class_names": f"the file {path}"}
        lines.append(f"class_names: {','.join(names)} (from {path}; --class_names sets them)")
    for key, folder in (("img_ext", "images"), ("mask_ext", os.path.join("masks", "0"))):
        found = single_image_type(os.path.join(root, folder))
        if key in sources or found is None or found in ext_family(cfg[key]):
            continue
        cfg, sources = {**cfg, key: found}, {**sources, key: f"the files in {root}/{folder}"}
        lines.append(f"{key}: {found} (every file in {root}/{folder} is one; --{key} sets it)")
    return cfg, sources, lines


def whence(sources, key, value):
    """Where a setting's value came from, for a message: 'img_ext .png is the default', '... comes from my.yml'."""
    where = sources.get(key)
    said = f"{key} {human(value)}"
    if where is None:
        return f"{said} is the default"
    if where == "the command line":
        return f"{command(f'--{key}', human(value))} was given on the command line"
    return f"{said} comes from {where}"


def saved_config(run_dir):
    """The config a run trained with: config.yml, or (if that was deleted) the copy inside last.pth; None if neither."""
    path, last = RunFolder(run_dir).config, RunFolder(run_dir).last
    if os.path.isfile(path):
        return merge(upgraded(load_yaml(path)), path, {}), path
    if os.path.isfile(last):
        return merge(upgraded(checkpoint.load(last).get("config", {})), last, {}), last
    return None, None


def upgraded(saved):
    """A saved run's config keys with what runs from before a setting existed did: a run saved without `normalize`
    was trained on 8-bit images normalised the reference's way (imagenet)."""
    return saved if "normalize" in saved else {**saved, "normalize": "imagenet"}


def resumed(cfg, sources, runs):
    """The run's saved config with the RESUMABLE keys given now applied -> (config, ['key old -> new', ...])."""
    saved, path = saved_config(os.path.join(runs, cfg["name"]))
    if saved is None:
        return cfg, []                     # nothing to resume: rundir.prepare says so
    changes = []
    for key, where in sources.items():
        if cfg[key] == saved[key] or key == "name":
            continue
        if key not in RESUMABLE:
            raise UserError(f"--resume: {origin(sources, key)} sets {key} to {cfg[key]!r}, but {os.path.join(runs, cfg['name'])} "
                            f"trained with {saved[key]!r}, and its weights, optimizer state and schedule belong to that."
                            f" Drop it to continue the run, or start a new run from its config: "
                            f"{command('python', 'train.py', '--config')} "
                            f"{command(path) if path.endswith('.yml') else '<your config>'} --name <new name> "
                            f"{command(f'--{key}', human(cfg[key]))}. Only {', '.join(RESUMABLE)} may change on resume.")
        changes.append(f"{key} {saved[key]} -> {cfg[key]}")
        saved[key] = cfg[key]
    if saved["name"] != cfg["name"]:       # a copied or renamed run folder: it is the run --name names, not the old one
        changes.append(f"name {saved['name']} -> {cfg['name']} (the folder was copied or renamed)")
        saved["name"] = cfg["name"]
    return check(saved, path), changes


def load_run_config(path):
    """A saved models/<name>/config.yml, checked the same way as at training time."""
    return check(merge(load_yaml(path), path, {}), path)
