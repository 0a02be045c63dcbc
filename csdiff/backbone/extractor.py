"""The guided diffusion feature extractor (DESIGN §1).

One VAE encode per batch, then per variant: noise at exactly ``timestep`` (optionally a
guided DDIM chain from ``denoise_from``), ControlNet residuals, one UNet call with hooks.
UNet, VAE and text encoder are shared by all variants; prompt embeddings, LoRA adapters,
ControlNet models, condition maps and identical ControlNet calls are computed once.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from csdiff.backbone.acceleration import channels_last_input, compile_blocks, to_channels_last
from csdiff.backbone.capture import ActivationCapture, hooked_paths
from csdiff.backbone.conditions import canny_condition
from csdiff.backbone.families import FLUX_GUIDANCE
from csdiff.backbone.listing import activation_shapes, check_img_size, prompt_window, vae_factor
from csdiff.backbone.loading import (
    check_controlnet_fits,
    load_controlnet,
    load_sd_components,
    load_variant_weights,
    parse_dtype,
)
from csdiff.backbone.lora import LoRARegistry
from csdiff.backbone.names import resolve_layers
from csdiff.backbone.variants import Variant, as_variant

Features = dict[str, dict[str, torch.Tensor]]
LATENTS = ("mean", "sample", "variant_sample")
# Prediction types the guided DDIM chain knows how to turn into (x0, eps).
CHAIN_PREDICTION_TYPES = ("epsilon", "v_prediction")

# Noise streams: each variant's diffusion noise uses its seed directly; the VAE posterior
# sample draws from a stream derived from ``vae_seed`` (and, for ``variant_sample``, the
# variant's seed) and this tag, so that vae_seed = 0 and a variant seed of 0 never give the same map.
_VAE_STREAM = 1


@dataclass
class _FinalCall:
    """What one variant's final UNet call (at ``timestep``) takes, prepared before any is made."""

    variant: Variant
    unet: nn.Module
    unet_key: tuple
    names: list[str]
    noisy: torch.Tensor
    emb: torch.Tensor
    added: dict
    extra: dict


