"""Lightning callbacks: TensorBoard pictures of predictions and gate weights; prediction files."""

from csdiff.callbacks.predictions import SegmentationPredictionWriter
from csdiff.callbacks.tensorboard import GateWeightLogger, SegmentationImageLogger

__all__ = ["GateWeightLogger", "SegmentationImageLogger", "SegmentationPredictionWriter"]
