"""Shared machinery for semantic-segmentation datasets: reading, label checks, batching, loaders.

Per-dataset modules only say where the files are and how raw label values map to train
ids; everything that must behave the same for every dataset (error messages, the
reproducible augmentation randomness, the eval/predict conventions) lives here.
"""

from __future__ import annotations

import os
import signal
from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
import torch.distributed as dist
from lightning.pytorch import LightningDataModule
from lightning.pytorch.trainer.states import TrainerFn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from csdiff.data.transforms import IGNORE_INDEX, EvalResize, EvalTransform, SampleTransform, TrainTransform

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
# A (image path, label path or None) pair; None means unlabelled.
Sample = tuple[str, str | None]
# Maps a decoded label file to train ids; gets the path because one dataset may mix encodings.
LabelFn = Callable[[np.ndarray, str], np.ndarray]
# Keeps the shuffle stream apart from the per-sample streams, which share (seed, epoch).
_SHUFFLE_STREAM = 1


class DataError(ValueError):
    """A dataset file or folder is missing, unreadable or inconsistent; the message names it."""


def read_image(path: str, exif_orientation: bool = False) -> np.ndarray:
    """Decode an image file as (H, W, 3) uint8 RGB (grey images are expanded).

    EXIF rotation is ignored by default: labels are drawn on the stored pixels, so a
    rotated image would no longer line up with its label. Unlabelled photos may honour it.
    """
    if not Path(path).is_file():
        raise DataError(f"image file not found: {path}")
    flags = cv2.IMREAD_COLOR if exif_orientation else cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION
    img = cv2.imread(path, flags)
    if img is None:
        raise DataError(f"cannot decode image file {path} (corrupt or not an image); replace or remove it")
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


def read_label(path: str) -> np.ndarray:
    """Decode a label file as a single-channel integer array, values as stored."""
    if not Path(path).is_file():
        raise DataError(f"label file not found: {path}")
    label = cv2.imread(path, cv2.IMREAD_UNCHANGED)
    if label is None:
        raise DataError(f"cannot decode label file {path} (corrupt or not an image); replace or remove it")
    if label.ndim != 2:
        raise DataError(f"label file {path} has shape {label.shape}; expected a single-channel (H, W) index map")
    return label


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


def apply_lut(raw: np.ndarray, lut: np.ndarray, path: str) -> np.ndarray:
    """Map 8-bit label values through a 256-entry table (entries < 0 mark invalid values)."""
    if raw.dtype != np.uint8:
        raise DataError(f"label file {path} is {raw.dtype}; expected an 8-bit single-channel PNG")
    return lut[raw]


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

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray | None]:
        """Decoded RGB image and checked uint8 train-id label (None when unlabelled)."""
        image_path, label_path = self.samples[index]
        img = read_image(image_path)
        if label_path is None:
            return img, None
        raw = read_label(label_path)
        label = raw if self.label_fn is None else self.label_fn(raw, label_path)
        check_label(label, raw, label_path, self.num_classes, self.ignore_index)
        if label.shape != img.shape[:2]:
            raise DataError(
                f"size mismatch: image {image_path} is {img.shape[1]}x{img.shape[0]} (WxH) but label "
                f"{label_path} is {label.shape[1]}x{label.shape[0]}; they must be pixel-aligned"
            )
        return img, label.astype(np.uint8)

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


def list_images(root: str | Path, recursive: bool = True) -> list[str]:
    """Image files under ``root`` (in subfolders too unless ``recursive`` is false), sorted,
    by extension (case-insensitive)."""
    found = Path(root).rglob("*") if recursive else Path(root).iterdir()
    return sorted(str(p) for p in found if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())


