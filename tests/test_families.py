"""SD 2.x-shaped models, fine-tuned UNet overrides, and architectures csdiff does not support.

The SD 2.x model is a tiny random-weight folder written at test time (linear projections,
one head size per level, a GELU text encoder, a v-predicting scheduler) and loaded through
the same code as real weights.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from diffusers import DDIMScheduler, UNet2DConditionModel
from helpers import load_script, shapes_images
from test_backbone import assert_every_name_equals_an_independent_hook

from csdiff.backbone import ControlNet, DiffusionFeatureExtractor, LoRA, Variant, enumerate_activations
from csdiff.backbone.extractor import describe_differences
from csdiff.backbone.loading import BackboneNotAvailableError, load_sd_components
from csdiff.backbone.random_models import write_random_lora
from csdiff.backbone.tiny import TINY_SD_DIR

sd2_script = load_script("make_tiny_sd2")
LAYERS = ["up-level1-upsampler-out", "up-level2-repeat1-vit-block0-self-q"]


@pytest.fixture(scope="module")
def sd2(tmp_path_factory) -> tuple[Path, Path]:
    work = tmp_path_factory.mktemp("sd2")
    folder = sd2_script.make_tiny_sd2(work / "tiny-sd2")
    return folder, sd2_script.make_tiny_sd2_controlnet(folder, work / "tiny-sd2-controlnet")


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
    ex = DiffusionFeatureExtractor(str(folder), ["unet-in"], img_size=64, timestep=50,
                                   variants=[Variant("plain", "a photo"), Variant("chain", "a photo", denoise_from=53)])
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
    variants = [Variant("plain", "a photo"), Variant("canny", "a photo", controlnets=[ControlNet(str(controlnet))]),
                Variant("lora", "a photo", loras=[LoRA(str(lora))])]
    f = DiffusionFeatureExtractor(str(folder), LAYERS, img_size=64, variants=variants)(images)
    for name in ("canny", "lora"):
        assert (f[name]["up-level1-upsampler-out"] - f["plain"]["up-level1-upsampler-out"]).abs().max() > 1e-4, name


def test_segmentation_fit_on_sd2_through_the_cli(sd2, tmp_path):
    from test_configs import _run, _substitute_tiny

    folder, controlnet = sd2
    config = yaml.safe_load((Path(__file__).resolve().parents[1] / "configs" / "seg_ade20k_public.yaml").read_text())
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
        DiffusionFeatureExtractor("tiny", ["unet-in"], img_size=64, noise=False, variants=[Variant("c", denoise_from=60)])


# --- what csdiff does not support ----------------------------------------------------------------


@pytest.mark.parametrize("pipeline,parts", [
    ("PixArtAlphaPipeline", ["transformer", "vae", "text_encoder", "tokenizer", "scheduler"]),
    ("StableDiffusionXLPipeline", ["unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler"]),
])
def test_unsupported_architectures_name_the_supported_families(tmp_path, pipeline, parts):
    folder = tmp_path / pipeline
    for part in parts:
        (folder / part).mkdir(parents=True)
        (folder / part / "model.safetensors").write_bytes(b"")
    (folder / "model_index.json").write_text(json.dumps({"_class_name": pipeline}))
    with pytest.raises(BackboneNotAvailableError, match=r"SD 1\.x.*SD 2\.x") as err:
        load_sd_components(str(folder))
    assert pipeline in str(err.value)
