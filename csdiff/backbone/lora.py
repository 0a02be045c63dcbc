"""LoRA adapters shared by all variants: each file is loaded once as a named adapter.

Files may be diffusers LoRA folders/files, kohya files (``lora_unet_…``/``lora_te_…``), or
A1111/LDM-named files (``lora_unet_input_blocks_…``), LoRA or LoCon (LoRA on convolutions, 3×3
included: down (r, in, k, k), up (out, r, 1, 1)). Loading goes through diffusers' converters and
peft; switching a variant's adapters is a cheap flag change, not a reload. peft makes the active
adapters trainable whenever it switches them; the registry freezes them again at once, so a
backbone parameter never requires a gradient (nor lands in an optimizer or DDP's reducer).

A file is applied whole or not at all. diffusers drops keys it cannot place with a log line
(a module name that matches nothing, DoRA's ``dora_scale``) and its LDM-name remap mis-places
LoCon modules of SD 1.x (``input_blocks_1`` also matches ``input_blocks_10``/``_11``; an
attention-free up block's upsampler lands in ``attentions``). So csdiff reads each file itself
first: LyCORIS kinds (LoHa, LoKr, …) and unknown suffixes are refused by name; every kohya module
name is looked up in tables built from the models themselves (diffusers and LDM names) and
handed to diffusers under names its converter maps right; after loading, every adapted layer is
compared with the file (kohya) or counted (diffusers formats), and a mismatch unloads the
adapter and raises.

PixArt, SD3, FLUX and DeepFloyd IF (:data:`FAMILY_LORAS`) take diffusers-format files (keys
``transformer.…``, ``unet.…``, ``text_encoder.…`` with ``lora_A``/``lora_B``, alphas from ``.alpha``
keys or the file's peft metadata), peft adapter folders, and for FLUX kohya files through
diffusers' FLUX converter. csdiff reads each file into modules itself, folds the alphas into the
down weights, and hands diffusers' loader (peft itself where diffusers has none) exactly those
modules; every adapted layer is then compared with them, as for kohya files above.
"""

from __future__ import annotations

import hashlib
import inspect
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
from diffusers.utils.state_dict_utils import DIFFUSERS_OLD_TO_DIFFUSERS, convert_state_dict
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors.torch import load_file
from torch import nn

from csdiff.backbone.loading import component_weight_files, fingerprint_files
from csdiff.backbone.lora_families import (
    FAMILY_LORAS,
    PEFT_PREFIX,
    family_modules,
    flux_kohya_state,
    folded_state,
    load_with_peft,
    lora_configs,
    one_line,
    placed,
    switch_adapters,
    unwrap_empty,
)
from csdiff.backbone.lora_files import (
    KOHYA_PREFIXES,
    KOHYA_SUFFIXES,
    LoRAError,
    LoRAModules,
    adaptable_shapes,
    kohya_name,
    kohya_names,
    ldm_unet_blocks,
    ldm_unet_path,
    other_adapter_kind,
    some,
)

__all__ = ["LoRA", "LoRAError", "LoRARegistry"]

LORA_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".bin")


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


def _lora_fingerprint(file: Path, configs: list[Path] | None = None) -> str:
    """By content: a single file's name does not count (a copy elsewhere is the same LoRA); a peft
    folder's adapter_config.json (its alphas) counts too."""
    weights = fingerprint_files([file] if file.is_file() else component_weight_files(file), file)
    if not configs:
        return weights
    return hashlib.sha256(f"{weights}:{fingerprint_files(configs, configs[0].parent)}".encode()).hexdigest()[:16]


def _adapted_modules(model: nn.Module, adapter: str) -> int:
    return sum(1 for m in model.modules() if isinstance(m, BaseTunerLayer) and adapter in getattr(m, "lora_A", {}))


# --- reading a file as written, before diffusers renames or drops anything ---

