"""Shared machinery for semantic-segmentation datasets: label checks, batching, loaders.

Per-dataset modules only say where the files are and how raw label values map to train
ids; everything that must behave the same for every segmentation dataset (label checks,
the reproducible augmentation randomness, the eval/predict conventions) lives here. What
every datamodule shares (file reading, errors, samplers) lives in ``reading`` and ``samplers``.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from csdiff.data.base import ShardedDataModule
from csdiff.data.checks import check_items, orphan_error
from csdiff.data.reading import IMAGE_EXTENSIONS, DataError, image_size, list_images, read_image, read_label
from csdiff.data.samplers import EpochSampler, fit_epoch, trained_in_epoch
from csdiff.data.transforms import IGNORE_INDEX, EvalResize, EvalTransform, SampleTransform, TrainTransform

# A (image path, label path or None) pair; None means unlabelled.
Sample = tuple[str, str | None]
# Maps a decoded label file to train ids; gets the path because one dataset may mix encodings.
LabelFn = Callable[[np.ndarray, str], np.ndarray]


def check_label(label: np.ndarray, raw: np.ndarray, path: str, num_classes: int, ignore_index: int) -> None:
    """Raise if a train-id map holds anything but 0..num_classes-1 and the ignore index.

    Catches a wrong dataset layout or label encoding at the file, instead of as a CUDA
    assert (or a silently wrong metric) thousands of steps later.
    """
    bad = ((label < 0) | (label >= num_classes)) & (label != ignore_index)
    if bad.any():
        raw_values = np.unique(raw[bad])[:10].tolist()
        mapped = np.unique(label[bad])[:10].tolist()
        raise DataError(
            f"label file {path} holds values {raw_values} (train ids {mapped}); expected train ids in "
            f"[0, {num_classes}) or {ignore_index} (ignore). Check the label encoding and the dataset's class list."
        )


def check_same_size(image_hw: tuple[int, int], label_hw: tuple[int, int], image_path: str, label_path: str) -> None:
    """Raise unless image and label have the same (H, W): labels are per pixel, so a label of
    another size would silently mislabel every pixel after resizing."""
    if tuple(label_hw) != tuple(image_hw):
        raise DataError(
            f"size mismatch: image {image_path} is {image_hw[1]}x{image_hw[0]} (WxH) but label "
            f"{label_path} is {label_hw[1]}x{label_hw[0]}; they must be pixel-aligned"
        )


def apply_lut(raw: np.ndarray, lut: np.ndarray, path: str) -> np.ndarray:
    """Map 8-bit label values through a 256-entry table (entries < 0 mark invalid values)."""
    if raw.dtype != np.uint8:
        raise DataError(f"label file {path} is {raw.dtype}; expected an 8-bit single-channel PNG")
    return cv2.LUT(raw, lut)  # = lut[raw], 4x faster (every label is mapped in setup's check, then per load)


class SegmentationDataset(Dataset):
    """(image, label) files → dict(image, label, path, orig_size), see ``__getitem__``.

    Augmentation randomness is ``np.random.default_rng([seed, epoch, index])``: a sample
    depends only on those three numbers, not on workers, batch composition or resumption.
    """

    def __init__(
        self,
        samples: Sequence[Sample],
        num_classes: int,
        transform: SampleTransform,
        label_fn: LabelFn | None = None,
        seed: int = 0,
        ignore_index: int = IGNORE_INDEX,
    ) -> None:
        if not 0 < num_classes <= ignore_index:
            raise ValueError(f"num_classes must be in [1, {ignore_index}], got {num_classes}")
        self.samples = list(samples)
        self.num_classes = num_classes
        self.transform = transform
        self.label_fn = label_fn
        self.seed = seed
        self.ignore_index = ignore_index
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the augmentation stream of this epoch."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def paths(self) -> list[str]:
        """The image files, in index order."""
        return [image for image, _ in self.samples]

    def load_label(self, label_path: str) -> np.ndarray:
        """The label file as train ids, checked against the class range (not yet uint8)."""
        raw = read_label(label_path)
        label = raw if self.label_fn is None else self.label_fn(raw, label_path)
        check_label(label, raw, label_path, self.num_classes, self.ignore_index)
        return label

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray | None]:
        """Decoded RGB image and checked uint8 train-id label (None when unlabelled)."""
        image_path, label_path = self.samples[index]
        img = read_image(image_path)
        if label_path is None:
            return img, None
        label = self.load_label(label_path)
        check_same_size(img.shape[:2], label.shape, image_path, label_path)
        return img, label.astype(np.uint8)

    def check(self, index: int) -> None:
        """What :meth:`load` checks, in the same order and with the same messages, without
        decoding the image: its size comes from its header (see ``reading.image_size``)."""
        image_path, label_path = self.samples[index]
        size = image_size(image_path)
        if label_path is not None:
            check_same_size(size, self.load_label(label_path).shape, image_path, label_path)

    def check_names(self) -> list[str]:
        """The file each item is named by in the check's message: its label, else its image."""
        return [label or image for image, label in self.samples]

    def __getitem__(self, index: int) -> dict[str, Any]:
        """image: float (3, H, W) in [-1, 1]; label: long (H, W), absent when unlabelled;
        path: the image file; orig_size: (H, W) of the image file."""
        img, label = self.load(index)
        rng = np.random.default_rng([self.seed, self.epoch, index])
        image_t, label_t = self.transform(img, label, rng)
        item: dict[str, Any] = {"image": image_t, "path": self.samples[index][0], "orig_size": img.shape[:2]}
        if label_t is not None:
            item["label"] = label_t
        return item


