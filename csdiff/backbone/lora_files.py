"""LoRA files in kohya's layout, the format the paper's LoRAs and most tools use (writing them,
naming their modules), and what every reader of LoRA files shares (its error, module shapes).

One module, three tensors: ``{name}.lora_down.weight`` (r, in) for a linear layer or
(r, in, k, k) for a convolution (LoCon), ``{name}.lora_up.weight`` (out, r) or (out, r, 1, 1),
and ``{name}.alpha``; the update is (alpha / r) · up ∘ down. ``name`` is the component's prefix
and the module's path with dots turned into underscores (``lora_unet_down_blocks_0_…``,
``lora_te_text_model_encoder_…``), which diffusers' kohya converter reads back.
"""

from __future__ import annotations

from pathlib import Path

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from csdiff.io import save_tensors

# Component -> kohya prefix; SDXL files name their two text encoders te1 / te2.
KOHYA_PREFIXES = {"unet": "lora_unet", "text_encoder": "lora_te", "text_encoder_2": "lora_te2"}
SDXL_KOHYA_PREFIXES = {"unet": "lora_unet", "text_encoder": "lora_te1", "text_encoder_2": "lora_te2"}

LoRAPair = tuple[torch.Tensor, torch.Tensor, float]  # down, up, alpha
LoRAModules = dict[str, dict[str, LoRAPair]]  # component -> module path -> (down, up, alpha)


class LoRAError(ValueError):
    """A LoRA file that is missing, unreadable or adapts nothing."""


def some(items, n: int = 4, noun: str = "key") -> str:
    """The first few of ``items`` and how many there are, for one-line messages."""
    items = sorted(items)
    more = ", …" if len(items) > n else ""
    return f"{', '.join(items[:n])}{more} ({len(items)} {noun}{'s' if len(items) != 1 else ''})"


def adaptable_shapes(model: nn.Module, prefix: str = "") -> dict[str, torch.Size]:
    """Weight shape of every Linear / Conv2d by its own path, also where peft has wrapped it."""
    out: dict[str, torch.Size] = {}
    for name, child in model.named_children():
        path = f"{prefix}{name}"
        layer = child.get_base_layer() if isinstance(child, BaseTunerLayer) else child
        if isinstance(layer, (nn.Linear, nn.Conv2d)):
            out[path] = layer.weight.shape
        elif not isinstance(child, BaseTunerLayer):
            out.update(adaptable_shapes(child, f"{path}."))
    return out


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
    path: str | Path,
    modules: dict[str, dict[str, LoRAPair]],
    sdxl: bool = False,
    metadata: dict[str, str] | None = None,
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


# --- Reading kohya files: what their names and suffixes mean ---------------------------------------

# The only suffixes of a kohya LoRA/LoCon module; anything else is another adapter kind or unknown.
KOHYA_SUFFIXES = ("lora_down.weight", "lora_up.weight", "alpha")

# Key segments of adapter kinds whose update is not (alpha / r) · up ∘ down (LyCORIS and others):
# csdiff refuses them by name rather than applying part of them.
OTHER_ADAPTERS = {
    **dict.fromkeys(("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2"), "LyCORIS LoHa"),
    **dict.fromkeys(
        ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2"), "LyCORIS LoKr"
    ),
    "lora_mid": "LyCORIS LoCon with Tucker decomposition (lora_mid)",
    **dict.fromkeys(("dora_scale", "lora_magnitude_vector"), "DoRA"),
    **dict.fromkeys(("diff", "diff_b"), "LyCORIS full (weight differences)"),
    "on_input": "LyCORIS (IA)^3",
    **dict.fromkeys(("oft_blocks", "oft_diag", "oft_R"), "LyCORIS OFT/BOFT"),
    **dict.fromkeys(("w_norm", "b_norm"), "LyCORIS norm-layer"),
    **dict.fromkeys(("a1", "a2", "b1", "b2"), "LyCORIS GLoRA"),
}


def other_adapter_kind(key: str) -> str | None:
    """The adapter kind a key belongs to when it is not LoRA/LoCon (``…hada_w1_a`` → LoHa), else None."""
    return next((OTHER_ADAPTERS[s] for s in key.split(".") if s in OTHER_ADAPTERS), None)


