"""Writes the features of ``csdiff extract``'s predict loop into a feature folder, image by image."""

from __future__ import annotations

from typing import Any

from lightning.pytorch.callbacks import BasePredictionWriter

from csdiff.backbone.store import FeatureFolder


class FeatureWriter(BasePredictionWriter):
    """One fp16 safetensors file per image, written atomically as each batch ends by the rank
    that computed it."""

    def __init__(self, folder: str, metadata: dict[str, str] | None = None) -> None:
        super().__init__(write_interval="batch")
        self.folder = FeatureFolder(folder)
        self.metadata = metadata
        self.written = 0

    def write_on_batch_end(
        self, trainer, pl_module, prediction: dict[str, Any], batch_indices, batch, batch_idx, dataloader_idx=0
    ) -> None:
        features = prediction["features"]
        for i, name in enumerate(prediction["names"]):
            self.folder.write(
                name, {v: {layer: x[i] for layer, x in layers.items()} for v, layers in features.items()}, self.metadata
            )
            self.written += 1

    def on_predict_end(self, trainer, pl_module) -> None:
        if trainer.world_size > 1:
            print(f"rank {trainer.global_rank} wrote {self.written} feature files", flush=True)
