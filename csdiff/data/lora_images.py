"""Unlabelled images for LoRA training: a seeded draw from a dataset's training images, or a folder.

The paper trains each dataset's LoRA on 30 random unlabelled training images of that dataset.
Rather than copying images around, :class:`LoRAImagesDataModule` wraps the dataset's own
datamodule (the ``data`` section of its task config), lists that datamodule's training
images with :func:`training_images` and draws ``num_images`` of them as a pure function of
``seed``, so every run and every DDP rank trains on the same images. Labels are never read.
A plain folder of images works too; a same-stem ``.txt`` file beside an image is its caption
and replaces the task's prompt for that image (kohya's caption convention).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, Dataset

from csdiff.data.reading import DataError, list_images, read_image
from csdiff.data.samplers import EpochSampler, fit_epoch, leave_signals_to_main, trained_in_epoch
from csdiff.data.segmentation import collate_segmentation
from csdiff.data.transforms import to_tensor

# Random streams apart from the shuffle stream (1) of csdiff.data.samplers, which shares the seed.
_DRAW_STREAM = 3
_FLIP_STREAM = 4
CAPTION_SUFFIX = ".txt"


def training_images(datamodule: LightningDataModule) -> list[str]:
    """The training images of a csdiff datamodule: unique paths, sorted, labels ignored.

    Each dataset family lists its training split its own way; this asks, in order, for
    ``lora_training_images()`` (a hook any datamodule may add), segmentation's
    ``split_samples("train")``, SPair's ``split_pairs("train")`` (both images of every pair)
    and DDPM-segmentation's ``split_items()["train"]`` (the configured split). The options
    of the wrapped datamodule (``limit``, ``categories``, ``split``, ...) apply.
    """
    if callable(getattr(datamodule, "lora_training_images", None)):
        paths = list(datamodule.lora_training_images())
    elif callable(getattr(datamodule, "split_samples", None)):
        paths = [image for image, _ in datamodule.split_samples("train")]
    elif callable(getattr(datamodule, "split_pairs", None)):
        paths = [path for pair in datamodule.split_pairs("train") for path in (pair.src_path, pair.trg_path)]
    elif callable(getattr(datamodule, "split_items", None)):
        paths = [image for _, image, _ in datamodule.split_items()["train"]]
    else:
        raise DataError(
            f"{type(datamodule).__name__} does not list its training images (no split_samples, split_pairs, split_items "
            f"or lora_training_images); give LoRAImagesDataModule a `folder` of images instead"
        )
    return sorted({str(p) for p in paths})


def draw_images(paths: Sequence[str], num_images: int | None, seed: int) -> list[str]:
    """``num_images`` of ``paths`` drawn without replacement as a pure function of ``seed``
    (all of them when None or when there are fewer), sorted."""
    if num_images is None or num_images >= len(paths):
        return sorted(paths)
    if num_images < 1:
        raise ValueError(f"num_images must be positive or None, got {num_images}")
    rng = np.random.default_rng(np.random.SeedSequence([seed], spawn_key=(_DRAW_STREAM,)))
    return sorted(paths[i] for i in rng.choice(len(paths), size=num_images, replace=False))


def read_caption(image_path: str) -> str | None:
    """The caption of an image: its same-stem ``.txt`` file, stripped; None without one (or empty)."""
    path = Path(image_path).with_suffix(CAPTION_SUFFIX)
    if not path.is_file():
        return None
    text = " ".join(path.read_text(encoding="utf-8").split())
    return text or None


def resize_center_crop(img: np.ndarray, size: int) -> np.ndarray:
    """Resize the short side to ``size`` (area filter when shrinking) and cut the central square."""
    h, w = img.shape[:2]
    factor = size / min(h, w)
    new_w, new_h = max(size, round(w * factor)), max(size, round(h * factor))
    if (new_w, new_h) != (w, h):
        img = cv2.resize(img, (new_w, new_h), interpolation=cv2.INTER_AREA if factor < 1 else cv2.INTER_CUBIC)
    top, left = (new_h - size) // 2, (new_w - size) // 2
    return img[top : top + size, left : left + size]


class LoRAImageDataset(Dataset):
    """Images as (3, size, size) tensors in [-1, 1] with their caption (None: the task's prompt).

    Centre crops, so the whole run sees the same pixels of each image; an optional horizontal
    flip is keyed on (seed, epoch, index), so a resumed fit replays it.
    """

    def __init__(self, paths: Sequence[str], size: int, flip_prob: float = 0.0, seed: int = 0) -> None:
        self.paths = list(paths)
        self.captions = [read_caption(p) for p in self.paths]
        self.size = size
        self.flip_prob = flip_prob
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> dict[str, Any]:
        img = resize_center_crop(read_image(self.paths[index], exif_orientation=True), self.size)
        if self.flip_prob > 0:
            rng = np.random.default_rng(
                np.random.SeedSequence([self.seed, self.epoch, index], spawn_key=(_FLIP_STREAM,))
            )
            if rng.random() < self.flip_prob:
                img = img[:, ::-1]
        return {"image": to_tensor(img), "caption": self.captions[index], "path": self.paths[index]}


class LoRAImagesDataModule(LightningDataModule):
    """Training images for :class:`~csdiff.tasks.LoRATrainingTask`.

    Args:
        source: a csdiff datamodule (the ``data`` section of a task config) whose training
            images are drawn from; its labels are never read.
        folder: a folder of images (searched recursively) instead of ``source``.
        num_images: how many images to draw (paper: 30); None takes them all.
        size: side of the square training images; None takes the task's resolution
            (``backbone.img_size``), so a config states it once.
        flip_prob: probability of a horizontal flip per image and epoch (kohya: off).
        seed: the image draw, the epoch order and the flips (three separate streams).

    Training only: there is no validation split (the loss on other noise is no measure of a
    LoRA); the order is a function of (seed, epoch) and a resumed epoch skips what it trained.
    """

    def __init__(
        self,
        source: LightningDataModule | None = None,
        folder: str | None = None,
        num_images: int | None = 30,
        size: int | None = None,
        flip_prob: float = 0.0,
        batch_size: int = 1,
        num_workers: int = 0,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if (source is None) == (folder is None):
            raise ValueError("give exactly one of `source` (a datamodule) and `folder` (a folder of images)")
        if num_images is not None and num_images < 1:
            raise ValueError(f"num_images must be positive or None, got {num_images}")
        self.source = source
        self.folder = folder
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.num_images = num_images
        self.size = size
        self.flip_prob = flip_prob
        self.seed = seed
        self.epoch = 0
        self.paths: list[str] = []
        self.dataset: LoRAImageDataset | None = None
        self._train_sampler: EpochSampler | None = None

    def prepare_data(self) -> None:
        if self.source is not None:
            self.source.prepare_data()  # e.g. the quickstart generates its images here

    def image_paths(self) -> list[str]:
        """The drawn training images (sorted)."""
        if self.folder is not None:
            if not Path(self.folder).is_dir():
                raise DataError(f"image folder {self.folder} does not exist; set `folder` to a folder of images")
            available = list_images(self.folder)
            where = f"folder {self.folder}"
        else:
            available = training_images(self.source)
            where = f"the training split of {type(self.source).__name__}"
        if not available:
            raise DataError(f"no images found in {where}")
        return draw_images(available, self.num_images, self.seed)

    def setup(self, stage: str | None = None) -> None:
        if stage not in ("fit", None):
            return
        self.paths = self.image_paths()
        size = self.size if self.size is not None else getattr(self._module(), "img_size", None)
        if size is None:
            raise ValueError("LoRAImagesDataModule: set `size`, or use it with a task that has an img_size")
        self.dataset = LoRAImageDataset(self.paths, int(size), self.flip_prob, self.seed)
        self.dataset.set_epoch(self.epoch)

    def _module(self) -> Any:
        return None if self.trainer is None else self.trainer.lightning_module

    def set_epoch(self, epoch: int) -> None:
        """Select the order and flips of ``epoch``."""
        self.epoch = epoch
        if self.dataset is not None:
            self.dataset.set_epoch(epoch)
        if self._train_sampler is not None:
            self._train_sampler.set_epoch(epoch)

    def train_dataloader(self) -> DataLoader:
        if self.dataset is None:
            raise RuntimeError("LoRAImagesDataModule.setup('fit') has not run")
        # The fit's (restored) epoch before the first iterator forks any worker (see fit_epoch); the
        # sampler asks what is done when iterating. Workers are re-forked each epoch to see its flips.
        if (epoch := fit_epoch(self.trainer)) is not None:
            self.set_epoch(epoch)
        self._train_sampler = EpochSampler(
            self.dataset,
            self.seed,
            done_in_epoch=lambda epoch: trained_in_epoch(
                self.trainer, self.batch_size, epoch, len(self._train_sampler)
            ),
        )
        self._train_sampler.set_epoch(self.epoch)
        return DataLoader(
            self.dataset,
            batch_size=self.batch_size,
            sampler=self._train_sampler,
            num_workers=self.num_workers,
            collate_fn=collate_segmentation,
            pin_memory=torch.cuda.is_available(),
            worker_init_fn=leave_signals_to_main,
        )
