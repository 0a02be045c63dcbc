"""Evaluation metrics (torchmetrics-based, so DDP reduction comes for free)."""

from csdiff.metrics.pck import DIFFICULTY_LEVELS, PCK, format_pck_table
from csdiff.metrics.segmentation import ScoredClassIoU, SegmentationMetrics, format_iou_table

__all__ = ["DIFFICULTY_LEVELS", "PCK", "ScoredClassIoU", "SegmentationMetrics", "format_iou_table", "format_pck_table"]
