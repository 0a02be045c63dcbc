"""Memory of a variant with its own merged weights (`weights:`), e.g. one of the paper's LoRAs
released merged into SD 1.5.

Writes the model (``random-sd15``: SD 1.5's architecture) to a diffusers folder, and a "merged"
copy whose UNet and (with ``--text_encoder``) text encoder differ, as a LoRA merged into both
would. Then builds the extractor on the folder with one plain variant, and again with a
second variant naming the merged copy as its `weights`, and prints the bytes of frozen weights
each holds (resident memory is no measure here: safetensors weights are memory-mapped and
count only once touched).

    python benchmarks/variant_weights_memory.py [--model random-sd15] [--dtype float16] [--text_encoder]
"""

from __future__ import annotations

import argparse
import gc
import shutil
import tempfile
from pathlib import Path

import torch


def _bytes(module: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def write_folder(model: str, dtype: str, out: Path) -> Path:
    """The model as a diffusers folder (what a downloaded model looks like)."""
    from csdiff.backbone.loading import load_sd_components

    parts = load_sd_components(model, dtype=dtype, load_vae_decoder=True)
    for name in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        getattr(parts, name).save_pretrained(out / name)
    return out


def write_merged(base: Path, out: Path, text_encoder: bool, seed: int = 0) -> Path:
    """A copy whose attention projections (and first text-encoder layer) are changed."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    shutil.copytree(base, out)
    g = torch.Generator().manual_seed(seed)
    unet = UNet2DConditionModel.from_pretrained(base, subfolder="unet")
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if ".attn" in name and name.endswith("weight"):
                p.add_(torch.randn(p.shape, generator=g).to(p.dtype) * 1e-3)
    shutil.rmtree(out / "unet")
    unet.save_pretrained(out / "unet")
    if text_encoder:
        te = CLIPTextModel.from_pretrained(base, subfolder="text_encoder")
        with torch.no_grad():
            w = next(p for n, p in te.named_parameters() if n.endswith("layers.0.self_attn.q_proj.weight"))
            w.add_(torch.randn(w.shape, generator=g).to(w.dtype) * 1e-3)
        shutil.rmtree(out / "text_encoder")
        te.save_pretrained(out / "text_encoder")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="random-sd15")
    parser.add_argument("--dtype", default="float16")
    parser.add_argument("--text_encoder", action="store_true", help="the merged copy changes the text encoder too")
    args = parser.parse_args()
    from csdiff.backbone import DiffusionFeatureExtractor, Variant

    with tempfile.TemporaryDirectory() as tmp:
        base = write_folder(args.model, args.dtype, Path(tmp) / "base")
        merged = write_merged(base, Path(tmp) / "merged", args.text_encoder)
        gc.collect()
        rows = []
        for variants in ([Variant("plain")], [Variant("plain"), Variant("merged", weights=str(merged))]):
            ex = DiffusionFeatureExtractor(str(base), ["up-level1-upsampler-out"], variants=variants, dtype=args.dtype)
            extra = sum(_bytes(m) for m in (*ex.weight_unets.values(), *ex.weight_text_encoders.values()))
            unet = sum(_bytes(m) for m in ex.weight_unets.values())
            rows.append((len(variants), _bytes(ex), extra, unet, len(ex.weight_text_encoders)))
            del ex
            gc.collect()
    print(
        f"# {args.model}, {args.dtype}; the merged copy changes the UNet{' and the text encoder' if args.text_encoder else ''}"
    )
    print("| variants | frozen weights | of which the merged copy | its UNet | its text encoders kept |")
    print("|---|---|---|---|---|")
    for n, total, extra, unet, tes in rows:
        print(f"| {n} | {total / 2**20:,.0f} MiB | {extra / 2**20:,.0f} MiB | {unet / 2**20:,.0f} MiB | {tes} |")
    print(
        f"\none merged checkpoint costs {rows[1][2] / 2**20:,.0f} MiB of weights ({rows[1][2] / rows[0][1]:.2f}× the backbone's frozen weights)"
    )


if __name__ == "__main__":
    main()
