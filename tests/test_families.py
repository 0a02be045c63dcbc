"""SD 2.x- and SDXL-shaped models, fine-tuned UNet overrides, and architectures csdiff does not support.

Each family is a tiny random-weight folder written at test time and loaded through the same
code as real weights: SD 2.x (linear projections, one head size per level, a GELU text
encoder, a v-predicting scheduler) and SDXL (three levels, the first without attention,
depth growing by level, two text encoders with a pooled embedding, time ids, an upcast VAE).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from diffusers import DDIMScheduler, UNet2DConditionModel
from helpers import assert_close_up_to_rounding, load_script, shapes_images, stock_img2img
from test_backbone import assert_every_name_equals_an_independent_hook

from csdiff.backbone import ControlNet, DiffusionFeatureExtractor, LoRA, Variant, enumerate_activations
from csdiff.backbone.extractor import describe_differences
from csdiff.backbone.loading import BackboneNotAvailableError, load_sd_components
from csdiff.backbone.random_models import write_random_lora
from csdiff.backbone.tiny import TINY_SD_DIR

sd2_script = load_script("make_tiny_sd2")
sdxl_script = load_script("make_tiny_sdxl")
LAYERS = ["up-level1-upsampler-out", "up-level2-repeat1-vit-block0-self-q"]


@pytest.fixture(scope="module")
def sd2(tmp_path_factory) -> tuple[Path, Path]:
    work = tmp_path_factory.mktemp("sd2")
    folder = sd2_script.make_tiny_sd2(work / "tiny-sd2")
    return folder, sd2_script.make_tiny_controlnet(folder, work / "tiny-sd2-controlnet")


@pytest.fixture(scope="module")
def images():
    return shapes_images(2, size=64)


def test_sd2_loads_with_its_own_architecture_and_native_size(sd2):
    folder, _ = sd2
    parts = load_sd_components(str(folder))
    assert parts.unet.config.use_linear_projection and list(parts.unet.config.attention_head_dim) == [2, 4, 8, 8]
    assert parts.scheduler.config.prediction_type == "v_prediction"
    assert parts.text_encoder.config.hidden_act == "gelu"
    assert len(enumerate_activations(parts.unet)) == 197  # SD 1.x and 2.x share one topology
    assert DiffusionFeatureExtractor(str(folder), ["unet-in"]).img_size == 64  # native: sample_size 8 × VAE 8


def test_every_sd2_name_equals_an_independent_hook(sd2):
    assert_every_name_equals_an_independent_hook(load_sd_components(str(sd2[0])))


def test_sd2_noise_at_exactly_t_and_its_v_chain(sd2, images):
    folder, _ = sd2
    ex = DiffusionFeatureExtractor(
        str(folder),
        ["unet-in"],
        img_size=64,
        timestep=50,
        variants=[Variant("plain", "a photo"), Variant("chain", "a photo", denoise_from=53)],
    )
    got = ex(images)
    z = ex.encode_images(images)
    noise = torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(0)).expand(2, -1, -1, -1)
    ac = ex.scheduler.alphas_cumprod[50]
    torch.testing.assert_close(got["plain"]["unet-in"], ac.sqrt() * z + (1 - ac).sqrt() * noise, atol=1e-5, rtol=1e-5)
    ddim = DDIMScheduler.from_config(ex.scheduler.config, set_alpha_to_one=False)
    ddim.set_timesteps(1000)
    torch.manual_seed(5)
    x, v = torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 8)
    torch.testing.assert_close(ex.ddim_step(x, v, 53), ddim.step(v, 53, x, eta=0.0).prev_sample, atol=1e-5, rtol=1e-5)
    assert (got["chain"]["unet-in"] - got["plain"]["unet-in"]).abs().max() > 1e-3


def test_sd2_controlnet_and_lora_change_features(sd2, images, tmp_path):
    folder, controlnet = sd2
    lora = write_random_lora(tmp_path / "l.safetensors", load_sd_components(str(folder)).unet)
    variants = [
        Variant("plain", "a photo"),
        Variant("canny", "a photo", controlnets=[ControlNet(str(controlnet))]),
        Variant("lora", "a photo", loras=[LoRA(str(lora))]),
    ]
    f = DiffusionFeatureExtractor(str(folder), LAYERS, img_size=64, variants=variants)(images)
    for name in ("canny", "lora"):
        assert (f[name]["up-level1-upsampler-out"] - f["plain"]["up-level1-upsampler-out"]).abs().max() > 1e-4, name


def test_segmentation_fit_on_sd2_through_the_cli(sd2, tmp_path):
    """The SD 2.1 segmentation config on the tiny SD 2.x model."""
    from test_configs import _run, _substitute_tiny

    folder, controlnet = sd2
    config = yaml.safe_load(
        (Path(__file__).resolve().parents[1] / "configs" / "seg_ade20k_sd21_public.yaml").read_text()
    )
    lora = lambda path, seed: str(path)  # noqa: E731  (the public config has no LoRA)
    cli, score = _run(_substitute_tiny(config, tmp_path, str(folder), str(controlnet), lora), tmp_path / "sd2.yaml")
    assert score in cli.trainer.callback_metrics


# --- fine-tuned UNets -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tuned(tmp_path_factory) -> Path:
    """A copy of tiny whose UNet was 'fine-tuned' (perturbed) and saved as its own folder too."""
    work = tmp_path_factory.mktemp("tuned")
    whole = work / "tuned-model"
    shutil.copytree(TINY_SD_DIR, whole)
    unet = UNet2DConditionModel.from_pretrained(whole, subfolder="unet")
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.01)
    unet.save_pretrained(whole / "unet")
    unet.save_pretrained(work / "tuned-unet")
    return work


def test_unet_override_gives_the_fine_tuned_features_and_is_recorded(tuned, images):
    base = DiffusionFeatureExtractor("tiny", LAYERS, img_size=64)
    override = DiffusionFeatureExtractor("tiny", LAYERS, img_size=64, unet=str(tuned / "tuned-unet"))
    whole = DiffusionFeatureExtractor(str(tuned / "tuned-model"), LAYERS, img_size=64)
    a, b, c = (ex(images)["plain"]["up-level1-upsampler-out"] for ex in (base, override, whole))
    assert (a - b).abs().max() > 1e-4
    torch.testing.assert_close(b, c)
    assert override.spec.unet == str(tuned / "tuned-unet") and override.spec.unet_weights_id
    (line,) = describe_differences(base.describe(), override.describe())
    assert line.startswith("unet weights:")


def test_unet_override_of_another_architecture_is_refused(sd2):
    with pytest.raises(BackboneNotAvailableError, match="block_out_channels|cross_attention_dim|attention_head_dim"):
        load_sd_components("tiny", unet=str(sd2[0] / "unet"))


def test_timestep_zero_without_noise_sees_the_clean_latent(images):
    ex = DiffusionFeatureExtractor("tiny", ["unet-in"], img_size=64, timestep=0, noise=False)
    torch.testing.assert_close(ex(images)["plain"]["unet-in"], ex.encode_images(images), atol=0, rtol=0)
    with pytest.raises(ValueError, match="denoise_from"):
        DiffusionFeatureExtractor(
            "tiny", ["unet-in"], img_size=64, noise=False, variants=[Variant("c", denoise_from=60)]
        )


# --- what csdiff does not support ----------------------------------------------------------------


@pytest.mark.parametrize(
    "pipeline,parts",
    [
        ("HunyuanDiTPipeline", ["transformer", "vae", "text_encoder", "tokenizer", "scheduler"]),
        (
            "CogVideoXPipeline",
            ["transformer", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler"],
        ),
    ],
)
def test_unsupported_architectures_name_the_supported_families(tmp_path, pipeline, parts):
    folder = tmp_path / pipeline
    for part in parts:
        (folder / part).mkdir(parents=True)
        (folder / part / "model.safetensors").write_bytes(b"")
    (folder / "model_index.json").write_text(json.dumps({"_class_name": pipeline}))
    with pytest.raises(BackboneNotAvailableError, match=r"SD 1\.x, SD 2\.x and SDXL") as err:
        load_sd_components(str(folder))
    assert pipeline in str(err.value)


# --- SDXL ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory) -> tuple[Path, Path]:
    work = tmp_path_factory.mktemp("sdxl")
    folder = sdxl_script.make_tiny_sdxl(work / "tiny-sdxl")
    return folder, sd2_script.make_tiny_controlnet(folder, work / "tiny-sdxl-controlnet")


def test_sdxl_loads_with_both_text_encoders_and_an_upcast_vae(sdxl):
    ex = DiffusionFeatureExtractor(str(sdxl[0]), ["legacy", "up_cross"], dtype="float16")
    assert ex.family.name == "sdxl" and ex.text_encoder_2 is not None and ex.img_size == 128  # native: 16 × 8
    assert ex.vae.dtype == torch.float32 and ex.unet.dtype == torch.float16  # float16 VAEs of SDXL overflow
    assert ex.layers == ["up-level0-upsampler-out", "up-level1-upsampler-out", "up-level1-repeat2-vit-out", "up_cross"]
    names = enumerate_activations(ex.unet)
    assert "up-level0-repeat2-vit-block2-out" in names and not any(n.startswith("up-level2-repeat0-vit") for n in names)
    feats = ex(shapes_images(2, size=64))["plain"]
    assert all(torch.isfinite(f).all() for f in feats.values())
    assert {k: tuple(v.shape[1:]) for k, v in feats.items()} == ex.feature_shapes()


def test_every_sdxl_name_equals_an_independent_hook(sdxl):
    from csdiff.backbone.prompts import encode_prompt_sdxl

    parts = load_sd_components(str(sdxl[0]))
    emb, pooled = encode_prompt_sdxl(
        (parts.tokenizer, parts.tokenizer_2), (parts.text_encoder, parts.text_encoder_2), "a photo"
    )
    added = {"text_embeds": pooled.expand(2, -1), "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]]).expand(2, -1)}
    assert_every_name_equals_an_independent_hook(parts, emb.expand(2, -1, -1), added_cond_kwargs=added)


def test_sdxl_text_conditioning_is_the_pipelines(sdxl):
    """Penultimate hidden states of both encoders, concatenated; the second's pooled projection."""
    from csdiff.backbone.prompts import encode_prompt_sdxl

    parts = load_sd_components(str(sdxl[0]))
    emb, pooled = encode_prompt_sdxl(
        (parts.tokenizer, parts.tokenizer_2), (parts.text_encoder, parts.text_encoder_2), "a red circle"
    )
    ids = [
        t("a red circle", padding="max_length", max_length=77, return_tensors="pt").input_ids
        for t in (parts.tokenizer, parts.tokenizer_2)
    ]
    h1 = parts.text_encoder(ids[0], output_hidden_states=True).hidden_states[-2]
    out2 = parts.text_encoder_2(ids[1], output_hidden_states=True)
    torch.testing.assert_close(emb, torch.cat([h1, out2.hidden_states[-2]], dim=-1))
    torch.testing.assert_close(pooled, out2.text_embeds)


