import pytest
import torch

import config
from archs import ARCHS, NestedUNet, UNet, build_model
from utils import count_params


@pytest.mark.parametrize("arch", ["UNet", "NestedUNet"])
@pytest.mark.parametrize("deep_supervision", [False, True])
@pytest.mark.parametrize("input_channels", [1, 3])
@pytest.mark.parametrize("num_classes", [1, 3])
def test_output_shapes(arch, deep_supervision, input_channels, num_classes):
    if arch == "UNet" and deep_supervision:
        with pytest.raises(ValueError, match="NestedUNet"):
            ARCHS[arch](num_classes, input_channels, deep_supervision)
        return
    model = ARCHS[arch](num_classes, input_channels, deep_supervision).eval()
    for h, w in [(96, 96), (48, 80)]:
        with torch.no_grad():
            out = model(torch.randn(2, input_channels, h, w))
        outs = out if deep_supervision else [out]
        assert len(outs) == (4 if deep_supervision else 1)
        for o in outs:
            assert o.shape == (2, num_classes, h, w)


def test_positional_and_keyword_constructors_agree():
    a = UNet(2, 1, False)
    b = UNet(num_classes=2, input_channels=1, deep_supervision=False)
    assert count_params(a) == count_params(b)
    assert NestedUNet(1, 3, True).deep_supervision


def test_parameter_counts_match_reference():
    assert round(count_params(UNet(1, 3)) / 1e6, 2) == 7.85
    assert round(count_params(NestedUNet(1, 3)) / 1e6, 2) == 9.16


@pytest.mark.parametrize("arch", ["UNet", "NestedUNet"])
def test_gradients_reach_first_layer(arch):
    model = ARCHS[arch](1, 3)
    model(torch.randn(2, 3, 32, 32)).mean().backward()
    g = model.conv0_0.conv1.weight.grad
    assert g is not None and g.abs().sum() > 0


def test_size_not_divisible_by_16_is_explained():
    with pytest.raises(ValueError, match="divisible by 16"):
        UNet(1, 3)(torch.randn(1, 3, 40, 40))


def test_build_model_from_config():
    m = build_model({"arch": "NestedUNet", "num_classes": 2, "input_channels": 1, "deep_supervision": True,
                     "base_channels": 32})
    assert isinstance(m, NestedUNet) and m.final4.out_channels == 2 and m.conv0_0.conv1.in_channels == 1


@pytest.mark.parametrize("arch", ["UNet", "NestedUNet"])
def test_base_channels_sets_the_width_of_every_stage(arch):
    cfg = {**config.DEFAULTS, "arch": arch}
    reference, narrow = build_model(cfg), build_model({**cfg, "base_channels": 8})
    assert [reference.conv0_0.conv1.out_channels, reference.conv4_0.conv2.out_channels] == [32, 512]
    assert [narrow.conv0_0.conv1.out_channels, narrow.conv4_0.conv2.out_channels] == [8, 128]
    count = lambda m: sum(p.numel() for p in m.parameters())          # noqa: E731
    assert 12 < count(reference) / count(narrow) < 17                 # weights grow with the square of the width
    with torch.no_grad():
        assert narrow.eval()(torch.rand(1, 3, 32, 32)).shape == (1, 1, 32, 32)


@pytest.mark.parametrize("arch", ["UNet", "NestedUNet"])
@pytest.mark.parametrize("channels", [2, 4])
def test_first_layer_follows_any_channel_count(arch, channels):
    model = build_model({**config.DEFAULTS, "arch": arch, "input_channels": channels}).eval()
    first = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
    assert first.in_channels == channels
    with torch.no_grad():
        assert model(torch.rand(1, channels, 32, 32)).shape == (1, 1, 32, 32)


def conv(weight, x):
    return torch.nn.functional.conv2d(x, weight, padding=1)


def test_an_adapted_first_convolution_follows_the_sum_rule():
    from archs import FIRST_CONV, adapt_input_weight
    g = torch.Generator().manual_seed(0)
    net = build_model({"arch": "UNet", "num_classes": 1, "input_channels": 3, "deep_supervision": False,
                       "base_channels": 4})
    rgb_weight = net.state_dict()[FIRST_CONV]
    grey = torch.rand(2, 1, 16, 16, generator=g)
    # 3 -> 1: a grey image through the adapted convolution is the image of three equal channels through the original
    assert adapt_input_weight(rgb_weight, 1).shape == (4, 1, 3, 3)
    assert torch.allclose(conv(adapt_input_weight(rgb_weight, 1), grey), conv(rgb_weight, grey.repeat(1, 3, 1, 1)),
                          atol=1e-6)
    # 1 -> 4: an image of four equal channels through the adapted convolution is the grey image through the original
    grey_weight = adapt_input_weight(rgb_weight, 1)
    assert torch.allclose(conv(adapt_input_weight(grey_weight, 4), grey.repeat(1, 4, 1, 1)), conv(grey_weight, grey),
                          atol=1e-6)
    # 3 -> 2 (any other counts): channel i is the original's i mod 3, scaled by 3/2
    two = adapt_input_weight(rgb_weight, 2)
    assert torch.allclose(two, rgb_weight[:, :2] * 1.5)
    assert adapt_input_weight(rgb_weight, 3) is rgb_weight
