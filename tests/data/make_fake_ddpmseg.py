"""Write a fake Horse-21 or Bedroom-28 in DDPM-segmentation's layout, for tests.

``<root>/real/{train,test}/<prefix>_<7 digits>.png`` (RGB) beside ``<same stem>.npy`` (uint8
class ids, (H, W)); the names follow the archive's ``cat_0000001`` style. Each image is
a noisy grey background (class 0) with filled circles, rectangles and triangles; a shape's
colour belongs to its class, so a per-pixel classifier can learn the labels from colour alone.
Horse labels also hold a few ignore pixels (255) on a shape outline; Bedroom's class 0
(background, ignored) covers everything not drawn.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import cv2
import numpy as np

from csdiff.data.ddpmseg import get_spec

PREFIXES = {"horse21": "horse", "bedroom28": "bedroom"}
SHAPES_PER_IMAGE = 6


def class_colours(num_classes: int) -> np.ndarray:
    """(num_classes, 3) uint8 RGB, far apart in hue and brightness; class 0 is unused (grey background)."""
    hues = (np.arange(num_classes) * 0.618034 % 1.0 * 180).astype(np.uint8)
    values = np.where(np.arange(num_classes) % 2 == 0, 250, 150).astype(np.uint8)
    hsv = np.stack([hues, np.full(num_classes, 230, np.uint8), values], axis=1)[None]
    return cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)[0]


def _shape_mask(rng: np.random.Generator, size: int) -> tuple[np.ndarray, list[np.ndarray]]:
    """A filled random shape as a uint8 mask, and its outline polygon(s) for the ignore band."""
    mask = np.zeros((size, size), np.uint8)
    radius = int(rng.integers(size // 12, size // 5))
    cx, cy = (int(v) for v in rng.integers(radius, size - radius, size=2))
    kind = int(rng.integers(3))
    if kind == 0:
        cv2.circle(mask, (cx, cy), radius, 1, thickness=-1, lineType=cv2.LINE_8)
        contours, _ = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
        return mask, list(contours)
    corners = 4 if kind == 1 else 3
    theta = rng.uniform(0, 2 * np.pi) + np.arange(corners) * 2 * np.pi / corners
    poly = np.round(np.stack([cx + radius * np.cos(theta), cy + radius * np.sin(theta)], axis=1)).astype(np.int32)
    cv2.fillPoly(mask, [poly], 1, lineType=cv2.LINE_8)
    return mask, [poly]


def _sample(rng: np.random.Generator, size: int, num_classes: int, colours: np.ndarray, ignore: int | None):
    image = np.clip(rng.normal(128, 12, size=(size, size, 3)), 0, 255)
    label = np.zeros((size, size), np.uint8)
    outline: list[np.ndarray] = []
    for cls in rng.choice(np.arange(1, num_classes), size=SHAPES_PER_IMAGE, replace=False):
        mask, outline = _shape_mask(rng, size)
        inside = mask.astype(bool)
        image[inside] = np.clip(colours[cls] + rng.normal(0, 8, size=(int(inside.sum()), 3)), 0, 255)
        label[inside] = cls
    if ignore is not None:  # an unlabelled band along the last shape's edge
        cv2.polylines(label, outline, isClosed=True, color=ignore, thickness=2)
    return image.astype(np.uint8), label


def make_fake_ddpmseg(
    root: str | Path, dataset: str, num_train: int, num_test: int, size: int = 256, seed: int = 0
) -> Path:
    """Create ``root`` (the dataset folder holding ``real/``) with ``num_train`` + ``num_test`` images; returns root."""
    spec = get_spec(dataset)
    root = Path(root)
    rng = np.random.default_rng(seed)
    colours = class_colours(spec.num_classes)
    # Horse-21's ignore value (255) is not a class, so some pixels carry it; Bedroom's (0) is the background.
    ignore = spec.ignore_index if spec.ignore_index >= spec.num_classes else None
    index = 0
    for split, count in (("train", num_train), ("test", num_test)):
        folder = root / "real" / split
        folder.mkdir(parents=True, exist_ok=True)
        for _ in range(count):
            image, label = _sample(rng, size, spec.num_classes, colours, ignore)
            stem = f"{PREFIXES[dataset]}_{index:07d}"
            cv2.imwrite(str(folder / f"{stem}.png"), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
            np.save(folder / f"{stem}.npy", label)
            index += 1
    return root


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("root", type=Path, help="output dataset folder (gets real/train and real/test)")
    parser.add_argument("--dataset", choices=sorted(PREFIXES), required=True)
    parser.add_argument("--num_train", type=int, default=None, help="default: the real dataset's count")
    parser.add_argument("--num_test", type=int, default=None, help="default: the real dataset's count")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    spec = get_spec(args.dataset)
    num_train = spec.num_train if args.num_train is None else args.num_train
    num_test = spec.num_test if args.num_test is None else args.num_test
    print(make_fake_ddpmseg(args.root, args.dataset, num_train, num_test, args.size, args.seed))
