"""LoRA files of PixArt, SD3, FLUX and DeepFloyd IF: each family's own diffusers loader.

Every file is read into modules by csdiff (diffusers-format keys ``transformer.…``/``unet.…``/
``text_encoder.…`` with ``lora_A``/``lora_B``, peft adapter folders, FLUX's kohya files through
diffusers' converter), each module with its alpha (an ``.alpha`` key, the file's peft metadata or
``adapter_config.json``, else alpha = rank) folded into its down weight, and placed on a layer of
the model before anything loads; :class:`~csdiff.backbone.lora.LoRARegistry` then hands exactly
these modules to the family's loader (peft itself where diffusers has none) and compares every
adapted layer with them.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers.loaders.lora_base import (
    LORA_ADAPTER_METADATA_KEY,
    disable_lora_for_text_encoder,
    enable_lora_for_text_encoder,
    set_adapters_for_text_encoder,
)
from diffusers.loaders.lora_pipeline import FluxLoraLoaderMixin, SD3LoraLoaderMixin, StableDiffusionLoraLoaderMixin
from diffusers.utils.state_dict_utils import DIFFUSERS_OLD_TO_DIFFUSERS
from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors import safe_open
from torch import nn

from csdiff.backbone.lora_files import KOHYA_SUFFIXES, LoRAError, LoRAModules, LoRAPair, adaptable_shapes, some


@dataclass(frozen=True)
class FamilyLoRA:
    """How one family's LoRA files reach its models; key prefixes are diffusers' component names."""

    loader: type | None  # the family pipeline's diffusers LoRA loader mixin; None: diffusers has none
    denoiser: str  # the denoiser's key prefix: "unet" or "transformer"
    text_encoders: tuple[str, ...] = ()  # the text encoders its files may adapt
    peft: tuple[str, ...] = ()  # components loaded with peft itself, where diffusers' loader cannot
    kohya: bool = False  # kohya files too, through the loader's converter


# SD 1.x/2.x/SDXL have no entry: their files go through the kohya tables of csdiff.backbone.lora_files.
FAMILY_LORAS = {
    # no PixArt LoRA loader in diffusers, and no PeftAdapterMixin on its transformer
    "pixart": FamilyLoRA(None, "transformer", peft=("transformer",)),
    # SD3's loader adapts both CLIPs, never T5
    "sd3": FamilyLoRA(SD3LoraLoaderMixin, "transformer", ("text_encoder", "text_encoder_2")),
    # FLUX's adapts CLIP-L, never T5; its converter reads kohya files (fused qkv split into to_q/to_k/to_v)
    "flux": FamilyLoRA(FluxLoraLoaderMixin, "transformer", ("text_encoder",), kohya=True),
    # IF's pipeline loads as SD's, whose text-encoder path sizes ranks by CLIP layer names (none on T5)
    "if": FamilyLoRA(StableDiffusionLoraLoaderMixin, "unet", ("text_encoder",), peft=("text_encoder",)),
}

# diffusers-format suffixes (peft's, diffusers' text-encoder and attention-processor ones) -> their part
_PAIR_SUFFIXES = {
    ".lora_A.weight": "down",
    ".lora_B.weight": "up",
    ".lora_linear_layer.down.weight": "down",
    ".lora_linear_layer.up.weight": "up",
    ".lora.down.weight": "down",
    ".lora.up.weight": "up",
    ".alpha": "alpha",
}
PEFT_PREFIX = "base_model.model."  # peft's save_pretrained: the adapted model's own paths follow
# kohya FLUX modules diffusers' converter splits: a fused qkv into to_q/to_k/to_v (or the context's
# add_q/k/v_proj), a single block's linear1 into to_q/to_k/to_v/proj_mlp
_FLUX_FUSED = {"_attn_qkv": 3, "_linear1": 4}
_FLUX_KOHYA_PREFIXES = ("lora_unet_", "lora_te_", "lora_te1_")  # transformer, CLIP-L (not T5's lora_te2_)


def one_line(err: Exception, limit: int = 300) -> str:
    """An error's text on one line, cut at ``limit`` characters (diffusers' and peft's run long)."""
    text = " ".join(str(err).split())
    return text if len(text) <= limit else text[:limit] + " …"


