"""Feature extraction as a Lightning predict loop, so that ``csdiff extract`` runs on N devices."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_only
from torch.utils.data import DataLoader

from csdiff.backbone import DiffusionFeatureExtractor
from csdiff.backbone.store import FeatureFolder, feature_keys, folder_description
from csdiff.callbacks.writers import FeatureWriter
from csdiff.data.extraction import ExtractionDataset, collate_extraction
from csdiff.data.reading import DataError
from csdiff.data.samplers import ShardedEvalSampler, leave_signals_to_main
from csdiff.io import remove_stale_temporaries
from csdiff.resume import Interrupted, StopPredicting

RESUME_HINT = "run the same command again to extract the rest (files already written are complete and kept)"


def check_output_folder(output: str | Path) -> None:
    """Refuse an output that exists but is no folder (a file, /dev/full) before any work."""
    if Path(output).exists() and not Path(output).is_dir():
        raise DataError(
            f"output {output} exists and is not a folder: give a folder for the feature files (created if missing)"
        )


class FeatureExtractionModule(LightningModule):
    """Wraps a frozen extractor; ``predict_step`` returns each batch's features (written to disk by
    :class:`csdiff.callbacks.FeatureWriter`, never gathered in memory).

    The loader is built here, after the process group exists, so that each rank takes its own
    unpadded shard (rank r of W: images r, r+W, ...) and no image is computed twice.
    """

    def __init__(
        self,
        extractor: DiffusionFeatureExtractor,
        dataset: ExtractionDataset,
        batch_size: int = 1,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        self.extractor = extractor
        self.dataset = dataset
        self.batch_size = batch_size
        self.num_workers = num_workers

    def predict_dataloader(self) -> DataLoader:
        return DataLoader(
            self.dataset,
            batch_size=self.batch_size,
            sampler=ShardedEvalSampler(self.dataset),
            num_workers=self.num_workers,
            collate_fn=collate_extraction,
            worker_init_fn=leave_signals_to_main,
        )

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Any]:
        # images differ in size: bring each to img_size first, then batch
        images = torch.cat([self.extractor.resize(image[None].to(self.device)) for image in batch["image"]])
        return {"names": batch["name"], "features": self.extractor(images)}


def extract_to_folder(
    extractor: DiffusionFeatureExtractor,
    items: Sequence[tuple[str, str]],
    output: str,
    trainer_options: dict[str, Any] | None = None,
    batch_size: int = 1,
    num_workers: int = 0,
    overwrite: bool = False,
) -> tuple[int, int]:
    """Write the features of ``items`` ((output name, image path) pairs) into the feature folder
    ``output``; returns (written, already present).

    Every process lists the missing files before any process writes (writing starts only once
    all ranks have joined the process group), so all ranks agree on what is left to do.
    ``trainer_options`` (accelerator, devices, strategy, num_nodes) go to the predict Trainer.
    Ctrl-C or SIGTERM stops after the batch in progress, whose files are written first: an
    :class:`Interrupted` says how many files this process wrote.
    """
    check_output_folder(output)
    folder = FeatureFolder(output)
    description = folder_description(extractor)
    if overwrite and folder.manifest_path.is_file() and rank_zero_only.rank == 0:
        folder.manifest_path.unlink()
    folder.prepare(description, {name: path for name, path in items}, write=rank_zero_only.rank == 0)
    remove_stale_temporaries(folder.folder)  # from a killed run; finished files are complete
    todo = list(items) if overwrite else folder.missing(items, feature_keys(description))
    if todo:
        metadata = {"csdiff": json.dumps(extractor.describe())}
        writer = FeatureWriter(output, metadata)
        trainer = Trainer(
            **(trainer_options or {}),
            logger=False,
            enable_checkpointing=False,
            enable_model_summary=False,
            use_distributed_sampler=False,
            callbacks=[writer, StopPredicting(RESUME_HINT)],  # the stop runs after the writer
        )
        module = FeatureExtractionModule(extractor, ExtractionDataset(todo), batch_size, num_workers)
        try:
            trainer.predict(module, return_predictions=False)
        except Interrupted as stop:
            raise Interrupted(
                stop.signum,
                f"{stop}: wrote {writer.written} of {len(todo)} missing feature files to {output}",
                stop.hint,
            ) from None
    return len(todo), len(items) - len(todo)
