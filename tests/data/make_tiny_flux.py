"""Write a tiny random-weight FLUX.1-shaped model (diffusers layout) for tests.

What tells FLUX from the other families, in miniature: a transformer fed packed 2×2 latent
patches (``FluxTransformer2DModel``: FLUX.1's 19 double-stream and 38 single-stream blocks,
rotary positions from image and text ids, a guidance embedding as FLUX.1-dev has), CLIP-L for
the pooled embedding and T5 for the tokens, a 16-channel VAE with a shift factor, and flow
matching whose shift grows with the image's token count. Loaded through the same code as real
weights.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from csdiff.backbone import tiny

# The widths the transformer and its ControlNets share (a ControlNet must match its transformer).
WIDTHS = dict(
    patch_size=1,
    in_channels=64,  # 16 latent channels × one 2×2 patch per token
    attention_head_dim=16,
    num_attention_heads=2,
    joint_attention_dim=32,
    pooled_projection_dim=16,
    axes_dims_rope=(4, 6, 6),
)
WORDS = "a photo of shapes on striped background red circle blue square green triangle the and with".split()


def make_tiny_flux(root: Path, seed: int = 0, guidance: bool = True) -> Path:
    """Create ``root`` (transformer, vae, CLIP and T5 with tokenizers, scheduler); returns it."""
    torch.manual_seed(seed)
    # FLUX.1's depths: every block name of the real model is valid here
    transformer = FluxTransformer2DModel(**WIDTHS, num_layers=19, num_single_layers=38, guidance_embeds=guidance)
    vae = AutoencoderKL(**{**tiny.VAE_CONFIG, "latent_channels": 16}, scaling_factor=0.3611, shift_factor=0.1159)
    transformer.save_pretrained(root / "transformer")
    vae.save_pretrained(root / "vae")
    vocab = tiny.write_tokenizer_files(WORDS, root / "tokenizer")
    tokenizer = CLIPTokenizer.from_pretrained(root / "tokenizer")
    clip = CLIPTextModel(
        CLIPTextConfig(
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=77,
            vocab_size=vocab,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    tiny.save_text_encoder(clip, root / "text_encoder")
    tiny.write_tiny_t5(root / "text_encoder_2", root / "tokenizer_2", WORDS, 32)
    FlowMatchEulerDiscreteScheduler(
        shift=3.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    ).save_pretrained(root / "scheduler")
    (root / "model_index.json").write_text(
        json.dumps(
            {
                "_class_name": "FluxPipeline",
                "transformer": ["diffusers", "FluxTransformer2DModel"],
                "vae": ["diffusers", "AutoencoderKL"],
                "text_encoder": ["transformers", "CLIPTextModel"],
                "tokenizer": ["transformers", "CLIPTokenizer"],
                "text_encoder_2": ["transformers", "T5EncoderModel"],
                "tokenizer_2": ["transformers", "T5Tokenizer"],
                "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
            }
        )
    )
    return root


def make_tiny_flux_controlnet(out: Path, seed: int = 1) -> Path:
    """An InstantX-style FluxControlNetModel for the tiny FLUX (2 + 2 blocks, the condition read as
    a packed latent), every weight random: its zero-initialised projections too, so that it
    changes features."""
    from diffusers import FluxControlNetModel

    torch.manual_seed(seed)
    net = FluxControlNetModel(**WIDTHS, num_layers=2, num_single_layers=2, guidance_embeds=True)
    with torch.no_grad():
        zeroed = [net.controlnet_blocks, net.controlnet_single_blocks, net.controlnet_x_embedder]
        for p in (p for module in zeroed for p in module.parameters()):
            p.normal_(0, 0.05)
    net.save_pretrained(out)
    return out


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    make_tiny_flux(parser.parse_args().out)
