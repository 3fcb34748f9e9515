"""--init: a run that starts from a trained model's weights instead of random ones (fine-tuning).

The model it starts from, the source, is one of:

    --init cells                          a run of this toolkit, by name (under --runs_dir)
    --init models/cells                   ... or by folder (an export folder with model.pth + model.json too)
    --init colleague/model.pth            a model.pth, described by the model.json beside it (else by its tensors)
    --init models/cells/export/bioimageio.zip    a BioImage.IO package that export.py wrote

Every source is untrusted input: its size is checked against the network it describes before it is read, its
tensors' shapes against that network before they are used, and each problem is one message naming the file.

follow_init() (config.resolve's start_from, before --plan) reads the source and makes the run's network (arch,
base_channels, deep_supervision) and normalisation follow it where the user did not set them; a network the user
set that differs is refused. fine_tuning() then lowers the learning rate and the planned epochs the user did not
set. adapted() gives the weights for the run's network when train.py has built it: the first convolution adapted to
another input channel count (archs.adapt_input_weight), a new final layer for another class count, class mode or
target. Prediction never imports this module.
"""
import hashlib
import math
import os
import warnings
import zipfile
from dataclasses import dataclass, field

import torch
import yaml

import checkpoint
import config
import rundir
from archs import FIRST_CONV, adapt_input_weight, is_head, parameter_shapes
from plan import DERIVED
from predict import recorded_settings, trained_config
from utils import UserError

NETWORK = ("arch", "base_channels", "deep_supervision")        # must be the source's: its weights are that network's
HEAD = ("num_classes", "class_mode", "target", "invert_mask")  # any of these different: a new final layer
NORMALISATION = ("normalize", "norm_pmin", "norm_pmax", "per_image_norm")   # the source's, unless the user sets them
DESCRIBED = ("input_channels", *NETWORK, *HEAD, *NORMALISATION)   # what a source may record of itself
LR_DIVISOR = 10         # fine-tuning starts at a tenth of the learning rate of a run from scratch ...
EPOCHS_DIVISOR = 4      # ... and, when --plan auto plans the epochs, trains a quarter of them
SIZE_FACTOR = 2         # a weights file may be up to this times its network's float32 weights (plus SIZE_SLACK) ...
SIZE_SLACK = 2**20      # ... the pickle's own bytes
# a model.pth with nothing to describe it: the most read (the reference NestedUNet is 36 MB; base_channels 128 0.6 GB)
MAX_UNDESCRIBED_BYTES = 2**31
MAX_RDF_BYTES = 2**20   # a package's rdf.yaml (a few KB)
RDF = "rdf.yaml"
ARCHITECTURE = "Probabilities"   # the callable of this toolkit's packages (archs.Probabilities)
PACKAGE_PREFIX = "network."      # their state_dict's keys: the network's, under this prefix


@dataclass
class Source:
    """A model a run starts from, read and checked."""
    given: str              # the --init value
    path: str               # the file its weights came from (model.pth, or the package zip)
    settings: dict          # what it records of itself (DESCRIBED keys; the network's always)
    settings_path: str      # where those were read (config.yml, model.json, rdf.yaml in a zip, or the tensors)
    state: dict             # the network's weights (float32), shapes checked against the settings
    sha256: str             # of the file at path
    run: str = None         # the source run's name and data set, when it is a run
    dataset: str = None
    lines: list = field(default_factory=list)    # what train.py prints before the run starts

    def provenance(self):
        """What a run records in model.json of where it started ('init')."""
        return {"given": self.given, "file": os.path.abspath(self.path), "sha256": self.sha256, "run": self.run,
                "dataset": self.dataset}

    def summary(self):
        """'init: <file> (run cells, data set dsb2018_96; sha256 ...): UNet, base_channels 32, ...'."""
        s = self.settings
        run = f"run {self.run}, data set {self.dataset or 'unknown'}; " if self.run else ""
        head = "".join(f", {k} {config.human(s[k])}" for k in ("class_mode", "target") if s.get(k) is not None)
        head += ", invert_mask" if s.get("invert_mask") else ""
        norm = (", ".join(f"{k} {config.human(s[k])}" for k in NORMALISATION if k in s) if "normalize" in s
                else "normalisation unknown (the run's own)")
        return (f"init: {self.path} ({run}sha256 {self.sha256[:16]}): {s['arch']}, base_channels {s['base_channels']}, "
                f"deep_supervision {config.human(s['deep_supervision'])}, {s['input_channels']} input channel(s), "
                f"{s['num_classes']} class(es){head}; {norm}")