def lora_configs(raw_file: Path, peft_keys: bool, components: tuple[str, ...]) -> tuple[dict[str, dict], list[Path]]:
    """peft's LoRA configuration per component, and the files it came from: a diffusers file's
    metadata (``transformer.lora_alpha``, …), or for peft's keys the ``adapter_config.json`` saved
    beside its ``adapter_model.*`` (the denoiser's): peft's weights alone do not say their alphas."""
    if peft_keys:
        config_file = raw_file.parent / "adapter_config.json"
        if raw_file.stem != "adapter_model" or not config_file.is_file():
            raise LoRAError(
                f"LoRA {raw_file} holds peft adapter weights (base_model.model.…) without their "
                f"adapter_config.json, which holds their alphas: give the adapter's folder (adapter_config.json + "
                f"adapter_model.safetensors, as peft's save_pretrained writes it)"
            )
        return {components[0]: json.loads(config_file.read_text())}, [config_file]
    if raw_file.suffix != ".safetensors":
        return {}, []
    with safe_open(str(raw_file), framework="pt") as f:
        meta = (f.metadata() or {}).get(LORA_ADAPTER_METADATA_KEY)
    flat = json.loads(meta) if meta else {}
    configs: dict[str, dict] = {}
    for key, value in flat.items():
        component, _, field = key.partition(".")
        configs.setdefault(component, {})[field] = value
    return configs, []


def _config_alpha(config: dict, path: str, r: int) -> float:
    """A module's alpha as peft's ``config`` sets it (its alpha_pattern, else lora_alpha; no config:
    alpha = rank), as an alpha over r: rsLoRA's alpha/√r is (alpha·√r)/r."""
    patterns = config.get("alpha_pattern") or {}
    key = next((k for k in patterns if re.match(rf"(.*\.)?({k})$", path)), None)
    alpha = float(patterns[key] if key is not None else config.get("lora_alpha", r))
    return alpha * math.sqrt(r) if config.get("use_rslora") else alpha


def _pair_fits(down: torch.Tensor, up: torch.Tensor, shape: tuple[int, ...]) -> bool:
    r = down.shape[0]
    return tuple(down.shape[1:]) == shape[1:] and tuple(up.shape) in (
        (shape[0], r),
        (shape[0], r, *(1,) * (len(shape) - 2)),
    )


