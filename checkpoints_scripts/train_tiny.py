"""Train csdiff's `tiny` backbone: a miniature SD 1.5 (VAE, UNet, canny ControlNet).

A random-weight miniature gives chance-level features; a briefly trained one gives features
that carry image content and degrade with noise, so every csdiff tool can be shown working
offline. Reproducible from a seed (up to floating-point noise across machines):

    python checkpoints_scripts/train_tiny.py --out csdiff/backbone/weights

writes `tiny-sd/` (diffusers layout: unet, vae, text_encoder, tokenizer, scheduler) and
`tiny-controlnet-canny/`, stored as float16 safetensors.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, ControlNetModel, DDPMScheduler, PNDMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from csdiff.backbone import tiny
from csdiff.backbone.conditions import canny_condition
from csdiff.data.synthetic import caption_vocabulary, render_shapes


def shapes_batch(rng: np.random.Generator, batch: int, size: int) -> tuple[torch.Tensor, list[str], torch.Tensor]:
    """Images in [-1, 1] (B,3,H,W), captions, canny conditions in [0, 1] (B,3,H,W)."""
    samples = [render_shapes(rng, size) for _ in range(batch)]
    x = torch.from_numpy(np.stack([s.image for s in samples])).permute(0, 3, 1, 2).float() / 127.5 - 1
    return x, [s.caption for s in samples], canny_condition(x)


def cosine(opt: torch.optim.Optimizer, steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Cosine decay to 5% of the base rate: short runs still end converged."""
    return torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: 0.05 + 0.95 * 0.5 * (1 + np.cos(np.pi * min(s, steps) / steps))
    )


def log(stage: str, step: int, total: int, loss: float, start: float) -> None:
    if step % 25 == 0 or step == total:
        print(f"[{stage}] step {step}/{total} loss {loss:.4f} ({time.time() - start:.0f}s)", flush=True)


def train_vae(args, rng) -> AutoencoderKL:
    if args.vae:
        print(f"[vae] reusing {args.vae}")
        return AutoencoderKL.from_pretrained(args.vae).float().eval().requires_grad_(False)
    vae = AutoencoderKL(**tiny.VAE_CONFIG)
    opt = torch.optim.AdamW(vae.parameters(), lr=args.lr_vae)
    sched = cosine(opt, args.vae_steps)
    start = time.time()
    for step in range(1, args.vae_steps + 1):
        x, _, _ = shapes_batch(rng, args.batch, args.size)
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample()).sample
        kl = posterior.kl().mean() / x[0].numel()
        loss = F.l1_loss(recon, x) + F.mse_loss(recon, x) + args.kl_weight * kl
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        log("vae", step, args.vae_steps, loss.item(), start)
    vae.eval().requires_grad_(False)
    with torch.no_grad():
        x, _, _ = shapes_batch(rng, 32, args.size)
        std = vae.encode(x).latent_dist.mean.std().item()
    vae.register_to_config(scaling_factor=round(1.0 / std, 5))
    print(f"[vae] scaling_factor = {vae.config.scaling_factor}")
    return vae


