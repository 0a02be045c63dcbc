"""Shapes of activations without computing them, and the table of every activation (``csdiff layers``).

Shapes come from one UNet call under PyTorch's ``FakeTensorMode``: every operator runs on
shape-only tensors, so the call costs milliseconds and no memory at any model size, image
size or dtype (a real float16 call on a CPU would take minutes at SD 1.5 size), and the
shapes are exactly the ones the real hooks see.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode

from csdiff.backbone.capture import ActivationCapture
from csdiff.backbone.families import family_of
from csdiff.backbone.loading import SDComponents
from csdiff.backbone.names import (
    AGGREGATES,
    UP_CROSS,
    aggregate_problem,
    enumerate_activations,
    up_cross_maps,
)


@dataclass(frozen=True)
class LayerInfo:
    name: str
    shape: tuple[int, int, int]  # (C, H, W) for one image
    module: str


def activation_shapes(
    unet: nn.Module, names: Sequence[str], latent_size: tuple[int, int], prompt_window: int = 77
) -> dict[str, tuple[int, int, int]]:
    """(C, H, W) of each named activation for one image whose latent is ``latent_size``."""
    family = family_of(unet)
    dtype = next(unet.parameters()).dtype
    with FakeTensorMode(allow_non_fake_inputs=True):
        latent, emb, added = family.shape_inputs(unet, latent_size, prompt_window, dtype)
        with ActivationCapture(unet, list(names), latent_size=latent_size, prompt_window=prompt_window) as capture:
            family.run(unet, latent, 0, emb, added, {})
        return {name: tuple(int(d) for d in capture.features[name].shape[1:]) for name in names}


def vae_factor(vae: nn.Module | None) -> int:
    """How many pixels one latent cell covers per side: the VAE's downsampling (1 in pixel space)."""
    return 1 if vae is None else 2 ** (len(vae.config.block_out_channels) - 1)


def check_img_size(img_size: int, vae: nn.Module | None, unet: nn.Module) -> None:
    """The extractor's rule: an image side must survive the VAE's and the denoiser's downsamplings
    exactly (a positive multiple of their product), or skip connections (or patches) do not line up."""
    factor = vae_factor(vae)
    shrink = family_of(unet).downsampling(unet)
    multiple = factor * shrink
    if img_size <= 0 or img_size % multiple:
        how = (
            f"patches of {shrink}"
            if family_of(unet).grammar == "dit"
            else f"{shrink.bit_length() - 1} UNet downsamplings"
        )
        raise ValueError(
            f"img_size={img_size} does not suit this model: it must be a positive multiple of {multiple} "
            f"(VAE ×{factor}, then {how})"
        )


def list_layers(parts: SDComponents, img_size: int) -> list[LayerInfo]:
    """Every activation name of a model with its shape at ``img_size`` and its module path
    (``up_cross`` or ``cross_maps`` last, when the model has it)."""
    check_img_size(img_size, parts.vae, parts.unet)
    table = enumerate_activations(parts.unet)
    factor = vae_factor(parts.vae)
    latent = (img_size // factor, img_size // factor)
    aggregates = [name for name in AGGREGATES if aggregate_problem(parts.unet, name) is None]
    shapes = activation_shapes(parts.unet, [*table, *aggregates], latent, prompt_window(parts))
    rows = [LayerInfo(name, shapes[name], act.module) for name, act in table.items()]
    for name in aggregates:
        if name == UP_CROSS:
            where = "cross-attention maps of " + " and ".join(f"up-level{level}" for level in up_cross_maps(parts.unet))
        else:
            blocks = ", ".join(map(str, parts.family.cross_map_blocks))
            where = f"image-to-text attention of blocks {blocks}, averaged"
        rows.append(LayerInfo(name, shapes[name], where))
    return rows


def prompt_window(parts: SDComponents) -> int:
    """Text tokens per prompt window of a loaded model (see :meth:`Family.prompt_window`)."""
    return parts.family.prompt_window(parts.tokenizers)
