"""The prediction module: raw image tensors in, probabilities out, as one torch.nn.Module.

    Predictor = normalise (normalize.py) -> network (archs.py) -> final head -> sigmoid or softmax

val.py, bench.py and export.py predict through it, so what is exported is what is evaluated. A run's
model.json (beside model.pth) describes it completely, so it can be rebuilt without config.yml or this
toolkit's scripts:

    import json, torch, predictor
    model = predictor.Predictor.build(json.load(open("models/cells/model.json")))
    model.load_network(torch.load("models/cells/model.pth", weights_only=True)).eval()
    # probs = model(x): x float32 (B, C, H, W) with the file's raw values (0..255, 0..65535, ...), any H and W

Input intensity ranges: with ranges=None the module takes them from its input (the whole image it is given:
what an exported model does); val.py passes the ranges of each whole image, so that a resized copy or a tile
is normalised as the training loaders normalised it.

Any height and width: the network's four poolings need multiples of 16 (SIZE_MULTIPLE), so an input of another
size, once its intensity ranges are taken, is mirrored at its bottom and right edges up to the next multiple,
normalised, predicted, and cropped back:
(B, C, 500, 300) in, (B, K, 500, 300) out. Inputs whose sides are multiples of 16 (everything val.py predicts)
take the path they always took. The padding is written with tensor operations on the input's size, so a traced
TorchScript or ONNX file pads any size it is given, not only the size it was traced with.
"""
import torch
import torch.nn.functional as F

from archs import BASE_CHANNELS, SIZE_MULTIPLE, activate, build_model, final_logits
from normalize import Normalization, full_range, normalize, percentile_ranges
from utils import UserError

FORMAT = "unet-toolkit model 1"


def class_names(cfg):
    """The config's class_names, or the class numbers '0', '1', ... when it gives none."""
    return list(cfg.get("class_names") or [str(c) for c in range(cfg["num_classes"])])


def describe(cfg, dtypes, scale=None):
    """A run's model.json: everything needed to rebuild its Predictor (dtypes: the training images' types; scale:
    the scale it learned, learned_scale)."""
    widest = max(dtypes, key=lambda d: full_range(d), default="uint8")
    description = {
        "format": FORMAT,
        "arch": cfg["arch"], "deep_supervision": cfg["deep_supervision"], "base_channels": cfg["base_channels"],
        "input_channels": cfg["input_channels"], "num_classes": cfg["num_classes"], "class_mode": cfg["class_mode"],
        "class_names": class_names(cfg),
        "input_size": [cfg["input_h"], cfg["input_w"]], "size_multiple": SIZE_MULTIPLE,
        "input_dtype": str(widest),
        "normalize": {"mode": cfg["normalize"], "pmin": cfg["norm_pmin"], "pmax": cfg["norm_pmax"],
                      "per_image": bool(cfg["per_image_norm"]), "full_range": full_range(widest)},
        "crop": cfg["crop"],
        "target": cfg["target"],      # objects: planes 0 objects and 1 borders (the objects come from both)
        "invert_mask": bool(cfg.get("invert_mask", False)),   # the class is the complement of the masks' class
    }
    if scale is not None:       # image pixels per network pixel (y, x): val.py brings images to it
        description["scale"] = [round(float(s), 6) for s in scale]
    return description


MAX_SCALE = 1000.0   # image pixels per network pixel: a model.json that says more is refused


