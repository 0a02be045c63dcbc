"""Label-scarce segmentation data: DDPM-segmentation's Horse-21 / Bedroom-28 as pixel streams.

Training samples pixels, not images (upstream trains its MLPs on shuffled batches of 64
pixels drawn from every training image at once); features come from a feature folder
(``csdiff extract``, or the task on first use) and are gathered per batch at native size
by :class:`~csdiff.data.pixels.PixelFeatureBank`, so nothing upsampled is ever held.
"""

from __future__ import annotations

from collections import ChainMap
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, Dataset, Sampler

from csdiff.data.checks import check_items
from csdiff.data.ddpmseg import (
    DDPMSegSpec,
    check_image_hw,
    check_image_size,
    drop_rare_classes,
    get_spec,
    list_split,
    random_splits,
    read_ddpmseg_label,
)
from csdiff.data.pixels import LazyFeatureFile, PixelFeatureBank
from csdiff.data.reading import DataError, image_size, read_image
from csdiff.data.samplers import ShardedEvalSampler, fit_epoch, trained_in_epoch


class PixelTable(Dataset):
    """Every trainable pixel of the training images: (image, y, x, label) as four tensors.

    ``dataset[list_of_indices]`` returns one batch as a dict (a batch sampler feeds it whole).
    """

    def __init__(self, labels: Sequence[np.ndarray], ignore_index: int, min_pixels: int) -> None:
        rows = []
        for i, label in enumerate(labels):
            kept = torch.as_tensor(drop_rare_classes(label, ignore_index, min_pixels))
            y, x = torch.nonzero(kept != ignore_index, as_tuple=True)
            rows.append((torch.full_like(y, i), y, x, kept[y, x]))
        self.image, self.y, self.x, self.label = (torch.cat(parts) for parts in zip(*rows))
        if self.label.numel() == 0:
            raise DataError("the training images have no labelled pixels (all are the ignore value)")

    def __len__(self) -> int:
        return self.label.numel()

    def __getitems__(self, indices: Sequence[int]) -> dict[str, torch.Tensor]:
        idx = torch.as_tensor(indices)
        return {"image": self.image[idx], "y": self.y[idx], "x": self.x[idx], "label": self.label[idx]}


class PixelStreamSampler(Sampler[list[int]]):
    """One independent shuffled stream of pixels per ensemble member, ``batch_size`` each per step.

    A step's batch is the members' batches one after another (member m: rows m·B..(m+1)·B).
    An epoch is one pass of every stream over all pixels, the last partial batch dropped (as
    upstream). Stream m of epoch e is shuffled by a generator seeded with (seed, e, m): every
    epoch has a new order (upstream's DataLoader reshuffles each epoch), a run is reproducible
    and a resumed epoch sees the same order.

    Being the DataLoader's batch sampler, Lightning never calls its ``set_epoch`` (it looks at
    ``loader.sampler`` and ``batch_sampler.sampler`` only): the task does, at each epoch start.
    ``done_in_epoch(epoch)`` says how many steps of ``epoch`` were trained already (a fit
    resumed mid-epoch): they are skipped, as :class:`~csdiff.data.samplers.EpochSampler` does.
    """

    def __init__(
        self,
        num_pixels: int,
        batch_size: int,
        streams: int,
        seed: int,
        done_in_epoch: Callable[[int], int] | None = None,
    ) -> None:
        if num_pixels < batch_size:
            raise DataError(f"{num_pixels} labelled training pixels are fewer than one batch of {batch_size}")
        self.num_pixels, self.batch_size, self.streams, self.seed = num_pixels, batch_size, streams, seed
        self.done_in_epoch = done_in_epoch
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_pixels // self.batch_size

    def __iter__(self) -> Iterator[list[int]]:
        orders = [
            torch.randperm(
                self.num_pixels,
                generator=torch.Generator().manual_seed((self.seed * 1_000_003 + self.epoch) * 1009 + m),
            )
            for m in range(self.streams)
        ]
        b = self.batch_size
        done = self.done_in_epoch(self.epoch) if self.done_in_epoch is not None else 0
        for step in range(done, len(self)):
            yield torch.cat([order[step * b : (step + 1) * b] for order in orders]).tolist()


