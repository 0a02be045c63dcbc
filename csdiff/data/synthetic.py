"""Synthetic coloured shapes on textured backgrounds, with captions and label maps.

The tiny backbone is trained on this family of images (so its features carry content and
its prompts matter), and the quickstart draws a fresh set with another seed. Everything is
a pure function of a numpy ``Generator``, so a seed reproduces a set exactly.

Squares and triangles stand nearly upright (a few degrees of tilt): a shape's radius of
15–36 px is only 2–4.5 cells of the tiny backbone's 16×16 feature grid (8 px a cell), and at
arbitrary rotations a square and a triangle are then barely distinguishable to a small head. Upright, their
identity shows in edge orientation, which the features do carry.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

SHAPE_CLASSES: tuple[str, ...] = ("background", "circle", "square", "triangle")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (40, 70, 220),
    "yellow": (235, 215, 40),
    "purple": (150, 60, 190),
    "orange": (245, 140, 30),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
TEXTURES: tuple[str, ...] = ("striped", "checkered", "noisy", "plain")
# Bumped whenever render_shapes draws differently, so stored sets made by an older one are redrawn.
FAMILY_VERSION = 2
# Corner angle of an upright shape: a square with horizontal edges, a triangle with its apex up.
UPRIGHT = {"square": np.pi / 4, "triangle": -np.pi / 2}
# Colour palette used for label overlays (RGB), one row per class.
SHAPE_PALETTE: tuple[tuple[int, int, int], ...] = ((0, 0, 0), (230, 25, 75), (60, 180, 75), (0, 130, 200))


@dataclass(frozen=True)
class ShapesSample:
    image: np.ndarray  # (H, W, 3) uint8 RGB
    label: np.ndarray  # (H, W) uint8, index into SHAPE_CLASSES
    caption: str


def _background(rng: np.random.Generator, size: int, texture: str) -> np.ndarray:
    base = rng.integers(60, 200, size=3)
    other = np.clip(base + rng.integers(-70, 70, size=3), 0, 255)
    yy, xx = np.mgrid[0:size, 0:size]
    if texture == "striped":
        period = int(rng.integers(6, 16))
        angle = rng.uniform(0, np.pi)
        phase = (xx * np.cos(angle) + yy * np.sin(angle)) // period
        mask = (phase % 2).astype(bool)
    elif texture == "checkered":
        period = int(rng.integers(8, 20))
        mask = ((xx // period + yy // period) % 2).astype(bool)
    elif texture == "noisy":
        coarse = rng.random((size // 8 + 1, size // 8 + 1))
        mask = cv2.resize(coarse, (size, size), interpolation=cv2.INTER_LINEAR) > 0.5
    else:
        mask = np.zeros((size, size), dtype=bool)
    img = np.where(mask[..., None], other[None, None], base[None, None]).astype(np.float32)
    img += rng.normal(0, 6, size=img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def _draw(canvas: np.ndarray, shape: str, centre: tuple[int, int], radius: int, angle: float, value) -> None:
    cx, cy = centre
    if shape == "circle":
        cv2.circle(canvas, (cx, cy), radius, value, thickness=-1, lineType=cv2.LINE_8)
        return
    corners = 4 if shape == "square" else 3
    theta = angle + np.arange(corners) * 2 * np.pi / corners
    pts = np.stack([cx + radius * np.cos(theta), cy + radius * np.sin(theta)], axis=1)
    cv2.fillPoly(canvas, [np.round(pts).astype(np.int32)], value, lineType=cv2.LINE_8)


def render_shapes(
    rng: np.random.Generator, size: int = 128, max_shapes: int = 3, max_tilt: float = 15.0
) -> ShapesSample:
    """Draw one image: 1..max_shapes shapes (later ones occlude earlier ones), tilted up to ``max_tilt`` degrees."""
    texture = TEXTURES[int(rng.integers(len(TEXTURES)))]
    image = _background(rng, size, texture)
    label = np.zeros((size, size), dtype=np.uint8)
    names = []
    colour_names = list(COLOURS)
    for _ in range(int(rng.integers(1, max_shapes + 1))):
        cls = int(rng.integers(1, len(SHAPE_CLASSES)))
        colour = colour_names[int(rng.integers(len(colour_names)))]
        radius = int(rng.uniform(0.12, 0.28) * size)
        centre = (
            int(rng.integers(radius // 2, size - radius // 2)),
            int(rng.integers(radius // 2, size - radius // 2)),
        )
        angle = UPRIGHT.get(SHAPE_CLASSES[cls], 0.0) + float(np.deg2rad(rng.uniform(-max_tilt, max_tilt)))
        _draw(image, SHAPE_CLASSES[cls], centre, radius, angle, COLOURS[colour])
        _draw(label, SHAPE_CLASSES[cls], centre, radius, angle, cls)
        names.append(f"a {colour} {SHAPE_CLASSES[cls]}")
    caption = " and ".join(names) + f" on a {texture} background"
    return ShapesSample(image=image, label=label, caption=caption)


def caption_vocabulary() -> list[str]:
    """Every word a caption can contain (the tiny tokenizer's BPE vocabulary is built from them)."""
    words = {"a", "and", "on", "background", "photo", "of", "the", "with", "high", "quality", "shapes"}
    words.update(SHAPE_CLASSES[1:])
    words.update(COLOURS)
    words.update(TEXTURES)
    return sorted(words)
