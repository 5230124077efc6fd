"""Inference rewrite of a ResNeSt into the graph the export emits: BatchNorm folded, split attention minimal.

The eager model keeps the checkpoint layout (grouped fc1/fc2, cardinality-major attention logits, a softmax over
a transposed view). Here the same function is re-expressed for inference:
- every BatchNorm is folded into the convolution before it;
- the radix sum before pooling is folded into fc1 (its weights tiled across the splits: fc1(sum_r g_r));
- fc2's rows are permuted to the radix-major order of the feature maps, so rSoftMax needs no transpose;
- radix 2 turns softmax([a0, a1]) into sigmoid([a0 - a1, a1 - a0]) by precomputing fc2's row differences;
- the weighted sum over splits is one Mul, one Split and R-1 Adds on static channel slices.
No shape is read at run time, so the graph has no Shape ops and only the batch axis is symbolic.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from models.resnest import Bottleneck, ResNeSt
from models.split_attn import SplitAttnConv2d


def _bn_scale_shift(bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    return scale, bn.bias - bn.running_mean * scale


def fold_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> nn.Conv2d:
    """A copy of `conv` with the eval-mode BatchNorm after it folded into its weight and bias."""
    scale, shift = _bn_scale_shift(bn)
    fused = copy.deepcopy(conv)
    fused.weight = nn.Parameter(conv.weight * scale.reshape(-1, 1, 1, 1))
    bias = conv.bias if conv.bias is not None else torch.zeros_like(scale)
    fused.bias = nn.Parameter(bias * scale + shift)
    return fused


def _dense(conv: nn.Conv2d) -> torch.Tensor:
    """The (out, in) matrix of a grouped 1x1 conv, block-diagonal over its groups."""
    out_ch, in_per_group = conv.weight.shape[:2]
    groups = conv.groups
    dense = torch.zeros(out_ch, in_per_group * groups, dtype=conv.weight.dtype)
    per_out = out_ch // groups
    for g in range(groups):
        rows, cols = slice(g * per_out, (g + 1) * per_out), slice(g * in_per_group, (g + 1) * in_per_group)
        dense[rows, cols] = conv.weight[rows, :, 0, 0]
    return dense


def _conv1x1(weight: torch.Tensor, bias: torch.Tensor) -> nn.Conv2d:
    conv = nn.Conv2d(weight.shape[1], weight.shape[0], 1)
    conv.weight = nn.Parameter(weight.reshape(*weight.shape, 1, 1).contiguous())
    conv.bias = nn.Parameter(bias.contiguous())
    return conv


class FusedSplitAttn(nn.Module):
    """Split attention with folded BNs and the fewest glue ops its radix allows."""

    def __init__(self, sa: SplitAttnConv2d) -> None:
        super().__init__()
        radix, channels = sa.radix, sa.channels
        cardinality = sa.fc1.groups
        self.radix, self.channels = radix, channels
        self.conv = fold_bn(sa.conv, sa.bn0)
        fc1 = fold_bn(sa.fc1, sa.bn1)
        if radix == 1:
            self.fc1, self.fc2 = fc1, copy.deepcopy(sa.fc2)
            return
        # fc1(sum over splits of the pooled map) == fc1 with its dense weights repeated once per split.
        self.fc1 = _conv1x1(_dense(fc1).repeat(1, radix), fc1.bias)
        # fc2 row (k, r, j) -> radix-major row (r, k, j): the order of the feature-map channels.
        per_group = channels // cardinality
        k, r, j = torch.meshgrid(torch.arange(cardinality), torch.arange(radix), torch.arange(per_group), indexing="ij")
        src = (k * radix * per_group + r * per_group + j).flatten()
        dst = (r * channels + k * per_group + j).flatten()
        order = torch.empty_like(src)
        order[dst] = src
        weight, bias = _dense(sa.fc2)[order], sa.fc2.bias[order]
        if radix == 2:
            # softmax over two logits == sigmoid of their difference, taken here once and for all.
            w0, w1 = weight[:channels], weight[channels:]
            b0, b1 = bias[:channels], bias[channels:]
            weight, bias = torch.cat([w0 - w1, w1 - w0]), torch.cat([b0 - b1, b1 - b0])
        self.fc2 = _conv1x1(weight, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv(x))
        attn = self.fc2(F.relu(self.fc1(x.mean((2, 3), keepdim=True))))
        if self.radix == 1:
            return x * torch.sigmoid(attn)
        if self.radix == 2:
            attn = torch.sigmoid(attn)
        else:
            attn = attn.reshape(-1, self.radix, self.channels, 1, 1).softmax(dim=1)
            attn = attn.reshape(-1, self.radix * self.channels, 1, 1)
        # One Split and R-1 Adds: on ORT's CPU EP this costs less than half of a ReduceSum over a 5-D view.
        splits = (x * attn).split(self.channels, dim=1)
        out = splits[0]
        for split in splits[1:]:
            out = out + split
        return out


class FusedBottleneck(nn.Module):
    """A bottleneck with every BN folded."""

    def __init__(self, block: Bottleneck) -> None:
        super().__init__()
        self.conv1 = fold_bn(block.conv1, block.bn1)
        self.conv2 = FusedSplitAttn(block.conv2)
        self.avd_first = block.avd_first
        self.avd_layer = block.avd_layer
        self.conv3 = fold_bn(block.conv3, block.bn3)
        self.downsample: nn.Module | None = None
        if block.downsample is not None:
            pool, conv, bn = block.downsample
            self.downsample = nn.Sequential(pool, fold_bn(conv, bn))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        out = F.relu(self.conv1(x))
        if self.avd_first:
            out = self.avd_layer(out)
        out = self.conv2(out)
        if not self.avd_first:
            out = self.avd_layer(out)
        return F.relu(self.conv3(out) + shortcut)


class FusedResNeSt(nn.Module):
    """images (N, 3, H, W) -> (logits (N, classes), pooled embedding (N, features)) from one forward, and with
    `feature_map` the last stage's map (N, features, h, w) the embedding is the mean of.

    A headless model (num_classes 0) returns (embedding,) alone: the graph then has no logits output.
    """

    def __init__(self, model: ResNeSt, feature_map: bool = False) -> None:
        super().__init__()
        self.feature_map = feature_map and bool(model.num_classes)
        stem = model.conv1
        self.stem = nn.Sequential(
            fold_bn(stem[0], stem[1]), nn.ReLU(),
            fold_bn(stem[3], stem[4]), nn.ReLU(),
            fold_bn(stem[6], model.bn1), nn.ReLU(),
            model.maxpool,
        )  # fmt: skip
        blocks = [b for stage in (model.layer1, model.layer2, model.layer3, model.layer4) for b in stage]
        self.blocks = nn.Sequential(*(FusedBottleneck(b) for b in blocks))
        self.fc = copy.deepcopy(model.fc) if model.num_classes else None

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        features = self.blocks(self.stem(images))
        embedding = torch.flatten(features.mean((2, 3), keepdim=True), 1)
        if self.fc is None:
            return (embedding,)
        return (self.fc(embedding), embedding, features) if self.feature_map else (self.fc(embedding), embedding)


class TwoHeads(nn.Module):
    """The eager model with both outputs, unfused: what a plain export of the checkpoint layout gives.

    Outputs as FusedResNeSt's: (logits, embedding[, features]), or (embedding,) for a headless model.
    """

    def __init__(self, model: ResNeSt, feature_map: bool = False) -> None:
        super().__init__()
        self.model = model
        self.feature_map = feature_map and bool(model.num_classes)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        features = self.model.forward_features(images)
        embedding = self.model.forward_head(features, pre_logits=True)
        if not self.model.num_classes:
            return (embedding,)
        logits = self.model.fc(embedding)
        return (logits, embedding, features) if self.feature_map else (logits, embedding)


@torch.no_grad()
def fuse(model: ResNeSt, feature_map: bool = False) -> FusedResNeSt:
    """The inference graph of an eval-mode ResNeSt (the model itself is left untouched), with the last feature
    map as an output where `feature_map` (classifiers only)."""
    if model.training:
        raise ValueError("fuse() needs an eval-mode model: BatchNorm folding uses running statistics")
    return FusedResNeSt(model, feature_map).eval()