def fail(value, text):
    return UserError(f"--init {value}: {text}")


def read_source(value, runs_dir):
    """The --init value -> its Source: a run name under runs_dir first, then a path (folder, zip, weights file)."""
    named = os.path.join(runs_dir, value)
    if config.readable_name(value) and os.path.isdir(named):
        return from_folder(value, named)
    if os.path.isdir(value):
        return from_package(value, value) if os.path.isfile(os.path.join(value, RDF)) else from_folder(value, value)
    if os.path.isfile(value):
        return from_package(value, value) if is_package_zip(value) else from_weights(value, value)
    listed = sorted(os.listdir(runs_dir)) if os.path.isdir(runs_dir) else []
    raise fail(value, f"there is no run {named}" + (f" (runs there: {', '.join(listed[:20])})" if listed else "") +
               ", and no file or folder of that name. Pass a run's name or folder, a model.pth or a BioImage.IO zip "
               "that export.py wrote (and --runs_dir for runs elsewhere)")


def is_package_zip(path):
    """A zip with rdf.yaml at its top (a torch.save file is a zip too, without it)."""
    try:
        with zipfile.ZipFile(path) as z:
            return RDF in z.namelist()
    except (zipfile.BadZipFile, OSError, ValueError):
        return False


def from_folder(value, folder):
    """A run folder (or an export folder: model.pth with model.json) -> Source of its model.pth."""
    f = rundir.RunFolder(folder)
    if not os.path.isfile(f.model) and f.is_run():
        raise fail(value, f"{f.model} does not exist: the run has not finished an epoch yet; train it first, or pass "
                   "another model")
    if not os.path.isfile(f.model):
        raise fail(value, f"{folder} is a folder without a model.pth (not a run or an export folder); pass a run's "
                   "name or folder, a model.pth or a BioImage.IO zip that export.py wrote")
    return from_weights(value, f.model)


def from_weights(value, path):
    """A weights file: described by the run folder it is in (config.yml or last.pth), else by the model.json beside
    it, else by its own tensors -> Source."""
    folder = rundir.RunFolder(os.path.dirname(path) or ".")
    run = os.path.isfile(folder.config) or os.path.isfile(folder.last)
    if run:
        cfg = trained_config(folder)        # checked as val.py checks a run; refuses a broken config.yml by name
        settings = {k: cfg[k] for k in DESCRIBED}
        where = folder.config if os.path.isfile(folder.config) else folder.last
    else:
        settings, where = described(folder.description(), folder.model_json), folder.model_json
    limit = weights_limit(settings, where, value) if settings else MAX_UNDESCRIBED_BYTES
    data = read_limited(path, limit, value, where if settings else None)
    state = plain_state(load(path, data, value), path, value)
    if settings is None:
        settings, where = inferred(state, path, value), f"{path} (its tensors)"
    checkpoint.check_shapes(state, expected_shapes(settings, where, value), path)
    source = Source(value, path, settings, where, state, hashlib.sha256(data).hexdigest())
    if run:
        source.run, source.dataset = os.path.basename(os.path.realpath(folder.path)), cfg["dataset"]
    return source


def described(description, path):
    """A model.json's description -> its DESCRIBED settings, converted and range-checked as a config file's are (a
    bad value is refused naming path and the key); None when there is none or it lacks what they need."""
    trained = recorded_settings(description)
    if trained is None:
        return None
    cfg = config.merge(trained, path, {})
    config.check_values(cfg, path)
    return {k: cfg[k] for k in DESCRIBED if k in trained}


def expected_shapes(settings, where, value):
    """{name: shape} of the network the settings describe (nothing allocated); a UserError naming `where` when they
    describe none this toolkit builds (UNet with deep supervision, say)."""
    try:
        return parameter_shapes(settings)
    except (ValueError, TypeError, KeyError, RuntimeError) as e:
        raise fail(value, f"{where} does not describe a network this toolkit builds ({e})") from None


def weights_limit(settings, where, value):
    """The most bytes a weights file of the network `settings` describe may have."""
    numbers = sum(math.prod(s) for s in expected_shapes(settings, where, value).values())
    return SIZE_FACTOR * 4 * numbers + SIZE_SLACK


def read_limited(path, limit, value, where):
    """A file's bytes, refused unread when larger than limit (where: what describes its network, for the message)."""
    size = os.path.getsize(path)
    if size > limit:
        said = (f"the network {where} describes has {limit / 2**20:.1f} MB of weights at most" if where else
                f"a model.pth with no model.json beside it is read up to {limit / 2**30:.0f} GB")
        raise fail(value, f"{path} is {size / 2**20:.1f} MB, but {said}; it is not that model's weights file. Pass "
                   "the model.pth that belongs with it")
    try:
        with open(path, "rb") as f:
            return f.read(limit + 1)
    except OSError as e:
        raise fail(value, f"cannot read {path}: {e.strerror or e}") from None


