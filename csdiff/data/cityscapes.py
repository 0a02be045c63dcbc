"""Cityscapes (gtFine): 19 train classes, 255 ignored, from the official label table.

Labels are read from ``*_gtFine_labelTrainIds.png`` where it exists (cityscapesscripts'
createTrainIdLabelImgs writes it); otherwise ``*_gtFine_labelIds.png`` is converted in
memory with the same official table, so no preprocessing step is required.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from cityscapesscripts.helpers.labels import labels as _LABELS

from csdiff.data.reading import DataError
from csdiff.data.segmentation import Sample, SegmentationDataModule, apply_lut
from csdiff.data.transforms import EvalResize

_TRAIN_LABELS = sorted((label for label in _LABELS if 0 <= label.trainId < 255), key=lambda label: label.trainId)
CITYSCAPES_CLASSES: tuple[str, ...] = tuple(label.name for label in _TRAIN_LABELS)
CITYSCAPES_PALETTE: tuple[tuple[int, int, int], ...] = tuple(tuple(label.color) for label in _TRAIN_LABELS)


def _id_to_train_id() -> np.ndarray:
    # Ids the table marks as not trained (trainId 255 or -1) → 255; ids it lacks → -1 (invalid).
    table = np.full(256, -1, dtype=np.int16)
    for label in _LABELS:
        if 0 <= label.id < 256:
            table[label.id] = label.trainId if 0 <= label.trainId < 255 else 255
    return table


def _train_id_to_id() -> np.ndarray:
    # Anything that is not a train id (255 included) → 0, "unlabeled".
    table = np.zeros(256, dtype=np.uint8)
    for label in _TRAIN_LABELS:
        table[label.trainId] = label.id
    return table


ID_TO_TRAIN_ID = _id_to_train_id()
TRAIN_ID_TO_ID = _train_id_to_id()

LABEL_IDS_SUFFIX = "_gtFine_labelIds.png"
TRAIN_IDS_SUFFIX = "_gtFine_labelTrainIds.png"
IMAGE_SUFFIX = "_leftImg8bit.png"


def label_ids_to_train_ids(raw: np.ndarray, path: str = "<array>") -> np.ndarray:
    """Official label ids (labelIds.png) → train ids (int16; unknown ids become -1)."""
    return apply_lut(raw, ID_TO_TRAIN_ID, path)


def train_ids_to_label_ids(arr: np.ndarray) -> np.ndarray:
    """Train ids 0..18 → official label ids (uint8), the format the benchmark server scores."""
    arr = np.asarray(arr)
    if arr.size and (arr.min() < 0 or arr.max() > 255):
        raise ValueError(f"train ids must lie in [0, 255], got values in [{arr.min()}, {arr.max()}]")
    return TRAIN_ID_TO_ID[arr.astype(np.intp)]


class CityscapesDataModule(SegmentationDataModule):
    """``root`` holds leftImg8bit/{train,val}/<city>/*_leftImg8bit.png and
    gtFine/{train,val}/<city>/*_gtFine_labelTrainIds.png (or *_gtFine_labelIds.png).
    Evaluation keeps the 2048x1024 images; ``test`` scores the val split."""

    def __init__(
        self,
        root: str = "data/cityscapes",
        crop_size: int = 1024,
        scale: tuple[int, int] = (2048, 1024),
        eval_resize: EvalResize = None,
        **kwargs: Any,
    ) -> None:
        """Cityscapes defaults; other options as in :class:`SegmentationDataModule`."""
        super().__init__(root=root, crop_size=crop_size, scale=scale, eval_resize=eval_resize, **kwargs)

    @property
    def class_names(self) -> list[str]:
        return list(CITYSCAPES_CLASSES)

    @property
    def palette(self) -> list[tuple[int, int, int]]:
        return list(CITYSCAPES_PALETTE)

    @property
    def layout_hint(self) -> str:
        return (
            "leftImg8bit/{train,val}/<city>/*_leftImg8bit.png and "
            "gtFine/{train,val}/<city>/*_gtFine_labelTrainIds.png (or *_gtFine_labelIds.png)"
        )

    def find_samples(self, split: str) -> list[Sample]:
        image_dir = self.check_folder(Path(self.root) / "leftImg8bit" / split)
        label_dir = self.check_folder(Path(self.root) / "gtFine" / split)
        samples = []
        for image in sorted(image_dir.glob(f"*/*{IMAGE_SUFFIX}")):
            stem = label_dir / image.parent.name / image.name[: -len(IMAGE_SUFFIX)]
            train_ids, label_ids = Path(f"{stem}{TRAIN_IDS_SUFFIX}"), Path(f"{stem}{LABEL_IDS_SUFFIX}")
            if train_ids.is_file():
                samples.append((str(image), str(train_ids)))
            elif label_ids.is_file():
                samples.append((str(image), str(label_ids)))
            else:
                raise DataError(f"no label for image {image}: expected {train_ids} or {label_ids}")
        return samples

    def orphan_labels(self, split: str) -> list[tuple[str, str]]:
        image_dir = self.check_folder(Path(self.root) / "leftImg8bit" / split)
        label_dir = self.check_folder(Path(self.root) / "gtFine" / split)
        orphans = []
        for suffix in (TRAIN_IDS_SUFFIX, LABEL_IDS_SUFFIX):
            for label in label_dir.glob(f"*/*{suffix}"):
                image = image_dir / label.parent.name / f"{label.name[: -len(suffix)]}{IMAGE_SUFFIX}"
                if not image.is_file():
                    orphans.append((str(label), str(image)))
        return sorted(orphans)

    def label_fn(self, raw: np.ndarray, path: str) -> np.ndarray:
        return label_ids_to_train_ids(raw, path) if path.endswith(LABEL_IDS_SUFFIX) else raw
