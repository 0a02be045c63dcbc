"""Shapes of activations without computing them, and the table of every activation (``csdiff layers``).

Shapes come from one UNet call under PyTorch's ``FakeTensorMode``: every operator runs on
shape-only tensors, so the call costs milliseconds and no memory at any model size, image
size or dtype (a real float16 call on a CPU would take minutes at SD 1.5 size), and the
shapes are exactly the ones the real hooks see.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode

from csdiff.backbone.capture import ActivationCapture
from csdiff.backbone.families import family_of
from csdiff.backbone.loading import SDComponents
from csdiff.backbone.names import UP_CROSS, enumerate_activations, up_cross_maps, up_cross_problem


@dataclass(frozen=True)
class LayerInfo:
    name: str
    shape: tuple[int, int, int]  # (C, H, W) for one image
    module: str


def activation_shapes(
    unet: nn.Module, names: Sequence[str], latent_size: tuple[int, int], prompt_window: int = 77
) -> dict[str, tuple[int, int, int]]:
    """(C, H, W) of each named activation for one image whose latent is ``latent_size``."""
    cross_dim = unet.config.cross_attention_dim
    dtype = next(unet.parameters()).dtype
    with FakeTensorMode(allow_non_fake_inputs=True):
        latent = torch.zeros(1, unet.config.in_channels, *latent_size, dtype=dtype)
        emb = torch.zeros(1, prompt_window, cross_dim, dtype=dtype)
        added = {}
        if family_of(unet).time_ids:  # pooled text embedding + 6 time ids
            pooled = unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim
            added = {
                "added_cond_kwargs": {
                    "text_embeds": torch.zeros(1, pooled, dtype=dtype),
                    "time_ids": torch.zeros(1, 6, dtype=dtype),
                }
            }
        with ActivationCapture(unet, list(names), latent_size=latent_size, prompt_window=prompt_window) as capture:
            unet(latent, 0, encoder_hidden_states=emb, **added)
        return {name: tuple(int(d) for d in capture.features[name].shape[1:]) for name in names}


def check_img_size(img_size: int, vae: nn.Module, unet: nn.Module) -> None:
    """The extractor's rule: an image side must survive the VAE's and the UNet's downsamplings
    exactly (a positive multiple of their product), or skip connections do not line up."""
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    downsamplings = len(unet.config.block_out_channels) - 1
    multiple = factor * 2**downsamplings
    if img_size <= 0 or img_size % multiple:
        raise ValueError(
            f"img_size={img_size} does not suit this model: it must be a positive multiple of {multiple} "
            f"(VAE ×{factor}, then {downsamplings} UNet downsamplings)"
        )


def list_layers(parts: SDComponents, img_size: int) -> list[LayerInfo]:
    """Every activation name of a model with its shape at ``img_size`` and its module path
    (``up_cross`` last, when the model has it)."""
    check_img_size(img_size, parts.vae, parts.unet)
    table = enumerate_activations(parts.unet)
    factor = 2 ** (len(parts.vae.config.block_out_channels) - 1)
    latent = (img_size // factor, img_size // factor)
    up_cross = [UP_CROSS] if up_cross_problem(parts.unet) is None else []
    shapes = activation_shapes(parts.unet, [*table, *up_cross], latent, parts.tokenizer.model_max_length)
    rows = [LayerInfo(name, shapes[name], act.module) for name, act in table.items()]
    if up_cross:
        levels = " and ".join(f"up-level{level}" for level in up_cross_maps(parts.unet))
        rows.append(LayerInfo(UP_CROSS, shapes[UP_CROSS], f"cross-attention maps of {levels}"))
    return rows
