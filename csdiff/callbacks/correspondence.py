"""Correspondence pictures in TensorBoard, the best validation PCK, and predicted keypoints written to disk."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import BasePredictionWriter

from csdiff.callbacks.tensorboard import _tensorboard
from csdiff.data.reading import read_image
from csdiff.io import atomic_write, save_image, save_text
from csdiff.visualize import draw_matches


def _match_picture(item: dict[str, Any], pred: torch.Tensor, alpha: float) -> np.ndarray:
    """Original-size source | target with matches; green within α·max(bbox side) of the ground truth."""
    gt = item.get("trg_kps")
    threshold = None
    if gt is not None:
        x1, y1, x2, y2 = (float(v) for v in item["trg_bbox"])
        threshold = alpha * max(x2 - x1, y2 - y1)
    return draw_matches(
        read_image(item["src_path"]),
        read_image(item["trg_path"]),
        np.asarray(item["src_kps"], np.float32),
        pred.cpu().numpy(),
        None if gt is None else np.asarray(gt, np.float32),
        threshold,
    )


def _pair_item(batch: dict, i: int) -> dict[str, Any]:
    return {k: batch[k][i] for k in ("src_path", "trg_path", "src_kps", "trg_kps", "trg_bbox") if k in batch}


class CorrespondenceImageLogger(Callback):
    """Once per validation: the first ``num_pairs`` pairs with predicted matches, green when
    within PCK@``alpha`` (bbox threshold) of the ground truth, red otherwise."""

    def __init__(self, num_pairs: int = 4, alpha: float = 0.1) -> None:
        self.num_pairs = num_pairs
        self.alpha = alpha
        self._pictures: list[np.ndarray] = []

    def on_validation_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._pictures = []

    def on_validation_batch_end(
        self, trainer, pl_module, outputs: Any, batch: dict, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        if trainer.sanity_checking or not isinstance(outputs, dict):
            return
        for i, pred in enumerate(outputs["preds"]):
            if len(self._pictures) < self.num_pairs:
                self._pictures.append(_match_picture(_pair_item(batch, i), pred, self.alpha))

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        writer = _tensorboard(trainer)
        if writer is None or not trainer.is_global_zero:
            return
        for i, picture in enumerate(self._pictures):
            writer.add_image(f"val/matches_{i}", picture, trainer.global_step, dataformats="HWC")


class BestValidationPCK(Callback):
    """The best of a fit's validations, each PCK maximised on its own: how the content-shift
    paper's released code reports its SPair figure (task-corres.py keeps the largest image and
    bbox PCK over its validations, which may come from different steps).

    Logged as ``val_best/<key>`` after every validation, written to ``val_best_pck.txt`` in the
    run folder at the end of the fit, kept in checkpoints (a resumed fit continues the count).
    A maximum over validations is a model-selection number on the validation pairs, not a test
    result: report ``csdiff test`` beside it.
    """

    KEYS = ("pck_img_point", "pck_bbox_point", "pck_img_image", "pck_bbox_image")

    def __init__(self) -> None:
        self.best: dict[str, tuple[float, int]] = {}  # key -> (value, global step)
        self.validations = 0

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.sanity_checking:
            return
        metrics = trainer.callback_metrics
        found = {key: float(metrics[f"val/{key}"]) for key in self.KEYS if f"val/{key}" in metrics}
        if not found:
            return
        self.validations += 1
        for key, value in found.items():
            if not math.isnan(value) and (key not in self.best or value > self.best[key][0]):
                self.best[key] = (value, trainer.global_step)
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics(
                    {f"val_best/{key}": value for key, (value, _) in self.best.items()}, step=trainer.global_step
                )

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not self.best:
            return
        log_dir = trainer.log_dir  # a broadcast under DDP: every rank must ask
        if trainer.is_global_zero:
            print(self.summary())
            if log_dir:
                save_text(Path(log_dir) / "val_best_pck.txt", self.summary() + "\n")

    def summary(self) -> str:
        """One line per PCK: its best value (percent) and the step of that validation."""
        head = f"best of {self.validations} validations, each PCK on its own (validation pairs, not test):"
        return "\n".join(
            [head, *(f"  {key}: {100 * value:.2f} (step {step})" for key, (value, step) in self.best.items())]
        )

    def state_dict(self) -> dict[str, Any]:
        return {"best": {key: list(entry) for key, entry in self.best.items()}, "validations": self.validations}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.best = {key: (float(value), int(step)) for key, (value, step) in state_dict["best"].items()}
        self.validations = int(state_dict["validations"])


class CorrespondencePredictionWriter(BasePredictionWriter):
    """Writes ``keypoints/<pair>.json`` (source, predicted and, when known, ground-truth target
    keypoints as (x, y) in original pixels) and, with ``pictures``, ``matches/<pair>.jpg``.
    Every file is written atomically."""

    def __init__(self, output_dir: str = "predictions", pictures: bool = True, alpha: float = 0.1) -> None:
        super().__init__(write_interval="batch")
        self.output_dir = Path(output_dir)
        self.pictures = pictures
        self.alpha = alpha

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
            record = {
                "pair": item["name"],
                "category": item["category"],
                "source": item["src_path"],
                "target": item["trg_path"],
                "source_points": np.asarray(item["src_kps"], np.float64).tolist(),
                "predicted_target_points": item["pred_kps"].double().tolist(),
                "target_size_hw": [int(v) for v in item["trg_size"]],
            }
            if "trg_kps" in item:
                record["target_points"] = np.asarray(item["trg_kps"], np.float64).tolist()
            name = str(item["name"]).replace("/", "_").replace(":", "_")
            text = json.dumps(record, indent=1)
            atomic_write(self.output_dir / "keypoints" / f"{name}.json", lambda tmp: tmp.write_text(text))
            if self.pictures:
                save_image(
                    self.output_dir / "matches" / f"{name}.jpg", _match_picture(item, item["pred_kps"], self.alpha)
                )
