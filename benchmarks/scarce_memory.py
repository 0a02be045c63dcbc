"""Peak RAM of label-scarce training and testing at Horse-21 size (the research code: ~250 GB).

Builds a Horse-21-sized run: 30 training images (+ ``--test_images``) in the archive's layout,
and a feature folder holding, per image, synthetic fp16 features of the paper's 4 variants ×
(`legacy` + `up_cross`, 3674 channels) at their native SD 1.5 sizes, under the manifest of the
paper config's own extractor (`random-sd15` in float16, random LoRAs). Then, in a child
process, the real task runs through the CLI: `fit` for ``--steps`` steps (10 members, 64-pixel
batches each) and `test` on the test images. The child reports its peak RSS (VmHWM) after
building the task, after the fit and after the test, and the times per step and per image.

    python benchmarks/scarce_memory.py [--steps 200] [--test_images 2] [--model random-sd15]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "data"))


def _vm(field: str) -> int:
    """A /proc/self/status field in bytes (VmHWM: peak resident set; VmRSS: current)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def _config(tmp: Path, model: str, img_size: int, test_images: int) -> Path:
    from csdiff.backbone.random_models import meta_unet, write_random_lora

    config = yaml.safe_load((ROOT / "configs" / "scarce_horse21.yaml").read_text())
    init = config["model"]["init_args"]
    init["backbone"].update(model=model, img_size=img_size)
    unet = meta_unet() if model == "random-sd15" else None
    for i, variant in enumerate(init["variants"]):
        for cn in variant.get("controlnets", []):
            cn["model"] = "random-sd15-controlnet-canny" if model == "random-sd15" else "tiny-controlnet-canny"
        for j, lora in enumerate(variant.get("loras", [])):
            lora["path"] = (
                str(write_random_lora(tmp / f"lora_{i}_{j}.safetensors", unet, seed=i)) if unet is not None else None
            )
        if model != "random-sd15":
            variant.pop("loras", None)
    config["data"]["init_args"].update(root=str(tmp / "horse_21"), features=str(tmp / "features"), split="upstream")
    # DDPM-segmentation's ungated ADM features (extra_features) are not part of this measurement
    config["data"]["init_args"].pop("extra_features", None)
    init["extra_channels"] = 0
    config["trainer"].update(accelerator="cpu", enable_progress_bar=False, limit_test_batches=test_images)
    config["trainer"]["logger"]["init_args"]["save_dir"] = str(tmp / "logs")
    config["trainer"]["callbacks"] = []
    config["trainer"]["enable_checkpointing"] = False
    path = tmp / "scarce_horse21_bench.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def write_run(tmp: Path, model: str, img_size: int, test_images: int) -> Path:
    """Fake Horse-21 images and labels, and a feature folder of synthetic native-size features."""
    from make_fake_ddpmseg import make_fake_ddpmseg

    from csdiff.backbone import DiffusionFeatureExtractor
    from csdiff.backbone.store import FeatureFolder, folder_description
    from csdiff.data.scarce import DDPMSegDataModule

    config = _config(tmp, model, img_size, test_images)
    make_fake_ddpmseg(tmp / "horse_21", "horse21", num_train=30, num_test=test_images)
    init = yaml.safe_load(config.read_text())["model"]["init_args"]
    extractor = DiffusionFeatureExtractor(layers=init["layers"], variants=init["variants"], **init["backbone"])
    description = folder_description(extractor)
    folder = FeatureFolder(tmp / "features")
    items = DDPMSegDataModule(
        root=str(tmp / "horse_21"), features=str(tmp / "features"), split="upstream"
    ).feature_images()
    folder.prepare(description, dict(items))
    g = torch.Generator().manual_seed(0)
    for name, _ in items:
        folder.write(
            name,
            {
                v.name: {layer: torch.randn(*shape, generator=g) for layer, shape in description["shapes"].items()}
                for v in extractor.variants
            },
        )
    return config


def run(config: Path, steps: int, test_images: int) -> dict:
    """The child: fit then test through the CLI; peak RSS at each stage."""
    from csdiff.cli import run_lightning

    figures = {}
    start = time.perf_counter()
    cli = run_lightning(["fit", "--config", str(config), "--trainer.max_steps", str(steps)])
    figures["fit_s"] = time.perf_counter() - start
    figures["peak_after_fit"] = _vm("VmHWM")
    shapes = cli.model.extractor.feature_shapes()  # the bank: 30 images' native maps in fp16 (dropped after the fit)
    figures["bank_bytes"] = 30 * len(cli.model.extractor.variants) * sum(c * h * w for c, h, w in shapes.values()) * 2
    figures["channels"] = cli.model.channels
    figures["variants"] = len(cli.model.extractor.variants)
    start = time.perf_counter()
    cli.trainer.test(cli.model, datamodule=cli.datamodule)
    figures["test_s_per_image"] = (time.perf_counter() - start) / test_images
    figures["peak_after_test"] = _vm("VmHWM")
    return figures


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--test_images", type=int, default=2)
    parser.add_argument("--model", default="random-sd15", help="random-sd15 (SD 1.5 size) or tiny (reduced mode)")
    parser.add_argument("--img_size", type=int, default=512)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        print("FIGURES " + json.dumps(run(Path(args.child), args.steps, args.test_images)))
        sys.exit(0)
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        config = write_run(Path(tmp), args.model, args.img_size, args.test_images)
        written = time.perf_counter() - start
        child = subprocess.run(
            [
                sys.executable,
                __file__,
                "--child",
                str(config),
                "--steps",
                str(args.steps),
                "--test_images",
                str(args.test_images),
            ],
            capture_output=True,
            text=True,
        )
        if child.returncode != 0:
            sys.exit(f"the child run failed:\n{child.stderr[-3000:]}")
        figures = json.loads(next(line for line in child.stdout.splitlines() if line.startswith("FIGURES "))[8:])
    gb = 2**30
    upsampled = (30 + args.test_images) * 256 * 256 * figures["variants"] * figures["channels"] * 4
    print(
        f"label-scarce memory, {args.model} at {args.img_size}: 30 training + {args.test_images} test images, "
        f"{figures['variants']} variants x {figures['channels']} channels (synthetic features written in {written:.0f} s)"
    )
    print(f"{'what':<52} {'value':>10}")
    print(f"{'training bank (native fp16, 30 images)':<52} {figures['bank_bytes'] / gb:>8.2f} GB")
    print(
        f"{'peak RSS after fit (' + str(args.steps) + ' steps, backbone included)':<52} {figures['peak_after_fit'] / gb:>8.2f} GB"
    )
    print(f"{'peak RSS after test':<52} {figures['peak_after_test'] / gb:>8.2f} GB")
    print(f"{'the same pixels upsampled to 256² in float32':<52} {upsampled / gb:>8.1f} GB")
    print(f"{'fit wall time (task build + ' + str(args.steps) + ' steps)':<52} {figures['fit_s']:>8.1f} s")
    print(f"{'test time per 256² image':<52} {figures['test_s_per_image']:>8.1f} s")
