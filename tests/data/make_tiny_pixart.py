"""Write a tiny random-weight PixArt-shaped model (diffusers layout) for tests.

What tells PixArt from the SD family, in miniature: a diffusion transformer (``transformer/``,
``PixArtTransformer2DModel``: patch embedding, blocks with self- and cross-attention, adaLN-single
timestep conditioning, learned variance: twice the latent channels out), a T5 text encoder with
its tokenizer (a SentencePiece-style unigram vocabulary written here), SD's VAE layout and a DDPM
scheduler. ``sigma=True`` gives PixArt-Σ's 300-token prompts in ``model_index.json``'s pipeline
name; ``conditions=True`` the resolution and aspect-ratio conditions of PixArt-α at 1024².
Loaded through the same code as real weights.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DPMSolverMultistepScheduler, PixArtTransformer2DModel

from csdiff.backbone import tiny

WORDS = "a photo of shapes on striped background red circle blue square green triangle the and with".split()


def make_tiny_pixart(root: Path, seed: int = 0, sigma: bool = False, conditions: bool = False) -> Path:
    """Create ``root`` (transformer, vae, text_encoder, tokenizer, scheduler, model_index.json); returns it."""
    torch.manual_seed(seed)
    transformer = PixArtTransformer2DModel(
        num_attention_heads=2,
        attention_head_dim=24,  # inner width 48: the size conditions embed in thirds of it
        in_channels=4,
        out_channels=8,
        num_layers=28,  # PixArt's depth: every block name of the real model is valid here
        cross_attention_dim=48,
        sample_size=8,
        patch_size=2,
        norm_num_groups=16,
        caption_channels=24,
        use_additional_conditions=conditions,
    )
    vae = AutoencoderKL(**tiny.VAE_CONFIG)
    tiny.write_tiny_t5(root / "text_encoder", root / "tokenizer", WORDS, 24, feed_forward_proj="gated-gelu")
    transformer.save_pretrained(root / "transformer")
    vae.save_pretrained(root / "vae")
    # PixArt's stock scheduler; its betas (DiT's linear schedule) fix the noise.
    DPMSolverMultistepScheduler(
        beta_start=0.0001, beta_end=0.02, beta_schedule="linear", variance_type="learned_range"
    ).save_pretrained(root / "scheduler")
    (root / "model_index.json").write_text(
        json.dumps(
            {
                "_class_name": "PixArtSigmaPipeline" if sigma else "PixArtAlphaPipeline",
                "transformer": ["diffusers", "PixArtTransformer2DModel"],
                "vae": ["diffusers", "AutoencoderKL"],
                "text_encoder": ["transformers", "T5EncoderModel"],
                "tokenizer": ["transformers", "T5Tokenizer"],
                "scheduler": ["diffusers", "DPMSolverMultistepScheduler"],
            }
        )
    )
    return root


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--sigma", action="store_true")
    make_tiny_pixart(parser.parse_args().out, sigma=parser.parse_args().sigma)
