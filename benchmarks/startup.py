"""Start-up of the paper configs at SD 1.5 size: seconds to instantiate, sizes of what trains.

Each paper config's model section is instantiated as shipped (float16, img_size 512) with
``random-sd15`` / ``random-sd15-controlnet-canny`` in place of the downloaded weights and
random LoRAs at SD 1.5 widths in place of the placeholders. Feature shapes come from a
shape-only probe, so no model runs; the time is dominated by creating the random weights
(reading real weights from disk replaces it). Also prints the trainable parameter count and
the size of a checkpoint with AdamW state (4 bytes per value: weights + 2 moments).

    python benchmarks/startup.py [--configs configs/seg_ade20k.yaml ...]
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
from pathlib import Path

import torch
import yaml

from csdiff.backbone.random_models import meta_unet, write_random_lora
from csdiff.tasks import SegmentationTask

ROOT = Path(__file__).resolve().parents[1]


def instantiate(config: Path, work: Path) -> tuple[float, SegmentationTask]:
    model = yaml.safe_load(config.read_text())["model"]["init_args"]
    model["backbone"]["model"] = "random-sd15"
    shapes = meta_unet()
    for i, variant in enumerate(model["variants"]):
        for cn in variant.get("controlnets", []):
            cn["model"] = "random-sd15-controlnet-canny"
        for j, lora in enumerate(variant.get("loras", [])):
            lora["path"] = str(write_random_lora(work / f"{config.stem}_{i}_{j}.safetensors", shapes, seed=10 * i + j))
    start = time.perf_counter()
    task = SegmentationTask(**model)
    return time.perf_counter() - start, task


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").is_file() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="*", type=Path, default=sorted((ROOT / "configs").glob("seg_*.yaml")))
    args = parser.parse_args()
    print(f"# {cpu_name()}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"{'config':<28} {'dtype':>8} {'img':>5} {'start s':>8} {'trainable':>12} {'ckpt GB':>8}")
    with tempfile.TemporaryDirectory() as tmp:
        for config in args.configs:
            seconds, task = instantiate(config, Path(tmp))
            trainable = sum(
                p.numel() for n, p in task.named_parameters() if p.requires_grad and not n.startswith("extractor.")
            )
            ckpt_gb = trainable * 4 * 3 / 1e9
            dtype = str(next(task.extractor.unet.parameters()).dtype).removeprefix("torch.")
            print(
                f"{config.name:<28} {dtype:>8} {task.extractor.img_size:>5} {seconds:>8.1f} {trainable / 1e6:>11.1f}M {ckpt_gb:>8.2f}"
            )
            del task


if __name__ == "__main__":
    main()
