"""Sliding-window inference (mmseg's "slide" mode), as the paper evaluates segmentation."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F


def window_starts(length: int, crop: int, stride: int) -> list[int]:
    """Start offsets of windows covering [0, length); the last window is flush with the end."""
    if length <= crop:
        return [0]
    n = (length - crop + stride - 1) // stride + 1
    return sorted({min(i * stride, length - crop) for i in range(n)})


@torch.no_grad()
def slide_logits(
    predict: Callable[[torch.Tensor, list[tuple[int, int, int, int]]], torch.Tensor],
    image: torch.Tensor,
    num_classes: int,
    crop: int,
    stride: int,
    batch_size: int = 8,
) -> torch.Tensor:
    """Average the logits of overlapping crops: image (1,3,H,W) → logits (1,K,H,W).

    All windows have the same size (min(crop, H) × min(crop, W)), so they are batched.
    ``predict`` maps crops (N,3,h,w) and their boxes [(y, x, h, w)] to logits (N,K,h',w') at
    any resolution; they are resized bilinearly to the crop size before accumulation.
    """
    _, _, height, width = image.shape
    ch, cw = min(crop, height), min(crop, width)
    boxes = [(y, x) for y in window_starts(height, ch, stride) for x in window_starts(width, cw, stride)]
    total = torch.zeros(1, num_classes, height, width, device=image.device)
    count = torch.zeros(1, 1, height, width, device=image.device)
    for i in range(0, len(boxes), batch_size):
        chunk = boxes[i : i + batch_size]
        crops = torch.cat([image[:, :, y : y + ch, x : x + cw] for y, x in chunk])
        logits = F.interpolate(
            predict(crops, [(y, x, ch, cw) for y, x in chunk]).float(),
            size=(ch, cw),
            mode="bilinear",
            align_corners=False,
        )
        for (y, x), crop_logits in zip(chunk, logits):
            total[0, :, y : y + ch, x : x + cw] += crop_logits
            count[0, :, y : y + ch, x : x + cw] += 1
    return total / count
