"""Writing LoRA files in kohya's layout, the format the paper's LoRAs and most tools use.

One module, three tensors: ``{name}.lora_down.weight`` (r, in) for a linear layer or
(r, in, k, k) for a convolution (LoCon), ``{name}.lora_up.weight`` (out, r) or (out, r, 1, 1),
and ``{name}.alpha``; the update is (alpha / r) · up ∘ down. ``name`` is the component's prefix
and the module's path with dots turned into underscores (``lora_unet_down_blocks_0_…``,
``lora_te_text_model_encoder_…``), which diffusers' kohya converter reads back.
"""

from __future__ import annotations

from pathlib import Path

import torch

from csdiff.io import save_tensors

# Component -> kohya prefix; SDXL files name their two text encoders te1 / te2.
KOHYA_PREFIXES = {"unet": "lora_unet", "text_encoder": "lora_te", "text_encoder_2": "lora_te2"}
SDXL_KOHYA_PREFIXES = {"unet": "lora_unet", "text_encoder": "lora_te1", "text_encoder_2": "lora_te2"}

LoRAPair = tuple[torch.Tensor, torch.Tensor, float]  # down, up, alpha


def kohya_name(component: str, module_path: str, sdxl: bool = False) -> str:
    """kohya's name of a module: ``lora_unet_down_blocks_0_attentions_0_…``.

    Text-encoder paths may come with or without ``text_model.`` (transformers ≥ 5 flattens
    CLIP's modules); kohya's names always have it."""
    prefixes = SDXL_KOHYA_PREFIXES if sdxl else KOHYA_PREFIXES
    if component not in prefixes:
        raise ValueError(f"unknown component {component!r}; one of {', '.join(prefixes)}")
    if component != "unet" and not module_path.startswith("text_model."):
        module_path = f"text_model.{module_path}"
    return f"{prefixes[component]}_{module_path.replace('.', '_')}"


def kohya_tensors(modules: dict[str, dict[str, LoRAPair]], sdxl: bool = False) -> dict[str, torch.Tensor]:
    """``{component: {module_path: (down, up, alpha)}}`` → kohya's flat tensor dict.

    A convolution's up weight gets its 1×1 kernel axes (kohya's LoCon layout) when its down
    weight is 4-D."""
    out: dict[str, torch.Tensor] = {}
    for component, pairs in modules.items():
        for path, (down, up, alpha) in pairs.items():
            name = kohya_name(component, path, sdxl)
            if down.ndim == 4 and up.ndim == 2:
                up = up[:, :, None, None]
            out[f"{name}.lora_down.weight"] = down.detach().contiguous()
            out[f"{name}.lora_up.weight"] = up.detach().contiguous()
            out[f"{name}.alpha"] = torch.tensor(float(alpha))
    return out


def save_kohya_lora(
    path: str | Path, modules: dict[str, dict[str, LoRAPair]], sdxl: bool = False, metadata: dict[str, str] | None = None,
    dtype: torch.dtype | None = None,
) -> Path:
    """Atomically write a kohya-format ``.safetensors`` LoRA (optionally cast to ``dtype``)."""
    tensors = kohya_tensors(modules, sdxl)
    if dtype is not None:
        tensors = {k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()}
    return save_tensors(path, tensors, metadata=metadata)


def kohya_delta(down: torch.Tensor, up: torch.Tensor, alpha: float, weight_shape: torch.Size) -> torch.Tensor:
    """The update (alpha / r) · up ∘ down a kohya pair makes to a weight of ``weight_shape``."""
    r = down.shape[0]
    product = up.reshape(up.shape[0], r).double() @ down.reshape(r, -1).double()
    return (float(alpha) / r * product).reshape(weight_shape)
