"""`csdiff assess`: does a technique suppress content shift? The GATE guideline as one command.

Per image of a folder (or of a config's datamodule split) and per variant of a task config:

* **qualitative**: img2img at ``strength`` with no technique (the reference) and with each
  variant's guidance (``csdiff.backbone.img2img``), decoded, in one labelled grid per image with
  each reconstruction's PSNR and SSIM to the input;
* **quantitative**: the GATE score of each variant's features per layer
  (``csdiff.assess.gate_score``): their Laplacian contours against the clean t = 0 features of
  the same model, relative to an anchor with stronger shift (no technique at a larger
  timestep). 1 = the clean image's contours, 0 = as shifted as the anchor.

The scores are averaged over images with a seeded 95 % bootstrap interval; each variant's
difference to "no technique" at the same timestep (paired by image) gives its verdict: helps,
no clear effect, or hurts. Per-image results are written as they come, so a killed run
continues where it stopped.
"""

from __future__ import annotations

import csv
import inspect
import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.utilities import rank_zero_only
from torch.utils.data import DataLoader

from csdiff.assess.gate_score import (
    bootstrap_mean_interval,
    contour_difference,
    gate_score,
    paired_bootstrap_difference,
    verdict,
)
from csdiff.backbone.img2img import NO_TECHNIQUE, reconstruct
from csdiff.backbone.variants import Variant
from csdiff.data.samplers import ShardedEvalSampler
from csdiff.io import save_text
from csdiff.visualize.features import HEADER, PAD, draw_label
from csdiff.visualize.overlays import image_to_rgb

REFERENCE = "t=0"
MIN_IMAGES = 3  # below this a bootstrap interval says nothing: no verdict
CAPTION = 16


def anchor_name(timestep: int) -> str:
    return f"anchor t={timestep}"


def default_anchor_timestep(timestep: int) -> int:
    """Three times the assessed timestep, at least 100 above it, at most 999: a plain feature
    with clearly more content shift (csdiff's choice; the paper names none)."""
    return min(999, max(3 * timestep, timestep + 100))


def split_images(datamodule: Any, split: str) -> list[str]:
    """The image files of a datamodule's split: segmentation samples, SPair pairs' source and
    target images, or a label-scarce dataset's images (generated first where a datamodule makes its data)."""
    datamodule.prepare_data()
    if hasattr(datamodule, "split_samples"):
        return [image for image, _ in datamodule.split_samples(split)]
    if hasattr(datamodule, "split_pairs"):
        return sorted({path for pair in datamodule.split_pairs(split) for path in (pair.src_path, pair.trg_path)})
    if hasattr(datamodule, "feature_images"):
        return [path for _, path in datamodule.feature_images()]
    raise ValueError(f"{type(datamodule).__name__} does not list its images: give --images FOLDER")


