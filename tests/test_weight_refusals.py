"""Weights that do not fit are refused when they are loaded, by name (not mid-run by a shape error)."""

from __future__ import annotations

import pytest
from helpers import load_script

from csdiff.backbone import ControlNet, DiffusionFeatureExtractor, Variant
from csdiff.backbone.loading import BackboneNotAvailableError
from csdiff.backbone.tiny import TINY_ALIASES, TINY_SD_DIR

LAYERS = ["up-level1-upsampler-out"]


@pytest.fixture(scope="module")
def sd2_controlnet(tmp_path_factory):
    script = load_script("make_tiny_sd2")
    work = tmp_path_factory.mktemp("sd2")
    return script.make_tiny_controlnet(script.make_tiny_sd2(work / "tiny-sd2"), work / "tiny-sd2-controlnet")


def test_controlnet_of_another_family_is_refused_at_load(sd2_controlnet):
    with pytest.raises(BackboneNotAvailableError, match="does not fit the backbone tiny") as err:
        DiffusionFeatureExtractor(
            "tiny", LAYERS, img_size=64, variants=[Variant("c", controlnets=[ControlNet(str(sd2_controlnet))])]
        )
    assert str(sd2_controlnet) in str(err.value) and "cross_attention_dim: 48 vs 64" in str(err.value)


def test_a_folder_in_the_wrong_place_says_what_it_is():
    with pytest.raises(
        BackboneNotAvailableError, match="Stable Diffusion pipeline folder: use it as the backbone's `model`"
    ):
        DiffusionFeatureExtractor(
            "tiny", LAYERS, img_size=64, variants=[Variant("c", controlnets=[ControlNet(str(TINY_SD_DIR))])]
        )
    with pytest.raises(
        BackboneNotAvailableError, match="it is a ControlNet folder: use it in a variant's `controlnets`"
    ):
        DiffusionFeatureExtractor(str(TINY_ALIASES["tiny-controlnet-canny"]), LAYERS, img_size=64)


def test_lora_for_sd15_widths_on_tiny_is_refused_in_one_line(tmp_path, capsys):
    """Before: 34 lines of diffusers warnings and a 7,309-character message."""
    from csdiff.backbone import LoRA
    from csdiff.backbone.lora import LoRAError
    from csdiff.backbone.random_models import meta_unet, write_random_lora

    path = write_random_lora(tmp_path / "sd15.safetensors", meta_unet())
    with pytest.raises(LoRAError, match="does not fit this backbone") as err:
        DiffusionFeatureExtractor("tiny", LAYERS, img_size=64, variants=[Variant("l", loras=[LoRA(str(path))])])
    message = str(err.value)
    assert str(path) in message and "\n" not in message and len(message) < 600
    assert "do not fit its weight (64, 64)" in message
