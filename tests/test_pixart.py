"""PixArt-α/Σ: a diffusion transformer through the same extractor, names, noise and tasks.

Tiny random-weight PixArt folders are written at test time (``tests/data/make_tiny_pixart.py``)
and loaded through the same code as real weights. Every reference here is diffusers' own:
the stock transformer called as PixArt's pipeline calls it, its ``encode_prompt``, the
scheduler's ``add_noise`` and DDIM's ``step``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from diffusers import DDIMScheduler, PixArtAlphaPipeline, PixArtSigmaPipeline
from helpers import assert_close_up_to_rounding, load_script, shapes_images

from csdiff.backbone import ControlNet, DiffusionFeatureExtractor, LoRA, UnknownLayerError, Variant
from csdiff.backbone.listing import list_layers
from csdiff.backbone.loading import BackboneNotAvailableError, load_sd_components
from csdiff.backbone.names import enumerate_activations

script = load_script("make_tiny_pixart")
PROMPT = "a photo of a red circle and a blue square on a striped background"
# Each name's module, written here independently of csdiff's table.
PARTS = {
    "self-q": ".attn1.to_q",
    "self-k": ".attn1.to_k",
    "self-v": ".attn1.to_v",
    "self-out": ".attn1",
    "cross-q": ".attn2.to_q",
    "cross-out": ".attn2",
    "ffn-out": ".ff",
    "out": "",
}


@pytest.fixture(scope="module")
def alpha(tmp_path_factory) -> Path:
    return script.make_tiny_pixart(tmp_path_factory.mktemp("pixart") / "tiny-pixart-alpha")


@pytest.fixture(scope="module")
def sigma(tmp_path_factory) -> Path:
    return script.make_tiny_pixart(tmp_path_factory.mktemp("pixart") / "tiny-pixart-sigma", sigma=True)


@pytest.fixture(scope="module")
def alpha_1024(tmp_path_factory) -> Path:
    """PixArt-α's 1024² model reads resolution and aspect-ratio conditions."""
    return script.make_tiny_pixart(tmp_path_factory.mktemp("pixart") / "tiny-pixart-1024", conditions=True)


@pytest.fixture(scope="module")
def images():
    return shapes_images(2, size=64)


def stock_call(transformer, latent, t, emb, mask, size=None):
    """The transformer called as PixArt's pipeline calls it; the ε half of the learned-variance output."""
    sizes = {"resolution": None, "aspect_ratio": None}
    if size is not None:
        sizes = {
            "resolution": torch.tensor([[size, size]] * latent.shape[0]).float(),
            "aspect_ratio": torch.ones(latent.shape[0], 1),
        }
    out = transformer(
        latent,
        encoder_hidden_states=emb,
        timestep=torch.tensor([t]).expand(latent.shape[0]),
        added_cond_kwargs=sizes,
        encoder_attention_mask=mask,
    ).sample
    return out.chunk(2, dim=1)[0]


def stock_encode(parts, pipeline, prompt, length):
    pipe = pipeline(
        tokenizer=parts.tokenizer,
        text_encoder=parts.text_encoder,
        vae=parts.vae,
        transformer=parts.unet,
        scheduler=parts.scheduler,
    )
    emb, mask, _, _ = pipe.encode_prompt(
        prompt, do_classifier_free_guidance=False, device=torch.device("cpu"), max_sequence_length=length
    )
    return emb, mask


def test_pixart_loads_as_its_family_at_native_size(alpha, sigma):
    a, s = load_sd_components(str(alpha)), load_sd_components(str(sigma))
    # a latent model: DDPM's default clip of the predicted clean sample is off, as PixArt's DPM-Solver has none
    assert not a.scheduler.config.clip_sample and not a.scheduler.config.thresholding
    half = load_sd_components(str(alpha), dtype="float16")  # its VAE's config asks for float32 in float16 runs
    assert half.vae.dtype == torch.float32 and half.unet.dtype == torch.float16
    assert a.family.name == s.family.name == "pixart"
    assert (a.tokenizer.model_max_length, s.tokenizer.model_max_length) == (120, 300)
    ex = DiffusionFeatureExtractor(str(alpha), ["dit-in"])
    assert ex.img_size == 64  # sample_size 8 × VAE 8
    # 28 blocks × 10 names, plus dit-in, dit-after-patch-embed, dit-out
    assert len(enumerate_activations(a.unet)) == 283
    rows = {r.name: r for r in list_layers(a, 64)}
    assert rows["vit-block2-out"].shape == (48, 4, 4)  # 64 px / VAE 8 / patch 2
    assert rows["vit-block0-cross-map"].shape == (120, 4, 4)
    assert "up_cross" not in rows