class AssessmentModule(LightningModule):
    """One image per predict step: its features at t, t = 0 and the anchor's timestep, the GATE
    scores, the img2img reconstructions and their grid, written as ``images/<name>.json`` and
    ``grids/<name>.png``. Images whose record exists (for that very file) are skipped: resume.
    ``baselines``: no-technique variants of the other noise seeds, scored but not drawn."""

    def __init__(
        self,
        extractor,
        assessed: list[Variant],
        baselines: list[Variant],
        anchor_timestep: int,
        dataset,
        names: dict[str, str],
        output: Path,
        save,
        strength: float,
        steps: int,
        seed: int,
        cell: int,
    ) -> None:
        super().__init__()
        self.extractor = extractor  # a module: moved to the device by Lightning
        self.assessed, self.baselines, self.anchor_timestep = assessed, baselines, anchor_timestep
        self.dataset, self.names, self.output, self.save = dataset, names, output, save
        self.strength, self.steps, self.seed, self.cell = strength, steps, seed, cell

    def predict_dataloader(self) -> DataLoader:
        return DataLoader(self.dataset, batch_size=1, sampler=ShardedEvalSampler(self.dataset), collate_fn=_single)

    def record_path(self, name: str) -> Path:
        return self.output / "images" / f"{name}.json"

    def predict_step(self, item: dict[str, Any], batch_idx: int) -> None:
        name = self.names[item["path"]]
        record = self.record_path(name)
        if record.is_file() and json.loads(record.read_text()).get("image") == item["path"]:
            return  # assessed by an earlier run with these settings
        image = self.extractor.resize(item["image"][None].to(self.device))
        record = {"image": item["path"], **self.scores(image)}
        pictures, quality = self.reconstructions(image)
        record["psnr"], record["ssim"] = quality
        self.save(f"grids/{name}", self.grid(image[0].cpu(), pictures, quality))
        save_text(self.record_path(name), json.dumps(record, indent=1) + "\n")  # last: marks the image done

    def scores(self, image: torch.Tensor) -> dict[str, Any]:
        """Contour differences to the t = 0 features and GATE scores, per variant and layer."""
        ex = self.extractor
        names = [v.name for v in [*self.assessed, *self.baselines]]
        features = ex(image, variants=names)
        with ex.at_timestep(0, noise=False):
            reference = ex(image, variants=[REFERENCE])[REFERENCE]
        anchor = anchor_name(self.anchor_timestep)
        with ex.at_timestep(self.anchor_timestep):
            features[anchor] = ex(image, variants=[anchor])[anchor]
        diff = {
            variant: {layer: contour_difference(reference[layer], x).item() for layer, x in maps.items()}
            for variant, maps in features.items()
        }
        score = {
            variant: {
                layer: gate_score(torch.tensor(d), torch.tensor(diff[anchor][layer])).item()
                for layer, d in maps.items()
            }
            for variant, maps in diff.items()
            if variant != anchor
        }
        return {"diff": diff, "score": score}

    def reconstructions(self, image: torch.Tensor) -> tuple[list[tuple[str, torch.Tensor]], tuple[dict, dict]]:
        """img2img with no technique and with each assessed variant; PSNR (dB) and SSIM to the input."""
        from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

        target = (image.float() * 0.5 + 0.5).clamp(0, 1)
        pictures, psnr, ssim = [], {}, {}
        for variant in self.assessed:
            picture = reconstruct(self.extractor, image, variant, self.strength, self.steps, self.seed)
            picture01 = picture * 0.5 + 0.5
            psnr[variant.name] = peak_signal_noise_ratio(picture01, target, data_range=1.0).item()
            ssim[variant.name] = structural_similarity_index_measure(picture01, target, data_range=1.0).item()
            pictures.append((variant.name, picture[0].cpu()))
        return pictures, (psnr, ssim)

    def grid(self, image: torch.Tensor, pictures: list[tuple[str, torch.Tensor]], quality: tuple[dict, dict]):
        """input | no technique | each variant, captioned with PSNR and SSIM to the input."""
        cell, (psnr, ssim) = self.cell, quality
        columns = [("input", image), *pictures]
        canvas = np.full((HEADER + cell + CAPTION + PAD, len(columns) * (cell + PAD) + PAD, 3), 255, np.uint8)
        for j, (title, picture) in enumerate(columns):
            x = PAD + j * (cell + PAD)
            draw_label(canvas, title, x, HEADER - 5, cell)
            canvas[HEADER : HEADER + cell, x : x + cell] = image_to_rgb(picture, (cell, cell))
            if title in psnr:
                draw_label(
                    canvas, f"{psnr[title]:.1f} dB, SSIM {ssim[title]:.2f}", x, HEADER + cell + CAPTION - 4, cell
                )
        return canvas


def _single(items: list[dict[str, Any]]) -> dict[str, Any]:
    return items[0]


# --- the summary ----------------------------------------------------------------------------
def baseline_name(seed: int, main_seed: int) -> str:
    """The no-technique variant that shares a variant's noise seed (its fair comparison)."""
    return NO_TECHNIQUE.name if seed == main_seed else f"{NO_TECHNIQUE.name}, seed {seed}"


