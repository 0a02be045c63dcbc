"""LoRA adapters shared by all variants: each file is loaded once as a named adapter.

Files may be diffusers LoRA folders/files, kohya files (``lora_unet_…``/``lora_te_…``), or
A1111/LDM-named files (``lora_unet_input_blocks_…``; mapped with the UNet's configuration).
Loading goes through diffusers' converters and peft; switching a variant's adapters is a
cheap flag change, not a reload. peft makes the active adapters trainable whenever it
switches them; the registry freezes them again at once, so a backbone parameter never
requires a gradient (nor lands in an optimizer or DDP's reducer).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
from diffusers.loaders.lora_base import (
    disable_lora_for_text_encoder,
    enable_lora_for_text_encoder,
    set_adapters_for_text_encoder,
)
from diffusers.utils.state_dict_utils import DIFFUSERS_OLD_TO_DIFFUSERS, convert_state_dict
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from csdiff.backbone.loading import component_weight_files, fingerprint_files

LORA_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".bin")


class LoRAError(ValueError):
    """A LoRA file that is missing, unreadable or adapts nothing."""


@dataclass(frozen=True)
class LoRA:
    """One LoRA applied to a variant: a file or diffusers LoRA folder, and its scale."""

    path: str
    scale: float = 1.0


def _fold_alphas(state_dict: dict, alphas: dict | None) -> tuple[dict, dict | None]:
    """Scale each down weight by its module's alpha/rank, so every adapted layer has scaling 1.

    diffusers turns per-module alphas that differ (resized kohya files, block-wise alphas) into
    peft alpha patterns that match no attention or text-encoder module, silently giving those
    modules the most common alpha. Unknown key layouts are left to diffusers unchanged.
    """
    if not alphas:
        return state_dict, alphas
    out = dict(state_dict)
    for key, alpha in alphas.items():
        base = key.removesuffix(".alpha")
        down = next((k for k in (base, base + ".lora.down.weight") if k in out), None)
        if down is None:
            return state_dict, alphas
        out[down] = out[down] * (float(alpha) / out[down].shape[0])
    return out, None


def _text_encoder_keys_to_new_format(state_dict: dict, prefixes: tuple[str, ...]) -> dict:
    """Old-format kohya text-encoder keys (``to_q_lora.down``) to ``q_proj.lora_linear_layer.down``:
    diffusers recognises the old format only when ``out_proj`` is adapted too."""
    out = {k: v for k, v in state_dict.items() if not k.startswith(tuple(f"{p}." for p in prefixes))}
    for prefix in prefixes:
        te = {k: v for k, v in state_dict.items() if k.startswith(f"{prefix}.")}
        out.update(convert_state_dict(te, DIFFUSERS_OLD_TO_DIFFUSERS))
    return out


def _unit_scaling(adapter: str, *models: nn.Module) -> None:
    """Give every layer of ``adapter`` alpha = rank (scaling 1): its alphas are folded into the weights.

    What diffusers assigns when no alphas are passed differs between versions (the most common
    rank as alpha for every layer, in some): setting it here makes the result version-proof.
    peft recomputes the scaling from alpha and rank whenever adapter weights are set.
    """
    for model in models:
        for layer in model.modules():
            if isinstance(layer, BaseTunerLayer) and adapter in getattr(layer, "lora_A", {}):
                layer.lora_alpha[adapter] = layer.r[adapter]
                layer.scaling[adapter] = 1.0


def _lora_fingerprint(file: Path) -> str:
    """By content: a single file's name does not count (a copy elsewhere is the same LoRA)."""
    return fingerprint_files([file] if file.is_file() else component_weight_files(file), file)


def _adapted_modules(model: nn.Module, adapter: str) -> int:
    return sum(1 for m in model.modules() if isinstance(m, BaseTunerLayer) and adapter in getattr(m, "lora_A", {}))


