"""SENet-18 for 32×32 images: PreAct-ResNet-18 blocks with squeeze-and-excitation (Hu et al. 2018).

This is the CIFAR "SENet18" of the kuangliu/pytorch-cifar model zoo that Pang et al. 2021 ("Bag of Tricks
for Adversarial Training") and the DEAT paper train: a 3×3 stem convolution followed by BatchNorm + ReLU,
four stages of two pre-activation blocks at widths w, 2w, 4w, 8w whose residual branch is rescaled
channel-wise by a squeeze-and-excitation gate (reduction 16), global average pooling and one linear layer.
Unlike PreAct-ResNet-18 it has no BatchNorm + ReLU after the last block; we keep that to match the
architecture the paper's numbers come from.
"""

import torch
import torch.nn.functional as F
from torch import nn

from deat.models.preact_resnet import PreActBlock, make_stage

SE_REDUCTION = 16  # channel reduction inside the excitation MLP (Hu et al. 2018, Sec. 6.1)


class SqueezeExcitation(nn.Module):
    """x * sigmoid(W2 relu(W1 avgpool(x))): one gate in (0, 1) per channel, computed from global context."""

    def __init__(self, channels: int, reduction: int = SE_REDUCTION) -> None:
        super().__init__()
        hidden = max(1, channels // reduction)  # narrow widths (w = 16) would otherwise leave 0 units
        self.squeeze = nn.Conv2d(channels, hidden, 1)
        self.excite = nn.Conv2d(hidden, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        context = x.mean(dim=(2, 3), keepdim=True)  # (B, C, 1, 1)
        gate = torch.sigmoid(self.excite(F.relu(self.squeeze(context))))
        return x * gate


class SEPreActBlock(PreActBlock):
    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__(in_channels, out_channels, stride)
        self.excitation = SqueezeExcitation(out_channels)

    def residual(self, pre_activated: torch.Tensor) -> torch.Tensor:
        return self.excitation(super().residual(pre_activated))


class SENet18(nn.Module):
    def __init__(self, num_classes: int, in_channels: int = 3, width: int = 64) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU()
        )
        self.stages = nn.Sequential(
            make_stage(SEPreActBlock, width, width, 2, stride=1),
            make_stage(SEPreActBlock, width, 2 * width, 2, stride=2),
            make_stage(SEPreActBlock, 2 * width, 4 * width, 2, stride=2),
            make_stage(SEPreActBlock, 4 * width, 8 * width, 2, stride=2),
        )
        self.classifier = nn.Linear(8 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.stages(self.stem(x))  # (B, 8w, H/8, W/8)
        return self.classifier(features.mean(dim=(2, 3)))