def load(path, data, value):
    """checkpoint.load of bytes read from path, its refusal said as --init's."""
    try:
        return checkpoint.load(path, data)
    except UserError as e:
        raise fail(value, str(e)) from None


def plain_state(obj, path, value):
    """What a weights file holds -> the network's state_dict in float32: a model.pth as it is, a last.pth's
    evaluated weights, a package's weights without their 'network.' prefix."""
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict) and "epoch" in obj:
        obj = rundir.evaluated_weights(obj)                 # a last.pth: the weights its epoch was validated with
    if not isinstance(obj, dict) or not obj or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                       for k, v in obj.items()):
        raise fail(value, f"{path} does not hold a network's weights (a state_dict of tensors). Pass a model.pth "
                   "that train.py wrote")
    if all(k.startswith(PACKAGE_PREFIX) for k in obj):
        obj = {k[len(PACKAGE_PREFIX):]: v for k, v in obj.items()}
    return {k: v.float() if v.is_floating_point() else v for k, v in obj.items()}


def inferred(state, path, value):
    """A state_dict with nothing to describe it -> the network its tensors are (check_shapes then checks them all);
    class mode, target and normalisation stay unknown."""
    first = state.get(FIRST_CONV)
    ds = "final1.weight" in state
    head = state.get("final4.weight" if ds else "final.weight")
    if first is None or head is None or first.ndim != 4 or head.ndim != 4:
        raise fail(value, f"{path} holds no U-Net / UNet++ weights of this toolkit ({FIRST_CONV} or its final layer "
                   "is missing), and no model.json beside it says what it is")
    settings = {"arch": "NestedUNet" if "conv0_1.conv1.weight" in state else "UNet", "deep_supervision": ds,
                "base_channels": int(first.shape[0]), "input_channels": int(first.shape[1]),
                "num_classes": int(head.shape[0])}
    config.check_values(config.merge(settings, path, {}), f"{path} (its tensors)")
    return settings


class Package:
    """A BioImage.IO package's files, from its zip or its unzipped folder: each read only up to a size given first."""

    def __init__(self, path, value):
        self.path, self.value, self.zip = path, value, None
        if not os.path.isdir(path):
            try:
                self.zip = zipfile.ZipFile(path)
            except (zipfile.BadZipFile, OSError) as e:
                raise fail(value, f"{path} is not a readable zip ({e})") from None

    def read(self, name, limit):
        """The member `name` (a plain file name, as export.py writes them), refused unread beyond limit bytes."""
        if not isinstance(name, str) or os.path.basename(name) != name or name in ("", ".", ".."):
            raise fail(self.value, f"{self.path}: {RDF} names the file {str(name)[:80]!r}; this toolkit's packages "
                       "keep their files at the top of the zip")
        try:
            size = self.zip.getinfo(name).file_size if self.zip else os.path.getsize(os.path.join(self.path, name))
            if size > limit:
                raise fail(self.value, f"{self.path}: {name} is {size / 2**20:.1f} MB, but the network its {RDF} "
                           f"describes has {limit / 2**20:.1f} MB of weights at most; the package is not one "
                           "export.py wrote")
            if self.zip:
                return self.zip.read(name)        # at most the size the zip declares, its CRC checked
            with open(os.path.join(self.path, name), "rb") as f:
                return f.read(limit + 1)
        except (KeyError, FileNotFoundError):
            raise fail(self.value, f"{self.path} has no {name}, which its {RDF} names") from None
        except (OSError, zipfile.BadZipFile, RuntimeError, EOFError) as e:   # a damaged zip: bad CRC, truncated
            raise fail(self.value, f"cannot read {name} from {self.path} ({e}); is the zip complete?") from None


