"""Load the frozen parts of a Stable Diffusion model from one model string.

A model string is a hub id, a local diffusers folder, a single-file checkpoint
(``.safetensors`` / ``.ckpt``, which needs a base-model folder for its configuration when
offline), ``tiny`` (csdiff's own miniature, shipped as package data) or ``random-sd15``
(SD 1.5's architecture with seeded random weights, built from shipped configurations).
Hub ids, folders and ``tiny`` end up in the same code: a local folder in the diffusers
layout, loaded component by component.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKL, ControlNetModel, PNDMScheduler, SchedulerMixin, UNet2DConditionModel
from torch import nn
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from csdiff.backbone import random_models
from csdiff.backbone.families import Family, family_of, family_of_config
from csdiff.backbone.tiny import TINY_ALIASES

SD_SUBFOLDERS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
# A diffusion transformer's pipeline (PixArt) holds transformer/ where SD holds unet/.
DIT_SUBFOLDERS = ("transformer", "vae", "text_encoder", "tokenizer", "scheduler")
# What is fetched for a pipeline: SDXL-architecture models add a second text encoder.
SNAPSHOT_SUBFOLDERS = (*SD_SUBFOLDERS, "transformer", "text_encoder_2", "tokenizer_2", "text_encoder_3", "tokenizer_3")
WEIGHT_SUBFOLDERS = ("unet", "transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3")
# SD3's T5 prompt length: its pipeline's default ``max_sequence_length``.
SD3_T5_TOKENS = 256
# Diffusion transformers csdiff runs: transformer class → pipeline classes.
TRANSFORMER_PIPELINES = {
    "PixArtTransformer2DModel": ("PixArtAlphaPipeline", "PixArtSigmaPipeline"),
    "SD3Transformer2DModel": ("StableDiffusion3Pipeline",),
    "FluxTransformer2DModel": ("FluxPipeline",),
}
# FLUX's T5 prompt length: its pipeline's default ``max_sequence_length``.
FLUX_T5_TOKENS = 512
# PixArt's prompt length (its pipelines' ``max_sequence_length``), by pipeline class.
T5_PROMPT_TOKENS = {"PixArtAlphaPipeline": 120, "PixArtSigmaPipeline": 300}
# Files that loading never reads when the plain weights are present: precision/EMA variants.
_VARIANT_MARKS = (".fp16.", ".fp16-", "non_ema", ".ema.")  # .fp16-: sharded fp16 files
SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class BackboneNotAvailableError(RuntimeError):
    """Weights that cannot be found locally nor downloaded."""


@dataclass(frozen=True)
class BackboneSpec:
    """What was loaded: recorded in checkpoints so that other weights are recognised later.

    ``weights_id`` is a fingerprint of the weight files that were read (names relative to
    the model folder, sizes and sampled bytes; see :func:`fingerprint_files`): a hub id and
    a downloaded copy of it get the same id, other weights under the same name do not.
    """

    model: str
    weights_id: str
    base_model: str | None = None
    unet: str | None = None
    unet_weights_id: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class SDComponents:
    """The frozen parts; SDXL-architecture models also have a second text encoder and tokenizer, SD3
    a third. ``unet`` is the denoiser: a UNet, or a diffusion transformer (PixArt, SD3)."""

    unet: UNet2DConditionModel
    vae: AutoencoderKL | None  # None: a pixel-space model (DeepFloyd IF)
    text_encoder: CLIPTextModel
    tokenizer: CLIPTokenizer
    scheduler: SchedulerMixin
    spec: BackboneSpec
    text_encoder_2: CLIPTextModelWithProjection | None = None
    tokenizer_2: CLIPTokenizer | None = None
    text_encoder_3: nn.Module | None = None  # SD3's T5
    tokenizer_3: object | None = None

    @property
    def family(self) -> Family:
        return family_of(self.unet)

    @property
    def tokenizers(self) -> tuple:
        """The model's tokenizers, in its text encoders' order."""
        return tuple(t for t in (self.tokenizer, self.tokenizer_2, self.tokenizer_3) if t is not None)


@contextmanager
def quiet_transformers() -> Iterator[None]:
    """transformers 5 draws a "Loading weights" bar for every text encoder it loads: noise in
    a training log. Set only while csdiff loads, so a user's own loads keep their bars."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            hf_logging.enable_progress_bar()


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")


def _how_to_provide(model: str) -> str:
    return (
        f"Download it once on a machine with network access, e.g. "
        f"`python checkpoints_scripts/download_weights.py {model} --out /path/to/folder`, copy the folder here and "
        f"pass the folder instead of the hub id (e.g. `--model.init_args.backbone.model /path/to/folder`). "
        f"The built-in `tiny` model needs no download."
    )


