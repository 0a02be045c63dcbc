"""Real-size backbones with seeded random weights: SD 1.5's exact architecture, no download.

``random-sd15`` (UNet 859.5 M, VAE, CLIP ViT-L text encoder, SD 1.5 scheduler),
``random-sd15-controlnet-canny`` (ControlNet 361.3 M), ``random-pixart-alpha`` (PixArt-α's
transformer 610.9 M, SD's VAE, a T5 of T5-XXL's width with 1 of its 24 layers) and
``random-sd3-medium`` (SD3-medium's transformer 2,028.3 M, its 16-channel VAE, CLIP-L at full
size, CLIP-G and T5 cut to one layer) are built from the diffusers configurations shipped in
``csdiff/backbone/configs/``. ``random-flux1-dev`` (FLUX.1-dev's transformer, 11,901.4 M, its
VAE, CLIP-L and the whole T5-XXL) lives on the meta device only: shapes without memory, for
``csdiff layers`` and instantiating configs; it cannot extract. They make real-scale behaviour
(memory, fp16, 278 M-parameter gates, LoRA at SD widths) testable on any machine and
measurable on a GPU; their features mean nothing.

Each tensor is a window of one seeded pool of 16 M uniform values, starting at an offset
drawn from (seed, tensor name), scaled and copied straight into allocated memory (the modules
are built on the meta device first): about a second for the UNet instead of the minute that
module-by-module default initialisation takes at this size (and 3 s for drawing every value),
independent of build order and thread count. The weights only have to be random-looking at the
right scale: their features mean nothing. Every weight is random, including ControlNet's zero
convolutions, so a random ControlNet does change features.
"""

from __future__ import annotations

import functools
import hashlib
import math
import tempfile
from pathlib import Path

import torch
from diffusers import AutoencoderKL, ControlNetModel, PNDMScheduler, UNet2DConditionModel
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModel

CONFIG_DIR = Path(__file__).parent / "configs"
RANDOM_MODELS = {
    "random-sd15": CONFIG_DIR / "random-sd15",
    "random-pixart-alpha": CONFIG_DIR / "random-pixart-alpha",
    "random-sd3-medium": CONFIG_DIR / "random-sd3-medium",
    "random-flux1-dev": CONFIG_DIR / "random-flux1-dev",
    "random-sd15-controlnet-canny": CONFIG_DIR / "random-sd15-controlnet-canny",
}
RANDOM_SEED = 0
POOL_SIZE = 1 << 24  # values in the seeded pool that every random tensor is a window of
WEIGHTS_VERSION = "pool-1"  # changes the weights ids whenever the way weights are drawn changes
# Words that get whole-word tokens; any other text still tokenizes byte by byte.
_TOKENIZER_WORDS = (
    "a photo of the an and in with on at real world it can be indoor outdoor scene or nature high quality "
    "highly realistic urban street multiple lanes various buildings traffic lights cars pedestrians aeroplane "
    "bicycle bird boat bottle bus car cat chair cow dog horse motorbike person potted plant sheep train tv monitor "
    "best masterpiece resolution tidy well designed bedroom"
).split()


def is_random_model(model: str) -> bool:
    return model in RANDOM_MODELS


def random_weights_id(model: str, seed: int = RANDOM_SEED) -> str:
    """Fingerprint of a random model: its configuration files and seed (same config + seed, same weights)."""
    folder = RANDOM_MODELS[model]
    h = hashlib.sha256(f"{model}:{seed}:{WEIGHTS_VERSION}".encode())
    for path in sorted(folder.rglob("*.json")):
        h.update(path.relative_to(folder).as_posix().encode() + path.read_bytes())
    return f"random-{h.hexdigest()[:16]}"


