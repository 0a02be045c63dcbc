"""Semantic segmentation on gated diffusion features (ADE20K, Cityscapes, the quickstart)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from torch import Tensor

from csdiff.backbone import DiffusionFeatureExtractor, FeatureCache
from csdiff.io import save_text
from csdiff.metrics import SegmentationMetrics, format_iou_table
from csdiff.models import FCNHead, GatedFusion, SegmentationLoss, UPerHead
from csdiff.tasks.checkpoints import FrozenBackboneCheckpointMixin
from csdiff.tasks.options import BackboneOptions, GateOptions, VariantOptions
from csdiff.tasks.seeding import StepSeededMixin
from csdiff.tasks.slide import slide_logits

PAPER_LAYERS = ["up-level0-upsampler-out", "up-level1-upsampler-out", "up-level2-upsampler-out"]


class SegmentationTask(StepSeededMixin, FrozenBackboneCheckpointMixin, LightningModule):
    """Frozen guided extractor → gate → UPerHead (+ FCN auxiliary head); CE + Lovasz.

    Validation and test use slide inference on the (dataset-resized) image, resize the
    logits to the original label size and accumulate intersection/union over the split.

    Args:
        num_classes: classes of the dataset (must match the datamodule's).
        backbone: extractor options (model, img_size, timestep, ...).
        variants: one dict per variant (name, prompt, seed, loras, controlnets, denoise_from).
        layers: activation names; any order (they are sorted fine to coarse for the head).
        gate: GatedFusion options.
        head_channels: UPerHead's channels.
        pool_scales: UPerHead's pyramid pooling scales.
        dropout: UPerHead's dropout before the classifier.
        aux_weight: FCN auxiliary head loss weight (0 = no auxiliary head), on ``aux_level``
            (index in fine-to-coarse order).
        lr: AdamW's initial learning rate.
        weight_decay: AdamW's weight decay.
        poly_power: power of the per-iteration poly schedule.
        min_lr: the rate the poly schedule ends at.
        train_noise: ``seeded`` (each variant's fixed noise map) or ``fresh`` noise per
            image and step (augmentation).
        slide_crop: window size of sliding-window inference on evaluation images.
        slide_stride: stride of those windows.
        feature_cache: a folder: evaluation features (seeded, deterministic) are computed once
            per image and window and read back by later validations, tests and predictions.
    """

    def __init__(
        self,
        num_classes: int,
        backbone: BackboneOptions | None = None,
        variants: list[VariantOptions] | None = None,
        layers: list[str] | None = None,
        gate: GateOptions | None = None,
        head_channels: int = 512,
        pool_scales: list[int] | None = None,
        dropout: float = 0.1,
        aux_weight: float = 0.4,
        aux_level: int = 1,
        aux_channels: int = 256,
        ce_weight: float = 1.0,
        lovasz_weight: float = 1.0,
        lr: float = 1.6e-4,
        weight_decay: float = 1e-3,
        poly_power: float = 0.9,
        min_lr: float = 1e-4,
        train_noise: Literal["seeded", "fresh"] = "seeded",
        slide_crop: int = 512,
        slide_stride: int = 512,
        feature_cache: str | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(
            ignore=["feature_cache"]
        )  # where features are cached is no property of the weights: --ckpt_path keeps the config's
        backbone = dict(backbone or {})
        if "fresh_noise" in backbone:  # set at every step from train_noise: a backbone value would be overwritten
            raise ValueError(
                "SegmentationTask sets fresh noise itself: use model.init_args.train_noise (fresh or fixed) instead of backbone.fresh_noise"
            )
        variants = [dict(v) for v in (variants or [{"name": "plain"}])]
        layers = list(layers or PAPER_LAYERS)
        self.extractor = DiffusionFeatureExtractor(layers=layers, variants=variants, **backbone)
        shapes = self.extractor.feature_shapes()
        # UPerHead wants levels fine to coarse; configs may list them in any order.
        self.levels = sorted(self.extractor.layers, key=lambda name: -shapes[name][1])
        channels = [shapes[name][0] for name in self.levels]
        self.variant_names = [v.name for v in self.extractor.variants]
        self.gate = GatedFusion(channels, len(self.variant_names), **dict(gate or {}))
        self.head = UPerHead(channels, num_classes, head_channels, pool_scales or (1, 2, 3, 6), dropout)
        if aux_weight > 0 and not 0 <= aux_level < len(channels):
            raise ValueError(f"aux_level={aux_level} but there are only {len(channels)} levels")
        self.aux_head = FCNHead(channels[aux_level], num_classes, aux_channels) if aux_weight > 0 else None
        self.criterion = SegmentationLoss(ce_weight, lovasz_weight)
        self.val_metrics = SegmentationMetrics(num_classes)
        self.test_metrics = SegmentationMetrics(num_classes)
        self.num_classes = num_classes
        self.cache = FeatureCache(feature_cache) if feature_cache else None
        self.class_names = [str(i) for i in range(num_classes)]
        self.palette = np.array(
            [[(37 * i) % 256, (91 * i) % 256, (173 * i) % 256] for i in range(num_classes)], np.uint8
        )

    # --- wiring with the datamodule ---
    def setup(self, stage: str) -> None:
        dm = getattr(self.trainer, "datamodule", None)
        if dm is None:
            return
        if getattr(dm, "num_classes", self.num_classes) != self.num_classes:
            raise ValueError(
                f"the model is configured for num_classes={self.num_classes} but the datamodule "
                f"{type(dm).__name__} has {dm.num_classes}: set `model.init_args.num_classes: {dm.num_classes}`"
            )
        if hasattr(dm, "class_names"):
            self.class_names = list(dm.class_names)
        if hasattr(dm, "palette"):
            self.palette = np.array(dm.palette, dtype=np.uint8)

    # --- model ---
    def features(
        self, images: Tensor, paths: list[str] | None = None, transforms: list[str] | None = None
    ) -> list[list[Tensor]]:
        """Per variant, per level (fine to coarse) float32 maps.

        Evaluation crops named by their image ``paths`` and ``transforms`` (resized size and
        window) are read from the feature cache when there is one."""
        self.extractor.fresh_noise = self.training and self.hparams.train_noise == "fresh"
        if self.cache is not None and paths is not None and not self.training:
            feats = self.cache.features(self.extractor, images, paths, transforms)
        else:
            feats = self.extractor(images)
        return [[feats[v][name].float() for name in self.levels] for v in self.variant_names]

    def forward(
        self, images: Tensor, paths: list[str] | None = None, transforms: list[str] | None = None
    ) -> tuple[Tensor, Tensor | None, Any]:
        fused = self.gate(self.features(images, paths, transforms))
        logits = self.head(fused.features)
        aux = self.aux_head(fused.features[self.hparams.aux_level]) if self.aux_head is not None else None
        return logits, aux, fused

    # --- training ---
    def training_step(self, batch: dict, batch_idx: int) -> dict:
        logits, aux, fused = self(batch["image"])
        labels = batch["label"]
        seg = self.criterion(logits, labels)
        loss = seg + fused.loss
        logs = {"train/loss_seg": seg, "train/loss_gate": fused.loss}
        if aux is not None:
            aux_loss = self.criterion(aux, labels)
            loss = loss + self.hparams.aux_weight * aux_loss
            logs["train/loss_aux"] = aux_loss
        logs["train/loss"] = loss
        for level, weights in zip(self.levels, fused.weights):
            for v, name in enumerate(self.variant_names):
                logs[f"gate/{level}/{name}"] = weights[v].mean()
        self.log_dict(logs, batch_size=labels.shape[0], prog_bar=False)
        self.log("loss", loss, prog_bar=True, logger=False, batch_size=labels.shape[0])
        return {"loss": loss, "gate_weights": [w.detach() for w in fused.weights]}

    def on_train_epoch_start(self) -> None:
        """Select this epoch's data order and augmentations (a function of (seed, epoch))."""
        dm = getattr(self.trainer, "datamodule", None)
        if callable(getattr(dm, "set_epoch", None)):
            dm.set_epoch(self.current_epoch)  # DDP wrappers may hide the sampler's own set_epoch

    def configure_optimizers(self) -> dict:
        opt = torch.optim.AdamW(self.task_parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)
        lr, min_lr, power = self.hparams.lr, self.hparams.min_lr, self.hparams.poly_power
        total: list[int] = []  # asked at the first step, not here: see poly

        def poly(step: int) -> float:
            # Counting the steps here would make Lightning build the train loader's first iterator
            # before it restores a resumed fit (with workers: the wrong epoch, from its start).
            if step == 0:
                return 1.0
            if not total:
                total.append(max(1, int(self.trainer.estimated_stepping_batches)))
            return ((lr - min_lr) * (1 - min(step, total[0]) / total[0]) ** power + min_lr) / lr

        sched = torch.optim.lr_scheduler.LambdaLR(opt, poly)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    # --- evaluation ---
    def predict_image(self, image: Tensor, out_size: tuple[int, int], path: str | None = None) -> Tensor:
        """Slide inference on one (3,H,W) image; returns class ids (h, w) at ``out_size``.

        With the image file's ``path``, each window's features go through the feature cache
        (when configured), keyed by the evaluation size and the window."""
        size = "{}x{}".format(*image.shape[-2:])

        def predict(crops: Tensor, boxes: list[tuple[int, int, int, int]]) -> Tensor:
            transforms = [f"eval={size} window={y},{x},{h},{w}" for y, x, h, w in boxes]
            return self.forward(crops, None if path is None else [path] * len(boxes), transforms)[0]

        logits = slide_logits(
            predict, image[None], self.num_classes, self.hparams.slide_crop, self.hparams.slide_stride
        )
        logits = F.interpolate(logits, size=tuple(out_size), mode="bilinear", align_corners=False)
        return logits.argmax(1)[0]

    def _evaluate(self, batch: dict, metrics: SegmentationMetrics) -> list[Tensor]:
        preds = []
        for image, label, path in zip(batch["image"], batch["label"], batch["path"]):
            pred = self.predict_image(image, label.shape[-2:], path)
            metrics.update(pred, label)
            preds.append(pred)
        return preds

    def validation_step(self, batch: dict, batch_idx: int) -> dict:
        return {"preds": self._evaluate(batch, self.val_metrics)}

    def test_step(self, batch: dict, batch_idx: int) -> dict:
        return {"preds": self._evaluate(batch, self.test_metrics)}

    def _log_metrics(self, prefix: str, metrics: SegmentationMetrics) -> dict:
        scores = metrics.compute()  # torchmetrics sums the confusion matrices of all ranks here
        # Every rank now holds the same values; "max" over ranks keeps them exactly (a mean
        # could round) and tells Lightning they are already dataset-level.
        for k in ("mIoU", "aAcc", "mAcc"):  # mIoU also on the progress bar, so a fit ends showing it
            self.log(f"{prefix}/{k}", scores[k], sync_dist=True, reduce_fx="max", prog_bar=k == "mIoU")
        metrics.reset()
        return scores

    def on_validation_epoch_end(self) -> None:
        self._log_metrics("val", self.val_metrics)

    def on_test_epoch_end(self) -> None:
        scores = self._log_metrics("test", self.test_metrics)
        table = format_iou_table(scores["IoU"].cpu(), self.class_names)
        log_dir = self.trainer.log_dir  # a broadcast under DDP: every rank must ask
        if self.trainer.is_global_zero:
            print(table)
            if log_dir:
                save_text(Path(log_dir) / "test_per_class_iou.txt", table + "\n")

    # --- prediction ---
    def predict_step(self, batch: dict, batch_idx: int) -> list[dict]:
        """Class-id maps at each image's original size (written by ``SegmentationPredictionWriter``)."""
        out = []
        for image, path, size in zip(batch["image"], batch["path"], batch["orig_size"]):
            pred = self.predict_image(image, tuple(int(s) for s in size), path)
            out.append({"path": path, "pred": pred.cpu().numpy().astype(np.uint8), "image": image.cpu()})
        return out