def test_every_pixart_name_equals_an_independent_hook(alpha):
    parts = load_sd_components(str(alpha))
    model = parts.unet
    torch.manual_seed(0)
    latent = torch.randn(2, 4, 8, 8)
    emb, mask = stock_encode(parts, PixArtAlphaPipeline, PROMPT, 120)
    emb, mask = emb.expand(2, -1, -1), mask.expand(2, -1)
    ex = DiffusionFeatureExtractor(str(alpha), list(enumerate_activations(model)))
    from csdiff.backbone.capture import ActivationCapture

    with ActivationCapture(model, ex.layers, prompt_window=120) as capture:
        ex.family.run(model, latent, 50, emb, ex.family.added_conditions(mask, 64, 2, torch.float32, "cpu"), {})
    seen, handles = {}, []
    for path, module in model.named_modules():
        handles.append(module.register_forward_hook(lambda m, a, o, p=path: seen.__setitem__(p, o)))
    stock_call(model, latent, 50, emb, mask)
    for h in handles:
        h.remove()

    def grid(tokens):  # (B, 16, C) on the 4×4 patch grid
        return tokens.transpose(1, 2).reshape(2, -1, 4, 4)

    checked = 0
    for i in range(28):
        block = f"transformer_blocks.{i}"
        for suffix, sub in PARTS.items():
            torch.testing.assert_close(capture.features[f"vit-block{i}-{suffix}"], grid(seen[block + sub]))
            checked += 1
        for kind, attn, bias in (("self", "attn1", None), ("cross", "attn2", (1 - mask.float()) * -10000.0)):
            q, k = seen[f"{block}.{attn}.to_q"], seen[f"{block}.{attn}.to_k"]
            heads = model.get_submodule(f"{block}.{attn}").heads
            qh, kh = (x.view(2, x.shape[1], heads, -1).transpose(1, 2) for x in (q, k))
            scores = qh @ kh.transpose(-1, -2) * qh.shape[-1] ** -0.5
            if bias is not None:
                scores = scores + bias[:, None, None, :]
            ref = grid(torch.softmax(scores, dim=-1).mean(1))
            torch.testing.assert_close(capture.features[f"vit-block{i}-{kind}-map"], ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(capture.features["dit-after-patch-embed"], grid(seen["pos_embed"]))
    torch.testing.assert_close(capture.features["dit-out"], grid(seen["proj_out"]))
    assert checked == 28 * 8


def test_pixart_text_conditioning_equals_the_stock_pipelines(alpha, sigma):
    long = " ".join([PROMPT] * 12)  # well over 120 tokens: truncated, as the pipeline truncates
    for folder, pipeline, length in ((alpha, PixArtAlphaPipeline, 120), (sigma, PixArtSigmaPipeline, 300)):
        ex = DiffusionFeatureExtractor(str(folder), ["dit-in"])
        parts = load_sd_components(str(folder))
        for prompt in (PROMPT, "", long):
            if len(parts.tokenizer(prompt).input_ids) > length:
                with pytest.warns(UserWarning, match=f"reads its first {length}"):
                    emb, mask = ex._prompt(prompt, ())
            else:
                emb, mask = ex._prompt(prompt, ())
            ref_emb, ref_mask = stock_encode(parts, pipeline, prompt, length)
            assert emb.shape == (1, length, 24)
            torch.testing.assert_close(emb, ref_emb)
            assert torch.equal(mask.cpu(), ref_mask.cpu())


def test_pixart_noise_at_exactly_t_and_its_ddim_chain(alpha, images):
    ex = DiffusionFeatureExtractor(
        str(alpha),
        ["dit-in", "vit-block1-out"],
        timestep=50,
        variants=[Variant("plain", PROMPT), Variant("chain", PROMPT, seed=4, denoise_from=53)],
    )
    got = ex(images)
    z = ex.encode_images(images)
    noise = [
        torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(s)).expand(2, -1, -1, -1) for s in (0, 4)
    ]
    ac = ex.scheduler.alphas_cumprod
    torch.testing.assert_close(got["plain"]["dit-in"], ac[50].sqrt() * z + (1 - ac[50]).sqrt() * noise[0])
    # the chain: the stock transformer's ε, DDIM's own step, from exactly t = 53 down to 50
    parts = load_sd_components(str(alpha))
    emb, mask = stock_encode(parts, PixArtAlphaPipeline, PROMPT, 120)
    ddim = DDIMScheduler.from_config(ex.scheduler.config, set_alpha_to_one=False)
    ddim.set_timesteps(1000)
    x = ddim.add_noise(z, noise[1], torch.tensor([53]))
    for t in (53, 52, 51):
        eps = stock_call(parts.unet, x, t, emb.expand(2, -1, -1), mask.expand(2, -1))
        x = ddim.step(eps, t, x, eta=0.0).prev_sample
    assert_close_up_to_rounding(got["chain"]["dit-in"], x)
    assert (got["chain"]["vit-block1-out"] - got["plain"]["vit-block1-out"]).abs().max() > 1e-3


