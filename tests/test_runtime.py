"""runtime.py: one object decides device, precision and memory layout; every GPU choice can be forced on CPU."""
import pytest
import torch

import config
import runtime
from utils import UserError

CPU = torch.device("cpu")


def cfg(**kw):
    return {**config.DEFAULTS, **kw}


NATIVE_BF16 = torch.bfloat16 if runtime.cpu_has_native_bf16() else None


@pytest.mark.parametrize("amp, memory_format, dtype, channels_last", [
    ("auto", "auto", NATIVE_BF16, True),                 # CPU defaults: bf16 where the CPU has it, channels_last
    ("off", "contiguous", None, False),
    ("bf16", "channels_last", torch.bfloat16, True),     # what a GPU gets, forced on the CPU
])
def test_cpu_choices(amp, memory_format, dtype, channels_last):
    rt = runtime.build(CPU, cfg(amp=amp, memory_format=memory_format))
    assert (rt.amp_dtype, rt.channels_last, rt.fused, rt.main, rt.active) == (dtype, channels_last, True, True, False)


@pytest.mark.parametrize("flags, native", [
    ("fpu avx2 avx512f avx512_bf16 avx512_vnni", True),
    ("fpu avx2 amx_bf16 amx_tile", True),
    ("fpu avx2 avx512f avx512_vnni", False),             # AVX-512 alone: bf16 would be emulated
])
def test_native_bf16_is_read_from_the_cpu_flags(tmp_path, flags, native):
    info = tmp_path / "cpuinfo"
    info.write_text(f"processor\t: 0\nmodel name\t: x\nflags\t\t: {flags}\n")
    assert runtime.cpu_has_native_bf16(str(info)) is native
    assert runtime.cpu_has_native_bf16(str(tmp_path / "absent")) is False


def test_fp16_on_cpu_is_refused():
    with pytest.raises(UserError, match="--amp fp16 needs a CUDA GPU"):
        runtime.build(CPU, cfg(amp="fp16"))


def test_place_and_autocast_follow_the_choices():
    rt = runtime.build(CPU, cfg(amp="bf16", memory_format="channels_last"))
    model = rt.place_model(torch.nn.Conv2d(3, 4, 3))
    images, masks = rt.place_batch(torch.randn(2, 3, 8, 8), torch.zeros(2, 1, 8, 8))
    assert model.weight.is_contiguous(memory_format=torch.channels_last)
    assert images.is_contiguous(memory_format=torch.channels_last) and masks.shape == (2, 1, 8, 8)
    with rt.autocast():
        assert model(images).dtype == torch.bfloat16
    plain = runtime.build(CPU, cfg(amp="off", memory_format="contiguous"))
    with plain.autocast():
        assert plain.place_model(torch.nn.Conv2d(3, 4, 3))(torch.randn(1, 3, 8, 8)).dtype == torch.float32
    assert rt.describe() == "cpu, bfloat16 autocast, channels_last" and plain.describe() == "cpu, fp32"


def test_for_inference_uses_the_runs_settings_on_the_asked_device():
    rt = runtime.for_inference("cpu", cfg(amp="bf16"))
    assert rt.device == CPU and rt.amp_dtype == torch.bfloat16
    with pytest.raises(UserError, match="not a device"):
        runtime.for_inference("gpu0", cfg())
