"""Dataset-level segmentation metrics from one confusion matrix (mIoU, aAcc, mAcc)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor
from torchmetrics import Metric


class SegmentationMetrics(Metric):
    """Accumulates a confusion matrix over a whole split; intersections and unions are summed
    over all images before dividing, as the paper's protocol requires (not averaged per image).

    ``compute()`` returns ``mIoU`` (over classes present in the targets or the predictions),
    ``aAcc`` (pixel accuracy), ``mAcc`` (mean per-class accuracy over classes present in the
    targets) and ``IoU`` (per class, NaN for classes absent from both).
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, num_classes: int, ignore_index: int = 255, **kwargs) -> None:
        super().__init__(**kwargs)
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.add_state("confmat", default=torch.zeros(num_classes, num_classes, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, preds: Tensor, target: Tensor) -> None:
        """preds and target: class indices of the same shape; rows of the matrix are targets."""
        if preds.is_floating_point() or target.is_floating_point():
            raise ValueError("SegmentationMetrics expects integer class indices (argmax the logits first)")
        if preds.shape != target.shape:
            raise ValueError(f"preds {tuple(preds.shape)} and target {tuple(target.shape)} differ in shape")
        n = self.num_classes
        preds, target = preds.reshape(-1).long(), target.reshape(-1).long()
        bad_target = (target != self.ignore_index) & ((target < 0) | (target >= n))
        bad_preds = (preds < 0) | (preds >= n)
        if bool((bad_target.any() | bad_preds.any()).item()):
            if bad_target.any():
                values = target[bad_target].unique()[:10].tolist()
                raise ValueError(
                    f"target has values {values} outside [0, {n}) that are not ignore_index={self.ignore_index}"
                )
            values = preds[bad_preds].unique()[:10].tolist()
            raise ValueError(f"preds has values {values} outside [0, {n})")
        valid = target != self.ignore_index
        counts = torch.bincount(target[valid] * n + preds[valid], minlength=n * n)
        self.confmat += counts.reshape(n, n)

    def compute(self) -> dict[str, Tensor]:
        confmat = self.confmat.double()
        hits = confmat.diagonal()
        per_target = confmat.sum(dim=1)
        union = per_target + confmat.sum(dim=0) - hits
        iou = torch.where(union > 0, hits / union.clamp_min(1), torch.full_like(hits, math.nan))
        seen = per_target > 0
        return {
            "mIoU": iou.nanmean().float(),
            "aAcc": (hits.sum() / confmat.sum()).float(),
            "mAcc": (hits[seen] / per_target[seen]).mean().float(),
            "IoU": iou.float(),
        }


def format_iou_table(iou: Tensor, class_names: Sequence[str], means: Mapping[str, float] | None = None) -> str:
    """Per-class IoU as an aligned text table (percent; "n/a" for classes absent from the split).

    The last rows are ``means`` (label → value), by default one row "mean" over the classes
    that are not n/a; a protocol that averages otherwise passes its own, labelled.
    """
    if len(class_names) != iou.numel():
        raise ValueError(f"{len(class_names)} class names for {iou.numel()} IoU values")
    if means is None:
        finite = iou[~iou.isnan()]
        means = {"mean": finite.mean().item() if finite.numel() else math.nan}
    width = max([len("class"), *(len(name) for name in [*class_names, *means])])
    lines = [f"{'class':<{width}}  {'IoU':>6}", f"{'-' * width}  {'-' * 6}"]
    for name, value in zip(class_names, iou.tolist()):
        lines.append(f"{name:<{width}}  {_percent(value):>6}")
    lines.append(f"{'-' * width}  {'-' * 6}")
    lines += [f"{label:<{width}}  {_percent(value):>6}" for label, value in means.items()]
    return "\n".join(lines)


def _percent(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{100 * value:.2f}"


class ScoredClassIoU(Metric):
    """DDPM-segmentation's label-scarce mIoU: per scored class, intersection and union of the
    predicted and true masks summed over all test images, then averaged over those classes.

    As upstream's ``compute_iou`` (ddpm-segmentation ``src/pixel_classifier.py``), no pixel is
    masked: a pixel labelled with the ignore value (Bedroom-28's background 0, Horse-21's 255)
    still counts against the class it is predicted as; only the classes in ``scored_classes``
    enter the mean.

    ``compute()`` returns ``mIoU``, upstream's number: a scored class absent from both
    predictions and labels has IoU 0 there (I / (U + 1e-8)) and stays in the mean;
    ``mIoU_present``, the mean over the scored classes that are present (absent ones left
    out); ``IoU`` per scored class, NaN where absent; ``absent``, a bool mask of those.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, scored_classes: Sequence[int], **kwargs) -> None:
        super().__init__(**kwargs)
        self.register_buffer("classes", torch.as_tensor(list(scored_classes), dtype=torch.long), persistent=False)
        self.add_state("intersection", default=torch.zeros(len(scored_classes), dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("union", default=torch.zeros(len(scored_classes), dtype=torch.long), dist_reduce_fx="sum")

    def update(self, preds: Tensor, target: Tensor) -> None:
        if preds.shape != target.shape:
            raise ValueError(f"preds {tuple(preds.shape)} and target {tuple(target.shape)} differ in shape")
        p = preds.reshape(1, -1) == self.classes[:, None].to(preds.device)
        t = target.reshape(1, -1) == self.classes[:, None].to(target.device)
        self.intersection += (p & t).sum(1)
        self.union += (p | t).sum(1)

    def compute(self) -> dict[str, Tensor]:
        absent = self.union == 0
        iou = self.intersection.double() / self.union.clamp_min(1)
        return {
            "mIoU": iou.mean().float(),
            "mIoU_present": iou[~absent].mean().float(),
            "IoU": iou.masked_fill(absent, math.nan).float(),
            "absent": absent,
        }