def test_sdxl_noise_chain_and_controlnet(sdxl, images):
    folder, controlnet = sdxl
    variants = [
        Variant("plain", "a photo"),
        Variant("canny", "a photo", controlnets=[ControlNet(str(controlnet))]),
        Variant("chain", "a photo", denoise_from=53),
    ]
    ex = DiffusionFeatureExtractor(str(folder), ["unet-in", "up-level0-upsampler-out"], img_size=64, variants=variants)
    f = ex(images)
    z = ex.encode_images(images)
    noise = torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(0)).expand(2, -1, -1, -1)
    ac = ex.scheduler.alphas_cumprod[50]
    torch.testing.assert_close(f["plain"]["unet-in"], ac.sqrt() * z + (1 - ac).sqrt() * noise, atol=1e-5, rtol=1e-5)
    for name in ("canny", "chain"):
        assert (f[name]["up-level0-upsampler-out"] - f["plain"]["up-level0-upsampler-out"]).abs().max() > 1e-4, name


def test_sdxl_time_ids_default_to_the_image_and_are_configurable(sdxl, images):
    folder, _ = sdxl
    seen = []
    default = DiffusionFeatureExtractor(str(folder), ["up-level0-upsampler-out"], img_size=64)
    custom = DiffusionFeatureExtractor(
        str(folder), ["up-level0-upsampler-out"], img_size=64, time_ids=[1024, 768, 0, 0, 64, 64]
    )
    for ex in (default, custom):
        handle = ex.unet.register_forward_pre_hook(
            lambda m, a, k: seen.append(k["added_cond_kwargs"]["time_ids"][0].tolist()), with_kwargs=True
        )
        out = ex(images)["plain"]["up-level0-upsampler-out"]
        handle.remove()
    assert seen == [[64, 64, 0, 0, 64, 64], [1024, 768, 0, 0, 64, 64]]
    assert (out - default(images)["plain"]["up-level0-upsampler-out"]).abs().max() > 1e-4
    assert describe_differences(default.describe(), custom.describe())[0].startswith("time_ids:")


