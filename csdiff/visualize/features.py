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
from typing import Any

import cv2
import numpy as np
import torch
from tqdm import tqdm

from csdiff.io import save_image
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


def _text(canvas: np.ndarray, text: str, x: int, y: int, width: int) -> None:
    """Black text with its baseline at ``y``, cut to fit ``width`` (ending in '..')."""
    while text and cv2.getTextSize(text, _FONT, _SCALE, 1)[0][0] > width:
        text = text[:-4] + ".." if len(text) > 3 else ""
    cv2.putText(canvas, text, (x, y), _FONT, _SCALE, (0, 0, 0), 1, cv2.LINE_AA)


def feature_grid(image: torch.Tensor, columns: list[tuple[str, Maps]], bases: dict[str, PCABasis], cell: int = 128) -> np.ndarray:
    """The labelled RGB grid of one image: ``image`` (3, H, W) in [-1, 1]; ``columns`` the
    reference first, then each variant, as (title, maps); ``bases`` one per layer, in row order."""
    layers = list(bases)
    height, width = grid_size(len(layers), len(columns) + 1, cell)
    canvas = np.full((height, width, 3), 255, np.uint8)
    for j, title in enumerate(["input", *(name for name, _ in columns)]):
        _text(canvas, title, PAD + j * (cell + PAD), HEADER - 5, cell)
    reference = columns[0][1]
    picture = image_to_rgb(image, (cell, cell))
    for i, layer in enumerate(layers):
        top = HEADER + i * (LABEL + cell + CAPTION)
        shape = "x".join(map(str, reference[layer].shape))
        _text(canvas, f"{layer} ({shape})", PAD, top + LABEL - 4, width - 2 * PAD)
        canvas[top + LABEL : top + LABEL + cell, PAD : PAD + cell] = picture
        for j, (_, maps) in enumerate(columns, start=1):
            x = PAD + j * (cell + PAD)
            canvas[top + LABEL : top + LABEL + cell, x : x + cell] = bases[layer].to_rgb(maps[layer], (cell, cell))
            distance = cosine_distance(maps[layer], reference[layer])
            _text(canvas, f"cos dist {distance:.3f}", x, top + LABEL + cell + CAPTION - 4, cell)
    return canvas


def attention_grid(pictures: list[tuple[str, np.ndarray]], cell: int = 128) -> np.ndarray:
    """One titled row of (title, RGB ``cell``² picture) cells: the input and its attention maps."""
    canvas = np.full((HEADER + cell + PAD, len(pictures) * (cell + PAD) + PAD, 3), 255, np.uint8)
    for j, (title, picture) in enumerate(pictures):
        x = PAD + j * (cell + PAD)
        _text(canvas, title, x, HEADER - 5, cell)
        canvas[HEADER : HEADER + cell, x : x + cell] = picture
    return canvas


def fit_bases(images_columns: list[list[tuple[str, Maps]]]) -> dict[str, PCABasis]:
    """One basis per layer over every column of every given image (pass one image for the
    default per-image joint basis)."""
    layers = list(images_columns[0][0][1])
    return {layer: fit_pca([maps[layer] for columns in images_columns for _, maps in columns]) for layer in layers}