def from_package(value, path):
    """A BioImage.IO package that export.py wrote -> Source: the network, class mode and normalisation from its
    rdf.yaml (target and invert_mask from the model.json export.py writes beside the zip, when that is the same
    network), its pytorch_state_dict weights, their sha256 checked against rdf.yaml's."""
    package = Package(path, value)
    where = f"{path} ({RDF})"
    try:
        rdf = yaml.safe_load(package.read(RDF, MAX_RDF_BYTES).decode("utf-8"))
        beside_zip = rundir.RunFolder(os.path.dirname(path) or ".").model
        if "pytorch_state_dict" not in rdf["weights"] and os.path.isfile(beside_zip):
            return from_weights(value, beside_zip)   # export.py's package holds TorchScript only; its model.pth is beside
        weights = rdf["weights"]["pytorch_state_dict"]
        architecture, kwargs = weights["architecture"], weights["architecture"]["kwargs"]
        if architecture.get("callable") != ARCHITECTURE:
            raise KeyError("callable")
        settings = {**{k: kwargs["network"][k] for k in ("arch", "base_channels", "deep_supervision",
                                                         "input_channels", "num_classes")},
                    "class_mode": kwargs["class_mode"], "per_image_norm": kwargs.get("per_image_eps") is not None,
                    **package_normalisation(rdf["inputs"][0]["preprocessing"])}
        cfg = config.merge(settings, where, {})
    except (KeyError, TypeError, IndexError, AttributeError, ValueError, yaml.YAMLError, UnicodeDecodeError):
        raise fail(value, f"{path} is not a BioImage.IO package that this toolkit's export.py wrote (its {RDF} has no "
                   f"pytorch_state_dict of archs.{ARCHITECTURE} with its network's settings)") from None
    config.check_values(cfg, where)
    settings = {**{k: cfg[k] for k in settings}, **beside(path, settings)}
    data = package.read(weights["source"], weights_limit(settings, where, value))
    if weights.get("sha256") != hashlib.sha256(data).hexdigest():
        raise fail(value, f"{path}: {weights['source']} does not have the sha256 its {RDF} gives; the package was "
                   "changed or damaged. Export the run again")
    member = f"{path}:{weights['source']}"
    state = plain_state(load(member, data, value), member, value)
    checkpoint.check_shapes(state, expected_shapes(settings, where, value), path)
    if package.zip is None:                  # an unzipped package: its weights file is the source file
        return Source(value, os.path.join(path, weights["source"]), settings, where, state,
                      hashlib.sha256(data).hexdigest())
    return Source(value, path, settings, where, state, file_sha256(path))


def package_normalisation(steps):
    """rdf.yaml's preprocessing steps -> the normalisation settings they are (bioimageio_package.preprocessing's
    inverse): scale_range is percentile, per-channel scale_linear alone is imagenet."""
    ids = [s["id"] for s in steps]
    if "scale_range" in ids:
        kwargs = steps[ids.index("scale_range")]["kwargs"]
        return {"normalize": "percentile", "norm_pmin": kwargs["min_percentile"], "norm_pmax": kwargs["max_percentile"]}
    if "scale_linear" in ids:
        return {"normalize": "imagenet"}
    return {}


def beside(path, settings):
    """target and invert_mask from the model.json export.py writes beside its bioimageio.zip, when it describes the
    same network (a package itself does not record them); {} otherwise."""
    folder = rundir.RunFolder(os.path.dirname(os.path.abspath(path)))
    try:
        recorded = described(folder.description(), folder.model_json) or {}
    except UserError:
        return {}
    same = all(recorded.get(k) == settings[k] for k in (*NETWORK, "input_channels", "num_classes", "class_mode"))
    return {k: recorded[k] for k in ("target", "invert_mask") if k in recorded} if same else {}


def file_sha256(path):
    """A file's sha256, read in chunks (a package holds three copies of its weights)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(2**20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def users(sources):
    """The keys the user set (flags, a --config file): not those derived from the target or the data's files."""
    return {k for k, where in sources.items() if not where.startswith(DERIVED)}


def follow_init(cfg, sources, runs_dir):
    """config.resolve's start_from: reads the --init source; the run's network and normalisation follow it where the
    user did not set them (and --plan keeps them, naming the file they came from) -> (cfg, sources, source)."""
    source = read_source(cfg["init"], runs_dir)
    given, s = users(sources), source.settings
    refuse_other_network(cfg, sources, source)
    followed = {k: s[k] for k in NETWORK if k not in given}
    for key in NORMALISATION:
        if key not in s:
            continue                        # the source does not record it: the run's own
        if key not in given:
            followed[key] = s[key]
        elif cfg[key] != s[key]:
            warnings.warn(f"{config.origin(sources, key)} sets {key} {config.human(cfg[key])}, but the model --init "
                          f"starts from was trained with {key} {config.human(s[key])} ({source.settings_path}): a "
                          "model trained under another normalisation starts far from its optimum. Leave it out to "
                          "keep the model's", stacklevel=2)
    source.lines.append(source.summary())
    where = f"the file {source.settings_path}"       # 'the file ...': --plan says 'set by the file ...' for these
    return {**cfg, **followed}, {**sources, **{k: where for k in followed}}, source