def test_pixart_features_equal_the_stock_call_with_size_conditions(alpha_1024, images):
    """PixArt-α at 1024² reads resolution and aspect-ratio conditions: the image's own, square."""
    ex = DiffusionFeatureExtractor(str(alpha_1024), ["vit-block2-out"], variants=[Variant("plain", PROMPT, seed=2)])
    got = ex(images)["plain"]["vit-block2-out"]
    parts = load_sd_components(str(alpha_1024))
    assert parts.unet.use_additional_conditions
    emb, mask = stock_encode(parts, PixArtAlphaPipeline, PROMPT, 120)
    z = ex.encode_images(images)
    noise = torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(2)).expand(2, -1, -1, -1)
    noisy = ex.scheduler.add_noise(z, noise, torch.tensor([ex.timestep]))
    seen = []
    handle = parts.unet.transformer_blocks[2].register_forward_hook(lambda m, a, o: seen.append(o))
    for size in (64, 128):  # the image's own size, and another: the conditions are read
        stock_call(parts.unet, noisy, ex.timestep, emb.expand(2, -1, -1), mask.expand(2, -1), size=size)
    handle.remove()
    at_64, at_128 = (x.transpose(1, 2).reshape(2, -1, 4, 4) for x in seen)
    assert_close_up_to_rounding(got, at_64)
    assert (got - at_128).abs().max() > 1e-3


def test_pixart_batched_variants_equal_one_call_each(alpha, images):
    variants = [
        Variant("plain", PROMPT),
        Variant("short", "a photo", seed=1),
        Variant("chain", "a photo", denoise_from=60),
    ]
    layers = ["vit-block0-self-k", "vit-block2-out", "vit-block1-cross-map"]
    batched = DiffusionFeatureExtractor(str(alpha), layers, variants=variants)(images)
    single = DiffusionFeatureExtractor(str(alpha), layers, variants=variants, batch_variants=False)(images)
    for v in batched:
        for layer in layers:
            assert_close_up_to_rounding(batched[v][layer], single[v][layer])


