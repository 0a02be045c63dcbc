"""Label-scarce segmentation (Horse-21, Bedroom-28): features stored once, pixel MLP ensemble on top."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from lightning.pytorch.utilities import rank_zero_warn
from tqdm import tqdm

from csdiff.backbone import DiffusionFeatureExtractor
from csdiff.backbone.store import FeatureFolder, feature_keys, folder_description
from csdiff.data.reading import read_image
from csdiff.data.transforms import to_tensor
from csdiff.io import save_text
from csdiff.metrics import ScoredClassIoU, format_iou_table
from csdiff.models.pixel import (
    EarlyStopper,
    GateKind,
    PixelEnsemble,
    gate_sparsity_loss,
)
from csdiff.tasks.checkpoints import FrozenBackboneCheckpointMixin
from csdiff.tasks.options import BackboneOptions, VariantOptions
from csdiff.tasks.seeding import StepSeededMixin

PAPER_LAYERS = ["legacy", "up_cross"]
TEST_CHUNK = 4096  # pixels per forward when a per-pixel gate tests an image (~240 MB at 4 × 3674 channels)


class ScarceSegmentationTask(StepSeededMixin, FrozenBackboneCheckpointMixin, LightningModule):
    """Frozen guided extractor → stored native-size features → per-pixel ensemble.

    Before training or testing, the features of every image of the datamodule are made sure
    to be in its feature folder (its manifest checked against this extractor; missing files
    extracted, spread over the ranks). Training follows DDPM-segmentation: each of the
    ``num_members`` members (its own gate + MLP) sees its own shuffled stream of 64-pixel
    batches, reshuffled every epoch, Adam ``lr``, cross-entropy (plus the gate's sparsity
    term), and stops by upstream's rule (from epoch ``stop_after_epoch + 1`` on, ``patience``
    batches without a new best cross-entropy); the fit ends when every member has stopped or at
    ``trainer.max_epochs``. Dropout is reseeded per step, so a resumed fit replays an
    uninterrupted one. Testing votes the members' argmax per pixel at 256² and scores the
    dataset's classes as upstream does (:class:`~csdiff.metrics.ScoredClassIoU`): ``mIoU``
    counts a scored class absent from labels and predictions as 0, ``mIoU_present`` leaves it out.

    Args:
        num_classes: the classifier's outputs (Horse-21: 21; Bedroom-28: 29 with 0 unscored, or
            28 under the datamodule's ``class_rule: paper_code``); must match the datamodule.
        backbone: extractor options (model, img_size, timestep, ...), as in the other tasks.
        variants: one dict per variant (name, prompt, seed, loras, controlnets, denoise_from).
        layers: activation names; the paper: ``legacy`` + ``up_cross`` (3674 channels per
            variant at SD 1.5 widths).
        gate: ``per_pixel``, the paper's (:class:`~csdiff.models.pixel.PixelVariantGate`: each
            pixel weighs the variants per channel), or ``per_channel`` (one weight per variant and
            channel, the same at every pixel; lighter, and tested at native size).
        gate_sparsity: weight ``s`` of the sparsity term (:func:`~csdiff.models.pixel.gate_sparsity_loss`,
            worth ``-s`` × cross-entropy); 0 turns it off. The paper's code random-walks its weight
            from 0 in steps of 1e-5 every 5 batches (clamped at 0), which over a run of ~10^5
            batches drifts to the order of 1e-3; csdiff uses a fixed weight of that order.
        extra_channels: channels of the datamodule's ``extra_features`` (0 without them).
        extract_batch_size: images per backbone call when features are missing.
    """

    def __init__(
        self,
        num_classes: int,
        backbone: BackboneOptions | None = None,
        variants: list[VariantOptions] | None = None,
        layers: list[str] | None = None,
        gate: GateKind = "per_pixel",
        gate_sparsity: float = 1e-3,
        num_members: int = 10,
        lr: float = 1e-3,
        stop_after_epoch: int = 3,
        patience: int = 50,
        extra_channels: int = 0,
        extract_batch_size: int = 1,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        variants = [dict(v) for v in (variants or [{"name": "plain"}])]
        self.extractor = DiffusionFeatureExtractor(
            layers=list(layers or PAPER_LAYERS), variants=variants, **dict(backbone or {})
        )
        shapes = self.extractor.feature_shapes()
        self.channels = sum(shapes[layer][0] for layer in self.extractor.layers)
        self.num_members = num_members
        self.ensemble = PixelEnsemble(
            num_members, len(self.extractor.variants), self.channels, extra_channels, num_classes, gate
        )
        self.stoppers = [EarlyStopper(stop_after_epoch, patience) for _ in range(num_members)]

    # --- features on disk ---
    def _datamodule(self):
        dm = self.trainer.datamodule
        if dm is None or not hasattr(dm, "feature_images"):
            raise ValueError(
                "ScarceSegmentationTask needs a datamodule with a feature folder, e.g. csdiff.data.DDPMSegDataModule"
            )
        if dm.num_classes != self.hparams.num_classes:
            raise ValueError(
                f"the model has num_classes={self.hparams.num_classes} but {dm.spec.name} under class_rule "
                f"{dm.spec.class_rule} has {dm.num_classes} outputs: set `model.init_args.num_classes: {dm.num_classes}`"
            )
        return dm

    def _ensure_features(self) -> None:
        """Check the feature folder against this extractor and extract what is missing (each
        rank its share), so that every later read finds complete, matching files."""
        dm = self._datamodule()
        dm.gated = {"variants": [v.name for v in self.extractor.variants], "layers": list(self.extractor.layers)}
        folder, description = FeatureFolder(dm.features), folder_description(self.extractor)
        items = dm.feature_images()
        strategy, rank, world = self.trainer.strategy, self.trainer.global_rank, self.trainer.world_size
        if rank == 0:
            folder.prepare(description, dict(items))
        strategy.barrier()
        folder.check(description)
        missing = folder.missing(items, feature_keys(description))
        strategy.barrier()  # every rank has listed before any rank writes
        mine = missing[rank::world]
        step = self.hparams.extract_batch_size
        with torch.inference_mode():
            for start in tqdm(
                range(0, len(mine), step), desc=f"extract features (rank {rank})", unit="batch", disable=not mine
            ):
                batch = mine[start : start + step]
                images = torch.cat(
                    [self.extractor.resize(to_tensor(read_image(p))[None].to(self.device)) for _, p in batch]
                )
                features = self.extractor(images)
                for i, (name, _) in enumerate(batch):
                    folder.write(name, {v: {k: x[i] for k, x in layers.items()} for v, layers in features.items()})
        strategy.barrier()
        found = dm.bank([dm.items["train"][0][0]]).extra_channels if dm.extra else 0
        if found != self.hparams.extra_channels:
            raise ValueError(
                f"the datamodule's extra_features ({dm.extra_features}) have {found} channels but the task's "
                f"extra_channels is {self.hparams.extra_channels}; set --model.init_args.extra_channels {found}"
            )

    # --- training ---
    def on_fit_start(self) -> None:
        if self.trainer.world_size > 1:
            raise ValueError(
                "train the pixel ensemble on one device (its MLPs are small); spread the feature extraction over "
                "devices with `csdiff extract --config <this config> --trainer.devices N --trainer.strategy ddp` first"
            )
        self._ensure_features()

    def on_train_start(self) -> None:
        self.trainer.datamodule.train_bank.to(self.device)

    def on_train_epoch_start(self) -> None:
        # The pixel streams are the loader's batch sampler, whose epoch Lightning never sets.
        self.trainer.datamodule.train_sampler.set_epoch(self.current_epoch)

    def on_train_end(self) -> None:
        self.trainer.datamodule.train_bank = None  # the training images' features (GBs at SD size) are done with

    def configure_optimizers(self) -> torch.optim.Optimizer:
        # One Adam over all members is N independent Adams (Adam is per parameter), and a stopped
        # member, no longer run, has no gradients (None), which Adam skips: it stays as it stopped.
        return torch.optim.Adam(self.ensemble.parameters(), lr=self.hparams.lr)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor | None:
        dm = self.trainer.datamodule
        features, extra = dm.train_bank.gather(batch["image"], batch["y"], batch["x"])
        size = dm.batch_size
        losses: dict[int, torch.Tensor] = {}
        regularisers: list[torch.Tensor] = []
        norms: list[torch.Tensor] = []  # mean ||w||_2 over variants: 1 = one variant per channel, 1/sqrt(V) = uniform
        for m, member in enumerate(self.ensemble.members):
            if self.stoppers[m].stopped:
                continue
            rows = slice(m * size, (m + 1) * size)
            logits, weights = member.forward_with_weights(features[rows], None if extra is None else extra[rows])
            losses[m] = F.cross_entropy(logits, batch["label"][rows])
            regularisers.append(gate_sparsity_loss(weights, losses[m]))
            norms.append(weights.detach().norm(dim=1).mean())
        if not losses:
            self.trainer.should_stop = True
            return None
        total = torch.stack(list(losses.values()))
        for m, value in zip(losses, total.tolist()):
            self.stoppers[m].step(self.current_epoch, value)
        active = sum(not s.stopped for s in self.stoppers)
        self.log("train/loss", total.mean(), prog_bar=True)
        self.log("train/active_members", float(active))
        self.log("train/gate_weight_norm", torch.stack(norms).mean())
        if active == 0:
            self.trainer.should_stop = True
        return total.sum() + self.hparams.gate_sparsity * torch.stack(regularisers).sum()

    # --- testing ---
    def on_test_start(self) -> None:
        self._ensure_features()
        dm = self._datamodule()
        self.metric = ScoredClassIoU(dm.spec.scored_classes).to(self.device)
        self.class_names = [dm.spec.class_names[c] for c in dm.spec.scored_classes]

    @torch.no_grad()
    def predict_image(self, bank) -> torch.Tensor:
        """(out_size, out_size) class ids of the one image in ``bank``: majority vote of the members.

        A per-channel gate runs from the native-size maps (:meth:`PixelMember.forward_native`:
        the same logits as per-pixel gathering, without ever holding the upsampled features); a
        per-pixel gate is not linear, so its pixels are gathered, ``TEST_CHUNK`` at a time."""
        bank = bank.to(self.device)
        size = bank.out_size
        if self.ensemble.gate == "per_channel":
            maps, extra = bank.native_maps(0)
            return self.ensemble.majority_vote(self.ensemble.forward_native(maps, extra, size)).view(size, size)
        votes = torch.empty(size * size, dtype=torch.long, device=self.device)
        for flat, gated, extra in bank.gather_image(0, chunk=TEST_CHUNK):
            votes[flat] = self.ensemble.majority_vote(self.ensemble(gated, extra))
        return votes.view(size, size)

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self.metric.update(self.predict_image(batch["bank"]), batch["label"].to(self.device))

    def on_test_epoch_end(self) -> None:
        result = self.metric.compute()
        absent = [name for name, gone in zip(self.class_names, result["absent"].tolist()) if gone]
        if absent:
            rank_zero_warn(
                f"scored classes absent from the test labels and predictions: {', '.join(absent)}; mIoU counts them "
                "as IoU 0, as DDPM-segmentation's compute_iou does; mIoU_present leaves them out"
            )
        self.log("test/mIoU", result["mIoU"], sync_dist=False)
        self.log("test/mIoU_present", result["mIoU_present"], sync_dist=False)
        means = {
            "mIoU (absent = 0, upstream)": float(result["mIoU"]),
            "mIoU (present classes)": float(result["mIoU_present"]),
        }
        table = format_iou_table(result["IoU"].cpu(), self.class_names, means)
        spec = self.trainer.datamodule.spec
        self.test_report = {
            "mIoU": float(result["mIoU"]),
            "mIoU_present": float(result["mIoU_present"]),
            "absent_classes": absent,
            "IoU": {name: float(v) for name, v in zip(self.class_names, result["IoU"].tolist())},
            "split": str(self.trainer.datamodule.split),
            "dataset": spec.name,
            "class_rule": spec.class_rule,
        }
        if self.trainer.is_global_zero:
            print(f"\n{table}")
            log_dir = self.trainer.log_dir
            if log_dir is not None:
                save_text(Path(log_dir) / "scarce_report.json", json.dumps(self.test_report, indent=1) + "\n")
            for logger in self.loggers:
                experiment = getattr(logger, "experiment", None)
                if hasattr(experiment, "add_text"):
                    experiment.add_text("test/IoU", "```\n" + table + "\n```", self.global_step)
        self.metric.reset()

    # --- checkpoints ---
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["csdiff_stoppers"] = [vars(s).copy() for s in self.stoppers]

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        for stopper, state in zip(self.stoppers, checkpoint.get("csdiff_stoppers", [])):
            vars(stopper).update(state)