def test_sdxl_kohya_lora_reaches_unet_and_both_text_encoders(sdxl, images, tmp_path):
    """A kohya SDXL file (lora_unet_…, lora_te1_…, lora_te2_…): each part adapts its model, the
    text parts change only their variant's prompt embedding, and nothing becomes trainable."""
    from safetensors.torch import save_file

    folder, _ = sdxl
    g = torch.Generator().manual_seed(0)
    parts = {
        "lora_unet_up_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q": 64,
        "lora_te1_text_model_encoder_layers_0_self_attn_q_proj": 32,
        "lora_te2_text_model_encoder_layers_1_mlp_fc1": (48, 96),
    }
    tensors = {}
    for key, width in parts.items():
        n_in, n_out = (width, width) if isinstance(width, int) else width
        tensors.update(
            {
                f"{key}.lora_down.weight": torch.randn(4, n_in, generator=g) * 0.3,
                f"{key}.lora_up.weight": torch.randn(n_out, 4, generator=g) * 0.3,
                f"{key}.alpha": torch.tensor(4.0),
            }
        )
    save_file(tensors, str(tmp_path / "sdxl_lora.safetensors"))
    variants = [
        Variant("lora", "a photo", loras=[LoRA(str(tmp_path / "sdxl_lora.safetensors"))]),
        Variant("plain", "a photo"),
    ]
    ex = DiffusionFeatureExtractor(str(folder), ["up-level0-upsampler-out"], img_size=64, variants=variants)
    f = ex(images)
    name = next(iter(ex.loras.adapters.values()))
    assert ex.loras.in_unet == {name} and ex.loras.in_text == {"text_encoder": {name}, "text_encoder_2": {name}}
    assert (ex.prompt_embedding("a photo", ((name, 1.0),)) - ex.prompt_embedding("a photo", ())).abs().max() > 1e-3
    assert (f["lora"]["up-level0-upsampler-out"] - f["plain"]["up-level0-upsampler-out"]).abs().max() > 1e-4
    assert not any(p.requires_grad for p in ex.parameters())
    plain = DiffusionFeatureExtractor(
        str(folder), ["up-level0-upsampler-out"], img_size=64, variants=[Variant("plain", "a photo")]
    )
    torch.testing.assert_close(plain(images)["plain"]["up-level0-upsampler-out"], f["plain"]["up-level0-upsampler-out"])


