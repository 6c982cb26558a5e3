"""VGG-19 with BatchNorm for 32×32 images (Simonyan & Zisserman 2015, configuration E).

The CIFAR variant used by the DEAT paper and the kuangliu/pytorch-cifar model zoo: sixteen 3×3
conv-BN-ReLU layers in five blocks of widths w, 2w, 4w, 8w, 8w, each block ending in 2×2 max pooling
(32×32 -> 1×1), then a single linear classifier instead of ImageNet VGG's three fully connected layers.
Convolutions carry no bias because the BatchNorm after each one subtracts it again. Five halvings need
inputs of at least 32×32.
"""

import torch
from torch import nn

# Configuration E: conv widths in multiples of the base width, "M" = 2×2 max pooling.
VGG19_LAYOUT = (1, 1, "M", 2, 2, "M", 4, 4, 4, 4, "M", 8, 8, 8, 8, "M", 8, 8, 8, 8, "M")


class VGG19(nn.Module):
    def __init__(self, num_classes: int, in_channels: int = 3, width: int = 64) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = in_channels
        for entry in VGG19_LAYOUT:
            if entry == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                out_channels = entry * width
                layers += [
                    nn.Conv2d(channels, out_channels, 3, padding=1, bias=False),
                    nn.BatchNorm2d(out_channels),
                    nn.ReLU(),
                ]
                channels = out_channels
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.features(x)  # (B, 8w, H/32, W/32)
        return self.classifier(features.mean(dim=(2, 3)))
