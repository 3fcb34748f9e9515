"""Where and how the network runs, decided once per process and passed down: the Runtime.

    rt = runtime.for_training(cfg)           # joins torchrun's process group when there is one
    rt = runtime.for_inference("cpu", cfg)   # val.py: the run's precision and layout on this device

Nothing else in the toolkit looks at the device type to choose a precision, a memory layout or
an optimizer implementation: it asks the Runtime. Every choice made for a GPU can be forced on
a CPU (--amp bf16, --memory_format channels_last, --loader memory), so the GPU code paths are
exercised by the CPU test suite.
"""
import contextlib
import os

import torch

import distributed
from archs import training_bytes_per_pixel
from utils import UserError, resolve_device


class Runtime:
    """Device, autocast dtype (None: full precision), memory format, fused optimizers (where torch has them for the
    device: engine.build_optimizer falls back to the plain ones), and this
    process's rank among `world` processes (only rank 0 prints and writes files)."""

    def __init__(self, device, amp_dtype, channels_last, fused, rank=0, world=1):
        self.device, self.amp_dtype, self.channels_last, self.fused = device, amp_dtype, channels_last, fused
        self.rank, self.world = rank, world

    @property
    def main(self):
        """Whether this process prints, draws progress bars and writes files."""
        return self.rank == 0

    @property
    def active(self):
        """Whether several processes train together (torchrun)."""
        return self.world > 1

    @property
    def cuda(self):
        return self.device.type == "cuda"

    @property
    def memory_format(self):
        return torch.channels_last if self.channels_last else torch.contiguous_format

    def autocast(self):
        """The mixed-precision context for forward passes (a no-op in full precision)."""
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def place_model(self, model):
        """The model on this device, in this memory format."""
        return model.to(self.device, memory_format=self.memory_format)

    def place_batch(self, images, masks=None):
        """A batch on this device (images in the model's memory format): -> (images, masks)."""
        images = images.to(self.device, non_blocking=True).contiguous(memory_format=self.memory_format)
        return images, None if masks is None else masks.to(self.device, non_blocking=True)

    def synchronize(self):
        """Waits for the device's queued work (for timing); nothing to wait for on CPU."""
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def precision_name(self):
        return str(self.amp_dtype).replace("torch.", "") if self.amp_dtype else "fp32"

    def describe(self):
        """'cpu, fp32' / 'cuda:0 x 4 processes, bfloat16 autocast, channels_last' for the start-up line."""
        parts = [f"{self.device}{f' x {self.world} processes' if self.active else ''}"]
        parts.append(f"{self.precision_name()} autocast" if self.amp_dtype else "fp32")
        if self.channels_last:
            parts.append("channels_last")
        return ", ".join(parts)


def cpu_has_native_bf16(cpuinfo="/proc/cpuinfo"):
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX): there bf16 autocast trains about twice as
    fast as fp32 (BENCHMARKS.md). Elsewhere bf16 is emulated and slower, so auto stays fp32."""
    try:
        with open(cpuinfo) as f:
            flags = next((line for line in f if line.startswith("flags")), "").split()
    except OSError:   # not Linux: no way to tell here, so fp32
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_amp(amp, device):
    """--amp -> autocast dtype, or None for full precision. auto: bf16 on a GPU that has it (else fp16),
    bf16 on a CPU with native bf16, fp32 on other CPUs."""
    if amp == "off":
        return None
    if amp == "auto" and device.type != "cuda":
        return torch.bfloat16 if cpu_has_native_bf16() else None
    if amp == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if amp == "fp16" and device.type != "cuda":
        raise UserError("--amp fp16 needs a CUDA GPU; on CPU use --amp bf16 or --amp off")
    return torch.bfloat16 if amp == "bf16" else torch.float16


def resolve_channels_last(memory_format):
    """--memory_format -> whether to use channels_last. auto picks it: cudnn's fastest layout on CUDA, and on CPU
    oneDNN's (measured 15-30% faster than contiguous for UNet and NestedUNet in bf16 and fp32: BENCHMARKS.md)."""
    return memory_format in ("auto", "channels_last")


def build(device, cfg, rank=0, world=1):
    """The Runtime for `device` with the config's precision and layout."""
    return Runtime(device, resolve_amp(cfg["amp"], device), resolve_channels_last(cfg["memory_format"]),
                   fused=True, rank=rank, world=world)


def memory_bytes(rt):
    """The memory a training step can use: the GPU's, or this machine's RAM."""
    if rt.cuda:
        return torch.cuda.get_device_properties(rt.device).total_memory
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def check_fits(cfg, rt):
    """Refuses an input size and batch whose training step cannot fit in the device's memory (estimated from
    archs.training_bytes_per_pixel, a floor), before the run folder is made: otherwise the kernel kills the run."""
    need = (training_bytes_per_pixel(cfg["arch"], cfg["base_channels"]) * cfg["input_w"] * cfg["input_h"]
            * cfg["batch_size"])
    have = memory_bytes(rt)
    if need > have:
        where = "GPU" if rt.cuda else "machine"
        raise UserError(f"--input_w {cfg['input_w']} --input_h {cfg['input_h']} with --batch_size {cfg['batch_size']}: "
                        f"a training step of {cfg['arch']} needs at least {need / 2**30:.0f} GiB, more than this "
                        f"{where}'s {have / 2**30:.0f} GiB. Use a smaller input (--crop trains on crops of that size "
                        "from larger images, and val.py predicts them by tiles) a smaller --batch_size or a smaller --base_channels")


def for_training(cfg):
    """This process's Runtime; under torchrun it joins the process group (NCCL on CUDA, gloo on CPU)."""
    rank, world, device = distributed.setup(cfg["device"])
    return build(device, cfg, rank, world)


def for_inference(device_name, cfg):
    """One process on `device_name`, predicting with the precision and layout the run trained with."""
    return build(resolve_device(device_name), cfg)
