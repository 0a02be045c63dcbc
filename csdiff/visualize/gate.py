"""The learned gate of a trained task as a picture: per level, which variant each channel group
draws from on one image.

The segmentation gate's weights depend on the image (its assigners see the features), so the
picture is drawn per image: for each level, the C channels in ``groups`` consecutive groups,
each a bar stacked from the variants' mean weights in that group (colour = variant), and each
variant's mean weight over the level.
"""

from __future__ import annotations

import importlib
from typing import Any

import cv2
import numpy as np
import torch

from csdiff.models.gate import GatedFusion

# RGB, one per variant (cycled beyond eight)
VARIANT_COLOURS = (
    (31, 119, 180),
    (255, 127, 14),
    (44, 160, 44),
    (214, 39, 40),
    (148, 103, 189),
    (140, 86, 75),
    (227, 119, 194),
    (127, 127, 127),
)
_FONT, _SCALE = cv2.FONT_HERSHEY_SIMPLEX, 0.4
PAD, LINE, BAR = 4, 16, 48  # pixels: gaps, a text line, a level's bar height


def load_gated_task(class_path: str, ckpt_path: str) -> Any:
    """The trained task of a checkpoint, on the CPU, in eval mode; only tasks with a
    :class:`GatedFusion` over whole feature maps (segmentation) have a gate to draw."""
    module, name = class_path.rsplit(".", 1)
    task_class = getattr(importlib.import_module(module), name)
    task = task_class.load_from_checkpoint(ckpt_path, map_location="cpu", weights_only=True).eval()
    if not isinstance(getattr(task, "gate", None), GatedFusion) or not hasattr(task, "features"):
        raise ValueError(
            f"{name} has no gate over feature maps to draw (SegmentationTask has): drop --ckpt_path {ckpt_path}"
        )
    return task


def gate_weights(task: Any, image: torch.Tensor) -> list[torch.Tensor]:
    """Per level of ``task.levels``, the (V, C) weights its gate gives one image (1, 3, H, W)."""
    with torch.no_grad():
        out = task.gate(task.features(image.to(task.device)))
    return [w[:, 0].float().cpu() for w in out.weights]


def gate_picture(levels: list[str], weights: list[torch.Tensor], variants: list[str], groups: int = 32) -> np.ndarray:
    """RGB picture: a legend line, then per level its name, the variants' mean weights and a
    strip of ``groups`` stacked bars (fewer when the level has fewer channels)."""
    columns = max(min(groups, w.shape[1]) for w in weights)
    bar_width = 8
    width = max(PAD * 2 + columns * bar_width, 360)
    height = LINE + len(levels) * (2 * LINE + BAR + PAD) + PAD
    canvas = np.full((height, width, 3), 255, np.uint8)
    x = PAD
    for v, name in enumerate(variants):  # legend
        colour = VARIANT_COLOURS[v % len(VARIANT_COLOURS)]
        cv2.rectangle(canvas, (x, 4), (x + 10, 12), colour, -1)
        cv2.putText(canvas, name, (x + 14, 12), _FONT, _SCALE, (0, 0, 0), 1, cv2.LINE_AA)
        x += 14 + cv2.getTextSize(name, _FONT, _SCALE, 1)[0][0] + 10
    for i, (level, w) in enumerate(zip(levels, weights, strict=True)):
        top = LINE + i * (2 * LINE + BAR + PAD)
        means = " ".join(f"{name} {float(m):.2f}" for name, m in zip(variants, w.mean(dim=1), strict=True))
        cv2.putText(
            canvas, f"{level} ({w.shape[1]} channels)", (PAD, top + LINE - 4), _FONT, _SCALE, (0, 0, 0), 1, cv2.LINE_AA
        )
        cv2.putText(
            canvas, f"mean weight: {means}", (PAD, top + 2 * LINE - 4), _FONT, _SCALE, (0, 0, 0), 1, cv2.LINE_AA
        )
        shares = torch.stack(
            [chunk.mean(dim=1) for chunk in w.tensor_split(min(groups, w.shape[1]), dim=1)], dim=1
        )  # (V, G)
        bottom = top + 2 * LINE + BAR
        for g in range(shares.shape[1]):
            y = float(bottom)
            for v in range(shares.shape[0]):
                h = float(shares[v, g]) * BAR
                colour = VARIANT_COLOURS[v % len(VARIANT_COLOURS)]
                cv2.rectangle(
                    canvas,
                    (PAD + g * bar_width, round(y - h)),
                    (PAD + (g + 1) * bar_width - 2, round(y) - 1),
                    colour,
                    -1,
                )
                y -= h
    return canvas