class DiffusionFeatureExtractor(nn.Module):
    """A frozen diffusion model (SD 1.x/2.x/XL, PixArt-α/Σ, SD3) → dense features of several guided variants.

    Args:
        model: hub id, local diffusers folder, single-file checkpoint, ``tiny``, or a random
            real-size model (``random-sd15``, ``random-pixart-alpha``, ``random-sd3-medium``).
        layers: activation names (see ``csdiff layers``) or named sets (``legacy``, ``practical``);
            features come back in this order.
        img_size: side the images are resized to (a multiple of 64 for SD 1.5 topology).
        timestep: the integer diffusion step of extraction (exactly this ``t``; the reference
            research code silently used ``t+1`` on SD 1.5); flow models map it to σ (:meth:`sigma`).
        variants: the guided variants (dataclasses or plain dicts); default one plain variant.
        base_model: configuration folder for single-file checkpoints.
        latent: ``mean`` of the VAE posterior, a ``sample`` drawn with ``vae_seed`` (one for all
            variants), or a ``variant_sample``: each variant its own posterior sample, drawn with
            ``vae_seed`` and its seed (DIFT's ensemble members each encode their own sample).
        fresh_noise: draw new noise per image and call (training augmentation; DIFT's ensemble)
            instead of the batch-independent, seeded noise map of each variant; a
            ``variant_sample`` is then drawn afresh per image and call too (``sample`` stays seeded).
        dtype: dtype of the frozen parts; ``feature_dtype``: dtype of returned features.
        unet: a fine-tuned UNet of the same architecture in place of the model's.
        noise: false feeds the clean latent (no noise at all, e.g. at ``timestep`` 0).
        time_ids: SDXL's six size conditions (original h, w, crop top, left, target h, w);
            default: the image at ``img_size``, uncropped.
        batch_variants: run the final UNet calls of variants that share UNet weights (same
            UNet LoRAs), prompt length and layers as one call, stacked along the batch (equal
            within float tolerance; false: one call per variant, less activation memory).
        channels_last: keep the frozen parts' weights and inputs NHWC, the layout GPU
            convolutions prefer (equal within float tolerance; features come back contiguous).
        compile: ``torch.compile`` the blocks of the UNet, ControlNets and VAE encoder (true:
            inductor; or a backend name, e.g. ``aot_eager`` to debug). The first calls at each
            batch size compile (minutes at SD size); see ``benchmarks/acceleration.py``.
        vae_decoder: load the VAE's decoder too (off: features never decode; ``csdiff assess``
            decodes its img2img reconstructions).
        guidance: FLUX.1-dev's distilled guidance embedding (default: its pipeline's 3.5; read
            only by guidance-distilled FLUX models, refused for other families).
    """

    def __init__(
        self,
        model: str = "tiny",
        layers: Sequence[str] = ("up-level1-upsampler-out",),
        img_size: int | None = None,
        timestep: int = 50,
        variants: Sequence[Variant | dict] | None = None,
        base_model: str | None = None,
        latent: str = "mean",
        vae_seed: int = 0,
        fresh_noise: bool = False,
        dtype: str = "float32",
        feature_dtype: str = "float32",
        unet: str | None = None,
        noise: bool = True,
        time_ids: Sequence[int] | None = None,
        batch_variants: bool = True,
        channels_last: bool = False,
        compile: bool | str = False,
        vae_decoder: bool = False,
        guidance: float | None = None,
    ) -> None:
        super().__init__()
        if latent not in LATENTS:
            raise ValueError(f"latent must be one of {', '.join(LATENTS)}, got {latent!r}")
        self.variants = [as_variant(v) for v in (variants or [Variant(name="plain")])]
        if not self.variants:
            raise ValueError("give at least one variant")
        names = [v.name for v in self.variants]
        if len(set(names)) != len(names):
            raise ValueError(f"variant names must be unique, got {names}")
        parts = load_sd_components(model, base_model=base_model, dtype=dtype, unet=unet, load_vae_decoder=vae_decoder)
        self.unet, self.vae, self.text_encoder = parts.unet, parts.vae, parts.text_encoder
        self.tokenizer, self.scheduler, self.spec = parts.tokenizer, parts.scheduler, parts.spec
        self.text_encoder_2, self.tokenizer_2, self.family = parts.text_encoder_2, parts.tokenizer_2, parts.family
        self.text_encoder_3, self.tokenizer_3 = parts.text_encoder_3, parts.tokenizer_3
        self.tokenizers, self.prompt_window = parts.tokenizers, prompt_window(parts)
        self._refuse_unsupported(model)
        distilled = self.family.name == "flux" and self.unet.config.guidance_embeds
        if guidance is not None and not distilled:
            what = (
                "FLUX model without a guidance embedding (as schnell)"
                if self.family.name == "flux"
                else f"{self.family.name} model"
            )
            raise ValueError(f"guidance is FLUX.1-dev's distilled guidance embedding; {model} is a {what}")
        self.guidance = (FLUX_GUIDANCE if guidance is None else float(guidance)) if distilled else None
        self.layers = resolve_layers(self.unet, layers)
        self.latent_factor = vae_factor(self.vae)
        if self.vae is None and latent != "mean":
            raise ValueError(f"latent {latent!r} samples a VAE posterior; {model} works on pixels (no VAE): use 'mean'")
        img_size = self.family.native_latent_size(self.unet) * self.latent_factor if img_size is None else img_size
        check_img_size(img_size, self.vae, self.unet)
        n_steps = self.scheduler.config.num_train_timesteps
        for t in [timestep] + [v.denoise_from for v in self.variants if v.denoise_from is not None]:
            if not 0 <= t < n_steps:
                raise ValueError(f"timestep {t} is outside the scheduler's range [0, {n_steps})")
        self.prediction_type = self.scheduler.config.get("prediction_type", "epsilon")
        for v in self.variants:
            if v.denoise_from is not None and v.denoise_from <= timestep:
                raise ValueError(
                    f"variant {v.name!r}: denoise_from ({v.denoise_from}) must be above timestep ({timestep})"
                )
            if v.denoise_from is not None and not noise:
                raise ValueError(f"variant {v.name!r} uses denoise_from, which needs noise: set noise to true")
            if v.denoise_from is not None and self.prediction_type not in CHAIN_PREDICTION_TYPES:
                raise ValueError(
                    f"variant {v.name!r} uses denoise_from, but {model} predicts {self.prediction_type!r}; the guided "
                    f"DDIM chain supports {', '.join(CHAIN_PREDICTION_TYPES)} models only"
                )
        self.img_size, self.timestep = img_size, timestep
        self.latent, self.vae_seed, self.fresh_noise, self.noise = latent, vae_seed, fresh_noise, noise
        if time_ids is not None and len(time_ids) != 6:
            raise ValueError(
                f"time_ids are 6 numbers (original h, w, crop top, left, target h, w), got {list(time_ids)}"
            )
        self.time_ids = None if time_ids is None else [int(v) for v in time_ids]
        self.batch_variants = batch_variants
        self.dtype = parse_dtype(dtype)
        self.feature_dtype = parse_dtype(feature_dtype)
        encoders = {"text_encoder": self.text_encoder, "text_encoder_2": self.text_encoder_2}
        self.loras = LoRARegistry(self.unet, {k: v for k, v in encoders.items() if v is not None}, self.family.name)
        self.controlnets = nn.ModuleDict()
        self.controlnet_ids: dict[str, str] = {}
        self._controlnet_keys: dict[str, str] = {}
        for v in self.variants:
            for lora in v.loras:
                self.loras.load(lora.path)
            for cn in v.controlnets:
                if cn.model not in self._controlnet_keys:
                    key = f"cn{len(self._controlnet_keys)}"
                    self.controlnets[key], self.controlnet_ids[cn.model] = load_controlnet(cn.model, dtype)
                    check_controlnet_fits(self.controlnets[key], self.unet, cn.model, model)
                    self._controlnet_keys[cn.model] = key
        # Variants with their own merged weights: one UNet (+ changed text encoders) per distinct file.
        self.weight_unets = nn.ModuleDict()
        self.weight_text_encoders = nn.ModuleDict()
        self.weights_ids: dict[str, str] = {}
        self._weight_keys: dict[str, str] = {}
        for v in self.variants:
            if v.weights is not None and _same_file(v.weights) not in self._weight_keys:
                key = f"w{len(self.weight_unets)}"
                loaded = load_variant_weights(v.weights, parts, base_model if base_model is not None else model, dtype)
                self.weight_unets[key] = loaded.unet
                for i, encoder in enumerate(loaded.text_encoders):
                    if encoder is not None:
                        self.weight_text_encoders[f"{key}_te{i}"] = encoder
                self._weight_keys[_same_file(v.weights)] = key
                self.weights_ids[key] = loaded.weights_id
        self._prompt_cache: dict[tuple, torch.Tensor] = {}
        self.requires_grad_(False)
        self.eval()
        self.channels_last = channels_last
        unets = [self.unet, *self.weight_unets.values()]
        if channels_last:
            to_channels_last([*unets, *([self.vae] if self.vae is not None else []), *self.controlnets.values()])
        backend = "inductor" if compile is True else compile
        if backend:
            for unet_ in unets:
                compile_blocks(unet_, backend, hooked_paths(unet_, self.layers))
            if self.vae is not None:
                compile_blocks(self.vae.encoder, backend)
            for net in self.controlnets.values():
                compile_blocks(net, backend)

    def _refuse_unsupported(self, model: str) -> None:
        """One line per variant that asks this family for what csdiff does not run on it yet."""
        asks = {
            "ControlNet": lambda v: bool(v.controlnets),
            "LoRA": lambda v: bool(v.loras),
            "own weights": lambda v: v.weights is not None,
        }
        for v in self.variants:
            for what in self.family.unsupported:
                if what in asks and asks[what](v):
                    raise ValueError(
                        f"variant {v.name!r} uses {what}, which csdiff does not run on {self.family.name} models "
                        f"({model}) yet: use prompts, seeds and denoise_from there, or an SD 1.x/2.x/XL backbone"
                    )

    # --- frozen: stays in eval mode even when an enclosing module trains ---
    def train(self, mode: bool = True) -> "DiffusionFeatureExtractor":
        return super().train(False)

    @property
    def device(self) -> torch.device:
        return self.unet.device

    def describe(self) -> dict:
        """Plain-dict description of everything that fixes the features: goes into checkpoints.

        Weights are named by fingerprint (backbone, each ControlNet, each LoRA file), so that
        :func:`describe_differences` can compare by content rather than by path or hub id.
        """
        variants = []
        for v in self.variants:
            d = v.to_dict()
            for lora in d["loras"]:
                lora["weights_id"] = self.loras.fingerprint(lora["path"])
            for cn in d["controlnets"]:
                cn["weights_id"] = self.controlnet_ids[cn["model"]]
            if v.weights is not None:
                d["weights_id"] = self.weights_ids[self._weights_key(v)]
            variants.append(d)
        return dict(
            backbone=self.spec.to_dict(),
            controlnets=dict(self.controlnet_ids),
            layers=list(self.layers),
            img_size=self.img_size,
            timestep=self.timestep,
            noise=self.noise,
            time_ids=self.time_ids,
            **({"guidance": self.guidance} if self.family.name == "flux" else {}),  # others: unchanged cache keys
            latent=self.latent,
            vae_seed=self.vae_seed,
            dtype=str(self.dtype).removeprefix("torch."),
            variants=variants,
        )

    def feature_shapes(self) -> dict[str, tuple[int, int, int]]:
        """(C, h, w) of each layer at ``img_size``, the same for every variant.

        Computed without running the model (see :func:`activation_shapes`): a constructor may
        call it on a float16 SD-size model on a CPU.
        """
        size = self.img_size // self.latent_factor
        return activation_shapes(self.unet, self.layers, (size, size), self.prompt_window)

    # --- pieces ---
    @contextmanager
    def at_timestep(self, timestep: int, noise: bool = True) -> Iterator["DiffusionFeatureExtractor"]:
        """Extract at another timestep (and with or without noise) for the duration of a block,
        without loading the model again: `csdiff assess` reads the clean t = 0 reference and a
        larger-t anchor from the extractor it assesses. Chain variants (``denoise_from``) are not
        for such calls."""
        n_steps = self.scheduler.config.num_train_timesteps
        if not 0 <= timestep < n_steps:
            raise ValueError(f"timestep {timestep} is outside the scheduler's range [0, {n_steps})")
        saved = self.timestep, self.noise
        self.timestep, self.noise = timestep, noise
        try:
            yield self
        finally:
            self.timestep, self.noise = saved

    def _weights_key(self, variant: Variant) -> str | None:
        return None if variant.weights is None else self._weight_keys[_same_file(variant.weights)]

    def unet_of(self, variant: Variant) -> nn.Module:
        """The UNet a variant runs: its own merged weights' or the backbone's."""
        key = self._weights_key(variant)
        return self.unet if key is None else self.weight_unets[key]

    def text_key(self, variant: Variant) -> tuple:
        """Switch on the variant's LoRAs; returns what fixes its text encoders (cache and sharing key):
        the text-encoder LoRAs, and its merged weights when they changed a text encoder."""
        key = self.loras.activate(list(variant.loras))
        own = self._weights_key(variant)
        if own is not None and any(name.startswith(f"{own}_te") for name in self.weight_text_encoders):
            key = (("weights", own), *key)
        return key

    def _encoders(self, text_key: tuple) -> tuple[nn.Module, ...]:
        base = tuple(e for e in (self.text_encoder, self.text_encoder_2, self.text_encoder_3) if e is not None)
        if not text_key or text_key[0][0] != "weights":
            return base
        own = text_key[0][1]
        return tuple(
            self.weight_text_encoders[f"{own}_te{i}"] if f"{own}_te{i}" in self.weight_text_encoders else e
            for i, e in enumerate(base)
        )

    def prompt_embedding(self, prompt: str, text_key: tuple) -> torch.Tensor:
        """The UNet's text embedding (1, tokens, D) of a prompt (cached per text-encoder adapter set)."""
        return self._prompt(prompt, text_key)[0]

    def _prompt(self, prompt: str, text_key: tuple) -> tuple[torch.Tensor, torch.Tensor | None]:
        key = (prompt, text_key)
        if key not in self._prompt_cache:
            self._prompt_cache[key] = self.family.encode(self.tokenizers, self._encoders(text_key), prompt)
        return self._prompt_cache[key]

    def added_conditions(self, prompt: str, text_key: tuple, batch: int) -> dict:
        """The family's extra UNet/ControlNet arguments for a prompt (SDXL: pooled embedding, time ids)."""
        pooled = self._prompt(prompt, text_key)[1]
        return self.family.added_conditions(
            pooled, self.img_size, batch, self.dtype, self.device, self.time_ids, self.guidance
        )

    def _apply(self, fn, *args, **kwargs):
        self._prompt_cache.clear()  # embeddings follow the module's device/dtype
        return super()._apply(fn, *args, **kwargs)

    def encode_images(self, images: torch.Tensor, variant: Variant | None = None) -> torch.Tensor:
        """Resize to ``img_size``, VAE-encode, scale: (B,3,H,W) in [-1,1] → (B,4,h,w) in ``dtype``.

        The VAE runs in its own dtype: float32 for VAEs that overflow in float16 (SDXL's).
        A ``variant_sample`` latent is the ``variant``'s own."""
        return self._latents(self._posterior(images), variant)

    def _posterior(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, std) of the VAE posterior: one encode serves every variant, whatever its latent."""
        if self.vae is None:  # pixel space (DeepFloyd IF): the image itself, in [-1, 1]
            x = self.resize(images).to(self.dtype)
            return x, torch.zeros_like(x)
        x = self.resize(images).to(self.vae.dtype)
        if self.channels_last:
            x = channels_last_input(x)
        posterior = self.vae.encode(x).latent_dist
        return posterior.mean, posterior.std

    def _latents(self, posterior: tuple[torch.Tensor, torch.Tensor], variant: Variant | None) -> torch.Tensor:
        """The scaled latent a variant starts from: the posterior mean or a sample of it."""
        mean, std = posterior
        if self.latent == "mean":
            z = mean
        else:
            z = mean + std * self._vae_eps(variant, mean.shape[1:], mean.shape[0]).to(mean.dtype)
        if self.vae is None:
            return z.to(self.dtype)
        shift = self.vae.config.get("shift_factor") or 0.0  # SD3's VAE centres its latents
        return ((z - shift) * self.vae.config.scaling_factor).to(self.dtype)

    def _vae_eps(self, variant: Variant | None, shape: Sequence[int], batch: int) -> torch.Tensor:
        """The posterior sample's standard normal draw: shared and seeded (``sample``), the variant's
        seeded one, or (``variant_sample`` with ``fresh_noise``) fresh per image and call."""
        if self.latent == "sample":
            return self.seeded_noise(self._vae_noise_seed(), shape, batch)
        if variant is None:
            raise ValueError("latent 'variant_sample' draws one latent per variant: pass the variant")
        if self.fresh_noise:
            return torch.randn((batch, *shape), device=self.device, dtype=torch.float32)
        return self.seeded_noise(self._vae_noise_seed(variant.seed), shape, batch)

    def resize(self, images: torch.Tensor) -> torch.Tensor:
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be (B, 3, H, W) in [-1, 1], got shape {tuple(images.shape)}")
        if images.shape[-2:] == (self.img_size, self.img_size):
            return images.to(self.device)
        return F.interpolate(
            images.to(self.device).float(),
            size=(self.img_size, self.img_size),
            mode="bilinear",
            align_corners=False,
            antialias=True,
        )

    def seeded_noise(self, seed: int, shape: Sequence[int], batch: int) -> torch.Tensor:
        """One noise map per seed, broadcast over the batch: an image's features never depend on its batch."""
        gen = torch.Generator(device="cpu").manual_seed(seed)
        noise = torch.randn((1, *shape), generator=gen, dtype=torch.float32)
        return noise.to(self.device, self.dtype).expand(batch, *shape)

    def _vae_noise_seed(self, *variant_seed: int) -> int:
        entropy = [self.vae_seed, *variant_seed]
        return int(np.random.SeedSequence(entropy, spawn_key=(_VAE_STREAM,)).generate_state(1)[0])

    def _noise(self, variant: Variant, shape: Sequence[int], batch: int) -> torch.Tensor:
        if self.fresh_noise:
            return torch.randn((batch, *shape), device=self.device, dtype=self.dtype)
        return self.seeded_noise(variant.seed, shape, batch)

    def model_timestep(self, t: int):
        """What the denoiser reads as the timestep of integer step ``t``: ``t`` itself (DDPM
        families), or σ(t)·1000 for flow models (see :meth:`sigma`)."""
        if self.family.noise != "flow":
            return t
        if self.resolution_shift() is not None:
            return self.sigma(t) * 1000
        return float(self.scheduler.timesteps[self._flow_index(t)])

    def resolution_shift(self) -> float | None:
        """FLUX's μ: a shift that grows with the number of image tokens, as its pipeline computes
        it from the scheduler's configuration (None for schedulers with a fixed shift, as SD3's)."""
        config = self.scheduler.config
        if not config.get("use_dynamic_shifting", False):
            return None
        tokens = (self.img_size // self.latent_factor // self.family.downsampling(self.unet)) ** 2
        base_len, max_len = config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096)
        base, top = config.get("base_shift", 0.5), config.get("max_shift", 1.15)
        slope = (top - base) / (max_len - base_len)
        return tokens * slope + base - slope * base_len

    def _flow_index(self, t: int) -> int:
        return self.scheduler.config.num_train_timesteps - 1 - t

    def sigma(self, t: int) -> float:
        """A flow model's noise level at integer step ``t``: the training schedule's σ, as its
        scheduler holds it before ``set_timesteps`` (SD3: shift 3, σ(t) = 3s / (1 + 2s) with
        s = (t + 1) / 1000; t = 0 is almost clean, t = 999 pure noise), shifted for the image's
        token count as FLUX's pipeline shifts it (σ = e^μ / (e^μ + 1/s − 1))."""
        sigma = self.scheduler.sigmas[self._flow_index(t)]
        mu = self.resolution_shift()
        if mu is not None:
            sigma = self.scheduler.time_shift(mu, 1.0, sigma)
        return float(sigma)

    def add_noise(self, latents: torch.Tensor, noise: torch.Tensor, t: int) -> torch.Tensor:
        """Forward diffusion to exactly step ``t`` with the scheduler's own ``add_noise`` (DDPM
        families) or ``scale_noise`` (flow models: x_t = (1 − σ)·x_0 + σ·ε)."""
        if self.family.noise == "flow" and self.resolution_shift() is not None:
            sigma = self.sigma(t)  # not on the scheduler's unshifted training schedule: scale_noise's formula
            return ((1 - sigma) * latents.float() + sigma * noise.float()).to(latents.dtype)
        if self.family.noise == "flow":
            step = torch.tensor([self.model_timestep(t)], device=latents.device)
            return self.scheduler.scale_noise(latents, step, noise)
        steps = torch.full((latents.shape[0],), t, dtype=torch.long, device=latents.device)
        return self.scheduler.add_noise(latents, noise, steps)

    def chain_step(self, x: torch.Tensor, model_output: torch.Tensor, t: int) -> torch.Tensor:
        """One deterministic step of a ``denoise_from`` chain, from step t to t − 1: DDIM for
        DDPM families, Euler for flow models."""
        if self.family.noise == "flow":
            return self.euler_step(x, model_output, t)
        return self.ddim_step(x, model_output, t)

    def euler_step(self, x: torch.Tensor, velocity: torch.Tensor, t: int) -> torch.Tensor:
        """Flow matching's Euler update from σ(t) to σ(t − 1): x + (σ(t−1) − σ(t))·v."""
        return (x.float() + (self.sigma(t - 1) - self.sigma(t)) * velocity.float()).to(velocity.dtype)

    def ddim_step(self, x: torch.Tensor, model_output: torch.Tensor, t: int) -> torch.Tensor:
        """Deterministic DDIM update from step t to t-1 (eta 0), for ε- and v-predicting models."""
        ac = self.scheduler.alphas_cumprod.to(x.device, torch.float32)
        a_t, a_prev = ac[t], ac[t - 1]
        x, out = x.float(), model_output.float()
        if self.prediction_type == "v_prediction":
            x0 = a_t.sqrt() * x - (1 - a_t).sqrt() * out
            eps = a_t.sqrt() * out + (1 - a_t).sqrt() * x
        else:
            x0 = (x - (1 - a_t).sqrt() * out) / a_t.sqrt()
            eps = out
        return (a_prev.sqrt() * self._bound_x0(x0) + (1 - a_prev).sqrt() * eps).to(model_output.dtype)

    def _bound_x0(self, x0: torch.Tensor) -> torch.Tensor:
        """The predicted clean sample as the scheduler's config bounds it (pixel-space IF): dynamic
        thresholding (each sample clamped at its ``dynamic_thresholding_ratio`` quantile of |x0|,
        between 1 and ``sample_max_value``, then rescaled) or a plain clip; latent models do neither."""
        config = self.scheduler.config
        if self.vae is not None:  # latents are never clipped (PixArt's DDPM config would clip them)
            return x0
        if config.get("thresholding", False):
            flat = x0.reshape(x0.shape[0], -1)
            s = torch.quantile(flat.abs(), config.get("dynamic_thresholding_ratio", 0.995), dim=1)
            s = s.clamp(min=1, max=config.get("sample_max_value", 1.0))[:, None]
            return (flat.clamp(-s, s) / s).reshape(x0.shape)
        if config.get("clip_sample", False):
            bound = config.get("clip_sample_range", 1.0)
            return x0.clamp(-bound, bound)
        return x0

    def conditions(
        self, variant: Variant, images: torch.Tensor, provided: dict[str, torch.Tensor] | None, cache: dict
    ) -> list[tuple[tuple, torch.Tensor]]:
        """(key, condition map) of each of a variant's ControlNets; ``images`` are already at ``img_size``.

        The key names the map itself: canny maps by their thresholds (computed once per
        batch), provided maps by the variant they were passed for.
        """
        out = []
        for cn in variant.controlnets:
            if cn.condition == "provided":
                if not provided or variant.name not in provided:
                    raise ValueError(
                        f"variant {variant.name!r} uses a provided ControlNet condition: pass conditions={{{variant.name!r}: tensor}}"
                    )
                key = ("provided", variant.name)
                if key not in cache:
                    cache[key] = self.resize(provided[variant.name].float() * 2 - 1) * 0.5 + 0.5
            else:
                key = ("canny", cn.low, cn.high)
                if key not in cache:
                    cache[key] = canny_condition(images, cn.low, cn.high)
            if self.family.grammar == "dit":  # SD3's and FLUX's ControlNets read the condition's VAE latent
                pixels, key = cache[key], (*key, "latent", cn.model)
                if key not in cache:
                    cache[key] = self._condition_latent(pixels, self.controlnets[self._controlnet_keys[cn.model]])
            cond = cache[key].to(self.device, self.dtype)
            out.append((key, channels_last_input(cond) if self.channels_last else cond))
        return out

    def _condition_latent(self, condition: torch.Tensor, net: nn.Module) -> torch.Tensor:
        """A condition map in [0, 1] as SD3's and FLUX's ControlNet pipelines feed it: VAE-encoded
        from [−1, 1], shifted (except for InstantX's SD3 ControlNets, trained without the shift)
        and scaled. The posterior mean, where the pipelines draw a sample: features stay deterministic."""
        x = (condition.to(self.device, self.vae.dtype) * 2 - 1).expand(-1, 3, -1, -1)
        mean = self.vae.encode(x).latent_dist.mean
        shift = 0.0 if net.config.get("force_zeros_for_pooled_projection", False) else self.vae.config.shift_factor
        return (mean - shift) * self.vae.config.scaling_factor

    def control_residuals(
        self, variant, noisy, t, emb, conds, cache: dict | None, share_key: tuple | None, added: dict | None = None
    ) -> dict:
        """Summed ControlNet residuals at the model's timestep ``t`` (see :meth:`model_timestep`),
        as the denoiser's keyword arguments. With a ``share_key`` (what fixes the noisy latent and
        the embedding), an identical call made for an earlier variant is reused, not repeated."""
        total: dict = {}
        for cn, (cond_key, cond) in zip(variant.controlnets, conds):
            key = None if share_key is None else (cn.model, cond_key, cn.scale, t, share_key)
            if key is not None and key in cache:
                residuals = cache[key]
            else:
                net = self.controlnets[self._controlnet_keys[cn.model]]
                residuals = self.family.control(net, noisy, t, emb, cond, cn.scale, added or {})
                if key is not None:
                    cache[key] = residuals
            total = residuals if not total else _map_residuals(lambda a, b: a + b, total, residuals)
        return total

    @torch.no_grad()
    def forward(
        self,
        images: torch.Tensor,
        conditions: dict[str, torch.Tensor] | None = None,
        variants: Sequence[str] | None = None,
        layers: dict[str, Sequence[str]] | None = None,
        prompt_fields: Sequence[Mapping[str, str]] | None = None,
    ) -> Features:
        """Features of each variant: ``{variant: {layer: (B, C, h, w)}}`` in the order of ``layers``.

        ``conditions`` maps variant names to condition images in [0, 1] for ``provided``
        ControlNet conditions; ``variants`` restricts the call to some variants; ``layers``
        restricts some variants to some of the extractor's layers (a task that reads only
        ``up_cross`` from one variant need not capture the rest there). ``prompt_fields``
        (one mapping per image, e.g. ``{"category": "cat"}``) fill the ``{field}``s of variant
        prompts: such a variant runs once per distinct filled prompt, on the images that have
        it; variants without fields ignore them and run exactly as without.

        With ``batch_variants``, the final UNet calls of variants that share UNet weights (the
        same UNet LoRAs), prompt length and layers run as one call, stacked along the batch.
        """
        if self.unet.device.type == "meta":
            raise ValueError(
                f"{self.spec.model} holds no weights (meta tensors, shapes only): it lists layers and instantiates "
                f"configs; extract with real weights"
            )
        wanted = None if variants is None else set(variants)
        chosen = [v for v in self.variants if wanted is None or v.name in wanted]
        unknown = sorted(set(layers or {}) - {v.name for v in self.variants})
        foreign = sorted({n for names in (layers or {}).values() for n in names} - set(self.layers))
        if unknown or foreign:
            raise ValueError(
                f"layers names unknown variants {unknown} or layers the extractor was not built for {foreign}"
            )
        images = self.resize(images)  # once: the VAE and the condition maps see the same pixels
        posterior = self._posterior(images)
        out: Features = {}
        for index, members in _prompt_groups(chosen, prompt_fields, images.shape[0]):
            if index is None:
                out.update(self._extract(images, posterior, conditions, members, layers))
                continue
            index = index.to(images.device)
            part = self._extract(
                images[index], (posterior[0][index], posterior[1][index]), _take(conditions, index), members, layers
            )
            for name, feats in part.items():  # back into batch order
                whole = out.setdefault(name, {})
                for layer, x in feats.items():
                    whole.setdefault(layer, x.new_empty((images.shape[0], *x.shape[1:])))[index.to(x.device)] = x
        return {v.name: out[v.name] for v in chosen}

    def _extract(self, images, posterior, conditions, chosen: list[Variant], layers) -> Features:
        """The features of ``chosen`` (prompts filled) on images already at ``img_size``."""
        cond_cache: dict = {}
        control_cache: dict = {}
        calls = [self._prepare(v, images, posterior, conditions, layers, cond_cache, control_cache) for v in chosen]
        out: Features = {}
        shape = posterior[0].shape
        for group in self._groups(calls):
            self.loras.activate(list(group[0].variant.loras))
            out.update(self._final_call(group, shape))
        return out

    def _prepare(self, variant, images, posterior, provided, layers, cond_cache, control_cache) -> _FinalCall:
        """Everything a variant's final UNet call needs: its noisy latent (after its guided chain,
        if any), text embedding, added conditions and ControlNet residuals."""
        latents = self._latents(posterior, variant)
        batch, shape = latents.shape[0], latents.shape[1:]
        text_key = self.text_key(variant)
        unet = self.unet_of(variant)
        emb = self.prompt_embedding(variant.prompt, text_key).to(self.device, self.dtype).expand(batch, -1, -1)
        added = self.added_conditions(variant.prompt, text_key, batch)
        conds = self.conditions(variant, images, provided, cond_cache)
        noise = self._noise(variant, shape, batch)
        if variant.denoise_from is None:
            noisy = self.add_noise(latents, noise, self.timestep) if self.noise else latents
            # A UNet LoRA does not reach the ControlNet: seed, prompt and text adapters fix its inputs
            # (the seed fixes a variant_sample latent too).
            share_key = None if self.fresh_noise else (variant.seed, variant.prompt, text_key)
        else:
            if variant.denoise_from <= self.timestep:  # only reachable inside at_timestep
                raise ValueError(
                    f"variant {variant.name!r}: denoise_from ({variant.denoise_from}) must be above the timestep "
                    f"it extracts at ({self.timestep})"
                )
            noisy = self.add_noise(latents, noise, variant.denoise_from)
            for t in range(variant.denoise_from, self.timestep, -1):
                extra = self.control_residuals(variant, noisy, self.model_timestep(t), emb, conds, None, None, added)
                prediction = self.family.run(unet, noisy, self.model_timestep(t), emb, added, extra)
                noisy = self.chain_step(noisy, prediction, t)
            share_key = None  # the chain depends on every guidance setting: never shared
        extra = self.control_residuals(
            variant, noisy, self.model_timestep(self.timestep), emb, conds, control_cache, share_key, added
        )
        names = [n for n in self.layers if n in (layers or {}).get(variant.name, self.layers)]
        unet_key = self.loras.unet_key(list(variant.loras)) + (
            (("weights", self._weights_key(variant)),) if variant.weights else ()
        )
        return _FinalCall(variant, unet, unet_key, names, noisy, emb, added, extra)

    def _groups(self, calls: list[_FinalCall]) -> list[list[_FinalCall]]:
        """Calls that can share one UNet call: same UNet weights and adapters, prompt length and layers."""
        if not self.batch_variants:
            return [[c] for c in calls]
        groups: dict[tuple, list[_FinalCall]] = {}
        for c in calls:
            groups.setdefault((c.unet_key, c.emb.shape[1], tuple(c.names)), []).append(c)
        return list(groups.values())

    def _final_call(self, group: list[_FinalCall], shape: Sequence[int]) -> Features:
        """One UNet call at ``timestep`` for the group, its activations split back per variant.

        A variant without ControlNet gets zero residuals beside one with: adding zero is exact."""
        batch = shape[0]
        noisy = torch.cat([c.noisy for c in group])
        emb = torch.cat([c.emb for c in group])
        added = _cat_along_batch([c.added for c in group])
        extra = {}
        if any(c.extra for c in group):
            like = next(c.extra for c in group if c.extra)
            zeros = _map_residuals(torch.zeros_like, like)
            parts = [c.extra or zeros for c in group]
            extra = {key: _map_residuals(lambda *xs: torch.cat(xs), *(p[key] for p in parts)) for key in like}
        names, unet = group[0].names, group[0].unet
        with ActivationCapture(unet, names, tuple(shape[-2:]), self.prompt_window, stop_early=True) as capture:
            self.family.run(unet, noisy, self.model_timestep(self.timestep), emb, added, extra)
        return {
            c.variant.name: {
                n: capture.features[n][i * batch : (i + 1) * batch].to(self.feature_dtype).contiguous() for n in names
            }
            for i, c in enumerate(group)
        }


