"""DDPM-segmentation's features from an ADM checkpoint, and the feature folder that holds them.

As yandex-research/ddpm-segmentation does it (src/feature_extractors.py ``FeatureExtractorDDPM``,
``collect_features``; train_interpreter.py ``share_noise``): the image in [-1, 1] is noised to
timestep t by DDPM's ``q_sample`` with one noise map drawn from a seed and shared by every
image, the UNet runs once, and the outputs of the chosen ``output_blocks`` are the features,
upsampled bilinearly to the image size and concatenated in block order. Blocks 5, 6, 7, 8, 12 of
the LSUN models give 1024 + 512 + 512 + 512 + 256 = 2816 channels per timestep.

The folder stores each block at its native size (fp16, keys ``ddpm/output_blocks.NN``), as
csdiff's other feature folders do; the label-scarce datamodule reads it as ``extra_features``
and upsamples per pixel exactly as ``collect_features`` would.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from csdiff.backbone.adm import (
    LSUN_256,
    ADMConfig,
    build_unet,
    load_adm_unet,
    output_block_modules,
    weights_id,
)
from csdiff.backbone.store import FeatureFolder, folder_description
from csdiff.io import remove_stale_temporaries

SOURCE = "ddpm"  # the key prefix in a feature folder; the datamodule's extra source
PAPER_BLOCKS = (5, 6, 7, 8, 12)  # DDPM-segmentation's experiments/{horse_21,bedroom_28}/ddpm.json
STEPS = 1000  # guided-diffusion's diffusion_steps for the LSUN models, linear schedule


def layer_name(block: int) -> str:
    """Zero-padded, so that a safetensors file (keys sorted by name) lists blocks in order."""
    return f"output_blocks.{block:02d}"


def q_sample_coefficients(timestep: int, steps: int = STEPS) -> tuple[float, float]:
    """(sqrt(ᾱ_t), sqrt(1 − ᾱ_t)) of guided-diffusion's linear schedule, in float64 and rounded
    to float32 as its ``_extract_into_tensor`` does (diffusers' schedulers use float32 throughout)."""
    scale = 1000 / steps
    betas = torch.linspace(scale * 1e-4, scale * 0.02, steps, dtype=torch.float64)
    alpha_bar = torch.cumprod(1 - betas, 0)[timestep]
    return float(alpha_bar.sqrt().float()), float((1 - alpha_bar).sqrt().float())


class _Captured(Exception):
    """Raised by the last hook: later blocks cannot change the features, so the UNet stops there."""


def capture_output_blocks(
    unet: nn.Module, config: ADMConfig, blocks: Sequence[int], run: Callable[[], object]
) -> dict[int, Tensor]:
    """The outputs of guided-diffusion's ``output_blocks[i]`` for ``i`` in ``blocks`` during ``run()``."""
    modules, last = output_block_modules(unet, config), max(blocks)
    found: dict[int, Tensor] = {}

    def hook(index: int):
        def save(module: nn.Module, args: tuple, output: Tensor) -> None:
            found[index] = output
            if index == last:
                raise _Captured

        return save

    handles = [modules[i].register_forward_hook(hook(i)) for i in blocks]
    try:
        run()
    except _Captured:
        pass
    finally:
        for handle in handles:
            handle.remove()
    return found


def check_blocks(blocks: Sequence[int], config: ADMConfig) -> list[int]:
    """The blocks in model order (DDPM-segmentation concatenates in that order), checked."""
    blocks = [int(b) for b in blocks]
    bad = [b for b in blocks if not 0 <= b < config.num_output_blocks]
    if not blocks or bad or len(set(blocks)) != len(blocks):
        raise ValueError(
            f"blocks must be distinct output_blocks indices in [0, {config.num_output_blocks}), got {blocks}"
        )
    return sorted(blocks)


def feature_shapes(config: ADMConfig, blocks: Sequence[int]) -> dict[str, tuple[int, int, int]]:
    """(C, h, w) of each block at ``config.image_size``, from a weightless (meta) UNet."""
    blocks = check_blocks(blocks, config)
    unet = build_unet(config, "meta")
    image = torch.zeros(1, config.in_channels, config.image_size, config.image_size, device="meta")
    found = capture_output_blocks(
        unet, config, blocks, lambda: unet(image, torch.zeros(1, dtype=torch.long, device="meta"))
    )
    return {layer_name(b): tuple(int(d) for d in found[b].shape[1:]) for b in blocks}


class ADMFeatureExtractor(nn.Module):
    """DDPM-segmentation's feature extractor on a frozen ADM UNet (see the module docstring).

    Args:
        checkpoint: guided-diffusion ``.pt`` file (``lsun_horse.pt``, ``lsun_bedroom.pt``).
        blocks: ``output_blocks`` indices; the paper's: 5, 6, 7, 8, 12.
        timestep: t in [0, 1000) of ``q_sample``.
        seed: of the one (1, 3, H, W) noise map shared by all images (drawn on the CPU, so the
            features do not depend on the device or on which images share a batch).
        config: the architecture (``LSUN_256`` for the LSUN models).
    """

    def __init__(
        self,
        checkpoint: str | Path,
        blocks: Sequence[int] = PAPER_BLOCKS,
        timestep: int = 50,
        seed: int = 0,
        config: ADMConfig = LSUN_256,
    ) -> None:
        super().__init__()
        if not 0 <= timestep < STEPS:
            raise ValueError(f"timestep must lie in [0, {STEPS}), got {timestep}")
        self.config, self.checkpoint, self.timestep, self.seed = config, str(checkpoint), int(timestep), int(seed)
        self.blocks = check_blocks(blocks, config)
        self.unet = load_adm_unet(checkpoint, config)
        self.weights_id = weights_id(checkpoint, config)
        size = config.image_size
        noise = torch.randn(1, config.in_channels, size, size, generator=torch.Generator().manual_seed(self.seed))
        self.register_buffer("noise", noise, persistent=False)
        self.coefficients = q_sample_coefficients(self.timestep)

    @property
    def layers(self) -> list[str]:
        return [layer_name(b) for b in self.blocks]

    def train(self, mode: bool = True) -> ADMFeatureExtractor:  # frozen: no dropout, ever
        return super().train(False)

    def noisy(self, images: Tensor) -> Tensor:
        """x_t = sqrt(ᾱ_t)·x_0 + sqrt(1 − ᾱ_t)·ε, ε the shared noise map."""
        size = self.config.image_size
        if images.ndim != 4 or tuple(images.shape[1:]) != (self.config.in_channels, size, size):
            raise ValueError(
                f"images must be (B, {self.config.in_channels}, {size}, {size}) in [-1, 1], got {tuple(images.shape)}"
            )
        keep, noise = self.coefficients
        return keep * images.float() + noise * self.noise

    @torch.no_grad()
    def forward(self, images: Tensor) -> dict[str, Tensor]:
        """Each block's output at its native size: ``{layer: (B, C, h, w)}``, float32."""
        x = self.noisy(images.to(self.noise.device))
        t = torch.full((x.shape[0],), self.timestep, dtype=torch.long, device=x.device)
        found = capture_output_blocks(self.unet, self.config, self.blocks, lambda: self.unet(x, t))
        return {layer_name(b): found[b].float() for b in self.blocks}

    def upsampled(self, images: Tensor) -> Tensor:
        """DDPM-segmentation's ``collect_features``: every block upsampled bilinearly
        (``align_corners=False``) to the image size and concatenated, (B, ΣC, H, W)."""
        size = images.shape[-2:]
        return torch.cat([F.interpolate(x, size=size, mode="bilinear") for x in self(images).values()], dim=1)

    def feature_shapes(self) -> dict[str, tuple[int, int, int]]:
        return feature_shapes(self.config, self.blocks)

    def describe(self) -> dict:
        """What fixes the features, in the shape csdiff's feature folders compare (backbone
        weights by fingerprint, layers, image size, timestep, noise)."""
        size = self.config.image_size
        return dict(
            family="adm",
            backbone=dict(model=self.checkpoint, weights_id=self.weights_id, config=asdict(self.config)),
            layers=self.layers,
            img_size=size,
            timestep=self.timestep,
            noise=dict(seed=self.seed, shape=[1, self.config.in_channels, size, size], schedule="linear", steps=STEPS),
            dtype="float32",
        )


def write_feature_folder(
    extractor: ADMFeatureExtractor,
    items: Sequence[tuple[str, str]],
    output: str | Path,
    read: Callable[[str], Tensor],
    batch_size: int = 1,
    progress: Callable[[Iterable[int]], Iterable[int]] = iter,
) -> tuple[int, int]:
    """Write the features of ``items`` ((name, image path)) into the feature folder ``output``,
    one atomic fp16 file per image; returns (written, already there).

    ``read(path)`` gives a (3, H, W) float image in [-1, 1]. The folder's manifest binds it to
    this extractor (a folder of other blocks, timestep, seed or weights is refused), and files
    already complete are kept, so a stopped run is resumed by running it again.
    """
    folder = FeatureFolder(output)
    folder.prepare(folder_description(extractor), dict(items))
    remove_stale_temporaries(folder.folder)
    todo = folder.missing(items, [f"{SOURCE}/{layer}" for layer in extractor.layers])
    metadata = {"csdiff": json.dumps(extractor.describe())}
    for start in progress(range(0, len(todo), batch_size)):
        batch = todo[start : start + batch_size]
        features = extractor(torch.stack([read(path) for _, path in batch]))
        for i, (name, _) in enumerate(batch):
            folder.write(name, {SOURCE: {layer: x[i] for layer, x in features.items()}}, metadata)
    return len(todo), len(items) - len(todo)
