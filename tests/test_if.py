"""DeepFloyd IF stage I: a pixel-space UNet (no VAE) with T5, on SD's name grammar.

A tiny random-weight IF folder (plain-attention levels, resnet samplers, T5 projected inside the
UNet, learned variance, cosine schedule) is written at test time (``tests/data/make_tiny_if.py``).
References: the stock UNet called as IF's pipeline calls it, its ``encode_prompt``, the
scheduler's ``add_noise`` and DDIM's ``step``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers import DDIMScheduler, IFPipeline
from helpers import assert_close_up_to_rounding, load_script, shapes_images

from csdiff.backbone import ControlNet, DiffusionFeatureExtractor, UnknownLayerError, Variant
from csdiff.backbone.capture import ActivationCapture
from csdiff.backbone.listing import list_layers
from csdiff.backbone.loading import load_sd_components
from csdiff.backbone.names import enumerate_activations

PROMPT = "a photo of a red circle and a blue square on a striped background"


@pytest.fixture(scope="module")
def deepfloyd(tmp_path_factory) -> Path:
    return load_script("make_tiny_if").make_tiny_if(tmp_path_factory.mktemp("if") / "tiny-if")


@pytest.fixture(scope="module")
def parts(deepfloyd):
    return load_sd_components(str(deepfloyd))


@pytest.fixture(scope="module")
def images():
    return shapes_images(2, size=64)


def stock_encode(parts, prompt):
    pipe = IFPipeline(
        tokenizer=parts.tokenizer,
        text_encoder=parts.text_encoder,
        unet=parts.unet,
        scheduler=parts.scheduler,
        safety_checker=None,
        feature_extractor=None,
        watermarker=None,
        requires_safety_checker=False,
    )
    emb, _ = pipe.encode_prompt(
        prompt, do_classifier_free_guidance=False, device=torch.device("cpu"), clean_caption=False
    )
    return emb


def test_if_loads_in_pixel_space_with_sds_grammar(deepfloyd, parts):
    assert parts.family.name == "if" and parts.vae is None and parts.tokenizer.model_max_length == 77
    rows = {r.name: r.shape for r in list_layers(parts, 64)}
    assert rows["unet-in"] == (3, 64, 64) and rows["up-level2-upsampler-out"] == (32, 64, 64)
    assert rows["up-level1-repeat0-vit-out"] == (32, 16, 16) and "up_cross" not in rows
    assert DiffusionFeatureExtractor(str(deepfloyd), ["unet-in"]).img_size == 64  # sample_size 64, no VAE


def test_every_if_name_equals_an_independent_hook(parts):
    unet = parts.unet
    torch.manual_seed(0)
    x = torch.randn(2, 3, 64, 64)
    emb = stock_encode(parts, PROMPT).expand(2, -1, -1)
    names = list(enumerate_activations(unet))
    with ActivationCapture(unet, names) as capture:
        unet(x, 50, encoder_hidden_states=emb)
    seen, handles = {}, []
    for path, module in unet.named_modules():
        handles.append(module.register_forward_hook(lambda m, a, o, p=path: seen.__setitem__(p, o)))
        handles.append(
            module.register_forward_pre_hook(lambda m, a, p=path: seen.__setitem__(p + "<in", a[0]) if a else None)
        )
    unet(x, 50, encoder_hidden_states=emb)
    for h in handles:
        h.remove()
    table = enumerate_activations(unet)
    for name, act in table.items():
        ref = seen[act.module + "<in"] if act.kind == "input" else seen[act.module]
        torch.testing.assert_close(capture.features[name], ref if torch.is_tensor(ref) else ref[0], msg=name)
    assert table["up-level1-repeat0-vit-out"].module == "up_blocks.1.attentions.0"


def test_if_text_conditioning_equals_the_stock_pipelines(deepfloyd, parts):
    ex = DiffusionFeatureExtractor(str(deepfloyd), ["unet-in"])
    for prompt in (PROMPT, ""):
        emb, _ = ex._prompt(prompt, ())
        assert emb.shape == (1, 77, 24)
        torch.testing.assert_close(emb, stock_encode(parts, prompt))


def test_if_noises_the_image_itself_and_chains_ddim_on_the_eps_half(deepfloyd, parts, images):
    ex = DiffusionFeatureExtractor(
        str(deepfloyd),
        ["unet-in", "up-level1-upsampler-out"],
        timestep=50,
        variants=[Variant("plain", PROMPT), Variant("chain", PROMPT, seed=4, denoise_from=53)],
    )
    got = ex(images)
    noise = [
        torch.randn((1, 3, 64, 64), generator=torch.Generator().manual_seed(k)).expand(2, -1, -1, -1) for k in (0, 4)
    ]
    ac = ex.scheduler.alphas_cumprod
    torch.testing.assert_close(got["plain"]["unet-in"], ac[50].sqrt() * images + (1 - ac[50]).sqrt() * noise[0])
    ddim = DDIMScheduler.from_config(ex.scheduler.config, set_alpha_to_one=False)
    ddim.set_timesteps(1000)
    emb = stock_encode(parts, PROMPT).expand(2, -1, -1)
    x = ddim.add_noise(images, noise[1], torch.tensor([53]))
    for t in (53, 52, 51):
        eps = parts.unet(x, t, encoder_hidden_states=emb).sample[:, :3]  # learned variance: IF's pipeline splits it off
        x = ddim.step(eps, t, x, eta=0.0).prev_sample
    assert_close_up_to_rounding(got["chain"]["unet-in"], x)


def test_if_refuses_what_needs_a_vae_or_is_not_available(deepfloyd, images):
    from csdiff.backbone.img2img import NO_TECHNIQUE, reconstruct

    with pytest.raises(ValueError, match="works on pixels \\(no VAE\\)"):
        DiffusionFeatureExtractor(str(deepfloyd), ["unet-in"], latent="sample")
    with pytest.raises(ValueError, match="uses ControlNet, which csdiff does not run on if"):
        DiffusionFeatureExtractor(str(deepfloyd), ["unet-in"], variants=[Variant("c", controlnets=[ControlNet("x")])])
    with pytest.raises(UnknownLayerError, match="up_cross is not available for if models"):
        DiffusionFeatureExtractor(str(deepfloyd), ["up_cross"])
    from csdiff.tasks import LoRATrainingTask

    with pytest.raises(ValueError, match="if model, which csdiff cannot train adapters for"):
        LoRATrainingTask(backbone={"model": str(deepfloyd)})
    picture = reconstruct(DiffusionFeatureExtractor(str(deepfloyd), ["unet-in"]), images[:1], NO_TECHNIQUE, steps=4)
    assert picture.shape == (1, 3, 64, 64) and picture.abs().max() <= 1


def test_segmentation_fit_on_if_through_the_cli(deepfloyd, tmp_path):
    """A task in pixel space: the PixArt segmentation config's variants (plain + chain) on IF's
    `legacy` set (its up-level samplers), 2 steps + validation through the CLI."""
    import yaml
    from test_configs import _run, _substitute_tiny

    config = yaml.safe_load(
        (Path(__file__).resolve().parents[1] / "configs" / "seg_ade20k_pixart_sigma_public.yaml").read_text()
    )
    config = _substitute_tiny(config, tmp_path, str(deepfloyd))
    config["model"]["init_args"]["layers"] = ["legacy"]
    cli, score = _run(config, tmp_path / "if.yaml")
    assert score in cli.trainer.callback_metrics
    assert cli.model.gate.in_channels == (32, 32, 32)
