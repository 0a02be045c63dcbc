"""What stopping the UNet after the last requested activation saves, measured in one run.

For the paper's segmentation layers (up-level{0,1,2}-upsampler-out) and for `legacy`, times
one UNet call with the hooks that capture them, run to the end vs stopped after the last
requested module (what the extractor does), on the same noisy latent and prompt embedding.
Median of ``--repeats`` calls after one warm-up; prints both and their ratio.

    python benchmarks/unet_early_stop.py --model random-sd15 --img_size 256
"""

from __future__ import annotations

import argparse

import torch
from timing import timed  # benchmarks/timing.py (this folder is on sys.path when a script runs)

from csdiff.backbone import DiffusionFeatureExtractor
from csdiff.backbone.capture import ActivationCapture

SETS = {
    "segmentation": ["up-level0-upsampler-out", "up-level1-upsampler-out", "up-level2-upsampler-out"],
    "legacy": ["legacy"],
}


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--img_size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dtype", default="float32")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"# {args.model}, img_size {args.img_size}, {args.dtype}, {device}, median of {args.repeats}")
    print(f"{'layers':<14} {'full s':>8} {'stopped s':>10} {'ratio':>6}")
    for label, layers in SETS.items():
        ex = DiffusionFeatureExtractor(args.model, layers, img_size=args.img_size, dtype=args.dtype).to(device)
        latent_size = args.img_size // ex.latent_factor
        latent = torch.randn(1, 4, latent_size, latent_size, device=device, dtype=ex.dtype)
        emb = ex.prompt_embedding("a photo", ()).to(device, ex.dtype)

        def call(stop: bool) -> None:
            with ActivationCapture(ex.unet, ex.layers, (latent_size, latent_size), stop_early=stop):
                ex.unet(latent, ex.timestep, encoder_hidden_states=emb)
            if device == "cuda":
                torch.cuda.synchronize()

        full, stopped = timed(lambda: call(False), args.repeats), timed(lambda: call(True), args.repeats)
        print(f"{label:<14} {full:>8.3f} {stopped:>10.3f} {stopped / full:>6.2f}")
        ex = None  # frees it for the next; `del` would trip ruff (F821) on the closures above: astral-sh/ruff#9858


if __name__ == "__main__":
    main()