def test_segmentation_fit_on_sdxl_through_the_cli(sdxl, tmp_path):
    from test_configs import _run, _substitute_tiny

    folder, controlnet = sdxl
    config = yaml.safe_load(
        (Path(__file__).resolve().parents[1] / "configs" / "seg_ade20k_sdxl_public.yaml").read_text()
    )
    cli, score = _run(
        _substitute_tiny(config, tmp_path, str(folder), str(controlnet), lambda path, seed: str(path)),
        tmp_path / "sdxl.yaml",
    )
    assert score in cli.trainer.callback_metrics
    assert set(cli.model.levels) == {
        "up-level0-upsampler-out",
        "up-level1-upsampler-out",
        "up-level1-repeat2-vit-out",
    }  # SDXL's legacy


def test_layers_verb_lists_each_familys_names_and_shapes(sd2, sdxl, capsys):
    from csdiff.cli import main

    for folder, native, probe, shape in (
        (sd2[0], 64, "up-level3-repeat2-vit-out", [32, 8, 8]),
        (sdxl[0], 128, "up-level0-repeat2-vit-block2-out", [64, 4, 4]),
    ):
        assert main(["layers", "--model", str(folder), "--format", "json"]) == 0
        rows = {r["name"]: r["shape"] for r in json.loads(capsys.readouterr().out)}
        assert rows[probe] == shape and rows["up_cross"] == [154, native // 8, native // 8], folder


@pytest.mark.parametrize(
    "config_name,family", [("corr_spair_sdxl_public.yaml", "sdxl"), ("corr_spair_sd21_public.yaml", "sd2")]
)
def test_correspondence_config_runs_on_its_family(config_name, family, sd2, sdxl, tmp_path):
    """The SDXL and SD 2.1 correspondence configs on tiny models of their own family: gate,
    attention feature (`up_cross` from that family's up-levels), denoising chains, PCK."""
    from test_configs import _run, _substitute_tiny

    folder, controlnet = sdxl if family == "sdxl" else sd2
    config = yaml.safe_load((Path(__file__).resolve().parents[1] / "configs" / config_name).read_text())
    cli, score = _run(
        _substitute_tiny(config, tmp_path, str(folder), str(controlnet), lambda path, seed: str(path)),
        tmp_path / config_name,
    )
    assert score in cli.trainer.callback_metrics


def test_sdxl_diffusers_lora_folder_loads_and_acts(sdxl, images, tmp_path):
    """A diffusers-format SDXL LoRA (saved by the SDXL pipeline, with peft metadata) on the UNet."""
    from diffusers import StableDiffusionXLPipeline
    from peft import LoraConfig

    folder, _ = sdxl
    module = "up_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    g = torch.Generator().manual_seed(3)
    layers = {
        f"{module}.lora_A.weight": torch.randn(4, 64, generator=g) * 0.3,
        f"{module}.lora_B.weight": torch.randn(64, 4, generator=g) * 0.3,
    }
    config = LoraConfig(r=4, lora_alpha=4, target_modules=[module]).to_dict()
    StableDiffusionXLPipeline.save_lora_weights(
        tmp_path / "lora", unet_lora_layers=layers, unet_lora_adapter_metadata=config
    )
    variants = [Variant("lora", "a photo", loras=[LoRA(str(tmp_path / "lora"))]), Variant("plain", "a photo")]
    ex = DiffusionFeatureExtractor(str(folder), ["up-level0-upsampler-out"], img_size=64, variants=variants)
    f = ex(images)
    assert len(ex.loras.in_unet) == 1 and not ex.loras.in_text_encoder
    assert (f["lora"]["up-level0-upsampler-out"] - f["plain"]["up-level0-upsampler-out"]).abs().max() > 1e-4
    assert not any(p.requires_grad for p in ex.parameters())


# --- single files and long prompts, per family -------------------------------------------------


@pytest.mark.parametrize("family", ["sd2", "sdxl"])
def test_single_file_checkpoint_loads_as_its_folder(family, sd2, sdxl, images, tmp_path):
    """An SD 2.x (OpenCLIP text encoder) or SDXL (sgm conditioner, label_emb) checkpoint in one
    file, in the original key names, loads into the same weights and features as its folder;
    the base folder of another family is refused with the reason."""
    from ldm_format import diffusers_to_ldm_state_dict
    from safetensors.torch import save_file

    folder, other = (sd2[0], sdxl[0]) if family == "sd2" else (sdxl[0], sd2[0])
    ref = load_sd_components(str(folder), load_vae_decoder=True)
    path = tmp_path / f"{family}-merged.safetensors"
    save_file(
        diffusers_to_ldm_state_dict(ref.unet, ref.vae, ref.text_encoder, ref.text_encoder_2, open_clip=True), str(path)
    )
    parts = load_sd_components(str(path), base_model=str(folder), load_vae_decoder=True)
    for part in ("unet", "vae", "text_encoder", "text_encoder_2"):  # every weight, bit for bit
        want = dict(getattr(ref, part).named_parameters()) if getattr(ref, part) is not None else {}
        got = dict(getattr(parts, part).named_parameters()) if getattr(parts, part) is not None else {}
        assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want), part
    assert parts.scheduler.config.prediction_type == ref.scheduler.config.prediction_type
    assert parts.spec.model == str(path) and parts.spec.weights_id != ref.spec.weights_id
    layers = ["up-level1-upsampler-out", "up_cross"]
    a = DiffusionFeatureExtractor(str(path), layers, base_model=str(folder), img_size=64)(images)["plain"]
    b = DiffusionFeatureExtractor(str(folder), layers, img_size=64)(images)["plain"]
    for layer in layers:  # the same weights, but other kernels may sum in another order
        assert_close_up_to_rounding(a[layer], b[layer], msg=layer)
    with pytest.raises(BackboneNotAvailableError, match="own family and architecture") as err:
        load_sd_components(str(path), base_model=str(other))
    assert str(path) in str(err.value)


