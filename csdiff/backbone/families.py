"""What differs between model families, in one place: one ``Family`` per architecture.

Every family shares the name grammar, hooks, noise, chains and tasks; a family supplies only
its named layer sets, the up-levels of ``up_cross``, how a prompt becomes the UNet's text
conditioning, and the extra UNet arguments that conditioning needs. The family is read from
the UNet's configuration, never from a model's name.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from csdiff.backbone.prompts import encode_prompt, encode_prompt_sdxl

# A prompt → (text embedding (1, tokens, D), pooled embedding (1, P) or None), given the
# tokenizers and text encoders of the family, in order.
Encoder = Callable[[tuple, tuple, str], tuple[torch.Tensor, "torch.Tensor | None"]]


def _encode_sd(tokenizers: tuple, encoders: tuple, prompt: str) -> tuple[torch.Tensor, None]:
    return encode_prompt(tokenizers[0], encoders[0], prompt), None


@dataclass(frozen=True)
class Family:
    """One architecture family: its named sets, ``up_cross`` levels and text conditioning."""

    name: str
    layer_sets: dict[str, tuple[str, ...]]
    up_cross_levels: tuple[int, ...]
    encode: Encoder
    time_ids: bool = False  # SDXL: pooled text embedding and six time ids as added conditioning

    def added_conditions(
        self,
        pooled: torch.Tensor | None,
        img_size: int,
        batch: int,
        dtype: torch.dtype,
        device,
        time_ids: Sequence[int] | None = None,
    ) -> dict:
        """Extra UNet/ControlNet arguments: none for SD 1.x/2.x; for SDXL the pooled embedding and
        the time ids (original height, width, crop top, left, target height, width), by default
        the image at ``img_size``, uncropped."""
        if not self.time_ids:
            return {}
        values = [float(v) for v in (time_ids or (img_size, img_size, 0, 0, img_size, img_size))]
        time_ids = torch.tensor([values], device=device, dtype=dtype)
        text = pooled.to(device, dtype).expand(batch, -1)
        return {"added_cond_kwargs": {"text_embeds": text, "time_ids": time_ids.expand(batch, -1)}}


SD = Family(
    name="sd",
    layer_sets={
        "legacy": (
            "up-level0-upsampler-out",
            "up-level1-upsampler-out",
            "up-level2-upsampler-out",
            "up-level3-repeat2-vit-out",
        ),
        "practical": (
            "up-level1-repeat1-vit-block0-cross-q",
            "up-level1-repeat2-res-out",
            "up-level2-repeat1-vit-block0-cross-q",
            "up-level3-repeat0-vit-block0-self-k",
        ),
    },
    up_cross_levels=(1, 2),
    encode=_encode_sd,
)
SDXL = Family(
    name="sdxl",
    # `legacy`'s analogue: the up-level samplers and the finest attention output (its last
    # up-level has no attention); `practical` as the companion paper's code defines it.
    layer_sets={
        "legacy": ("up-level0-upsampler-out", "up-level1-upsampler-out", "up-level1-repeat2-vit-out"),
        "practical": (
            "up-level0-repeat0-vit-block7-out",
            "up-level0-repeat0-vit-block5-out",
            "up-level1-repeat0-vit-block0-cross-q",
            "up-level1-repeat0-vit-block0-out",
        ),
    },
    up_cross_levels=(0, 1),
    encode=encode_prompt_sdxl,
    time_ids=True,
)
FAMILIES = {f.name: f for f in (SD, SDXL)}


def family_of_config(unet_config: dict) -> Family:
    """SDXL for UNets conditioned on pooled text and time ids, else SD 1.x / 2.x."""
    return SDXL if unet_config.get("addition_embed_type") == "text_time" else SD


def family_of(unet: Any) -> Family:
    return family_of_config(unet.config)