def refuse_other_network(cfg, sources, source):
    """A network the user set that is not the source's: its weights cannot be that network's."""
    given = users(sources)
    differ = [k for k in NETWORK if k in given and cfg[k] != source.settings[k]]
    if not differ:
        return
    asked = ", ".join(f"{k} {config.human(cfg[k])} from {config.origin(sources, k)}" for k in differ)
    its = ", ".join(f"{k} {config.human(source.settings[k])}" for k in differ)
    flags = " ".join(f"--{k} {config.human(source.settings[k])}" for k in differ)
    raise fail(source.given, f"the model is a network with {its} ({source.settings_path}), and this run asks for "
               f"{asked}. A run starts from a model of the same network and width: leave "
               f"{'it' if len(differ) == 1 else 'them'} out (the run follows the model) or pass {flags}; or train "
               "from random weights without --init")


def fine_tuning(cfg, run):
    """After --plan: what fine-tuning changes where the user did not set it: lr and min_lr a tenth (LR_DIVISOR),
    planned epochs a quarter (EPOCHS_DIVISOR); the line that says so joins run['plan_lines'] -> the checked config."""
    sources, yours = run["sources"], {"the command line", *([run["config"]] if run["config"] else [])}
    mine = lambda key: sources.get(key) in yours                            # noqa: E731
    whose = lambda key: "the plan's" if sources.get(key) == "the plan" else "the default"   # noqa: E731
    changed, said = {}, []
    if not mine("lr"):
        changed["lr"] = cfg["lr"] / LR_DIVISOR
        said.append(f"lr {changed['lr']:g} (a tenth of {whose('lr')} {cfg['lr']:g}; --lr sets it)")
        if not mine("min_lr"):
            changed["min_lr"] = cfg["min_lr"] / LR_DIVISOR
            said.append(f"min_lr {changed['min_lr']:g}")
    else:
        said.append(f"lr {cfg['lr']:g} as {config.origin(sources, 'lr')} gives it (left out, it would be a tenth of a "
                    "run from scratch's)")
    if sources.get("epochs") == "the plan":
        changed["epochs"] = max(1, math.ceil(cfg["epochs"] / EPOCHS_DIVISOR))
        said.append(f"epochs {changed['epochs']} (a quarter of the plan's {cfg['epochs']}; --epochs sets it)")
    run["plan_lines"].append(f"fine-tuning from --init: {', '.join(said)}")
    run["sources"] = {**sources, **{k: "fine-tuning from --init" for k in changed}}
    return config.check({**cfg, **changed}, run["sources"])


def adapted(source, cfg, fresh, verbose=True):
    """The source's weights for this run's network -> its state_dict. fresh: the state_dict of the network as the
    run built it (its random final layer is kept where the source's cannot serve: another class count, class mode
    or target). Another input channel count adapts the first convolution (archs.adapt_input_weight). verbose: print
    what was done."""
    s, state = source.settings, dict(source.state)
    done = [f"init: weights from {source.path}"]
    if cfg["input_channels"] != s["input_channels"]:
        state[FIRST_CONV] = adapt_input_weight(state[FIRST_CONV], cfg["input_channels"])
        rule = ("summed over them" if cfg["input_channels"] == 1 else
                f"each the model's channel i mod {s['input_channels']}, scaled by {s['input_channels']}/"
                f"{cfg['input_channels']}")
        done.append(f"the first convolution adapted from {s['input_channels']} to {cfg['input_channels']} input "
                    f"channel(s) ({rule})")
    differ = [k for k in HEAD if s.get(k) is not None and s[k] != cfg[k]]
    if differ:
        state.update({k: v for k, v in fresh.items() if is_head(k)})
        done.append("a new final layer, freshly initialised: the model has " +
                    ", ".join(f"{k} {config.human(s[k])}" for k in differ) + ", this run " +
                    ", ".join(f"{k} {config.human(cfg[k])}" for k in differ))
    else:
        done.append("its final layer kept")
    wrong = sorted(k for k in fresh if k not in state or state[k].shape != fresh[k].shape)
    if wrong or set(state) - set(fresh):
        raise fail(source.given, f"{source.path} does not fit this run's network ({(wrong or sorted(set(state) - set(fresh)))[0]})")
    if verbose:
        print("; ".join(done), flush=True)
    return state


def still_recorded(description, run_dir):
    """A resumed run's new model.json description, with the 'init' record (where the run started) of the one it
    replaces: a resumed run does not read its source again."""
    before = rundir.RunFolder(run_dir).description() or {}
    return {**description, "init": before["init"]} if "init" in before else description
