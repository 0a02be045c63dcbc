"""Write a tiny random-weight SDXL-shaped model (diffusers layout) for tests.

What tells SDXL from SD 1.x/2.x, in miniature: three levels whose first has no attention,
transformer depth growing with the level (1 / 2 / 3 here; SDXL: 0 / 2 / 10), linear
projections, two text encoders (the second with a projection giving the pooled embedding),
added conditioning on text embeddings and six time ids, and a VAE that asks to be upcast.
ControlNets for it come from ``make_tiny_sd2.make_tiny_controlnet``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from csdiff.backbone import tiny

WORDS = "a photo of shapes on striped background red circle blue square green triangle".split()
TE1, TE2, TIME_DIM = 32, 48, 8  # distinct widths, as in SDXL (768, 1280)


def make_tiny_sdxl(root: Path, seed: int = 0) -> Path:
    """Create ``root`` (unet, vae, text_encoder(_2), tokenizer(_2), scheduler, model_index.json); returns it."""
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=16,
        block_out_channels=(32, 64, 64),
        layers_per_block=2,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2, 3),
        cross_attention_dim=TE1 + TE2,
        attention_head_dim=(2, 4, 8),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=TIME_DIM,
        projection_class_embeddings_input_dim=6 * TIME_DIM + TE2,
        norm_num_groups=16,
    )
    vae = AutoencoderKL(**{**tiny.VAE_CONFIG, "scaling_factor": 0.13025, "force_upcast": True})
    unet.save_pretrained(root / "unet")
    vae.save_pretrained(root / "vae")
    for folder, width, cls in (
        ("text_encoder", TE1, CLIPTextModel),
        ("text_encoder_2", TE2, CLIPTextModelWithProjection),
    ):
        vocab = tiny.write_tokenizer_files(WORDS, root / folder.replace("text_encoder", "tokenizer"))
        encoder = cls(
            CLIPTextConfig(
                hidden_size=width,
                intermediate_size=2 * width,
                num_hidden_layers=2,
                num_attention_heads=4,
                max_position_embeddings=77,
                projection_dim=width,
                hidden_act="gelu",
                vocab_size=vocab,
            )
        )
        encoder.save_pretrained(root / folder)
    EulerDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        steps_offset=1,
        timestep_spacing="leading",
    ).save_pretrained(root / "scheduler")
    (root / "model_index.json").write_text(
        json.dumps(
            {
                "_class_name": "StableDiffusionXLPipeline",
                "unet": ["diffusers", "UNet2DConditionModel"],
                "vae": ["diffusers", "AutoencoderKL"],
                "text_encoder": ["transformers", "CLIPTextModel"],
                "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
                "tokenizer": ["transformers", "CLIPTokenizer"],
                "tokenizer_2": ["transformers", "CLIPTokenizer"],
                "scheduler": ["diffusers", "EulerDiscreteScheduler"],
            }
        )
    )
    return root


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("root", type=Path, help="output folder")
    make_tiny_sdxl(parser.parse_args().root)