def summarize(records: list[dict], baselines: dict[str, str], level: float, resamples: int, seed: int) -> list[dict]:
    """One row per (variant, layer) and per variant over all layers (``layer`` "all"): mean
    score with its bootstrap interval, the paired difference to the no-technique variant of the
    same noise seed (``baselines``: variant → its baseline; a baseline maps to itself) with its
    interval and verdict, mean PSNR and SSIM. Ranked by the mean score over all layers. Scores
    that are undefined (an anchor equal to the reference) are left out and not counted."""
    layers = list(records[0]["score"][next(iter(baselines))])
    rows = []

    def per_image(variant: str, layer: str) -> np.ndarray:
        if layer == "all":
            scores = np.array([[r["score"][variant][k] for k in layers] for r in records], dtype=float)
            with np.errstate(all="ignore"):
                return np.array([np.nanmean(s) if np.isfinite(s).any() else np.nan for s in scores])
        return np.array([r["score"][variant][layer] for r in records], dtype=float)

    def interval(fn, *values) -> tuple[float, float, float]:
        try:
            return fn(*values, level, resamples, seed)
        except ValueError:  # no finite value at all
            return (float("nan"),) * 3

    for variant, baseline in baselines.items():
        for layer in ["all", *layers]:
            values = per_image(variant, layer)
            mean, low, high = interval(bootstrap_mean_interval, values)
            row = dict(variant=variant, layer=layer, score=mean, low=low, high=high)
            row["images"] = int(np.isfinite(values).sum())
            if variant != baseline:
                delta, d_low, d_high = interval(paired_bootstrap_difference, values, per_image(baseline, layer))
                paired = int((np.isfinite(values) & np.isfinite(per_image(baseline, layer))).sum())
                words = "undefined" if not np.isfinite(d_low) else verdict(d_low, d_high)
                words = f"too few images ({paired})" if 0 < paired < MIN_IMAGES else words
                row.update(delta=delta, delta_low=d_low, delta_high=d_high, verdict=words, baseline=baseline)
            else:
                row.update(delta=0.0, delta_low=0.0, delta_high=0.0, verdict="reference", baseline=baseline)
            quality = [(r["psnr"].get(variant), r["ssim"].get(variant)) for r in records]
            row["psnr"] = float(np.mean([q[0] for q in quality])) if quality[0][0] is not None else float("nan")
            row["ssim"] = float(np.mean([q[1] for q in quality])) if quality[0][1] is not None else float("nan")
            rows.append(row)
    order = {r["variant"]: -r["score"] if np.isfinite(r["score"]) else np.inf for r in rows if r["layer"] == "all"}
    return sorted(rows, key=lambda r: (order[r["variant"]], r["layer"] != "all", r["layer"]))


def write_summary(output: Path, rows: list[dict], settings: dict) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    save_text(output / "gate_scores.csv", buffer.getvalue())
    save_text(output / "gate_scores.json", json.dumps({"settings": settings, "rows": rows}, indent=1) + "\n")


