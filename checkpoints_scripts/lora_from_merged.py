"""Factor a checkpoint with a LoRA merged into it back into a kohya LoRA file (truncated SVD).

The paper's LoRAs were released merged into whole SD 1.5 checkpoints. This writes, for every
UNet and text-encoder Linear/Conv2d whose weight differs between MERGED and BASE, a kohya LoCon
module of rank R (alpha = R, scale 1) that a csdiff variant loads as an ordinary LoRA:

    python checkpoints_scripts/lora_from_merged.py --base weights/sd15 --merged ade20k_lora_merged.ckpt \\
        --rank 64 --output weights/ade20k_lora.safetensors

BASE and MERGED are model strings csdiff's loader takes: ``tiny``, a diffusers folder, or a
single-file ``.ckpt``/``.safetensors``; a single file is configured by ``--base_model`` (a
diffusers folder of its family; default: BASE when BASE is not a single file). It prints the
relative reconstruction error ‖ΔW − ΔW_r‖_F / ‖ΔW‖_F per module type and overall (pooled over
the modules of a type; see csdiff.backbone.lora_factor). The paper's LoRAs are rank 64: rank 64
recovers them up to the merge's own rounding (a float16 checkpoint rounds every weight by up to
2^-11 of itself; that noise has full rank and shows as a small error floor). Both models are
loaded in float32 (about 8 GB for SD 1.5); the SVDs take a few minutes on a CPU at SD 1.5 size.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from csdiff.backbone.loading import SINGLE_FILE_SUFFIXES, BackboneNotAvailableError, load_sd_components
from csdiff.backbone.lora_factor import (
    COMPONENTS,
    ArchitectureMismatch,
    as_lora,
    factor_all,
    format_summary,
    plan_factoring,
    summarize,
)
from csdiff.backbone.lora_files import save_kohya_lora

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--base",
        required=True,
        help="the model the LoRA was merged into (tiny, a diffusers folder, a .ckpt/.safetensors)",
    )
    parser.add_argument("--merged", required=True, help="the merged model (same kinds of model string)")
    parser.add_argument("--rank", required=True, type=int, help="LoRA rank (clipped per layer to min(out, in·k·k))")
    parser.add_argument("--output", required=True, type=Path, help="the kohya .safetensors LoRA to write")
    parser.add_argument(
        "--base_model", default=None, help="diffusers folder configuring single-file checkpoints (default: BASE)"
    )
    parser.add_argument(
        "--dtype", default="float32", choices=sorted(DTYPES), help="dtype of the written factors (default float32)"
    )
    parser.add_argument(
        "--min_change",
        type=float,
        default=0.0,
        help="skip layers whose relative change ‖ΔW‖/‖W‖ is at most this (default 0: only equal weights are skipped)",
    )
    args = parser.parse_args(argv)
    if args.rank < 1:
        parser.error(f"--rank must be at least 1, got {args.rank}")
    if args.output.suffix != ".safetensors":
        parser.error(f"--output must end in .safetensors, got {args.output}")
    return args


def _single_file(model: str) -> bool:
    return Path(model).expanduser().suffix in SINGLE_FILE_SUFFIXES


def _models(model: str, base_model: str | None) -> dict[str, torch.nn.Module]:
    parts = load_sd_components(model, base_model=base_model if _single_file(model) else None)
    return {c: getattr(parts, c) for c in COMPONENTS if getattr(parts, c, None) is not None}


def _one_line(err: Exception) -> str:
    return " ".join(str(err).split())


def main(argv: list[str] | None = None) -> int:
    """Returns the exit status: 0 written, 2 refused (one line on stderr says why)."""
    args = parse_args(argv)
    base_model = args.base_model or (None if _single_file(args.base) else args.base)
    if base_model is None and (_single_file(args.base) or _single_file(args.merged)):
        print(
            "error: single-file checkpoints need --base_model FOLDER (a diffusers folder of their family)",
            file=sys.stderr,
        )
        return 2
    try:
        base, merged = _models(args.base, base_model), _models(args.merged, base_model)
    except BackboneNotAvailableError as err:
        print(f"error: {_one_line(err)}", file=sys.stderr)
        return 2
    try:
        plan = plan_factoring(base, merged, args.min_change)
    except ArchitectureMismatch as err:
        print(f"error: {args.merged} does not have the architecture of the base {args.base}: {err}", file=sys.stderr)
        return 2
    if not plan.changed:
        print(
            f"error: {args.merged} and {args.base} have equal UNet and text-encoder layers: there is no LoRA to factor",
            file=sys.stderr,
        )
        return 2
    start = time.perf_counter()
    factors = factor_all(
        plan, args.rank, DTYPES[args.dtype], lambda layers: tqdm(layers, desc="factoring", unit="module")
    )
    seconds = time.perf_counter() - start
    summary = summarize(factors)
    metadata = {
        "csdiff_tool": "lora_from_merged",
        "csdiff_base": args.base,
        "csdiff_merged": args.merged,
        "csdiff_rank": str(args.rank),
        "csdiff_relative_errors": json.dumps({kind: s.error for kind, s in summary.items()}),
    }
    sdxl = "text_encoder_2" in base
    path = save_kohya_lora(args.output, as_lora(factors), sdxl=sdxl, metadata=metadata, dtype=DTYPES[args.dtype])
    print(
        f"factored {len(factors)} changed layers at rank {args.rank} (alpha = rank) in {seconds:.1f} s "
        f"({1000 * seconds / len(factors):.0f} ms per layer); {plan.unchanged} unchanged layers skipped"
    )
    print("relative reconstruction error ‖ΔW − ΔW_r‖_F / ‖ΔW‖_F, pooled per module type:")
    print(format_summary(summary))
    if plan.not_factorable:
        shown = ", ".join(plan.not_factorable[:4]) + (", …" if len(plan.not_factorable) > 4 else "")
        print(
            f"warning: {len(plan.not_factorable)} other changed tensors cannot be carried by a LoRA and are left out: {shown}"
        )
    print(f"wrote {path} ({path.stat().st_size / 2**20:.1f} MiB, {args.dtype})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
