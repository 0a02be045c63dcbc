"""Write the LoRA a :class:`~csdiff.tasks.LoRATrainingTask` trains as a kohya file, usable as a variant's LoRA."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from lightning.pytorch import Callback, LightningModule, Trainer

from csdiff import __version__
from csdiff.backbone.loading import parse_dtype
from csdiff.backbone.lora_files import save_kohya_lora

DEFAULT_NAME = "lora.safetensors"


class LoRAFileWriter(Callback):
    """Writes the adapters as a kohya-format ``.safetensors`` LoRA (with alphas) whenever a
    checkpoint is saved and at the end of the fit, so the file always matches the newest
    checkpoint, also after a kill. Writes are atomic: the file is whole or absent.

    Args:
        output: the file (default: ``lora.safetensors`` in the run's log folder).
        dtype: of the written weights (float32 keeps exactly what was trained; float16
            halves the file, as kohya's ``save_precision``).
    """

    def __init__(self, output: str | None = None, dtype: Literal["float32", "float16", "bfloat16"] = "float32") -> None:
        self.output = output
        self.dtype = parse_dtype(dtype)
        self.path: Path | None = None
        self._written_step: int | None = None

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if not callable(getattr(pl_module, "lora_modules", None)):
            raise TypeError(
                f"LoRAFileWriter needs a LoRA training task (csdiff.tasks.LoRATrainingTask), not {type(pl_module).__name__}"
            )
        # the log folder is a broadcast under DDP: resolved here, where every rank runs
        folder = trainer.log_dir or trainer.default_root_dir
        self.path = Path(self.output) if self.output else Path(folder) / DEFAULT_NAME

    def write(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Write the file now (rank 0 only: every rank holds the same adapters)."""
        if not trainer.is_global_zero or self.path is None:
            return
        if self._written_step == trainer.global_step and self.path.is_file():
            return  # the end of a fit often saves last.ckpt too: the same adapters, written once
        description = pl_module.describe()
        metadata = {
            "csdiff_version": __version__,
            "csdiff_global_step": str(trainer.global_step),
            "csdiff_lora": json.dumps(description),
            # kohya's training metadata keys, which LoRA tools display
            "ss_network_module": "networks.lora",
            "ss_network_dim": str(description["rank"]),
            "ss_network_alpha": str(description["alpha"]),
            "ss_steps": str(trainer.global_step),
            "ss_base_model": str(description["backbone"]["model"]),
        }
        save_kohya_lora(self.path, pl_module.lora_modules(), sdxl=pl_module.sdxl, metadata=metadata, dtype=self.dtype)
        self._written_step = trainer.global_step

    def on_save_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        self.write(trainer, pl_module)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.write(trainer, pl_module)
