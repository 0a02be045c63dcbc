"""Segmentation heads: UPerNet's decoder (PPM + FPN) and the FCN auxiliary head."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def _conv_bn_relu(in_channels: int, out_channels: int, kernel_size: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


def _conv_gn_relu(in_channels: int, out_channels: int, kernel_size: int) -> nn.Sequential:
    # Up to 32 groups of at least 2 channels: a group of one channel at 1x1 would normalise to 0.
    groups = math.gcd(32, max(out_channels // 2, 1))
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False),
        nn.GroupNorm(groups, out_channels),
        nn.ReLU(inplace=True),
    )


def _resize(x: Tensor, size: Sequence[int]) -> Tensor:
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)


class PyramidPooling(nn.Module):
    """PSPNet's pyramid pooling on the coarsest level, followed by a 3x3 bottleneck.

    Normalised with GroupNorm instead of BatchNorm: pooled cells (1x1 at scale 1) and the
    coarsest diffusion level (down to 1x1 or 2x2) leave BatchNorm with a single value per
    channel at batch 1, which errors in training and is noise at the paper's batch of 2.
    GroupNorm is per sample, so it is defined there and behaves the same in train and eval.
    """

    def __init__(self, in_channels: int, channels: int, pool_scales: Sequence[int]) -> None:
        super().__init__()
        self.stages = nn.ModuleList(
            nn.Sequential(nn.AdaptiveAvgPool2d(scale), _conv_gn_relu(in_channels, channels, 1)) for scale in pool_scales
        )
        self.bottleneck = _conv_gn_relu(in_channels + len(pool_scales) * channels, channels, 3)

    def forward(self, x: Tensor) -> Tensor:
        size = x.shape[-2:]
        pooled = [_resize(stage(x), size) for stage in self.stages]
        return self.bottleneck(torch.cat([x, *pooled], dim=1))


class UPerHead(nn.Module):
    """UPerNet decoder: PPM on the coarsest level, FPN top-down path, fusion of all levels.

    Takes feature maps ordered fine to coarse (non-increasing height and width) and returns
    logits at the finest level's resolution.
    """

    def __init__(
        self,
        in_channels: Sequence[int],
        num_classes: int,
        channels: int = 512,
        pool_scales: Sequence[int] = (1, 2, 3, 6),
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        if not in_channels:
            raise ValueError("in_channels must name at least one level")
        self.in_channels = tuple(int(c) for c in in_channels)
        self.ppm = PyramidPooling(self.in_channels[-1], channels, pool_scales)
        self.laterals = nn.ModuleList(_conv_bn_relu(c, channels, 1) for c in self.in_channels[:-1])
        self.fpn_convs = nn.ModuleList(_conv_bn_relu(channels, channels, 3) for _ in self.in_channels[:-1])
        self.fuse = _conv_bn_relu(len(self.in_channels) * channels, channels, 3)
        self.dropout = nn.Dropout2d(dropout)
        self.classifier = nn.Conv2d(channels, num_classes, 1)

    def forward(self, features: Sequence[Tensor]) -> Tensor:
        self._check(features)
        laterals = [lateral(x) for lateral, x in zip(self.laterals, features[:-1])]
        laterals.append(self.ppm(features[-1]))
        for i in range(len(laterals) - 1, 0, -1):
            laterals[i - 1] = laterals[i - 1] + _resize(laterals[i], laterals[i - 1].shape[-2:])
        outs = [conv(x) for conv, x in zip(self.fpn_convs, laterals[:-1])]
        outs.append(laterals[-1])
        size = outs[0].shape[-2:]
        outs = [outs[0], *(_resize(x, size) for x in outs[1:])]
        return self.classifier(self.dropout(self.fuse(torch.cat(outs, dim=1))))

    def _check(self, features: Sequence[Tensor]) -> None:
        if len(features) != len(self.in_channels):
            raise ValueError(f"UPerHead expects {len(self.in_channels)} levels, got {len(features)}")
        for level, (x, channels) in enumerate(zip(features, self.in_channels)):
            if x.ndim != 4 or x.shape[1] != channels:
                raise ValueError(f"level {level}: expected shape (B, {channels}, H, W), got {tuple(x.shape)}")
        for level in range(1, len(features)):
            prev, cur = features[level - 1].shape[-2:], features[level].shape[-2:]
            if cur[0] > prev[0] or cur[1] > prev[1]:
                shapes = [tuple(x.shape[-2:]) for x in features]
                raise ValueError(
                    f"UPerHead expects levels ordered fine to coarse, but level {level} {tuple(cur)} is larger "
                    f"than level {level - 1} {tuple(prev)} (spatial sizes: {shapes})"
                )


class FCNHead(nn.Module):
    """Auxiliary head: ``num_convs`` 3x3 conv-BN-ReLU, dropout, 1x1 classifier."""

    def __init__(
        self, in_channels: int, num_classes: int, channels: int = 256, num_convs: int = 1, dropout: float = 0.1
    ) -> None:
        super().__init__()
        widths = [in_channels] + [channels] * num_convs
        self.convs = nn.Sequential(*(_conv_bn_relu(a, b, 3) for a, b in zip(widths[:-1], widths[1:])))
        self.dropout = nn.Dropout2d(dropout)
        self.classifier = nn.Conv2d(widths[-1], num_classes, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.dropout(self.convs(x)))