def encode_text(tokenizer, text_encoder, captions: list[str]) -> torch.Tensor:
    ids = tokenizer(captions, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        return text_encoder(ids)[0]


def diffusion_step(args, rng, vae, tokenizer, text_encoder, noise_sched, unet, controlnet=None) -> torch.Tensor:
    x, captions, cond = shapes_batch(rng, args.batch, args.size)
    captions = [c if rng.random() > args.caption_dropout else "" for c in captions]
    with torch.no_grad():
        latents = vae.encode(x).latent_dist.sample() * vae.config.scaling_factor
    noise = torch.randn_like(latents)
    t = torch.randint(0, noise_sched.config.num_train_timesteps, (latents.shape[0],))
    noisy = noise_sched.add_noise(latents, noise, t)
    emb = encode_text(tokenizer, text_encoder, captions)
    extra = {}
    if controlnet is not None:
        down, mid = controlnet(noisy, t, encoder_hidden_states=emb, controlnet_cond=cond, return_dict=False)
        extra = dict(down_block_additional_residuals=down, mid_block_additional_residual=mid)
    pred = unet(noisy, t, encoder_hidden_states=emb, **extra).sample
    return F.mse_loss(pred, noise)


def train(args) -> None:
    torch.manual_seed(args.seed)
    # One data stream per stage, so reusing a trained VAE (--vae) leaves the later stages unchanged.
    rng_vae, rng_unet, rng_controlnet = (np.random.default_rng([args.seed, stage]) for stage in range(3))
    torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="tiny-sd-"))

    vocab_size = tiny.write_tokenizer_files(caption_vocabulary(), work / "tokenizer")
    tokenizer = CLIPTokenizer.from_pretrained(work / "tokenizer")
    assert len(tokenizer) == vocab_size, "tokenizer files were not read"
    text_config = CLIPTextConfig(
        vocab_size=vocab_size,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **tiny.TEXT_CONFIG,
    )
    text_encoder = CLIPTextModel(text_config).eval().requires_grad_(False)  # seeded random init, frozen

    vae = train_vae(args, rng_vae)
    torch.manual_seed(args.seed + 1)  # UNet init and noise likewise independent of how the VAE came

    unet = UNet2DConditionModel(**tiny.UNET_CONFIG)
    noise_sched = DDPMScheduler.from_config(PNDMScheduler.from_config(tiny.SCHEDULER_CONFIG).config)
    opt = torch.optim.AdamW(unet.parameters(), lr=args.lr_unet, weight_decay=0.01)
    sched = cosine(opt, args.unet_steps)
    start = time.time()
    for step in range(1, args.unet_steps + 1):
        loss = diffusion_step(args, rng_unet, vae, tokenizer, text_encoder, noise_sched, unet)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        log("unet", step, args.unet_steps, loss.item(), start)
    unet.eval().requires_grad_(False)

    controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=tiny.CONTROLNET_EMBEDDING_CHANNELS)
    opt = torch.optim.AdamW(controlnet.parameters(), lr=args.lr_controlnet)
    start = time.time()
    for step in range(1, args.controlnet_steps + 1):
        loss = diffusion_step(args, rng_controlnet, vae, tokenizer, text_encoder, noise_sched, unet, controlnet)
        opt.zero_grad()
        loss.backward()
        opt.step()
        log("controlnet", step, args.controlnet_steps, loss.item(), start)

    out = Path(args.out)
    sd_dir, cn_dir = work / "tiny-sd", work / "tiny-controlnet-canny"
    sd_dir.mkdir()
    shutil.move(str(work / "tokenizer"), str(sd_dir / "tokenizer"))
    for name, module in (("unet", unet), ("vae", vae)):
        module.to(torch.float16).save_pretrained(sd_dir / name, safe_serialization=True)
    tiny.save_text_encoder(text_encoder.to(torch.float16), sd_dir / "text_encoder")
    PNDMScheduler.from_config(tiny.SCHEDULER_CONFIG).save_pretrained(sd_dir / "scheduler")
    (sd_dir / "model_index.json").write_text(
        json.dumps(
            {
                "_class_name": "StableDiffusionPipeline",
                "_diffusers_version": "0.42.1",
                "unet": ["diffusers", "UNet2DConditionModel"],
                "vae": ["diffusers", "AutoencoderKL"],
                "text_encoder": ["transformers", "CLIPTextModel"],
                "tokenizer": ["transformers", "CLIPTokenizer"],
                "scheduler": ["diffusers", "PNDMScheduler"],
                "safety_checker": [None, None],
                "feature_extractor": [None, None],
                "requires_safety_checker": False,
            },
            indent=2,
        )
    )
    controlnet.to(torch.float16).save_pretrained(cn_dir, safe_serialization=True)
    out.mkdir(parents=True, exist_ok=True)
    for src in (sd_dir, cn_dir):
        dst = out / src.name
        if dst.exists():
            shutil.rmtree(dst)
        shutil.move(str(src), str(dst))
    shutil.rmtree(work, ignore_errors=True)
    print(f"wrote {out / sd_dir.name} and {out / cn_dir.name}")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--out", default=str(tiny.WEIGHTS_DIR), help="folder that receives tiny-sd/ and tiny-controlnet-canny/"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--vae", help="reuse this trained VAE folder (e.g. csdiff/backbone/weights/tiny-sd/vae) instead of training one"
    )
    p.add_argument("--size", type=int, default=tiny.TINY_IMG_SIZE)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--vae_steps", type=int, default=2500)
    p.add_argument("--unet_steps", type=int, default=3000)
    p.add_argument("--controlnet_steps", type=int, default=1000)
    p.add_argument("--lr_vae", type=float, default=1e-3)
    p.add_argument("--lr_unet", type=float, default=5e-4)
    p.add_argument("--lr_controlnet", type=float, default=5e-4)
    p.add_argument("--kl_weight", type=float, default=1e-3)
    p.add_argument("--caption_dropout", type=float, default=0.1)
    p.add_argument("--threads", type=int, default=2)
    return p.parse_args(argv)


if __name__ == "__main__":
    train(parse_args())
