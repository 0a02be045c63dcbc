"""The tiny backbone's training script runs end to end and writes loadable weights."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch

from csdiff.backbone import DiffusionFeatureExtractor, Variant

ROOT = Path(__file__).resolve().parents[1]


def test_train_tiny_few_steps_writes_loadable_model(tmp_path):
    out = tmp_path / "weights"
    cmd = [
        sys.executable,
        str(ROOT / "checkpoints_scripts" / "train_tiny.py"),
        "--out",
        str(out),
        "--size",
        "64",
        "--batch",
        "2",
        "--vae_steps",
        "2",
        "--unet_steps",
        "2",
        "--controlnet_steps",
        "2",
        "--threads",
        "1",
    ]
    subprocess.run(cmd, check=True, capture_output=True, timeout=300)
    for part in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        assert (out / "tiny-sd" / part).is_dir()
    assert (out / "tiny-controlnet-canny" / "config.json").is_file()
    ex = DiffusionFeatureExtractor(
        str(out / "tiny-sd"),
        ["up-level1-upsampler-out"],
        img_size=64,
        variants=[Variant("c", "a red circle", controlnets=[{"model": str(out / "tiny-controlnet-canny")}])],
    )
    feats = ex(torch.zeros(1, 3, 64, 64))["c"]["up-level1-upsampler-out"]
    assert feats.shape == (1, 64, 4, 4) and torch.isfinite(feats).all()

    reused = tmp_path / "reused"
    vae = out / "tiny-sd" / "vae"
    run = subprocess.run(
        [*cmd[:3], str(reused), *cmd[4:], "--vae", str(vae)], check=True, capture_output=True, text=True, timeout=300
    )
    assert f"[vae] reusing {vae}" in run.stdout
    weights = "diffusion_pytorch_model.safetensors"
    assert (reused / "tiny-sd" / "vae" / weights).read_bytes() == (vae / weights).read_bytes()
