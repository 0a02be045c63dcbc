"""SegmentationMetrics against an independent numpy computation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from csdiff.metrics import ScoredClassIoU, SegmentationMetrics, format_iou_table


def _numpy_reference(pairs: list[tuple[np.ndarray, np.ndarray]], n: int, ignore: int) -> dict[str, object]:
    conf = np.zeros((n, n), dtype=np.int64)
    for pred, gt in pairs:
        keep = gt != ignore
        conf += np.bincount(n * gt[keep] + pred[keep], minlength=n * n).reshape(n, n)
    inter = np.diag(conf).astype(float)
    union = conf.sum(0) + conf.sum(1) - np.diag(conf)
    iou = np.array([inter[c] / union[c] if union[c] else np.nan for c in range(n)])
    gt_count = conf.sum(1)
    return {
        "IoU": iou,
        "mIoU": np.nanmean(iou),
        "aAcc": inter.sum() / conf.sum(),
        "mAcc": np.mean([inter[c] / gt_count[c] for c in range(n) if gt_count[c]]),
    }


def test_matches_numpy_over_several_updates() -> None:
    rng = np.random.default_rng(0)
    n, ignore = 6, 255
    metric = SegmentationMetrics(num_classes=n, ignore_index=ignore)
    pairs = []
    for _ in range(4):
        gt = rng.integers(0, n - 1, size=(2, 7, 9))  # class 5 never in the targets...
        gt[rng.random(gt.shape) < 0.1] = ignore
        pred = rng.integers(0, n, size=(2, 7, 9))  # ...but predicted sometimes
        pairs.append((pred.reshape(-1), gt.reshape(-1)))
        metric.update(torch.from_numpy(pred), torch.from_numpy(gt))
    result = metric.compute()
    expected = _numpy_reference(pairs, n, ignore)
    np.testing.assert_allclose(result["IoU"].numpy(), expected["IoU"], rtol=1e-6)
    for key in ("mIoU", "aAcc", "mAcc"):
        assert result[key].item() == pytest.approx(expected[key], rel=1e-6), key
    assert result["IoU"][5].item() == 0.0  # predicted-only class counts in mIoU with IoU 0


def test_absent_class_left_out_of_miou() -> None:
    metric = SegmentationMetrics(num_classes=3)
    metric.update(torch.tensor([0, 0, 1, 1]), torch.tensor([0, 1, 1, 1]))
    result = metric.compute()
    assert math.isnan(result["IoU"][2].item())
    # IoU_0 = 1/2, IoU_1 = 2/3; class 2 absent from both is not averaged in as 0.
    assert result["mIoU"].item() == pytest.approx((1 / 2 + 2 / 3) / 2)
    assert result["aAcc"].item() == pytest.approx(3 / 4)
    assert result["mAcc"].item() == pytest.approx((1 + 2 / 3) / 2)


def test_out_of_range_values_raise() -> None:
    metric = SegmentationMetrics(num_classes=3)
    with pytest.raises(ValueError, match="target has values \\[3\\]"):
        metric.update(torch.tensor([0, 1]), torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="preds has values \\[-1\\]"):
        metric.update(torch.tensor([-1, 1]), torch.tensor([0, 255]))
    with pytest.raises(ValueError, match="integer class indices"):
        metric.update(torch.rand(2, 3), torch.tensor([0, 1]))
    metric.update(torch.tensor([2, 1]), torch.tensor([255, 1]))  # ignore_index is fine
    assert metric.confmat.sum().item() == 1


def test_format_iou_table() -> None:
    table = format_iou_table(torch.tensor([0.5, math.nan, 0.25]), ["background", "cat", "dog"])
    lines = table.splitlines()
    assert lines[2].split() == ["background", "50.00"]
    assert lines[3].split() == ["cat", "n/a"]
    assert lines[-1].split() == ["mean", "37.50"]
    with pytest.raises(ValueError):
        format_iou_table(torch.tensor([0.5]), ["a", "b"])


def _compute_iou(
    preds: list[np.ndarray], gts: list[np.ndarray], number_class: int, ignore_label: int
) -> tuple[float, list[float]]:
    """ddpm-segmentation src/pixel_classifier.py ``compute_iou``, re-implemented: per class id in
    range(number_class) except ignore_label, I and U of the masks summed over the images,
    IoU = I / (1e-8 + U) (0 for a class absent from both), then the plain mean."""
    ious = []
    for c in range(number_class):
        if c == ignore_label:
            continue
        inter = sum(int(((p == c) & (g == c)).sum()) for p, g in zip(preds, gts))
        union = sum(int(((p == c) | (g == c)).sum()) for p, g in zip(preds, gts))
        ious.append(inter / (1e-8 + union))
    return float(np.mean(ious)), ious


@pytest.mark.parametrize(("number_class", "ignore_label"), [(21, 255), (29, 0), (28, 255)])
def test_scored_class_iou_equals_upstream_compute_iou(number_class, ignore_label) -> None:
    """Horse-21, Bedroom-28 (DDPM-segmentation's rule) and Bedroom-28 (the paper code's rule),
    with classes absent from labels and predictions: ``mIoU`` is upstream's number,
    ``mIoU_present`` the mean over the present classes."""
    rng = np.random.default_rng(number_class)
    absent = {3, 7}
    preds, gts = [], []
    metric = ScoredClassIoU([c for c in range(number_class) if c != ignore_label])
    for _ in range(3):
        gt = rng.integers(0, number_class, size=(16, 16))
        gt[rng.random(gt.shape) < 0.1] = ignore_label
        pred = rng.integers(0, number_class, size=(16, 16))
        for c in absent:
            gt[gt == c], pred[pred == c] = 1, 2
        preds.append(pred), gts.append(gt)
        metric.update(torch.from_numpy(pred), torch.from_numpy(gt))
    result = metric.compute()
    miou, ious = _compute_iou(preds, gts, number_class, ignore_label)
    assert result["mIoU"].item() == pytest.approx(miou, rel=1e-6)
    scored = [c for c in range(number_class) if c != ignore_label]
    assert result["absent"].tolist() == [c in absent for c in scored]
    present = [iou for c, iou in zip(scored, ious) if c not in absent]
    assert result["mIoU_present"].item() == pytest.approx(np.mean(present), rel=1e-6)
    np.testing.assert_allclose(
        result["IoU"].numpy(), [math.nan if c in absent else v for c, v in zip(scored, ious)], rtol=1e-6
    )


def test_format_iou_table_with_labelled_means() -> None:
    iou = torch.tensor([0.5, math.nan, 0.25])
    table = format_iou_table(iou, ["background", "cat", "dog"], {"mIoU (absent = 0)": 0.25, "mIoU (present)": 0.375})
    lines = table.splitlines()
    assert lines[3].split() == ["cat", "n/a"]
    assert lines[-2].split() == ["mIoU", "(absent", "=", "0)", "25.00"] and lines[-1].split() == [
        "mIoU",
        "(present)",
        "37.50",
    ]
    assert len({len(line) for line in lines}) == 1  # labels widen the name column; values stay aligned
