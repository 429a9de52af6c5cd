"""Model architectures, each registered with its model card (:class:`~protectors.core.model_card.ModelCard`).

The card is what protectors and the profiler read (they never import this module): the input shape and classes,
the named modules at every hidden activation (the default lock sites), and, for sites where a lock can be folded
into the layer before it, that layer's name. :func:`factory` returns a builder that carries its card.

Input size: LeNet-5's first convolution is padded by 2, as usual for 28×28 MNIST. Its second convolution is
unpadded when its input is at least 10×10 (MNIST: 14×14 → 10×10 → 5×5, the paper's 400-feature classifier);
on the 8×8 digits it is padded by 2 as well (8 → 4 → 2×2, a 64-feature classifier), so the architecture keeps its
layer and neuron counts (6, 16, 120, 84) on every dataset instead of upsampling the images.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from protectors.core.model_card import CardedFactory, ModelCard
from protectors.core.registry import Registry

models: Registry[Callable[..., nn.Module]] = Registry("model")


@dataclass(frozen=True)
class _CardTemplate:
    default_input: tuple[int, int, int]
    lock_sites: tuple[str, ...]
    fold_producers: tuple[tuple[str, str], ...]


_CARDS: dict[str, _CardTemplate] = {}
#: classes a model card assumes when none is given (the profiler's synthetic models)
DEFAULT_CLASSES = 10


def model(name: str, default_input: tuple[int, int, int], lock_sites: tuple[str, ...],
          fold_producers: dict[str, str] | None = None):
    """Register a builder ``(in_channels, image_size, num_classes) -> nn.Module`` with its card's declarations."""

    def deco(builder):
        _CARDS[name] = _CardTemplate(tuple(default_input), tuple(lock_sites), tuple((fold_producers or {}).items()))
        return models.register(name)(builder)

    return deco


def card(name: str, in_channels: int | None = None, image_size: int | None = None,
         num_classes: int = DEFAULT_CLASSES) -> ModelCard:
    """The card of model ``name`` at an input size (default: the model's own default input)."""
    models.get(name)  # a "did you mean" error for an unknown name
    t = _CARDS[name]
    return ModelCard(name, t.default_input[0] if in_channels is None else in_channels,
                     t.default_input[1] if image_size is None else image_size, num_classes, t.lock_sites,
                     t.fold_producers)


class LeNet5(nn.Module):
    def __init__(self, in_channels: int = 1, image_size: int = 28, num_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 6, 5, padding=2)
        self.relu1 = nn.ReLU(inplace=True)
        self.pool1 = nn.MaxPool2d(2)
        half = image_size // 2
        pad2 = 0 if half >= 10 else 2
        self.conv2 = nn.Conv2d(6, 16, 5, padding=pad2)
        self.relu2 = nn.ReLU(inplace=True)
        self.pool2 = nn.MaxPool2d(2)
        side = (half + 2 * pad2 - 4) // 2
        self.flatten = nn.Flatten()
        self.fc1 = nn.Linear(16 * side * side, 120)
        self.relu3 = nn.ReLU(inplace=True)
        self.fc2 = nn.Linear(120, 84)
        self.relu4 = nn.ReLU(inplace=True)
        self.fc3 = nn.Linear(84, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool1(self.relu1(self.conv1(x)))
        x = self.pool2(self.relu2(self.conv2(x)))
        x = self.relu3(self.fc1(self.flatten(x)))
        return self.fc3(self.relu4(self.fc2(x)))


@model("lenet5", (1, 28, 28), ("relu1", "relu2", "relu3", "relu4"),
       {"relu1": "conv1", "relu2": "conv2", "relu3": "fc1", "relu4": "fc2"})
def lenet5(in_channels: int = 1, image_size: int = 28, num_classes: int = 10) -> nn.Module:
    return LeNet5(in_channels, image_size, num_classes)


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNet18(nn.Module):
    """CIFAR-style ResNet-18: 3×3 stem without max-pooling, four stages of two basic blocks."""

    def __init__(self, in_channels: int = 3, num_classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, 64, 3, 1, 1, bias=False), nn.BatchNorm2d(64),
                                  nn.ReLU(inplace=True))
        widths, cin, stages = (64, 128, 256, 512), 64, []
        for i, w in enumerate(widths):
            stages.append(nn.Sequential(BasicBlock(cin, w, 1 if i == 0 else 2), BasicBlock(w, w, 1)))
            cin = w
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(512, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer4(self.layer3(self.layer2(self.layer1(self.stem(x)))))
        return self.fc(self.pool(x))


@model("resnet18", (3, 32, 32), ("stem", "layer1", "layer2", "layer3", "layer4", "pool"), {"stem": "stem.1"})
def resnet18(in_channels: int = 3, image_size: int = 32, num_classes: int = 10) -> nn.Module:
    return ResNet18(in_channels, num_classes)


class _Pooled(nn.Module):
    """MobileNetV2's global pooling as a module, so the pooled feature can be a lock site."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1)


class MobileNetV2(nn.Module):
    def __init__(self, in_channels: int = 3, num_classes: int = 10):
        super().__init__()
        from torchvision.models import mobilenet_v2

        net = mobilenet_v2(weights=None, num_classes=num_classes)
        if in_channels != 3:
            old = net.features[0][0]
            net.features[0][0] = nn.Conv2d(in_channels, old.out_channels, 3, old.stride, 1, bias=False)
        self.features = net.features
        self.pool = _Pooled()
        self.classifier = net.classifier

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.pool(self.features(x)))


@model("mobilenetv2", (3, 32, 32),
       ("features.0", "features.3", "features.6", "features.13", "features.17", "features.18", "pool"))
def mobilenetv2(in_channels: int = 3, image_size: int = 32, num_classes: int = 10) -> nn.Module:
    """torchvision's MobileNetV2 (no pretrained weights); sites after the stem, each resolution stage, the pool."""
    return MobileNetV2(in_channels, num_classes)


def factory(name: str, in_channels: int, image_size: int, num_classes: int, seed: int) -> CardedFactory:
    """A zero-argument builder whose random initialization is fixed by ``seed``; it carries the model's card."""
    builder = models.get(name)

    def make() -> nn.Module:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return builder(in_channels=in_channels, image_size=image_size, num_classes=num_classes)

    return CardedFactory(make, card(name, in_channels, image_size, num_classes))
