"""Semantic correspondence (SPair-71k) on gated diffusion features, trained or zero-shot."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from torch import Tensor

from csdiff.backbone import UP_CROSS, DiffusionFeatureExtractor, FeatureCache, UnknownLayerError
from csdiff.backbone.variants import prompt_fields
from csdiff.io import save_text
from csdiff.metrics import PCK, format_pck_table
from csdiff.models import CorrespondenceHead, info_nce, match_points, rescale_points, sample_features
from csdiff.tasks.checkpoints import FrozenBackboneCheckpointMixin
from csdiff.tasks.options import BackboneOptions, GateOptions, VariantOptions
from csdiff.tasks.seeding import StepSeededMixin

# The 18 SPair-71k categories, in the dataset's order.
SPAIR_CATEGORIES = (
    "aeroplane",
    "bicycle",
    "bird",
    "boat",
    "bottle",
    "bus",
    "car",
    "cat",
    "chair",
    "cow",
    "dog",
    "horse",
    "motorbike",
    "person",
    "pottedplant",
    "sheep",
    "train",
    "tvmonitor",
)
# What a variant's prompt may ask for per pair: "a photo of a {category}" (DIFT's prompt).
PROMPT_FIELDS = ("category",)
UNKNOWN_CATEGORY = "unknown"  # the category of pairs from predict_folders (csdiff.data.spair)


class CorrespondenceTask(StepSeededMixin, FrozenBackboneCheckpointMixin, LightningModule):
    """Frozen extractor → per-variant feature stacks → gate (or mean) + attention → head; PCK.

    Each gated variant's ``layers`` are upsampled to the finest of their grids and
    concatenated (the paper: ``legacy``, 3520 channels at 64² for SD 1.5); the optional
    ``attention_variant`` contributes only ``up_cross`` (154 channels), concatenated after the
    gate, ungated. Training: symmetric InfoNCE between the two images' descriptors at the
    pair's keypoints on the feature grid (cosine similarity / ``temperature``), plus the gate's
    regulariser. Evaluation: nearest neighbour of each source keypoint over the target's
    descriptors upsampled to ``eval_size``² (chunked), mapped back to original target pixels,
    scored by :class:`~csdiff.metrics.PCK` (image and bbox thresholds, per point and per image,
    per category and per SPair difficulty level).

    A variant's prompt may name the pair's ``{category}`` ("a photo of a {category}", as DIFT
    prompts): each pair's images get their category's prompt (embeddings cached per category).

    ``fusion: mean`` with ``head: nn`` has nothing to train: ``csdiff test``/``validate``/
    ``predict`` then run without a checkpoint (zero-shot, as DIFT and CleanDIFT are used).

    With seeded noise (the default) an image's features never change: with ``feature_cache``
    (a folder) they are computed once and read back for training, validation and test alike.
    ``backbone.fresh_noise`` (DIFT's ensemble: fresh noise, and with ``latent: variant_sample``
    a fresh VAE sample, per member and image) and per-category prompts cannot be cached.
    """

    def __init__(
        self,
        backbone: BackboneOptions | None = None,
        variants: list[VariantOptions] | None = None,
        layers: list[str] | None = None,
        attention_variant: VariantOptions | None = None,
        head: Literal["nn", "conv"] = "conv",
        fusion: Literal["gate", "mean"] = "gate",
        gate: GateOptions | None = None,
        temperature: float = 0.07,
        lr: float = 5e-4,
        weight_decay: float = 0.01,
        eval_size: int = 512,
        soft_window: int = 0,
        alphas: list[float] | None = None,
        categories: list[str] | None = None,
        feature_cache: str | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(
            ignore=["feature_cache"]
        )  # where features are cached is no property of the weights: --ckpt_path keeps the config's
        variants = [dict(v) for v in (variants or [{"name": "plain"}])]
        self.variant_names = [v["name"] for v in variants]
        requested = list(layers or ["legacy"])
        if UP_CROSS in requested:
            raise ValueError("up_cross comes from `attention_variant`; leave it out of `layers`")
        self.attention_name = None
        if attention_variant is not None:
            self.attention_name = attention_variant.get("name", "attention")
            variants.append({**attention_variant, "name": self.attention_name})
            requested.append(UP_CROSS)
        _check_prompt_fields(variants, feature_cache, dict(backbone or {}).get("fresh_noise", False))
        self.templated = [v.get("name") for v in variants if prompt_fields(v.get("prompt", ""))]
        try:
            self.extractor = DiffusionFeatureExtractor(layers=requested, variants=variants, **dict(backbone or {}))
        except UnknownLayerError as err:
            if self.attention_name is None or not str(err).startswith("up_cross"):
                raise
            raise UnknownLayerError(
                f"attention_variant adds up_cross, which this backbone lacks ({err}); on a diffusion transformer "
                f"drop attention_variant and add `cross_maps` to `layers` (its image-to-text maps as descriptors)"
            ) from None
        self.layer_names = [
            name for name in self.extractor.layers if name != UP_CROSS
        ]  # named sets expanded for the family
        shapes = self.extractor.feature_shapes()
        self.grid = max(shapes[name][1] for name in self.layer_names)
        channels = sum(shapes[name][0] for name in self.layer_names)
        attention_channels = shapes[UP_CROSS][0] if self.attention_name else 0
        gate_options = {k: v for k, v in dict(gate or {}).items() if k not in ("proj_blocks", "post_blocks")}
        self.head = CorrespondenceHead(
            channels, len(self.variant_names), attention_channels, head, fusion, **gate_options
        )
        self.levels = ["descriptors"]  # one gated level (GateWeightLogger names histograms by it)
        self.categories = list(categories or SPAIR_CATEGORIES)
        self.val_pck = PCK(alphas or [0.1], self.categories)
        self.test_pck = PCK(alphas or [0.1], self.categories)
        self.cache = FeatureCache(feature_cache) if feature_cache else None

    # --- descriptors ---
    def descriptors(
        self, images: Tensor, paths: list[str] | None = None, categories: list[str] | None = None
    ) -> tuple[Tensor, Any]:
        """(B, 3, H, W) in [-1, 1] → dense descriptors (B, C, grid, grid) and the gate's output.

        With a feature cache and the images' ``paths`` the backbone runs only for new images;
        the images' ``categories`` fill ``{category}`` in variant prompts."""
        wanted = {name: self.layer_names for name in self.variant_names}
        if self.attention_name:
            wanted[self.attention_name] = [UP_CROSS]
        if self.cache is not None and paths is not None:
            transform = "squash={}x{}".format(*images.shape[-2:])  # the datamodule squashes every image to this size
            feats = self.cache.features(self.extractor, images, paths, transform, layers=wanted)
        else:
            fields = None if categories is None else [{"category": c} for c in categories]
            if fields is not None and self.templated and UNKNOWN_CATEGORY in categories:
                raise ValueError(
                    f"variants {self.templated} prompt with {{category}}, but pairs from predict_folders have no category: "
                    f"give those variants a prompt without it (e.g. 'a photo')"
                )
            feats = self.extractor(images, layers=wanted, prompt_fields=fields)
        size = (self.grid, self.grid)

        def stack(maps: list[Tensor]) -> Tensor:
            return torch.cat(
                [F.interpolate(m.float(), size=size, mode="bilinear", align_corners=False) for m in maps], 1
            )

        variants = [stack([feats[v][name] for name in self.layer_names]) for v in self.variant_names]
        attention = stack([feats[self.attention_name][UP_CROSS]]) if self.attention_name else None
        return self.head(variants, attention)

    def _pair_descriptors(self, batch: dict) -> tuple[Tensor, Tensor, Any]:
        n = batch["src_image"].shape[0]
        paths = [*batch["src_path"], *batch["trg_path"]]
        images = torch.cat([batch["src_image"], batch["trg_image"]])
        dense, gated = self.descriptors(images, paths, [*batch["category"], *batch["category"]])
        return dense[:n], dense[n:], gated

    def match(self, src: Tensor, trg: Tensor, src_kps: Tensor, src_size, trg_size) -> Tensor:
        """Predicted target keypoints (N, 2) in original target pixels for source keypoints in original source pixels."""
        eval_frame = (self.hparams.eval_size,) * 2
        points = rescale_points(src_kps.float(), src_size, eval_frame)
        matched = match_points(src, trg, points, self.hparams.eval_size, soft_window=self.hparams.soft_window)
        return rescale_points(matched, eval_frame, trg_size)

    # --- training ---
    def training_step(self, batch: dict, batch_idx: int) -> dict:
        src, trg, gated = self._pair_descriptors(batch)
        grid = (self.grid, self.grid)
        losses = []
        for i in range(src.shape[0]):
            p_src = rescale_points(batch["src_kps"][i].float().to(src.device), batch["src_size"][i], grid)
            p_trg = rescale_points(batch["trg_kps"][i].float().to(trg.device), batch["trg_size"][i], grid)
            losses.append(
                info_nce(sample_features(src[i], p_src), sample_features(trg[i], p_trg), self.hparams.temperature)
            )
        match_loss = torch.stack(losses).mean()
        gate_loss = gated.loss if gated is not None else match_loss.new_zeros(())
        loss = match_loss + gate_loss
        n = src.shape[0]
        self.log_dict({"train/loss_match": match_loss, "train/loss_gate": gate_loss, "train/loss": loss}, batch_size=n)
        self.log("loss", loss, prog_bar=True, logger=False, batch_size=n)
        out = {"loss": loss}
        if gated is not None:
            for v, name in enumerate(self.variant_names):
                self.log(f"gate/{name}", gated.weights[0][v].mean(), batch_size=n)
            out["gate_weights"] = [w.detach() for w in gated.weights]
        return out

    def configure_optimizers(self) -> torch.optim.Optimizer:
        params = self.task_parameters()
        if not params:
            raise ValueError(
                "this configuration has nothing to train (fusion: mean, head: nn): it is zero-shot; "
                "run `csdiff test`, `validate` or `predict` without --ckpt_path instead of `fit`"
            )
        return torch.optim.AdamW(params, lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)

    # --- evaluation ---
    def _evaluate(self, batch: dict, metric: PCK) -> list[Tensor]:
        src, trg, _ = self._pair_descriptors(batch)
        preds = []
        for i in range(src.shape[0]):
            pred = self.match(src[i], trg[i], batch["src_kps"][i], batch["src_size"][i], batch["trg_size"][i])
            difficulty = batch["difficulty"][i] if "difficulty" in batch else None
            metric.update(
                pred,
                batch["trg_kps"][i].float().to(pred.device),
                batch["trg_size"][i],
                batch["trg_bbox"][i],
                batch["category"][i],
                difficulty,
            )
            preds.append(pred)
        return preds

    def validation_step(self, batch: dict, batch_idx: int) -> dict:
        return {"preds": self._evaluate(batch, self.val_pck)}

    def test_step(self, batch: dict, batch_idx: int) -> dict:
        return {"preds": self._evaluate(batch, self.test_pck)}

    def _log_pck(self, prefix: str, metric: PCK) -> dict:
        results = metric.compute()  # torchmetrics sums the states of all ranks here
        for key, value in results.items():
            if key.startswith("pck_"):
                self.log(f"{prefix}/{key}", value, sync_dist=True, reduce_fx="max", prog_bar=key == "pck_bbox_point")
        for flag, levels in results["per_difficulty"].items():  # the same on every rank: compute() synced them
            for level, values in levels.items():
                for key in ("pck_img_point", "pck_img_image", "pck_bbox_point", "pck_bbox_image"):
                    self.log(f"{prefix}/{flag}_{level}/{key}", values[key], sync_dist=True, reduce_fx="max")
        metric.reset()
        return results

    def on_validation_epoch_end(self) -> None:
        self._log_pck("val", self.val_pck)

    def on_test_epoch_end(self) -> None:
        results = self._log_pck("test", self.test_pck)
        table = format_pck_table(results, alpha=self.test_pck.alphas[0])
        log_dir = self.trainer.log_dir  # a broadcast under DDP: every rank must ask
        if self.trainer.is_global_zero:
            print(table)
            if log_dir:
                save_text(Path(log_dir) / "test_pck.txt", table + "\n")
            experiment = getattr(self.logger, "experiment", None)
            if callable(getattr(experiment, "add_text", None)):  # TensorBoard: the table under Text
                experiment.add_text("test/pck_table", "    " + table.replace("\n", "\n    "), self.global_step)

    # --- prediction ---
    def predict_step(self, batch: dict, batch_idx: int) -> list[dict]:
        """Predicted target keypoints per pair, in original target pixels (written by ``CorrespondencePredictionWriter``)."""
        src, trg, _ = self._pair_descriptors(batch)
        out = []
        for i in range(src.shape[0]):
            pred = self.match(src[i], trg[i], batch["src_kps"][i], batch["src_size"][i], batch["trg_size"][i])
            item = {
                k: batch[k][i]
                for k in ("name", "category", "src_path", "trg_path", "src_kps", "src_size", "trg_size", "trg_bbox")
            }
            if "trg_kps" in batch:
                item["trg_kps"] = batch["trg_kps"][i]
            out.append({**item, "pred_kps": pred.cpu()})
        return out


def _check_prompt_fields(variants: list[dict], feature_cache: str | None, fresh_noise: bool) -> None:
    """Refuse, before loading any weights, prompt fields the task cannot fill and features the
    cache cannot key: the cache names an image by its file, not by the prompt it was given."""
    for variant in variants:
        unknown = [f for f in prompt_fields(variant.get("prompt", "")) if f not in PROMPT_FIELDS]
        if unknown:
            raise ValueError(
                f"variant {variant.get('name')!r}: prompt fields {unknown} are not known; a pair fills {list(PROMPT_FIELDS)}"
            )
    templated = [v.get("name") for v in variants if prompt_fields(v.get("prompt", ""))]
    if feature_cache and (templated or fresh_noise):
        reason = (
            f"variants {templated} have per-category prompts"
            if templated
            else "backbone.fresh_noise draws new noise on every call"
        )
        raise ValueError(
            f"feature_cache needs features fixed by the image file alone, but {reason}: set feature_cache: null"
        )