def _prompt_groups(
    chosen: list[Variant], prompt_fields: Sequence[Mapping[str, str]] | None, batch: int
) -> list[tuple[torch.Tensor | None, list[Variant]]]:
    """(image indices or None for the whole batch, variants with filled prompts) to extract together.

    Variants without prompt fields run on the whole batch, as without ``prompt_fields``; the
    others once per distinct set of filled prompts, on the images that have it."""
    templated = [v for v in chosen if v.fields]
    if not templated:
        return [(None, chosen)]
    if prompt_fields is None or len(prompt_fields) != batch:
        got = "none" if prompt_fields is None else f"{len(prompt_fields)}"
        raise ValueError(
            f"variants {[v.name for v in templated]} have prompt fields {sorted({f for v in templated for f in v.fields})}: "
            f"pass prompt_fields, one mapping per image ({batch} images, got {got})"
        )
    plain = [v for v in chosen if not v.fields]
    groups: dict[tuple[str, ...], tuple[list[int], list[Variant]]] = {}
    for i, values in enumerate(prompt_fields):
        filled = [v.filled(values) for v in templated]
        groups.setdefault(tuple(v.prompt for v in filled), ([], filled))[0].append(i)
    out: list[tuple[torch.Tensor | None, list[Variant]]] = [(None, plain)] if plain else []
    whole = len(groups) == 1  # one category in the batch: no need to split it
    return out + [(None if whole else torch.tensor(index), filled) for index, filled in groups.values()]


