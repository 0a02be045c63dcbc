"""Segmentation losses: cross-entropy plus the Lovasz-softmax surrogate of the Jaccard index."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def _lovasz_grad(fg_sorted: Tensor) -> Tensor:
    """Gradient of the Lovasz extension of the Jaccard loss, per column of ``fg_sorted`` (N, K).

    Row i holds ``Delta_J(first i+1 errors) - Delta_J(first i errors)``, where ``Delta_J(M) =
    |M| / |fg U M|``: the increase in Jaccard loss when one more pixel, in decreasing order of
    error, is counted as mispredicted.
    """
    total = fg_sorted.sum(dim=0, keepdim=True)
    intersection = total - fg_sorted.cumsum(dim=0)
    union = total + (1.0 - fg_sorted).cumsum(dim=0)
    jaccard = 1.0 - intersection / union
    return torch.cat([jaccard[:1], jaccard[1:] - jaccard[:-1]], dim=0)


def lovasz_softmax(probs: Tensor, labels: Tensor, ignore_index: int = 255, classes: str = "present") -> Tensor:
    """Lovasz-softmax loss (Berman et al., CVPR 2018) over the whole batch, flattened.

    probs: (B, C, H, W) class probabilities; labels: (B, H, W) class indices. ``classes`` is
    "present" (average over classes present in the valid labels) or "all". Pixels labelled
    ``ignore_index`` are left out; with no valid pixel the loss is 0 (still attached to the graph).
    """
    if classes not in ("present", "all"):
        raise ValueError(f"classes must be 'present' or 'all', got {classes!r}")
    num_classes = probs.shape[1]
    flat_probs = probs.permute(0, 2, 3, 1).reshape(-1, num_classes)
    flat_labels = labels.reshape(-1)
    valid = flat_labels != ignore_index
    flat_probs, flat_labels = flat_probs[valid], flat_labels[valid]
    fg = F.one_hot(flat_labels, num_classes).to(flat_probs.dtype)
    if classes == "present":
        keep = fg.sum(dim=0) > 0
        fg, flat_probs = fg[:, keep], flat_probs[:, keep]
    if fg.numel() == 0:
        return probs.sum() * 0.0
    errors = (fg - flat_probs).abs()
    errors_sorted, order = errors.sort(dim=0, descending=True)
    fg_sorted = fg.gather(0, order)
    per_class = (errors_sorted * _lovasz_grad(fg_sorted)).sum(dim=0)
    return per_class.mean()


class SegmentationLoss(nn.Module):
    """``ce_weight * CE + lovasz_weight * Lovasz-softmax``, both ignoring ``ignore_index``.

    Logits coarser than the labels are upsampled bilinearly first, so heads can predict at
    feature resolution while the loss sees every labelled pixel.
    """

    def __init__(self, ce_weight: float = 1.0, lovasz_weight: float = 1.0, ignore_index: int = 255) -> None:
        super().__init__()
        self.ce_weight = ce_weight
        self.lovasz_weight = lovasz_weight
        self.ignore_index = ignore_index

    def forward(self, logits: Tensor, labels: Tensor) -> Tensor:
        if logits.shape[-2:] != labels.shape[-2:]:
            logits = F.interpolate(logits, size=labels.shape[-2:], mode="bilinear", align_corners=False)
        logits = logits.float()
        loss = logits.new_zeros(())
        if self.ce_weight:
            # Sum / count rather than reduction="mean", which is NaN when every pixel is ignored.
            num_valid = (labels != self.ignore_index).sum().clamp_min(1)
            ce = F.cross_entropy(logits, labels, ignore_index=self.ignore_index, reduction="sum")
            loss = loss + self.ce_weight * ce / num_valid
        if self.lovasz_weight:
            loss = loss + self.lovasz_weight * lovasz_softmax(logits.softmax(dim=1), labels, self.ignore_index)
        return loss
