"""Write DDPM-segmentation's features of a Horse-21 / Bedroom-28 dataset into a feature folder
that the label-scarce datamodule reads as its ``extra_features`` (ungated, after the gate).

The content-shift paper's label-scarce runs add these to its gated SD features: the LSUN ADM
models of openai/guided-diffusion, ``output_blocks`` 5, 6, 7, 8, 12 at one timestep, 2816
channels (see csdiff.backbone.adm_features):

    python checkpoints_scripts/extract_adm_features.py --checkpoint weights/adm/lsun_horse.pt \\
        --root data/ddpm-segmentation/horse_21 --dataset horse21 --output features/scarce_horse21_ddpm

Every image of the dataset (official train and test, so that any split finds its files) gets
one fp16 file ``<output>/<split>/<stem>.safetensors`` with keys ``ddpm/output_blocks.NN`` at
native size. Files already complete are kept (run again to resume); a folder written with
other blocks, timestep, seed or weights is refused. Exit status: 0 written, 2 refused (one
line on stderr says why).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from tqdm import tqdm

from csdiff.cli import _quiet_libraries

_quiet_libraries()  # before diffusers imports transformers: its import-time notices are no errors

from csdiff.backbone.adm import LSUN_256, ADMConfig  # noqa: E402
from csdiff.backbone.adm_features import PAPER_BLOCKS, ADMFeatureExtractor, write_feature_folder  # noqa: E402
from csdiff.backbone.loading import BackboneNotAvailableError  # noqa: E402
from csdiff.data.reading import read_image  # noqa: E402
from csdiff.data.scarce import DDPMSegDataModule  # noqa: E402
from csdiff.data.transforms import to_tensor  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--checkpoint", required=True, help="guided-diffusion checkpoint (lsun_horse.pt, lsun_bedroom.pt)"
    )
    parser.add_argument("--root", required=True, help="the dataset's folder (holding real/train and real/test)")
    parser.add_argument("--dataset", required=True, choices=["horse21", "bedroom28"])
    parser.add_argument("--output", required=True, type=Path, help="the feature folder to write (created if missing)")
    parser.add_argument(
        "--blocks", type=int, nargs="+", default=list(PAPER_BLOCKS), help="output_blocks indices (default: 5 6 7 8 12)"
    )
    parser.add_argument("--timestep", type=int, default=50, help="diffusion step t of the noised image (default 50)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the one noise map all images share (default 0)")
    parser.add_argument(
        "--config",
        default="lsun256",
        help="the checkpoint's architecture: lsun256 (the LSUN models) or a JSON file of csdiff.backbone.adm.ADMConfig fields",
    )
    parser.add_argument("--batch_size", type=int, default=1, help="images per UNet call (default 1)")
    parser.add_argument(
        "--device", default="cuda" if torch.cuda.is_available() else "cpu", help="default: cuda when available"
    )
    args = parser.parse_args(argv)
    if args.batch_size < 1:
        parser.error(f"--batch_size must be at least 1, got {args.batch_size}")
    return args


def load_config(spec: str) -> ADMConfig:
    """``lsun256`` or a JSON file of :class:`ADMConfig` fields."""
    if spec == "lsun256":
        return LSUN_256
    path = Path(spec)
    if not path.is_file():
        raise ValueError(f"--config must be lsun256 or a JSON file of ADMConfig fields; no such file: {path}")
    try:
        return ADMConfig(**json.loads(path.read_text()))
    except (json.JSONDecodeError, TypeError) as err:
        raise ValueError(f"{path} is not a JSON object of ADMConfig fields ({err})") from err


def read(path: str) -> torch.Tensor:
    """As DDPM-segmentation's ``make_transform('ddpm')`` on 256² images: RGB in [-1, 1]."""
    return to_tensor(read_image(path))


def main(argv: list[str] | None = None) -> int:
    """Returns the exit status: 0 written, 2 refused (one line on stderr says why)."""
    args = parse_args(argv)
    try:
        extractor = ADMFeatureExtractor(
            args.checkpoint, args.blocks, args.timestep, args.seed, load_config(args.config)
        )
        extractor.to(args.device)
        items = DDPMSegDataModule(root=args.root, dataset=args.dataset).feature_images()
        written, present = write_feature_folder(
            extractor,
            items,
            args.output,
            read,
            args.batch_size,
            lambda batches: tqdm(batches, desc="ADM features", unit="batch"),
        )
    except (ValueError, BackboneNotAvailableError) as err:  # checkpoint, config, dataset or folder refused
        print(f"error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
    channels = sum(c for c, _, _ in extractor.feature_shapes().values())
    print(
        f"wrote {written} feature files to {args.output} ({present} already there): {channels} channels, "
        f"{', '.join(extractor.layers)} at t={extractor.timestep}"
    )
    print(f"use them: data.init_args.extra_features: {args.output} and model.init_args.extra_channels: {channels}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
