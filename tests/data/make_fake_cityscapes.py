"""Write a tiny fake Cityscapes (leftImg8bit/ + gtFine/, real file names and formats) for tests.

Two cities per split. Labels are official label ids (every id 0..33 occurs across a
set); odd-numbered samples get only ``*_gtFine_labelIds.png``, the others also the
``*_gtFine_labelTrainIds.png`` that cityscapesscripts would create, so both reading paths
are exercised.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import cv2
import numpy as np
from cityscapesscripts.helpers.labels import id2label

CITIES = {"train": ("aachen", "bochum"), "val": ("frankfurt", "lindau")}
# What createTrainIdLabelImgs writes: the table's trainId, with 255 and -1 both stored as 255.
TRAIN_IDS = np.array([id2label[i].trainId % 256 for i in range(34)], dtype=np.uint8)


def make_fake_cityscapes(root: Path, n_per_city: int = 2, size: tuple[int, int] = (64, 128), seed: int = 0) -> Path:
    """Create ``root`` (the folder holding leftImg8bit/ and gtFine/) with images of ``size`` = (h, w)."""
    rng = np.random.default_rng(seed)
    h, w = size
    for split, cities in CITIES.items():
        index = 0
        for city in cities:
            image_dir, label_dir = root / "leftImg8bit" / split / city, root / "gtFine" / split / city
            image_dir.mkdir(parents=True, exist_ok=True)
            label_dir.mkdir(parents=True, exist_ok=True)
            for frame in range(n_per_city):
                stem = f"{city}_{frame:06d}_000019"
                ids = rng.integers(0, 34, size=(-(-h // 8), -(-w // 8)), dtype=np.uint8)
                ids.flat[:34] = np.arange(34)
                ids = np.kron(ids, np.ones((8, 8), dtype=np.uint8))[:h, :w]
                cv2.imwrite(str(image_dir / f"{stem}_leftImg8bit.png"), rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
                cv2.imwrite(str(label_dir / f"{stem}_gtFine_labelIds.png"), ids)
                if index % 2 == 0:
                    cv2.imwrite(str(label_dir / f"{stem}_gtFine_labelTrainIds.png"), TRAIN_IDS[ids])
                index += 1
    return root


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("root", type=Path, help="output folder (will hold leftImg8bit/ and gtFine/)")
    parser.add_argument("--n_per_city", type=int, default=2)
    parser.add_argument("--size", type=int, nargs=2, default=(64, 128), metavar=("H", "W"))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(make_fake_cityscapes(args.root, args.n_per_city, tuple(args.size), args.seed))
