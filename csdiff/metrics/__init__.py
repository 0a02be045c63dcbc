"""Evaluation metrics (torchmetrics-based, so DDP reduction comes for free)."""

from csdiff.metrics.pck import PCK, format_pck_table
from csdiff.metrics.segmentation import ScoredClassIoU, SegmentationMetrics, format_iou_table

__all__ = ["PCK", "ScoredClassIoU", "SegmentationMetrics", "format_iou_table", "format_pck_table"]
