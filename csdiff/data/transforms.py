"""Segmentation augmentations in OpenCV/numpy, following the mmseg ADE20K training recipe.

Every random choice draws from a ``np.random.Generator`` passed in by the caller (never
the global RNG): the dataset derives it from (seed, epoch, index), so a sample is the
same whichever worker loads it and whether or not the run was resumed.
Images are (H, W, 3) uint8 RGB; labels are (H, W) uint8 train ids with 255 = ignore.
Sizes given as pairs follow OpenCV where they name a resize target ((w, h)) and mmseg
where they name a crop ((h, w)); an int means a square.
"""

from __future__ import annotations

from typing import Literal, Protocol

import cv2
import numpy as np
import torch

IGNORE_INDEX = 255

EvalResize = tuple[Literal["short"], int] | tuple[Literal["exact"], tuple[int, int]] | None


def _hw(size: int | tuple[int, int]) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


def _resize(img: np.ndarray, wh: tuple[int, int], interpolation: int) -> np.ndarray:
    if (img.shape[1], img.shape[0]) == wh:
        return img
    return cv2.resize(img, wh, interpolation=interpolation)


def random_resize(
    img: np.ndarray,
    label: np.ndarray,
    rng: np.random.Generator,
    scale: tuple[int, int] = (2048, 512),
    ratio_range: tuple[float, float] = (0.5, 2.0),
) -> tuple[np.ndarray, np.ndarray]:
    """Keep-ratio rescale into a box of ``scale * r`` (long side, short side), r ~ U(ratio_range).

    Same arithmetic as mmseg's RandomResize + mmcv's imrescale, so crops see the objects at
    the scales the paper's numbers were obtained with.
    """
    ratio = rng.uniform(ratio_range[0], ratio_range[1])
    target = (int(scale[0] * ratio), int(scale[1] * ratio))
    h, w = img.shape[:2]
    factor = min(max(target) / max(h, w), min(target) / min(h, w))
    wh = (int(w * factor + 0.5), int(h * factor + 0.5))
    return _resize(img, wh, cv2.INTER_LINEAR), _resize(label, wh, cv2.INTER_NEAREST)


def random_crop(
    img: np.ndarray,
    label: np.ndarray,
    rng: np.random.Generator,
    crop_size: int | tuple[int, int],
    cat_max_ratio: float = 0.75,
    ignore_index: int = IGNORE_INDEX,
) -> tuple[np.ndarray, np.ndarray]:
    """Random (h, w) crop, re-drawn up to 10 times while one class dominates it (mmseg semantics).

    A crop is accepted when it holds at least two classes and the most frequent one (ignore
    excluded) covers less than ``cat_max_ratio`` of the labelled pixels; after 10 rejections
    the next draw is used as is. ``cat_max_ratio >= 1`` disables the check. An image smaller
    than the crop yields a smaller crop (``pad_to`` fills it up afterwards).
    """
    crop_h, crop_w = _hw(crop_size)
    h, w = label.shape

    def draw() -> tuple[int, int]:
        return int(rng.integers(0, max(h - crop_h, 0) + 1)), int(rng.integers(0, max(w - crop_w, 0) + 1))

    y, x = draw()
    if cat_max_ratio < 1.0:
        for _ in range(10):
            values, counts = np.unique(label[y : y + crop_h, x : x + crop_w], return_counts=True)
            counts = counts[values != ignore_index]
            if len(counts) > 1 and counts.max() / counts.sum() < cat_max_ratio:
                break
            y, x = draw()
    return img[y : y + crop_h, x : x + crop_w], label[y : y + crop_h, x : x + crop_w]


def random_flip(
    img: np.ndarray, label: np.ndarray, rng: np.random.Generator, p: float = 0.5
) -> tuple[np.ndarray, np.ndarray]:
    """Horizontal flip of image and label together with probability ``p``."""
    if rng.random() < p:
        return cv2.flip(img, 1), cv2.flip(label, 1)
    return img, label


def _affine(channel: np.ndarray, alpha: float = 1.0, beta: float = 0.0) -> np.ndarray:
    return np.clip(channel.astype(np.float32) * alpha + beta, 0, 255).astype(np.uint8)


def photometric_distortion(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """mmseg's PhotoMetricDistortion: each step applied with probability 1/2.

    Brightness ±32, then contrast ×[0.5, 1.5] either first or last (random order),
    saturation ×[0.5, 1.5] and hue ±18 (OpenCV's 0..179 hue scale) in between.
    """
    if rng.integers(2):
        img = _affine(img, beta=rng.uniform(-32, 32))
    contrast_first = bool(rng.integers(2))
    if contrast_first and rng.integers(2):
        img = _affine(img, alpha=rng.uniform(0.5, 1.5))
    if rng.integers(2):
        hsv = cv2.cvtColor(img, cv2.COLOR_RGB2HSV)
        hsv[..., 1] = _affine(hsv[..., 1], alpha=rng.uniform(0.5, 1.5))
        img = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)
    if rng.integers(2):
        hsv = cv2.cvtColor(img, cv2.COLOR_RGB2HSV)
        hsv[..., 0] = (hsv[..., 0].astype(np.int32) + int(rng.integers(-18, 19))) % 180
        img = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)
    if not contrast_first and rng.integers(2):
        img = _affine(img, alpha=rng.uniform(0.5, 1.5))
    return img


