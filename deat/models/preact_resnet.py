"""PreAct-ResNet-18 for 32×32 images (He et al. 2016, "Identity Mappings in Deep Residual Networks").

The CIFAR variant used by Rice et al. 2020 ("Overfitting in adversarially robust deep learning") and
Pang et al. 2021 ("Bag of Tricks for Adversarial Training"): a 3×3 stem convolution without normalisation,
four stages of two pre-activation blocks at widths w, 2w, 4w, 8w (strides 1, 2, 2, 2), a final
BatchNorm + ReLU (the last block's output is otherwise never activated), global average pooling and one
linear layer. With w = 64 and 10 classes this has 11,172,170 parameters.

`PreActBlock` and `make_stage` are shared with SENet-18 and WideResNet-34-10, which use the same block.
"""

import torch
import torch.nn.functional as F
from torch import nn


class PreActBlock(nn.Module):
    """BN-ReLU-conv3×3-BN-ReLU-conv3×3 plus an identity shortcut (He et al. 2016, Fig. 4e).

    When the block changes width or resolution the shortcut is a 1×1 convolution applied to the
    *pre-activated* input, so both paths see the same normalised tensor.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        needs_projection = stride != 1 or in_channels != out_channels
        self.projection = (
            nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False) if needs_projection else None
        )

    def residual(self, pre_activated: torch.Tensor) -> torch.Tensor:
        """The residual branch; SENet-18 overrides it to rescale channels."""
        return self.conv2(F.relu(self.bn2(self.conv1(pre_activated))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre_activated = F.relu(self.bn1(x))
        shortcut = x if self.projection is None else self.projection(pre_activated)
        return self.residual(pre_activated) + shortcut


def make_stage(
    block: type[PreActBlock], in_channels: int, out_channels: int, num_blocks: int, stride: int
) -> nn.Sequential:
    """`num_blocks` blocks; only the first one changes width and (by `stride`) resolution."""
    blocks = [block(in_channels, out_channels, stride)]
    blocks += [block(out_channels, out_channels, 1) for _ in range(num_blocks - 1)]
    return nn.Sequential(*blocks)


class PreActResNet18(nn.Module):
    def __init__(self, num_classes: int, in_channels: int = 3, width: int = 64) -> None:
        super().__init__()
        self.stem = nn.Conv2d(in_channels, width, 3, padding=1, bias=False)
        self.stages = nn.Sequential(
            make_stage(PreActBlock, width, width, 2, stride=1),
            make_stage(PreActBlock, width, 2 * width, 2, stride=2),
            make_stage(PreActBlock, 2 * width, 4 * width, 2, stride=2),
            make_stage(PreActBlock, 4 * width, 8 * width, 2, stride=2),
        )
        self.final_bn = nn.BatchNorm2d(8 * width)
        self.classifier = nn.Linear(8 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = F.relu(self.final_bn(self.stages(self.stem(x))))  # (B, 8w, H/8, W/8)
        return self.classifier(features.mean(dim=(2, 3)))  # global average pool -> (B, num_classes)
