"""U-Net and UNet++ (NestedUNet) with the reference topology, and a name -> class registry."""
import torch
from torch import nn

BASE_CHANNELS = 32  # channels of the first stage, as in the reference; doubled at each of the four depths
SIZE_MULTIPLE = 16  # four 2x poolings: the network's input height and width are multiples of this


def stage_channels(base_channels):
    """The channels at depth 0..4: [32, 64, 128, 256, 512] for the reference's 32."""
    return [base_channels * 2 ** depth for depth in range(5)]


class VGGBlock(nn.Module):
    """(convolution => BN => ReLU) * 2"""

    def __init__(self, in_channels, middle_channels, out_channels):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, middle_channels, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(middle_channels)
        self.conv2 = nn.Conv2d(middle_channels, out_channels, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(x)))


def check_input_size(x):
    """Four 2x poolings need H and W divisible by SIZE_MULTIPLE; say so instead of failing in torch.cat."""
    h, w = x.shape[-2:]
    if h % SIZE_MULTIPLE or w % SIZE_MULTIPLE:
        raise ValueError(f"input size {h}x{w} is not divisible by {SIZE_MULTIPLE}, which the four poolings of "
                         f"U-Net/UNet++ need; use --input_h/--input_w multiples of {SIZE_MULTIPLE} (e.g. 96)")


class UNet(nn.Module):
    """U-Net: four VGG-block encoder stages, a bottleneck, four decoder stages with skips."""

    def __init__(self, num_classes, input_channels=3, deep_supervision=False, base_channels=BASE_CHANNELS):
        super().__init__()
        if deep_supervision:
            raise ValueError("UNet has a single output head; deep supervision needs NestedUNet")
        f = stage_channels(base_channels)
        self.pool = nn.MaxPool2d(2, 2)
        self.up = nn.Upsample(scale_factor=2, mode="bilinear", align_corners=True)
        self.conv0_0 = VGGBlock(input_channels, f[0], f[0])
        self.conv1_0 = VGGBlock(f[0], f[1], f[1])
        self.conv2_0 = VGGBlock(f[1], f[2], f[2])
        self.conv3_0 = VGGBlock(f[2], f[3], f[3])
        self.conv4_0 = VGGBlock(f[3], f[4], f[4])
        self.conv3_1 = VGGBlock(f[3] + f[4], f[3], f[3])
        self.conv2_2 = VGGBlock(f[2] + f[3], f[2], f[2])
        self.conv1_3 = VGGBlock(f[1] + f[2], f[1], f[1])
        self.conv0_4 = VGGBlock(f[0] + f[1], f[0], f[0])
        self.final = nn.Conv2d(f[0], num_classes, kernel_size=1)

    def forward(self, x):  # x: (B, C_in, H, W), H and W divisible by 16
        check_input_size(x)
        x0_0 = self.conv0_0(x)                      # (B, 32, H, W) with base_channels 32
        x1_0 = self.conv1_0(self.pool(x0_0))        # (B, 64, H/2, W/2)
        x2_0 = self.conv2_0(self.pool(x1_0))        # (B, 128, H/4, W/4)
        x3_0 = self.conv3_0(self.pool(x2_0))        # (B, 256, H/8, W/8)
        x4_0 = self.conv4_0(self.pool(x3_0))        # (B, 512, H/16, W/16)
        x3_1 = self.conv3_1(torch.cat([x3_0, self.up(x4_0)], 1))
        x2_2 = self.conv2_2(torch.cat([x2_0, self.up(x3_1)], 1))
        x1_3 = self.conv1_3(torch.cat([x1_0, self.up(x2_2)], 1))
        x0_4 = self.conv0_4(torch.cat([x0_0, self.up(x1_3)], 1))
        return self.final(x0_4)                     # (B, num_classes, H, W) logits


