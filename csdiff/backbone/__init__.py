"""Frozen Stable Diffusion backbone: loading, activation names and hooks, guided variants, the extractor.

Pure torch + diffusers: nothing here imports Lightning.
"""

from csdiff.backbone.cache import FeatureCache
from csdiff.backbone.extractor import DiffusionFeatureExtractor
from csdiff.backbone.loading import BackboneNotAvailableError, BackboneSpec, load_controlnet, load_sd_components
from csdiff.backbone.lora import LoRA, LoRAError
from csdiff.backbone.names import LAYER_SETS, UP_CROSS, UnknownLayerError, enumerate_activations, resolve_layers
from csdiff.backbone.variants import ControlNet, Variant

__all__ = [
    "BackboneNotAvailableError",
    "BackboneSpec",
    "ControlNet",
    "DiffusionFeatureExtractor",
    "FeatureCache",
    "LAYER_SETS",
    "LoRA",
    "LoRAError",
    "UP_CROSS",
    "UnknownLayerError",
    "Variant",
    "enumerate_activations",
    "load_controlnet",
    "load_sd_components",
    "resolve_layers",
]