class ScarceTestImages(Dataset):
    """Test images: the label and a one-image feature bank (native size) per item."""

    def __init__(self, names: Sequence[str], labels: Sequence[Path], make_bank, spec: DDPMSegSpec) -> None:
        self.names, self.labels, self.make_bank, self.spec = list(names), list(labels), make_bank, spec

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {
            "name": self.names[index],
            "label": torch.as_tensor(read_ddpmseg_label(self.labels[index], self.spec)),
            "bank": self.make_bank([self.names[index]]),
        }


class DDPMSegDataModule(LightningDataModule):
    """Horse-21 or Bedroom-28 in DDPM-segmentation's layout, for :class:`~csdiff.tasks.ScarceSegmentationTask`.

    Args:
        root: the dataset's folder (holding ``real/train`` and ``real/test``).
        dataset: ``horse21`` or ``bedroom28`` (class list, ignore value, scored classes).
        class_rule: ``ddpm_segmentation`` (DDPM-segmentation's: Bedroom-28 with 29 outputs,
            background 0 ignored, classes 1-28 scored) or ``paper_code`` (the content-shift
            paper's code: 28 outputs, ignore 255, background scored, class 28 not); see
            :mod:`csdiff.data.ddpmseg`. Horse-21 is the same under both. The task's
            ``num_classes`` must match (29 or 28).
        split: ``upstream`` (the official train/test folders) or a seed: the official images
            pooled and split at random into the official sizes (the paper's 5 splits: seeds 0-4).
        features: feature folder of this dataset's images (written by ``csdiff extract
            --config <this config>``, or by the task on first use).
        extra_features: optional second folder in the same per-image layout (e.g. DDPM
            features), concatenated after the gate, ungated.
        batch_size: pixels per batch and ensemble member (upstream: 64).
        min_pixels: in a training image, a class with fewer pixels is ignored there (upstream: 20).
        seed: shuffling of the pixel streams.
        num_workers: loader processes; also the threads of the check (all CPUs when 0).
        check: check the images and labels of the stage in ``setup`` (``fit``: train; ``test``:
            test), before features are extracted or a step runs: each image whole and 256²
            (from its header, not decoded), each ``.npy`` label loaded and checked as training
            and testing load it. Stray images or labels are refused when listing, check or not.
            ``false`` skips it (labels are then checked when loaded).
    """

    def __init__(
        self,
        root: str = "data/horse_21",
        dataset: Literal["horse21", "bedroom28"] = "horse21",
        class_rule: Literal["ddpm_segmentation", "paper_code"] = "ddpm_segmentation",
        split: Literal["upstream"] | int = "upstream",
        features: str = "features/horse21",
        extra_features: str | None = None,
        batch_size: int = 64,
        min_pixels: int = 20,
        seed: int = 0,
        num_workers: int = 0,
        check: bool = True,
    ) -> None:
        super().__init__()
        self.root = Path(root)
        self.spec = get_spec(dataset, class_rule)
        self.split = split
        self.features = features
        self.extra_features = extra_features
        self.batch_size = batch_size
        self.min_pixels = min_pixels
        self.seed = seed
        self.num_workers = num_workers
        self.check = check
        self.num_classes = self.spec.num_classes
        self.gated: dict[str, Any] = {}  # set by the task: variants and layers to read

    # --- images ---
    def _official(self) -> dict[str, list[tuple[str, Path, Path]]]:
        return {
            s: [(f"{s}/{img.stem}", img, lab) for img, lab in list_split(self.root, s, self.spec)]
            for s in ("train", "test")
        }

    def split_items(self) -> dict[str, list[tuple[str, Path, Path]]]:
        """(name, image, label) of the train and test images of this split."""
        official = self._official()
        if self.split == "upstream":
            return official
        pooled = official["train"] + official["test"]
        ((train, test),) = random_splits(pooled, len(official["train"]), [int(self.split)])
        return {"train": [pooled[i] for i in train], "test": [pooled[i] for i in test]}

    def feature_images(self) -> list[tuple[str, str]]:
        """(name, path) of every image of the dataset: what ``csdiff extract`` writes features of.
        Image sizes are checked here, before any backbone call."""
        items = [item for part in self._official().values() for item in part]
        for _, image, _ in items:
            check_image_size(read_image(str(image)), image, self.spec)
        return [(name, str(image)) for name, image, _ in items]

    # --- features ---
    def _sources(self, names: Sequence[str]) -> list[Any]:
        sources = []
        for name in names:
            parts = [LazyFeatureFile(Path(self.features) / f"{name}.safetensors")]
            if self.extra_features is not None:
                path = Path(self.extra_features) / f"{name}.safetensors"
                if not path.is_file():
                    raise DataError(
                        f"extra features of {name} not found: {path}; write one file per image there (DDPM-segmentation's: checkpoints_scripts/extract_adm_features.py)"
                    )
                parts.append(LazyFeatureFile(path))
            sources.append(ChainMap(*parts))
        return sources

    def extra_sources(self) -> list[str]:
        """Source prefixes of the extra feature folder (from its first training image), or []."""
        if self.extra_features is None:
            return []
        name = self.split_items()["train"][0][0]
        keys = self._sources([name])[0].maps[1]
        return sorted({k.split("/", 1)[0] for k in keys if "/" in k})

    def bank(self, names: Sequence[str]) -> PixelFeatureBank:
        """Features of ``names`` at native size, in the gated variants' and layers' order."""
        return PixelFeatureBank(
            self._sources(names),
            self.gated["variants"],
            self.extra,
            out_size=self.spec.size,
            layers=self.gated["layers"],
            names=list(names),
        )

    # --- loaders ---
    def setup(self, stage: str) -> None:
        self.items = self.split_items()
        self.extra = self.extra_sources()
        if self.check:
            used = {"fit": ["train"], "test": ["test"]}.get(stage, ["train", "test"] if stage is None else [])
            for split in used:
                self.check_split(split)

    def check_item(self, item: tuple[str, Path, Path]) -> None:
        """One (name, image, label), as :meth:`feature_images` and the loaders check them."""
        _, image, label = item
        check_image_hw(image_size(str(image)), image, self.spec)
        read_ddpmseg_label(label, self.spec)

    def check_split(self, split: str) -> None:
        """The up-front check of ``split``'s items (see ``check``), in threads."""
        items = self.items[split]
        check_items(items, self.check_item, [str(label) for _, _, label in items], f"{split} samples", self.num_workers)

    def train_dataloader(self) -> DataLoader:
        train = self.items["train"]
        self.train_bank = self.bank([name for name, _, _ in train])
        labels = [read_ddpmseg_label(label, self.spec) for _, _, label in train]
        table = PixelTable(labels, self.spec.ignore_index, self.min_pixels)
        streams = getattr(self.trainer.lightning_module, "num_members", 1) if self.trainer is not None else 1
        self.train_sampler = PixelStreamSampler(len(table), self.batch_size, streams, self.seed, self._steps_done)
        # The fit's (restored) epoch before the first iterator draws (see fit_epoch); the task
        # sets each later one at its epoch start.
        if (epoch := fit_epoch(self.trainer)) is not None:
            self.train_sampler.set_epoch(epoch)
        return DataLoader(table, batch_sampler=self.train_sampler, collate_fn=_identity, num_workers=self.num_workers)

    def _steps_done(self, epoch: int) -> int:
        """Steps of ``epoch`` trained already (a fit resumed mid-epoch), from the trainer's count."""
        return trained_in_epoch(self.trainer, 1, epoch, len(self.train_sampler))

    def test_dataloader(self) -> DataLoader:
        test = self.items["test"]
        names = [name for name, _, _ in test]
        dataset = ScarceTestImages(names, [label for _, _, label in test], self.bank, self.spec)
        return DataLoader(
            dataset, batch_size=1, sampler=ShardedEvalSampler(dataset), collate_fn=_first, num_workers=self.num_workers
        )


def _identity(batch: Any) -> Any:
    return batch


def _first(batch: list[Any]) -> Any:
    return batch[0]