def fingerprint_files(files: list[Path], root: Path) -> str:
    """A cheap, stable fingerprint of weight files: names (relative to ``root``; pass the file
    itself as ``root`` to leave a single file's name out), sizes and 3 sampled 1 MiB chunks.

    Hashing multi-GB files in full at every start would cost seconds to minutes; this still
    tells apart any two real checkpoints.
    """
    h = hashlib.sha256()
    chunk = 1 << 20
    for f in sorted(files):
        size = f.stat().st_size
        h.update(f"{f.relative_to(root).as_posix()}:{size}".encode())
        with open(f, "rb") as fh:
            for offset in sorted({0, max(0, size // 2 - chunk // 2), max(0, size - chunk)}):
                fh.seek(offset)
                h.update(fh.read(chunk))
    return h.hexdigest()[:16]


def component_weight_files(folder: Path) -> list[Path]:
    """The weight files loading reads from one component folder: safetensors when present
    (as diffusers and transformers prefer them), else ``.bin``; fp16/EMA variants excluded."""
    if not folder.is_dir():
        return []
    files = [p for p in folder.iterdir() if p.is_file() and not any(m in p.name for m in _VARIANT_MARKS)]
    for suffix in (".safetensors", ".bin"):
        chosen = sorted(p for p in files if p.suffix == suffix)
        if chosen:
            return chosen
    return []


def folder_kind(folder: Path) -> str:
    """What a local folder holds, by its files: ``pipeline`` (a diffusers Stable Diffusion folder),
    ``controlnet``, ``unet`` (a lone UNet), ``lora`` (a diffusers LoRA folder) or ``unknown``."""
    if (folder / "model_index.json").is_file() or (folder / "unet").is_dir():
        return "pipeline"
    config = folder / "config.json"
    if config.is_file():
        try:
            name = json.loads(config.read_text()).get("_class_name", "")
        except (OSError, ValueError):
            return "unknown"
        kinds = {"UNet2DConditionModel": "unet", **dict.fromkeys(CONTROLNET_CLASSES, "controlnet")}
        return kinds.get(name, "unknown")
    if any(p.name.startswith("pytorch_lora_weights") for p in folder.iterdir()):
        return "lora"
    return "unknown"


_KIND_USE = {
    "pipeline": "a Stable Diffusion pipeline folder: use it as the backbone's `model` (or a variant's `weights`)",
    "controlnet": "a ControlNet folder: use it in a variant's `controlnets`",
    "unet": "a lone UNet folder: use it as the backbone's `unet` override",
    "lora": "a LoRA folder: use it in a variant's `loras`",
}


def weights_fingerprint(folder: Path, subfolders: tuple[str, ...] | None) -> str:
    """Fingerprint of what loading reads from ``folder`` (its ``subfolders``, or the folder itself)."""
    parts = [folder] if subfolders is None else [folder / s for s in subfolders]
    files = [f for part in parts for f in component_weight_files(part)]
    if not files:
        kind = folder_kind(folder)
        wanted = (
            "a model folder with unet/, vae/, text_encoder/" if subfolders is not None else "a single model's folder"
        )
        what = f"it is {_KIND_USE[kind]}" if kind != "unknown" else "it holds no weight files (*.safetensors, *.bin)"
        raise BackboneNotAvailableError(f"{folder} is not {wanted}: {what}")
    return fingerprint_files(files, folder)


def resolve_model_folder(model: str, subfolders: tuple[str, ...] | None = WEIGHT_SUBFOLDERS) -> tuple[Path, str]:
    """Turn a model string into a local folder and the fingerprint of its weights (``subfolders``
    of a pipeline, or the folder itself for a single model such as a ControlNet); hub ids are
    fetched or found in the cache.

    Never retries: offline (``HF_HUB_OFFLINE=1`` or no network), an uncached hub id fails at
    once with one message that says how to provide the weights.
    """
    if model in TINY_ALIASES:
        folder = TINY_ALIASES[model]
        if not folder.is_dir():
            raise BackboneNotAvailableError(
                f"the packaged `{model}` weights are missing at {folder}; reinstall csdiff or run "
                f"`python checkpoints_scripts/train_tiny.py`"
            )
    else:
        path = Path(model).expanduser()
        if path.is_dir():
            folder = path
        elif path.suffix in SINGLE_FILE_SUFFIXES or model.startswith(("/", ".", "~")) or model.count("/") != 1:
            builtin = ", ".join([*TINY_ALIASES, *random_models.RANDOM_MODELS])
            raise BackboneNotAvailableError(
                f"no such file or folder: {path} (a hub id has the form `org/name`; built-in: {builtin})"
            )
        else:
            folder = _snapshot(model, None if subfolders is None else SNAPSHOT_SUBFOLDERS)
    return folder, weights_fingerprint(folder, subfolders)


def _snapshot(repo_id: str, subfolders: tuple[str, ...] | None) -> Path:
    from huggingface_hub import snapshot_download

    patterns = (
        ["*.json", "*.txt", "*.safetensors"]
        if subfolders is None
        else (
            ["model_index.json"]
            + [f"{s}/*.{ext}" for s in subfolders for ext in ("json", "txt", "safetensors", "model")]
        )
    )
    offline = _hub_offline()
    try:
        folder = snapshot_download(
            repo_id,
            allow_patterns=patterns,
            ignore_patterns=["*.fp16.*", "*.fp16-*", "*non_ema*", "*.ema.*"],
            local_files_only=offline,
            etag_timeout=10,
        )
    except Exception as err:  # the hub client raises many types; all mean "not available here"
        why = "HF_HUB_OFFLINE is set" if offline else f"the hub could not be reached ({type(err).__name__})"
        raise BackboneNotAvailableError(
            f"model {repo_id!r} is not a local file or folder, is not in the local Hugging Face cache, and {why}. "
            + _how_to_provide(repo_id)
        ) from None
    return Path(folder)


@quiet_transformers()
def load_sd_components(
    model: str = "tiny",
    base_model: str | None = None,
    dtype: str | torch.dtype = "float32",
    load_vae_decoder: bool = False,
    unet: str | None = None,
) -> SDComponents:
    """Load UNet, VAE (encoder only unless asked), text encoder, tokenizer and scheduler, frozen.

    No safety checker, no feature extractor: only what feature extraction needs. ``unet``
    replaces the model's UNet by a fine-tuned one of the same architecture (a UNet folder, a
    model folder with ``unet/``, or a hub id), e.g. a feature-tuned UNet such as CleanDIFT's.
    """
    torch_dtype = parse_dtype(dtype)
    path = Path(model).expanduser()
    components = None
    if random_models.is_random_model(model):
        components = _build_random(model, torch_dtype, load_vae_decoder)
    elif path.suffix in SINGLE_FILE_SUFFIXES and path.is_file():
        components = _load_single_file(path, base_model, torch_dtype)
    else:
        folder, weights_id = resolve_model_folder(model)
        check_architecture(folder)
    if components is None and _pipeline_class(folder) == "IFPipeline":
        components = _load_pixel_folder(folder, BackboneSpec(model, weights_id, base_model), torch_dtype)
    elif components is None and (folder / "transformer").is_dir():
        components = _load_transformer_folder(folder, BackboneSpec(model, weights_id, base_model), torch_dtype)
    elif components is None:
        missing = [s for s in SD_SUBFOLDERS if not (folder / s).is_dir()]
        if missing:
            hint = (
                " (it is a ControlNet: use it in a variant's `controlnets`)"
                if (folder / "config.json").is_file()
                else ""
            )
            raise BackboneNotAvailableError(
                f"{folder} is not a Stable Diffusion folder in the diffusers layout: missing {', '.join(missing)}/{hint}"
            )
        text_encoder = CLIPTextModel.from_pretrained(folder, subfolder="text_encoder", dtype=torch_dtype)
        # SDXL's VAE overflows in float16 (its config says `force_upcast`): it stays float32, as in
        # diffusers' SDXL pipeline, so features are never NaN. SD 1.x/2.x VAEs run in `dtype`.
        sdxl = family_of_config(UNet2DConditionModel.load_config(folder, subfolder="unet")).time_ids
        upcast = sdxl and AutoencoderKL.load_config(folder, subfolder="vae").get("force_upcast", False)
        vae = AutoencoderKL.from_pretrained(
            folder, subfolder="vae", torch_dtype=torch.float32 if upcast else torch_dtype
        )
        components = SDComponents(
            UNet2DConditionModel.from_pretrained(folder, subfolder="unet", torch_dtype=torch_dtype),
            vae,
            text_encoder,
            load_tokenizer(folder / "tokenizer", text_encoder.config.vocab_size),
            PNDMScheduler.from_pretrained(folder, subfolder="scheduler"),
            BackboneSpec(model, weights_id, base_model),
        )
        if (folder / "text_encoder_2").is_dir():
            components.text_encoder_2 = CLIPTextModelWithProjection.from_pretrained(
                folder, subfolder="text_encoder_2", dtype=torch_dtype
            )
            components.tokenizer_2 = load_tokenizer(folder / "tokenizer_2", components.text_encoder_2.config.vocab_size)
    if unet is not None:
        _override_unet(components, unet, torch_dtype)
    if not load_vae_decoder and components.vae is not None:
        components.vae.decoder = None
        components.vae.post_quant_conv = None
    encoders = (components.text_encoder, components.text_encoder_2, components.text_encoder_3)
    for module in (components.unet, components.vae, *encoders):
        if module is not None:
            module.requires_grad_(False).eval()
    return components


SUPPORTED_FAMILIES = (
    "SD 1.x, SD 2.x and SDXL (UNet2DConditionModel with CLIP text encoders), PixArt-α/Σ "
    "(PixArtTransformer2DModel with T5), SD3 / 3.5 (SD3Transformer2DModel with two CLIPs and T5), FLUX.1 "
    "(FluxTransformer2DModel with CLIP-L and T5) and DeepFloyd IF stage I (a pixel-space UNet2DConditionModel with T5)"
)
# UNet settings that fix the architecture: a UNet override must match the base model in all.
_ARCHITECTURE_KEYS = (
    "in_channels",
    "block_out_channels",
    "down_block_types",
    "up_block_types",
    "layers_per_block",
    "cross_attention_dim",
    "attention_head_dim",
    "use_linear_projection",
    "addition_embed_type",
)


def _transformer_class(config: dict) -> str:
    """A transformer config's class; PixArt's hub folders name the generic Transformer2DModel,
    which diffusers itself maps to PixArtTransformer2DModel by its adaLN-single norm."""
    name = config.get("_class_name", "")
    if name == "Transformer2DModel" and config.get("norm_type") == "ada_norm_single":
        return "PixArtTransformer2DModel"
    return name


def _upcast_vae_dtype(folder: Path, torch_dtype: torch.dtype) -> torch.dtype:
    """float32 for a VAE whose config says it overflows in float16 (``force_upcast``: SDXL's, which
    PixArt-Σ uses, SD3's, FLUX's), as diffusers' pipelines upcast it; else ``torch_dtype``."""
    upcast = AutoencoderKL.load_config(folder, subfolder="vae").get("force_upcast", False)
    return torch.float32 if upcast and torch_dtype == torch.float16 else torch_dtype


def _pipeline_class(folder: Path) -> str:
    index = folder / "model_index.json"
    return json.loads(index.read_text()).get("_class_name", "") if index.is_file() else ""


def check_architecture(folder: Path) -> None:
    """Refuse, by its configuration (never its name), a model of a family csdiff cannot run yet."""
    pipeline = _pipeline_class(folder)
    unet_config = folder / "unet" / "config.json"
    unet = json.loads(unet_config.read_text()) if unet_config.is_file() else {}
    transformer_config = folder / "transformer" / "config.json"
    sdxl = unet.get("addition_embed_type") == "text_time"
    if (folder / "transformer").is_dir() and not unet:
        config = json.loads(transformer_config.read_text()) if transformer_config.is_file() else {}
        denoiser = _transformer_class(config)
        pipelines = TRANSFORMER_PIPELINES.get(denoiser)
        if pipelines and pipeline in pipelines:
            return
        if pipelines:
            why = (
                f"a {denoiser} whose model_index.json names {pipeline or 'no pipeline'}: it must name "
                f"{' or '.join(pipelines)}, which fixes the prompt length"
            )
        else:
            why = f"a diffusion transformer of class {denoiser or 'unknown (no transformer/config.json)'}"
    elif pipeline == "IFPipeline" and unet.get("addition_embed_type") == "text":
        return  # DeepFloyd IF stage I: a pixel-space UNet with T5
    elif sdxl != (folder / "text_encoder_2").is_dir() or unet.get("addition_embed_type") not in (None, "text_time"):
        why = f"a UNet with addition_embed_type {unet.get('addition_embed_type')!r} and {'two text encoders' if (folder / 'text_encoder_2').is_dir() else 'one text encoder'}"
    elif unet and unet.get("_class_name", "UNet2DConditionModel") != "UNet2DConditionModel":
        why = f"a {unet['_class_name']} UNet"
    else:
        return
    name = f" ({pipeline})" if pipeline else ""
    raise BackboneNotAvailableError(f"{folder}{name} is {why}; csdiff supports {SUPPORTED_FAMILIES}")


def _load_transformer_folder(folder: Path, spec: BackboneSpec, torch_dtype: torch.dtype) -> SDComponents:
    """A PixArt-α/Σ or SD3 folder. PixArt: transformer, VAE, T5 and a DDPM scheduler with the
    folder's betas (noise is added as in training; PixArt's sampler does not touch features).
    SD3: transformer, VAE, two CLIPs, T5 and its flow-matching scheduler."""
    from diffusers import (
        DDPMScheduler,
        FlowMatchEulerDiscreteScheduler,
        PixArtTransformer2DModel,
        SD3Transformer2DModel,
    )
    from transformers import T5EncoderModel

    pipeline = json.loads((folder / "model_index.json").read_text())["_class_name"]
    if pipeline == "FluxPipeline":
        return _load_flux_folder(folder, spec, torch_dtype)
    sd3 = pipeline == "StableDiffusion3Pipeline"
    wanted = (
        (*DIT_SUBFOLDERS, "text_encoder_2", "tokenizer_2", "text_encoder_3", "tokenizer_3") if sd3 else DIT_SUBFOLDERS
    )
    missing = [s for s in wanted if not (folder / s).is_dir()]
    if missing:
        what = "an SD3 folder (csdiff needs all three text encoders)" if sd3 else "a PixArt folder"
        raise BackboneNotAvailableError(
            f"{folder} is not {what} in the diffusers layout: missing {', '.join(missing)}/"
        )
    vae = AutoencoderKL.from_pretrained(folder, subfolder="vae", torch_dtype=_upcast_vae_dtype(folder, torch_dtype))
    if sd3:
        clips = [
            CLIPTextModelWithProjection.from_pretrained(folder, subfolder=sub, dtype=torch_dtype)
            for sub in ("text_encoder", "text_encoder_2")
        ]
        t5 = T5EncoderModel.from_pretrained(folder, subfolder="text_encoder_3", dtype=torch_dtype)
        return SDComponents(
            SD3Transformer2DModel.from_pretrained(folder, subfolder="transformer", torch_dtype=torch_dtype),
            vae,
            clips[0],
            load_tokenizer(folder / "tokenizer", clips[0].config.vocab_size),
            FlowMatchEulerDiscreteScheduler.from_pretrained(folder, subfolder="scheduler"),
            spec,
            clips[1],
            load_tokenizer(folder / "tokenizer_2", clips[1].config.vocab_size),
            t5,
            load_t5_tokenizer(folder / "tokenizer_3", t5.config.vocab_size, SD3_T5_TOKENS),
        )
    text_encoder = T5EncoderModel.from_pretrained(folder, subfolder="text_encoder", dtype=torch_dtype)
    return SDComponents(
        PixArtTransformer2DModel.from_pretrained(folder, subfolder="transformer", torch_dtype=torch_dtype),
        vae,
        text_encoder,
        load_t5_tokenizer(folder / "tokenizer", text_encoder.config.vocab_size, T5_PROMPT_TOKENS[pipeline]),
        # DDPM's default clips predicted clean samples to ±1: right for pixels, wrong for latents
        DDPMScheduler.from_pretrained(folder, subfolder="scheduler", clip_sample=False, thresholding=False),
        spec,
    )


# DeepFloyd IF's prompt length: its pipeline's 77 T5 tokens.
IF_T5_TOKENS = 77


def _load_pixel_folder(folder: Path, spec: BackboneSpec, torch_dtype: torch.dtype) -> SDComponents:
    """DeepFloyd IF stage I: a UNet on 64² pixels (no VAE), T5 and a DDPM scheduler with learned
    variance. The safety checker and watermarker of its pipeline are not loaded."""
    from diffusers import DDPMScheduler
    from transformers import T5EncoderModel

    missing = [s for s in ("unet", "text_encoder", "tokenizer", "scheduler") if not (folder / s).is_dir()]
    if missing:
        raise BackboneNotAvailableError(
            f"{folder} is not a DeepFloyd IF folder in the diffusers layout: missing {', '.join(missing)}/"
        )
    t5 = T5EncoderModel.from_pretrained(folder, subfolder="text_encoder", dtype=torch_dtype)
    return SDComponents(
        UNet2DConditionModel.from_pretrained(folder, subfolder="unet", torch_dtype=torch_dtype),
        None,
        t5,
        load_t5_tokenizer(folder / "tokenizer", t5.config.vocab_size, IF_T5_TOKENS),
        DDPMScheduler.from_pretrained(folder, subfolder="scheduler"),
        spec,
    )


def _load_flux_folder(folder: Path, spec: BackboneSpec, torch_dtype: torch.dtype) -> SDComponents:
    """FLUX.1: transformer, 16-channel VAE, CLIP-L (pooled output only), T5, flow-matching scheduler
    with its resolution-dependent shift."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
    from transformers import T5EncoderModel

    wanted = (*DIT_SUBFOLDERS, "text_encoder_2", "tokenizer_2")
    missing = [s for s in wanted if not (folder / s).is_dir()]
    if missing:
        raise BackboneNotAvailableError(
            f"{folder} is not a FLUX folder in the diffusers layout: missing {', '.join(missing)}/"
        )
    clip = CLIPTextModel.from_pretrained(folder, subfolder="text_encoder", dtype=torch_dtype)
    t5 = T5EncoderModel.from_pretrained(folder, subfolder="text_encoder_2", dtype=torch_dtype)
    return SDComponents(
        FluxTransformer2DModel.from_pretrained(folder, subfolder="transformer", torch_dtype=torch_dtype),
        AutoencoderKL.from_pretrained(folder, subfolder="vae", torch_dtype=_upcast_vae_dtype(folder, torch_dtype)),
        clip,
        load_tokenizer(folder / "tokenizer", clip.config.vocab_size),
        FlowMatchEulerDiscreteScheduler.from_pretrained(folder, subfolder="scheduler"),
        spec,
        t5,
        load_t5_tokenizer(folder / "tokenizer_2", t5.config.vocab_size, FLUX_T5_TOKENS),
    )


def load_t5_tokenizer(folder: Path, vocab_size: int, length: int):
    """A T5 tokenizer that reads ``length`` tokens per prompt, checked against its encoder."""
    from transformers import T5Tokenizer

    try:
        tokenizer = T5Tokenizer.from_pretrained(folder)
    except Exception as err:
        raise BackboneNotAvailableError(
            f"tokenizer at {folder} could not be loaded ({type(err).__name__}: {err}): its spiece.model / "
            f"tokenizer.json are missing or unreadable"
        ) from err
    if len(tokenizer) > vocab_size:
        raise BackboneNotAvailableError(
            f"tokenizer at {folder} has {len(tokenizer)} tokens but the text encoder knows {vocab_size}: they "
            f"belong to different models"
        )
    tokenizer.model_max_length = length
    return tokenizer


def _override_unet(components: SDComponents, unet: str, torch_dtype: torch.dtype) -> None:
    """Swap in a fine-tuned UNet of the same architecture; the spec records it by fingerprint."""
    if components.family.grammar != "unet":
        raise BackboneNotAvailableError(
            f"a `unet` override replaces a UNet, and {components.spec.model} is a {components.family.name} "
            f"diffusion transformer: csdiff takes no transformer override yet"
        )
    path = Path(unet).expanduser()
    if path.is_dir():
        folder = path
    elif unet.count("/") == 1 and not unet.startswith(("/", ".", "~")):
        folder = _snapshot(unet, None)  # a hub id: the whole repository, then its unet/ if it has one
    else:
        raise BackboneNotAvailableError(
            f"no such UNet folder: {path} (a UNet folder, a model folder with unet/, or a hub id)"
        )
    if (folder / "unet" / "config.json").is_file():
        folder = folder / "unet"
    if not (folder / "config.json").is_file():
        raise BackboneNotAvailableError(f"{folder} holds no UNet (no config.json, nor unet/config.json)")
    new = UNet2DConditionModel.from_pretrained(folder, torch_dtype=torch_dtype)
    base = components.unet.config
    differ = [k for k in _ARCHITECTURE_KEYS if _plain(new.config.get(k)) != _plain(base.get(k))]
    if differ:
        details = "; ".join(f"{k}: {new.config.get(k)} vs {base.get(k)}" for k in differ)
        raise BackboneNotAvailableError(
            f"UNet {unet} does not fit {components.spec.model}: {details} (override vs base); a UNet override must "
            f"be a fine-tuned copy of the base model's UNet"
        )
    components.unet = new
    spec = components.spec
    components.spec = BackboneSpec(
        spec.model, spec.weights_id, spec.base_model, unet, weights_fingerprint(folder, None)
    )


def _plain(value):
    return list(value) if isinstance(value, (list, tuple)) else value


def _build_random(model: str, torch_dtype: torch.dtype, load_vae_decoder: bool) -> SDComponents:
    """A real-size pipeline with seeded random weights (see :mod:`csdiff.backbone.random_models`)."""
    if model not in ("random-sd15", "random-pixart-alpha", "random-sd3-medium", "random-flux1-dev"):
        raise BackboneNotAvailableError(
            f"{model} is a ControlNet, not a Stable Diffusion model: use it in a variant's `controlnets`"
        )
    spec = BackboneSpec(model, random_models.random_weights_id(model))
    if model == "random-flux1-dev":  # shape-only: every part on the meta device
        from diffusers import FlowMatchEulerDiscreteScheduler

        meta = random_models.meta_flux_parts(torch_dtype)
        t5_tokenizer = random_models.random_t5_tokenizer()
        t5_tokenizer.model_max_length = FLUX_T5_TOKENS
        return SDComponents(
            meta["transformer"],
            meta["vae"],
            meta["text_encoder"],
            random_models.random_tokenizer(meta["text_encoder"].config.vocab_size),
            FlowMatchEulerDiscreteScheduler.from_pretrained(random_models.RANDOM_MODELS[model], subfolder="scheduler"),
            spec,
            meta["text_encoder_2"],
            t5_tokenizer,
        )
    vae = random_models.random_vae(torch_dtype, with_decoder=load_vae_decoder, model=model)
    if model == "random-pixart-alpha":
        from diffusers import DDPMScheduler

        tokenizer = random_models.random_t5_tokenizer()
        tokenizer.model_max_length = T5_PROMPT_TOKENS["PixArtAlphaPipeline"]
        transformer = random_models.random_transformer(model, torch_dtype)
        scheduler = DDPMScheduler.from_pretrained(
            random_models.RANDOM_MODELS[model], subfolder="scheduler", clip_sample=False, thresholding=False
        )
        t5 = random_models.random_t5_encoder(model, torch_dtype)
        return SDComponents(transformer, vae, t5, tokenizer, scheduler, spec)
    if model == "random-sd3-medium":
        from diffusers import FlowMatchEulerDiscreteScheduler

        clips = [
            random_models.random_clip_with_projection(model, sub, torch_dtype)
            for sub in ("text_encoder", "text_encoder_2")
        ]
        t5_tokenizer = random_models.random_t5_tokenizer()
        t5_tokenizer.model_max_length = SD3_T5_TOKENS
        return SDComponents(
            random_models.random_transformer(model, torch_dtype),
            vae,
            clips[0],
            random_models.random_tokenizer(clips[0].config.vocab_size),
            FlowMatchEulerDiscreteScheduler.from_pretrained(random_models.RANDOM_MODELS[model], subfolder="scheduler"),
            spec,
            clips[1],
            random_models.random_tokenizer(clips[1].config.vocab_size),
            random_models.random_t5_encoder(model, torch_dtype),
            t5_tokenizer,
        )
    text_encoder = random_models.random_text_encoder(torch_dtype)
    return SDComponents(
        random_models.random_unet(torch_dtype),
        vae,
        text_encoder,
        random_models.random_tokenizer(text_encoder.config.vocab_size),
        random_models.random_scheduler(),
        spec,
    )


def load_tokenizer(folder: Path, vocab_size: int) -> CLIPTokenizer:
    """Load a CLIP tokenizer and check it really read its files.

    Some transformers versions return a near-empty tokenizer for missing or unreadable
    vocabulary files instead of failing.
    """
    try:
        tokenizer = CLIPTokenizer.from_pretrained(folder)
    except Exception as err:  # missing files give e.g. "`vocab` and `merges` must be both ..."
        raise BackboneNotAvailableError(
            f"tokenizer at {folder} could not be loaded ({type(err).__name__}: {err}): "
            f"its vocab.json / merges.txt are missing or unreadable"
        ) from err
    if len(tokenizer) != vocab_size:
        raise BackboneNotAvailableError(
            f"tokenizer at {folder} has {len(tokenizer)} tokens but the text encoder expects {vocab_size}: "
            f"its vocab.json / merges.txt are missing or unreadable"
        )
    return tokenizer


def _load_single_file(path: Path, base_model: str | None, torch_dtype: torch.dtype) -> SDComponents:
    """A whole SD 1.x / 2.x / SDXL checkpoint in one file (original LDM / SGM key names),
    configured by a base folder of the same family: the family comes from that folder's
    configuration, never from the file's name."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    if base_model is None:
        raise BackboneNotAvailableError(
            f"{path} is a single-file checkpoint: it needs a base-model folder in the diffusers layout for its "
            f"configuration (offline). Pass `base_model` (e.g. `--model.init_args.backbone.base_model "
            f"/path/to/stable-diffusion-v1-5`, a SD 2.x or SDXL folder for their checkpoints, or `tiny` for "
            f"checkpoints of the tiny model)."
        )
    base_folder, _ = resolve_model_folder(base_model)
    check_architecture(base_folder)
    if (base_folder / "transformer").is_dir() or _pipeline_class(base_folder) == "IFPipeline":
        raise BackboneNotAvailableError(
            f"{path}: single-file checkpoints are read for SD 1.x, 2.x and SDXL only, and {base_model} is a "
            f"{_pipeline_class(base_folder) or 'diffusion-transformer'} folder; use the model's diffusers folder"
        )
    sdxl = (base_folder / "text_encoder_2").is_dir()
    pipeline = StableDiffusionXLPipeline if sdxl else StableDiffusionPipeline
    extra = {"add_watermarker": False} if sdxl else {"safety_checker": None, "requires_safety_checker": False}
    try:
        # diffusers reads `.ckpt` files with torch.load(weights_only=True): pickled code is refused.
        pipe = pipeline.from_single_file(
            str(path), config=str(base_folder), local_files_only=True, torch_dtype=torch_dtype, **extra
        )
    except Exception as err:  # shape mismatches, missing keys, unreadable files: all mean "not this base"
        raise BackboneNotAvailableError(
            f"{path} could not be loaded as a checkpoint of the {'SDXL' if sdxl else 'SD 1.x/2.x'} base model {base_model!r} "
            f"({type(err).__name__}: {str(err)[:300]}); `base_model` must be the diffusers folder of the checkpoint's "
            f"own family and architecture ({SUPPORTED_FAMILIES})"
        ) from err
    spec = BackboneSpec(str(path), fingerprint_files([path], path), base_model)
    components = SDComponents(
        pipe.unet,
        pipe.vae,
        pipe.text_encoder,
        load_tokenizer(base_folder / "tokenizer", pipe.text_encoder.config.vocab_size),
        PNDMScheduler.from_pretrained(base_folder, subfolder="scheduler"),
        spec,
    )
    if sdxl:
        components.text_encoder_2 = pipe.text_encoder_2
        components.tokenizer_2 = load_tokenizer(base_folder / "tokenizer_2", pipe.text_encoder_2.config.vocab_size)
        if pipe.vae.config.get("force_upcast", False) and pipe.vae.dtype != torch.float32:
            components.vae = pipe.vae.to(torch.float32)  # as for folders: SDXL's VAE overflows in float16
    return components


def load_controlnet(model: str, dtype: str | torch.dtype = "float32") -> tuple[ControlNetModel, str]:
    """Load a ControlNet (hub id, local folder, ``tiny-controlnet-canny`` or
    ``random-sd15-controlnet-canny``), frozen; returns it and its weights id."""
    if random_models.is_random_model(model):
        if model == "random-sd15":
            raise BackboneNotAvailableError(
                "random-sd15 is a Stable Diffusion model, not a ControlNet: use random-sd15-controlnet-canny"
            )
        controlnet, weights_id = (
            random_models.random_controlnet(model, parse_dtype(dtype)),
            random_models.random_weights_id(model),
        )
    else:
        folder, weights_id = resolve_model_folder(model, subfolders=None)
        kind = folder_kind(folder)
        if kind != "controlnet":
            what = (
                _KIND_USE[kind]
                if kind != "unknown"
                else "no ControlNet configuration (config.json of a ControlNetModel)"
            )
            raise BackboneNotAvailableError(f"ControlNet {model}: {folder} is not a ControlNet folder: {what}")
        import diffusers

        name = json.loads((folder / "config.json").read_text()).get("_class_name")
        cls = getattr(diffusers, name) if name in CONTROLNET_CLASSES else ControlNetModel
        controlnet = cls.from_pretrained(folder, torch_dtype=parse_dtype(dtype))
    return controlnet.requires_grad_(False).eval(), weights_id


# ControlNet settings that must equal the UNet's: its residuals are added to the UNet's blocks.
_CONTROLNET_KEYS = (
    "in_channels",
    "block_out_channels",
    "down_block_types",
    "layers_per_block",
    "cross_attention_dim",
    "addition_embed_type",
    "projection_class_embeddings_input_dim",
)


# ControlNet classes by the family they serve.
CONTROLNET_CLASSES = {"ControlNetModel": "sd", "SD3ControlNetModel": "sd3", "FluxControlNetModel": "flux"}
# Transformer ControlNet settings that must equal the transformer's: samples are added to its tokens.
_DIT_CONTROLNET_KEYS = (
    "in_channels",
    "patch_size",
    "num_attention_heads",
    "attention_head_dim",
    "pooled_projection_dim",
)


def check_controlnet_fits(controlnet: ControlNetModel, unet: UNet2DConditionModel, model: str, backbone: str) -> None:
    """Refuse, at load time, a ControlNet built for another family or width (it would fail
    mid-run with a bare shape error)."""
    family = family_of(unet).name
    wanted = {"sdxl": "sd"}.get(family, family)
    serves = CONTROLNET_CLASSES.get(type(controlnet).__name__)
    if serves != wanted:
        right = next((name for name, f in CONTROLNET_CLASSES.items() if f == wanted), "none")
        raise BackboneNotAvailableError(
            f"ControlNet {model} is a {type(controlnet).__name__}, and the backbone {backbone} is a {family} "
            f"model: use a ControlNet trained for this model's family ({right})"
        )
    if family == "sd3" and not controlnet.config.get("use_pos_embed", True):
        raise BackboneNotAvailableError(
            f"ControlNet {model} embeds no positions of its own (as SD3.5's official ControlNets): csdiff runs SD3 "
            f"ControlNets with their own patch embedding (as InstantX's for SD3-medium)"
        )
    if family == "flux" and (controlnet.input_hint_block is not None or controlnet.config.get("num_mode")):
        raise BackboneNotAvailableError(
            f"ControlNet {model} is an XLabs-style (pixel hint) or union (several modes) FLUX ControlNet: csdiff runs "
            f"single-mode FLUX ControlNets that read the condition's latent (as InstantX's)"
        )
    keys = _DIT_CONTROLNET_KEYS if family in ("sd3", "flux") else _CONTROLNET_KEYS
    differ = [k for k in keys if _plain(controlnet.config.get(k)) != _plain(unet.config.get(k))]
    if differ:
        details = "; ".join(f"{k}: {controlnet.config.get(k)} vs {unet.config.get(k)}" for k in differ)
        raise BackboneNotAvailableError(
            f"ControlNet {model} does not fit the backbone {backbone} ({details}; ControlNet vs UNet): use a ControlNet "
            f"trained for this model's family and size"
        )


@dataclass
class VariantWeights:
    """A variant's own whole-model weights (e.g. a LoRA merged into SD 1.5, as the paper
    released its LoRAs): its UNet, and its text encoders where they differ from the base's
    (``None`` where the base's are used); ``weights_id`` fingerprints the file or folder."""

    unet: UNet2DConditionModel
    text_encoders: tuple[nn.Module | None, ...]
    weights_id: str


@quiet_transformers()
def load_variant_weights(
    weights: str, base: SDComponents, config_folder: str, dtype: str | torch.dtype
) -> VariantWeights:
    """Load a merged checkpoint (single file or diffusers folder) of the base model's family and
    architecture; single files take their configuration from ``config_folder``.

    Its VAE is not used (each image is encoded once, with the base model's VAE): a VAE that
    differs is reported in a warning. Text encoders equal to the base's are dropped, so a
    merged checkpoint costs one extra UNet, plus a text encoder only when it was changed."""
    try:
        other = load_sd_components(weights, base_model=config_folder, dtype=dtype)
    except BackboneNotAvailableError as err:
        raise BackboneNotAvailableError(f"variant weights {weights}: {err}") from None
    if (other.text_encoder_2 is None) != (base.text_encoder_2 is None):
        raise BackboneNotAvailableError(
            f"variant weights {weights} are a {other.family.name} model but the backbone {base.spec.model} is "
            f"{base.family.name}: a variant's weights must be a checkpoint of the backbone's own family and architecture"
        )
    differ = [k for k in _ARCHITECTURE_KEYS if _plain(other.unet.config.get(k)) != _plain(base.unet.config.get(k))]
    encoders = [(other.text_encoder, base.text_encoder), (other.text_encoder_2, base.text_encoder_2)]
    shapes = [
        f"{part} {name}: {tuple(p.shape)} vs {tuple(q.shape)}"
        for part, (a, b) in (
            ("unet", (other.unet, base.unet)),
            *(("text encoder", e) for e in encoders if e[0] is not None),
        )
        for name, p, q in _shared_parameters(a, b)
        if p.shape != q.shape
    ]
    if differ or shapes:
        details = "; ".join(
            [f"{k}: {other.unet.config.get(k)} vs {base.unet.config.get(k)}" for k in differ] or shapes[:3]
        )
        raise BackboneNotAvailableError(
            f"variant weights {weights} do not fit the backbone {base.spec.model} ({details}; file vs backbone): a "
            f"variant's weights must be a checkpoint of the backbone's own family and architecture"
        )
    vae_differs = base.vae is not None and any(
        not torch.equal(p, q.to(p.dtype)) for _, p, q in _shared_parameters(other.vae.encoder, base.vae.encoder)
    )
    if vae_differs:
        warnings.warn(
            f"variant weights {weights}: their VAE differs from the backbone's; csdiff encodes each image once, "
            f"with the backbone's VAE ({base.spec.model}), for every variant",
            stacklevel=2,
        )
    kept = tuple(None if a is None or _same_parameters(a, b) else a for a, b in encoders)
    return VariantWeights(other.unet, kept, other.spec.weights_id)


def _shared_parameters(a: nn.Module, b: nn.Module):
    """(name, parameter of a, parameter of b) for the names both modules have; a missing or extra
    name is an architecture difference and is reported as a shape mismatch of ``()``."""
    pa, pb = dict(a.named_parameters()), dict(b.named_parameters())
    empty = torch.empty(0)
    for name in sorted(pa.keys() | pb.keys()):
        yield name, pa.get(name, empty), pb.get(name, empty)


def _same_parameters(a: nn.Module, b: nn.Module) -> bool:
    return all(p.shape == q.shape and torch.equal(p, q.to(p.dtype)) for _, p, q in _shared_parameters(a, b))
