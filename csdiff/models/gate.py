"""Gated fusion of several feature variants (the paper's feature amalgamation).

Each variant of a feature level (e.g. plain prompt, LoRA + canny, ...) is projected by its own
residual blocks; a weight assigner scores every channel of every variant per image, a softmax
across variants turns the scores into weights, and the level's output is the weighted sum.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from csdiff.models.blocks import residual_stack


@dataclass
class GateOutput:
    """What the gate returns.

    features: one fused map per level, (B, C_l, H_l, W_l).
    weights: one tensor per level, (V, B, C_l), summing to 1 over V (averaged over assigners).
    loss: scalar regulariser (sparsity + diversity), 0 when both weights are 0.
    """

    features: list[Tensor]
    weights: list[Tensor]
    loss: Tensor


def sparsity_loss(weights: Tensor) -> Tensor:
    """``L_s = -mean_{b,c} ||w[:, b, c]||_2`` for weights (V, B, C).

    Minimal (-1) when every channel picks exactly one variant, maximal (-1/sqrt(V)) when uniform.
    """
    return -weights.norm(p=2, dim=0).mean()


def diversity_loss(weights: Tensor) -> Tensor:
    """``L_d = -H(mean_{b,c} w[:, b, c])`` for weights (V, B, C), natural-log entropy.

    Minimal (-log V) when, on average, every variant is used equally; 0 when one variant is
    always chosen. Complements sparsity: one-hot per channel, but not the same variant everywhere.
    """
    usage = weights.mean(dim=(1, 2))
    return torch.special.xlogy(usage, usage).sum()


class WeightAssigner(nn.Module):
    """Scores each channel of a projected map: Conv3x3 -> ReLU -> BN -> Dropout -> GAP -> Linear.

    The score is one logit per image and channel, so gate weights are constant over space.
    """

    def __init__(self, channels: int, hidden: int = 128, dropout: float = 0.5) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, hidden, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(hidden)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(hidden, channels)

    def forward(self, x: Tensor) -> Tensor:
        hidden = self.dropout(self.bn(torch.relu(self.conv(x))))
        return self.fc(hidden.mean(dim=(2, 3)))


class GatedFusion(nn.Module):
    """Fuses ``num_variants`` versions of a multi-level feature pyramid, level by level.

    Per level: ``proj_blocks`` residual blocks per variant (identity at init), ``num_assigners``
    weight assigners shared by the variants, softmax over variants, weighted sum, then
    ``post_blocks`` residual blocks.

    With several assigners the k fused maps are averaged. Because fusion is linear in the
    weights, this equals fusing once with the assigners' mean weights, which is what is computed
    and what ``GateOutput.weights`` reports. The regulariser is applied to each assigner's own
    weights (averaging would blur one-hot choices) and averaged over assigners, so its scale does
    not depend on k; it is summed over levels.

    An assigner sees all variants of a level in one call, concatenated along the batch: its
    BatchNorm statistics are then taken over the mix of variants in training, as its running
    statistics are in evaluation. With a single variant no assigner is built: the weights are 1
    and the gate is projection + post blocks.
    """

    def __init__(
        self,
        in_channels: Sequence[int],
        num_variants: int,
        proj_blocks: int = 1,
        post_blocks: int = 1,
        num_assigners: int = 1,
        assigner_channels: int = 128,
        dropout: float = 0.5,
        sparsity_weight: float = 0.0,
        diversity_weight: float = 0.0,
    ) -> None:
        super().__init__()
        if not in_channels:
            raise ValueError("in_channels must name at least one level")
        if num_variants < 1:
            raise ValueError(f"num_variants must be >= 1, got {num_variants}")
        if num_assigners < 1:
            raise ValueError(f"num_assigners must be >= 1, got {num_assigners}")
        self.in_channels = tuple(int(c) for c in in_channels)
        self.num_variants = num_variants
        self.sparsity_weight = sparsity_weight
        self.diversity_weight = diversity_weight
        self.projections = nn.ModuleList(
            nn.ModuleList(residual_stack(c, proj_blocks) for _ in range(num_variants)) for c in self.in_channels
        )
        num_built = num_assigners if num_variants > 1 else 0
        self.assigners = nn.ModuleList(
            nn.ModuleList(WeightAssigner(c, assigner_channels, dropout) for _ in range(num_built))
            for c in self.in_channels
        )
        self.post = nn.ModuleList(residual_stack(c, post_blocks) for c in self.in_channels)

    def forward(self, features: Sequence[Sequence[Tensor]]) -> GateOutput:
        """``features[v][l]`` is variant v's map at level l, shaped (B, C_l, H_l, W_l)."""
        self._check(features)
        fused_levels: list[Tensor] = []
        weight_levels: list[Tensor] = []
        loss = features[0][0].new_zeros(())
        for level, channels in enumerate(self.in_channels):
            projected = [self.projections[level][v](features[v][level]) for v in range(self.num_variants)]
            batch, _, height, width = projected[0].shape
            stacked = torch.cat(projected, dim=0)  # (V*B, C, H, W), variant-major
            assigners = self.assigners[level]
            if len(assigners) == 0:
                weights = stacked.new_ones(1, batch, channels)
            else:
                per_assigner = [a(stacked).view(self.num_variants, batch, channels).softmax(dim=0) for a in assigners]
                loss = loss + self._regulariser(per_assigner)
                weights = torch.stack(per_assigner).mean(dim=0)
            variants = stacked.view(self.num_variants, batch, channels, height, width)
            fused = torch.einsum("vbc,vbchw->bchw", weights, variants)
            fused_levels.append(self.post[level](fused))
            weight_levels.append(weights)
        return GateOutput(features=fused_levels, weights=weight_levels, loss=loss)

    def _regulariser(self, per_assigner: list[Tensor]) -> Tensor:
        total = per_assigner[0].new_zeros(())
        for weights in per_assigner:
            if self.sparsity_weight:
                total = total + self.sparsity_weight * sparsity_loss(weights)
            if self.diversity_weight:
                total = total + self.diversity_weight * diversity_loss(weights)
        return total / len(per_assigner)

    def _check(self, features: Sequence[Sequence[Tensor]]) -> None:
        if len(features) != self.num_variants:
            raise ValueError(f"gate expects {self.num_variants} variants, got {len(features)}")
        num_levels = len(self.in_channels)
        for v, levels in enumerate(features):
            if len(levels) != num_levels:
                raise ValueError(f"variant {v}: gate expects {num_levels} levels, got {len(levels)}")
            for level, (x, channels) in enumerate(zip(levels, self.in_channels)):
                if x.ndim != 4 or x.shape[1] != channels:
                    raise ValueError(
                        f"variant {v}, level {level}: expected shape (B, {channels}, H, W), got {tuple(x.shape)}"
                    )
                reference = features[0][level].shape
                if x.shape != reference:
                    raise ValueError(
                        f"variant {v}, level {level}: shape {tuple(x.shape)} differs from variant 0's "
                        f"{tuple(reference)}; all variants of a level must have the same shape"
                    )