def _tensor_seed(seed: int, name: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little") >> 1


@functools.lru_cache(maxsize=2)
def _pool(seed: int) -> torch.Tensor:
    return torch.empty(POOL_SIZE).uniform_(-1.0, 1.0, generator=torch.Generator().manual_seed(seed))


def _window(seed: int, name: str, shape: torch.Size, bound: float, dtype: torch.dtype) -> torch.Tensor:
    """``shape`` values uniform in ±bound: the pool read from an offset given by the name, wrapping
    around; scaled in float32, then cast (float16 weights are the rounded float32 ones)."""
    pool, total = _pool(seed), math.prod(shape)
    out = torch.empty(total, dtype=dtype)
    start, done = _tensor_seed(seed, name) % POOL_SIZE, 0
    while done < total:
        take = min(total - done, POOL_SIZE - start)
        out[done : done + take] = pool[start : start + take] * bound
        done, start = done + take, 0
    return out.view(shape)


@torch.no_grad()
def fill_random_(module: nn.Module, seed: int, dtype: torch.dtype) -> nn.Module:
    """Give a meta-built module CPU parameters in ``dtype``, drawn tensor by tensor.

    PyTorch's default scale: weights and biases uniform in ±1/sqrt(fan_in) (fan_in of the
    layer's weight); 1-D weights (normalisation scales) 1. Values are scaled in float32, then
    cast, so float16 weights are the rounded float32 ones.
    """
    for prefix, owner in module.named_modules():
        params = owner._parameters
        weight = params.get("weight")
        fan_in = math.prod(weight.shape[1:]) if weight is not None and weight.ndim > 1 else None
        for leaf, param in list(params.items()):
            if param is None:
                continue
            if param.ndim == 1 and leaf == "weight":
                values = torch.ones(param.shape, dtype=dtype)
            else:
                bound = 1.0 / math.sqrt(fan_in or param.shape[-1])
                values = _window(seed, f"{prefix}.{leaf}", param.shape, bound, dtype)
            params[leaf] = nn.Parameter(values, requires_grad=False)
    if any(b.is_meta for b in module.buffers()):
        raise RuntimeError(f"{type(module).__name__} has buffers that a random build would leave uninitialised")
    return module


def _on_meta(build):
    with torch.device("meta"):
        return build()


def random_unet(dtype: torch.dtype, seed: int = RANDOM_SEED) -> UNet2DConditionModel:
    return fill_random_(meta_unet(), seed, dtype)


def random_vae(
    dtype: torch.dtype, with_decoder: bool, seed: int = RANDOM_SEED, model: str = "random-sd15"
) -> AutoencoderKL:
    config = AutoencoderKL.load_config(RANDOM_MODELS[model], subfolder="vae")
    vae = _on_meta(lambda: AutoencoderKL.from_config(config))
    if not with_decoder:
        vae.decoder = None
        vae.post_quant_conv = None
    return fill_random_(vae, seed + 1, dtype)


def random_text_encoder(dtype: torch.dtype, seed: int = RANDOM_SEED) -> CLIPTextModel:
    """CLIP ViT-L text encoder with transformers' own initialisation (its position ids are a buffer)."""
    config = CLIPTextConfig.from_pretrained(RANDOM_MODELS["random-sd15"] / "text_encoder")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 2)
        return CLIPTextModel(config).to(dtype)


def random_tokenizer(vocab_size: int):
    """A working CLIP BPE tokenizer with ``vocab_size`` entries, written to a temporary folder and loaded."""
    from csdiff.backbone.loading import load_tokenizer
    from csdiff.backbone.tiny import write_tokenizer_files

    with tempfile.TemporaryDirectory(prefix="csdiff-tokenizer-") as tmp:
        write_tokenizer_files(list(_TOKENIZER_WORDS), Path(tmp), vocab_size=vocab_size)
        return load_tokenizer(Path(tmp), vocab_size)


def random_scheduler() -> PNDMScheduler:
    return PNDMScheduler.from_pretrained(RANDOM_MODELS["random-sd15"], subfolder="scheduler")


# Modules the random LoRAs adapt: self-attention q of up-level1 and up-level2 (SD 1.5 topology).
RANDOM_LORA_MODULES = (
    "up_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q",
    "up_blocks.2.attentions.0.transformer_blocks.0.attn1.to_q",
)


def write_random_lora(path: Path, unet: nn.Module, kind: str = "kohya", rank: int = 4, seed: int = 0) -> Path:
    """A seeded random LoRA sized for ``unet`` (any SD 1.5-topology model; a meta-device UNet
    will do), standing in for the paper's dataset LoRAs in tests and benchmarks.

    ``kohya``: a kohya-format ``.safetensors`` file (``lora_unet_…``, alpha = rank);
    ``diffusers``: a diffusers LoRA folder with peft metadata.
    """
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    pairs = {}
    for module in RANDOM_LORA_MODULES:
        width = unet.get_submodule(module).in_features
        pairs[module] = (
            torch.randn(rank, width, generator=g) / width**0.5,
            torch.randn(width, rank, generator=g) * 0.5,
        )
    if kind == "kohya":
        tensors = {}
        for module, (down, up) in pairs.items():
            name = "lora_unet_" + module.replace(".", "_")
            tensors.update(
                {
                    f"{name}.lora_down.weight": down,
                    f"{name}.lora_up.weight": up,
                    f"{name}.alpha": torch.tensor(float(rank)),
                }
            )
        save_file(tensors, str(path))
        return path
    if kind != "diffusers":
        raise ValueError(f"kind must be 'kohya' or 'diffusers', got {kind!r}")
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig

    layers = {f"{m}.lora_{ab}.weight": t for m, (down, up) in pairs.items() for ab, t in (("A", down), ("B", up))}
    config = LoraConfig(r=rank, lora_alpha=rank, target_modules=list(RANDOM_LORA_MODULES)).to_dict()
    StableDiffusionPipeline.save_lora_weights(path, unet_lora_layers=layers, unet_lora_adapter_metadata=config)
    return path


