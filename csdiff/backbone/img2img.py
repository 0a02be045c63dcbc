"""img2img with a variant's guidance: the qualitative half of the GATE guideline.

An image is encoded, noised part of the way (``strength``) and brought back to a picture by the
model's deterministic chain (DDIM for ε- or v-prediction, as the scheduler's config says; flow
matching's Euler steps for SD3), each step
guided by one variant's prompt, LoRAs, ControlNets and weights — the guidance the extractor's
``denoise_from`` chains use, never classifier-free guidance. With no technique (empty prompt)
this is diffusers' stock img2img pipeline at ``guidance_scale`` 1 with a DDIM (flow: Euler) scheduler; a
technique that suppresses content shift brings the picture closer to the input.
"""

from __future__ import annotations

import numpy as np
import torch
from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler

from csdiff.backbone.variants import Variant

NO_TECHNIQUE = Variant(name="no technique", prompt="")


def chain_timesteps(
    scheduler, strength: float, steps: int, mu: float | None = None, flow: bool = False
) -> torch.Tensor:
    """The timesteps (DDIM's, or a flow model's Euler schedule) img2img runs at ``strength``: the last ``int(steps · strength)`` of a
    ``steps``-step schedule, as diffusers' img2img pipelines take them (the first is the noise
    level; SD 1.5, 50 steps, strength 0.6: t = 581 … 1)."""
    if not 0 < strength <= 1:
        raise ValueError(f"strength must be in (0, 1], got {strength}")
    if steps < 1:
        raise ValueError(f"steps must be positive, got {steps}")
    if mu is None:
        scheduler.set_timesteps(steps)
    else:  # FLUX: σ from 1 to 1/steps, shifted by μ, as its pipelines set them
        scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
    # SD's img2img pipelines keep int(steps · strength) steps; SD3's and FLUX's skip int(steps − steps · strength)
    start = int(max(steps - steps * strength, 0)) if flow else steps - min(int(steps * strength), steps)
    timesteps = scheduler.timesteps[start * scheduler.order :]
    if len(timesteps) == 0:
        raise ValueError(f"strength {strength} with {steps} steps leaves no denoising step; raise either")
    return timesteps


@torch.no_grad()
def reconstruct(
    extractor,
    images: torch.Tensor,
    variant: Variant = NO_TECHNIQUE,
    strength: float = 0.6,
    steps: int = 50,
    seed: int = 0,
) -> torch.Tensor:
    """img2img of ``images`` (B, 3, H, W) in [-1, 1] with ``variant``'s guidance → decoded
    pictures (B, 3, S, S) in [-1, 1] at the extractor's ``img_size``.

    ``variant`` is one of the extractor's variants (its LoRAs and weights are loaded there) or
    the no-technique reference. The latent is the extractor's (posterior mean or its seeded
    sample); the noise is one map drawn from ``seed`` and broadcast over the batch, the same for
    every variant, so pictures differ by guidance alone. Needs ``vae_decoder=True``.
    """
    vae = extractor.vae
    if vae is not None and vae.decoder is None:
        raise ValueError("img2img decodes: build the extractor with vae_decoder=True")
    if "{" in variant.prompt:
        raise ValueError(
            f"variant {variant.name!r}: a prompt with fields ({variant.prompt!r}) needs a task to fill them"
        )
    flow = extractor.family.noise == "flow"
    if flow:
        scheduler = FlowMatchEulerDiscreteScheduler.from_config(extractor.scheduler.config)
    elif extractor.vae is None:  # pixels: bounded as the model's scheduler config says (IF: thresholding)
        scheduler = DDIMScheduler.from_config(extractor.scheduler.config)
    else:  # latents are never clipped
        scheduler = DDIMScheduler.from_config(extractor.scheduler.config, clip_sample=False, thresholding=False)
    timesteps = chain_timesteps(scheduler, strength, steps, extractor.resolution_shift() if flow else None, flow)
    images = extractor.resize(images)
    latents = extractor.encode_images(images, variant)
    batch = latents.shape[0]
    noise = extractor.seeded_noise(seed, latents.shape[1:], batch)
    start = timesteps[:1].repeat(batch).to(latents.device)
    x = scheduler.scale_noise(latents, start[:1], noise) if flow else scheduler.add_noise(latents, noise, start)
    text_key = extractor.text_key(variant)  # activates the variant's LoRAs
    emb = extractor.prompt_embedding(variant.prompt, text_key).to(extractor.device, extractor.dtype)
    emb = emb.expand(batch, -1, -1)
    added = extractor.added_conditions(variant.prompt, text_key, batch)
    conditions = extractor.conditions(variant, images, None, {})
    unet = extractor.unet_of(variant)
    for t in timesteps.tolist():
        extra = extractor.control_residuals(variant, x, t, emb, conditions, None, None, added)
        prediction = extractor.family.run(unet, x, t, emb, added, extra)
        x = scheduler.step(prediction, t, x).prev_sample
    if vae is None:  # pixel space: the chain ends on the picture
        return x.float().clamp(-1, 1)
    shift = vae.config.get("shift_factor") or 0.0
    decoded = vae.decode(x.to(vae.dtype) / vae.config.scaling_factor + shift).sample
    return decoded.float().clamp(-1, 1)
