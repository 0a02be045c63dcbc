"""Feature maps as RGB pictures through one shared PCA basis, and their distance to a reference.

One basis (and one colour range) is fitted over several maps at once, so that the same
feature vector gets the same colour in every map drawn with it: colours then compare across
variants. The research code fitted one basis per map, whose colours cannot be compared.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

# Rows sampled to fit a basis: covariance of a few thousand pixels pins down three axes well,
# and the fit stays fast at SD sizes (thousands of channels, many maps).
MAX_FIT_ROWS = 20000
# Robust colour range per component: outlier pixels would otherwise wash out the picture.
LOW_PERCENTILE, HIGH_PERCENTILE = 0.01, 0.99


def _rows(maps: Sequence[torch.Tensor]) -> torch.Tensor:
    """(C, H, W) maps of one layer → (N, C) float32 pixel rows (fp16 features upcast)."""
    channels = {m.shape[0] for m in maps}
    if len(channels) != 1:
        raise ValueError(f"maps fitted together need one channel count, got {sorted(channels)}")
    return torch.cat([m.detach().float().flatten(1).T for m in maps])


def _subsample(rows: torch.Tensor) -> torch.Tensor:
    return rows[:: max(1, rows.shape[0] // MAX_FIT_ROWS)]


@dataclass(frozen=True)
class PCABasis:
    """Mean, three principal axes and a per-component colour range fitted over a set of maps."""

    mean: torch.Tensor  # (C,)
    axes: torch.Tensor  # (C, 3); zero columns where a map has fewer than 3 channels
    low: torch.Tensor  # (3,)
    high: torch.Tensor  # (3,)

    def project(self, fmap: torch.Tensor) -> torch.Tensor:
        """(C, H, W) → (H, W, 3) component scores."""
        rows = fmap.detach().float().flatten(1).T.to(self.mean.device)
        return ((rows - self.mean) @ self.axes).reshape(*fmap.shape[1:], 3)

    def to_rgb(self, fmap: torch.Tensor, size: tuple[int, int] | None = None) -> np.ndarray:
        """(C, H, W) → uint8 RGB (H, W, 3), enlarged to ``size`` (h, w) by nearest neighbour
        (each feature cell stays one flat block: no detail the features do not have)."""
        scores = self.project(fmap)
        span = (self.high - self.low).clamp_min(1e-12)
        rgb = ((scores - self.low) / span).clamp(0, 1).mul(255).round().to(torch.uint8).cpu().numpy()
        if size is not None and rgb.shape[:2] != tuple(size):
            rows = np.arange(size[0]) * rgb.shape[0] // size[0]
            cols = np.arange(size[1]) * rgb.shape[1] // size[1]
            rgb = rgb[rows][:, cols]
        return np.ascontiguousarray(rgb)


def fit_pca(maps: Sequence[torch.Tensor]) -> PCABasis:
    """One basis for all ``maps`` of a layer (each (C, H, W)): exact eigenvectors of the joint
    pixel covariance (deterministic, unlike a randomised low-rank fit), each axis signed so its
    largest loading is positive, and the 1st–99th percentile of each component as its range."""
    rows = _subsample(_rows(maps))
    mean = rows.mean(0)
    centred = (rows - mean).double()
    _, vectors = torch.linalg.eigh(centred.T @ centred / max(1, centred.shape[0] - 1))
    axes = vectors.flip(1)[:, :3]  # eigh sorts ascending
    signs = torch.sign(axes.gather(0, axes.abs().argmax(0, keepdim=True))).clamp_min(0) * 2 - 1
    axes = (axes * signs).float()
    if axes.shape[1] < 3:
        axes = torch.cat([axes, axes.new_zeros(axes.shape[0], 3 - axes.shape[1])], dim=1)
    scores = (rows - mean) @ axes
    low = torch.quantile(scores, LOW_PERCENTILE, dim=0)
    high = torch.quantile(scores, HIGH_PERCENTILE, dim=0)
    return PCABasis(mean, axes, low, high)


def cosine_distance(fmap: torch.Tensor, reference: torch.Tensor) -> float:
    """Mean over pixels of 1 − cos between the channel vectors of two (C, H, W) maps of a layer:
    0 where a variant's features point the same way as the reference's, up to 2."""
    if fmap.shape != reference.shape:
        raise ValueError(f"maps of shape {tuple(fmap.shape)} and {tuple(reference.shape)} cannot be compared")
    cos = F.cosine_similarity(fmap.detach().float(), reference.detach().float().to(fmap.device), dim=0, eps=1e-12)
    return float((1 - cos).clamp_min(0).mean())
