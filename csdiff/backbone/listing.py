"""The table of every activation a model offers at an image size (``csdiff layers``)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from csdiff.backbone.capture import ActivationCapture
from csdiff.backbone.loading import SDComponents
from csdiff.backbone.names import UP_CROSS, enumerate_activations, up_cross_maps
from csdiff.backbone.prompts import encode_prompt


@dataclass(frozen=True)
class LayerInfo:
    name: str
    shape: tuple[int, int, int]  # (C, H, W) for one image
    module: str


@torch.no_grad()
def list_layers(parts: SDComponents, img_size: int) -> list[LayerInfo]:
    """Run the UNet once on a blank latent with hooks on every feature; maps' shapes follow from their grid.

    Attention maps are not computed (a 64² self-map has 4096 channels): their shape is
    (N_keys, H, W) with N_keys = H·W for self-attention and the prompt's 77 tokens for cross.
    """
    unet = parts.unet
    table = enumerate_activations(unet)
    plain = [n for n, a in table.items() if a.kind not in ("self-map", "cross-map")]
    factor = 2 ** (len(parts.vae.config.block_out_channels) - 1)
    h = img_size // factor
    param = next(unet.parameters())
    latent = torch.zeros(1, unet.config.in_channels, h, h, device=param.device, dtype=param.dtype)
    emb = encode_prompt(parts.tokenizer, parts.text_encoder, "").to(param.device, param.dtype)
    with ActivationCapture(unet, plain) as capture:
        unet(latent, 0, encoder_hidden_states=emb)
    shapes = {n: tuple(f.shape[1:]) for n, f in capture.features.items()}
    tokens = emb.shape[1]
    rows = []
    for name, act in table.items():
        if act.kind in ("self-map", "cross-map"):
            _, gh, gw = shapes[name.rsplit("-", 2)[0] + "-out"]
            keys = gh * gw if act.kind == "self-map" else tokens
            shape = (keys, gh, gw)
        else:
            shape = shapes[name]
        rows.append(LayerInfo(name, shape, act.module))
    n_levels = len(up_cross_maps(unet))
    rows.append(LayerInfo(UP_CROSS, (tokens * n_levels, h, h), "cross-attention maps of up-level1 and up-level2"))
    return rows
