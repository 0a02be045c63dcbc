"""Download model weights once, on a machine with network access, into a local folder.

csdiff never downloads at training time on offline machines; copy the folder over and pass
it wherever a model string is expected (``backbone.model``, a ControlNet ``model``):

    python checkpoints_scripts/download_weights.py stable-diffusion-v1-5/stable-diffusion-v1-5 --out weights/sd15
    python checkpoints_scripts/download_weights.py lllyasviel/sd-controlnet-canny --out weights/controlnet-canny
"""

from __future__ import annotations

import argparse
from pathlib import Path

from csdiff.backbone.loading import SNAPSHOT_SUBFOLDERS


def download(repo_id: str, out: Path, revision: str | None = None) -> Path:
    """Fetch what csdiff loads (configs, tokenizer files, safetensors weights; no fp16/EMA duplicates)."""
    from huggingface_hub import list_repo_files, snapshot_download

    files = list_repo_files(repo_id, revision=revision)
    is_pipeline = "model_index.json" in files
    patterns = (
        ["model_index.json"] + [f"{s}/*.{ext}" for s in SNAPSHOT_SUBFOLDERS for ext in ("json", "txt", "safetensors")]
        if is_pipeline
        else ["*.json", "*.txt", "*.safetensors"]
    )
    path = snapshot_download(
        repo_id, revision=revision, local_dir=out, allow_patterns=patterns, ignore_patterns=["*.fp16.*", "*non_ema*", "*.ema.*"]
    )
    return Path(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("repo_id", help="hub id, e.g. stable-diffusion-v1-5/stable-diffusion-v1-5")
    parser.add_argument("--out", required=True, type=Path, help="local folder to fill")
    parser.add_argument("--revision", default=None, help="branch, tag or commit (default: main)")
    args = parser.parse_args()
    print(f"downloaded {args.repo_id} to {download(args.repo_id, args.out, args.revision)}")


if __name__ == "__main__":
    main()
