"""Image classifiers built from fastcnc's masked layers: ResNet-18/34/50, WideResNet-28-10, VGG-16.

Every convolution is a ``MaskedConv2d`` and every fully connected layer a ``MaskedLinear``, so the pruners and the
TSCNC regulariser see all prunable weights. Plain ``torch.nn`` only (no torchvision). Two stems: ``"cifar"`` (3x3,
stride 1, no pooling; for 32x32 and smaller inputs) and ``"imagenet"`` (7x7 stride 2 + 3x3 max-pool).
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from fastcnc._checks import check_choice, check_int
from fastcnc.layers import MaskedConv2d, MaskedLinear

STEMS = ("cifar", "imagenet")


def _conv3x3(c_in: int, c_out: int, stride: int = 1) -> MaskedConv2d:
    return MaskedConv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)


def _conv1x1(c_in: int, c_out: int, stride: int = 1) -> MaskedConv2d:
    return MaskedConv2d(c_in, c_out, 1, stride=stride, bias=False)


def _stem(stem: str, c_in: int, c_out: int, *, norm_act: bool = True) -> nn.Sequential:
    """CIFAR stem keeps the resolution; ImageNet stem divides it by 4. ``norm_act=False`` for pre-activation nets."""
    if stem == "cifar":
        layers: list[nn.Module] = [_conv3x3(c_in, c_out)]
    else:
        layers = [MaskedConv2d(c_in, c_out, 7, stride=2, padding=3, bias=False)]
    if norm_act:
        layers += [nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]
    if stem == "imagenet":
        layers.append(nn.MaxPool2d(3, stride=2, padding=1))
    return nn.Sequential(*layers)


# ---------------------------------------------------------------- ResNet


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, c_in: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = _conv3x3(c_in, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = _conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != planes:
            self.shortcut = nn.Sequential(_conv1x1(c_in, planes, stride), nn.BatchNorm2d(planes))

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, c_in: int, planes: int, stride: int = 1):
        super().__init__()
        c_out = planes * self.expansion
        self.conv1 = _conv1x1(c_in, planes)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = _conv3x3(planes, planes, stride)  # stride on the 3x3 conv (torchvision's "ResNet v1.5")
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = _conv1x1(planes, c_out)
        self.bn3 = nn.BatchNorm2d(c_out)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(_conv1x1(c_in, c_out, stride), nn.BatchNorm2d(c_out))

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    def __init__(self, block: type[BasicBlock] | type[Bottleneck], depths: tuple[int, ...], num_classes: int,
                 in_channels: int, stem: str, width: int):
        super().__init__()
        self.stem = _stem(stem, in_channels, width)
        c_in, stages = width, []
        for i, depth in enumerate(depths):
            planes = width * 2**i
            blocks = []
            for j in range(depth):
                blocks.append(block(c_in, planes, stride=2 if (i > 0 and j == 0) else 1))
                c_in = planes * block.expansion
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = MaskedLinear(c_in, num_classes)

    def forward(self, x):
        return self.fc(self.pool(self.stages(self.stem(x))))


# ---------------------------------------------------------------- WideResNet (pre-activation, Zagoruyko & Komodakis)


class WideBasic(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(c_in)
        self.conv1 = _conv3x3(c_in, c_out, stride)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.conv2 = _conv3x3(c_out, c_out)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = _conv1x1(c_in, c_out, stride) if (stride != 1 or c_in != c_out) else None

    def forward(self, x):
        pre = self.relu(self.bn1(x))
        # the projection shortcut reads the pre-activated input, as in the reference implementation
        shortcut = x if self.shortcut is None else self.shortcut(pre)
        out = self.conv2(self.relu(self.bn2(self.conv1(pre))))
        return out + shortcut


class WideResNet(nn.Module):
    def __init__(self, depth: int, widen: int, num_classes: int, in_channels: int, stem: str, width: int):
        super().__init__()
        if (depth - 4) % 6:
            raise ValueError(f"WideResNet depth must be 6n+4, got {depth}")
        n = (depth - 4) // 6
        self.stem = _stem(stem, in_channels, width, norm_act=False)
        c_in, stages = width, []
        for i in range(3):
            c_out = width * widen * 2**i
            stages.append(nn.Sequential(*[WideBasic(c_in if j == 0 else c_out, c_out, 2 if (i > 0 and j == 0) else 1)
                                          for j in range(n)]))
            c_in = c_out
        self.stages = nn.Sequential(*stages)
        self.head = nn.Sequential(nn.BatchNorm2d(c_in), nn.ReLU(inplace=True), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = MaskedLinear(c_in, num_classes)

    def forward(self, x):
        return self.fc(self.head(self.stages(self.stem(x))))


# ---------------------------------------------------------------- VGG-16 (with batch norm, CIFAR-style head)

_VGG16 = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")


class VGG(nn.Module):
    def __init__(self, plan: tuple, num_classes: int, in_channels: int, stem: str, width: int):
        super().__init__()
        layers: list[nn.Module] = []
        c_in = in_channels
        for i, item in enumerate(plan):
            if item == "M":
                # ceil_mode keeps a 1x1 map at 1x1, so the net also runs on inputs smaller than 32x32 (e.g. 8x8 digits)
                layers.append(nn.MaxPool2d(2, ceil_mode=True))
                continue
            c_out = item * width // 64
            if i == 0 and stem == "imagenet":
                layers += [MaskedConv2d(c_in, c_out, 7, stride=2, padding=3, bias=False)]
            else:
                layers += [_conv3x3(c_in, c_out)]
            layers += [nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]
            c_in = c_out
        self.features = nn.Sequential(*layers)
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = MaskedLinear(c_in, num_classes)

    def forward(self, x):
        return self.fc(self.pool(self.features(x)))


# ---------------------------------------------------------------- factory

# name -> (constructor(num_classes, in_channels, stem, width), standard width)
MODELS: dict[str, tuple[Callable[..., nn.Module], int]] = {
    "resnet18": (lambda k, c, s, w: ResNet(BasicBlock, (2, 2, 2, 2), k, c, s, w), 64),
    "resnet34": (lambda k, c, s, w: ResNet(BasicBlock, (3, 4, 6, 3), k, c, s, w), 64),
    "resnet50": (lambda k, c, s, w: ResNet(Bottleneck, (3, 4, 6, 3), k, c, s, w), 64),
    "wrn-28-10": (lambda k, c, s, w: WideResNet(28, 10, k, c, s, w), 16),
    "vgg16": (lambda k, c, s, w: VGG(_VGG16, k, c, s, w), 64),
}


def build_model(name: str, num_classes: int, in_channels: int = 3, stem: str = "cifar", width: int = 0) -> nn.Module:
    """Build a classifier from the registry ``MODELS``.

    Args:
        name: one of ``MODELS`` (``resnet18``, ``resnet34``, ``resnet50``, ``wrn-28-10``, ``vgg16``).
        num_classes: number of output logits.
        in_channels: image channels (3 for CIFAR, 1 for the embedded digits).
        stem: ``"cifar"`` (3x3 conv, full resolution) or ``"imagenet"`` (7x7/2 conv + max-pool).
        width: base channel count; 0 means the architecture's standard width (64, or 16 for WideResNet). Small
            widths give CPU-sized versions of the same architecture (the ``quick`` preset uses ResNet-18 at 16).
    """
    check_choice("name", name, MODELS)
    check_int("num_classes", num_classes, minimum=1)
    check_int("in_channels", in_channels, minimum=1)
    check_choice("stem", stem, STEMS)
    check_int("width", width, minimum=0)
    constructor, standard_width = MODELS[name]
    return constructor(num_classes, in_channels, stem, width or standard_width)
