"""Residual convolution blocks that start as the identity but can learn."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class ResidualConvBlock(nn.Module):
    """``x + BN2(Conv3x3(ReLU(BN1(Conv3x3(x)))))``, exactly the identity at initialisation.

    Only ``BN2``'s scale (gamma) is zeroed: the residual branch then outputs 0, so a fresh block
    passes diffusion features through untouched, while gamma still gets a gradient on the first
    step and the convolutions from the second step on. (Zeroing more than gamma, as the research
    code did, leaves every gradient of the branch at zero forever.) There is no ReLU after the
    addition because diffusion features are signed and identity at init must hold for them.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        nn.init.zeros_(self.bn2.weight)

    def forward(self, x: Tensor) -> Tensor:
        branch = self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))
        return x + branch


def residual_stack(channels: int, num_blocks: int) -> nn.Sequential:
    """``num_blocks`` independent blocks (an empty stack is the identity).

    Each block is a separate module: ``[Block()] * n`` would share one block's weights n times.
    """
    if num_blocks < 0:
        raise ValueError(f"num_blocks must be >= 0, got {num_blocks}")
    return nn.Sequential(*(ResidualConvBlock(channels) for _ in range(num_blocks)))