def test_sdxl_long_prompt_windows(sdxl, images):
    """A prompt over 77 tokens: each 77-token window goes through both encoders on its own,
    the windows are concatenated on the token axis, and the attention features keep 77
    channels per up-level whatever the prompt length."""
    from csdiff.backbone.prompts import encode_prompt_sdxl, prompt_windows

    parts = load_sd_components(str(sdxl[0]))
    long = ", ".join(["a red circle and a blue square on a striped background"] * 12)
    emb, pooled = encode_prompt_sdxl(
        (parts.tokenizer, parts.tokenizer_2), (parts.text_encoder, parts.text_encoder_2), long
    )
    windows = [prompt_windows(t, long) for t in (parts.tokenizer, parts.tokenizer_2)]
    n = windows[0].shape[0]
    assert n >= 2 and emb.shape == (1, 77 * n, 32 + 48)
    for i in range(n):  # by hand, window by window
        h1 = parts.text_encoder(windows[0][i : i + 1], output_hidden_states=True).hidden_states[-2]
        out2 = parts.text_encoder_2(windows[1][i : i + 1], output_hidden_states=True)
        torch.testing.assert_close(emb[:, 77 * i : 77 * (i + 1)], torch.cat([h1, out2.hidden_states[-2]], dim=-1))
        if i == 0:
            torch.testing.assert_close(pooled, out2.text_embeds)
    ex = DiffusionFeatureExtractor(
        str(sdxl[0]), ["up_cross"], img_size=64, variants=[Variant("long", long), Variant("short", "a photo")]
    )
    f = ex(images)
    assert f["long"]["up_cross"].shape == f["short"]["up_cross"].shape == (2, 154, 8, 8)
    assert (f["long"]["up_cross"] - f["short"]["up_cross"]).abs().max() > 1e-4