def meta_unet(model: str = "random-sd15") -> UNet2DConditionModel:
    """The UNet of a random model on the meta device: its shapes, no memory (to size LoRAs)."""
    config = UNet2DConditionModel.load_config(RANDOM_MODELS[model], subfolder="unet")
    return _on_meta(lambda: UNet2DConditionModel.from_config(config))


def random_controlnet(model: str, dtype: torch.dtype, seed: int = RANDOM_SEED) -> ControlNetModel:
    config = ControlNetModel.load_config(RANDOM_MODELS[model])
    return fill_random_(_on_meta(lambda: ControlNetModel.from_config(config)), seed + 3, dtype)


# The random DiTs' T5 keeps T5-XXL's width, heads and vocabulary but 1 of its 24 layers (the whole
# encoder is 4.76 B parameters, 19 GB in float32), and SD3's CLIP-G 1 of its 32: text encoders run
# once per prompt, not per image, and their depth changes nothing the tests can see.
RANDOM_T5_LAYERS = 1


def _with_buffers_of(model: nn.Module, shell: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Give a meta-built model the buffers (position tables, position ids) of a small CPU build of
    the same configuration without its blocks: they depend on the configuration, not the depth."""
    for name, buffer in shell.named_buffers():
        owner, _, leaf = name.rpartition(".")
        value = buffer.to(dtype) if buffer.is_floating_point() else buffer
        model.get_submodule(owner).register_buffer(leaf, value, persistent=False)
    return model


def random_transformer(model: str, dtype: torch.dtype, seed: int = RANDOM_SEED):
    """The diffusion transformer of ``random-pixart-alpha`` (PixArt-α's, 610.9 M parameters) or
    ``random-sd3-medium`` (SD3-medium's, 2,028.3 M)."""
    from diffusers import PixArtTransformer2DModel, SD3Transformer2DModel

    cls = PixArtTransformer2DModel if model == "random-pixart-alpha" else SD3Transformer2DModel
    config = cls.load_config(RANDOM_MODELS[model], subfolder="transformer")
    built = _on_meta(lambda: cls.from_config(config))
    with torch.random.fork_rng(devices=[]):
        shell = cls.from_config({**config, "num_layers": 0 if cls is PixArtTransformer2DModel else 1})
    return fill_random_(_with_buffers_of(built, shell, dtype), seed, dtype)


def random_clip_with_projection(model: str, subfolder: str, dtype: torch.dtype, seed: int = RANDOM_SEED):
    """SD3's CLIP-L (at full size) or CLIP-G (its width, heads and projection, with 1 of its 32
    layers: 695 M parameters in full, run once per prompt), with the pooled projection."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    config = CLIPTextConfig.from_pretrained(RANDOM_MODELS[model] / subfolder)
    if subfolder == "text_encoder_2":
        config.num_hidden_layers = RANDOM_T5_LAYERS
    built = _on_meta(lambda: CLIPTextModelWithProjection(config))
    shell = CLIPTextModelWithProjection(CLIPTextConfig.from_dict({**config.to_dict(), "num_hidden_layers": 0}))
    return fill_random_(_with_buffers_of(built, shell, dtype), seed, dtype)


def random_t5_encoder(model: str, dtype: torch.dtype, seed: int = RANDOM_SEED):
    from transformers import T5Config, T5EncoderModel

    subfolder = "text_encoder_3" if model == "random-sd3-medium" else "text_encoder"
    config = T5Config.from_pretrained(RANDOM_MODELS[model] / subfolder)
    config.num_layers = RANDOM_T5_LAYERS
    model = fill_random_(_on_meta(lambda: T5EncoderModel(config)), seed + 2, dtype)
    model.encoder.embed_tokens.weight = model.shared.weight  # one table, as T5 ties them
    return model


def random_t5_tokenizer():
    from csdiff.backbone.tiny import t5_tokenizer

    return t5_tokenizer(list(_TOKENIZER_WORDS))


def meta_flux_parts(dtype: torch.dtype) -> dict:
    """FLUX.1-dev's transformer, VAE (encoder), CLIP-L and T5-XXL on the meta device: 17 B
    parameters that take no memory. Their buffers stay meta too: only shapes are ever read."""
    from diffusers import FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    folder = RANDOM_MODELS["random-flux1-dev"]
    vae_config = AutoencoderKL.load_config(folder, subfolder="vae")
    with torch.device("meta"):
        parts = dict(
            transformer=FluxTransformer2DModel.from_config(
                FluxTransformer2DModel.load_config(folder, subfolder="transformer")
            ),
            vae=AutoencoderKL.from_config(vae_config),
            text_encoder=CLIPTextModel(CLIPTextConfig.from_pretrained(folder / "text_encoder")),
            text_encoder_2=T5EncoderModel(T5Config.from_pretrained(folder / "text_encoder_2")),
        )
    parts["vae"].decoder = None
    # nn.Module.to: diffusers' own `to` warns about float32-kept modules, of which these have none
    return {name: nn.Module.to(module, dtype).requires_grad_(False) for name, module in parts.items()}