class LoRARegistry:
    """Loads LoRA files into a shared UNet and text encoder(s) and activates them per variant.

    ``text_encoders`` maps diffusers' key prefixes to the encoders: ``text_encoder`` (SD 1.x /
    2.x), plus ``text_encoder_2`` for SDXL, whose files (kohya ``lora_te1_…``/``lora_te2_…``
    or diffusers) are read with the SDXL pipeline's converter.
    """

    def __init__(self, unet: nn.Module, text_encoders: dict[str, nn.Module]) -> None:
        self.unet = unet
        self.text_encoders = text_encoders
        self.pipeline = StableDiffusionXLPipeline if "text_encoder_2" in text_encoders else StableDiffusionPipeline
        self.adapters: dict[str, str] = {}  # resolved path -> adapter name
        self._given: dict[str, str] = {}  # path as written -> adapter name (no filesystem call per batch)
        self.in_unet: set[str] = set()
        self.in_text: dict[str, set[str]] = {prefix: set() for prefix in text_encoders}
        self.fingerprints: dict[str, str] = {}  # adapter name -> fingerprint of its file(s)

    @property
    def in_text_encoder(self) -> set[str]:
        """Adapters that reach any text encoder (they change their variant's prompt embedding)."""
        return set().union(*self.in_text.values())

    def load(self, path: str) -> str:
        """Load a LoRA once; returns its adapter name."""
        if path in self._given:
            return self._given[path]
        resolved = str(Path(path).expanduser().resolve())
        if resolved in self.adapters:
            self._given[path] = self.adapters[resolved]
            return self.adapters[resolved]
        file = Path(resolved)
        if not file.exists():
            raise LoRAError(f"LoRA file not found: {path}. Check the path in the variant's `loras` list.")
        if file.is_file() and file.suffix not in LORA_SUFFIXES:
            raise LoRAError(f"{path} is not a LoRA file (expected one of {', '.join(LORA_SUFFIXES)} or a folder)")
        name = f"lora_{hashlib.sha1(resolved.encode()).hexdigest()[:10]}"
        weights = [file] if file.is_file() else component_weight_files(file)
        if len(weights) != 1:  # a folder: its one weight file (diffusers would guess, or ask when offline)
            found = ", ".join(p.name for p in weights) or "none"
            raise LoRAError(f"LoRA folder {path} must hold exactly one weight file (*.safetensors or *.bin); found {found}")
        try:
            state_dict, alphas, metadata = self.pipeline.lora_state_dict(
                str(weights[0].parent), weight_name=weights[0].name, unet_config=self.unet.config,
                return_lora_metadata=True, local_files_only=True,
                use_safetensors=None if weights[0].suffix != ".safetensors" else True,
            )
        except Exception as err:
            raise LoRAError(f"cannot read LoRA {path}: {err}") from None
        given_alphas = alphas
        state_dict, alphas = _fold_alphas(state_dict, alphas)
        state_dict = _text_encoder_keys_to_new_format(state_dict, tuple(self.text_encoders))
        try:
            self.pipeline.load_lora_into_unet(state_dict, alphas, self.unet, adapter_name=name, metadata=metadata)
            for prefix, encoder in self.text_encoders.items():
                if any(k.startswith(f"{prefix}.") for k in state_dict):
                    self.pipeline.load_lora_into_text_encoder(
                        state_dict, alphas, encoder, prefix=prefix, adapter_name=name, metadata=metadata
                    )
        except Exception as err:
            if "not found in the base model" in str(err):  # peft: no key names a module of this model
                raise LoRAError(f"LoRA {path} adapts zero modules of this backbone ({err}): is it a LoRA for another model family?") from None
            raise LoRAError(f"LoRA {path} does not fit this backbone: {err}") from None
        if given_alphas and alphas is None:
            _unit_scaling(name, self.unet, *self.text_encoders.values())
        n_unet = _adapted_modules(self.unet, name)
        n_text = {prefix: _adapted_modules(encoder, name) for prefix, encoder in self.text_encoders.items()}
        if n_unet + sum(n_text.values()) == 0:
            raise LoRAError(
                f"LoRA {path} adapts zero modules of this backbone (its keys match no UNet or text-encoder layer): "
                f"is it a LoRA for another model family?"
            )
        if n_unet:
            self.in_unet.add(name)
        for prefix, n in n_text.items():
            if n:
                self.in_text[prefix].add(name)
        self.adapters[resolved] = name
        self._given[path] = name
        self.fingerprints[name] = _lora_fingerprint(file)
        self._freeze()
        return name

    def fingerprint(self, path: str) -> str:
        """Fingerprint of the LoRA file(s) loaded for ``path`` (the same file anywhere, the same id)."""
        return self.fingerprints[self.load(path)]

    def _freeze(self) -> None:
        for model in (self.unet, *self.text_encoders.values()):
            model.requires_grad_(False)

    def unet_key(self, loras: list[LoRA]) -> tuple[tuple[str, float], ...]:
        """The UNet adapters (name, scale) these LoRAs switch on: equal keys, equal UNet weights."""
        return tuple((name, lora.scale) for lora in loras if (name := self.load(lora.path)) in self.in_unet)

    def activate(self, loras: list[LoRA]) -> tuple[tuple[str, float], ...]:
        """Switch to exactly these LoRAs; returns the text-encoder adapter key (for prompt caching)."""
        names = [(self.load(l.path), l.scale) for l in loras]
        unet_sel = [(n, s) for n, s in names if n in self.in_unet]
        if self.in_unet:
            if unet_sel:
                self.unet.enable_adapters()
                self.unet.set_adapters([n for n, _ in unet_sel], weights=[s for _, s in unet_sel])
            else:
                self.unet.disable_adapters()
        for prefix, encoder in self.text_encoders.items():
            if not self.in_text[prefix]:
                continue
            sel = [(n, s) for n, s in names if n in self.in_text[prefix]]
            if sel:
                enable_lora_for_text_encoder(encoder)
                set_adapters_for_text_encoder([n for n, _ in sel], encoder, [s for _, s in sel])
            else:
                disable_lora_for_text_encoder(encoder)
        if self.in_unet or self.in_text_encoder:
            self._freeze()  # peft's set_adapter turned requires_grad back on for the active adapters
        return tuple((n, s) for n, s in names if n in self.in_text_encoder)
