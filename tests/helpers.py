"""Test helpers: synthetic images and LoRA files in the formats csdiff reads."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
from safetensors.torch import save_file

from csdiff.assess import shapes_probe_data


def shapes_images(n: int, size: int = 64, seed: int = 7) -> torch.Tensor:
    """A batch of synthetic shape images in [-1, 1]."""
    return shapes_probe_data(n, size, seed)[0]


def kohya_name(module_path: str, prefix: str = "lora_unet") -> str:
    return f"{prefix}_{module_path.replace('.', '_')}"


def ldm_unet_path(diffusers_path: str) -> str:
    """Diffusers attention paths of SD 1.5 topology under original LDM (A1111) block names."""
    parts = diffusers_path.split(".")
    if parts[0] == "down_blocks":
        level, kind, r = int(parts[1]), parts[2], int(parts[3])
        assert kind == "attentions"
        return ".".join(["input_blocks", str(3 * level + r + 1), "1", *parts[4:]])
    if parts[0] == "up_blocks":
        level, kind, r = int(parts[1]), parts[2], int(parts[3])
        assert kind == "attentions"
        return ".".join(["output_blocks", str(3 * level + r), "1", *parts[4:]])
    raise ValueError(diffusers_path)


def write_kohya_lora(
    path: Path, modules: dict[str, tuple[torch.Tensor, torch.Tensor, float]], prefix: str = "lora_unet", ldm: bool = False
) -> Path:
    """A kohya-style file: {name}.lora_down.weight (r, in), {name}.lora_up.weight (out, r), {name}.alpha."""
    tensors = {}
    for module_path, (down, up, alpha) in modules.items():
        name = kohya_name(ldm_unet_path(module_path) if ldm else module_path, prefix)
        tensors[f"{name}.lora_down.weight"] = down.contiguous()
        tensors[f"{name}.lora_up.weight"] = up.contiguous()
        tensors[f"{name}.alpha"] = torch.tensor(float(alpha))
    save_file(tensors, str(path))
    return path


def load_script(name: str):
    """Import a generator script from tests/data (a folder of scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(name, Path(__file__).parent / "data" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
