"""Every shipped config parses, and runs a couple of steps with the tiny backbone substituted."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from helpers import load_script, write_kohya_lora

from csdiff.cli import main, run_lightning

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))
make_fake_ade20k = load_script("make_fake_ade20k").make_fake_ade20k
make_fake_cityscapes = load_script("make_fake_cityscapes").make_fake_cityscapes


def test_configs_exist():
    names = {p.name for p in CONFIGS}
    assert {"quickstart.yaml", "seg_ade20k.yaml", "seg_ade20k_public.yaml", "seg_cityscapes.yaml", "seg_cityscapes_public.yaml"} <= names


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.name)
def test_config_parses(config, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(config), "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["class_path"] == "csdiff.tasks.SegmentationTask"


def _tiny_lora(path: Path) -> str:
    """A small kohya LoRA for the tiny UNet (stands in for the paper's dataset LoRAs)."""
    g = torch.Generator().manual_seed(len(path.name))
    module = "up_blocks.2.attentions.0.transformer_blocks.0.attn1.to_q"
    write_kohya_lora(path, {module: (torch.randn(4, 64, generator=g) * 0.1, torch.randn(64, 4, generator=g) * 0.1, 4.0)})
    return str(path)


def _substitute_tiny(config: dict, tmp: Path) -> dict:
    """Same config, tiny backbone and ControlNet, generated LoRAs, fake data, a couple of steps."""
    model = config["model"]["init_args"]
    model["backbone"].update(model="tiny", img_size=64, dtype="float32")
    model.update(slide_crop=64, slide_stride=64)
    for i, variant in enumerate(model["variants"]):
        for cn in variant.get("controlnets", []):
            cn["model"] = "tiny-controlnet-canny"
        for j, lora in enumerate(variant.get("loras", [])):
            lora["path"] = _tiny_lora(tmp / f"lora_{i}_{j}.safetensors")
    data = config["data"]["init_args"]
    if config["data"]["class_path"].endswith("ADE20KDataModule"):
        data["root"] = str(make_fake_ade20k(tmp / "ADEChallengeData2016", n_train=2, n_val=1, size=(64, 80)))
        data.update(crop_size=64, scale=[128, 64], eval_resize=["short", 64])
    elif config["data"]["class_path"].endswith("CityscapesDataModule"):
        data["root"] = str(make_fake_cityscapes(tmp / "cityscapes", n_per_city=1, size=(64, 128)))
        data.update(crop_size=64, scale=[128, 64])
    else:
        data.update(root=str(tmp / "quickstart" / "ADEChallengeData2016"), num_train=4, num_val=1, size=64)
    data["num_workers"] = 0
    trainer = config["trainer"]
    trainer.update(max_steps=2, max_epochs=-1, limit_val_batches=1, enable_progress_bar=False, accelerator="cpu", devices=1)
    if trainer.get("check_val_every_n_epoch", 1) is None:
        trainer["val_check_interval"] = 2  # iteration-based configs
    else:
        trainer["check_val_every_n_epoch"] = 1
    trainer["logger"]["init_args"]["save_dir"] = str(tmp / "logs")
    for callback in trainer["callbacks"]:
        args = callback.setdefault("init_args", {})
        if "every_n_train_steps" in args:
            args["every_n_train_steps"] = 2
        if "output_dir" in args:
            args["output_dir"] = str(tmp / "predictions")
    return config


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.name)
def test_config_runs_with_tiny_backbone(config, tmp_path):
    text = yaml.safe_load(config.read_text())
    path = tmp_path / config.name
    path.write_text(yaml.safe_dump(_substitute_tiny(text, tmp_path)))
    cli = run_lightning(["fit", "--config", str(path)])
    assert cli.trainer.global_step == 2
    assert "val/mIoU" in cli.trainer.callback_metrics