def print_summary(rows: list[dict], level: float, anchor: str) -> None:
    """The ranked table (all layers) and one verdict line per variant."""
    from rich.console import Console
    from rich.table import Table

    pct = f"{level:.0%}"
    table = Table(title=f"GATE score (1 = the clean t=0 contours, 0 = {anchor}), mean over images and layers")
    for column in ("variant", "score", f"{pct} interval", "vs no technique", f"{pct} interval", "PSNR", "SSIM"):
        table.add_column(column, justify="left" if column == "variant" else "right")
    overall = [r for r in rows if r["layer"] == "all"]
    for r in overall:
        table.add_row(
            r["variant"],
            f"{r['score']:.3f}",
            f"[{r['low']:.3f}, {r['high']:.3f}]",
            f"{r['delta']:+.3f}" if r["verdict"] != "reference" else "",
            f"[{r['delta_low']:+.3f}, {r['delta_high']:+.3f}]" if r["verdict"] != "reference" else "",
            f"{r['psnr']:.1f} dB" if np.isfinite(r["psnr"]) else "—",
            f"{r['ssim']:.3f}" if np.isfinite(r["ssim"]) else "—",
        )
    console = Console(width=120)
    console.print(table)
    for r in overall:
        if r["verdict"] != "reference":
            layers = ", ".join(
                f"{x['layer']} {x['verdict']}" for x in rows if x["variant"] == r["variant"] and x["layer"] != "all"
            )
            console.print(
                f"{r['variant']}: {r['verdict']} (score {r['delta']:+.3f} vs {r['baseline']}, {pct} interval "
                f"[{r['delta_low']:+.3f}, {r['delta_high']:+.3f}] over {r['images']} images; per layer: {layers})",
                highlight=False,
                soft_wrap=True,
            )


