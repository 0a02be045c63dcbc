"""Typed plain-dict options shared by the tasks.

TypedDicts, not classes: jsonargparse checks every key (a typo is an error that names it),
while the values stay ordinary dicts, so checkpoints' hyperparameters load with
``torch.load(weights_only=True)``.
"""

from __future__ import annotations

from typing import Literal, TypedDict


class LoRAOptions(TypedDict, total=False):
    path: str
    scale: float


class ControlNetOptions(TypedDict, total=False):
    model: str
    condition: Literal["canny", "provided"]
    low: int
    high: int
    scale: float


class VariantOptions(TypedDict, total=False):
    name: str
    prompt: str
    seed: int
    loras: list[LoRAOptions]
    controlnets: list[ControlNetOptions]
    denoise_from: int | None
    weights: str | None


class BackboneOptions(TypedDict, total=False):
    """Arguments of :class:`csdiff.backbone.DiffusionFeatureExtractor` other than layers and variants."""

    model: str
    base_model: str | None
    unet: str | None
    img_size: int
    timestep: int
    latent: Literal["mean", "sample", "variant_sample"]
    vae_seed: int
    fresh_noise: bool
    noise: bool
    time_ids: list[int] | None
    dtype: Literal["float32", "float16", "bfloat16"]
    batch_variants: bool
    channels_last: bool
    compile: bool | str
    guidance: float | None


class GateOptions(TypedDict, total=False):
    """Arguments of :class:`csdiff.models.GatedFusion` other than channels and variant count."""

    proj_blocks: int
    post_blocks: int
    num_assigners: int
    assigner_channels: int
    dropout: float
    sparsity_weight: float
    diversity_weight: float
