"""Training a LoRA (LoCon) on a dataset's images: the paper's recipe as a csdiff task.

The paper's LoRAs are LoCon adapters (rank 64, alpha 32) trained with kohya on 30 random
unlabelled training images of each dataset with the standard noise-prediction loss. Here
that is a LightningModule, so `csdiff fit --config configs/lora_<dataset>.yaml` gets DDP,
``--ckpt_path last``, TensorBoard and progress bars like every other task. The frozen VAE,
UNet and text encoder carry peft adapters; checkpoints hold only the adapters and their
optimizer state, and :class:`~csdiff.callbacks.LoRAFileWriter` turns them into a kohya file
that a variant loads (``loras: [{path: ...}]``).
"""

from __future__ import annotations

import math
import os
from typing import Any, Literal, TypedDict

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from lightning.pytorch import LightningModule
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_warn
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.lora import LoraLayer
from torch import Tensor, nn

from csdiff.backbone.loading import SDComponents, load_sd_components
from csdiff.backbone.lora_files import LoRAPair
from csdiff.backbone.prompts import prompt_windows
from csdiff.tasks.checkpoints import CheckpointMismatchError
from csdiff.tasks.seeding import StepSeededMixin

ADAPTER = "default"
DESCRIPTION_KEY = "csdiff_lora"
# Where kohya's LoCon puts adapters in a UNet: every Linear and Conv2d of the attention
# (transformer) blocks, the ResNet blocks and the down/up samplers. `attention`: the first only.
TARGET_BLOCKS = {"locon": ("attentions", "resnets", "downsamplers", "upsamplers"), "attention": ("attentions",)}
# Random streams of the task apart from the per-step training stream of StepSeededMixin.
_INIT_STREAM = 5
_SAMPLE_STREAM = 6


class LoRABackboneOptions(TypedDict, total=False):
    """The frozen model a LoRA is trained for (see :func:`csdiff.backbone.load_sd_components`)."""

    model: str
    base_model: str | None
    unet: str | None
    img_size: int | None
    dtype: Literal["float32", "float16", "bfloat16"]


# --- adapters: where they go, how they are made, what they hold ------------------------------------
def unet_targets(unet: nn.Module, targets: Literal["locon", "attention"] = "locon") -> list[str]:
    """Module paths of the UNet layers that get an adapter (LoCon: attention + ResNets + samplers)."""
    blocks = TARGET_BLOCKS[targets]
    return [
        name
        for name, module in unet.named_modules()
        if isinstance(module, (nn.Linear, nn.Conv2d)) and any(f".{b}." in f".{name}." for b in blocks)
    ]


def text_encoder_targets(text_encoder: nn.Module) -> list[str]:
    """Module paths of the text encoder's transformer Linear layers (attention q/k/v/out, MLP), as kohya adapts."""
    return [
        name
        for name, module in text_encoder.named_modules()
        if isinstance(module, nn.Linear) and ".layers." in f".{name}"
    ]


def inject_lora(model: nn.Module, targets: list[str], rank: int, alpha: float, seed: int) -> None:
    """Add one trainable peft LoRA adapter to ``targets`` of a frozen ``model``.

    The adapter is float32 whatever the model's dtype (a float16 model trains through it in
    mixed precision, as kohya does). peft creates it empty and it is filled here, once and
    in float32 (peft would initialise it in the model's dtype and copy it twice, seconds at SD
    size): A as peft's default (``nn.Linear``'s Kaiming-uniform), B zero, so the adapter starts
    as a no-op. The values come from ``seed`` alone, never from the global random state.
    """
    if not targets:
        raise ValueError(f"{type(model).__name__} has no layer to adapt")
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, lora_dropout=0.0)
    inject_adapter_in_model(config, model, adapter_name=ADAPTER, low_cpu_mem_usage=True)  # adapters on the meta device
    model.requires_grad_(False)
    gen = torch.Generator().manual_seed(seed)
    for layer in lora_layers(model).values():
        device = layer.get_base_layer().weight.device
        down, up = layer.lora_A[ADAPTER].to_empty(device="cpu"), layer.lora_B[ADAPTER].to_empty(device="cpu")
        with torch.no_grad():
            nn.init.kaiming_uniform_(down.weight, a=math.sqrt(5), generator=gen)
            up.weight.zero_()
        for part in (down, up):
            part.to(device=device, dtype=torch.float32).requires_grad_(True)


