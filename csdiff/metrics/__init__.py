"""Evaluation metrics (torchmetrics-based, so DDP reduction comes for free)."""

from csdiff.metrics.segmentation import SegmentationMetrics, format_iou_table

__all__ = ["SegmentationMetrics", "format_iou_table"]
