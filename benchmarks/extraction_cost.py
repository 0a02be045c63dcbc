"""What an extraction costs against plain diffusers calls, as ratios measured in one run.

(a) Hook overhead: one extractor call (one variant) vs a bare diffusers VAE encode + full UNet
    call at the same batch, size and dtype. Two layer sets: the paper's segmentation layers
    (the extractor stops the UNet after up_blocks[2]) and `legacy` (it runs to up_blocks[3], so
    the ratio is the capture hooks' own cost). Target: <= 1.05.
(b) K variants: the ADE20K config's 3 variants (plain; LoRA A + canny; LoRA B + canny, random
    LoRAs made on the fly) in one extractor call vs 3 independent reference-style extractions,
    each with its own VAE encode, canny map, prompt encoding, ControlNet and full UNet call.
    Target: <= 0.65 (FLOP floor 0.60 at 512², DESIGN §6). Also the SPair-style case where
    variants share UNet weights (2 seeds of one prompt, 2 seeds with canny): one batched UNet
    call vs one call per variant (`batch_variants`).

    python benchmarks/extraction_cost.py [--model random-sd15] [--img_size 256] [--batch 1] [--repeats 3]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from timing import timed  # benchmarks/timing.py (this folder is on sys.path when a script runs)

from csdiff.backbone import ControlNet, DiffusionFeatureExtractor, LoRA, Variant
from csdiff.backbone.conditions import canny_condition
from csdiff.backbone.prompts import encode_prompt
from csdiff.backbone.random_models import write_random_lora

SEG_LAYERS = ["up-level0-upsampler-out", "up-level1-upsampler-out", "up-level2-upsampler-out"]
PROMPT = "a highly realistic photo of the real world. It can be an indoor scene, or an outdoor scene, or a photo of nature. high quality."


@torch.no_grad()
def reference(ex: DiffusionFeatureExtractor, images: torch.Tensor, variant: Variant) -> torch.Tensor:
    """One variant the way reference code does it: every step recomputed, the UNet run to the end."""
    ex.loras.activate(list(variant.loras))
    x = ex.resize(images)
    latents = ex.vae.encode(x.to(ex.vae.dtype)).latent_dist.mean.to(ex.dtype) * ex.vae.config.scaling_factor
    emb = encode_prompt(ex.tokenizer, ex.text_encoder, variant.prompt).to(ex.dtype).expand(x.shape[0], -1, -1)
    noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(variant.seed)).to(latents)
    noisy = ex.add_noise(latents, noise, ex.timestep)
    extra = {}
    for cn in variant.controlnets:
        cond = canny_condition(x, cn.low, cn.high).to(ex.device, ex.dtype)
        net = ex.controlnets[ex._controlnet_keys[cn.model]]
        down, mid = net(noisy, ex.timestep, encoder_hidden_states=emb, controlnet_cond=cond, return_dict=False)
        extra = {"down_block_additional_residuals": list(down), "mid_block_additional_residual": mid}
    return ex.unet(noisy, ex.timestep, encoder_hidden_states=emb, **extra).sample


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="random-sd15", help="random-sd15 (SD 1.5 size) or tiny")
    parser.add_argument("--img_size", type=int, default=256)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dtype", default="float32")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    controlnet = "random-sd15-controlnet-canny" if args.model == "random-sd15" else "tiny-controlnet-canny"
    images = torch.rand(args.batch, 3, args.img_size, args.img_size, generator=torch.Generator().manual_seed(0)) * 2 - 1
    print(
        f"# {args.model}, img_size {args.img_size}, batch {args.batch}, {args.dtype}, {device}, median of {args.repeats}"
    )
    print("| measurement | csdiff s | reference s | ratio | target |")
    print("|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        # (a) hooks: one plain variant
        for label, layers in (
            ("(a) 1 variant, segmentation layers", SEG_LAYERS),
            ("(a) 1 variant, legacy layers", ["legacy"]),
        ):
            ex = DiffusionFeatureExtractor(
                args.model, layers, img_size=args.img_size, dtype=args.dtype, variants=[Variant("plain", PROMPT)]
            ).to(device)
            x = images.to(device)
            ours = timed(lambda: ex(x), args.repeats)
            ex.prompt_embedding(PROMPT, ())  # the bare call gets its prompt embedding for free as well
            emb = ex.prompt_embedding(PROMPT, ()).expand(args.batch, -1, -1)

            @torch.no_grad()
            def bare() -> None:
                latents = (
                    ex.vae.encode(ex.resize(x).to(ex.vae.dtype)).latent_dist.mean.to(ex.dtype)
                    * ex.vae.config.scaling_factor
                )
                noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(0)).to(latents)
                ex.unet(ex.add_noise(latents, noise, ex.timestep), ex.timestep, encoder_hidden_states=emb)

            theirs = timed(bare, args.repeats)
            print(f"| {label} | {ours:.3f} | {theirs:.3f} | {ours / theirs:.2f} | <= 1.05 |")
            ex = None  # frees it for the next; `del` would trip ruff (F821) on the closures above: astral-sh/ruff#9858
        # (b) the ADE20K config's 3 variants
        unet = DiffusionFeatureExtractor(args.model, SEG_LAYERS, img_size=args.img_size).unet
        loras = [str(write_random_lora(Path(tmp) / f"lora_{k}.safetensors", unet, seed=k)) for k in range(2)]
        del unet
        canny = [ControlNet(controlnet)]
        variants = [Variant("plain", PROMPT)] + [
            Variant(f"lora_{k}_canny", PROMPT, loras=[LoRA(path)], controlnets=canny) for k, path in enumerate(loras)
        ]
        ex = DiffusionFeatureExtractor(
            args.model, SEG_LAYERS, img_size=args.img_size, dtype=args.dtype, variants=variants
        ).to(device)
        x = images.to(device)
        ours = timed(lambda: ex(x), args.repeats)
        theirs = timed(lambda: [reference(ex, x, v) for v in variants], args.repeats)
        print(
            f"| (b) ADE20K's 3 variants vs 3 reference extractions | {ours:.3f} | {theirs:.3f} | {ours / theirs:.2f} | <= 0.65 |"
        )
        # (b') variants sharing UNet weights: batched vs one call each
        shared = [Variant(f"fine_s{s}", PROMPT, seed=s) for s in (0, 1)] + [
            Variant(f"canny_s{s}", "a photo", seed=s, controlnets=canny) for s in (0, 1)
        ]
        times = {}
        for batched in (True, False):
            ex = DiffusionFeatureExtractor(
                args.model,
                SEG_LAYERS,
                img_size=args.img_size,
                dtype=args.dtype,
                variants=shared,
                batch_variants=batched,
            ).to(device)
            times[batched] = timed(lambda: ex(x), args.repeats)
            ex = None  # frees it for the next; `del` would trip ruff (F821) on the closures above: astral-sh/ruff#9858
        print(
            f"| (b') 4 variants sharing UNet weights: one batched call vs one per variant | {times[True]:.3f} | {times[False]:.3f} | {times[True] / times[False]:.2f} | < 1 |"
        )


if __name__ == "__main__":
    main()