class NestedUNet(nn.Module):
    """UNet++: dense skip nodes X(i,j); with deep supervision, a head on each of X(0,1..4)."""

    def __init__(self, num_classes, input_channels=3, deep_supervision=False, base_channels=BASE_CHANNELS):
        super().__init__()
        f = stage_channels(base_channels)
        self.deep_supervision = deep_supervision
        self.pool = nn.MaxPool2d(2, 2)
        self.up = nn.Upsample(scale_factor=2, mode="bilinear", align_corners=True)

        self.conv0_0 = VGGBlock(input_channels, f[0], f[0])
        self.conv1_0 = VGGBlock(f[0], f[1], f[1])
        self.conv2_0 = VGGBlock(f[1], f[2], f[2])
        self.conv3_0 = VGGBlock(f[2], f[3], f[3])
        self.conv4_0 = VGGBlock(f[3], f[4], f[4])

        # node X(i,j) sees j same-depth predecessors and the upsampled X(i+1,j-1)
        self.conv0_1 = VGGBlock(f[0] + f[1], f[0], f[0])
        self.conv1_1 = VGGBlock(f[1] + f[2], f[1], f[1])
        self.conv2_1 = VGGBlock(f[2] + f[3], f[2], f[2])
        self.conv3_1 = VGGBlock(f[3] + f[4], f[3], f[3])
        self.conv0_2 = VGGBlock(f[0] * 2 + f[1], f[0], f[0])
        self.conv1_2 = VGGBlock(f[1] * 2 + f[2], f[1], f[1])
        self.conv2_2 = VGGBlock(f[2] * 2 + f[3], f[2], f[2])
        self.conv0_3 = VGGBlock(f[0] * 3 + f[1], f[0], f[0])
        self.conv1_3 = VGGBlock(f[1] * 3 + f[2], f[1], f[1])
        self.conv0_4 = VGGBlock(f[0] * 4 + f[1], f[0], f[0])

        if deep_supervision:
            self.final1 = nn.Conv2d(f[0], num_classes, kernel_size=1)
            self.final2 = nn.Conv2d(f[0], num_classes, kernel_size=1)
            self.final3 = nn.Conv2d(f[0], num_classes, kernel_size=1)
            self.final4 = nn.Conv2d(f[0], num_classes, kernel_size=1)
        else:
            self.final = nn.Conv2d(f[0], num_classes, kernel_size=1)

    def forward(self, x):  # x: (B, C_in, H, W), H and W divisible by 16
        check_input_size(x)
        x0_0 = self.conv0_0(x)
        x1_0 = self.conv1_0(self.pool(x0_0))
        x0_1 = self.conv0_1(torch.cat([x0_0, self.up(x1_0)], 1))

        x2_0 = self.conv2_0(self.pool(x1_0))
        x1_1 = self.conv1_1(torch.cat([x1_0, self.up(x2_0)], 1))
        x0_2 = self.conv0_2(torch.cat([x0_0, x0_1, self.up(x1_1)], 1))

        x3_0 = self.conv3_0(self.pool(x2_0))
        x2_1 = self.conv2_1(torch.cat([x2_0, self.up(x3_0)], 1))
        x1_2 = self.conv1_2(torch.cat([x1_0, x1_1, self.up(x2_1)], 1))
        x0_3 = self.conv0_3(torch.cat([x0_0, x0_1, x0_2, self.up(x1_2)], 1))

        x4_0 = self.conv4_0(self.pool(x3_0))
        x3_1 = self.conv3_1(torch.cat([x3_0, self.up(x4_0)], 1))
        x2_2 = self.conv2_2(torch.cat([x2_0, x2_1, self.up(x3_1)], 1))
        x1_3 = self.conv1_3(torch.cat([x1_0, x1_1, x1_2, self.up(x2_2)], 1))
        x0_4 = self.conv0_4(torch.cat([x0_0, x0_1, x0_2, x0_3, self.up(x1_3)], 1))

        if self.deep_supervision:  # list of 4 x (B, num_classes, H, W); the last is the prediction
            return [self.final1(x0_1), self.final2(x0_2), self.final3(x0_3), self.final4(x0_4)]
        return self.final(x0_4)    # (B, num_classes, H, W) logits


# What a training step holds per input pixel of each image, at least (activations kept for the backward pass and
# their gradients; measured with torch 2.13 on CPU at 256x256: UNet 4.0-4.2 KB, NestedUNet 8.4-9.4 KB in bf16 and
# fp32), with base_channels 32; the activations grow with the channel count. A floor used to refuse an input size
# that cannot fit, before anything runs.
TRAINING_BYTES_PER_PIXEL = {"UNet": 4000, "NestedUNet": 8000}