def output_names(paths: Sequence[str], root: str | Path | None = None) -> list[str]:
    """One distinct output name per image, for files written per input (features, predictions).

    The name is the path relative to ``root`` (default: the images' common folder) without
    its suffix, so ``sub/d.jpg`` and ``d.jpg`` stay apart; images that differ only by suffix
    (``a.jpg``, ``a.png``) keep it (``a.jpg``, ``a.png``). Two images that would still share
    a name raise a DataError naming both, instead of one silently overwriting the other.
    """
    if not paths:
        return []
    base = Path(root) if root is not None else Path(os.path.commonpath([str(Path(p).parent) for p in paths]))
    relative = [Path(p).relative_to(base) for p in paths]
    stems = [str(r.with_suffix("")) for r in relative]
    counts = Counter(stems)
    names = [str(r) if counts[stem] > 1 else stem for r, stem in zip(relative, stems)]
    owner: dict[str, str] = {}
    for path, name in zip(paths, names):
        if name in owner:
            raise DataError(f"images {owner[name]} and {path} would both be written as {name!r}; rename one of them")
        owner[name] = path
    return names


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

    def __len__(self) -> int:
        return len(self.paths)

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


def _ignore_sigint(worker_id: int) -> None:
    """DataLoader workers leave Ctrl-C to the main process, which stops a fit at the end of
    a step; a worker killed by it would fail that step instead."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def process_group() -> tuple[int, int]:
    """(world size, rank) of the initialised default process group; (1, 0) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


