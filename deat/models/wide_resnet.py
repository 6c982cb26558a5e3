"""WideResNet-34-10 for 32×32 images (Zagoruyko & Komodakis 2016), as trained by Madry et al. 2018 and TRADES.

Depth 34 = 1 stem conv + 3 groups × 5 blocks × 2 convs + 1 classifier. A 3×3 stem convolution to 16 channels,
three groups of five pre-activation blocks at widths 16k, 32k, 64k (strides 1, 2, 2), a final BatchNorm + ReLU,
global average pooling and one linear layer. The block is PreAct-ResNet's (dropout off, as in TRADES).
Here the `width` argument is the widen factor k (10 for WRN-34-10), not a channel count.
"""

import torch
import torch.nn.functional as F
from torch import nn

from deat.models.preact_resnet import PreActBlock, make_stage

BLOCKS_PER_GROUP = (34 - 4) // 6  # 5
STEM_CHANNELS = 16


class WideResNet34(nn.Module):
    def __init__(self, num_classes: int, in_channels: int = 3, width: int = 10) -> None:
        super().__init__()
        widths = (16 * width, 32 * width, 64 * width)
        self.stem = nn.Conv2d(in_channels, STEM_CHANNELS, 3, padding=1, bias=False)
        self.groups = nn.Sequential(
            make_stage(PreActBlock, STEM_CHANNELS, widths[0], BLOCKS_PER_GROUP, stride=1),
            make_stage(PreActBlock, widths[0], widths[1], BLOCKS_PER_GROUP, stride=2),
            make_stage(PreActBlock, widths[1], widths[2], BLOCKS_PER_GROUP, stride=2),
        )
        self.final_bn = nn.BatchNorm2d(widths[2])
        self.classifier = nn.Linear(widths[2], num_classes)
        # He-normal (fan-out) convolutions and a zero classifier bias, the initialisation of the WRN paper.
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        nn.init.zeros_(self.classifier.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = F.relu(self.final_bn(self.groups(self.stem(x))))  # (B, 64k, H/4, W/4)
        return self.classifier(features.mean(dim=(2, 3)))