def lora_layers(model: nn.Module) -> dict[str, LoraLayer]:
    """The adapted layers of ``model`` by module path (the path of the layer they replaced)."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoraLayer) and ADAPTER in m.lora_A}


def adapter_pairs(model: nn.Module) -> dict[str, LoRAPair]:
    """Each adapted layer as kohya's (down, up, alpha): peft's lora_A is kohya's down
    ((r, in) or, for a convolution, (r, in, k, k) with the layer's stride and padding),
    lora_B its up ((out, r) or (out, r, 1, 1)), and peft's scaling alpha/r is kohya's."""
    return {
        name: (layer.lora_A[ADAPTER].weight, layer.lora_B[ADAPTER].weight, float(layer.lora_alpha[ADAPTER]))
        for name, layer in lora_layers(model).items()
    }


def encode_prompt_trainable(tokenizer: Any, text_encoder: nn.Module, prompt: str) -> Tensor:
    """SD 1.x/2.x text embedding (1, 77·windows, D), as :func:`csdiff.backbone.prompts.encode_prompt`
    computes it, but differentiable (for a text encoder with a trained adapter)."""
    ids = prompt_windows(tokenizer, prompt).to(text_encoder.device)
    hidden = text_encoder(ids)[0]
    return hidden.reshape(1, -1, hidden.shape[-1])


class FrozenDiffusion(nn.Module):
    """The frozen parts as submodules (so Lightning moves them), always in eval mode."""

    def __init__(self, parts: SDComponents) -> None:
        super().__init__()
        self.unet, self.vae, self.text_encoder, self.text_encoder_2 = (
            parts.unet,
            parts.vae,
            parts.text_encoder,
            parts.text_encoder_2,
        )
        self.tokenizers = tuple(t for t in (parts.tokenizer, parts.tokenizer_2) if t is not None)
        self.spec, self.family = parts.spec, parts.family
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> FrozenDiffusion:
        return super().train(False)

    @property
    def encoders(self) -> tuple[nn.Module, ...]:
        return tuple(e for e in (self.text_encoder, self.text_encoder_2) if e is not None)


# --- the task -----------------------------------------------------------------------------------
class LoRATrainingTask(StepSeededMixin, LightningModule):
    """Train a LoCon LoRA on images with the noise-prediction loss of the model's family.

    Each step: VAE-encode the images (posterior sample), draw noise and a timestep per image
    uniformly from the scheduler's training range, noise the latents with the scheduler's
    ``add_noise`` and regress the UNet's output on ε, or on the velocity
    (``get_velocity``) for v-predicting models, by mean squared error. All randomness is
    keyed on (seed, step, rank), so runs repeat and resumed runs are bit-identical.

    Args:
        backbone: the frozen model (``model``, ``img_size``: the training resolution,
            default the model's native one; ``dtype`` of the frozen parts: float16 trains in
            mixed precision with float32 adapters, best with ``trainer.precision: 16-mixed``).
        prompt: the caption of images without their own (a same-stem ``.txt``).
        rank: LoRA rank (paper: 64); the update is (alpha/rank)·B·A.
        alpha: LoRA alpha (paper: 32).
        targets: ``locon`` (attention, ResNet and sampler layers, the paper's) or
            ``attention`` (the transformer blocks only, classic LoRA).
        train_text_encoder: adapt the text encoder's transformer layers too (SD 1.x/2.x).
        lr: AdamW's learning rate (constant, as kohya's default).
        text_encoder_lr: the text encoder adapters' rate; None uses ``lr``.
        weight_decay: AdamW's weight decay.
        latent: ``sample`` the VAE posterior (kohya) or take its ``mean``.
        gradient_checkpointing: recompute UNet activations in the backward pass (less memory).
        sample_every_n_steps: log [image | decoded one-step x0 prediction] pictures to
            TensorBoard every N steps (0: never, and the VAE decoder is not loaded).
        num_samples: how many images of the batch those pictures show.
        sample_timestep: the timestep they are noised to (fixed, so pictures are comparable
            over a run).
    """

    def __init__(
        self,
        backbone: LoRABackboneOptions | None = None,
        prompt: str = "",
        rank: int = 64,
        alpha: float = 32.0,
        targets: Literal["locon", "attention"] = "locon",
        train_text_encoder: bool = False,
        lr: float = 1e-4,
        text_encoder_lr: float | None = None,
        weight_decay: float = 0.01,
        latent: Literal["sample", "mean"] = "sample",
        gradient_checkpointing: bool = False,
        sample_every_n_steps: int = 500,
        num_samples: int = 2,
        sample_timestep: int = 500,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self._prompt_cache: dict[str, tuple[Tensor, Tensor | None]] = {}
        if rank < 1 or alpha <= 0:
            raise ValueError(f"rank must be positive and alpha above 0, got rank={rank}, alpha={alpha}")
        options = dict(backbone or {})
        img_size = options.pop("img_size", None)
        parts = load_sd_components(load_vae_decoder=sample_every_n_steps > 0, **options)
        if "LoRA training" in parts.family.unsupported:
            raise ValueError(
                f"LoRA training adapts SD 1.x/2.x/XL UNets; {parts.spec.model} is a {parts.family.name} model, which "
                f"csdiff cannot train adapters for yet"
            )
        self.sd = FrozenDiffusion(parts)
        if train_text_encoder and self.sd.family.time_ids:
            raise ValueError("train_text_encoder supports SD 1.x/2.x; for SDXL train the UNet adapter only")
        self.latent_factor = 2 ** (len(parts.vae.config.block_out_channels) - 1)
        multiple = self.latent_factor * 2 ** (len(parts.unet.config.block_out_channels) - 1)
        self.img_size = int(img_size or parts.unet.config.sample_size * self.latent_factor)
        if self.img_size % multiple:
            raise ValueError(f"img_size={self.img_size} must be a multiple of {multiple} for this model")
        # Training noise follows the model's own schedule (betas, prediction type), as DDPM.
        self.noise_scheduler = DDPMScheduler.from_config(parts.scheduler.config)
        self.prediction_type = self.noise_scheduler.config.prediction_type
        if self.prediction_type not in ("epsilon", "v_prediction"):
            raise ValueError(
                f"{self.sd.spec.model} predicts {self.prediction_type!r}; LoRA training supports epsilon and v_prediction"
            )
        if not 0 <= sample_timestep < self.noise_scheduler.config.num_train_timesteps:
            raise ValueError(f"sample_timestep {sample_timestep} is outside the scheduler's range")
        seed = int(os.environ.get("PL_GLOBAL_SEED", 0))
        init_seeds = np.random.SeedSequence([seed], spawn_key=(_INIT_STREAM,)).generate_state(2)
        inject_lora(self.sd.unet, unet_targets(self.sd.unet, targets), rank, alpha, int(init_seeds[0]))
        if train_text_encoder:
            te = self.sd.text_encoder
            inject_lora(te, text_encoder_targets(te), rank, alpha, int(init_seeds[1]))
        self.sd.eval()  # the adapters' own modules start in training mode
        if gradient_checkpointing:
            self.sd.unet.enable_gradient_checkpointing()

    # --- what is trained and written ---
    @property
    def sdxl(self) -> bool:
        return self.sd.family.time_ids

    def adapter_parameters(self) -> dict[str, nn.Parameter]:
        """The trainable parameters (the adapters) by state-dict name: all a checkpoint keeps."""
        return {name: p for name, p in self.named_parameters() if p.requires_grad}

    def lora_modules(self) -> dict[str, dict[str, LoRAPair]]:
        """``{component: {module path: (down, up, alpha)}}`` for :func:`csdiff.backbone.lora_files.save_kohya_lora`."""
        out = {"unet": adapter_pairs(self.sd.unet)}
        if self.hparams.train_text_encoder:
            out["text_encoder"] = adapter_pairs(self.sd.text_encoder)
        return out

    def describe(self) -> dict:
        """What the adapters belong to: stored in checkpoints and in the LoRA file's metadata."""
        return dict(
            backbone=self.sd.spec.to_dict(),
            rank=self.hparams.rank,
            alpha=float(self.hparams.alpha),
            targets=self.hparams.targets,
            modules={component: len(pairs) for component, pairs in self.lora_modules().items()},
        )

    # --- conditioning ---
    def _apply(self, fn, *args, **kwargs):
        self._prompt_cache.clear()  # cached embeddings follow the module's device and dtype
        return super()._apply(fn, *args, **kwargs)

    def _encode(self, prompt: str) -> tuple[Tensor, Tensor | None]:
        """(1, tokens, D) embedding and pooled embedding (SDXL) of one prompt; cached unless
        the text encoder is trained."""
        if self.hparams.train_text_encoder:
            return encode_prompt_trainable(self.sd.tokenizers[0], self.sd.text_encoder, prompt), None
        if prompt not in self._prompt_cache:
            self._prompt_cache[prompt] = self.sd.family.encode(self.sd.tokenizers, self.sd.encoders, prompt)
        return self._prompt_cache[prompt]

    def conditioning(self, captions: list[str | None]) -> tuple[Tensor, dict]:
        """Text embeddings (B, tokens, D) of the batch (a caption, else the prompt) and the
        family's added UNet arguments. Prompts of different window counts are padded with
        empty windows, so one batch may mix short and long captions."""
        prompts = [c if c else self.hparams.prompt for c in captions]
        encoded = {p: self._encode(p) for p in dict.fromkeys(prompts)}
        length = max(e.shape[1] for e, _ in encoded.values())
        empty = self._encode("")[0] if any(e.shape[1] < length for e, _ in encoded.values()) else None
        rows = []
        for p in prompts:
            emb = encoded[p][0]
            if emb.shape[1] < length:
                windows = (length - emb.shape[1]) // empty.shape[1]
                emb = torch.cat([emb, empty.repeat(1, windows, 1)], dim=1)
            rows.append(emb)
        unet = self.sd.unet
        emb = torch.cat(rows).to(self.device, unet.dtype)
        pooled = [encoded[p][1] for p in prompts]
        pooled_batch = None if pooled[0] is None else torch.cat(pooled)
        added = self.sd.family.added_conditions(pooled_batch, self.img_size, len(prompts), unet.dtype, self.device)
        return emb, added

    # --- the loss ---
    def encode_images(self, images: Tensor) -> Tensor:
        """(B, 3, H, W) in [-1, 1] → scaled float32 latents at ``img_size`` (VAE without gradients)."""
        if images.shape[-2:] != (self.img_size, self.img_size):
            images = F.interpolate(
                images.float(),
                size=(self.img_size, self.img_size),
                mode="bilinear",
                align_corners=False,
                antialias=True,
            )
        vae = self.sd.vae
        with torch.no_grad():
            posterior = vae.encode(images.to(self.device, vae.dtype)).latent_dist
            z = posterior.sample() if self.hparams.latent == "sample" else posterior.mean
        return z.float() * vae.config.scaling_factor

    def predict(self, noisy: Tensor, timesteps: Tensor, emb: Tensor, added: dict) -> Tensor:
        unet = self.sd.unet
        return unet(noisy.to(unet.dtype), timesteps, encoder_hidden_states=emb, **added).sample

    def target(self, latents: Tensor, noise: Tensor, timesteps: Tensor) -> Tensor:
        """What the UNet regresses on: the noise (ε models) or the velocity (v models)."""
        if self.prediction_type == "v_prediction":
            return self.noise_scheduler.get_velocity(latents, noise, timesteps)
        return noise

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        latents = self.encode_images(batch["image"])
        n = latents.shape[0]
        noise = torch.randn_like(latents)
        timesteps = torch.randint(0, self.noise_scheduler.config.num_train_timesteps, (n,), device=latents.device)
        noisy = self.noise_scheduler.add_noise(latents, noise, timesteps)
        emb, added = self.conditioning(list(batch.get("caption") or [None] * n))
        prediction = self.predict(noisy, timesteps, emb, added)
        loss = F.mse_loss(prediction.float(), self.target(latents, noise, timesteps).float())
        self.log("train/loss", loss, batch_size=n)
        # a step's loss swings with its random timesteps: the epoch mean shows the trend
        self.log("train/loss_epoch", loss, batch_size=n, on_step=False, on_epoch=True)
        self.log("loss", loss, prog_bar=True, logger=False, batch_size=n)
        every = self.hparams.sample_every_n_steps
        if every and self.global_step % every == 0 and self.trainer.is_global_zero:
            self.log_samples(
                batch["image"][: self.hparams.num_samples], latents[: self.hparams.num_samples], emb, added
            )
        return loss

    # --- pictures ---
    def x0_prediction(self, latents: Tensor, emb: Tensor, added: dict, t: int) -> Tensor:
        """One-step estimate of the clean latents from ``latents`` noised to ``t`` with noise of
        the task's own seeded stream (no draw from the training stream: resuming stays exact)."""
        gen = torch.Generator().manual_seed(
            int(np.random.SeedSequence([t], spawn_key=(_SAMPLE_STREAM,)).generate_state(1)[0])
        )
        noise = torch.randn(latents.shape, generator=gen).to(latents.device)
        steps = torch.full((latents.shape[0],), t, device=latents.device, dtype=torch.long)
        noisy = self.noise_scheduler.add_noise(latents, noise, steps)
        out = self.predict(noisy, steps, emb, added).float()
        a = self.noise_scheduler.alphas_cumprod.to(latents.device)[t]
        if self.prediction_type == "v_prediction":
            return a.sqrt() * noisy - (1 - a).sqrt() * out
        return (noisy - (1 - a).sqrt() * out) / a.sqrt()

    @torch.no_grad()
    def log_samples(self, images: Tensor, latents: Tensor, emb: Tensor, added: dict) -> None:
        """TensorBoard pictures [image | VAE-decoded x0 prediction], one per image."""
        writer = next((lg.experiment for lg in self.loggers if isinstance(lg, TensorBoardLogger)), None)
        if writer is None or self.sd.vae.decoder is None:
            return
        k = latents.shape[0]
        added = {key: {n: v[:k] for n, v in value.items()} for key, value in added.items()}
        x0 = self.x0_prediction(latents, emb[:k], added, self.hparams.sample_timestep)
        vae = self.sd.vae
        decoded = vae.decode((x0 / vae.config.scaling_factor).to(vae.dtype)).sample.float()
        inputs = F.interpolate(
            images.float().to(decoded.device),
            size=decoded.shape[-2:],
            mode="bilinear",
            align_corners=False,
            antialias=True,
        )
        for i, (a, b) in enumerate(zip(inputs, decoded)):
            picture = ((torch.cat([a, b], dim=-1).clamp(-1, 1) + 1) / 2).cpu()
            writer.add_image(f"samples/x0_t{self.hparams.sample_timestep}_{i}", picture, self.global_step)

    # --- optimisation ---
    def configure_optimizers(self) -> torch.optim.Optimizer:
        te_lr = self.hparams.text_encoder_lr if self.hparams.text_encoder_lr is not None else self.hparams.lr
        groups: list[dict] = []
        for prefix, lr in (("sd.unet.", self.hparams.lr), ("sd.text_encoder.", te_lr)):
            params = [p for name, p in self.adapter_parameters().items() if name.startswith(prefix)]
            if params:
                groups.append({"params": params, "lr": lr})
        # fused: one kernel over all adapter tensors (tens of them per block; ~5x faster on CPU)
        fused = all(p.device.type in ("cpu", "cuda") for group in groups for p in group["params"])
        return torch.optim.AdamW(groups, lr=self.hparams.lr, weight_decay=self.hparams.weight_decay, fused=fused)

    def on_fit_start(self) -> None:
        if self.sd.unet.dtype == torch.float16 and "16-mixed" not in str(self.trainer.precision):
            rank_zero_warn(
                "LoRA training through a float16 model without loss scaling: small gradients may underflow. "
                "Set `trainer.precision: 16-mixed` (or backbone.dtype float32 / bfloat16)."
            )

    def on_train_epoch_start(self) -> None:
        """Select this epoch's image order and flips (a function of (seed, epoch))."""
        dm = getattr(self.trainer, "datamodule", None)
        if callable(getattr(dm, "set_epoch", None)):
            dm.set_epoch(self.current_epoch)

    # --- checkpoints: adapters only ---
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Keep only the adapters: the frozen model is named by its fingerprint, not copied."""
        keep = set(self.adapter_parameters())
        state = checkpoint["state_dict"]
        for key in [k for k in state if k not in keep]:
            del state[key]
        checkpoint[DESCRIPTION_KEY] = self.describe()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Check the checkpoint belongs to this model and these adapters, then complete it with
        the frozen weights (Lightning loads state dicts strictly)."""
        saved = checkpoint.get(DESCRIPTION_KEY)
        current = self.describe()
        if saved is not None:
            differ = [k for k in ("rank", "alpha", "targets", "modules") if saved.get(k) != current[k]]
            ours, theirs = current["backbone"], saved.get("backbone", {})
            if (theirs.get("weights_id"), theirs.get("unet_weights_id")) != (
                ours["weights_id"],
                ours["unet_weights_id"],
            ):
                differ.insert(0, f"backbone {theirs.get('model')!r} vs {ours['model']!r} (other weights)")
            if differ:
                raise CheckpointMismatchError(
                    f"the checkpoint holds a LoRA of another configuration: {'; '.join(map(str, differ))}. "
                    f"Use the config it was trained with (its hparams.yaml) and the same base model"
                )
        own = {k: p.shape for k, p in self.adapter_parameters().items()}
        state = checkpoint["state_dict"]
        missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
        wrong = sorted(k for k in set(own) & set(state) if tuple(state[k].shape) != tuple(own[k]))
        if missing or unexpected or wrong:
            raise CheckpointMismatchError(
                f"the checkpoint's adapters do not fit this model (missing {missing[:3]}, unexpected {unexpected[:3]}, "
                f"other shape {wrong[:3]}); it was trained with another rank, targets or text-encoder setting"
            )
        state.update({k: v for k, v in self.state_dict().items() if k not in own})
