"""What the feature cache saves: one validation of the quickstart's val set, cold vs warm.

Runs `csdiff validate --config configs/quickstart.yaml` twice in this process with a fresh
cache folder (tiny backbone, CPU; the untrained heads do not matter for timing) and prints,
for each, the validation epoch's time (Lightning's evaluation loop alone), the whole command's
wall time (start-up included), the number of real UNet calls, and the epoch-time ratio.

    python benchmarks/feature_cache.py [--num_val 32]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
from diffusers import UNet2DConditionModel
from lightning.pytorch.loops.evaluation_loop import _EvaluationLoop
from torch._subclasses.fake_tensor import FakeTensor

from csdiff.cli import run_lightning

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num_val", type=int, default=32)
    parser.add_argument(
        "--model", default="tiny", help="tiny (the quickstart's) or random-sd15 (SD 1.5 size, random ControlNet)"
    )
    args = parser.parse_args()
    calls = [0]

    def count(module, inputs):  # a pre-hook: the extractor stops the UNet early, so it never returns
        if isinstance(module, UNet2DConditionModel) and not any(isinstance(a, FakeTensor) for a in inputs):
            calls[0] += 1

    handle = torch.nn.modules.module.register_module_forward_pre_hook(count)
    loop_seconds: list[float] = []
    run_loop = _EvaluationLoop.run

    def timed_run(self, *a, **k):  # the validation epoch alone, without start-up
        start = time.perf_counter()
        try:
            return run_loop(self, *a, **k)
        finally:
            loop_seconds.append(time.perf_counter() - start)

    _EvaluationLoop.run = timed_run
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        command = [
            "validate",
            "--config",
            str(ROOT / "configs" / "quickstart.yaml"),
            "--data.init_args.root",
            f"{tmp}/data/ADEChallengeData2016",
            "--data.init_args.num_val",
            str(args.num_val),
            "--model.init_args.feature_cache",
            f"{tmp}/cache",
            "--trainer.logger",
            "false",
            "--trainer.default_root_dir",
            tmp,
            "--trainer.enable_progress_bar",
            "false",
            "--trainer.callbacks",
            "[]",
        ]
        if args.model != "tiny":
            variants = [
                {"name": "plain", "prompt": "a photo"},
                {"name": "canny", "prompt": "a photo", "controlnets": [{"model": f"{args.model}-controlnet-canny"}]},
            ]
            command += [
                "--model.init_args.backbone",
                json.dumps({"model": args.model, "img_size": 128}),
                "--model.init_args.variants",
                json.dumps(variants),
            ]
        for label in ("cold", "warm"):
            calls[0] = 0
            start = time.perf_counter()
            trainer = run_lightning(command).trainer
            rows.append(
                (
                    label,
                    loop_seconds.pop(),
                    time.perf_counter() - start,
                    calls[0],
                    trainer.callback_metrics["val/mIoU"].item(),
                )
            )
    handle.remove()
    print("| run | validation epoch s | whole command s | UNet calls | val/mIoU |")
    print("|---|---|---|---|---|")
    for label, epoch, total, n, miou in rows:
        print(f"| {label} | {epoch:.2f} | {total:.2f} | {n} | {miou:.4f} |")
    print(
        f"\nwarm is {rows[0][1] / rows[1][1]:.1f}x faster per validation epoch, {rows[0][2] / rows[1][2]:.1f}x per command "
        f"({args.num_val} images, {args.model} backbone, {torch.get_num_threads()} threads; target >= 3x per epoch)"
    )


if __name__ == "__main__":
    main()
