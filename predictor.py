"""The prediction module: raw image tensors in, probabilities out, as one torch.nn.Module.

    Predictor = normalise (normalize.py) -> network (archs.py) -> final head -> sigmoid or softmax

val.py, bench.py and export.py predict through it, so what is exported is what is evaluated. A run's
model.json (beside model.pth) describes it completely, so it can be rebuilt without config.yml or this
toolkit's scripts:

    import json, torch, predictor
    model = predictor.Predictor.build(json.load(open("models/cells/model.json")))
    model.load_network(torch.load("models/cells/model.pth", weights_only=True)).eval()
    # probs = model(x): x float32 (B, C, H, W) with the file's raw values (0..255, 0..65535, ...), H and W multiples of 16

Input intensity ranges: with ranges=None the module takes them from its input (the whole image it is given:
what an exported model does); val.py passes the ranges of each whole image, so that a resized copy or a tile
is normalised as the training loaders normalised it.
"""
import torch

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
        """Raw images -> logits of the final head (B, C, H, W)."""
        x = normalize(x, self.ranges(x) if ranges is None else ranges.to(x.device), self.norm)
        return final_logits(self.network(x), self.deep_supervision)

    def forward(self, x, ranges=None):
        return activate(self.logits(x, ranges), self.class_mode)


def max_difference(got, expected):
    """The largest absolute difference between an exported model's output (array or tensor) and PyTorch's."""
    return float((torch.as_tensor(got, dtype=torch.float64) - expected.double()).abs().max())


EXPORT_TOLERANCE = 1e-4   # the most an exported model's output may differ from PyTorch's (export.py's files and the
                          # BioImage.IO package's weights, whose rdf.yaml states it as reproducibility_tolerance)


def within_tolerance(got, expected, what, consequence):
    """max_difference(got, expected) when it is within EXPORT_TOLERANCE, else a UserError: `what` (e.g. "the ONNX
    export differs") from PyTorch's output by how much, then `consequence` (what was not written)."""
    diff = max_difference(got, expected)
    if not diff <= EXPORT_TOLERANCE:
        raise UserError(f"{what} from PyTorch's output by {diff:.2e} (more than {EXPORT_TOLERANCE:g}); {consequence}. "
                        "Please report this with the run's config.yml")
    return diff


def save_torchscript(model, x, path):
    """model traced on the example input x, saved to path (any batch and size: the network is fully convolutional)."""
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")                  # the size check in the network's forward is traced as a constant
        torch.jit.trace(model, (x,), check_trace=False).save(path)


def save_onnx(model, x, path, names, opset=17):
    """model as ONNX (the legacy exporter) with dynamic batch and spatial axes; names: (input, output, height,
    width) as the file calls them."""
    import warnings
    axes = {0: "batch", 2: names[2], 3: names[3]}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")                  # the legacy exporter's deprecation and tracer warnings
        torch.onnx.export(model, (x,), path, input_names=[names[0]], output_names=[names[1]],
                          dynamic_axes={names[0]: axes, names[1]: axes}, opset_version=opset, dynamo=False)