# kohya files: every key starts with one of these (diffusers' own test for the format).
_KOHYA_FILE_PREFIXES = ("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")
# diffusers / peft formats: suffixes of the tensors diffusers applies, and those that open a module.
# (No ``.alpha``: diffusers ignores alpha tensors outside kohya files; peft metadata holds the alphas.)
_DIFFUSERS_SUFFIXES = (
    ".lora_A.weight",
    ".lora_B.weight",
    ".lora.down.weight",
    ".lora.up.weight",
    ".lora_linear_layer.down.weight",
    ".lora_linear_layer.up.weight",
    "_lora.down.weight",
    "_lora.up.weight",
)
_DIFFUSERS_DOWN = (".lora_A.weight", ".lora.down.weight", ".lora_linear_layer.down.weight", "_lora.down.weight")


def _read_lora_file(file: Path, given: str) -> dict[str, torch.Tensor]:
    """The tensors of a LoRA file under their stored names (pickles refused: weights only)."""
    try:
        tensors = (
            load_file(str(file))
            if file.suffix == ".safetensors"
            else torch.load(file, map_location="cpu", weights_only=True)
        )
    except Exception as err:
        raise LoRAError(f"cannot read LoRA {given}: {type(err).__name__}: {err}") from None
    if not isinstance(tensors, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in tensors.items()
    ):
        raise LoRAError(f"cannot read LoRA {given}: it is not a flat mapping of names to tensors")
    return tensors


def _refuse_other_adapters(raw: dict[str, torch.Tensor], given: str) -> None:
    """LoHa, LoKr, DoRA, …: their update is not up∘down; diffusers fails on some, drops parts of others."""
    kinds: dict[str, list[str]] = {}
    for key in raw:
        if (kind := other_adapter_kind(key)) is not None:
            kinds.setdefault(kind, []).append(key)
    if kinds:
        raise LoRAError(
            f"LoRA {given} is a {' and '.join(sorted(kinds))} file ({some([k for ks in kinds.values() for k in ks])}); "
            f"csdiff applies LoRA/LoCon weights only (kohya lora_down/lora_up/alpha, diffusers lora_A/lora_B), never "
            f"part of a file: merge it into the model with the tool that made it, then use that checkpoint as the model "
            f"or factor it into a LoRA with checkpoints_scripts/lora_from_merged.py"
        )


def _is_kohya(raw: dict[str, torch.Tensor]) -> bool:
    return bool(raw) and all(k.startswith(_KOHYA_FILE_PREFIXES) for k in raw)


def _diffusers_modules_named(raw: dict[str, torch.Tensor], given: str, components: tuple[str, ...]) -> dict[str, int]:
    """How many modules a diffusers-format file names per component; keys diffusers would not apply are refused."""
    unknown = [k for k in raw if not k.endswith(_DIFFUSERS_SUFFIXES) or k.split(".", 1)[0] not in components]
    if unknown:
        raise LoRAError(
            f"LoRA {given} has keys csdiff does not apply ({some(unknown)}): a diffusers LoRA key starts with "
            f"{' / '.join(c + '.' for c in components)} and ends with a LoRA weight (lora_A/lora_B, lora.down/lora.up)"
        )
    return {c: sum(1 for k in raw if k.startswith(f"{c}.") and k.endswith(_DIFFUSERS_DOWN)) for c in components}


