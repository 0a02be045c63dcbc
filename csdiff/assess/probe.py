"""A 1×1-convolution probe: how much segmentation a frozen feature map carries, linearly.

Used to show that the tiny backbone's features carry image content (a random-weight copy
scores near chance), and how much of it survives as the noise level grows.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, UNet2DConditionModel

from csdiff.backbone import DiffusionFeatureExtractor
from csdiff.backbone.tiny import TINY_SD_DIR, UNET_CONFIG, VAE_CONFIG
from csdiff.data.synthetic import SHAPE_CLASSES, render_shapes
from csdiff.metrics import SegmentationMetrics


def random_weight_copy(folder: str | Path, seed: int = 0) -> Path:
    """The tiny model with its UNet and VAE re-initialised: the chance-level reference.

    Same architecture, tokenizer, text encoder and VAE scaling factor; written to ``folder``.
    """
    folder = Path(folder)
    shutil.copytree(TINY_SD_DIR, folder, dirs_exist_ok=True)
    torch.manual_seed(seed)
    UNet2DConditionModel(**UNET_CONFIG).save_pretrained(folder / "unet")
    scaling = AutoencoderKL.load_config(TINY_SD_DIR / "vae")["scaling_factor"]
    vae = AutoencoderKL(**VAE_CONFIG)
    vae.register_to_config(scaling_factor=scaling)
    vae.save_pretrained(folder / "vae")
    return folder


def shapes_probe_data(n: int, size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Synthetic shapes: images (n,3,size,size) in [-1,1] and labels (n,size,size)."""
    rng = np.random.default_rng(seed)
    samples = [render_shapes(rng, size) for _ in range(n)]
    images = torch.from_numpy(np.stack([s.image for s in samples])).permute(0, 3, 1, 2).float() / 127.5 - 1
    labels = torch.from_numpy(np.stack([s.label for s in samples])).long()
    return images, labels


@torch.no_grad()
def _features(extractor: DiffusionFeatureExtractor, images: torch.Tensor, batch: int = 16) -> torch.Tensor:
    """All layers of the first variant, upsampled to the finest grid and concatenated."""
    out = []
    for i in range(0, len(images), batch):
        feats = next(iter(extractor(images[i : i + batch]).values()))
        size = max((f.shape[-2:] for f in feats.values()), key=lambda s: s[0] * s[1])
        out.append(
            torch.cat(
                [F.interpolate(f.float(), size=size, mode="bilinear", align_corners=False) for f in feats.values()], 1
            )
        )
    return torch.cat(out)


def linear_probe_miou(
    extractor: DiffusionFeatureExtractor,
    train: tuple[torch.Tensor, torch.Tensor],
    val: tuple[torch.Tensor, torch.Tensor],
    num_classes: int = len(SHAPE_CLASSES),
    steps: int = 300,
    lr: float = 1e-2,
    seed: int = 0,
) -> float:
    """Train a 1×1 conv on frozen (standardised) features; return validation mIoU."""
    x_train, x_val = _features(extractor, train[0]), _features(extractor, val[0])
    mean, std = x_train.mean((0, 2, 3), keepdim=True), x_train.std((0, 2, 3), keepdim=True) + 1e-6
    x_train, x_val = (x_train - mean) / std, (x_val - mean) / std
    torch.manual_seed(seed)
    probe = torch.nn.Conv2d(x_train.shape[1], num_classes, 1)
    opt = torch.optim.Adam(probe.parameters(), lr=lr)
    for _ in range(steps):
        logits = F.interpolate(probe(x_train), size=train[1].shape[-2:], mode="bilinear", align_corners=False)
        loss = F.cross_entropy(logits, train[1])
        opt.zero_grad()
        loss.backward()
        opt.step()
    metric = SegmentationMetrics(num_classes)
    with torch.no_grad():
        logits = F.interpolate(probe(x_val), size=val[1].shape[-2:], mode="bilinear", align_corners=False)
        metric.update(logits.argmax(1), val[1])
    return float(metric.compute()["mIoU"])
