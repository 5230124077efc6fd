"""The ResNeSt network: deep stem, split-attention bottlenecks with avd and avg-down shortcuts, pooled head.

Module names follow the official checkpoint layout (conv1.{0,1,3,4,6}, bn1, layerN.i.*, fc), so official and
timm state_dicts load with strict=True.
"""

from __future__ import annotations

import torch
from torch import nn

from .split_attn import SplitAttnConv2d
from .variants import Variant


class Bottleneck(nn.Module):
    """1x1 reduce -> split-attention 3x3 (with optional avd pooling) -> 1x1 expand, plus shortcut."""

    expansion = 4

    def __init__(
        self,
        inplanes: int,
        planes: int,
        *,
        stride: int,
        downsample: nn.Module | None,
        radix: int,
        cardinality: int,
        bottleneck_width: int,
        avd_first: bool,
    ) -> None:
        super().__init__()
        group_width = int(planes * (bottleneck_width / 64.0)) * cardinality
        # avd: a strided block runs its 3x3 at stride 1 and downsamples with a 3x3 average pool instead.
        self.avd = stride > 1
        self.avd_first = avd_first
        self.conv1 = nn.Conv2d(inplanes, group_width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(group_width)
        self.conv2 = SplitAttnConv2d(group_width, group_width, radix=radix, cardinality=cardinality)
        self.avd_layer = nn.AvgPool2d(3, stride, padding=1) if self.avd else nn.Identity()
        self.conv3 = nn.Conv2d(group_width, planes * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        if self.avd_first:
            out = self.avd_layer(out)
        out = self.conv2(out)
        if not self.avd_first:
            out = self.avd_layer(out)
        out = self.bn3(self.conv3(out))
        return self.relu(out + shortcut)


def _downsample(inplanes: int, outplanes: int, stride: int) -> nn.Sequential:
    """avg-down shortcut: average pool, then 1x1 conv and BN (slot 0 stays an Identity at stride 1)."""
    pool: nn.Module = (
        nn.AvgPool2d(stride, stride, ceil_mode=True, count_include_pad=False) if stride > 1 else nn.Identity()
    )
    return nn.Sequential(pool, nn.Conv2d(inplanes, outplanes, 1, bias=False), nn.BatchNorm2d(outplanes))


class ResNeSt(nn.Module):
    """ResNeSt with three entry points: the feature map, the pooled embedding and the logits.

    `num_classes` sizes the classifier (`fc`); 0 leaves none, for a backbone that only embeds.
    """

    def __init__(self, variant: Variant, num_classes: int = 1000) -> None:
        super().__init__()
        self.variant = variant
        self.num_classes = num_classes
        width = variant.stem_width
        self.conv1 = nn.Sequential(
            nn.Conv2d(3, width, 3, 2, 1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
            nn.Conv2d(width, width, 3, 1, 1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
            nn.Conv2d(width, width * 2, 3, 1, 1, bias=False),
        )
        self.bn1 = nn.BatchNorm2d(width * 2)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        inplanes = width * 2
        stages = []
        for i, (planes, blocks) in enumerate(zip((64, 128, 256, 512), variant.layers, strict=True)):
            stride = 1 if i == 0 else 2
            stage, inplanes = self._make_stage(variant, inplanes, planes, blocks, stride)
            stages.append(stage)
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.num_features = inplanes
        self.fc: nn.Module = self._classifier(num_classes)

    def _classifier(self, num_classes: int) -> nn.Module:
        # timm's convention: num_classes=0 is a headless backbone whose forward() returns the embedding,
        # and whose state_dict has no fc.* keys.
        if num_classes < 0:
            raise ValueError(f"num_classes must be 0 (headless) or positive, got {num_classes}")
        return nn.Linear(self.num_features, num_classes) if num_classes else nn.Identity()

    def reset_classifier(self, num_classes: int) -> None:
        """A fresh (untrained) head for `num_classes` classes, or none for 0: the start of a fine-tune."""
        self.fc = self._classifier(num_classes)
        self.num_classes = num_classes

    @staticmethod
    def _make_stage(
        variant: Variant, inplanes: int, planes: int, blocks: int, stride: int
    ) -> tuple[nn.Sequential, int]:
        outplanes = planes * Bottleneck.expansion
        layers = []
        for i in range(blocks):
            first = i == 0
            needs_shortcut = first and (stride != 1 or inplanes != outplanes)
            layers.append(
                Bottleneck(
                    inplanes,
                    planes,
                    stride=stride if first else 1,
                    downsample=_downsample(inplanes, outplanes, stride) if needs_shortcut else None,
                    radix=variant.radix,
                    cardinality=variant.cardinality,
                    bottleneck_width=variant.bottleneck_width,
                    avd_first=variant.avd_first,
                )
            )
            inplanes = outplanes
        return nn.Sequential(*layers), inplanes

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Images (N, 3, H, W) -> the last stage's feature map (N, 2048, H/32, W/32)."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Feature map -> pooled embedding (pre_logits) or logits."""
        x = torch.flatten(x.mean((2, 3), keepdim=True), 1)
        return x if pre_logits else self.fc(x)

    def forward_embedding(self, x: torch.Tensor) -> torch.Tensor:
        """Images -> the globally pooled embedding (N, 2048)."""
        return self.forward_head(self.forward_features(x), pre_logits=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Images -> logits (N, num_classes); the embedding (N, 2048) for a headless model."""
        return self.forward_head(self.forward_features(x))
