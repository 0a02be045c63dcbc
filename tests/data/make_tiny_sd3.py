"""Write a tiny random-weight Stable Diffusion 3-shaped model (diffusers layout) for tests.

What tells SD3 from the other families, in miniature: an MMDiT (``SD3Transformer2DModel``:
joint attention over image and text tokens, blocks returning (text, image), SD3-medium's 24
blocks), three text encoders (two CLIPs with projections, whose penultimate states are joined
and padded to T5's width, and T5), a 16-channel VAE with a shift factor, and flow matching
(``FlowMatchEulerDiscreteScheduler``, shift 3). Loaded through the same code as real weights.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
from transformers import CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizer

from csdiff.backbone import tiny

# The widths the transformer and its ControlNets share (a ControlNet must match its transformer).
WIDTHS = dict(
    sample_size=8,
    patch_size=2,
    in_channels=16,
    attention_head_dim=8,
    num_attention_heads=4,
    joint_attention_dim=32,
    caption_projection_dim=32,
    pooled_projection_dim=48,
    out_channels=16,
    pos_embed_max_size=16,
)
WORDS = "a photo of shapes on striped background red circle blue square green triangle the and with".split()


def make_tiny_sd3(root: Path, seed: int = 0) -> Path:
    """Create ``root`` (transformer, vae, three text encoders and tokenizers, scheduler); returns it."""
    torch.manual_seed(seed)
    # SD3-medium's depth: every block name of the real model is valid here
    transformer = SD3Transformer2DModel(**WIDTHS, num_layers=24)
    vae = AutoencoderKL(**{**tiny.VAE_CONFIG, "latent_channels": 16}, scaling_factor=1.5305, shift_factor=0.0609)
    transformer.save_pretrained(root / "transformer")
    vae.save_pretrained(root / "vae")
    for sub, hidden in (("", 8), ("_2", 16)):
        vocab = tiny.write_tokenizer_files(WORDS, root / f"tokenizer{sub}")
        tokenizer = CLIPTokenizer.from_pretrained(root / f"tokenizer{sub}")
        clip = CLIPTextModelWithProjection(
            CLIPTextConfig(
                hidden_size=hidden,
                intermediate_size=2 * hidden,
                num_hidden_layers=2,
                num_attention_heads=2,
                max_position_embeddings=77,
                projection_dim=24,
                vocab_size=vocab,
                bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
            )
        )
        clip.save_pretrained(root / f"text_encoder{sub}")
    tiny.write_tiny_t5(root / "text_encoder_3", root / "tokenizer_3", WORDS, 32)
    FlowMatchEulerDiscreteScheduler(shift=3.0).save_pretrained(root / "scheduler")
    (root / "model_index.json").write_text(
        json.dumps(
            {
                "_class_name": "StableDiffusion3Pipeline",
                "transformer": ["diffusers", "SD3Transformer2DModel"],
                "vae": ["diffusers", "AutoencoderKL"],
                "text_encoder": ["transformers", "CLIPTextModelWithProjection"],
                "tokenizer": ["transformers", "CLIPTokenizer"],
                "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
                "tokenizer_2": ["transformers", "CLIPTokenizer"],
                "text_encoder_3": ["transformers", "T5EncoderModel"],
                "tokenizer_3": ["transformers", "T5Tokenizer"],
                "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
            }
        )
    )
    return root


def make_tiny_sd3_controlnet(out: Path, seed: int = 1, instantx: bool = False) -> Path:
    """An SD3ControlNetModel for the tiny SD3 (2 blocks), every weight random: its zero-initialised
    output projections too, so that it changes features. ``instantx``: trained with zero pooled
    projections and an unshifted condition latent, as InstantX's SD3 ControlNets."""
    from diffusers import SD3ControlNetModel

    torch.manual_seed(seed)
    net = SD3ControlNetModel(
        **WIDTHS,
        num_layers=2,
        force_zeros_for_pooled_projection=instantx,
    )
    with torch.no_grad():
        for p in [*net.controlnet_blocks.parameters(), *net.pos_embed_input.parameters()]:
            p.normal_(0, 0.05)
    net.save_pretrained(out)
    return out


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    make_tiny_sd3(parser.parse_args().out)
