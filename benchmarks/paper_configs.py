"""Shared by the benchmark scripts: a paper config's model arguments, runnable offline.

The config's backbone becomes ``--model`` (``random-sd15`` or ``tiny``), its ControlNets the
matching random or tiny canny ControlNet, and its LoRA placeholders random LoRAs written
to ``folder`` (one per path, seeded by order), so the work per step is the paper's.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from csdiff.backbone.loading import load_sd_components
from csdiff.backbone.random_models import meta_unet, write_random_lora

ROOT = Path(__file__).resolve().parents[1]


def model_init(config: str, folder: Path, model: str, img_size: int, dtype: str) -> dict:
    """``model.init_args`` of ``configs/<config>`` with offline weights (see the module docstring)."""
    init = yaml.safe_load((ROOT / "configs" / config).read_text())["model"]["init_args"]
    init["backbone"].update(model=model, img_size=img_size, dtype=dtype)
    unet = meta_unet() if model == "random-sd15" else load_sd_components(model).unet  # only its widths are read
    loras: dict[str, str] = {}
    variants = list(init.get("variants", [])) + ([init["attention_variant"]] if init.get("attention_variant") else [])
    for variant in variants:
        for cn in variant.get("controlnets", []):
            cn["model"] = "random-sd15-controlnet-canny" if model == "random-sd15" else "tiny-controlnet-canny"
        for lora in variant.get("loras", []):
            if lora["path"] not in loras:
                path = folder / f"lora_{len(loras)}.safetensors"
                loras[lora["path"]] = str(write_random_lora(path, unet, seed=len(loras)))
            lora["path"] = loras[lora["path"]]
    return init