def learned_scale(cfg, sizes):
    """The scale a run learns (image pixels per network pixel, (y, x)): 1 for crops, else each axis's median training
    image side over the network input's (1 for images trained at their own size). sizes: the training images' (H, W)."""
    if cfg["crop"] or not sizes:
        return 1.0, 1.0
    heights, widths = sorted(h for h, _ in sizes), sorted(w for _, w in sizes)
    median = lambda v: (v[(len(v) - 1) // 2] + v[len(v) // 2]) / 2  # noqa: E731
    return median(heights) / cfg["input_h"], median(widths) / cfg["input_w"]


def recorded_scale(description, cfg, path="model.json"):
    """The scale a run's model.json records (untrusted: two numbers in (0, MAX_SCALE], else a UserError naming path);
    for a run from before it was recorded: 1 if it trained on crops, else None (it predicts images resized to its
    input, as it always did)."""
    scale = description.get("scale") if description else None
    if scale is None:
        return (1.0, 1.0) if cfg["crop"] else None
    if not (isinstance(scale, list) and len(scale) == 2 and
            all(isinstance(s, (int, float)) and not isinstance(s, bool) and 0 < s <= MAX_SCALE for s in scale)):
        raise UserError(f"{path}: scale must be two numbers between 0 and {MAX_SCALE:g} (image pixels per network "
                        f"pixel, y and x), not {str(scale)[:80]}; copy the run's model.json again")
    return float(scale[0]), float(scale[1])


def settings_of(description):
    """The config keys that decide predictions, read back from a model.json description (describe's inverse)."""
    d, n, net = description, description["normalize"], network_settings(description)
    network = {k: net[k] for k in ("arch", "deep_supervision", "base_channels", "input_channels", "num_classes")}
    return {**network, "class_mode": d["class_mode"], "input_h": d["input_size"][0], "input_w": d["input_size"][1],
            "normalize": n["mode"], "norm_pmin": n["pmin"], "norm_pmax": n["pmax"], "per_image_norm": n["per_image"],
            "crop": d["crop"], "target": d.get("target", "masks"), "invert_mask": d.get("invert_mask", False)}


def network_settings(description):
    """What archs.build_model needs to rebuild the network a model.json describes."""
    d = description
    return {"arch": d["arch"], "num_classes": d["num_classes"], "input_channels": d["input_channels"],
            "deep_supervision": d["deep_supervision"], "base_channels": base_channels(d)}


def recorded_dtypes(description):
    """The image type the run trained on, as its model.json description records it (runs from before it: 8-bit)."""
    dtype = description.get("input_dtype") if description else None
    return {dtype if isinstance(dtype, str) else "uint8"}


def base_channels(description):
    """The network's first-stage channels (model.json of runs before the base_channels key: the reference's 32)."""
    return description.get("base_channels", BASE_CHANNELS)


class Predictor(torch.nn.Module):
    """Raw images (B, C_in, H, W) float32 -> class probabilities (B, C, H, W)."""

    def __init__(self, network, description):
        super().__init__()
        self.network = network
        self.description = description
        n = description["normalize"]
        self.norm = Normalization(n["mode"], n["pmin"], n["pmax"], n["per_image"], description["input_channels"])
        self.full_range = float(n["full_range"])
        self.deep_supervision = bool(description["deep_supervision"])
        self.class_mode = description["class_mode"]

    @classmethod
    def build(cls, description):
        """The Predictor a model.json describes, with untrained weights (load_network loads model.pth)."""
        if description.get("format") != FORMAT:
            raise ValueError(f"not a {FORMAT!r} description (format {description.get('format')!r})")
        return cls(build_model(network_settings(description)), description)

    def load_network(self, state_dict):
        self.network.load_state_dict(state_dict)
        return self

    def ranges(self, x):
        """The intensity ranges (B, 2, C) of whole images x, as normalize.intensity_range takes them."""
        if self.norm.mode == "percentile":
            return percentile_ranges(x, self.norm.pmin, self.norm.pmax)
        lo = torch.zeros_like(x[:, :, 0, 0])
        return torch.stack([lo, lo + self.full_range], dim=1)

    def logits(self, x, ranges=None):
        """Raw images (B, C_in, H, W) of any size -> logits of the final head (B, C, H, W). The intensity ranges are
        the unpadded images' (or `ranges`); the mirrored image is normalised (its per-image statistics too, as
        val.py's padded images are)."""
        ranges = self.ranges(x) if ranges is None else ranges.to(x.device)
        h, w = x.shape[2], x.shape[3]
        if not (torch.jit.is_tracing() or h % SIZE_MULTIPLE or w % SIZE_MULTIPLE):     # the sizes val.py gives
            return final_logits(self.network(normalize(x, ranges, self.norm)), self.deep_supervision)
        padded = reflect_to_multiple(x, SIZE_MULTIPLE)      # a traced graph always pads (by 0 for such sizes)
        return final_logits(self.network(normalize(padded, ranges, self.norm)), self.deep_supervision)[:, :, :h, :w]

    def forward(self, x, ranges=None):
        return activate(self.logits(x, ranges), self.class_mode)


def mirrored_positions(line, extra):
    """Positions into a line of n pixels (any 1-D tensor of length n) for n + extra pixels: 0..n-1, then back and
    forth as reflect padding goes (the edge pixel not repeated), bouncing again where extra >= n, which F.pad's
    reflect mode refuses (a one-pixel line repeats its pixel). Tensor operations only, so that tracing keeps n and
    extra dynamic."""
    ones = torch.ones_like(line, dtype=torch.float32)                                   # n ones
    position = F.pad(ones, (0, extra), value=1.0).cumsum(0) - 1                         # 0 .. n + extra - 1
    last = ones.sum() - 1                                                               # n - 1
    period = (2 * last).clamp(min=1)
    return (last - (torch.remainder(position, period) - last).abs()).long()


def reflect_to_multiple(x, multiple):
    """(B, C, H, W) -> (B, C, H', W'), H' and W' the next multiples of `multiple`: x, mirrored at its bottom and right
    edges (mirrored_positions); x itself where H and W are multiples already."""
    h, w = x.shape[2], x.shape[3]
    rows = mirrored_positions(x[0, 0, :, 0], (multiple - h % multiple) % multiple)
    columns = mirrored_positions(x[0, 0, 0, :], (multiple - w % multiple) % multiple)
    return x.index_select(2, rows).index_select(3, columns)


def max_difference(got, expected):
    """The largest absolute difference between an exported model's output (array or tensor) and PyTorch's."""
    return float((torch.as_tensor(got, dtype=torch.float64) - expected.double()).abs().max())


EXPORT_TOLERANCE = 1e-4   # the most an exported model's output may differ from PyTorch's (export.py's files and the
                          # BioImage.IO package's weights, whose rdf.yaml states it as reproducibility_tolerance)


class ExportFault(UserError):
    """An export that fails its own checks (a file's output differs from PyTorch's, the package does not validate,
    an unexpected error while building it): a fault of this toolkit, not of the user's run or flags. It ends the
    script as a UserError does (one message on stderr) but with its own exit status, so that scripts and people
    can tell the two apart."""
    exit_code = 4


def versions():
    """'torch 2.13.0, onnx ..., onnxruntime ..., bioimageio.spec ...': what a report of an export fault needs."""
    from importlib.metadata import PackageNotFoundError, version

    def found(name):
        try:
            return version(name)
        except PackageNotFoundError:
            return "not installed"
    return ", ".join(f"{name} {found(name)}" for name in ("torch", "onnx", "onnxruntime", "bioimageio.spec"))


def fault_words(what):
    """An ExportFault's message: what went wrong, that it is the toolkit's bug, and what to send with a report."""
    return (f"{what}. This is a bug in unet-toolkit, not a mistake in your run or flags; nothing was written (an "
            f"earlier export is as it was). Please report it with this message, the run's config.yml and model.json, "
            f"and these versions: {versions()}")


def within_tolerance(got, expected, what):
    """max_difference(got, expected) when it is within EXPORT_TOLERANCE, else an ExportFault: `what` (e.g. "the ONNX
    export differs") from PyTorch's output by how much, and what to report."""
    diff = max_difference(got, expected)
    if not diff <= EXPORT_TOLERANCE:
        raise ExportFault(fault_words(f"{what} from PyTorch's output by {diff:.2e} (more than {EXPORT_TOLERANCE:g})"))
    return diff


def traced(model, x):
    """model traced on the example input x (a traced Predictor pads any size it is given: see reflect_to_multiple)."""
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")                  # the size check in the network's forward is traced as a constant
        return torch.jit.trace(model, (x,), check_trace=False)


def save_torchscript(model, x, path):
    """model traced on the example input x, saved to path (any batch; any size for a Predictor, multiples of 16 for
    the network alone)."""
    traced(model, x).save(path)


def save_onnx(model, x, path, names, opset=17):
    """model as ONNX (the legacy exporter) with dynamic batch and spatial axes; names: (input, output, height,
    width) as the file calls them."""
    import warnings
    axes = {0: "batch", 2: names[2], 3: names[3]}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")                  # the legacy exporter's deprecation and tracer warnings
        torch.onnx.export(model, (x,), path, input_names=[names[0]], output_names=[names[1]],
                          dynamic_axes={names[0]: axes, names[1]: axes}, opset_version=opset, dynamo=False)