class EpochSampler(DistributedSampler):
    """Shuffle order as a pure function of (seed, epoch), so a resumed run replays it.

    ``set_epoch`` (which Lightning calls on samplers by itself) also tells the dataset,
    whose augmentations are keyed on the epoch.

    Under DDP (``num_replicas`` > 1; by default the world size of the initialised process
    group) rank r takes positions r, r+W, r+2W, ... of the one (seed, epoch) permutation, so
    the shards are disjoint. The permutation is padded with its own head to a multiple of W,
    as ``DistributedSampler`` does, because every rank must run the same number of steps.
    In one process the order is the permutation itself. Being a ``DistributedSampler``,
    Lightning uses it as is instead of wrapping it in its own (reshuffling) sampler.

    ``done_in_epoch(epoch)`` says how many of this rank's positions in ``epoch`` were trained
    on already; they are left out. A fit resumed from a mid-epoch checkpoint (every-N-steps
    saves, Ctrl-C) so continues the epoch where it stopped: Lightning counts the batches on
    but starts a fresh iterator. The length stays the whole epoch's, as Lightning expects.
    """

    def __init__(
        self,
        dataset: SegmentationDataset,
        seed: int,
        num_replicas: int | None = None,
        rank: int | None = None,
        done_in_epoch: Callable[[int], int] | None = None,
    ) -> None:
        world, own_rank = process_group()
        super().__init__(
            dataset,
            num_replicas=world if num_replicas is None else num_replicas,
            rank=own_rank if rank is None else rank,
            shuffle=True,
            seed=seed,
            drop_last=False,
        )
        self.done_in_epoch = done_in_epoch

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.dataset.set_epoch(epoch)

    def __len__(self) -> int:
        return self.num_samples

    def __iter__(self):
        seq = np.random.SeedSequence([self.seed, self.epoch], spawn_key=(_SHUFFLE_STREAM,))
        order = np.random.default_rng(seq).permutation(len(self.dataset)).tolist()
        if self.num_replicas > 1:
            pad = self.total_size - len(order)
            if pad > 0 and order:
                order += (order * -(-pad // len(order)))[:pad]
            order = order[self.rank : self.total_size : self.num_replicas]
        # asked when iterating, after Lightning restored a resumed fit's progress
        done = self.done_in_epoch(self.epoch) if self.done_in_epoch is not None else 0
        return iter(order[done:])


class ShardedEvalSampler(DistributedSampler):
    """Evaluation order under DDP: rank r of W gets indices r, r+W, r+2W, ..., in order.

    No padding: every sample is scored exactly once over all ranks, so a dataset-level
    metric summed over ranks equals the single-process one; ranks may differ by one batch
    (W - 1 ranks hold one sample fewer when W does not divide the length). Being a
    ``DistributedSampler``, Lightning keeps it instead of its padding sampler.
    """

    def __init__(self, dataset: Dataset, num_replicas: int | None = None, rank: int | None = None) -> None:
        world, own_rank = process_group()
        super().__init__(
            dataset,
            num_replicas=world if num_replicas is None else num_replicas,
            rank=own_rank if rank is None else rank,
            shuffle=False,
            drop_last=False,
        )
        self.total_size = len(dataset)
        self.num_samples = len(range(self.rank, self.total_size, self.num_replicas))

    def __len__(self) -> int:
        return self.num_samples

    def __iter__(self):
        return iter(range(self.rank, self.total_size, self.num_replicas))


class SegmentationDataModule(LightningDataModule, ABC):
    """Base datamodule: subclasses list the files of a split and map raw labels to train ids.

    Splits are "train" and "val"; ``test`` scores ``test_split`` (the val split for datasets
    without public test labels); ``predict`` runs on ``predict_root`` when given, otherwise
    on the val images. ``limit`` keeps the first N files of each split (smoke runs).
    """

    ignore_index: int = IGNORE_INDEX
    test_split: str = "val"

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
    ) -> None:
        super().__init__()
        self.root = root
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.num_workers = num_workers
        self.train_transform = TrainTransform(crop_size, scale, ratio_range, cat_max_ratio, flip_prob, photometric)
        self.eval_transform = EvalTransform(eval_resize)
        self.seed = seed
        self.predict_root = predict_root
        self.limit = limit
        self.epoch = 0
        self.datasets: dict[str, Dataset] = {}
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

    def set_epoch(self, epoch: int) -> None:
        """Select the shuffle order and augmentations of ``epoch`` (call at each epoch start)."""
        self.epoch = epoch
        if "train" in self.datasets:
            self.datasets["train"].set_epoch(epoch)
        if self._train_sampler is not None:
            self._train_sampler.set_epoch(epoch)

    def _done_in_epoch(self, epoch: int) -> int:
        """Training samples of ``epoch`` this rank has been through, from the fit's step count:
        nonzero only in the first epoch of a fit resumed from a mid-epoch checkpoint."""
        trainer = self.trainer
        if trainer is None or trainer.num_training_batches == float("inf"):
            return 0
        accumulate = trainer.accumulate_grad_batches
        steps_per_epoch = -(-int(trainer.num_training_batches) // accumulate)
        return max(0, (trainer.global_step - epoch * steps_per_epoch) * accumulate * self.batch_size)

    def _get(self, split: str) -> Dataset:
        if split not in self.datasets:
            raise RuntimeError(f"{type(self).__name__}.setup() has not prepared the {split} split")
        return self.datasets[split]

    def _loader(self, dataset: Dataset, batch_size: int, sampler: Sampler | None = None) -> DataLoader:
        # persistent_workers stays off: workers must be re-forked each epoch to see the new epoch.
        return DataLoader(
            dataset,
            batch_size=batch_size,
            sampler=sampler,
            num_workers=self.num_workers,
            collate_fn=collate_segmentation,
            pin_memory=torch.cuda.is_available(),
            worker_init_fn=_ignore_sigint,
        )

    def train_dataloader(self) -> DataLoader:
        dataset = self._get("train")
        # Lightning builds this loader before it restores a resumed fit's progress; it sets
        # the sampler's epoch before each epoch, and the sampler asks what is done when iterating
        self._train_sampler = EpochSampler(dataset, self.seed, done_in_epoch=self._done_in_epoch)
        return self._loader(dataset, self.batch_size, self._train_sampler)

    def _eval_loader(self, split: str) -> DataLoader:
        """Sequential in one process; under DDP each rank scores its own unpadded shard."""
        dataset = self._get(split)
        world, _ = process_group()
        if world == 1:
            return self._loader(dataset, self.eval_batch_size)
        if split == "val" and len(dataset) < world and self._fitting():
            # Validation inside `fit` runs through the DDP wrapper, whose first forward after
            # training syncs buffers: a rank without a single batch would hang the others.
            raise DataError(
                f"{len(dataset)} validation images for {world} processes: validating during `fit` "
                f"needs at least one image per process; use more images or fewer devices"
            )
        return self._loader(dataset, self.eval_batch_size, ShardedEvalSampler(dataset))

    def _fitting(self) -> bool:
        return self.trainer is not None and self.trainer.state.fn == TrainerFn.FITTING

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader("test")

    def predict_dataloader(self) -> DataLoader:
        return self._eval_loader("predict")
