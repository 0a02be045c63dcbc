"""Write a tiny random-weight DeepFloyd IF stage I-shaped model (diffusers layout) for tests.

What tells IF from the latent families, in miniature: no VAE (the UNet sees 64² pixels), a UNet
whose levels hold plain attention layers (``SimpleCrossAttn…`` blocks, resnet up/downsamplers),
T5 states projected inside the UNet and pooled into the time embedding, learned variance (6
output channels) and a cosine DDPM schedule. Loaded through the same code as real weights.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from diffusers import DDPMScheduler, UNet2DConditionModel

from csdiff.backbone import tiny

WORDS = "a photo of shapes on striped background red circle blue square green triangle the and with".split()


def make_tiny_if(root: Path, seed: int = 0) -> Path:
    """Create ``root`` (unet, text_encoder, tokenizer, scheduler, model_index.json); returns it."""
    torch.manual_seed(seed)
    UNet2DConditionModel(
        sample_size=64,
        layers_per_block=1,
        block_out_channels=(16, 32, 32, 32),
        down_block_types=("ResnetDownsampleBlock2D",) + ("SimpleCrossAttnDownBlock2D",) * 3,
        mid_block_type="UNetMidBlock2DSimpleCrossAttn",
        up_block_types=("SimpleCrossAttnUpBlock2D",) * 3 + ("ResnetUpsampleBlock2D",),
        in_channels=3,
        out_channels=6,
        cross_attention_dim=32,
        encoder_hid_dim=24,
        encoder_hid_dim_type="text_proj",
        attention_head_dim=8,
        addition_embed_type="text",
        addition_embed_type_num_heads=2,
        cross_attention_norm="group_norm",
        resnet_time_scale_shift="scale_shift",
        act_fn="gelu",
        norm_num_groups=8,
    ).save_pretrained(root / "unet")
    tiny.write_tiny_t5(root / "text_encoder", root / "tokenizer", WORDS, 24)
    DDPMScheduler(
        beta_schedule="squaredcos_cap_v2",
        variance_type="learned_range",
        thresholding=True,
        dynamic_thresholding_ratio=0.95,
    ).save_pretrained(root / "scheduler")
    (root / "model_index.json").write_text(
        json.dumps(
            {
                "_class_name": "IFPipeline",
                "unet": ["diffusers", "UNet2DConditionModel"],
                "text_encoder": ["transformers", "T5EncoderModel"],
                "tokenizer": ["transformers", "T5Tokenizer"],
                "scheduler": ["diffusers", "DDPMScheduler"],
            }
        )
    )
    return root


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    make_tiny_if(parser.parse_args().out)
