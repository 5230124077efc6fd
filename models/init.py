"""Seeded random weights, for running and testing the network without a checkpoint."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def pink_noise(gen: torch.Generator, n: int, size: int) -> torch.Tensor:
    """Images with a roughly 1/f spectrum, like photographs: octaves of upsampled Gaussian noise."""
    out = torch.zeros(n, 3, size, size)
    side = 4
    while side <= size:
        octave = torch.randn(n, 3, side, side, generator=gen)
        out += F.interpolate(octave, size=(size, size), mode="bilinear", align_corners=False) * (4 / side) ** 0.5
        side *= 2
    return out / out.std()


@torch.no_grad()
def _calibrate_batchnorm(model: nn.Module, gen: torch.Generator, size: int) -> None:
    """Set running statistics to those of one forward on photo-like noise, then jitter them."""
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    momenta = [bn.momentum for bn in norms]
    for bn in norms:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative average: after one batch, the batch's own statistics
    was_training = model.training
    model.train()
    # Half photo-like, half white noise: parity checks feed both, and either alone leaves the other far out
    # of distribution, where random weights amplify float rounding instead of the signal.
    model(torch.cat([pink_noise(gen, 4, size), torch.randn(4, 3, size, size, generator=gen)]))
    model.train(was_training)
    for bn, momentum in zip(norms, momenta, strict=True):
        bn.momentum = momentum
        # The attention BNs see one value per image: a channel that happened to vary little over the batch
        # would get a huge gain, and a radix softmax driven by huge logits flips on float32 rounding.
        bn.running_var.clamp_(min=0.1 * float(bn.running_var.median()))
        bn.running_var.mul_(0.9 + 0.2 * torch.rand(bn.running_var.shape, generator=gen))
        bn.running_mean.add_(0.05 * torch.randn(bn.running_mean.shape, generator=gen) * bn.running_var.sqrt())


@torch.no_grad()
def init_random(model: nn.Module, seed: int = 0, calibration_size: int = 128) -> nn.Module:
    """Fill every parameter and BatchNorm statistic from a seeded generator.

    Plain random weights make a deep ResNet nearly blind to its input (every image gets the same class),
    which would hide bugs from parity checks and make a randomly initialised service useless to test.
    So BatchNorm statistics are calibrated on photo-like noise (then jittered, so none is an identity), and
    each residual branch's last BN (`bn3`) gets a small gain, as trained ResNets have. The result: logits
    that differ from photograph to photograph, of order 10 for resnest50 (deeper variants reach 1e2-1e3, so
    parity checks use tolerances relative to the logit scale). Works on any module tree that uses the
    official names, the official implementation included.
    """
    gen = torch.Generator().manual_seed(seed)
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d):
            fan_out = module.kernel_size[0] * module.kernel_size[1] * module.out_channels
            module.weight.copy_(torch.randn(module.weight.shape, generator=gen) * math.sqrt(2.0 / fan_out))
            if module.bias is not None:
                module.bias.copy_((torch.rand(module.bias.shape, generator=gen) - 0.5) * 0.2)
        elif isinstance(module, nn.BatchNorm2d):
            low, high = (0.1, 0.3) if name.endswith("bn3") else (0.5, 1.5)
            module.weight.copy_(low + (high - low) * torch.rand(module.weight.shape, generator=gen))
            module.bias.copy_(torch.randn(module.bias.shape, generator=gen) * 0.1)
        elif isinstance(module, nn.Linear):
            module.weight.copy_(torch.randn(module.weight.shape, generator=gen) / math.sqrt(module.in_features))
            module.bias.copy_(torch.randn(module.bias.shape, generator=gen) * 0.01)
    _calibrate_batchnorm(model, gen, calibration_size)
    return model
