"""What differs between model families, in one place: one ``Family`` per architecture.

Every family shares hooks, noise, chains and tasks; a family supplies only its name grammar
(``unet``: SD's levels; ``dit``: a diffusion transformer's blocks), its named layer sets, the
up-levels of ``up_cross``, how a prompt becomes the denoiser's text conditioning, the extra
arguments that conditioning needs, and how the denoiser is called. The family is read from the
denoiser's configuration, never from a model's name.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from csdiff.backbone.prompts import (
    encode_prompt,
    encode_prompt_flux,
    encode_prompt_sd3,
    encode_prompt_sdxl,
    encode_prompt_t5,
)

# A prompt → (text embedding (1, tokens, D), a second tensor or None: SDXL's pooled embedding
# (1, P), a T5 family's attention mask (1, tokens)), given the family's tokenizers and text
# encoders, in order.
Encoder = Callable[[tuple, tuple, str], tuple[torch.Tensor, "torch.Tensor | None"]]


# FLUX.1-dev's distilled guidance: its pipeline's default ``guidance_scale``.
FLUX_GUIDANCE = 3.5


def _pack(latent: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) → (B, h/2 · w/2, 4C): one token per 2×2 patch, row-major, as FLUX's pipelines pack."""
    b, c, h, w = latent.shape
    return latent.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


def _flux_ids(latent: torch.Tensor, text_tokens: int) -> dict:
    """FLUX's rotary position ids: (0, row, column) per image token, 0 for text."""
    h, w = latent.shape[-2] // 2, latent.shape[-1] // 2
    rows = torch.arange(h, device=latent.device)[:, None].expand(h, w)
    cols = torch.arange(w, device=latent.device)[None, :].expand(h, w)
    img_ids = torch.stack([torch.zeros_like(rows), rows, cols], dim=-1).reshape(-1, 3).to(latent.dtype)
    return {"img_ids": img_ids, "txt_ids": torch.zeros(text_tokens, 3, device=latent.device, dtype=latent.dtype)}


def _run_flux(model: nn.Module, noisy: torch.Tensor, steps: torch.Tensor, emb: torch.Tensor, added: dict, extra: dict):
    """FLUX called as its pipeline calls it: the latent packed into 2×2 patches, position ids,
    the timestep σ·1000 given as σ, guidance only to guidance-distilled models, ControlNet samples
    in ``extra``; the output unpacked."""
    b, c, h, w = noisy.shape
    out = model(
        _pack(noisy),
        encoder_hidden_states=emb,
        pooled_projections=added["pooled_projections"],
        timestep=steps / 1000,
        guidance=added["guidance"] if model.config.guidance_embeds else None,
        **_flux_ids(noisy, emb.shape[1]),
        **extra,
    ).sample
    return out.view(b, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)


def _encode_sd(tokenizers: tuple, encoders: tuple, prompt: str) -> tuple[torch.Tensor, None]:
    return encode_prompt(tokenizers[0], encoders[0], prompt), None


