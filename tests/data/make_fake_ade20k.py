"""Write a tiny fake ADE20K (ADEChallengeData2016 layout, real file formats) for tests.

JPEG images and 8-bit PNG annotations holding raw ADE20K values 0..150 (0 = "other"),
with 0 and 150 always present so the reduce_zero_label edges are exercised.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import cv2
import numpy as np

SPLITS = (("training", "train"), ("validation", "val"))


def _blocks(rng: np.random.Generator, size: tuple[int, int], high: int, cell: int = 16) -> np.ndarray:
    h, w = size
    coarse = rng.integers(0, high, size=(-(-h // cell), -(-w // cell)), dtype=np.uint8)
    return np.kron(coarse, np.ones((cell, cell), dtype=np.uint8))[:h, :w]


def make_fake_ade20k(
    root: Path, n_train: int = 4, n_val: int = 2, size: tuple[int, int] = (96, 128), seed: int = 0
) -> Path:
    """Create ``root`` (the ADEChallengeData2016 folder) with images of ``size`` = (h, w); returns root."""
    rng = np.random.default_rng(seed)
    for (folder, tag), count in zip(SPLITS, (n_train, n_val)):
        image_dir, label_dir = root / "images" / folder, root / "annotations" / folder
        image_dir.mkdir(parents=True, exist_ok=True)
        label_dir.mkdir(parents=True, exist_ok=True)
        for i in range(count):
            label = _blocks(rng, size, 151)
            label[:16, :16], label[-16:, -16:] = 0, 150
            image = rng.integers(0, 256, size=(*size, 3), dtype=np.uint8)
            name = f"ADE_{tag}_{i + 1:08d}"
            cv2.imwrite(str(image_dir / f"{name}.jpg"), image, [cv2.IMWRITE_JPEG_QUALITY, 95])
            cv2.imwrite(str(label_dir / f"{name}.png"), label)
    return root


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("root", type=Path, help="output ADEChallengeData2016 folder")
    parser.add_argument("--n_train", type=int, default=4)
    parser.add_argument("--n_val", type=int, default=2)
    parser.add_argument("--size", type=int, nargs=2, default=(96, 128), metavar=("H", "W"))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(make_fake_ade20k(args.root, args.n_train, args.n_val, tuple(args.size), args.seed))