def test_pixart_refuses_what_it_does_not_run_yet(alpha, tmp_path):
    for variant, what in (
        (Variant("c", controlnets=[ControlNet("tiny-controlnet-canny")]), "ControlNet"),
        (Variant("w", weights="tiny"), "own weights"),
    ):
        with pytest.raises(ValueError, match=f"uses {what}, which csdiff does not run on pixart"):
            DiffusionFeatureExtractor(str(alpha), ["dit-in"], variants=[variant])
    with pytest.raises(ValueError, match="LoRA file not found"):  # LoRA runs on PixArt (test_lora_dit.py)
        DiffusionFeatureExtractor(str(alpha), ["dit-in"], variants=[Variant("l", loras=[LoRA(str(tmp_path / "x"))])])
    with pytest.raises(UnknownLayerError, match="diffusion transformer.*vit-block"):
        DiffusionFeatureExtractor(str(alpha), ["up_cross"])
    with pytest.raises(
        UnknownLayerError, match="'legacy' is a named layer set of other model families.*pixart's: practical"
    ):
        DiffusionFeatureExtractor(str(alpha), ["legacy"])
    with pytest.raises(UnknownLayerError, match="did you mean 'vit-block1-out'"):
        DiffusionFeatureExtractor(str(alpha), ["vit-blok1-out"])
    with pytest.raises(ValueError, match="multiple of 16 .*patches of 2"):
        DiffusionFeatureExtractor(str(alpha), ["dit-in"], img_size=72)
    with pytest.raises(BackboneNotAvailableError, match="transformer override"):
        load_sd_components(str(alpha), unet=str(alpha / "transformer"))
    single = tmp_path / "pixart.safetensors"
    single.write_bytes(b"")
    with pytest.raises(
        BackboneNotAvailableError, match="single-file checkpoints are read for SD 1.x, 2.x and SDXL only"
    ):
        load_sd_components(str(single), base_model=str(alpha))


def test_transformers_csdiff_cannot_place_are_refused_by_class(alpha, tmp_path):
    other = shutil.copytree(alpha, tmp_path / "hunyuan")
    config = json.loads((other / "transformer" / "config.json").read_text())
    (other / "transformer" / "config.json").write_text(json.dumps({**config, "_class_name": "HunyuanDiT2DModel"}))
    with pytest.raises(BackboneNotAvailableError, match="class HunyuanDiT2DModel; csdiff supports .*PixArt"):
        load_sd_components(str(other))
    # PixArt's hub folders name the generic class; diffusers maps it by its adaLN-single norm, so does csdiff
    generic = shutil.copytree(alpha, tmp_path / "generic")
    (generic / "transformer" / "config.json").write_text(json.dumps({**config, "_class_name": "Transformer2DModel"}))
    assert load_sd_components(str(generic)).family.name == "pixart"
    unnamed = shutil.copytree(alpha, tmp_path / "unnamed")
    (unnamed / "model_index.json").unlink()
    with pytest.raises(BackboneNotAvailableError, match="must name PixArtAlphaPipeline or PixArtSigmaPipeline"):
        load_sd_components(str(unnamed))


def test_layers_verb_lists_pixart_names_and_shapes(alpha, capsys):
    from csdiff.cli import main

    assert main(["layers", "--model", str(alpha), "--format", "json"]) == 0
    rows = {r["name"]: r["shape"] for r in json.loads(capsys.readouterr().out)}
    assert len(rows) == 28 * 10 + 3 + 1 and "up_cross" not in rows and rows["cross_maps"] == [120, 4, 4]
    assert rows["vit-block27-out"] == [48, 4, 4] and rows["vit-block5-cross-map"] == [120, 4, 4]
    assert rows["dit-in"] == [4, 8, 8]


def test_random_pixart_alpha_has_pixart_alphas_architecture():
    """The published sizes: PixArt-α's transformer 610.9 M parameters (28 blocks, 1152 wide, 16
    heads), T5-XXL's width and vocabulary (its 24 layers cut to 1, see random_models)."""
    parts = load_sd_components("random-pixart-alpha", dtype="float16")
    assert sum(p.numel() for p in parts.unet.parameters()) == 610_856_096
    assert {p.dtype for p in parts.unet.parameters()} == {torch.float16}
    config = parts.text_encoder.config
    assert (config.d_model, config.num_heads, config.d_ff, config.vocab_size, config.num_layers) == (
        4096,
        64,
        10240,
        32128,
        1,
    )
    assert parts.tokenizer.model_max_length == 120
    ex_shapes = {r.name: r.shape for r in list_layers(parts, 512) if r.name.endswith("-out")}
    assert ex_shapes["vit-block27-out"] == (1152, 32, 32) and ex_shapes["dit-out"] == (32, 32, 32)