def pad_to(
    img: np.ndarray, label: np.ndarray, size: int | tuple[int, int], ignore_index: int = IGNORE_INDEX
) -> tuple[np.ndarray, np.ndarray]:
    """Pad bottom/right up to at least (h, w): image with 0, label with ``ignore_index``.

    The label padding must be ignored by the loss (the research code padded with 1, which
    taught the model that borders are class 1).
    """
    size_h, size_w = _hw(size)
    pad_h, pad_w = max(size_h - img.shape[0], 0), max(size_w - img.shape[1], 0)
    if pad_h == 0 and pad_w == 0:
        return img, label
    img = cv2.copyMakeBorder(img, 0, pad_h, 0, pad_w, cv2.BORDER_CONSTANT, value=(0, 0, 0))
    label = cv2.copyMakeBorder(label, 0, pad_h, 0, pad_w, cv2.BORDER_CONSTANT, value=ignore_index)
    return img, label


def resize_short_side(img: np.ndarray, short: int) -> np.ndarray:
    """Bilinear keep-ratio resize so that the short side is ``short`` (ADE20K evaluation)."""
    h, w = img.shape[:2]
    factor = short / min(h, w)
    return _resize(img, (int(w * factor + 0.5), int(h * factor + 0.5)), cv2.INTER_LINEAR)


def resize_exact(img: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear resize to exactly (w, h), aspect not kept."""
    return _resize(img, (int(size[0]), int(size[1])), cv2.INTER_LINEAR)


def to_tensor(img: np.ndarray) -> torch.Tensor:
    """(H, W, 3) uint8 → float32 (3, H, W) in [-1, 1], the range the VAE encoder expects."""
    return torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1))).float().div_(127.5).sub_(1.0)


def label_to_tensor(label: np.ndarray) -> torch.Tensor:
    """(H, W) integer label → int64 tensor, what cross-entropy takes."""
    return torch.from_numpy(np.ascontiguousarray(label).astype(np.int64))


class SampleTransform(Protocol):
    """What a dataset applies to one decoded sample: (image, label or None, rng) → tensors."""

    def __call__(
        self, img: np.ndarray, label: np.ndarray | None, rng: np.random.Generator
    ) -> tuple[torch.Tensor, torch.Tensor | None]: ...


class TrainTransform:
    """Random resize → cat_max_ratio crop → flip → photometric → pad to the crop size."""

    def __init__(
        self,
        crop_size: int | tuple[int, int] = 512,
        scale: tuple[int, int] = (2048, 512),
        ratio_range: tuple[float, float] = (0.5, 2.0),
        cat_max_ratio: float = 0.75,
        flip_prob: float = 0.5,
        photometric: bool = True,
        ignore_index: int = IGNORE_INDEX,
    ) -> None:
        self.crop_size = _hw(crop_size)
        self.scale = scale
        self.ratio_range = ratio_range
        self.cat_max_ratio = cat_max_ratio
        self.flip_prob = flip_prob
        self.photometric = photometric
        self.ignore_index = ignore_index

    def __call__(
        self, img: np.ndarray, label: np.ndarray | None, rng: np.random.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if label is None:
            raise ValueError("TrainTransform needs a label; unlabelled images can only be evaluated or predicted")
        img, label = random_resize(img, label, rng, self.scale, self.ratio_range)
        img, label = random_crop(img, label, rng, self.crop_size, self.cat_max_ratio, self.ignore_index)
        img, label = random_flip(img, label, rng, self.flip_prob)
        if self.photometric:
            img = photometric_distortion(img, rng)
        img, label = pad_to(img, label, self.crop_size, self.ignore_index)
        return to_tensor(img), label_to_tensor(label)


class EvalTransform:
    """Resize the image only; the label stays at original resolution, where the metric is computed.

    ``resize``: None (unchanged), ("short", n) for short side n with aspect kept, or
    ("exact", (w, h)).
    """

    def __init__(self, resize: EvalResize = None) -> None:
        if resize is not None and (len(resize) != 2 or resize[0] not in ("short", "exact")):
            raise ValueError(f"eval resize must be None, ('short', n) or ('exact', (w, h)), got {resize!r}")
        self.resize = resize

    def __call__(
        self, img: np.ndarray, label: np.ndarray | None, rng: np.random.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.resize is not None:
            mode, size = self.resize
            img = resize_short_side(img, int(size)) if mode == "short" else resize_exact(img, tuple(size))
        return to_tensor(img), None if label is None else label_to_tensor(label)
