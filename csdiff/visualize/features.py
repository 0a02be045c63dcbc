"""`csdiff visualize`: content shift made visible, one grid picture per image.

Rows are layers; columns the input, the t = 0 reference (clean latent, timestep 0, empty
prompt, no technique) and each variant of the config. All feature columns of a layer share
one PCA basis and colour range (with ``--joint images``, over every image too), so equal
colours mean equal features, and a variant whose picture drifts from the reference column
shows content shift; the number under each cell is its mean cosine distance to the reference.
With ``--words`` or ``--points``, a second picture per image (``<name>.attention.png``) shows
where chosen words of one variant's prompt (cross-attention) or chosen image points
(self-attention) attend, see ``csdiff.visualize.attention``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import cv2
import numpy as np
import torch
from lightning.pytorch import LightningModule
from torch.utils.data import DataLoader

from csdiff.data.samplers import ShardedEvalSampler
from csdiff.io import save_image
from csdiff.resume import StopPredicting
from csdiff.visualize.attention import plan_attention
from csdiff.visualize.gate import gate_picture, gate_weights, load_gated_task
from csdiff.visualize.overlays import image_to_rgb
from csdiff.visualize.pca import PCABasis, cosine_distance, fit_pca

REFERENCE = "t=0"
PAD, HEADER, LABEL, CAPTION = 4, 18, 16, 16  # pixels: gaps, column titles, layer names, distances
_FONT, _SCALE = cv2.FONT_HERSHEY_SIMPLEX, 0.4

Maps = dict[str, torch.Tensor]  # layer → (C, H, W)


def grid_size(n_layers: int, n_columns: int, cell: int) -> tuple[int, int]:
    """(height, width) of a grid with ``n_columns`` pictures per row (input included)."""
    return HEADER + n_layers * (LABEL + cell + CAPTION) + PAD, n_columns * (cell + PAD) + PAD


def draw_label(canvas: np.ndarray, text: str, x: int, y: int, width: int) -> None:
    """Black text with its baseline at ``y``, cut to fit ``width`` (ending in '..')."""
    while text and cv2.getTextSize(text, _FONT, _SCALE, 1)[0][0] > width:
        text = text[:-4] + ".." if len(text) > 3 else ""
    cv2.putText(canvas, text, (x, y), _FONT, _SCALE, (0, 0, 0), 1, cv2.LINE_AA)


def feature_grid(
    image: torch.Tensor, columns: list[tuple[str, Maps]], bases: dict[str, PCABasis], cell: int = 128
) -> np.ndarray:
    """The labelled RGB grid of one image: ``image`` (3, H, W) in [-1, 1]; ``columns`` the
    reference first, then each variant, as (title, maps); ``bases`` one per layer, in row order."""
    layers = list(bases)
    height, width = grid_size(len(layers), len(columns) + 1, cell)
    canvas = np.full((height, width, 3), 255, np.uint8)
    for j, title in enumerate(["input", *(name for name, _ in columns)]):
        draw_label(canvas, title, PAD + j * (cell + PAD), HEADER - 5, cell)
    reference = columns[0][1]
    picture = image_to_rgb(image, (cell, cell))
    for i, layer in enumerate(layers):
        top = HEADER + i * (LABEL + cell + CAPTION)
        shape = "x".join(map(str, reference[layer].shape))
        draw_label(canvas, f"{layer} ({shape})", PAD, top + LABEL - 4, width - 2 * PAD)
        canvas[top + LABEL : top + LABEL + cell, PAD : PAD + cell] = picture
        for j, (_, maps) in enumerate(columns, start=1):
            x = PAD + j * (cell + PAD)
            canvas[top + LABEL : top + LABEL + cell, x : x + cell] = bases[layer].to_rgb(maps[layer], (cell, cell))
            distance = cosine_distance(maps[layer], reference[layer])
            draw_label(canvas, f"cos dist {distance:.3f}", x, top + LABEL + cell + CAPTION - 4, cell)
    return canvas


def attention_grid(pictures: list[tuple[str, np.ndarray]], cell: int = 128) -> np.ndarray:
    """One titled row of (title, RGB ``cell``² picture) cells: the input and its attention maps."""
    canvas = np.full((HEADER + cell + PAD, len(pictures) * (cell + PAD) + PAD, 3), 255, np.uint8)
    for j, (title, picture) in enumerate(pictures):
        x = PAD + j * (cell + PAD)
        draw_label(canvas, title, x, HEADER - 5, cell)
        canvas[HEADER : HEADER + cell, x : x + cell] = picture
    return canvas


def fit_bases(images_columns: list[list[tuple[str, Maps]]]) -> dict[str, PCABasis]:
    """One basis per layer over every column of every given image (pass one image for the
    default per-image joint basis)."""
    layers = list(images_columns[0][0][1])
    return {layer: fit_pca([maps[layer] for columns in images_columns for _, maps in columns]) for layer in layers}


def extractor_options(model: Any) -> dict[str, Any]:
    """Extractor arguments from a `csdiff fit` config's model section (backbone, variants, layers),
    with seeded noise: pictures are reproducible."""
    from csdiff.cli import config_extractor_options

    if model is None:
        raise ValueError(
            "give --config with a model section (a `csdiff fit` config): its backbone, variants and layers are drawn"
        )
    return dict(config_extractor_options(model, "give a task config whose extractor can be drawn"), fresh_noise=False)


def _features(extractor, image: torch.Tensor, layers: dict[str, list[str]] | None = None) -> dict[str, Maps]:
    with torch.no_grad():
        out = extractor(image, layers=layers)
    return {variant: {layer: x[0].cpu() for layer, x in maps.items()} for variant, maps in out.items()}


def run_visualize(argv: list[str]) -> int:
    """Draw one feature grid per image of ``--images`` into ``--output`` (PNG, written atomically).

    ``--config`` takes a `csdiff fit` config: its model's backbone, variants and layers are
    drawn; its other sections are read and ignored. The t=0 reference is a second extractor of
    the same backbone (clean latent, timestep 0, empty prompt), so the backbone is loaded twice.
    """
    from lightning.pytorch import LightningDataModule, Trainer

    from csdiff.backbone import DiffusionFeatureExtractor
    from csdiff.backbone.variants import as_variant
    from csdiff.cli import _parser, device_options
    from csdiff.data.reading import output_names
    from csdiff.data.segmentation import ImageFolderDataset

    parser = _parser(
        "visualize", "Draw PCA pictures of a config's features per layer and variant, beside the t=0 reference."
    )
    parser.add_subclass_arguments(
        LightningModule,
        "model",
        required=False,
        instantiate=False,
        help="a task whose backbone, variants and layers are drawn (from a `csdiff fit` config)",
    )
    parser.add_subclass_arguments(
        LightningDataModule, "data", required=False, instantiate=False, help="read from task configs; unused"
    )
    parser.add_class_arguments(Trainer, "trainer", instantiate=False)
    parser.add_argument(
        "--seed_everything", type=bool | int | None, default=None, help="read from task configs; unused"
    )
    parser.add_argument(
        "--ckpt_path",
        type=str | None,
        default=None,
        help="a checkpoint of the config's task: also draw its learned gate per image (<name>.gate.png)",
    )
    parser.add_argument("--images", type=str, help="an image file or a folder of images")
    parser.add_argument("--output", type=str, help="folder for the grids: <image name>.png")
    parser.add_argument(
        "--joint",
        type=Literal["variants", "images"],
        default="variants",
        help="fit each layer's PCA basis over the variants of one image, or over all images too",
    )
    parser.add_argument(
        "--words", type=list[str], default=[], help="words of a variant's prompt whose cross-attention is drawn"
    )
    parser.add_argument(
        "--points",
        type=list[list[float]],
        default=[],
        help="query points [x, y] (fractions of the image) whose self-attention is drawn",
    )
    parser.add_argument(
        "--attention_variant",
        type=str | None,
        default=None,
        help="the variant of the words and points (default: the first)",
    )
    parser.add_argument(
        "--self_layer",
        type=str | None,
        default=None,
        help="a `-self-map` layer for points (default: the finest of the up-levels)",
    )
    parser.add_argument("--cell", type=int, default=128, help="side of each picture in pixels")
    parser.add_argument(
        "--device",
        type=str | None,
        default=None,
        help="shorthand for one device, e.g. cpu or cuda:1 (else the trainer's devices)",
    )
    parser.add_argument(
        "--tensorboard", type=bool, default=False, help="also log every picture to TensorBoard (<output>/tensorboard)"
    )
    cfg = parser.parse_args(argv)
    if not cfg.images or not cfg.output:
        raise ValueError("give --images (a folder or an image file) and --output (a folder)")
    dataset = ImageFolderDataset(cfg.images)  # before loading any weights: a bad folder fails at once
    names = dict(zip(dataset.paths, output_names(dataset.paths, dataset.root), strict=True))
    trainer_options = device_options(cfg.trainer, cfg.device)
    options = extractor_options(cfg.model)
    gated = load_gated_task(cfg.model.class_path, cfg.ckpt_path) if cfg.ckpt_path is not None else None
    reference = DiffusionFeatureExtractor(
        **dict(options, timestep=0, noise=False, variants=[{"name": REFERENCE, "prompt": ""}])
    )
    variants = [as_variant(v) for v in options["variants"]]
    plan = plan_attention(
        reference.unet, reference.tokenizers, variants, cfg.words, cfg.points, cfg.attention_variant, cfg.self_layer
    )
    extractor = DiffusionFeatureExtractor(**dict(options, layers=[*options["layers"], *(plan.layers if plan else [])]))
    module = VisualizationModule(
        extractor,
        reference,
        dataset,
        names,
        PictureSaver(cfg.output, cfg.tensorboard),
        cfg.cell,
        cfg.joint,
        plan,
        gated,
    )
    trainer = Trainer(
        **trainer_options,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        use_distributed_sampler=False,
        callbacks=[StopPredicting("run the same command again: pictures already written are complete")],
    )
    if cfg.joint == "images" and trainer.world_size > 1:
        raise ValueError(
            "--joint images fits one basis over every image, in one process: give one device, or --joint variants"
        )
    trainer.predict(module, return_predictions=False)
    module.finish()
    if trainer.is_global_zero:
        where = f" (and to TensorBoard: tensorboard --logdir {module.save.tensorboard_dir})" if cfg.tensorboard else ""
        print(f"wrote {len(dataset)} feature grids to {cfg.output}{where}")
    return 0


class VisualizationModule(LightningModule):
    """Draws each image's pictures in Lightning's predict loop (progress bar, devices: each rank
    draws its own shard, one image per step), or with ``joint="images"`` keeps the feature
    columns until :meth:`finish` fits the shared bases."""

    def __init__(
        self,
        extractor,
        reference,
        dataset,
        names: dict[str, str],
        save: PictureSaver,
        cell: int,
        joint: str,
        plan=None,
        gated=None,
    ) -> None:
        super().__init__()
        self.extractor, self.reference, self.gated = (
            extractor,
            reference,
            gated,
        )  # modules: moved to the device by Lightning
        self.dataset, self.names, self.save, self.cell, self.joint, self.plan = dataset, names, save, cell, joint, plan
        self.drawn = list(reference.layers)
        extra = plan.layers if plan else []  # captured for the attention picture only
        self.restrict = {
            v.name: list(dict.fromkeys(self.drawn + (extra if plan and v.name == plan.variant else [])))
            for v in extractor.variants
        }
        self.kept: list[tuple[str, torch.Tensor, list]] = []

    def predict_dataloader(self) -> DataLoader:
        return DataLoader(self.dataset, batch_size=1, sampler=ShardedEvalSampler(self.dataset), collate_fn=_single)

    def predict_step(self, item: dict[str, Any], batch_idx: int) -> None:
        name, raw = self.names[item["path"]], item["image"][None].to(self.device)
        if self.gated is not None:
            self.save(
                f"{name}.gate", gate_picture(self.gated.levels, gate_weights(self.gated, raw), self.gated.variant_names)
            )
        image = self.extractor.resize(raw)
        features = _features(self.extractor, image, self.restrict)
        if self.plan:
            self.save(
                f"{name}.attention",
                attention_grid(self.plan.pictures(image[0].cpu(), features[self.plan.variant], self.cell), self.cell),
            )
        columns = [(REFERENCE, _features(self.reference, image)[REFERENCE])]
        columns += [(variant, {layer: maps[layer] for layer in self.drawn}) for variant, maps in features.items()]
        if self.joint == "variants":
            self.save(name, feature_grid(image[0].cpu(), columns, fit_bases([columns]), self.cell))
        else:
            self.kept.append((name, image[0].cpu(), columns))

    def finish(self) -> None:
        """Draw the grids kept for the joint basis over all images; close TensorBoard."""
        if self.kept:
            bases = fit_bases([columns for _, _, columns in self.kept])
            for name, image, columns in self.kept:
                self.save(name, feature_grid(image, columns, bases, self.cell))
        self.save.close()


def _single(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Images differ in size: one per step."""
    return items[0]


class PictureSaver:
    """Writes each picture as ``<output>/<name>.png`` (atomically) and, if asked, as a
    TensorBoard image tagged by its name."""

    def __init__(self, folder: str, tensorboard: bool) -> None:
        self.folder = Path(folder)
        self.tensorboard_dir = self.folder / "tensorboard"
        self.writer = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(self.tensorboard_dir))

    def __call__(self, name: str, grid: np.ndarray) -> Path:
        if self.writer is not None:
            self.writer.add_image(name, grid, dataformats="HWC")
        return save_image(self.folder / f"{name}.png", grid)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
