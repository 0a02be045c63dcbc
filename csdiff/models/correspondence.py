"""Semantic correspondence on diffusion features: the gated head, the InfoNCE loss, matching.

Coordinates are (x, y) pixel positions with the pixel-centre convention throughout: the
centre of pixel (i, j) is at (j, i), a frame of width W spans [-0.5, W - 0.5], and a point
moves between frames by ``(p + 0.5) * new / old - 0.5``. That is also how bilinear
resizing (``align_corners=False``) places pixels, so features sampled at a point equal the
resized map's value there.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from csdiff.models.gate import GatedFusion, GateOutput


def rescale_points(points: Tensor, from_size: Sequence[int], to_size: Sequence[int]) -> Tensor:
    """(N, 2) points (x, y) from a frame of size (H, W) to another (pixel-centre convention)."""
    scale = points.new_tensor([to_size[1] / from_size[1], to_size[0] / from_size[0]])
    return (points + 0.5) * scale - 0.5


def sample_features(feature_map: Tensor, points: Tensor) -> Tensor:
    """Bilinear features (N, C) of a (C, H, W) map at (N, 2) points given in its own pixel frame."""
    c, h, w = feature_map.shape
    size = points.new_tensor([w, h])
    grid = ((points + 0.5) / size * 2 - 1).view(1, 1, -1, 2).to(feature_map.dtype)
    out = F.grid_sample(feature_map[None], grid, mode="bilinear", padding_mode="border", align_corners=False)
    return out.view(c, -1).t()


def info_nce(src: Tensor, trg: Tensor, temperature: float = 0.07) -> Tensor:
    """Symmetric InfoNCE between corresponding rows of (N, C) features: cosine similarity / temperature.

    Each source keypoint must pick its own target keypoint among the pair's keypoints, and
    the other way round (the paper's loss, with a fixed temperature).
    """
    if src.shape != trg.shape or src.ndim != 2 or src.shape[0] < 1:
        raise ValueError(
            f"info_nce needs two (N, C) feature sets of one shape, got {tuple(src.shape)} and {tuple(trg.shape)}"
        )
    logits = F.normalize(src, dim=1) @ F.normalize(trg, dim=1).t() / temperature
    labels = torch.arange(src.shape[0], device=src.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels)) / 2


@torch.no_grad()
def match_points(
    src_map: Tensor,
    trg_map: Tensor,
    src_points: Tensor,
    eval_size: int,
    chunk: int = 16384,
    soft_window: int = 0,
    soft_temperature: float = 0.02,
) -> Tensor:
    """Nearest neighbour by cosine similarity on maps upsampled to ``eval_size``².

    ``src_points`` (N, 2) and the result are in the ``eval_size``² frame. The target map is
    upsampled one chunk of pixels at a time (bilinear sampling at pixel centres, equal to
    ``F.interpolate(..., align_corners=False)``), so memory stays at ``chunk`` × C however
    large the map (512² × 3674 channels would be 3.9 GB at once). With ``soft_window`` k > 0
    the match is refined by a soft-argmax over the (2k+1)² pixels around it.
    """
    query = F.normalize(
        sample_features(src_map.float(), rescale_points(src_points, (eval_size,) * 2, src_map.shape[-2:])), dim=1
    )
    target = trg_map.float()
    best = torch.full((query.shape[0],), -float("inf"), device=query.device)
    index = torch.zeros(query.shape[0], dtype=torch.long, device=query.device)
    total = eval_size * eval_size
    for start in range(0, total, chunk):
        pixels = torch.arange(start, min(start + chunk, total), device=query.device)
        coords = torch.stack([pixels % eval_size, pixels // eval_size], dim=1).float()
        feats = F.normalize(sample_features(target, rescale_points(coords, (eval_size,) * 2, target.shape[-2:])), dim=1)
        value, arg = (query @ feats.t()).max(dim=1)
        better = value > best
        best = torch.where(better, value, best)
        index = torch.where(better, pixels[arg], index)
    matched = torch.stack([index % eval_size, index // eval_size], dim=1).float()
    if soft_window <= 0:
        return matched
    offsets = torch.arange(-soft_window, soft_window + 1, device=query.device, dtype=torch.float32)
    window = torch.stack(torch.meshgrid(offsets, offsets, indexing="xy"), dim=-1).view(-1, 2)  # (K, 2) as (dx, dy)
    refined = []
    for q, centre in zip(query, matched):
        coords = (centre + window).clamp(0, eval_size - 1)
        feats = F.normalize(sample_features(target, rescale_points(coords, (eval_size,) * 2, target.shape[-2:])), dim=1)
        weights = torch.softmax(feats @ q / soft_temperature, dim=0)
        refined.append(weights @ coords)
    return torch.stack(refined)


class CorrespondenceHead(nn.Module):
    """Variants → one dense descriptor map: gate (or mean), ungated attention channels, head.

    ``fusion="gate"``: :class:`GatedFusion` on one level without projections or post blocks,
    i.e. the weight assigner gives each variant one weight per image and channel, softmax
    across variants, weighted sum (DESIGN §3). ``fusion="mean"``: a plain mean (an ensemble of
    noise seeds, as DIFT does), nothing to train. Then the attention channels (``up_cross`` of
    their own variant) are concatenated, and ``head="conv"`` applies one 3×3 convolution without
    bias over all channels; it starts as the identity (Dirac), so training starts from the
    zero-shot features. ``head="nn"`` applies nothing.
    """

    def __init__(
        self,
        channels: int,
        num_variants: int,
        attention_channels: int = 0,
        head: Literal["nn", "conv"] = "conv",
        fusion: Literal["gate", "mean"] = "gate",
        num_assigners: int = 1,
        assigner_channels: int = 128,
        dropout: float = 0.5,
        sparsity_weight: float = 0.0,
        diversity_weight: float = 0.0,
    ) -> None:
        super().__init__()
        if head not in ("nn", "conv") or fusion not in ("gate", "mean"):
            raise ValueError(f"head must be 'nn' or 'conv' and fusion 'gate' or 'mean', got {head!r}, {fusion!r}")
        self.num_variants = num_variants
        self.gate = (
            GatedFusion(
                [channels],
                num_variants,
                proj_blocks=0,
                post_blocks=0,
                num_assigners=num_assigners,
                assigner_channels=assigner_channels,
                dropout=dropout,
                sparsity_weight=sparsity_weight,
                diversity_weight=diversity_weight,
            )
            if fusion == "gate"
            else None
        )
        self.out_channels = channels + attention_channels
        self.conv = (
            nn.Conv2d(self.out_channels, self.out_channels, 3, padding=1, bias=False) if head == "conv" else None
        )
        if self.conv is not None:
            nn.init.dirac_(self.conv.weight)

    def forward(self, variants: Sequence[Tensor], attention: Tensor | None = None) -> tuple[Tensor, GateOutput | None]:
        """``variants``: V maps (B, C, H, W); ``attention``: (B, A, H, W) or None → (B, C + A, H, W)."""
        if len(variants) != self.num_variants:
            raise ValueError(f"the head expects {self.num_variants} variants, got {len(variants)}")
        if self.gate is not None:
            gated = self.gate([[v] for v in variants])
            fused = gated.features[0]
        else:
            gated, fused = None, torch.stack(list(variants)).mean(0)
        if attention is not None:
            fused = torch.cat([fused, attention.to(fused.dtype)], dim=1)
        if fused.shape[1] != self.out_channels:
            raise ValueError(f"the head expects {self.out_channels} channels in all, got {fused.shape[1]}")
        return (self.conv(fused) if self.conv is not None else fused), gated
