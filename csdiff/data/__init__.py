"""Datasets and LightningDataModules for segmentation; transforms; the synthetic shapes.

Names are imported lazily, so ``csdiff.data.synthetic`` (used by the tiny backbone's
training) can be imported without pulling in Lightning.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "DataError": "csdiff.data.reading",
    "SegmentationDataset": "csdiff.data.segmentation",
    "ImageFolderDataset": "csdiff.data.segmentation",
    "SegmentationDataModule": "csdiff.data.segmentation",
    "collate_segmentation": "csdiff.data.segmentation",
    "TrainTransform": "csdiff.data.transforms",
    "EvalTransform": "csdiff.data.transforms",
    "ADE20KDataModule": "csdiff.data.ade20k",
    "CityscapesDataModule": "csdiff.data.cityscapes",
    "QuickstartDataModule": "csdiff.data.quickstart",
    "LoRAImagesDataModule": "csdiff.data.lora_images",
    "SPairDataModule": "csdiff.data.spair",
    "DDPMSegDataModule": "csdiff.data.scarce",
    "SPairDataset": "csdiff.data.spair",
    "collate_pairs": "csdiff.data.spair",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'csdiff.data' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