def family_modules(
    state: dict[str, torch.Tensor], given: str, family: str, spec: FamilyLoRA, configs: dict[str, dict]
) -> LoRAModules:
    """A diffusers-format or peft state dict's modules by component and path, each with its alpha
    (an ``.alpha`` key, else the component's peft config, else alpha = rank). Keys the family's
    loader would not apply, and modules missing a half, are refused."""
    components = (spec.denoiser, *spec.text_encoders)
    groups: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    odd = []
    for key, value in state.items():
        name = f"{spec.denoiser}.{key.removeprefix(PEFT_PREFIX)}" if key.startswith(PEFT_PREFIX) else key
        component, _, rest = name.partition(".")
        if component in spec.text_encoders:  # diffusers' old text-encoder names: to_q_lora.down → q_proj
            rest = next((rest.replace(o, n) for o, n in DIFFUSERS_OLD_TO_DIFFUSERS.items() if o in rest), rest)
        suffix = next((s for s in _PAIR_SUFFIXES if rest.endswith(s)), None)
        if component not in components or suffix is None:
            odd.append(key)
        else:
            groups.setdefault((component, rest.removesuffix(suffix)), {})[_PAIR_SUFFIXES[suffix]] = value
    prefixes = " / ".join(f"{c}." for c in components)
    if odd and len(odd) == len(state) and not any(k.partition(".")[0] in components for k in odd):
        bfl = family == "flux" and any("double_blocks" in k or "single_blocks" in k for k in odd)
        why = (
            "a FLUX LoRA in BFL's, ComfyUI's or XLabs' layout, which csdiff does not read: convert it to diffusers' "
            "format (FluxPipeline.load_lora_weights, then save_lora_weights) or to kohya's"
            if bfl
            else "is it a LoRA for another model family?"
        )
        raise LoRAError(
            f"LoRA {given} adapts zero modules of this {family} backbone (no key starts with {prefixes}: "
            f"{some(odd)}): {why}"
        )
    if odd:
        raise LoRAError(
            f"LoRA {given} has keys csdiff does not apply ({some(odd)}): a {family} LoRA key starts with "
            f"{prefixes} and ends with a LoRA weight (lora_A/lora_B, lora.down/lora.up) or .alpha"
        )
    for component, config in configs.items():
        if config.get("peft_type", "LORA") != "LORA" or config.get("use_dora"):
            kind = "DoRA" if config.get("use_dora") else config.get("peft_type")
            raise LoRAError(
                f"LoRA {given} is a {kind} adapter for its {component} (by its peft config); csdiff applies "
                f"LoRA weights only: merge it into the model with the tool that made it"
            )
    modules: LoRAModules = {}
    halves = []
    for (component, path), parts in groups.items():
        if "down" not in parts or "up" not in parts:
            halves.append(f"{component}.{path} has no {'up' if 'down' in parts else 'down'} weight")
            continue
        r = parts["down"].shape[0]
        alpha = float(parts["alpha"]) if "alpha" in parts else _config_alpha(configs.get(component, {}), path, r)
        modules.setdefault(component, {})[path] = (parts["down"], parts["up"], alpha)
    if halves:
        raise LoRAError(f"LoRA {given} does not fit this backbone: {some(halves, 3, 'module')}")
    return modules


def placed(modules: LoRAModules, given: str, family: str, models: dict[str, nn.Module]) -> LoRAModules:
    """``modules`` under their models' own paths (CLIP's ``text_model.`` dropped where transformers
    flattens it); a path naming no Linear/Conv2d layer, or weights that do not fit it, is refused."""
    out: LoRAModules = {}
    unknown, problems = [], []
    for component, pairs in modules.items():
        shapes = adaptable_shapes(models[component])
        for path, (down, up, alpha) in pairs.items():
            own = path if path in shapes else path.removeprefix("text_model.")
            if own not in shapes:
                unknown.append(f"{component}.{path}")
            elif not _pair_fits(down, up, tuple(shapes[own])):
                shape = tuple(shapes[own])
                problems.append(f"{component}.{path}: down {tuple(down.shape)} and up {tuple(up.shape)} vs {shape}")
            else:
                out.setdefault(component, {})[own] = (down, up, alpha)
    if unknown:
        total = sum(len(p) for p in modules.values())
        what = "adapts zero modules of" if len(unknown) == total else "names modules not in"
        raise LoRAError(
            f"LoRA {given} {what} this {family} backbone (no Linear/Conv2d layer at {some(unknown, noun='module')}): "
            f"is it a LoRA for another model family?"
        )
    if problems:
        raise LoRAError(f"LoRA {given} does not fit this backbone: {some(problems, 3, 'module')}")
    return out


