"""What the feature cache saves: one validation of the quickstart's val set, cold vs warm.

Runs `csdiff validate --config configs/quickstart.yaml` twice in this process with a fresh
cache folder (tiny backbone, CPU; the untrained heads do not matter for timing) and prints
both wall times, their ratio, and the number of real UNet calls each made.

    python benchmarks/feature_cache.py [--num_val 32]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from diffusers import UNet2DConditionModel
from torch._subclasses.fake_tensor import FakeTensor

from csdiff.cli import run_lightning

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num_val", type=int, default=32)
    args = parser.parse_args()
    calls = [0]

    def count(module, inputs):  # a pre-hook: the extractor stops the UNet early, so it never returns
        if isinstance(module, UNet2DConditionModel) and not any(isinstance(a, FakeTensor) for a in inputs):
            calls[0] += 1

    handle = torch.nn.modules.module.register_module_forward_pre_hook(count)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        command = [
            "validate", "--config", str(ROOT / "configs" / "quickstart.yaml"),
            "--data.init_args.root", f"{tmp}/data/ADEChallengeData2016", "--data.init_args.num_val", str(args.num_val),
            "--model.init_args.feature_cache", f"{tmp}/cache", "--trainer.logger", "false", "--trainer.default_root_dir", tmp,
            "--trainer.enable_progress_bar", "false", "--trainer.callbacks", "[]",
        ]
        for label in ("cold", "warm"):
            calls[0] = 0
            start = time.perf_counter()
            miou = run_lightning(command).trainer.callback_metrics["val/mIoU"].item()
            rows.append((label, time.perf_counter() - start, calls[0], miou))
    handle.remove()
    print(f"{'run':<6} {'seconds':>8} {'UNet calls':>11} {'val/mIoU':>9}")
    for label, seconds, n, miou in rows:
        print(f"{label:<6} {seconds:>8.2f} {n:>11} {miou:>9.4f}")
    print(f"warm is {rows[0][1] / rows[1][1]:.1f}x faster ({args.num_val} images, tiny backbone, {torch.get_num_threads()} threads)")


if __name__ == "__main__":
    main()