def _kohya_modules(raw: dict[str, torch.Tensor], given: str, models: dict[str, nn.Module]) -> LoRAModules:
    """A kohya file's modules by component and path; a key that names no layer, an unknown suffix,
    a missing half or a shape that does not fit is refused (all of them named, first few shown)."""
    shapes = {component: adaptable_shapes(model) for component, model in models.items()}
    table = kohya_names({c: list(s) for c, s in shapes.items()}, models["unet"])
    groups: dict[str, dict[str, torch.Tensor]] = {}
    odd = []
    for key, value in raw.items():
        name, _, suffix = key.partition(".")
        if suffix in KOHYA_SUFFIXES:
            groups.setdefault(name, {})[suffix] = value
        else:
            odd.append(key)
    if odd:
        raise LoRAError(
            f"LoRA {given} has keys csdiff does not apply ({some(odd)}): a kohya LoRA/LoCon module has only "
            f"{', '.join('.' + s for s in KOHYA_SUFFIXES)}"
        )
    unknown = [k for k in raw if k.partition(".")[0] not in table]
    if unknown:
        what = (
            "adapts zero modules of this backbone"
            if len(unknown) == len(raw)
            else "names modules this backbone does not have"
        )
        raise LoRAError(
            f"LoRA {given} {what} (keys matching no UNet or text-encoder layer: {some(unknown)}): "
            f"is it a LoRA for another model family?"
        )
    out: LoRAModules = {}
    problems = []
    for name, parts in groups.items():
        component, path = table[name]
        if "lora_down.weight" not in parts or "lora_up.weight" not in parts:
            problems.append(f"{name} has no {'lora_up' if 'lora_down.weight' in parts else 'lora_down'}.weight")
            continue
        down, up, shape = parts["lora_down.weight"], parts["lora_up.weight"], tuple(shapes[component][path])
        r = down.shape[0]
        if tuple(down.shape[1:]) != shape[1:] or tuple(up.shape) not in (
            (shape[0], r),
            (shape[0], r, *(1,) * (len(shape) - 2)),
        ):
            problems.append(f"{name}: down {tuple(down.shape)} and up {tuple(up.shape)} do not fit its weight {shape}")
        elif path in out.get(component, {}):
            problems.append(f"{name}: {component} module {path} is named twice")
        else:
            alpha = float(parts["alpha"]) if "alpha" in parts else float(r)  # kohya's default: alpha = rank
            out.setdefault(component, {})[path] = (down, up, alpha)
    if problems:
        more = f" … ({len(problems)} modules)" if len(problems) > 3 else ""
        raise LoRAError(f"LoRA {given} does not fit this backbone: {'; '.join(problems[:3])}{more}")
    return out


def _diffusers_readable(modules: LoRAModules, unet: nn.Module, sdxl: bool) -> dict[str, torch.Tensor]:
    """The modules as a kohya state dict under the names diffusers' converter maps right: kohya's own
    naming per family (SD 1.x/2.x: diffusers paths, which dodge its LDM remap; SDXL UNet: LDM paths,
    as its string rules mis-read some diffusers ones, e.g. ``add_embedding``)."""
    blocks = ldm_unet_blocks(unet) if sdxl else {}
    out: dict[str, torch.Tensor] = {}
    for component, pairs in modules.items():
        for path, (down, up, alpha) in pairs.items():
            ldm = ldm_unet_path(path, blocks) if component == "unet" and sdxl else None
            name = f"{KOHYA_PREFIXES['unet']}_{ldm.replace('.', '_')}" if ldm else kohya_name(component, path, sdxl)
            out[f"{name}.lora_down.weight"] = down
            out[f"{name}.lora_up.weight"] = up[:, :, None, None] if down.ndim == 4 and up.ndim == 2 else up
            out[f"{name}.alpha"] = torch.tensor(alpha)
    return out


def _adapted_layers(model: nn.Module, adapter: str, prefix: str = "") -> dict[str, BaseTunerLayer]:
    """The layers ``adapter`` adapts, by the path of the layer it wraps."""
    out: dict[str, BaseTunerLayer] = {}
    for name, child in model.named_children():
        path = f"{prefix}{name}"
        if isinstance(child, BaseTunerLayer):
            if adapter in getattr(child, "lora_A", {}):
                out[path] = child
        else:
            out.update(_adapted_layers(child, adapter, f"{path}."))
    return out


def _close(got: torch.Tensor, want: torch.Tensor, *dtypes: torch.dtype) -> bool:
    """Equal up to a few roundings in the coarsest of ``dtypes`` (relative to the tensor's largest entry)."""
    eps = max(torch.finfo(d).eps for d in dtypes)
    return got.shape == want.shape and bool((got - want).abs().max() <= 4 * eps * want.abs().max() + 1e-30)


