"""What every csdiff datamodule shares: prepared splits, loaders, DDP-sharded evaluation."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from lightning.pytorch import LightningDataModule
from lightning.pytorch.trainer.states import TrainerFn
from torch.utils.data import DataLoader, Dataset, Sampler

from csdiff.data.reading import DataError
from csdiff.data.samplers import ShardedEvalSampler, leave_signals_to_main, process_group


class ShardedDataModule(LightningDataModule):
    """Holds the prepared ``datasets`` by split and builds their loaders.

    Evaluation runs in order in one process and, under DDP, on unpadded shards (rank r of W
    scores items r, r+W, ...), so dataset-level metrics summed over ranks equal the
    single-process ones. Subclasses set ``collate`` and fill ``datasets`` in ``setup``.
    """

    collate: Callable[[list[dict[str, Any]]], dict[str, Any]]
    item_name = "images"  # what an item is, for messages

    def __init__(self, batch_size: int, eval_batch_size: int, num_workers: int) -> None:
        super().__init__()
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.num_workers = num_workers
        self.datasets: dict[str, Dataset] = {}

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
            collate_fn=type(self).collate,
            pin_memory=torch.cuda.is_available(),
            worker_init_fn=leave_signals_to_main,
        )

    def _eval_loader(self, split: str) -> DataLoader:
        """Sequential in one process; under DDP each rank scores its own unpadded shard."""
        dataset = self._get(split)
        world, _ = process_group()
        if world == 1:
            return self._loader(dataset, self.eval_batch_size)
        fitting = self.trainer is not None and self.trainer.state.fn == TrainerFn.FITTING
        if split == "val" and len(dataset) < world and fitting:
            # Validation inside `fit` runs through the DDP wrapper, whose first forward after
            # training syncs buffers: a rank without a single batch would hang the others.
            raise DataError(
                f"{len(dataset)} validation {self.item_name} for {world} processes: validating during `fit` "
                f"needs at least one per process; use more {self.item_name} or fewer devices"
            )
        return self._loader(dataset, self.eval_batch_size, ShardedEvalSampler(dataset))

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader("test")
