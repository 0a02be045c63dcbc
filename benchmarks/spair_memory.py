"""Peak memory and time of SPair-71k evaluation with the paper's config (e).

``configs/corr_spair.yaml``'s task (6 gated variants, 3 of them with a guided DDIM chain
60 → 50 and a canny ControlNet, 2 random LoRAs, the ``up_cross`` attention variant, `legacy`
layers, nearest neighbours on descriptors upsampled to 512) with ``--model`` at
``--img_size``, evaluating ``--pairs`` pairs one at a time as `csdiff test` does (batch 1,
inference mode), 20 keypoints each. Prints the time per pair and the peak memory: RSS on the
CPU, ``torch.cuda.max_memory_allocated`` on a GPU (the figure peers quote: ~18 GB).

    python benchmarks/spair_memory.py [--model random-sd15] [--img_size 512] [--dtype float32] [--pairs 2]
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

from csdiff.tasks import CorrespondenceTask


def pair(index: int, img_size: int, device: str) -> dict:
    """One collated pair as ``SPairDataModule`` gives it: images at ``img_size``, 20 keypoints in a 480×640 original."""
    g = torch.Generator().manual_seed(index)
    size = (480, 640)
    kps = lambda: torch.rand(20, 2, generator=g) * torch.tensor([size[1] - 1, size[0] - 1])  # noqa: E731
    image = lambda: (torch.rand(1, 3, img_size, img_size, generator=g) * 2 - 1).to(device)  # noqa: E731
    return dict(
        src_image=image(),
        trg_image=image(),
        src_kps=[kps()],
        trg_kps=[kps()],
        src_size=[size],
        trg_size=[size],
        src_bbox=[torch.tensor([0.0, 0.0, 639.0, 479.0])],
        trg_bbox=[torch.tensor([0.0, 0.0, 639.0, 479.0])],
        category=["cat"],
        src_path=[f"src{index}.jpg"],
        trg_path=[f"trg{index}.jpg"],
        name=[f"pair{index}"],
    )


@torch.inference_mode()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="random-sd15")
    parser.add_argument("--img_size", type=int, default=512)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--pairs", type=int, default=2)
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with tempfile.TemporaryDirectory() as tmp:
        init = model_init("corr_spair.yaml", Path(tmp), args.model, args.img_size, args.dtype)
        init["eval_size"] = args.img_size
        task = CorrespondenceTask(**init).to(device).eval()
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    print(f"# corr_spair.yaml's task, {args.model} at {args.img_size}, {args.dtype}, {name}, batch 1")
    calls = {"UNet": 0, "ControlNet": 0}
    task.extractor.unet.register_forward_pre_hook(lambda *_: calls.__setitem__("UNet", calls["UNet"] + 1))
    for net in task.extractor.controlnets.values():
        net.register_forward_pre_hook(lambda *_: calls.__setitem__("ControlNet", calls["ControlNet"] + 1))
    times = []
    for i in range(args.pairs):
        batch = pair(i, args.img_size, device)
        start = time.perf_counter()
        preds = task._evaluate(batch, task.test_pck)
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        assert preds[0].shape == (20, 2)
    pck = task.test_pck.compute()
    print(f"{'what':<48} {'value':>10}")
    print(f"{'first pair s (includes one-time prompt encoding)':<48} {times[0]:>10.1f}")
    if len(times) > 1:
        print(f"{'later pairs s (median)':<48} {statistics.median(times[1:]):>10.1f}")
    print(f"{'UNet calls per pair (2 images each)':<48} {calls['UNet'] / args.pairs:>10.0f}")
    print(f"{'ControlNet calls per pair':<48} {calls['ControlNet'] / args.pairs:>10.0f}")
    print(f"{'pck_bbox_point (random weights)':<48} {float(pck['pck_bbox_point']):>10.3f}")
    print(f"\npeak memory: {peak_memory()}")


if __name__ == "__main__":
    main()