def extractor_options(model: Any) -> dict[str, Any]:
    """Extractor arguments from a `csdiff fit` config's model section (backbone, variants, layers)."""
    if model is None:
        raise ValueError("give --config with a model section (a `csdiff fit` config): its backbone, variants and layers are drawn")
    options = model.init_args
    if not {"backbone", "variants", "layers"} <= set(options.keys()):
        raise ValueError(f"{model.class_path} has no backbone/variants/layers options to draw")
    if not options.layers:
        raise ValueError("the config's model names no layers: set model.init_args.layers")
    backbone = options.backbone.as_dict() if hasattr(options.backbone, "as_dict") else dict(options.backbone or {})
    variants = [v.as_dict() if hasattr(v, "as_dict") else dict(v) for v in (options.variants or [{"name": "plain"}])]
    return dict(backbone, layers=list(options.layers), variants=variants, fresh_noise=False)


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
    from lightning.pytorch import LightningDataModule, LightningModule, Trainer

    from csdiff.backbone import DiffusionFeatureExtractor
    from csdiff.backbone.variants import as_variant
    from csdiff.cli import _parser
    from csdiff.data.reading import output_names
    from csdiff.data.segmentation import ImageFolderDataset

    parser = _parser("visualize", "Draw PCA pictures of a config's features per layer and variant, beside the t=0 reference.")
    parser.add_subclass_arguments(LightningModule, "model", required=False, instantiate=False,
                                  help="a task whose backbone, variants and layers are drawn (from a `csdiff fit` config)")
    parser.add_subclass_arguments(LightningDataModule, "data", required=False, instantiate=False, help="read from task configs; unused")
    parser.add_class_arguments(Trainer, "trainer", instantiate=False)
    parser.add_argument("--seed_everything", type=bool | int | None, default=None, help="read from task configs; unused")
    parser.add_argument("--ckpt_path", type=str | None, default=None, help="a checkpoint of the config's task: also draw its learned gate per image (<name>.gate.png)")
    parser.add_argument("--images", type=str, help="an image file or a folder of images")
    parser.add_argument("--output", type=str, help="folder for the grids: <image name>.png")
    parser.add_argument("--joint", type=str, default="variants", choices=["variants", "images"],
                        help="fit each layer's PCA basis over the variants of one image, or over all images too")
    parser.add_argument("--words", type=list[str], default=[], help="words of a variant's prompt whose cross-attention is drawn")
    parser.add_argument("--points", type=list[list[float]], default=[], help="query points [x, y] (fractions of the image) whose self-attention is drawn")
    parser.add_argument("--attention_variant", type=str | None, default=None, help="the variant of the words and points (default: the first)")
    parser.add_argument("--self_layer", type=str | None, default=None, help="a `-self-map` layer for points (default: the finest of the up-levels)")
    parser.add_argument("--cell", type=int, default=128, help="side of each picture in pixels")
    parser.add_argument("--device", type=str, default="cpu", help="e.g. cpu or cuda:1")
    parser.add_argument("--tensorboard", type=bool, default=False, help="also log every picture to TensorBoard (<output>/tensorboard)")
    cfg = parser.parse_args(argv)
    if not cfg.images or not cfg.output:
        raise ValueError("give --images (a folder or an image file) and --output (a folder)")
    dataset = ImageFolderDataset(cfg.images)  # before loading any weights: a bad folder fails at once
    names = output_names(dataset.paths, dataset.root)
    options = extractor_options(cfg.model)
    gated = load_gated_task(cfg.model.class_path, cfg.ckpt_path).to(cfg.device) if cfg.ckpt_path is not None else None
    reference = DiffusionFeatureExtractor(
        **dict(options, timestep=0, noise=False, variants=[{"name": REFERENCE, "prompt": ""}])
    ).to(cfg.device)
    drawn = list(reference.layers)
    variants = [as_variant(v) for v in options["variants"]]
    plan = plan_attention(reference.unet, reference.tokenizer, variants, cfg.words, cfg.points, cfg.attention_variant, cfg.self_layer)
    extra = plan.layers if plan else []  # captured for the attention picture only
    extractor = DiffusionFeatureExtractor(**dict(options, layers=[*options["layers"], *extra])).to(cfg.device)
    restrict = {v.name: list(dict.fromkeys(drawn + (extra if plan and v.name == plan.variant else []))) for v in variants}
    save = _Saver(cfg.output, cfg.tensorboard)
    images, all_columns = [], []
    for i in tqdm(range(len(dataset)), desc="visualize", unit="image", disable=None):
        if gated is not None:
            weights = gate_weights(gated, dataset[i]["image"][None])
            save(f"{names[i]}.gate", gate_picture(gated.levels, weights, gated.variant_names))
        image = extractor.resize(dataset[i]["image"][None])
        features = _features(extractor, image, restrict)
        if plan:
            pictures = plan.pictures(image[0].cpu(), features[plan.variant], cfg.cell)
            save(f"{names[i]}.attention", attention_grid(pictures, cfg.cell))
        columns = [(REFERENCE, _features(reference, image)[REFERENCE])]
        columns += [(name, {layer: maps[layer] for layer in drawn}) for name, maps in features.items()]
        if cfg.joint == "variants":
            save(names[i], feature_grid(image[0].cpu(), columns, fit_bases([columns]), cfg.cell))
        else:
            images.append(image[0].cpu())
            all_columns.append(columns)
    if all_columns:
        bases = fit_bases(all_columns)
        for name, image, columns in zip(names, images, all_columns, strict=True):
            save(name, feature_grid(image, columns, bases, cfg.cell))
    save.close()
    print(f"wrote {len(names)} feature grids to {cfg.output}" + (f" (and to TensorBoard: tensorboard --logdir {save.tensorboard_dir})" if cfg.tensorboard else ""))
    return 0


class _Saver:
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
