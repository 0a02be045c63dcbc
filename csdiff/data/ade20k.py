"""ADE20K (SceneParsing, ADEChallengeData2016): 150 classes, annotation 0 ignored.

The same datamodule reads any dataset in the ADE20K layout with another class list
(``class_names``/``palette``), which is how the quickstart's synthetic set is read.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from csdiff.data.ade20k_meta import ADE20K_CLASSES, ADE20K_PALETTE
from csdiff.data.reading import IMAGE_EXTENSIONS, DataError, list_images
from csdiff.data.segmentation import Sample, SegmentationDataModule, apply_lut
from csdiff.data.transforms import EvalResize

SPLIT_DIRS = {"train": "training", "val": "validation"}

# reduce_zero_label: 0 ("other") → 255, k → k-1, 255 stays 255.
_REDUCE_ZERO_LUT = np.arange(-1, 255, dtype=np.int16)
_REDUCE_ZERO_LUT[0] = 255
_REDUCE_ZERO_LUT[255] = 255


def reduce_zero_label(raw: np.ndarray, path: str = "<array>") -> np.ndarray:
    """ADE20K annotation values → train ids (int16; the dataset checks the range)."""
    return apply_lut(raw, _REDUCE_ZERO_LUT, path)


def _default_palette(n: int) -> list[tuple[int, int, int]]:
    if n <= len(ADE20K_PALETTE):
        return list(ADE20K_PALETTE[:n])
    colours = np.random.default_rng(0).integers(0, 256, size=(n, 3))
    return [tuple(int(c) for c in row) for row in colours]


class ADE20KDataModule(SegmentationDataModule):
    """``root`` is the ``ADEChallengeData2016`` folder: images/{training,validation}/*.jpg and
    annotations/{training,validation}/*.png (same stem). Images in any format OpenCV reads
    (``IMAGE_EXTENSIONS``) are taken. ``test`` scores the validation split."""

    def __init__(
        self,
        root: str = "data/ade/ADEChallengeData2016",
        crop_size: int = 512,
        scale: tuple[int, int] = (2048, 512),
        eval_resize: EvalResize = ("short", 512),
        class_names: list[str] | None = None,
        palette: list[tuple[int, int, int]] | None = None,
        **kwargs: Any,
    ) -> None:
        """ADE20K defaults; other options (batch sizes, workers, augmentation) as in
        :class:`SegmentationDataModule`. ``class_names``/``palette`` read other ADE-layout sets."""
        super().__init__(root=root, crop_size=crop_size, scale=scale, eval_resize=eval_resize, **kwargs)
        names = list(class_names) if class_names is not None else list(ADE20K_CLASSES)
        colours = [tuple(c) for c in palette] if palette is not None else _default_palette(len(names))
        if len(colours) != len(names):
            raise ValueError(f"palette has {len(colours)} colours for {len(names)} class names")
        self._class_names = names
        self._palette = colours

    @property
    def class_names(self) -> list[str]:
        return self._class_names

    @property
    def palette(self) -> list[tuple[int, int, int]]:
        return self._palette

    @property
    def layout_hint(self) -> str:
        return (
            f"images/{{training,validation}}/*.jpg (or {', '.join(IMAGE_EXTENSIONS[1:])}) and "
            "annotations/{training,validation}/*.png (the ADEChallengeData2016 folder is the root, not its parent)"
        )

    def find_samples(self, split: str) -> list[Sample]:
        root = Path(self.root)
        image_dir = self.check_folder(root / "images" / SPLIT_DIRS[split])
        label_dir = self.check_folder(root / "annotations" / SPLIT_DIRS[split])
        samples: dict[str, Sample] = {}
        for image in map(Path, list_images(image_dir, recursive=False)):
            label = label_dir / f"{image.stem}.png"
            if not label.is_file():
                raise DataError(f"label file {label} for image {image} not found")
            if image.stem in samples:
                raise DataError(
                    f"images {samples[image.stem][0]} and {image} share the label file {label}; keep one of them"
                )
            samples[image.stem] = (str(image), str(label))
        return list(samples.values())

    def orphan_labels(self, split: str) -> list[tuple[str, str]]:
        root = Path(self.root)
        image_dir = self.check_folder(root / "images" / SPLIT_DIRS[split])
        label_dir = self.check_folder(root / "annotations" / SPLIT_DIRS[split])
        stems = {Path(image).stem for image in list_images(image_dir, recursive=False)}
        return [
            (str(label), f"{image_dir / label.stem}.jpg (or {', '.join(IMAGE_EXTENSIONS[1:])})")
            for label in sorted(label_dir.glob("*.png"))
            if label.stem not in stems
        ]

    def label_fn(self, raw: np.ndarray, path: str) -> np.ndarray:
        return reduce_zero_label(raw, path)
