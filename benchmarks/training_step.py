"""One segmentation training step of the paper's ADE20K config, split into its parts (c), and
its peak memory (e).

The config's task (3 variants: plain; LoRA A + canny; LoRA B + canny; random LoRAs) with
`random-sd15` at ``--img_size``, a batch of 2, AdamW. Parts, each the median of ``--repeats``
after a warm-up: extraction (frozen backbone), gate forward, heads + losses forward, backward,
optimizer step. Each ``--proj_blocks`` value gives one row set, so the gate's projection
blocks (3x3 convolutions at up to 1280 channels, per level and variant) can be weighed
against the UNet. Prints peak RSS (CPU) or ``torch.cuda.max_memory_allocated`` (GPU).

    python benchmarks/training_step.py [--img_size 256] [--proj_blocks 1 0] [--repeats 2]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from paper_configs import model_init  # benchmarks/*.py (this folder is on sys.path when a script runs)
from timing import peak_memory

from csdiff.tasks import SegmentationTask


def build(tmp: Path, model: str, img_size: int, dtype: str, proj_blocks: int) -> SegmentationTask:
    init = model_init("seg_ade20k.yaml", tmp, model, img_size, dtype)
    init["gate"] = dict(init.get("gate") or {}, proj_blocks=proj_blocks)
    init.update(slide_crop=img_size, slide_stride=img_size)
    return SegmentationTask(**init)


def step_parts(task: SegmentationTask, images: torch.Tensor, labels: torch.Tensor, repeats: int) -> dict[str, float]:
    optimizer = torch.optim.AdamW(task.task_parameters(), lr=1e-4)
    task.train()
    times: dict[str, list[float]] = {
        k: [] for k in ("extraction", "gate forward", "heads + losses forward", "backward", "optimizer step")
    }

    def mark(name: str, start: float) -> float:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        now = time.perf_counter()
        times[name].append(now - start)
        return now

    for i in range(repeats + 1):  # the first is a warm-up
        t = time.perf_counter()
        feats = task.features(images)
        t = mark("extraction", t)
        fused = task.gate(feats)
        t = mark("gate forward", t)
        logits = task.head(fused.features)
        loss = task.criterion(logits, labels) + fused.loss
        if task.aux_head is not None:
            loss = loss + task.hparams.aux_weight * task.criterion(
                task.aux_head(fused.features[task.hparams.aux_level]), labels
            )
        t = mark("heads + losses forward", t)
        loss.backward()
        t = mark("backward", t)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        mark("optimizer step", t)
        if i == 0:
            for values in times.values():
                values.clear()
    return {k: statistics.median(v) for k, v in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="random-sd15")
    parser.add_argument("--img_size", type=int, default=256)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--proj_blocks", type=int, nargs="+", default=[1, 0])
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator().manual_seed(0)
    images = (torch.rand(2, 3, args.img_size, args.img_size, generator=g) * 2 - 1).to(device)
    labels = torch.randint(0, 150, (2, args.img_size, args.img_size), generator=g).to(device)
    print(
        f"# seg_ade20k.yaml's task, {args.model} at {args.img_size}, batch 2, {args.dtype}, {device}, median of {args.repeats}"
    )
    print("| proj_blocks | part | seconds | share |")
    print("|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for blocks in args.proj_blocks:
            task = build(Path(tmp), args.model, args.img_size, args.dtype, blocks).to(device)
            parts = step_parts(task, images, labels, args.repeats)
            total = sum(parts.values())
            for name, seconds in parts.items():
                print(f"| {blocks} | {name} | {seconds:.3f} | {seconds / total:.0%} |")
            trainable = sum(p.numel() for p in task.task_parameters())
            print(f"| {blocks} | **step** ({trainable / 1e6:.1f} M trainable) | {total:.3f} | 100% |")
            del task
    print(f"\npeak memory: {peak_memory()}")


if __name__ == "__main__":
    main()