def test_segmentation_config_runs_with_random_pixart_alpha(tmp_path, two_threads, free_after):
    """The PixArt segmentation config for 2 steps and a validation through the CLI at PixArt-α's
    real widths (64² images, float32; the chain cut to one guided step, as for random-sd15)."""
    import yaml
    from test_configs import _release, _run, _substitute_tiny, at_real_size

    config = yaml.safe_load(
        (Path(__file__).resolve().parents[1] / "configs" / "seg_ade20k_pixart_sigma_public.yaml").read_text()
    )
    config = at_real_size(_substitute_tiny(config, tmp_path, "random-pixart-alpha"))
    cli, score = _run(config, tmp_path / "pixart.yaml")
    assert score in cli.trainer.callback_metrics
    assert cli.model.gate.in_channels == (1152,) * 4
    assert not any(p.requires_grad for p in cli.model.extractor.parameters())
    _release(cli)


def test_lora_training_refuses_pixart(alpha):
    from csdiff.tasks import LoRATrainingTask

    with pytest.raises(ValueError, match="pixart model, which csdiff cannot train adapters for"):
        LoRATrainingTask(backbone={"model": str(alpha)})


def test_pixart_reconstruction_equals_the_stock_pipeline_and_assess_runs(alpha, images, tmp_path, capsys):
    """`csdiff assess`'s img2img on PixArt: at strength 1 (the whole DDIM schedule) the
    no-technique reconstruction is PixArt's own pipeline started from the same noisy latent
    (DDIM, guidance 1, empty prompt, learned variance dropped by the pipeline)."""
    import cv2
    import yaml

    from csdiff.backbone.img2img import NO_TECHNIQUE, reconstruct
    from csdiff.cli import main

    ex = DiffusionFeatureExtractor(str(alpha), ["vit-block3-out"], vae_decoder=True)
    ours = reconstruct(ex, images[:1], NO_TECHNIQUE, strength=1.0, steps=5, seed=3)
    ddim = DDIMScheduler.from_config(ex.scheduler.config)
    pipe = PixArtAlphaPipeline(
        tokenizer=ex.tokenizer, text_encoder=ex.text_encoder, vae=ex.vae, transformer=ex.unet, scheduler=ddim
    )
    pipe.set_progress_bar_config(disable=True)
    ddim.set_timesteps(5)
    z = ex.encode_images(images[:1], NO_TECHNIQUE)
    noise = torch.randn(z.shape, generator=torch.Generator().manual_seed(3))
    start = ddim.add_noise(z, noise, ddim.timesteps[:1])
    stock = pipe(
        "",
        latents=start,
        num_inference_steps=5,
        guidance_scale=1.0,
        height=64,
        width=64,
        use_resolution_binning=False,
        output_type="pt",
    ).images
    assert_close_up_to_rounding(ours * 0.5 + 0.5, stock)

    model = {"num_classes": 4, "backbone": {"model": str(alpha)}, "variants": [{"name": "long", "prompt": PROMPT}]}
    config = tmp_path / "assess.yaml"
    config.write_text(yaml.safe_dump({"model": {"class_path": "csdiff.tasks.SegmentationTask", "init_args": model}}))
    (tmp_path / "images").mkdir()
    rgb = ((images[0].permute(1, 2, 0).numpy() + 1) * 127.5).round().clip(0, 255).astype("uint8")
    cv2.imwrite(str(tmp_path / "images" / "a.png"), rgb[..., ::-1])
    args = ["assess", "--config", str(config), "--images", str(tmp_path / "images"), "--steps", "4"]
    assert main([*args, "--output", str(tmp_path / "out"), "--layers", "[vit-block20-out]"]) == 0
    rows = json.loads((tmp_path / "out" / "gate_scores.json").read_text())["rows"]
    assert {r["variant"] for r in rows} == {"no technique", "long"}
    assert "long: " in capsys.readouterr().out
