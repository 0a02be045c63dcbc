"""Stable Diffusion 3: an MMDiT with flow matching through the same extractor, names and tasks.

A tiny random-weight SD3 folder (SD3-medium's 24 blocks, three text encoders, a 16-channel VAE
with a shift factor, flow matching with shift 3) is written at test time
(``tests/data/make_tiny_sd3.py``) and loaded through the same code as real weights. The
references are diffusers' own: the stock transformer called as SD3's pipeline calls it, its
``encode_prompt``, the scheduler's ``scale_noise`` and ``step``, and its img2img pipeline.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Img2ImgPipeline, StableDiffusion3Pipeline
from helpers import assert_close_up_to_rounding, load_script, shapes_images

from csdiff.backbone import ControlNet, DiffusionFeatureExtractor, LoRA, UnknownLayerError, Variant
from csdiff.backbone.capture import ActivationCapture
from csdiff.backbone.listing import list_layers
from csdiff.backbone.loading import BackboneNotAvailableError, load_sd_components
from csdiff.backbone.names import enumerate_activations

PROMPT = "a photo of a red circle and a blue square on a striped background"
# Each name's module and which element of its output is the image, written here independently.
PARTS = {
    "self-q": (".attn.to_q", None),
    "self-k": (".attn.to_k", None),
    "self-v": (".attn.to_v", None),
    "self-out": (".attn", 0),
    "ffn-out": (".ff", None),
    "out": ("", 1),
}


@pytest.fixture(scope="module")
def sd3(tmp_path_factory) -> Path:
    return load_script("make_tiny_sd3").make_tiny_sd3(tmp_path_factory.mktemp("sd3") / "tiny-sd3")


@pytest.fixture(scope="module")
def parts(sd3):
    return load_sd_components(str(sd3))


@pytest.fixture(scope="module")
def images():
    return shapes_images(2, size=64)


def stock_pipeline(parts, cls=StableDiffusion3Pipeline, scheduler=None):
    pipe = cls(
        transformer=parts.unet,
        scheduler=scheduler or parts.scheduler,
        vae=parts.vae,
        text_encoder=parts.text_encoder,
        tokenizer=parts.tokenizer,
        text_encoder_2=parts.text_encoder_2,
        tokenizer_2=parts.tokenizer_2,
        text_encoder_3=parts.text_encoder_3,
        tokenizer_3=parts.tokenizer_3,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def stock_encode(parts, prompt):
    emb, _, pooled, _ = stock_pipeline(parts).encode_prompt(
        prompt, None, None, do_classifier_free_guidance=False, device=torch.device("cpu")
    )
    return emb, pooled


def stock_call(transformer, latent, timestep, emb, pooled):
    """The transformer called as SD3's pipeline calls it: the scheduler's timestep value (σ·1000)."""
    b = latent.shape[0]
    return transformer(
        hidden_states=latent,
        timestep=torch.tensor([timestep]).expand(b),
        encoder_hidden_states=emb.expand(b, -1, -1),
        pooled_projections=pooled.expand(b, -1),
    ).sample


def test_sd3_loads_as_its_family_with_three_text_encoders(parts):
    assert parts.family.name == "sd3" and parts.family.noise == "flow"
    assert parts.tokenizer_3.model_max_length == 256 and parts.text_encoder_3 is not None
    assert len(enumerate_activations(parts.unet)) == 24 * 8 + 3
    rows = {r.name: r.shape for r in list_layers(parts, 64)}
    assert rows["vit-block23-out"] == (32, 4, 4) and rows["dit-in"] == (16, 8, 8)
    assert rows["vit-block0-self-map"] == (16, 4, 4) and rows["vit-block0-cross-map"] == (77 + 256, 4, 4)
    assert "up_cross" not in rows and list(rows)[-1] == "cross_maps"


def test_every_sd3_name_equals_an_independent_hook(parts):
    model = parts.unet
    torch.manual_seed(0)
    latent = torch.randn(2, 16, 8, 8)
    emb, pooled = stock_encode(parts, PROMPT)
    names = list(enumerate_activations(model))
    with ActivationCapture(model, names) as capture:
        stock_call(model, latent, 500.0, emb, pooled)
    seen, handles = {}, []
    for path, module in model.named_modules():
        handles.append(module.register_forward_hook(lambda m, a, o, p=path: seen.__setitem__(p, o)))
    stock_call(model, latent, 500.0, emb, pooled)
    for h in handles:
        h.remove()

    def grid(tokens):
        return tokens.transpose(1, 2).reshape(2, -1, 4, 4)

    for i in range(24):
        for suffix, (sub, index) in PARTS.items():
            out = seen[f"transformer_blocks.{i}{sub}"]
            torch.testing.assert_close(
                capture.features[f"vit-block{i}-{suffix}"], grid(out if index is None else out[index])
            )
    torch.testing.assert_close(capture.features["dit-after-patch-embed"], grid(seen["pos_embed"]))
    torch.testing.assert_close(capture.features["dit-out"], grid(seen["proj_out"]))
    assert capture.features["dit-in"].shape == latent.shape


def test_sd3_text_conditioning_equals_the_stock_pipelines(sd3, parts):
    ex = DiffusionFeatureExtractor(str(sd3), ["dit-in"])
    long = " ".join([PROMPT] * 8)  # over 77 CLIP tokens: cut, with a warning, as the pipeline cuts it
    for prompt in (PROMPT, "", long):
        if prompt is long:
            with pytest.warns(UserWarning, match="CLIP tokens: the model reads its first 77"):
                emb, pooled = ex._prompt(prompt, ())
        else:
            emb, pooled = ex._prompt(prompt, ())
        ref_emb, ref_pooled = stock_encode(parts, prompt)
        assert emb.shape == (1, 77 + 256, 32) and pooled.shape == (1, 48)
        torch.testing.assert_close(emb, ref_emb)
        torch.testing.assert_close(pooled, ref_pooled)


def test_sd3_noise_at_exactly_sigma_and_its_euler_chain(sd3, parts, images):
    ex = DiffusionFeatureExtractor(
        str(sd3),
        ["dit-in", "vit-block10-out"],
        timestep=50,
        variants=[Variant("plain", PROMPT), Variant("chain", PROMPT, seed=4, denoise_from=53)],
    )
    s = 51 / 1000  # σ(t) = shift·s / (1 + (shift − 1)·s), s = (t + 1) / 1000, shift 3
    assert ex.sigma(50) == pytest.approx(3 * s / (1 + 2 * s), rel=1e-6)
    assert ex.sigma(999) == 1.0 and ex.model_timestep(50) == pytest.approx(1000 * ex.sigma(50), rel=1e-6)
    got = ex(images)
    z = ex.encode_images(images)
    vae = parts.vae
    posterior = vae.encode(ex.resize(images)).latent_dist.mean
    torch.testing.assert_close(z, (posterior - vae.config.shift_factor) * vae.config.scaling_factor)
    noise = [
        torch.randn((1, 16, 8, 8), generator=torch.Generator().manual_seed(k)).expand(2, -1, -1, -1) for k in (0, 4)
    ]
    sigma = ex.sigma(50)
    torch.testing.assert_close(got["plain"]["dit-in"], (1 - sigma) * z + sigma * noise[0])
    # the chain: the stock transformer's flow and the scheduler's own Euler step, from t = 53 to 50
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(parts.scheduler.config)
    timesteps = scheduler.timesteps
    emb, pooled = stock_encode(parts, PROMPT)
    x = scheduler.scale_noise(z, timesteps[999 - 53 : 999 - 52], noise[1])
    for t in (53, 52, 51):
        v = stock_call(parts.unet, x, float(timesteps[999 - t]), emb, pooled)
        x = scheduler.step(v, timesteps[999 - t], x).prev_sample
    assert_close_up_to_rounding(got["chain"]["dit-in"], x)
    assert (got["chain"]["vit-block10-out"] - got["plain"]["vit-block10-out"]).abs().max() > 1e-3


def test_sd3_batched_variants_equal_one_call_each(sd3, images):
    variants = [
        Variant("plain", PROMPT),
        Variant("short", "a photo", seed=1),
        Variant("chain", "a photo", denoise_from=60),
    ]
    layers = ["vit-block0-self-k", "vit-block23-out", "vit-block12-self-out"]
    batched = DiffusionFeatureExtractor(str(sd3), layers, variants=variants)(images)
    single = DiffusionFeatureExtractor(str(sd3), layers, variants=variants, batch_variants=False)(images)
    for v in batched:
        for layer in layers:
            assert_close_up_to_rounding(batched[v][layer], single[v][layer])


def test_sd3_reconstruction_equals_the_stock_img2img_pipeline(sd3, parts, images):
    """`csdiff assess`'s img2img on SD3 is diffusers' SD3 img2img pipeline (flow Euler steps,
    guidance 1, empty prompt) from the same latent and noise."""
    from csdiff.backbone.img2img import NO_TECHNIQUE, reconstruct

    ex = DiffusionFeatureExtractor(str(sd3), ["dit-in"], vae_decoder=True)
    ours = reconstruct(ex, images[:1], NO_TECHNIQUE, strength=0.8, steps=5, seed=3)
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(parts.scheduler.config)
    pipe = stock_pipeline(
        load_sd_components(str(sd3), load_vae_decoder=True), StableDiffusion3Img2ImgPipeline, scheduler
    )
    stock = pipe(
        "",
        image=ex.encode_images(images[:1], NO_TECHNIQUE),  # a 16-channel image is taken as the latent
        strength=0.8,
        num_inference_steps=5,
        guidance_scale=1.0,
        generator=torch.Generator().manual_seed(3),
        output_type="pt",
    ).images
    assert_close_up_to_rounding(ours * 0.5 + 0.5, stock)


def test_sd3_refuses_what_it_does_not_run_yet(sd3, tmp_path):
    with pytest.raises(ValueError, match="LoRA file not found"):  # LoRA runs on SD3 (test_lora_dit.py)
        DiffusionFeatureExtractor(
            str(sd3), ["dit-in"], variants=[Variant("l", loras=[LoRA(str(tmp_path / "x.safetensors"))])]
        )
    with pytest.raises(UnknownLayerError, match="diffusion transformer"):
        DiffusionFeatureExtractor(str(sd3), ["up_cross"])
    with pytest.raises(ValueError, match="multiple of 16"):
        DiffusionFeatureExtractor(str(sd3), ["dit-in"], img_size=72)
    no_t5 = shutil.copytree(sd3, tmp_path / "no-t5")
    shutil.rmtree(no_t5 / "text_encoder_3")
    with pytest.raises(BackboneNotAvailableError, match="needs all three text encoders.*missing text_encoder_3/"):
        load_sd_components(str(no_t5))
    other = shutil.copytree(sd3, tmp_path / "other")
    config = json.loads((other / "transformer" / "config.json").read_text())
    (other / "transformer" / "config.json").write_text(
        json.dumps({**config, "_class_name": "CogView4Transformer2DModel"})
    )
    with pytest.raises(BackboneNotAvailableError, match="class CogView4Transformer2DModel; csdiff supports .*SD3"):
        load_sd_components(str(other))


def test_layers_verb_lists_sd3_names_and_shapes(sd3, capsys):
    from csdiff.cli import main

    assert main(["layers", "--model", str(sd3), "--format", "json"]) == 0
    rows = {r["name"]: r["shape"] for r in json.loads(capsys.readouterr().out)}
    assert len(rows) == 24 * 8 + 3 + 1 and rows["vit-block23-out"] == [32, 4, 4]  # + cross_maps


def test_segmentation_config_runs_with_random_sd3_medium(tmp_path, two_threads, free_after):
    """SD3-medium's real architecture (transformer 2,028,328,000 parameters, 24 blocks 1536 wide):
    the SD3 segmentation config for 2 steps and a validation through the CLI at 64² in float32,
    the chain cut to one guided Euler step, and 2 of its 4 layers (the first and the last): its
    gate at 4 × 1536 channels is 533 M parameters, 8.5 GB with AdamW in float32, beside 10 GB of
    frozen float32 model, more than a CI machine holds (bfloat16 is minutes per call on CPUs)."""
    import yaml
    from test_configs import _release, _run, _substitute_tiny, at_real_size

    config = yaml.safe_load(
        (Path(__file__).resolve().parents[1] / "configs" / "seg_ade20k_sd3_public.yaml").read_text()
    )
    config = at_real_size(_substitute_tiny(config, tmp_path, "random-sd3-medium"))
    model = config["model"]["init_args"]
    assert model["layers"] == ["practical"]
    model["layers"] = ["vit-block6-out", "vit-block15-out"]
    cli, score = _run(config, tmp_path / "sd3.yaml")
    assert score in cli.trainer.callback_metrics
    extractor = cli.model.extractor
    assert sum(p.numel() for p in extractor.unet.parameters()) == 2_028_328_000
    assert extractor.text_encoder_2.config.hidden_size == 1280 and cli.model.gate.in_channels == (1536,) * 2
    assert not any(p.requires_grad for p in extractor.parameters())
    _release(cli)


def test_compile_reaches_the_transformer_blocks_and_changes_nothing(sd3, images):
    """`compile` compiles each MMDiT block except one with a hook inside (debug backend: fast)."""
    from csdiff.backbone.acceleration import CompiledForward

    layers = ["vit-block20-out", "vit-block3-self-k"]
    eager = DiffusionFeatureExtractor(str(sd3), layers)(images)
    ex = DiffusionFeatureExtractor(str(sd3), layers, compile="aot_eager")
    compiled = ex(images)
    blocks = [b for b in ex.unet.transformer_blocks if isinstance(b.forward, CompiledForward)]
    assert len(blocks) == 23 and not isinstance(ex.unet.transformer_blocks[3].forward, CompiledForward)
    for layer in layers:
        assert_close_up_to_rounding(compiled["plain"][layer], eager["plain"][layer])


@pytest.mark.parametrize("instantx", [False, True], ids=["shifted", "instantx"])
def test_sd3_controlnet_equals_the_stock_controlnet_call(sd3, parts, images, tmp_path, instantx):
    """An SD3 ControlNet variant: the condition's VAE latent (posterior mean; shifted unless the
    ControlNet is InstantX-style, whose pooled projection is zero), the stock ControlNet's block
    samples added by the stock transformer; batched with a plain variant, equal to one call each."""
    from diffusers import SD3ControlNetModel

    from csdiff.backbone.conditions import canny_condition

    net_folder = load_script("make_tiny_sd3").make_tiny_sd3_controlnet(tmp_path / "cn", instantx=instantx)
    variants = [Variant("plain", PROMPT), Variant("canny", PROMPT, controlnets=[ControlNet(str(net_folder))])]
    layer = "vit-block5-out"
    got = DiffusionFeatureExtractor(str(sd3), [layer], variants=variants)(images)
    single = DiffusionFeatureExtractor(str(sd3), [layer], variants=variants, batch_variants=False)(images)
    assert_close_up_to_rounding(got["canny"][layer], single["canny"][layer])
    assert (got["canny"][layer] - got["plain"][layer]).abs().max() > 1e-3
    # the reference, from diffusers' modules only
    ex = DiffusionFeatureExtractor(str(sd3), [layer], variants=variants)
    net = SD3ControlNetModel.from_pretrained(net_folder)
    vae = parts.vae
    cond = vae.encode(canny_condition(images, 100, 200) * 2 - 1).latent_dist.mean
    cond = (cond - (0.0 if instantx else vae.config.shift_factor)) * vae.config.scaling_factor
    emb, pooled = stock_encode(parts, PROMPT)
    z = ex.encode_images(images)
    noise = torch.randn((1, 16, 8, 8), generator=torch.Generator().manual_seed(0)).expand(2, -1, -1, -1)
    sigma, t = ex.sigma(ex.timestep), ex.model_timestep(ex.timestep)
    x = (1 - sigma) * z + sigma * noise
    (samples,) = net(
        x,
        controlnet_cond=cond,
        encoder_hidden_states=emb.expand(2, -1, -1),
        pooled_projections=(torch.zeros_like(pooled) if instantx else pooled).expand(2, -1),
        timestep=torch.tensor([t]).expand(2),
        return_dict=False,
    )
    seen = []
    handle = parts.unet.transformer_blocks[5].register_forward_hook(lambda m, a, o: seen.append(o[1]))
    parts.unet(
        hidden_states=x,
        timestep=torch.tensor([t]).expand(2),
        encoder_hidden_states=emb.expand(2, -1, -1),
        pooled_projections=pooled.expand(2, -1),
        block_controlnet_hidden_states=samples,
    )
    handle.remove()
    assert_close_up_to_rounding(got["canny"][layer], seen[0].transpose(1, 2).reshape(2, -1, 4, 4))
    assert all(not p.requires_grad for p in ex.parameters())
    # a provided condition (the same canny map, passed in) takes the same path through the VAE
    provided = [Variant("given", PROMPT, controlnets=[ControlNet(str(net_folder), condition="provided")])]
    given = DiffusionFeatureExtractor(str(sd3), [layer], variants=provided)(
        images, conditions={"given": canny_condition(images, 100, 200)}
    )
    assert_close_up_to_rounding(given["given"][layer], got["canny"][layer])


def test_a_unet_controlnet_on_sd3_is_refused(sd3):
    with pytest.raises(BackboneNotAvailableError, match="is a ControlNetModel, and the backbone .* is a sd3 model"):
        DiffusionFeatureExtractor(
            str(sd3), ["dit-in"], variants=[Variant("c", controlnets=[ControlNet("tiny-controlnet-canny")])]
        )