def _map_residuals(fn, *residuals):
    """``fn`` applied elementwise across residual structures: dicts, lists of tensors or tensors."""
    first = residuals[0]
    if first is None:  # a ControlNet without single-stream samples
        return None
    if isinstance(first, dict):
        return {key: _map_residuals(fn, *(r[key] for r in residuals)) for key in first}
    if isinstance(first, (list, tuple)):
        return [_map_residuals(fn, *items) for items in zip(*residuals)]
    return fn(*residuals)


def _take(conditions: dict[str, torch.Tensor] | None, index: torch.Tensor) -> dict[str, torch.Tensor] | None:
    """The provided condition images of some images of the batch."""
    return None if conditions is None else {name: c[index.to(c.device)] for name, c in conditions.items()}


def _same_file(path: str) -> str:
    """One key per file, however it is written (a hub id or built-in name stays as it is)."""
    p = Path(path).expanduser()
    return str(p.resolve()) if p.exists() else path


def _cat_along_batch(parts: list[dict]) -> dict:
    """Concatenate dicts of tensors (nested, as SDXL's ``added_cond_kwargs``) along the batch."""
    return {
        k: _cat_along_batch([p[k] for p in parts]) if isinstance(v, dict) else torch.cat([p[k] for p in parts])
        for k, v in parts[0].items()
    }