def training_bytes_per_pixel(arch, base_channels):
    return TRAINING_BYTES_PER_PIXEL[arch] * base_channels / BASE_CHANNELS
ARCHS = {"UNet": UNet, "NestedUNet": NestedUNet}


def final_logits(outputs, deep_supervision):
    """A network's output -> the logits (B, C, H, W) predictions are made from: with deep supervision, the last
    of its heads."""
    return outputs[-1] if deep_supervision else outputs


def activate(logits, class_mode):
    """Logits -> probabilities, in float32: softmax over the classes, or a sigmoid per class."""
    logits = logits.float()
    return logits.softmax(1) if class_mode == "softmax" else torch.sigmoid(logits)


def standardize_each(x, eps):
    """Each input (B, C, H, W) to zero mean and unit variance per channel, eps added to the standard deviation: a copy
    of normalize.standardize_each (the per_image_norm step), here because a BioImage.IO package rebuilds Probabilities
    from this file alone (tests/test_normalize.py checks that the two are the same)."""
    return (x - x.mean(dim=(2, 3), keepdim=True)) / (x.std(dim=(2, 3), keepdim=True) + eps)


class Probabilities(nn.Module):
    """Network inputs (B, C_in, H, W), standardised per input first if per_image_eps is set, -> class probabilities
    (B, C, H, W): the network, its final head and the activation. It is built from names and numbers only, and
    this file imports nothing but torch, so that a BioImage.IO package can rebuild it from this file alone (its
    weights are the network's, under 'network.').

    network: {"arch", "num_classes", "input_channels", "deep_supervision", "base_channels"}, as build_model reads
    them from a config."""

    def __init__(self, network, class_mode="sigmoid", per_image_eps=None):
        super().__init__()
        self.network = build_model(network)
        self.deep_supervision, self.class_mode = network["deep_supervision"], class_mode
        self.per_image_eps = per_image_eps

    def forward(self, x):
        if self.per_image_eps is not None:
            x = standardize_each(x, self.per_image_eps)
        return activate(final_logits(self.network(x), self.deep_supervision), self.class_mode)


FIRST_CONV = "conv0_0.conv1.weight"   # the first convolution's weight in a network's state_dict: (out, C_in, 3, 3)
HEAD_PREFIX = "final"                 # the final 1x1 heads' attribute names: final, or final1 .. final4


def is_head(key):
    """Whether a state_dict key belongs to a final head (the layer a new class count or target replaces)."""
    return key.split(".")[0].startswith(HEAD_PREFIX)


def adapt_input_weight(weight, channels):
    """A first convolution's weight (out, C, k, k) for `channels` input channels instead of C, as
    segmentation_models_pytorch adapts a pretrained encoder: to 1 channel, the sum over the C (a grey image then gives
    what the original gave for the image of C equal channels: 3 -> 1); otherwise channel i takes the original's channel
    i mod C and all are scaled by C / channels (1 -> N: repeated and divided by N, so an image of N equal channels gives
    what the grey image gave; between other counts the same rule keeps the output's scale)."""
    c = weight.shape[1]
    if channels == c:
        return weight
    if channels == 1:
        return weight.sum(1, keepdim=True)
    return weight[:, torch.arange(channels) % c] * (c / channels)


def parameter_shapes(cfg):
    """{name: shape} of the state_dict of the network build_model(cfg) gives, computed on the meta device (nothing
    allocated, so a config that describes an enormous network costs nothing to check)."""
    with torch.device("meta"):
        net = build_model(cfg)
    return {k: tuple(v.shape) for k, v in net.state_dict().items()}


def build_model(cfg):
    """The network a config names, with its class count, input channels, deep supervision and width. Its input is
    normalised before it (normalize.py), per_image_norm included."""
    return ARCHS[cfg["arch"]](cfg["num_classes"], cfg["input_channels"], cfg["deep_supervision"],
                              cfg["base_channels"])
