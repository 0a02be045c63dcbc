"""Lightning callbacks: TensorBoard pictures of predictions, matches and gate weights; prediction and LoRA files."""

from csdiff.callbacks.correspondence import BestValidationPCK, CorrespondenceImageLogger, CorrespondencePredictionWriter
from csdiff.callbacks.lora_writer import LoRAFileWriter
from csdiff.callbacks.predictions import SegmentationPredictionWriter
from csdiff.callbacks.tensorboard import GateWeightLogger, SegmentationImageLogger
from csdiff.callbacks.writers import FeatureWriter

__all__ = [
    "BestValidationPCK",
    "CorrespondenceImageLogger",
    "CorrespondencePredictionWriter",
    "FeatureWriter",
    "GateWeightLogger",
    "LoRAFileWriter",
    "SegmentationImageLogger",
    "SegmentationPredictionWriter",
]
