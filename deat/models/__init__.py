"""Classifiers for adversarial training, built by name, with input normalisation inside the model.

Attacks perturb pixels in [0, 1] and clip to that box, so the model itself maps pixels to normalised
inputs: `build_model` returns `Normalized(net, mean, std)`, which stores mean and std as buffers (they
travel with `.to(device)` and the state_dict) and feeds (x - mean) / std to the network.

Architectures (`width` is the base channel width; None picks the usual one):

| name            | network                                         | default width           |
|-----------------|-------------------------------------------------|-------------------------|
| preact_resnet18 | PreAct-ResNet-18 (He et al. 2016; Rice et al.)  | 64 channels             |
| senet18         | SENet-18 (Hu et al. 2018; CIFAR model zoo)      | 64 channels             |
| vgg19           | VGG-19 with BatchNorm, one linear classifier    | 64 channels             |
| wrn34_10        | WideResNet-34-10 (Zagoruyko & Komodakis 2016)   | widen factor 10         |
| small_cnn       | two conv layers + small head, for 28×28 digits  | 16 channels             |

All take any number of input channels; the first four expect 32×32 images, small_cnn 28×28 or 32×32.
Every forward pass is free of data-dependent Python control flow, so the models compile with
`torch.compile(fullgraph=True)` and can be captured in CUDA graphs.
"""

from collections.abc import Callable, Sequence

import torch
from torch import nn

from deat.models.preact_resnet import PreActResNet18
from deat.models.senet import SENet18
from deat.models.small_cnn import SmallCNN
from deat.models.vgg import VGG19
from deat.models.wide_resnet import WideResNet34

# name -> (constructor(num_classes, in_channels, width), default width)
_REGISTRY: dict[str, tuple[Callable[[int, int, int], nn.Module], int]] = {
    "preact_resnet18": (PreActResNet18, 64),
    "senet18": (SENet18, 64),
    "vgg19": (VGG19, 64),
    "wrn34_10": (WideResNet34, 10),
    "small_cnn": (SmallCNN, 16),
}
ARCHITECTURES: tuple[str, ...] = tuple(_REGISTRY)


class Normalized(nn.Module):
    """Applies per-channel (x - mean) / std to (B, C, H, W) pixels in [0, 1], then calls `net`."""

    def __init__(self, net: nn.Module, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        if len(mean) != len(std):
            raise ValueError(f"mean and std need one value per channel; got {len(mean)} and {len(std)} values")
        if any(not s > 0 for s in std):
            raise ValueError(f"std must be positive in every channel; got {list(std)}")
        self.net = net
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net((x - self.mean) / self.std)


def build_model(
    name: str,
    num_classes: int,
    in_channels: int = 3,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    width: int | None = None,
) -> nn.Module:
    """The architecture `name` (one of `ARCHITECTURES`) wrapped in `Normalized`.

    mean / std: per-channel statistics of the training pixels in [0, 1]; None means 0 / 1 (no normalisation).
    width: base channel width, or the widen factor k for wrn34_10; None uses the table in the module docstring.
    """
    if name not in _REGISTRY:
        raise ValueError(f"unknown architecture {name!r}; valid names: {', '.join(ARCHITECTURES)}")
    for argument, value in (("num_classes", num_classes), ("in_channels", in_channels)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{argument} must be a positive integer; got {value!r}")
    if width is not None and (not isinstance(width, int) or width < 1):
        raise ValueError(f"width must be a positive integer or None; got {width!r}")
    mean = [0.0] * in_channels if mean is None else list(mean)
    std = [1.0] * in_channels if std is None else list(std)
    for argument, values in (("mean", mean), ("std", std)):
        if len(values) != in_channels:
            raise ValueError(
                f"{argument} needs one value per input channel (in_channels={in_channels}); got {values}"
            )
    constructor, default_width = _REGISTRY[name]
    net = constructor(num_classes, in_channels, default_width if width is None else width)
    return Normalized(net, mean, std)
