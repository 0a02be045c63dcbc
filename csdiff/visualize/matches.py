"""Pictures of keypoint matches: source | target side by side, one line per keypoint."""

from __future__ import annotations

import cv2
import numpy as np

GREEN, RED, WHITE = (40, 200, 40), (220, 40, 40), (255, 255, 255)


def draw_matches(
    src: np.ndarray,
    trg: np.ndarray,
    src_points: np.ndarray,
    pred_points: np.ndarray,
    gt_points: np.ndarray | None = None,
    threshold: float | None = None,
) -> np.ndarray:
    """RGB uint8 images (any sizes) and (N, 2) points in their pixels → one RGB picture.

    Each source keypoint is joined to its predicted target point: green when the prediction
    lies within ``threshold`` pixels of the ground truth, red otherwise (white without one);
    ground-truth target points are drawn as hollow circles.
    """
    height = max(src.shape[0], trg.shape[0])
    canvas = np.zeros((height, src.shape[1] + trg.shape[1], 3), np.uint8)
    canvas[: src.shape[0], : src.shape[1]] = src
    canvas[: trg.shape[0], src.shape[1] :] = trg
    shift = np.array([src.shape[1], 0])
    radius = max(2, height // 128)
    for i, (a, b) in enumerate(zip(src_points, pred_points)):
        colour = WHITE
        if gt_points is not None and threshold is not None:
            colour = GREEN if np.linalg.norm(b - gt_points[i]) <= threshold else RED
        p, q = tuple(int(round(v)) for v in a), tuple(int(round(v)) for v in b + shift)
        cv2.line(canvas, p, q, colour, 1, cv2.LINE_AA)
        cv2.circle(canvas, p, radius, colour, -1, cv2.LINE_AA)
        cv2.circle(canvas, q, radius, colour, -1, cv2.LINE_AA)
        if gt_points is not None:
            cv2.circle(canvas, tuple(int(round(v)) for v in gt_points[i] + shift), radius + 1, colour, 1, cv2.LINE_AA)
    return canvas
