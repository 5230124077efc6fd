"""Split-Attention convolution and the radix softmax (rSoftMax) of ResNeSt.

Paper: "ResNeSt: Split-Attention Networks", Zhang et al. 2020, https://arxiv.org/abs/2004.08955.
Attribute names follow the official checkpoints (conv, bn0, fc1, bn1, fc2) so their state_dicts load strictly.
"""

from __future__ import annotations

import torch
from torch import nn


class RadixSoftmax(nn.Module):
    """Softmax across the radix splits of each cardinal group; a sigmoid gate when radix is 1.

    fc2 emits its logits cardinality-major (K, R, C/K) while the feature maps are radix-major (R, K, C/K),
    hence the axis swap before flattening back. Every reshape keeps the batch axis as the single -1.
    """

    def __init__(self, radix: int, cardinality: int, channels: int) -> None:
        super().__init__()
        self.radix = radix
        self.cardinality = cardinality
        self.channels = channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.radix == 1:
            return torch.sigmoid(x)
        x = x.reshape(-1, self.cardinality, self.radix, self.channels // self.cardinality)
        x = x.transpose(1, 2).softmax(dim=1)
        return x.reshape(-1, self.radix * self.channels, 1, 1)


class SplitAttnConv2d(nn.Module):
    """A grouped 3x3 conv producing `radix` splits per cardinal group, fused by channel-wise attention."""

    def __init__(
        self,
        in_channels: int,
        channels: int,
        *,
        stride: int = 1,
        radix: int = 2,
        cardinality: int = 1,
        reduction_factor: int = 4,
    ) -> None:
        super().__init__()
        attn_channels = max(in_channels * radix // reduction_factor, 32)
        self.radix = radix
        self.channels = channels
        self.conv = nn.Conv2d(in_channels, channels * radix, 3, stride, 1, groups=cardinality * radix, bias=False)
        self.bn0 = nn.BatchNorm2d(channels * radix)
        self.relu = nn.ReLU(inplace=True)
        self.fc1 = nn.Conv2d(channels, attn_channels, 1, groups=cardinality)
        self.bn1 = nn.BatchNorm2d(attn_channels)
        self.fc2 = nn.Conv2d(attn_channels, channels * radix, 1, groups=cardinality)
        self.rsoftmax = RadixSoftmax(radix, cardinality, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn0(self.conv(x)))
        # Static channel sizes: the split is one Split node and no shape is read at run time.
        splits = x.split(self.channels, dim=1) if self.radix > 1 else (x,)
        x_gap = splits[0]
        for split in splits[1:]:
            x_gap = x_gap + split
        x_gap = x_gap.mean((2, 3), keepdim=True)
        x_gap = self.relu(self.bn1(self.fc1(x_gap)))
        x_attn = self.rsoftmax(self.fc2(x_gap))
        if self.radix == 1:
            return x * x_attn
        attns = x_attn.split(self.channels, dim=1)
        out = attns[0] * splits[0]
        for attn, split in zip(attns[1:], splits[1:], strict=True):
            out = out + attn * split
        return out
