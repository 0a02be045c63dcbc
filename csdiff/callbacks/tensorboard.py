"""TensorBoard pictures: validation predictions beside ground truth, and gate-weight histograms."""

from __future__ import annotations

from typing import Any

import numpy as np
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import TensorBoardLogger

from csdiff.visualize import image_to_rgb, overlay


def _tensorboard(trainer: Trainer):
    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger):
            return logger.experiment
    return None


class SegmentationImageLogger(Callback):
    """Once per validation: the first ``num_images`` images as [input | prediction | ground truth]."""

    def __init__(self, num_images: int = 4) -> None:
        self.num_images = num_images
        self._rows: list[np.ndarray] = []

    def on_validation_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._rows = []

    def on_validation_batch_end(
        self, trainer, pl_module, outputs: Any, batch: dict, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        if trainer.sanity_checking or not isinstance(outputs, dict) or len(self._rows) >= self.num_images:
            return
        for image, label, pred in zip(batch["image"], batch["label"], outputs["preds"]):
            if len(self._rows) >= self.num_images:
                break
            gt = label.cpu().numpy()
            rgb = image_to_rgb(image, gt.shape)
            palette = pl_module.palette
            self._rows.append(
                np.concatenate([rgb, overlay(rgb, pred.cpu().numpy(), palette), overlay(rgb, gt, palette)], axis=1)
            )

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        writer = _tensorboard(trainer)
        if writer is None or not self._rows or not trainer.is_global_zero:
            return
        for i, row in enumerate(self._rows):
            writer.add_image(f"val/prediction_{i}", row, trainer.global_step, dataformats="HWC")


class GateWeightLogger(Callback):
    """Histograms of the gate's per-channel weights, per level and variant, every ``every_n_steps``."""

    def __init__(self, every_n_steps: int = 50) -> None:
        self.every_n_steps = every_n_steps

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        writer = _tensorboard(trainer)
        if writer is None or not isinstance(outputs, dict) or "gate_weights" not in outputs:
            return
        if (trainer.global_step - 1) % self.every_n_steps or not trainer.is_global_zero:  # first step, then every n
            return
        for level, weights in zip(pl_module.levels, outputs["gate_weights"]):
            for v, name in enumerate(pl_module.variant_names):
                writer.add_histogram(f"gate/{level}/{name}", weights[v].float().cpu(), trainer.global_step)