class ImageFolderDataset(Dataset):
    """Every image under a folder (or one image file), unlabelled, for ``predict`` on any pictures."""

    def __init__(self, root: str | Path, transform: EvalTransform | None = None) -> None:
        root = Path(root)
        if root.is_file() and root.suffix.lower() in IMAGE_EXTENSIONS:
            self.paths = [str(root)]
            self.root = root.parent
        elif root.is_dir():
            self.paths = list_images(root)
            self.root = root
        else:
            raise DataError(f"{root} is neither a folder nor an image file ({', '.join(IMAGE_EXTENSIONS)})")
        if not self.paths:
            raise DataError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found under {root}")
        self.transform = transform or EvalTransform()

    @classmethod
    def from_paths(cls, paths: list[str], transform: EvalTransform | None = None) -> ImageFolderDataset:
        """The given image files (e.g. a datamodule's split), rooted at their common folder."""
        if not paths:
            raise DataError("no images to read")
        dataset = cls.__new__(cls)
        dataset.paths = [str(p) for p in paths]
        dataset.root = Path(os.path.commonpath([str(Path(p).parent) for p in dataset.paths]))
        dataset.transform = transform or EvalTransform()
        return dataset

    def __len__(self) -> int:
        return len(self.paths)

    def check(self, index: int) -> None:
        """The up-front check of one image: whole and sizeable (see ``reading.image_size``)."""
        image_size(self.paths[index])

    def check_names(self) -> list[str]:
        return list(self.paths)

    def __getitem__(self, index: int) -> dict[str, Any]:
        """image, path and orig_size as in ``SegmentationDataset``; no label."""
        img = read_image(self.paths[index], exif_orientation=True)
        image_t, _ = self.transform(img, None)
        return {"image": image_t, "path": self.paths[index], "orig_size": img.shape[:2]}