@pytest.mark.parametrize("family", ["sd2", "sdxl"])
def test_assess_runs_on_each_family(family, sd2, sdxl, images, tmp_path, capsys):
    """`csdiff assess` on SD 2.x (v-prediction: the img2img chain follows the scheduler's
    prediction type; the no-technique reconstruction is the stock img2img pipeline's) and on
    SDXL (time ids, two text encoders, its float32 VAE), each with its ControlNet."""
    import cv2

    from csdiff.backbone.img2img import NO_TECHNIQUE, reconstruct
    from csdiff.cli import main

    folder, controlnet = sd2 if family == "sd2" else sdxl
    variants = [{"name": "canny", "prompt": "a photo", "controlnets": [{"model": str(controlnet)}]}]
    model = {"num_classes": 4, "backbone": {"model": str(folder), "img_size": 64}, "variants": variants}
    config = tmp_path / "assess.yaml"
    config.write_text(yaml.safe_dump({"model": {"class_path": "csdiff.tasks.SegmentationTask", "init_args": model}}))
    (tmp_path / "images").mkdir()
    rgb = ((images[0].permute(1, 2, 0).numpy() + 1) * 127.5).round().clip(0, 255).astype("uint8")
    cv2.imwrite(str(tmp_path / "images" / "a.png"), rgb[..., ::-1])
    args = ["assess", "--config", str(config), "--images", str(tmp_path / "images"), "--steps", "4"]
    assert main([*args, "--output", str(tmp_path / "out"), "--layers", "[unet-after-conv-in]"]) == 0
    rows = json.loads((tmp_path / "out" / "gate_scores.json").read_text())["rows"]
    assert {r["variant"] for r in rows} == {"no technique", "canny"}
    assert "canny: " in capsys.readouterr().out
    if family == "sd2":
        extractor = DiffusionFeatureExtractor(str(folder), ["unet-in"], img_size=64, vae_decoder=True)
        assert extractor.prediction_type == "v_prediction"
        ours = reconstruct(extractor, images[:1], NO_TECHNIQUE, strength=0.6, steps=10, seed=2)
        stock = stock_img2img(extractor, images[:1], strength=0.6, steps=10, seed=2)
        assert_close_up_to_rounding(ours * 0.5 + 0.5, stock)
