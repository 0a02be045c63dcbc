"""FLUX.1: packed-token transformer with double- and single-stream blocks, flow matching with a
resolution-dependent shift, through the same extractor, names and tasks.

A tiny random-weight FLUX folder (FLUX.1's 19 + 38 blocks, guidance embedding, CLIP-L + T5, a
16-channel VAE with a shift factor, dynamic shifting) is written at test time
(``tests/data/make_tiny_flux.py``). The references are diffusers' own: the stock transformer
called as FLUX's pipeline calls it (its own ``_pack_latents`` and image ids), its
``encode_prompt``, ``calculate_shift`` and the scheduler's ``set_timesteps(mu=…)`` and ``step``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FluxImg2ImgPipeline, FluxPipeline
from diffusers.pipelines.flux.pipeline_flux import calculate_shift
from helpers import assert_close_up_to_rounding, load_script, shapes_images

from csdiff.backbone import DiffusionFeatureExtractor, LoRA, Variant
from csdiff.backbone.capture import ActivationCapture
from csdiff.backbone.listing import list_layers
from csdiff.backbone.loading import load_sd_components
from csdiff.backbone.names import enumerate_activations

PROMPT = "a photo of a red circle and a blue square on a striped background"
script = load_script("make_tiny_flux")


@pytest.fixture(scope="module")
def flux(tmp_path_factory) -> Path:
    return script.make_tiny_flux(tmp_path_factory.mktemp("flux") / "tiny-flux")


@pytest.fixture(scope="module")
def parts(flux):
    return load_sd_components(str(flux))


@pytest.fixture(scope="module")
def images():
    return shapes_images(2, size=64)


def stock_pipeline(parts, cls=FluxPipeline, scheduler=None):
    pipe = cls(
        transformer=parts.unet,
        scheduler=scheduler or parts.scheduler,
        vae=parts.vae,
        text_encoder=parts.text_encoder,
        tokenizer=parts.tokenizer,
        text_encoder_2=parts.text_encoder_2,
        tokenizer_2=parts.tokenizer_2,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def stock_call(parts, latent, sigma, prompt=PROMPT, guidance=3.5):
    """The transformer called as FLUX's pipeline calls it, on a (B, 16, h, w) latent: its own
    packing and ids; returns the packed output and the packed input."""
    pipe = stock_pipeline(parts)
    emb, pooled, text_ids = pipe.encode_prompt(prompt, None, device=torch.device("cpu"))
    b, c, h, w = latent.shape
    packed = FluxPipeline._pack_latents(latent, b, c, h, w)
    image_ids = FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, latent.device, latent.dtype)
    out = parts.unet(
        hidden_states=packed,
        timestep=torch.full((b,), sigma),
        guidance=torch.full((b,), guidance),
        pooled_projections=pooled.expand(b, -1),
        encoder_hidden_states=emb.expand(b, -1, -1),
        txt_ids=text_ids,
        img_ids=image_ids,
    ).sample
    return out, packed


def grid(tokens, side=4):
    return tokens.transpose(1, 2).reshape(tokens.shape[0], -1, side, side)


def test_flux_loads_as_its_family_at_native_1024(flux, parts):
    assert parts.family.name == "flux" and parts.family.noise == "flow"
    assert parts.tokenizer_2.model_max_length == 512
    assert len(enumerate_activations(parts.unet)) == 19 * 8 + 38 + 2
    assert DiffusionFeatureExtractor(str(flux), ["dit-out"]).img_size == 1024  # FLUX's config has no sample_size
    rows = {r.name: r.shape for r in list_layers(parts, 64)}
    assert rows["single-block37-out"] == (32, 4, 4) and rows["dit-after-patch-embed"] == (32, 4, 4)
    assert rows["dit-out"] == (64, 4, 4)  # 16 channels × a 2×2 patch per token


def test_every_flux_name_equals_an_independent_hook(parts):
    torch.manual_seed(0)
    latent = torch.randn(2, 16, 8, 8)
    seen, handles = {}, []
    for path, module in parts.unet.named_modules():
        handles.append(module.register_forward_hook(lambda m, a, o, p=path: seen.__setitem__(p, o)))
    stock_call(parts, latent, 0.5)
    for h in handles:
        h.remove()
    names = list(enumerate_activations(parts.unet))
    with ActivationCapture(parts.unet, names, latent_size=(8, 8)) as capture:
        stock_call(parts, latent, 0.5)
    for i in range(19):
        block = f"transformer_blocks.{i}"
        for suffix, (sub, index) in {
            "self-q": (".attn.to_q", None),
            "self-k": (".attn.to_k", None),
            "self-v": (".attn.to_v", None),
            "self-out": (".attn", 0),
            "ffn-out": (".ff", None),
            "out": ("", 1),
        }.items():
            out = seen[block + sub]
            torch.testing.assert_close(
                capture.features[f"vit-block{i}-{suffix}"], grid(out if index is None else out[index])
            )
    for i in range(38):  # a single-stream block returns (text, image)
        torch.testing.assert_close(
            capture.features[f"single-block{i}-out"], grid(seen[f"single_transformer_blocks.{i}"][1])
        )
    torch.testing.assert_close(capture.features["dit-after-patch-embed"], grid(seen["x_embedder"]))
    torch.testing.assert_close(capture.features["dit-out"], grid(seen["proj_out"]))


def test_flux_text_conditioning_equals_the_stock_pipelines(flux, parts):
    ex = DiffusionFeatureExtractor(str(flux), ["dit-out"], img_size=64)
    long = " ".join([PROMPT] * 8)
    for prompt in (PROMPT, "", long):
        if prompt is long:
            with pytest.warns(UserWarning, match="CLIP tokens: the model reads its first 77"):
                emb, pooled = ex._prompt(prompt, ())
        else:
            emb, pooled = ex._prompt(prompt, ())
        ref_emb, ref_pooled, _ = stock_pipeline(parts).encode_prompt(prompt, None, device=torch.device("cpu"))
        assert emb.shape == (1, 512, 32) and pooled.shape == (1, 16)
        torch.testing.assert_close(emb, ref_emb)
        torch.testing.assert_close(pooled, ref_pooled)


def test_flux_noise_at_the_shifted_sigma_and_its_euler_chain(flux, parts, images):
    ex = DiffusionFeatureExtractor(
        str(flux),
        ["dit-after-patch-embed", "vit-block10-out"],
        img_size=64,
        timestep=50,
        variants=[Variant("plain", PROMPT), Variant("chain", PROMPT, seed=4, denoise_from=53)],
    )
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(parts.scheduler.config)
    mu = calculate_shift(16, 256, 4096, 0.5, 1.15)  # 64² image: (64 / 8 / 2)² = 16 tokens
    scheduler.set_timesteps(sigmas=[(t + 1) / 1000 for t in (53, 52, 51, 50)], mu=mu)
    assert [ex.sigma(t) for t in (53, 52, 51, 50)] == pytest.approx(scheduler.sigmas[:4].tolist(), rel=1e-6)
    got = ex(images)
    z = ex.encode_images(images)
    vae = parts.vae
    torch.testing.assert_close(z, (vae.encode(ex.resize(images)).latent_dist.mean - 0.1159) * 0.3611)
    noise = [
        torch.randn((1, 16, 8, 8), generator=torch.Generator().manual_seed(k)).expand(2, -1, -1, -1) for k in (0, 4)
    ]
    embed = parts.unet.x_embedder
    noisy = (1 - ex.sigma(50)) * z + ex.sigma(50) * noise[0]
    pack = lambda x: FluxPipeline._pack_latents(x, 2, 16, 8, 8)  # noqa: E731
    torch.testing.assert_close(got["plain"]["dit-after-patch-embed"], grid(embed(pack(noisy))))
    # the chain: from σ(53) with the scheduler's own steps on the stock transformer's flow
    x = pack(scheduler.scale_noise(z, scheduler.timesteps[:1], noise[1]))
    for k in range(3):
        out, _ = stock_call(parts, FluxPipeline._unpack_latents(x, 64, 64, 8), float(scheduler.timesteps[k]) / 1000)
        x = scheduler.step(out, scheduler.timesteps[k], x).prev_sample
    assert_close_up_to_rounding(got["chain"]["dit-after-patch-embed"], grid(embed(x)))


def test_flux_guidance_is_read_and_configurable(flux, images):
    plain = DiffusionFeatureExtractor(str(flux), ["vit-block5-out"], img_size=64)
    strong = DiffusionFeatureExtractor(str(flux), ["vit-block5-out"], img_size=64, guidance=7.0)
    assert plain.describe()["guidance"] == 3.5 and strong.describe()["guidance"] == 7.0  # the value used
    a, b = plain(images)["plain"]["vit-block5-out"], strong(images)["plain"]["vit-block5-out"]
    assert (a - b).abs().max() > 1e-4
    with pytest.raises(ValueError, match="guidance is FLUX.1-dev's distilled guidance embedding; tiny is a sd model"):
        DiffusionFeatureExtractor("tiny", ["unet-in"], guidance=3.5)


def test_flux_without_guidance_embedding_runs(tmp_path, images):
    """FLUX.1-schnell-shaped: no guidance embedding, so guidance is not passed."""
    folder = script.make_tiny_flux(tmp_path / "schnell", guidance=False)
    ex = DiffusionFeatureExtractor(str(folder), ["single-block3-out"], img_size=64)
    assert ex(images)["plain"]["single-block3-out"].shape == (2, 32, 4, 4) and ex.describe()["guidance"] is None
    with pytest.raises(ValueError, match="FLUX model without a guidance embedding"):
        DiffusionFeatureExtractor(str(folder), ["single-block3-out"], img_size=64, guidance=3.5)


def test_flux_batched_variants_equal_one_call_each(flux, images):
    variants = [
        Variant("plain", PROMPT),
        Variant("short", "a photo", seed=1),
        Variant("chain", "a photo", denoise_from=60),
    ]
    layers = ["vit-block0-self-k", "single-block20-out"]
    batched = DiffusionFeatureExtractor(str(flux), layers, img_size=64, variants=variants)(images)
    single = DiffusionFeatureExtractor(str(flux), layers, img_size=64, variants=variants, batch_variants=False)(images)
    for v in batched:
        for layer in layers:
            assert_close_up_to_rounding(batched[v][layer], single[v][layer])


def test_flux_reconstruction_equals_the_stock_img2img_pipeline(flux, images):
    from csdiff.backbone.img2img import NO_TECHNIQUE, reconstruct

    ex = DiffusionFeatureExtractor(str(flux), ["dit-out"], img_size=64, vae_decoder=True)
    ours = reconstruct(ex, images[:1], NO_TECHNIQUE, strength=0.8, steps=5, seed=3)
    full = load_sd_components(str(flux), load_vae_decoder=True)
    pipe = stock_pipeline(full, FluxImg2ImgPipeline, FlowMatchEulerDiscreteScheduler.from_config(full.scheduler.config))
    stock = pipe(
        "",
        image=ex.encode_images(images[:1], NO_TECHNIQUE),
        strength=0.8,
        num_inference_steps=5,
        guidance_scale=3.5,
        height=64,
        width=64,
        generator=torch.Generator().manual_seed(3),
        output_type="pt",
    ).images
    assert_close_up_to_rounding(ours * 0.5 + 0.5, stock)
    # steps the flow pipelines keep: int(steps − steps·strength) skipped (SD's img2img: int(steps·strength) kept)
    from csdiff.backbone.img2img import chain_timesteps

    sched = FlowMatchEulerDiscreteScheduler.from_config(full.scheduler.config)
    assert len(chain_timesteps(sched, 0.55, 10, ex.resolution_shift(), flow=True)) == 6
    pipe.scheduler.set_timesteps(sigmas=np.linspace(1.0, 0.1, 10), mu=ex.resolution_shift())
    assert len(pipe.get_timesteps(10, 0.55, "cpu")[0]) == 6


def test_flux_refuses_what_it_does_not_run_yet(flux, tmp_path):
    with pytest.raises(ValueError, match="LoRA file not found"):  # LoRA runs on FLUX (test_lora_dit.py)
        DiffusionFeatureExtractor(
            str(flux), ["dit-out"], variants=[Variant("l", loras=[LoRA(str(tmp_path / "x.safetensors"))])]
        )
    with pytest.raises(ValueError, match="multiple of 16 .*patches of 2"):
        DiffusionFeatureExtractor(str(flux), ["dit-out"], img_size=72)
    assert np.isfinite(DiffusionFeatureExtractor(str(flux), ["dit-out"], img_size=64).sigma(999))
    from csdiff.backbone import ControlNet
    from csdiff.backbone.loading import BackboneNotAvailableError

    with pytest.raises(BackboneNotAvailableError, match="is a ControlNetModel, and the backbone .* is a flux model"):
        DiffusionFeatureExtractor(
            str(flux), ["dit-out"], variants=[Variant("c", controlnets=[ControlNet("tiny-controlnet-canny")])]
        )
    from diffusers import FluxControlNetModel

    union = FluxControlNetModel(**script.WIDTHS, num_layers=1, num_single_layers=1, num_mode=3)
    union.save_pretrained(tmp_path / "union")
    with pytest.raises(BackboneNotAvailableError, match="union \\(several modes\\) FLUX ControlNet"):
        DiffusionFeatureExtractor(
            str(flux), ["dit-out"], variants=[Variant("c", controlnets=[ControlNet(str(tmp_path / "union"))])]
        )


def test_random_flux1_dev_is_flux1_dev_in_shapes_only(capsys):
    """FLUX.1-dev's real size, shape-only (meta tensors, no memory): the transformer's
    11,901,408,320 parameters, the whole T5-XXL, every name's shape at 1024², and a clear refusal
    to extract."""
    from csdiff.cli import main

    ex = DiffusionFeatureExtractor("random-flux1-dev", ["practical"], dtype="bfloat16")
    assert sum(p.numel() for p in ex.unet.parameters()) == 11_901_408_320
    assert sum(p.numel() for p in ex.text_encoder_2.parameters()) == 4_762_310_656
    assert ex.unet.device.type == "meta" and ex.img_size == 1024
    assert set(ex.feature_shapes().values()) == {(3072, 64, 64)}
    with pytest.raises(ValueError, match="holds no weights \\(meta tensors, shapes only\\)"):
        ex(torch.zeros(1, 3, 64, 64))
    assert main(["layers", "--model", "random-flux1-dev", "--format", "json"]) == 0
    import json

    rows = {r["name"]: r["shape"] for r in json.loads(capsys.readouterr().out)}
    assert len(rows) == 19 * 8 + 38 + 2 + 1 and rows["cross_maps"] == [512, 64, 64]
    assert rows["single-block37-out"] == [3072, 64, 64] and rows["dit-out"] == [64, 64, 64]


def test_flux_controlnet_equals_the_stock_controlnet_call(flux, parts, images, tmp_path):
    """An InstantX-style FLUX ControlNet variant: the condition's VAE latent (posterior mean,
    shifted and scaled), packed; the stock ControlNet's double- and single-stream samples added by
    the stock transformer; batched with a plain variant, equal to one call each."""
    from diffusers import FluxControlNetModel

    from csdiff.backbone import ControlNet
    from csdiff.backbone.conditions import canny_condition

    net_folder = script.make_tiny_flux_controlnet(tmp_path / "cn")
    variants = [Variant("plain", PROMPT), Variant("canny", PROMPT, controlnets=[ControlNet(str(net_folder))])]
    layer = "single-block30-out"
    got = DiffusionFeatureExtractor(str(flux), [layer], img_size=64, variants=variants)(images)
    single = DiffusionFeatureExtractor(str(flux), [layer], img_size=64, variants=variants, batch_variants=False)(images)
    assert_close_up_to_rounding(got["canny"][layer], single["canny"][layer])
    assert (got["canny"][layer] - got["plain"][layer]).abs().max() > 1e-3
    ex = DiffusionFeatureExtractor(str(flux), [layer], img_size=64, variants=variants)
    net = FluxControlNetModel.from_pretrained(net_folder)
    vae = parts.vae
    cond = (vae.encode(canny_condition(images, 100, 200) * 2 - 1).latent_dist.mean - 0.1159) * 0.3611
    pack = lambda x: FluxPipeline._pack_latents(x, 2, 16, 8, 8)  # noqa: E731
    emb, pooled, text_ids = stock_pipeline(parts).encode_prompt(PROMPT, None, device=torch.device("cpu"))
    z = ex.encode_images(images)
    noise = torch.randn((1, 16, 8, 8), generator=torch.Generator().manual_seed(0)).expand(2, -1, -1, -1)
    sigma = ex.sigma(ex.timestep)
    x = pack((1 - sigma) * z + sigma * noise)
    common = dict(
        timestep=torch.full((2,), sigma),
        guidance=torch.full((2,), 3.5),
        pooled_projections=pooled.expand(2, -1),
        encoder_hidden_states=emb.expand(2, -1, -1),
        txt_ids=text_ids,
        img_ids=FluxPipeline._prepare_latent_image_ids(2, 4, 4, x.device, x.dtype),
    )
    block, single_block = net(x, controlnet_cond=pack(cond), return_dict=False, **common)
    seen = []
    handle = parts.unet.single_transformer_blocks[30].register_forward_hook(lambda m, a, o: seen.append(o[1]))
    parts.unet(x, controlnet_block_samples=block, controlnet_single_block_samples=single_block, **common)
    handle.remove()
    assert_close_up_to_rounding(got["canny"][layer], grid(seen[0]))
