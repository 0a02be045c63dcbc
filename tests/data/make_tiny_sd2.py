"""Write a tiny random-weight Stable Diffusion 2.x-shaped model (diffusers layout) for tests.

What tells SD 2.x from 1.x, in miniature: linear projections in the transformers, one head
size per level (``attention_head_dim`` is a list), a text encoder with GELU (OpenCLIP, as
diffusers converts it), and a v-predicting scheduler (SD 2.1 at 768). Loaded through the same
code as real weights; ``make_tiny_controlnet`` adds a ControlNet built from its UNet (of any family).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from diffusers import AutoencoderKL, ControlNetModel, DDIMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from csdiff.backbone import tiny

WORDS = "a photo of shapes on striped background red circle blue square green triangle".split()


def make_tiny_sd2(root: Path, seed: int = 0) -> Path:
    """Create ``root`` (unet, vae, text_encoder, tokenizer, scheduler, model_index.json); returns it."""
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=8,
        block_out_channels=(32, 64, 64, 64),
        layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=48,
        attention_head_dim=(2, 4, 8, 8),
        use_linear_projection=True,
        norm_num_groups=16,
    )
    vae = AutoencoderKL(**tiny.VAE_CONFIG)
    vocab = tiny.write_tokenizer_files(WORDS, root / "tokenizer")
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            hidden_size=48,
            intermediate_size=96,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=77,
            projection_dim=48,
            hidden_act="gelu",
            vocab_size=vocab,
        )
    )
    unet.save_pretrained(root / "unet")
    vae.save_pretrained(root / "vae")
    tiny.save_text_encoder(text_encoder, root / "text_encoder")
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type="v_prediction",
    )
    scheduler.save_pretrained(root / "scheduler")
    (root / "model_index.json").write_text(
        json.dumps(
            {
                "_class_name": "StableDiffusionPipeline",
                "unet": ["diffusers", "UNet2DConditionModel"],
                "vae": ["diffusers", "AutoencoderKL"],
                "text_encoder": ["transformers", "CLIPTextModel"],
                "tokenizer": ["transformers", "CLIPTokenizer"],
                "scheduler": ["diffusers", "DDIMScheduler"],
            }
        )
    )
    return root


def make_tiny_controlnet(model: Path, out: Path, seed: int = 1) -> Path:
    """A random ControlNet for the model at ``model`` (any family), with non-zero output
    convolutions so it acts."""
    torch.manual_seed(seed)
    controlnet = ControlNetModel.from_unet(UNet2DConditionModel.from_pretrained(model, subfolder="unet"))
    with torch.no_grad():
        for conv in [*controlnet.controlnet_down_blocks, controlnet.controlnet_mid_block]:
            conv.weight.normal_(0, 0.05)
    controlnet.save_pretrained(out)
    return out


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("root", type=Path, help="output folder")
    make_tiny_sd2(parser.parse_args().root)