# Original (LDM / SGM) UNet names of diffusers modules, used by A1111 files and kohya's SDXL files.
_LDM_TOP = {
    "conv_in": "input_blocks.0.0",
    "conv_out": "out.2",
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
}
_LDM_CHILDREN = {
    "resnets": {
        "conv1": "in_layers.2",
        "conv2": "out_layers.3",
        "time_emb_proj": "emb_layers.1",
        "conv_shortcut": "skip_connection",
    },
    "downsamplers": {"conv": "op"},
}


def ldm_unet_blocks(unet: torch.nn.Module) -> dict[str, str]:
    """Each diffusers block path → its LDM block (``down_blocks.1.resnets.0`` → ``input_blocks.4.0``).

    Read from the UNet's own blocks, not from its name or index arithmetic: LDM's ``input_blocks``
    are conv_in, then per level one block per resnet (with its transformer, if any) and one for the
    downsampler; ``middle_block`` alternates resnets and transformers; ``output_blocks`` hold per
    level one block per resnet, the level's upsampler joining its last block (after the
    transformer, if there is one)."""
    out: dict[str, str] = {}
    k = 1
    for i, block in enumerate(unet.down_blocks):
        attentions = getattr(block, "attentions", None) or []
        for r in range(len(block.resnets)):
            out[f"down_blocks.{i}.resnets.{r}"] = f"input_blocks.{k}.0"
            if r < len(attentions):
                out[f"down_blocks.{i}.attentions.{r}"] = f"input_blocks.{k}.1"
            k += 1
        if getattr(block, "downsamplers", None):
            out[f"down_blocks.{i}.downsamplers.0"] = f"input_blocks.{k}.0"
            k += 1
    mid = getattr(unet, "mid_block", None)
    if mid is not None:
        for r in range(len(mid.resnets)):
            out[f"mid_block.resnets.{r}"] = f"middle_block.{2 * r}"
        for r in range(len(getattr(mid, "attentions", None) or [])):
            out[f"mid_block.attentions.{r}"] = f"middle_block.{2 * r + 1}"
    k = 0
    for i, block in enumerate(unet.up_blocks):
        attentions = getattr(block, "attentions", None) or []
        for r in range(len(block.resnets)):
            out[f"up_blocks.{i}.resnets.{r}"] = f"output_blocks.{k}.0"
            slot = 1
            if r < len(attentions):
                out[f"up_blocks.{i}.attentions.{r}"] = f"output_blocks.{k}.1"
                slot = 2
            if r == len(block.resnets) - 1 and getattr(block, "upsamplers", None):
                out[f"up_blocks.{i}.upsamplers.0"] = f"output_blocks.{k}.{slot}"
            k += 1
    return out


def ldm_unet_path(path: str, blocks: dict[str, str]) -> str | None:
    """The LDM name of a diffusers UNet module path (``blocks`` from :func:`ldm_unet_blocks`), or None."""
    if path in _LDM_TOP:
        return _LDM_TOP[path]
    parts = path.split(".")
    for cut in (4, 3):  # down_blocks.0.resnets.0 / mid_block.resnets.0
        head = ".".join(parts[:cut])
        if head in blocks and len(parts) > cut:
            rest = ".".join(parts[cut:])
            rename = _LDM_CHILDREN.get(parts[cut - 2])
            if rename is not None:
                rest = rename.get(rest)
            return None if rest is None else f"{blocks[head]}.{rest}"
    return None


def kohya_names(layers: dict[str, list[str]], unet: torch.nn.Module | None = None) -> dict[str, tuple[str, str]]:
    """Every kohya name a module may have in a file → (component, module path).

    ``layers`` maps components (``unet``, ``text_encoder``, ``text_encoder_2``) to module paths.
    UNet modules answer to their diffusers name (kohya's SD 1.x/2.x files) and, given ``unet``, to
    their LDM name (A1111 files, kohya's SDXL files); the first text encoder to both ``lora_te_``
    (SD 1.x/2.x) and ``lora_te1_`` (SDXL), as diffusers' converter reads both."""
    blocks = ldm_unet_blocks(unet) if unet is not None else {}
    table: dict[str, tuple[str, str]] = {}
    for component, paths in layers.items():
        for path in paths:
            names = {kohya_name(component, path, sdxl=False), kohya_name(component, path, sdxl=True)}
            if component == "unet" and (ldm := ldm_unet_path(path, blocks)) is not None:
                names.add(f"{KOHYA_PREFIXES['unet']}_{ldm.replace('.', '_')}")
            table.update(dict.fromkeys(names, (component, path)))
    return table
