"""Colour overlays of label maps on images (TensorBoard pictures, prediction files)."""

from __future__ import annotations

import cv2
import numpy as np
from torch import Tensor


def image_to_rgb(image: Tensor, size: tuple[int, int]) -> np.ndarray:
    """A (3,H,W) tensor in [-1, 1] as an RGB uint8 picture of ``size`` (h, w), for overlays."""
    rgb = ((image.permute(1, 2, 0).float().cpu().numpy() + 1) * 127.5).clip(0, 255).astype(np.uint8)
    return cv2.resize(rgb, (size[1], size[0]), interpolation=cv2.INTER_LINEAR)


def overlay(image: np.ndarray, label: np.ndarray, palette: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """Blend a colour-coded label map (ignore → transparent) onto an RGB uint8 image."""
    colours = palette[np.clip(label, 0, len(palette) - 1)]
    valid = (label < len(palette))[..., None]
    blended = (image * (1 - alpha) + colours * alpha).astype(np.uint8)
    return np.where(valid, blended, image)
