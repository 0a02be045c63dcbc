"""LightningModules composing the frozen backbone with trainable heads."""

from csdiff.tasks.correspondence import CorrespondenceTask
from csdiff.tasks.lora_training import LoRATrainingTask
from csdiff.tasks.scarce import ScarceSegmentationTask
from csdiff.tasks.segmentation import SegmentationTask

__all__ = ["CorrespondenceTask", "LoRATrainingTask", "ScarceSegmentationTask", "SegmentationTask"]