@dataclass(frozen=True)
class Family:
    """One architecture family: its name grammar, named sets, ``up_cross`` levels, text
    conditioning, noise and denoiser call."""

    name: str
    layer_sets: dict[str, tuple[str, ...]]
    up_cross_levels: tuple[int, ...]
    encode: Encoder
    time_ids: bool = False  # SDXL: pooled text embedding and six time ids as added conditioning
    grammar: str = "unet"  # "unet": levels, repeats and samplers (DESIGN §2); "dit": transformer blocks
    noise: str = "ddpm"  # "ddpm": x_t = √ᾱ_t·x_0 + √(1−ᾱ_t)·ε, DDIM chains; "flow": x_t = (1−σ)·x_0 + σ·ε, Euler chains
    # What csdiff does not run on this family yet (each refused with one line when asked for).
    unsupported: tuple[str, ...] = ()
    # Diffusion transformers: the blocks whose image-to-text attention maps ``cross_maps`` averages.
    cross_map_blocks: tuple[int, ...] = ()

    def prompt_window(self, tokenizers: Sequence) -> int:
        """How many text tokens the denoiser attends to per prompt window: CLIP's 77 (longer
        prompts are encoded in several windows, DESIGN §2), T5's whole prompt length, and for SD3
        CLIP's 77 followed by T5's tokens (its joint attention sees both)."""
        if self.name == "sd3":
            return tokenizers[0].model_max_length + tokenizers[-1].model_max_length
        return tokenizers[-1].model_max_length if self.name == "flux" else tokenizers[0].model_max_length

    def run(self, model: nn.Module, noisy: torch.Tensor, t, emb: torch.Tensor, added: dict, extra: dict):
        """One denoiser call at the model's timestep ``t`` (the integer step for DDPM families,
        σ·1000 for flow models); returns its ε, v or flow prediction, without a learned-variance
        half. ``added`` comes from :meth:`added_conditions`, ``extra`` holds ControlNet residuals."""
        if self.grammar == "unet":  # learned variance (IF): the ε half, as IF's pipeline takes it
            return model(noisy, t, encoder_hidden_states=emb, **extra, **added).sample[:, : noisy.shape[1]]
        steps = torch.full((noisy.shape[0],), float(t), device=noisy.device)
        if self.name == "flux":
            return _run_flux(model, noisy, steps, emb, added, extra)
        if self.name == "sd3":
            pooled = added["pooled_projections"]
            return model(noisy, encoder_hidden_states=emb, pooled_projections=pooled, timestep=steps, **extra).sample
        sizes = {"resolution": added["resolution"], "aspect_ratio": added["aspect_ratio"]}
        if not model.use_additional_conditions:
            sizes = {"resolution": None, "aspect_ratio": None}
        out = model(
            noisy,
            encoder_hidden_states=emb,
            timestep=steps,
            added_cond_kwargs=sizes,
            encoder_attention_mask=added["encoder_attention_mask"],
        ).sample
        return out[:, : noisy.shape[1]]  # learned variance: the mean (ε) half, as PixArt's pipeline takes it

    def control(self, net: nn.Module, noisy, t, emb, cond, scale: float, added: dict) -> dict:
        """One ControlNet's residuals at the model's timestep ``t``, as the denoiser's keyword
        arguments, called as the family's ControlNet pipeline calls it (``cond``: the condition
        map for UNets, its VAE latent for SD3 and FLUX)."""
        if self.grammar == "unet":
            down, mid = net(
                noisy,
                t,
                encoder_hidden_states=emb,
                controlnet_cond=cond,
                conditioning_scale=scale,
                return_dict=False,
                **added,
            )
            return {"down_block_additional_residuals": list(down), "mid_block_additional_residual": mid}
        steps = torch.full((noisy.shape[0],), float(t), device=noisy.device)
        if self.name == "flux":  # InstantX-style FLUX ControlNets: the packed condition latent
            block, single = net(
                _pack(noisy),
                controlnet_cond=_pack(cond),
                conditioning_scale=scale,
                encoder_hidden_states=emb,
                pooled_projections=added["pooled_projections"],
                timestep=steps / 1000,
                guidance=added["guidance"] if net.config.guidance_embeds else None,
                return_dict=False,
                **_flux_ids(noisy, emb.shape[1]),
            )
            return {
                "controlnet_block_samples": None if block is None else list(block),
                "controlnet_single_block_samples": None if single is None else list(single),
            }
        pooled = added["pooled_projections"]
        if net.config.force_zeros_for_pooled_projection:  # InstantX's SD3 ControlNets: zero pooled projection
            pooled = torch.zeros_like(pooled)
        (samples,) = net(
            noisy,
            controlnet_cond=cond,
            conditioning_scale=scale,
            encoder_hidden_states=emb if net.config.joint_attention_dim is not None else None,
            pooled_projections=pooled,
            timestep=steps,
            return_dict=False,
        )
        return {"block_controlnet_hidden_states": list(samples)}

    def shape_inputs(self, model: nn.Module, latent_size: Sequence[int], window: int, dtype: torch.dtype):
        """(latent, text embedding, added conditions) of one image: what a shape-only call needs,
        on the model's device (meta for shape-only models)."""
        config = model.config
        device = next(model.parameters()).device
        size = latent_size[0] * 8  # pixels (every family's VAE downsamples 8×); only embeddings read it

        def zeros(*shape, dtype=dtype):
            return torch.zeros(*shape, dtype=dtype, device=device)

        if self.name == "flux":
            latent = zeros(1, config.in_channels // 4, *latent_size)
            added = self.added_conditions(zeros(1, config.pooled_projection_dim), size, 1, dtype, device)
            return latent, zeros(1, window, config.joint_attention_dim), added
        latent = zeros(1, config.in_channels, *latent_size)
        if self.name == "sd3":
            added = self.added_conditions(zeros(1, config.pooled_projection_dim), size, 1, dtype, device)
            return latent, zeros(1, window, config.joint_attention_dim), added
        if self.grammar == "dit":
            added = self.added_conditions(torch.ones(1, window, device=device), size, 1, dtype, device)
            return latent, zeros(1, window, config.caption_channels), added
        # IF projects T5's states (encoder_hid_dim) to its cross-attention width
        emb = zeros(1, window, config.encoder_hid_dim or config.cross_attention_dim)
        if not self.time_ids:
            return latent, emb, {}
        pooled = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
        return latent, emb, self.added_conditions(zeros(1, pooled), size, 1, dtype, device)

    def native_latent_size(self, model: nn.Module) -> int:
        """The latent side the denoiser was trained at: its config's ``sample_size`` (FLUX's
        config has none: 128, its native 1024² through the ×8 VAE)."""
        return model.config.get("sample_size") or 128

    def downsampling(self, model: nn.Module) -> int:
        """How many times the denoiser shrinks its input's side: UNet downsamplings or the patch size."""
        if self.name == "flux":
            return 2  # its pipeline packs 2×2 latent patches into one token
        if self.grammar == "dit":
            return model.config.patch_size
        return 2 ** (len(model.config.block_out_channels) - 1)

    def added_conditions(
        self,
        pooled: torch.Tensor | None,
        img_size: int,
        batch: int,
        dtype: torch.dtype,
        device,
        time_ids: Sequence[int] | None = None,
        guidance: float | None = None,
    ) -> dict:
        """Extra denoiser/ControlNet arguments: none for SD 1.x/2.x; for SDXL the pooled embedding
        and the time ids (original height, width, crop top, left, target height, width), by
        default the image at ``img_size``, uncropped; for SD3 the pooled embedding. For PixArt
        (``pooled`` is then the prompt's attention mask) the mask and the resolution and
        aspect-ratio conditions of a square ``img_size``. FLUX: the pooled embedding and, for
        guidance-distilled models, ``guidance`` (FLUX.1-dev's pipeline default: 3.5)."""
        if self.name == "flux":
            scale = torch.full((batch,), FLUX_GUIDANCE if guidance is None else guidance, device=device)
            return {"pooled_projections": pooled.to(device, dtype).expand(batch, -1), "guidance": scale}
        if self.name == "sd3":
            return {"pooled_projections": pooled.to(device, dtype).expand(batch, -1)}
        if self.grammar == "dit":
            return {
                "encoder_attention_mask": pooled.to(device).expand(batch, -1),
                "resolution": torch.tensor([[img_size, img_size]], device=device, dtype=dtype).expand(batch, -1),
                "aspect_ratio": torch.ones((batch, 1), device=device, dtype=dtype),
            }
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
PIXART = Family(
    name="pixart",
    # csdiff's own choice (the companion paper defines no set for PixArt): block outputs evenly
    # spaced through the middle of PixArt-α/Σ's 28 blocks, where DiT features are most semantic.
    layer_sets={"practical": ("vit-block8-out", "vit-block12-out", "vit-block16-out", "vit-block20-out")},
    up_cross_levels=(),
    encode=encode_prompt_t5,
    grammar="dit",
    cross_map_blocks=(8, 12, 16, 20),
    unsupported=("ControlNet", "LoRA training", "own weights", "up_cross"),
)
SD3 = Family(
    name="sd3",
    # csdiff's own choice (no paper defines one for SD3): block outputs through the middle of
    # SD3-medium's 24 blocks.
    layer_sets={"practical": ("vit-block6-out", "vit-block9-out", "vit-block12-out", "vit-block15-out")},
    up_cross_levels=(),
    encode=encode_prompt_sd3,
    grammar="dit",
    noise="flow",
    cross_map_blocks=(6, 9, 12, 15),
    unsupported=("LoRA training", "own weights", "up_cross"),
)
FLUX = Family(
    name="flux",
    # csdiff's own choice (no paper defines one for FLUX): outputs of double-stream block 12 (of
    # 19) and of single-stream blocks 9, 19 and 28 (of 38).
    layer_sets={"practical": ("vit-block12-out", "single-block9-out", "single-block19-out", "single-block28-out")},
    up_cross_levels=(),
    encode=encode_prompt_flux,
    grammar="dit",
    noise="flow",
    cross_map_blocks=(6, 9, 12, 15),
    unsupported=("LoRA training", "own weights", "up_cross"),
)
IF = Family(
    name="if",
    # csdiff's own choice: the up-level samplers of IF stage I, as SD's `legacy` (no paper defines one).
    layer_sets={"legacy": ("up-level0-upsampler-out", "up-level1-upsampler-out", "up-level2-upsampler-out")},
    up_cross_levels=(),
    encode=encode_prompt_t5,
    unsupported=("ControlNet", "LoRA training", "own weights"),
)
FAMILIES = {f.name: f for f in (SD, SDXL, PIXART, SD3, FLUX, IF)}


def family_of_config(unet_config: dict) -> Family:
    """PixArt and SD3 for their transformers; SDXL for UNets conditioned on pooled text and time
    ids; else SD 1.x / 2.x."""
    if unet_config.get("encoder_hid_dim_type") == "text_proj" and unet_config.get("addition_embed_type") == "text":
        return IF  # DeepFloyd IF: T5 states projected inside the UNet, pooled text added to the time embedding
    if "num_single_layers" in unet_config:
        return FLUX
    if "caption_projection_dim" in unet_config:
        return SD3
    if "caption_channels" in unet_config:
        return PIXART
    return SDXL if unet_config.get("addition_embed_type") == "text_time" else SD


def family_of(unet: Any) -> Family:
    return family_of_config(unet.config)