def comparable_description(description: dict) -> dict:
    """What fixes the features, with every weight named by its fingerprint (not its path or hub id)."""
    out = {
        key: description[key]
        for key in ("layers", "img_size", "timestep", "noise", "time_ids", "guidance", "latent")
        if key in description
    }
    out["backbone weights"] = description["backbone"]["weights_id"]
    out["unet weights"] = description["backbone"].get("unet_weights_id")
    if description.get("latent") in ("sample", "variant_sample") and "vae_seed" in description:
        out["vae_seed"] = description["vae_seed"]
    if "variants" in description:
        out["variants"] = {
            v["name"]: dict(
                prompt=v["prompt"],
                seed=v["seed"],
                denoise_from=v["denoise_from"],
                weights=v.get("weights_id", v.get("weights")),
                loras=[(lora.get("weights_id", lora["path"]), lora["scale"]) for lora in v["loras"]],
                controlnets=[
                    (cn.get("weights_id", cn["model"]), cn["condition"], cn["low"], cn["high"], cn["scale"])
                    for cn in v["controlnets"]
                ],
            )
            for v in description["variants"]
        }
    return out


def describe_differences(saved: dict, current: dict, saved_as: str = "checkpoint") -> list[str]:
    """What differs between two :meth:`DiffusionFeatureExtractor.describe` results, one line per
    difference (empty: the features are the same), ``saved`` named as ``saved_as``. Keys missing
    from ``saved`` are not compared."""
    a, b = comparable_description(saved), comparable_description(current)
    lines = []
    for key in a:
        if key == "variants" or key not in b or a[key] == b[key]:
            continue
        lines.append(f"{key}: {a[key]} ({saved_as}) vs {b[key]} (now)")
    if "variants" in a and "variants" in b:
        if list(a["variants"]) != list(b["variants"]):
            lines.append(f"variants: {list(a['variants'])} ({saved_as}) vs {list(b['variants'])} (now)")
        for name in a["variants"].keys() & b["variants"].keys():
            for field, value in a["variants"][name].items():
                if b["variants"][name][field] != value:
                    lines.append(
                        f"variant {name!r} {field}: {value} ({saved_as}) vs {b['variants'][name][field]} (now)"
                    )
    return lines
