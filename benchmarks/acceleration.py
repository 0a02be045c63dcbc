"""What ``channels_last`` and ``compile`` do to one extraction, measured in one run.

The paper's segmentation layers and ADE20K-style variants without LoRAs (plain; canny
ControlNet), so one UNet call of 2 × ``--batch`` images and one ControlNet call per image
batch. For each setting: the first call (which compiles, where ``compile`` is on), the median
of ``--repeats`` later calls, the ratio to the plain extractor, and the largest difference of
any feature from the plain extractor's. Compile time is the first call minus a later one,
with inductor's on-disk cache empty (a fresh temporary folder) as on a user's first run;
``--warm_cache`` keeps the machine's cache (later runs of the same shapes compile faster).

    python benchmarks/acceleration.py [--model random-sd15] [--img_size 256] [--dtype float32]
        [--settings plain channels_last compile compile+channels_last] [--backend inductor] [--warm_cache]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import torch
import torch._dynamo
from timing import timed  # benchmarks/timing.py (this folder is on sys.path when a script runs)

from csdiff.backbone import DiffusionFeatureExtractor

LAYERS = ["up-level0-upsampler-out", "up-level1-upsampler-out", "up-level2-upsampler-out"]
SETTINGS = {
    "plain": {},
    "channels_last": {"channels_last": True},
    "compile": {"compile": True},
    "compile+channels_last": {"compile": True, "channels_last": True},
}


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


@torch.inference_mode()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="random-sd15")
    parser.add_argument("--img_size", type=int, default=256)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--backend", default="inductor", help="torch.compile backend of the compile settings")
    parser.add_argument(
        "--warm_cache", action="store_true", help="keep inductor's on-disk cache (default: an empty one)"
    )
    args = parser.parse_args()
    cache = None if args.warm_cache else tempfile.TemporaryDirectory(prefix="csdiff-inductor-")  # removed on exit
    if cache is not None:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache.name
    device = "cuda" if torch.cuda.is_available() else "cpu"
    controlnet = "tiny-controlnet-canny" if args.model == "tiny" else f"{args.model}-controlnet-canny"
    variants = [
        dict(name="plain", prompt="a photo"),
        dict(name="canny", prompt="a photo", controlnets=[dict(model=controlnet)]),
    ]
    images = (
        torch.rand(args.batch, 3, args.img_size, args.img_size, generator=torch.Generator().manual_seed(0)).to(device)
        * 2
        - 1
    )
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    print(
        f"# {args.model}, img_size {args.img_size}, batch {args.batch}, {args.dtype}, {name}, median of {args.repeats}, compile backend {args.backend}, {'warm' if args.warm_cache else 'empty'} compile cache"
    )
    print(f"{'setting':<22} {'first call s':>12} {'call s':>8} {'ratio':>6} {'compile s':>9} {'max |diff|':>10}")
    reference, plain_time = None, None
    for setting in args.settings:
        torch._dynamo.reset()
        options = {k: args.backend if k == "compile" else v for k, v in SETTINGS[setting].items()}
        extractor = DiffusionFeatureExtractor(
            args.model, LAYERS, img_size=args.img_size, variants=variants, dtype=args.dtype, **options
        ).to(device)
        start = time.perf_counter()
        out = extractor(images)
        synchronize()
        first = time.perf_counter() - start
        seconds = timed(lambda: extractor(images), args.repeats)
        if reference is None:
            reference, plain_time = out, seconds
        diff = max((out[v][n].float() - reference[v][n].float()).abs().max().item() for v in out for n in out[v])
        compile_s = f"{first - seconds:>9.1f}" if "compile" in setting else f"{'-':>9}"
        print(f"{setting:<22} {first:>12.2f} {seconds:>8.3f} {seconds / plain_time:>6.2f} {compile_s} {diff:>10.2e}")
        extractor = None  # frees it for the next; a `del` trips ruff F821 on the lambda above (astral-sh/ruff#9858)


if __name__ == "__main__":
    main()
