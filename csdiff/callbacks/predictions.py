"""Write segmentation predictions: label PNGs, colour overlays, benchmark submission files."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import numpy as np
from lightning.pytorch.callbacks import BasePredictionWriter

from csdiff.data.cityscapes import train_ids_to_label_ids
from csdiff.data.reading import output_names
from csdiff.io import save_image
from csdiff.visualize import image_to_rgb, overlay


class SegmentationPredictionWriter(BasePredictionWriter):
    """Writes ``labels/<name>.png`` (train ids), ``overlays/<name>.jpg`` and optionally
    ``submission/<name>.png``: ``ade20k`` (class index + 1, as the ADE20K server expects) or
    ``cityscapes`` (official label ids, as the Cityscapes evaluation scripts expect).

    ``<name>`` is the image's path below the input folder without its suffix (see
    :func:`~csdiff.data.segmentation.output_names`): two inputs never share an output, and
    two that would stop the run before anything is predicted. Every file is written
    atomically, so an interrupted run leaves no truncated file; a rerun overwrites.
    """

    def __init__(
        self,
        output_dir: str = "predictions",
        submission_format: Literal["ade20k", "cityscapes"] | None = None,
        overlays: bool = True,
    ) -> None:
        super().__init__(write_interval="batch")
        self.output_dir = Path(output_dir)
        self.submission_format = submission_format
        self.overlays = overlays
        self.names: dict[str, str] = {}

    def on_predict_start(self, trainer, pl_module) -> None:
        """Name every output from the whole input list, before the first prediction."""
        loaders = trainer.predict_dataloaders
        self.names = {}
        for loader in loaders if isinstance(loaders, list) else [loaders]:
            paths = loader.dataset.paths
            self.names.update(zip(paths, output_names(paths, getattr(loader.dataset, "root", None))))

    def write_on_batch_end(
        self,
        trainer,
        pl_module,
        prediction: list[dict[str, Any]],
        batch_indices,
        batch,
        batch_idx: int,
        dataloader_idx: int,
    ) -> None:
        for item in prediction:
            pred, name = item["pred"], self.names[item["path"]]
            save_image(self.output_dir / "labels" / f"{name}.png", pred)
            if self.overlays:
                rgb = image_to_rgb(item["image"], pred.shape)
                save_image(self.output_dir / "overlays" / f"{name}.jpg", overlay(rgb, pred, pl_module.palette))
            if self.submission_format == "ade20k":
                save_image(self.output_dir / "submission" / f"{name}.png", pred + 1)
            elif self.submission_format == "cityscapes":
                save_image(
                    self.output_dir / "submission" / f"{name}.png", train_ids_to_label_ids(pred).astype(np.uint8)
                )