# --- the command ----------------------------------------------------------------------------
def run_assess(argv: list[str]) -> int:
    """Assess a config's variants on images: img2img grids and GATE scores with intervals."""
    from lightning.pytorch import LightningDataModule, Trainer

    from csdiff.backbone import DiffusionFeatureExtractor
    from csdiff.backbone.variants import as_variant
    from csdiff.cli import _parser, config_extractor_options, device_options
    from csdiff.data.reading import DataError, output_names
    from csdiff.data.segmentation import ImageFolderDataset
    from csdiff.resume import StopPredicting
    from csdiff.visualize.features import PictureSaver

    parser = _parser(
        "assess", "Does each variant suppress content shift? img2img grids and GATE scores with intervals."
    )
    parser.add_subclass_arguments(
        LightningModule, "model", required=False, instantiate=False, help="a task whose backbone and variants to assess"
    )
    parser.add_subclass_arguments(
        LightningDataModule, "data", required=False, help="a datamodule whose --split images to assess (no --images)"
    )
    parser.add_class_arguments(Trainer, "trainer", instantiate=False)
    parser.add_argument(
        "--seed_everything", type=bool | int | None, default=None, help="read from task configs; unused"
    )
    parser.add_argument("--ckpt_path", type=str | None, default=None, help="read from task configs; unused")
    parser.add_argument("--images", type=str | None, default=None, help="an image file or a folder of images")
    parser.add_argument("--split", type=str, default="val", help="without --images: the config datamodule's split")
    parser.add_argument("--output", type=str, help="folder for grids, per-image records and the score tables")
    parser.add_argument("--limit", type=int | None, default=None, help="the first N images (sorted by path)")
    parser.add_argument("--variants", type=list[str] | None, default=None, help="assess these variants (default: all)")
    parser.add_argument(
        "--layers", type=list[str] | None, default=None, help="score these layers (default: the config's)"
    )
    parser.add_argument("--strength", type=float, default=0.6, help="img2img strength: the share of the chain noised")
    parser.add_argument("--steps", type=int, default=50, help="DDIM steps of a full img2img chain")
    parser.add_argument(
        "--anchor_timestep", type=int | None, default=None, help="the anchor's timestep (default: 3 t, ≤ 999)"
    )
    parser.add_argument("--anchor_prompt", type=str, default="", help="the anchor's prompt (default: none)")
    parser.add_argument("--seed", type=int, default=0, help="noise of the reconstructions, the anchor, no technique")
    parser.add_argument("--resamples", type=int, default=2000, help="bootstrap resamples of the image means")
    parser.add_argument("--level", type=float, default=0.95, help="the intervals' coverage")
    parser.add_argument("--cell", type=int, default=128, help="side of each picture in the grids")
    parser.add_argument("--device", type=str | None, default=None, help="shorthand for one device, e.g. cuda:1")
    parser.add_argument("--tensorboard", type=bool, default=False, help="also log the grids to <output>/tensorboard")
    parser.add_argument("--overwrite", type=bool, default=False, help="start over where settings changed")
    cfg = parser.parse_args(argv)
    if not cfg.output:
        raise ValueError("give --output FOLDER")
    checks = [
        (0 < cfg.strength <= 1, f"--strength must be in (0, 1], got {cfg.strength}"),
        (cfg.steps >= 1 and int(cfg.steps * cfg.strength) >= 1, "--steps × --strength must leave at least one step"),
        (0 < cfg.level < 1, f"--level must be in (0, 1), got {cfg.level}"),
        (cfg.resamples >= 1, f"--resamples must be positive, got {cfg.resamples}"),
        (cfg.limit is None or cfg.limit >= 1, f"--limit must be positive, got {cfg.limit}"),
        (cfg.anchor_timestep is None or 0 < cfg.anchor_timestep < 1000, "--anchor_timestep must be in (0, 1000)"),
        ("{" not in cfg.anchor_prompt, "--anchor_prompt cannot have {fields}: a folder of images cannot fill them"),
    ]
    for ok, message in checks:
        if not ok:
            raise ValueError(message)
    if cfg.model is None:
        raise ValueError("give --config with a model section (a task config): its backbone and variants are assessed")
    if cfg.layers:  # given here, a config need not name any
        cfg.model.init_args.layers = cfg.layers
    options = dict(config_extractor_options(cfg.model, "give a task config"), fresh_noise=False, vae_decoder=True)
    variants = [as_variant(v) for v in options["variants"]]
    known = [v.name for v in variants]
    if cfg.variants is not None:
        unknown = [name for name in cfg.variants if name not in known]
        if unknown:
            raise ValueError(f"unknown variant(s) {unknown}; the config has {known}")
        variants = [v for v in variants if v.name in cfg.variants]
    for v in variants:
        if "{" in v.prompt:
            raise ValueError(f"variant {v.name!r}: its prompt {v.prompt!r} has fields a folder of images cannot fill")
    timestep = options.get("timestep", inspect.signature(DiffusionFeatureExtractor).parameters["timestep"].default)
    anchor_t = default_anchor_timestep(timestep) if cfg.anchor_timestep is None else cfg.anchor_timestep
    if anchor_t <= timestep:
        raise ValueError(f"the anchor's timestep ({anchor_t}) must be above the assessed one ({timestep})")
    # each variant is compared with no technique under its own noise seed (--seed: the main one)
    baselines = {seed: Variant(name=baseline_name(seed, cfg.seed), prompt="", seed=seed) for seed in {cfg.seed}}
    baselines.update({v.seed: Variant(name=baseline_name(v.seed, cfg.seed), prompt="", seed=v.seed) for v in variants})
    own = [
        *baselines.values(),
        Variant(name=REFERENCE, prompt="", seed=cfg.seed),
        Variant(name=anchor_name(anchor_t), prompt=cfg.anchor_prompt, seed=cfg.seed),
    ]
    clash = sorted({v.name for v in own} & set(known))
    if clash:
        raise ValueError(f"variant names {clash} are csdiff assess's own columns: rename them in the config")

    # the images, before any weights are loaded: a bad folder fails at once
    if cfg.images is not None:
        dataset = ImageFolderDataset(cfg.images)
    elif cfg.data is not None:
        datamodule = parser.instantiate_classes(cfg).data
        dataset = ImageFolderDataset.from_paths(split_images(datamodule, cfg.split))
    else:
        raise DataError("nothing to assess: give --images FOLDER, or --config with a data section and --split")
    if cfg.limit is not None:
        dataset.paths = sorted(dataset.paths)[: cfg.limit]
    names = dict(zip(dataset.paths, output_names(dataset.paths, dataset.root), strict=True))
    for index in range(len(dataset)):  # whole and readable, from the header: before hours of work
        dataset.check(index)

    extractor = DiffusionFeatureExtractor(**dict(options, variants=[*variants, *own]))
    small = [f"{name} ({h}x{w})" for name, (_, h, w) in extractor.feature_shapes().items() if min(h, w) < 3]
    if small:
        raise ValueError(
            f"layers {', '.join(small)} are smaller than the 3x3 Laplacian of the GATE score at img_size "
            f"{extractor.img_size}: raise img_size or leave them out with --layers"
        )
    output = Path(cfg.output)
    from csdiff.backbone.extractor import comparable_description

    description = extractor.describe()
    settings = dict(
        features=dict(comparable_description(description), dtype=description["dtype"]),  # weights by content, not path
        variants=[v.name for v in variants],
        strength=cfg.strength,
        steps=cfg.steps,
        seed=cfg.seed,
        anchor_timestep=anchor_t,
        anchor_prompt=cfg.anchor_prompt,
    )
    settings = json.loads(json.dumps(settings))  # as it reads back from disk
    check_settings(output, settings, cfg.overwrite)

    trainer_options = device_options(cfg.trainer, cfg.device)
    save = PictureSaver(str(output), cfg.tensorboard)
    main = baselines[cfg.seed]
    assessed = [main, *variants]
    extra = [b for seed, b in baselines.items() if seed != cfg.seed]
    module = AssessmentModule(
        extractor, assessed, extra, anchor_t, dataset, names, output, save, cfg.strength, cfg.steps, cfg.seed, cfg.cell
    )
    trainer = Trainer(
        **trainer_options,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        use_distributed_sampler=False,
        callbacks=[StopPredicting("run the same command again: images already assessed are kept")],
    )
    trainer.predict(module, return_predictions=False)
    save.close()
    trainer.strategy.barrier()  # every rank's records are written
    if trainer.is_global_zero:
        records = [json.loads(module.record_path(names[p]).read_text()) for p in dataset.paths]
        compared = {b.name: b.name for b in [main, *extra]}
        compared.update({v.name: baselines[v.seed].name for v in variants})
        rows = summarize(records, compared, cfg.level, cfg.resamples, cfg.seed)
        write_summary(output, rows, settings)
        print_summary(rows, cfg.level, anchor_name(anchor_t))
        print(f"wrote {output / 'gate_scores.csv'}, gate_scores.json and {len(records)} grids in {output / 'grids'}")
    return 0