def flux_kohya_state(raw: dict[str, torch.Tensor], given: str) -> tuple[dict[str, torch.Tensor], int]:
    """A kohya FLUX file through diffusers' converter, and how many modules it must come out as.

    Alphas are folded into the down weights first (the converter drops the final layer's alphas),
    and the keys it leaves without ``transformer.`` (final layer, input embedders), which diffusers'
    loader would skip, are put back under it."""
    odd = [k for k in raw if not k.startswith(_FLUX_KOHYA_PREFIXES) or k.partition(".")[2] not in KOHYA_SUFFIXES]
    if odd:
        raise LoRAError(
            f"LoRA {given} has keys csdiff does not apply ({some(odd)}): a kohya FLUX LoRA names the transformer "
            f"(lora_unet_…) and CLIP-L (lora_te_…/lora_te1_…) with {', '.join('.' + s for s in KOHYA_SUFFIXES)}; "
            f"diffusers' FLUX loader does not adapt T5"
        )
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in raw.items():
        name, _, suffix = key.partition(".")
        groups.setdefault(name, {})[suffix] = value
    folded: dict[str, torch.Tensor] = {}
    expected, halves = 0, []
    for name, parts in groups.items():
        if "lora_down.weight" not in parts or "lora_up.weight" not in parts:
            halves.append(f"{name} has no {'lora_up' if 'lora_down.weight' in parts else 'lora_down'}.weight")
            continue
        down = parts["lora_down.weight"]
        alpha = float(parts["alpha"]) if "alpha" in parts else float(down.shape[0])
        folded[f"{name}.lora_down.weight"] = down * (alpha / down.shape[0])
        folded[f"{name}.lora_up.weight"] = parts["lora_up.weight"]
        expected += next((n for end, n in _FLUX_FUSED.items() if name.endswith(end)), 1)
    if halves:
        raise LoRAError(f"LoRA {given} does not fit this backbone: {some(halves, 3, 'module')}")
    try:
        state = FluxLoraLoaderMixin.lora_state_dict(folded)
    except Exception as err:
        raise LoRAError(
            f"LoRA {given} is not a kohya FLUX LoRA diffusers can read ({type(err).__name__}: {one_line(err)}): "
            f"is it a LoRA for another model family?"
        ) from None
    state = {k if k.startswith(("transformer.", "text_encoder.")) else f"transformer.{k}": v for k, v in state.items()}
    return state, expected


def folded_state(pairs: dict[str, LoRAPair], prefix: str, down: str, up: str) -> dict[str, torch.Tensor]:
    """Each module as ``{prefix}{path}.{down}`` = (alpha/r)·down and ``….{up}`` (a conv's up with 1×1 axes)."""
    out = {}
    for path, (d, u, alpha) in pairs.items():
        out[f"{prefix}{path}.{down}"] = d * (alpha / d.shape[0])
        out[f"{prefix}{path}.{up}"] = u.reshape(u.shape[0], d.shape[0], *(1,) * (d.ndim - 2))
    return out


def load_with_peft(model: nn.Module, pairs: dict[str, LoRAPair], adapter: str) -> None:
    """peft itself, for models diffusers has no LoRA loader for: exactly these layers (full-match
    targets, no suffix matching), each at its own rank, alpha = rank (alphas are folded)."""
    state = folded_state(pairs, "", "lora_A.weight", "lora_B.weight")
    ranks = {f"^{re.escape(path)}$": down.shape[0] for path, (down, _, _) in pairs.items()}
    r = next(iter(ranks.values()))
    targets = "|".join(re.escape(path) for path in pairs)
    config = LoraConfig(r=r, lora_alpha=r, target_modules=targets, rank_pattern=ranks, alpha_pattern=ranks)
    inject_adapter_in_model(config, model, adapter_name=adapter, state_dict=state)
    result = set_peft_model_state_dict(model, state, adapter_name=adapter)
    if result.unexpected_keys:
        raise ValueError(f"peft placed no layer for {some(result.unexpected_keys)}")


def switch_adapters(model: nn.Module, selected: list[tuple[str, float]]) -> None:
    """Exactly ``selected`` (adapter, scale) on a model's peft layers; none: its LoRA layers off.
    diffusers' text-encoder helpers work on any module (PixArt's transformer has no set_adapters)."""
    if selected:
        enable_lora_for_text_encoder(model)
        set_adapters_for_text_encoder([n for n, _ in selected], model, [s for _, s in selected])
    else:
        disable_lora_for_text_encoder(model)


def unwrap_empty(model: nn.Module) -> None:
    """Put back the layer peft wrapped wherever its wrapper holds no adapter any more."""
    for path, layer in list(model.named_modules()):
        if isinstance(layer, BaseTunerLayer) and not any(getattr(layer, n) for n in layer.adapter_layer_names):
            parent, _, child = path.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, layer.get_base_layer())
