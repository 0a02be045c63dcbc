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
    path: Path,
    modules: dict[str, tuple[torch.Tensor, torch.Tensor, float]],
    prefix: str = "lora_unet",
    ldm: bool = False,
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


def load_script(name: str, folder: str = "tests/data"):
    """Import a script from a folder of scripts, not a package: tests/data (generators) or
    checkpoints_scripts (weight tools)."""
    spec = importlib.util.spec_from_file_location(name, Path(__file__).resolve().parents[1] / folder / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# Float32 rounding, portably. Two code paths that compute the same features (a single file vs a
# folder, batched vs one call per variant, NHWC vs NCHW) may take different BLAS/oneDNN kernels:
# which one MKL picks depends on the CPU (Intel vs AMD, AVX2 vs AVX-512) and on memory layout and
# alignment, and each kernel sums in its own order. One reordered sum of n terms differs by up to
# ~n·eps32 of its magnitude (typically ~√n·eps32); through a UNet's ~40 layers of convolutions
# and attentions, with sums of 10²–10⁴ terms, measured differences reach ~1e-5 of the largest
# feature (1.6e-6 on features of magnitude 0.1 on an AMD EPYC). A tolerance of 1e-4 of the
# features' scale covers that with a 10× margin, while any wrong weight, missing LoRA or
# ControlNet, or other noise moves features by far more (percent of the scale).
FEATURE_RTOL = 1e-4
# Features stored as float16: a float32 difference at a rounding boundary flips one float16 step,
# at most 2^-10 of the value (10 mantissa bits), so 2e-3 of the scale covers both.
FP16_RTOL = 2e-3


def assert_close_up_to_rounding(
    got: torch.Tensor, want: torch.Tensor, rel: float = FEATURE_RTOL, msg: str = ""
) -> None:
    """Equal up to float32 reordering: ``|got - want| <= rel · max|want|`` everywhere."""
    assert got.shape == want.shape, f"{msg} shapes {tuple(got.shape)} vs {tuple(want.shape)}"
    scale = want.detach().abs().max().float().item()
    torch.testing.assert_close(got.float(), want.float(), rtol=0, atol=rel * max(scale, 1e-12), msg=msg or None)


# --- a LoRA merged into a copy of a model, by hand (the paper's released checkpoints are such) ---

LOCON_BLOCKS = ("attentions", "resnets", "downsamplers", "upsamplers")


def locon_targets(unet: torch.nn.Module, text_encoder: torch.nn.Module | None = None) -> dict[str, list[str]]:
    """What kohya's LoCon adapts: every Linear and Conv2d in the UNet's attention and ResNet
    blocks and samplers (3×3 convs included), and the text encoder's Linear layers."""
    unet_paths = [
        name
        for name, m in unet.named_modules()
        if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)) and any(f".{b}." in f".{name}." for b in LOCON_BLOCKS)
    ]
    out = {"unet": unet_paths}
    if text_encoder is not None:
        out["text_encoder"] = [
            n for n, m in text_encoder.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n
        ]
    return out


def random_locon(unet, text_encoder=None, rank: int = 4, alpha: float = 2.0, seed: int = 0, size: float = 0.3) -> dict:
    """{component: {module: (down, up, alpha)}}: a seeded LoCon on every LoCon target, float32.

    Down weights are scaled by 1/sqrt(fan-in), so each update is about ``size`` times a
    unit-variance weight whatever the width (tiny or SD 1.5)."""
    g = torch.Generator().manual_seed(seed)
    models = {"unet": unet, "text_encoder": text_encoder}
    out: dict[str, dict] = {}
    for component, paths in locon_targets(unet, text_encoder).items():
        out[component] = {}
        for path in paths:
            w = models[component].get_submodule(path).weight
            fan_in = w[0].numel()
            down = torch.randn(rank, *w.shape[1:], generator=g) / fan_in**0.5
            up = torch.randn(w.shape[0], rank, generator=g) * size * w.detach().float().std().item()
            out[component][path] = (down, up, alpha)
    return out


def merge_lora_by_hand(models: dict[str, torch.nn.Module], modules: dict, scale: float = 1.0) -> None:
    """W ← W + scale·(alpha/r)·up∘down in float64, rounded once to the weight's dtype (in place)."""
    from csdiff.backbone.lora_files import kohya_delta

    with torch.no_grad():
        for component, pairs in modules.items():
            for path, (down, up, alpha) in pairs.items():
                w = models[component].get_submodule(path).weight
                w.copy_((w.double() + scale * kohya_delta(down, up, alpha, w.shape)).to(w.dtype))


def write_merged_copy(source: Path, out: Path, modules: dict, scale: float = 1.0) -> Path:
    """A diffusers folder: ``source`` (a Stable Diffusion folder) with ``modules`` merged into
    its UNet and text encoder by hand; VAE, tokenizer and scheduler copied unchanged."""
    import shutil

    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    shutil.copytree(source, out)
    unet = UNet2DConditionModel.from_pretrained(source, subfolder="unet")
    text_encoder = CLIPTextModel.from_pretrained(source, subfolder="text_encoder")
    merge_lora_by_hand({"unet": unet, "text_encoder": text_encoder}, modules, scale)
    for name, model in (("unet", unet), ("text_encoder", text_encoder)):
        shutil.rmtree(out / name)
        model.save_pretrained(out / name)
    return out


def stock_img2img(extractor, images: torch.Tensor, strength: float, steps: int, seed: int) -> torch.Tensor:
    """diffusers' own StableDiffusionImg2ImgPipeline on the extractor's components (DDIM, guidance
    1, empty prompt), started from the extractor's latent, one image per call with a generator
    seeded by ``seed``: the reference for csdiff's no-technique reconstruction. Pictures in [0, 1]."""
    from diffusers import DDIMScheduler, StableDiffusionImg2ImgPipeline

    from csdiff.backbone.img2img import NO_TECHNIQUE

    pipe = StableDiffusionImg2ImgPipeline(
        vae=extractor.vae,
        text_encoder=extractor.text_encoder,
        tokenizer=extractor.tokenizer,
        unet=extractor.unet,
        scheduler=DDIMScheduler.from_config(extractor.scheduler.config),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    latents = extractor.encode_images(images, NO_TECHNIQUE)
    return torch.cat(
        [
            pipe(
                "",
                image=latents[i : i + 1],  # a 4-channel image is taken as the latent
                strength=strength,
                num_inference_steps=steps,
                guidance_scale=1.0,
                generator=torch.Generator().manual_seed(seed),
                output_type="pt",
            ).images
            for i in range(len(images))
        ]
    )


def assert_refused_in_one_line(registry, path: Path, words) -> None:
    """Loading ``path`` into a LoRA registry fails with one line naming the file and each of ``words``."""
    import pytest

    from csdiff.backbone.lora import LoRAError

    with pytest.raises(LoRAError) as err:
        registry.load(str(path))
    message = str(err.value)
    assert "\n" not in message and str(path) in message
    for word in words:
        assert word in message, (word, message)