def check_settings(output: Path, settings: dict, overwrite: bool) -> None:
    """Per-image records are kept only for the settings they were computed with: other weights,
    variants, layers, dtype, strength or anchor stop the run with one line per difference (or,
    with ``--overwrite``, start over). Weights are compared by content: the same model from
    another folder is the same."""
    path = output / "settings.json"
    if path.is_file():
        saved = json.loads(path.read_text())
        records = list((output / "images").rglob("*.json"))
        if saved != settings and records:
            if not overwrite:
                lines = _differences(saved, settings) or ["the settings file differs"]
                raise ValueError(
                    f"{output} holds an assessment made with other settings — {'; '.join(lines)}: "
                    "give another --output, or --overwrite true to start over"
                )
            if rank_zero_only.rank == 0:
                for stale in [*records, *(output / "grids").rglob("*.png"), output / "gate_scores.csv"]:
                    stale.unlink(missing_ok=True)
                (output / "gate_scores.json").unlink(missing_ok=True)
    if rank_zero_only.rank == 0:
        save_text(path, json.dumps(settings, indent=1) + "\n")


def _differences(saved: Any, now: Any, key: str = "") -> list[str]:
    """``key: value (folder) vs value (now)`` for each leaf that differs."""
    if isinstance(saved, dict) and isinstance(now, dict):
        return [
            line
            for k in dict.fromkeys([*saved, *now])
            for line in _differences(saved.get(k), now.get(k), f"{key}.{k}" if key else str(k))
        ]
    return [] if saved == now else [f"{key}: {saved} (folder) vs {now} (now)"]