def _misloaded(adapter: str, modules: LoRAModules, models: dict[str, nn.Module]) -> list[str]:
    """Layers whose adapter is not the file's (alpha/r)·up∘down, or adapted but not in the file: the
    check that nothing was dropped, misplaced or half-loaded between the file and peft."""
    problems = []
    for component, model in models.items():
        pairs, adapted = modules.get(component, {}), _adapted_layers(model, adapter)
        problems += [f"{component}.{p} not adapted" for p in sorted(set(pairs) - set(adapted))]
        problems += [f"{component}.{p} adapted but not in the file" for p in sorted(set(adapted) - set(pairs))]
        for path in sorted(set(pairs) & set(adapted)):
            down, up, alpha = pairs[path]
            layer = adapted[path]
            a, b = layer.lora_A[adapter].weight.detach(), layer.lora_B[adapter].weight.detach()
            got_a = a.double() * layer.scaling[adapter]
            want_a = down.double() * (alpha / down.shape[0])
            want_b = up.double().reshape(b.shape) if up.numel() == b.numel() else up.double()
            if not (_close(got_a, want_a, a.dtype, down.dtype) and _close(b.double(), want_b, b.dtype, up.dtype)):
                problems.append(f"{component}.{path} holds other weights than the file's")
    return problems


class LoRARegistry:
    """Loads LoRA files into a shared denoiser and text encoder(s) and activates them per variant.

    ``unet`` is the family's denoiser, a UNet or a transformer. ``text_encoders`` maps diffusers'
    key prefixes to the encoders: ``text_encoder`` (SD 1.x/2.x), plus ``text_encoder_2`` for
    SDXL, whose files (kohya ``lora_te1_…``/``lora_te2_…`` or diffusers) are read with the SDXL
    pipeline's converter. For the families of :data:`FAMILY_LORAS` (``family``), only the text
    encoders its loader adapts are kept (SD3: both CLIPs; FLUX: CLIP-L; IF: T5; PixArt: none).
    """

    def __init__(self, unet: nn.Module, text_encoders: dict[str, nn.Module], family: str | None = None) -> None:
        if family not in (None, "sd", "sdxl", *FAMILY_LORAS):
            raise ValueError(f"csdiff has no LoRA loader for {family} models")
        self.unet = unet
        self.family = family
        self.spec = FAMILY_LORAS.get(family)  # None: SD 1.x/2.x/SDXL, through the kohya tables
        if self.spec is not None:
            text_encoders = {k: v for k, v in text_encoders.items() if k in self.spec.text_encoders}
        self.text_encoders = text_encoders
        self.pipeline = StableDiffusionXLPipeline if "text_encoder_2" in text_encoders else StableDiffusionPipeline
        self.adapters: dict[str, str] = {}  # resolved path -> adapter name
        self._given: dict[str, str] = {}  # path as written -> adapter name (no filesystem call per batch)
        self.in_unet: set[str] = set()  # adapters that reach the denoiser (UNet or transformer)
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
            raise LoRAError(
                f"LoRA folder {path} must hold exactly one weight file (*.safetensors or *.bin); found {found}"
            )
        raw = _read_lora_file(weights[0], path)
        _refuse_other_adapters(raw, path)
        read: list[Path] = []
        if self.spec is None:
            self._load_sd(name, path, weights[0], raw)
        else:
            read = self._load_family(name, path, weights[0], raw)
        n_unet = _adapted_modules(self.unet, name)
        if n_unet:
            self.in_unet.add(name)
        for prefix, encoder in self.text_encoders.items():
            if _adapted_modules(encoder, name):
                self.in_text[prefix].add(name)
        self.adapters[resolved] = name
        self._given[path] = name
        self.fingerprints[name] = _lora_fingerprint(file, read)
        self._freeze()
        return name

    def _load_sd(self, name: str, path: str, weight_file: Path, raw: dict[str, torch.Tensor]) -> None:
        """SD 1.x/2.x/SDXL: kohya files through csdiff's tables, others as diffusers reads them."""
        models = {"unet": self.unet, **self.text_encoders}
        kohya = _kohya_modules(raw, path, models) if _is_kohya(raw) else None
        named = None if kohya is not None else _diffusers_modules_named(raw, path, tuple(models))
        # kohya: the checked modules under names diffusers maps right; other formats: the file itself
        # (diffusers reads their adapter metadata from it). diffusers ignores weight_name for a dict;
        # it is passed all the same, so that each call names its file.
        source = (
            str(weight_file.parent)
            if kohya is None
            else _diffusers_readable(kohya, self.unet, len(self.text_encoders) > 1)
        )
        try:
            state_dict, alphas, metadata = self.pipeline.lora_state_dict(
                source,
                weight_name=weight_file.name,
                unet_config=self.unet.config,
                return_lora_metadata=True,
                local_files_only=True,
                use_safetensors=None if weight_file.suffix != ".safetensors" else True,
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
            self._remove(name)
            if "not found in the base model" in str(err):  # peft: no key names a module of this model
                raise LoRAError(
                    f"LoRA {path} adapts zero modules of this backbone ({err}): is it a LoRA for another model family?"
                ) from None
            raise LoRAError(f"LoRA {path} does not fit this backbone: {err}") from None
        if given_alphas and alphas is None:
            _unit_scaling(name, self.unet, *self.text_encoders.values())
        n_unet = _adapted_modules(self.unet, name)
        n_text = {prefix: _adapted_modules(encoder, name) for prefix, encoder in self.text_encoders.items()}
        if n_unet + sum(n_text.values()) == 0:
            self._remove(name)
            raise LoRAError(
                f"LoRA {path} adapts zero modules of this backbone (its keys match no UNet or text-encoder layer): "
                f"is it a LoRA for another model family?"
            )
        n_adapted = {"unet": n_unet, **n_text}
        problems = (
            _misloaded(name, kohya, models)
            if kohya is not None
            else [f"{c}: {n} modules named, {n_adapted[c]} adapted" for c, n in named.items() if n != n_adapted[c]]
        )
        if problems:
            self._remove(name)
            raise LoRAError(
                f"LoRA {path} did not load as written, so none of it is applied: {some(problems, 3, 'module')}"
            )

    @property
    def _models(self) -> dict[str, nn.Module]:
        """Every model a file may adapt, by its key prefix (the denoiser's: ``unet`` or ``transformer``)."""
        return {"unet" if self.spec is None else self.spec.denoiser: self.unet, **self.text_encoders}

    def _load_family(self, name: str, path: str, weight_file: Path, raw: dict[str, torch.Tensor]) -> list[Path]:
        """PixArt, SD3, FLUX, IF: the file read into modules by csdiff, loaded by the family's
        diffusers loader (peft where it has none), then checked layer by layer; returns the
        files besides the weights that fixed it (a peft folder's adapter_config.json)."""
        spec, family, models = self.spec, self.family, self._models
        expected, read = None, []
        if _is_kohya(raw):
            if not spec.kohya:
                raise LoRAError(
                    f"LoRA {path} is a kohya file ({some(raw)}); csdiff reads kohya files for SD 1.x/2.x/XL and "
                    f"FLUX only: for {family} use a diffusers-format LoRA (keys "
                    f"{' / '.join(c + '.' for c in models)}…), or is it a LoRA for another model family?"
                )
            state, expected = flux_kohya_state(raw, path)
            modules = family_modules(state, path, family, spec, {})
        else:
            peft_keys = bool(raw) and all(k.startswith(PEFT_PREFIX) for k in raw)
            try:
                configs, read = lora_configs(weight_file, peft_keys, tuple(models))
            except LoRAError:
                raise
            except (OSError, ValueError) as err:
                raise LoRAError(f"cannot read the LoRA configuration of {path}: {one_line(err)}") from None
            modules = family_modules(raw, path, family, spec, configs)
        modules = placed(modules, path, family, models)
        if not modules:
            raise LoRAError(f"LoRA {path} adapts zero modules of this {family} backbone: it holds no LoRA weights")
        try:
            self._load_modules(name, modules)
        except Exception as err:
            self._remove(name)
            raise LoRAError(f"LoRA {path} does not fit this backbone: {type(err).__name__}: {one_line(err)}") from None
        _unit_scaling(name, *models.values())  # alphas are folded into the down weights
        problems = _misloaded(name, modules, models)
        n = sum(len(pairs) for pairs in modules.values())
        if expected is not None and n != expected:
            problems.append(f"diffusers' FLUX converter gave {n} modules where the file's make {expected}")
        if problems:
            self._remove(name)
            raise LoRAError(
                f"LoRA {path} did not load as written, so none of it is applied: {some(problems, 3, 'module')}"
            )
        return read

    def _load_modules(self, name: str, modules: LoRAModules) -> None:
        """Each component's modules through the family's diffusers loader, or peft where it has none."""
        spec, models = self.spec, self._models
        with warnings.catch_warnings():
            # peft compares diffusers' suffix-matched target names with the layers it adapted (FLUX's
            # proj_out also ends each single block's path): csdiff compares every layer afterwards
            warnings.filterwarnings("ignore", "While injecting the PEFT adapters, an inconsistency", RuntimeWarning)
            for component, pairs in modules.items():
                model = models[component]
                if component in spec.peft:
                    load_with_peft(model, pairs, name)
                elif component == spec.denoiser:
                    load = getattr(spec.loader, f"load_lora_into_{component}")
                    alphas = {"network_alphas": None} if "network_alphas" in inspect.signature(load).parameters else {}
                    state = folded_state(pairs, f"{component}.", "lora_A.weight", "lora_B.weight")
                    load(state, **{component: model}, adapter_name=name, **alphas)
                else:  # diffusers' text-encoder loader reads these suffixes for any layer name
                    state = folded_state(
                        pairs, f"{component}.", "lora_linear_layer.down.weight", "lora_linear_layer.up.weight"
                    )
                    spec.loader.load_lora_into_text_encoder(state, None, model, prefix=component, adapter_name=name)

    def fingerprint(self, path: str) -> str:
        """Fingerprint of the LoRA file(s) loaded for ``path`` (the same file anywhere, the same id)."""
        return self.fingerprints[self.load(path)]

    def _freeze(self) -> None:
        for model in (self.unet, *self.text_encoders.values()):
            model.requires_grad_(False)

    def _remove(self, adapter: str) -> None:
        """Unload a half-loaded adapter from every model, so that a refused file leaves no trace:
        peft's wrappers left empty give their layers back, an emptied peft config goes."""
        for model in (self.unet, *self.text_encoders.values()):
            for layer in _adapted_layers(model, adapter).values():
                layer.delete_adapter(adapter)
            unwrap_empty(model)
            config = getattr(model, "peft_config", None)
            if isinstance(config, dict):
                config.pop(adapter, None)
                if not config and "peft_config" in vars(model):
                    del model.peft_config
                    vars(model).pop("_hf_peft_config_loaded", None)  # back to the class's False
        self._freeze()

    def unet_key(self, loras: list[LoRA]) -> tuple[tuple[str, float], ...]:
        """The denoiser adapters (name, scale) these LoRAs switch on: equal keys, equal denoiser weights."""
        return tuple((name, lora.scale) for lora in loras if (name := self.load(lora.path)) in self.in_unet)

    def activate(self, loras: list[LoRA]) -> tuple[tuple[str, float], ...]:
        """Switch to exactly these LoRAs; returns the text-encoder adapter key (for prompt caching)."""
        names = [(self.load(lora.path), lora.scale) for lora in loras]
        unet_sel = [(n, s) for n, s in names if n in self.in_unet]
        if self.in_unet and self.spec is not None:
            switch_adapters(self.unet, unet_sel)
        elif self.in_unet:
            if unet_sel:
                self.unet.enable_adapters()
                self.unet.set_adapters([n for n, _ in unet_sel], weights=[s for _, s in unet_sel])
            else:
                self.unet.disable_adapters()
        for prefix, encoder in self.text_encoders.items():
            if not self.in_text[prefix]:
                continue
            switch_adapters(encoder, [(n, s) for n, s in names if n in self.in_text[prefix]])
        if self.in_unet or self.in_text_encoder:
            self._freeze()  # peft's set_adapter turned requires_grad back on for the active adapters
        return tuple((n, s) for n, s in names if n in self.in_text_encoder)
