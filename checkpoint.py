"""Checkpoints: written atomically, holding only tensors and plain values, loaded with weights_only=True.

model.pth is the plain state_dict of the best model (what load_state_dict takes); last.pth holds
everything needed to resume: model, optimizer, scheduler, AMP scaler, epoch, best score,
early-stopping counter, log rows, RNG states and the config.
"""
import io
import random

import numpy as np
import torch

from utils import UserError, atomic_write


def save(obj, path):
    """torch.save through a temporary file and a rename: a crash never leaves half a checkpoint."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    atomic_write(path, lambda f: f.write(buffer.getbuffer()), mode="wb")


def map_tensors(obj, fn):
    """obj (dicts, lists and tuples of tensors and plain values) with fn applied to every tensor."""
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, dict):
        return {k: map_tensors(v, fn) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(map_tensors(v, fn) for v in obj)
    return obj


def device_copy(obj):
    """obj with every tensor cloned where it is (on a GPU: queued after the work that produced it, without waiting
    for it): the snapshot of an epoch that training goes on changing. to_cpu() brings it to the host later."""
    return map_tensors(obj, lambda t: t.detach().clone())


def to_cpu(obj):
    """obj with every tensor that is not on the CPU moved there (those on the CPU are kept as they are)."""
    return map_tensors(obj, lambda t: t if t.device.type == "cpu" else t.to("cpu"))


def load(path, data=None):
    """torch.load(weights_only=True): a file from elsewhere cannot run code; a non-checkpoint is a UserError.
    data: the file's bytes, already read (a zip's member, or a file read once to hash it), named `path` in messages."""
    try:
        return torch.load(path if data is None else io.BytesIO(data), map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise UserError(f"checkpoint {path} does not exist") from None
    except Exception as e:  # noqa: BLE001 - garbage input fails in many ways (UnpicklingError, IndexError, EOFError...)
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"{path} is not a checkpoint this toolkit can load safely ({first_line}). "
                        "Use a model.pth/last.pth written by train.py.") from None


def check_shapes(state, expected, path):
    """Refuses weights whose tensors are not those of the network a config describes (expected: {name: shape}, as
    archs.parameter_shapes gives without allocating it), before the network is built: a settings file that claims
    a network far larger than its weights (num_classes 100000000, base_channels 100000) is refused at once."""
    if not isinstance(state, dict):
        raise UserError(f"{path} does not hold a model's weights (a state_dict). Use the model.pth train.py wrote.")
    shapes = {k: tuple(v.shape) for k, v in state.items() if isinstance(v, torch.Tensor)}
    differ = sorted(k for k in expected if shapes.get(k) != expected[k])
    if differ or set(shapes) - set(expected):
        key = differ[0] if differ else sorted(set(shapes) - set(expected))[0]
        raise UserError(f"{path} does not fit the network its settings describe (arch, num_classes, input_channels, "
                        f"base_channels, deep_supervision in config.yml and model.json): {key} is "
                        f"{shapes.get(key, 'missing')} in the file, {expected.get(key, 'not in the network')} in the "
                        "settings. Use the run's own config.yml and model.json with its model.pth.")


def load_weights(model, state, path):
    """load_state_dict with a clear message when the weights belong to another network."""
    try:
        model.load_state_dict(state)
    except (RuntimeError, TypeError, AttributeError) as e:
        raise UserError(f"{path} does not fit the network in its config.yml (arch, num_classes, input_channels, "
                        f"deep_supervision): {str(e).splitlines()[0]}") from None


def rng_state():
    """Python, NumPy and torch RNG states as tensors and plain values."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": list(random.getstate()[1]), "numpy_keys": torch.from_numpy(keys.astype(np.int64)),
             "numpy_pos": int(pos), "numpy_gauss": [int(has_gauss), float(cached)], "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    random.setstate((3, tuple(state["python"]), None))
    np.random.set_state(("MT19937", state["numpy_keys"].numpy().astype(np.uint32), state["numpy_pos"],
                         state["numpy_gauss"][0], state["numpy_gauss"][1]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
