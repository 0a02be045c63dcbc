"""A variant's own merged weights (the paper's LoRAs were released merged into SD 1.5)."""

from __future__ import annotations

import pytest
from helpers import assert_close_up_to_rounding, load_script, random_locon, shapes_images, write_merged_copy

from csdiff.backbone import DiffusionFeatureExtractor, LoRA, Variant
from csdiff.backbone.extractor import describe_differences
from csdiff.backbone.loading import BackboneNotAvailableError, load_sd_components
from csdiff.backbone.tiny import TINY_SD_DIR

PROMPT = "a red circle and a blue square on a striped background"
LAYERS = ["down-level0-repeat0-vit-block0-self-q", "up-level1-upsampler-out", "up_cross"]


@pytest.fixture(scope="module")
def merged(tmp_path_factory, tiny_parts):
    """A copy of tiny with a LoCon merged into its UNet and text encoder by hand (float64)."""
    modules = random_locon(tiny_parts.unet, tiny_parts.text_encoder, rank=4, seed=3)
    return write_merged_copy(TINY_SD_DIR, tmp_path_factory.mktemp("merged") / "tiny-merged", modules)


@pytest.fixture(scope="module")
def images():
    return shapes_images(2, 64)


def test_merged_weights_variant_equals_the_merged_model(merged, images):
    """Its variant's features are the merged model's; the other variants keep the base."""
    canny = {"model": "tiny-controlnet-canny"}
    variants = [
        Variant("plain", PROMPT),
        Variant("merged", PROMPT, weights=str(merged)),
        Variant("merged_canny", PROMPT, weights=str(merged), controlnets=[canny]),
        Variant("canny", PROMPT, controlnets=[canny]),
    ]
    ex = DiffusionFeatureExtractor("tiny", LAYERS, img_size=64, variants=variants)
    assert len(ex.weight_unets) == 1 and len(ex.weight_text_encoders) == 1  # loaded once; its text encoder differs
    calls = []
    ex.weight_unets["w0"].register_forward_pre_hook(lambda *a: calls.append(1))
    f = ex(images)
    assert len(calls) == 1  # merged and merged_canny share one batched call of the merged UNet
    # the same computation (the same batched calls) on the merged model as backbone, and on the base
    want = DiffusionFeatureExtractor(
        str(merged), LAYERS, img_size=64, variants=[Variant("merged", PROMPT), variants[2]]
    )(images)
    base = DiffusionFeatureExtractor("tiny", LAYERS, img_size=64, variants=[variants[0], variants[3]])(images)
    for name in LAYERS:
        # the same computation in another extractor: MKL may still pick kernels by memory alignment
        assert_close_up_to_rounding(f["merged"][name], want["merged"][name], msg=name)
        assert_close_up_to_rounding(f["plain"][name], base["plain"][name], msg=name)
        assert (f["merged"][name] - f["plain"][name]).abs().max() > (1e-4 if name == "up_cross" else 1e-3), (
            name
        )  # probabilities move less
    assert (f["merged_canny"]["up-level1-upsampler-out"] - f["merged"]["up-level1-upsampler-out"]).abs().max() > 1e-3
    assert not any(p.requires_grad for p in ex.parameters())


def test_merged_weights_are_fingerprinted_and_compared(merged, tmp_path, tiny_parts):
    """describe() names the weights by content, so a checkpoint trained with other weights is refused."""
    ex = DiffusionFeatureExtractor(
        "tiny", ["up-level1-upsampler-out"], img_size=64, variants=[Variant("m", PROMPT, weights=str(merged))]
    )
    described = ex.describe()
    assert described["variants"][0]["weights"] == str(merged) and described["variants"][0]["weights_id"]
    other = write_merged_copy(TINY_SD_DIR, tmp_path / "other", random_locon(tiny_parts.unet, None, rank=2, seed=9))
    ex2 = DiffusionFeatureExtractor(
        "tiny", ["up-level1-upsampler-out"], img_size=64, variants=[Variant("m", PROMPT, weights=str(other))]
    )
    assert len(ex2.weight_text_encoders) == 0  # its text encoder equals the base's: not kept twice
    lines = describe_differences(described, ex2.describe())
    assert len(lines) == 1 and lines[0].startswith("variant 'm' weights:")
    plain = DiffusionFeatureExtractor("tiny", ["up-level1-upsampler-out"], img_size=64, variants=[Variant("m", PROMPT)])
    assert describe_differences(described, plain.describe()) == [
        f"variant 'm' weights: {described['variants'][0]['weights_id']} (checkpoint) vs None (now)"
    ]


def test_merged_single_file_uses_the_backbone_folder_as_configuration(merged, tmp_path, images):
    """A single-file merged checkpoint (original key names) is configured by the backbone's folder."""
    from ldm_format import diffusers_to_ldm_state_dict
    from safetensors.torch import save_file

    parts = load_sd_components(str(merged), load_vae_decoder=True)
    path = tmp_path / "merged.safetensors"
    save_file(diffusers_to_ldm_state_dict(parts.unet, parts.vae, parts.text_encoder), str(path))
    variants = [Variant("file", PROMPT, weights=str(path)), Variant("folder", PROMPT, weights=str(merged))]
    f = DiffusionFeatureExtractor(
        "tiny", ["up-level1-upsampler-out"], img_size=64, variants=variants, batch_variants=False
    )(images)
    assert_close_up_to_rounding(f["file"]["up-level1-upsampler-out"], f["folder"]["up-level1-upsampler-out"])


@pytest.fixture(scope="module")
def sd2_folder(tmp_path_factory):
    return load_script("make_tiny_sd2").make_tiny_sd2(tmp_path_factory.mktemp("sd2") / "tiny-sd2")


def test_weights_of_another_architecture_or_with_loras_are_refused(sd2_folder, merged):
    with pytest.raises(BackboneNotAvailableError, match="do not fit the backbone") as err:
        DiffusionFeatureExtractor(
            "tiny", ["up-level1-upsampler-out"], img_size=64, variants=[Variant("x", weights=str(sd2_folder))]
        )
    assert str(sd2_folder) in str(err.value)
    with pytest.raises(BackboneNotAvailableError, match="no such file"):
        DiffusionFeatureExtractor(
            "tiny", ["up-level1-upsampler-out"], img_size=64, variants=[Variant("x", weights="missing.ckpt")]
        )
    with pytest.raises(ValueError, match="either `weights`"):
        Variant("x", weights=str(merged), loras=[LoRA("a.safetensors")])