def collate_segmentation(batch: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack tensors of equal shape; anything else (eval images of different sizes, paths,
    sizes) becomes a list in batch order."""
    out: dict[str, Any] = {}
    for key in batch[0]:
        values = [item[key] for item in batch]
        if isinstance(values[0], torch.Tensor) and all(v.shape == values[0].shape for v in values):
            out[key] = torch.stack(values)
        else:
            out[key] = values
    return out


class SegmentationDataModule(ShardedDataModule, ABC):
    """Base datamodule: subclasses list the files of a split and map raw labels to train ids.

    Splits are "train" and "val"; ``test`` scores ``test_split`` (the val split for datasets
    without public test labels); ``predict`` runs on ``predict_root`` when given, otherwise
    on the val images. ``limit`` keeps the first N files of each split (smoke runs).

    ``check`` (default on) checks the data of the stage in ``setup``, before the first step:
    ``fit`` its train and val splits, ``validate`` val, ``test`` the test split, ``predict``
    its images. Label files without an image are reported; every label is decoded, mapped
    and range-checked exactly as loading does (~2 ms a PNG); an image is read whole and
    checked for truncation, and its size (compared with its label's) is taken from its
    header instead of decoding it (a JPEG decode costs ~10 ms: 20k of them, minutes). A file
    damaged inside its data but with a whole header and end marker is found when loaded, as
    before. The check runs in ``num_workers`` threads (all CPUs when 0), with a progress bar
    on a terminal; ``check: false`` skips it (files are still checked as they are loaded).
    """

    ignore_index: int = IGNORE_INDEX
    test_split: str = "val"
    collate = staticmethod(collate_segmentation)

    def __init__(
        self,
        root: str,
        batch_size: int = 2,
        eval_batch_size: int = 1,
        num_workers: int = 0,
        crop_size: int = 512,
        scale: tuple[int, int] = (2048, 512),
        ratio_range: tuple[float, float] = (0.5, 2.0),
        cat_max_ratio: float = 0.75,
        flip_prob: float = 0.5,
        photometric: bool = True,
        eval_resize: EvalResize = None,
        seed: int = 0,
        predict_root: str | None = None,
        limit: int | None = None,
        check: bool = True,
    ) -> None:
        super().__init__(batch_size, eval_batch_size, num_workers)
        self.root = root
        self.check = check
        self.train_transform = TrainTransform(crop_size, scale, ratio_range, cat_max_ratio, flip_prob, photometric)
        self.eval_transform = EvalTransform(eval_resize)
        self.seed = seed
        self.predict_root = predict_root
        self.limit = limit
        self.epoch = 0
        self._train_sampler: EpochSampler | None = None

    # -- what a dataset supplies ------------------------------------------------------------
    @property
    @abstractmethod
    def class_names(self) -> list[str]:
        """Names of the train ids 0..num_classes-1."""

    @property
    @abstractmethod
    def palette(self) -> list[tuple[int, int, int]]:
        """RGB colour per train id, for pictures."""

    @property
    @abstractmethod
    def layout_hint(self) -> str:
        """The expected folder layout under ``root``, quoted in error messages."""

    @abstractmethod
    def find_samples(self, split: str) -> list[Sample]:
        """(image, label) paths of a split ("train" or "val"), in a stable order."""

    def label_fn(self, raw: np.ndarray, path: str) -> np.ndarray:
        """Raw label file values → train ids (identity unless the dataset encodes otherwise)."""
        return raw

    def orphan_labels(self, split: str) -> list[tuple[str, str]]:
        """(label file, the image it lacks) for each label file of ``split`` without its image,
        sorted; a dataset whose layout pairs files by name lists them (none by default)."""
        return []

    # -- shared behaviour -------------------------------------------------------------------
    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def check_folder(self, folder: Path) -> Path:
        """Return ``folder`` or raise a DataError that names it and the expected layout."""
        if not Path(self.root).is_dir():
            raise DataError(
                f"dataset root {self.root} does not exist; set `root` to the folder that holds {self.layout_hint}"
            )
        if not folder.is_dir():
            raise DataError(f"split folder {folder} does not exist; expected {self.layout_hint} under {self.root}")
        return folder

    def split_samples(self, split: str) -> list[Sample]:
        """``find_samples`` with the empty-split check and ``limit`` applied."""
        samples = self.find_samples(split)
        if not samples:
            raise DataError(f"no {split} images found under {self.root}; expected {self.layout_hint}")
        return samples[: self.limit] if self.limit is not None else samples

    def _dataset(self, samples: list[Sample], train: bool) -> SegmentationDataset:
        return SegmentationDataset(
            samples,
            self.num_classes,
            self.train_transform if train else self.eval_transform,
            label_fn=self.label_fn,
            seed=self.seed,
            ignore_index=self.ignore_index,
        )

    def setup(self, stage: str | None = None) -> None:
        """Prepare the splits of ``stage`` and, with ``check``, check their files (see the class)."""
        self._prepare(stage)
        if self.check:
            self.check_data(stage)

    def _prepare(self, stage: str | None) -> None:
        if stage in ("fit", None):
            self.datasets["train"] = self._dataset(self.split_samples("train"), train=True)
            self.datasets["train"].set_epoch(self.epoch)
        if stage in ("fit", "validate", None):
            self.datasets["val"] = self._dataset(self.split_samples("val"), train=False)
        if stage in ("test", None):
            self.datasets["test"] = self._dataset(self.split_samples(self.test_split), train=False)
        if stage in ("predict", None):
            if self.predict_root is not None:
                self.datasets["predict"] = ImageFolderDataset(self.predict_root, self.eval_transform)
            else:
                unlabelled = [(image, None) for image, _ in self.split_samples("val")]
                self.datasets["predict"] = self._dataset(unlabelled, train=False)

    def check_data(self, stage: str | None) -> None:
        """The up-front check of the splits ``stage`` uses (prepared by ``setup``): label files
        without images first (a listing), then every item, the smallest split first, so that
        a bad file there is reported soonest."""
        used = {"fit": ["train", "val"], "validate": ["val"], "test": ["test"], "predict": ["predict"]}
        splits = used.get(stage, list(self.datasets)) if stage is not None else list(self.datasets)
        folders = {"train": "train", "val": "val", "test": self.test_split}  # predict reads no labels
        orphans = sorted({o for split in splits if split in folders for o in self.orphan_labels(folders[split])})
        if orphans:
            raise orphan_error(orphans)
        for split in sorted(splits, key=lambda s: len(self.datasets[s])):
            dataset = self.datasets[split]
            labelled = isinstance(dataset, SegmentationDataset) and any(label for _, label in dataset.samples)
            what = f"{split} {'samples' if labelled else 'images'}"
            check_items(range(len(dataset)), dataset.check, dataset.check_names(), what, self.num_workers)

    def set_epoch(self, epoch: int) -> None:
        """Select the shuffle order and augmentations of ``epoch`` (call at each epoch start)."""
        self.epoch = epoch
        if "train" in self.datasets:
            self.datasets["train"].set_epoch(epoch)
        if self._train_sampler is not None:
            self._train_sampler.set_epoch(epoch)

    def _done_in_epoch(self, epoch: int) -> int:
        return trained_in_epoch(self.trainer, self.batch_size, epoch, len(self._train_sampler))

    def train_dataloader(self) -> DataLoader:
        dataset = self._get("train")
        # The fit's (restored) epoch before the first iterator forks any worker; the sampler
        # asks what is done when iterating, and Lightning sets the epoch before each later one.
        if (epoch := fit_epoch(self.trainer)) is not None:
            self.set_epoch(epoch)
        self._train_sampler = EpochSampler(dataset, self.seed, done_in_epoch=self._done_in_epoch)
        self._train_sampler.set_epoch(self.epoch)
        return self._loader(dataset, self.batch_size, self._train_sampler)

    def predict_dataloader(self) -> DataLoader:
        return self._eval_loader("predict")
