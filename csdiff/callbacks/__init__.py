"""Lightning callbacks: TensorBoard pictures of predictions, matches and gate weights; prediction files."""

from csdiff.callbacks.correspondence import CorrespondenceImageLogger, CorrespondencePredictionWriter
from csdiff.callbacks.predictions import SegmentationPredictionWriter
from csdiff.callbacks.tensorboard import GateWeightLogger, SegmentationImageLogger

__all__ = [
    "CorrespondenceImageLogger",
    "CorrespondencePredictionWriter",
    "GateWeightLogger",
    "SegmentationImageLogger",
    "SegmentationPredictionWriter",
]
