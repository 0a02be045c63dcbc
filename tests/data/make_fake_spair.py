"""Write a tiny fake SPair-71k (official layout, real file formats) and DHF-style pair lists.

Each category is a polygon of its own colour; every image shows it under a random affine map
with a dot of a fixed colour per vertex, and the vertices are the keypoints, so a pair's
keypoints really correspond (same vertex, same dot colour). Images have varied sizes,
portrait and landscape. Annotations follow SPair: ``src_imsize`` is [W, H, 3], boxes are
[x1, y1, x2, y2], keypoints [x, y], pair files ``<id>-<src>-<trg>:<category>.json``, with
the difficulty levels ``viewpoint_variation``, ``scale_variation``, ``truncation``, ``occlusion``.
"""

from __future__ import annotations

import argparse
import json
from itertools import permutations
from pathlib import Path

import cv2
import numpy as np

# category → polygon vertices in a unit box, (x, y)
SHAPES = {
    "bird": [(0.5, 0.1), (0.9, 0.85), (0.1, 0.85)],
    "cat": [(0.15, 0.2), (0.85, 0.1), (0.9, 0.8), (0.2, 0.9)],
    "dog": [(0.5, 0.05), (0.95, 0.4), (0.8, 0.95), (0.2, 0.95), (0.05, 0.4)],
}
FILL = {"bird": (40, 120, 200), "cat": (200, 90, 40), "dog": (60, 160, 80)}  # RGB
# RGB dot colour of keypoint id k; far apart so a test can tell them by colour
KP_COLOURS = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (255, 0, 255)]
SPLITS = (("trn", 3), ("val", 2), ("test", 2))  # images per category and split
DOT_RADIUS = 5


def _image(rng: np.random.Generator, category: str) -> tuple[np.ndarray, np.ndarray]:
    """An RGB image and its (K, 2) integer vertex keypoints (x, y)."""
    h, w = (int(v) for v in rng.integers(96, 176, size=2))
    unit = np.array(SHAPES[category], dtype=np.float64) - 0.5
    angle = rng.uniform(-0.4, 0.4)
    rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    scale = rng.uniform(0.45, 0.65) * np.array([w, h])
    centre = np.array([w, h]) / 2 + rng.uniform(-0.08, 0.08, size=2) * np.array([w, h])
    kps = np.round(unit @ rot.T * scale + centre).astype(np.int32)
    kps = np.clip(kps, DOT_RADIUS, [w - 1 - DOT_RADIUS, h - 1 - DOT_RADIUS])
    img = np.full((h, w, 3), 235, dtype=np.uint8)
    cv2.fillPoly(img, [kps.reshape(-1, 1, 2)], FILL[category])
    for k, (x, y) in enumerate(kps):
        cv2.circle(img, (int(x), int(y)), DOT_RADIUS, KP_COLOURS[k], -1)
    return img, kps


def make_fake_spair(root: Path, seed: int = 0) -> tuple[Path, dict[str, Path]]:
    """Create ``root`` (the SPair-71k folder) and DHF lists in ``root/dhf``; returns root and
    the list per split ("train", "val", "test"), holding the same pairs in the same order."""
    rng = np.random.default_rng(seed)
    (root / "Layout" / "large").mkdir(parents=True, exist_ok=True)
    (root / "dhf").mkdir(exist_ok=True)
    lists: dict[str, Path] = {}
    image_no = 0
    for split, count in SPLITS:
        (root / "PairAnnotation" / split).mkdir(parents=True, exist_ok=True)
        names, dhf = [], []
        for category in SHAPES:
            (root / "JPEGImages" / category).mkdir(parents=True, exist_ok=True)
            images = []
            for _ in range(count):
                img, kps = _image(rng, category)
                name = f"{2008 + image_no % 4}_{image_no:06d}"
                image_no += 1
                path = root / "JPEGImages" / category / f"{name}.jpg"
                cv2.imwrite(str(path), img[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, 95])
                images.append((name, img.shape[:2], kps))
            for (src, src_hw, src_all), (trg, trg_hw, trg_all) in permutations(images, 2):
                n = len(src_all)
                ids = sorted(rng.choice(n, size=int(rng.integers(2, n + 1)), replace=False).tolist())
                src_kps, trg_kps = src_all[ids].tolist(), trg_all[ids].tolist()
                src_box = [*src_all.min(0).tolist(), *src_all.max(0).tolist()]
                trg_box = [*trg_all.min(0).tolist(), *trg_all.max(0).tolist()]
                pair = f"{len(names)}-{src}-{trg}:{category}"
                ann = {
                    "pair_id": len(names),
                    "filename": pair,
                    "src_imname": f"{src}.jpg",
                    "trg_imname": f"{trg}.jpg",
                    "src_imsize": [src_hw[1], src_hw[0], 3],
                    "trg_imsize": [trg_hw[1], trg_hw[0], 3],
                    "src_bndbox": src_box,
                    "trg_bndbox": trg_box,
                    "category": category,
                    "src_kps": src_kps,
                    "trg_kps": trg_kps,
                    "kps_ids": [str(i) for i in ids],
                    "mirror": 0,
                    # SPair's difficulty levels, cycled by pair number (no random draw: the rest stays as it was)
                    "viewpoint_variation": len(names) % 3,
                    "scale_variation": len(names) // 3 % 3,
                    "truncation": len(names) % 4,
                    "occlusion": len(names) // 2 % 4,
                }
                (root / "PairAnnotation" / split / f"{pair}.json").write_text(json.dumps(ann))
                names.append(pair)
                dhf.append(
                    {
                        "source_path": f"{category}/{src}.jpg",
                        "target_path": f"{category}/{trg}.jpg",
                        "source_points": src_kps,
                        "target_points": trg_kps,
                        "category": category,
                        "target_bounding_box": trg_box,
                        "source_bounding_box": src_box,
                    }
                )
        (root / "Layout" / "large" / f"{split}.txt").write_text("".join(f"{n}\n" for n in names))
        key = {"trn": "train"}.get(split, split)
        lists[key] = root / "dhf" / f"spair_71k_{key}.json"
        lists[key].write_text(json.dumps(dhf))
    return root, lists


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("root", type=Path, help="output SPair-71k folder")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    out, pair_lists = make_fake_spair(args.root, args.seed)
    print(out)
    for split, path in pair_lists.items():
        print(f"{split}: {path}")
