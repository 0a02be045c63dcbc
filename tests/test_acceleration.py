"""channels_last and compile: the same features as the plain extractor, hooks kept working."""

from __future__ import annotations

import pytest
import torch
import torch._dynamo
from helpers import assert_close_up_to_rounding, shapes_images, write_kohya_lora

from csdiff.backbone import UP_CROSS, ControlNet, DiffusionFeatureExtractor, LoRA, Variant
from csdiff.backbone.acceleration import CompiledForward

PROMPT = "a red circle and a blue square on a striped background"
# A query projection (hooked inside down_blocks[0]'s first transformer), a block output and
# up_cross (attention processors inside the up-level 1 and 2 transformers).
LAYERS = ["down-level0-repeat0-vit-block0-self-q", "up-level1-upsampler-out", "up-level2-repeat1-res-out", UP_CROSS]


@pytest.fixture(scope="module")
def variants(tmp_path_factory):
    path = tmp_path_factory.mktemp("lora") / "lora.safetensors"
    g = torch.Generator().manual_seed(0)
    module = "down_blocks.1.resnets.0.conv1"
    write_kohya_lora(
        path, {module: (torch.randn(4, 32, 3, 3, generator=g) * 0.1, torch.randn(64, 4, 1, 1, generator=g) * 0.1, 4.0)}
    )
    canny = ControlNet("tiny-controlnet-canny")
    return [
        Variant("plain", PROMPT),
        Variant("canny", PROMPT, controlnets=[canny]),
        Variant("lora", PROMPT, loras=[LoRA(str(path))], controlnets=[canny]),
    ]


@pytest.fixture(scope="module")
def reference(variants):
    images = shapes_images(2, size=64)
    return images, DiffusionFeatureExtractor("tiny", LAYERS, img_size=64, variants=variants)(images)


def assert_same(out, ref, exact: bool):
    """Bit-equal for the same kernels (dynamo's eager backend); NHWC runs other kernels."""
    for v in ref:
        for name in LAYERS:
            assert out[v][name].is_contiguous(), (v, name)
            if exact:
                assert torch.equal(out[v][name], ref[v][name]), (v, name)
            else:
                assert_close_up_to_rounding(out[v][name], ref[v][name], msg=f"{v} {name}")


def test_channels_last_equals_plain(variants, reference):
    images, ref = reference
    extractor = DiffusionFeatureExtractor("tiny", LAYERS, img_size=64, variants=variants, channels_last=True)
    assert extractor.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    assert next(iter(extractor.controlnets.values())).controlnet_cond_embedding.conv_in.weight.is_contiguous(
        memory_format=torch.channels_last
    )
    assert_same(extractor(images), ref, exact=False)


def test_compiled_blocks_equal_plain_and_keep_hooks(variants, reference):
    """Compiled blocks (backend ``eager``: dynamo's graph capture without code generation, so
    the test stays fast; inductor is run by ``benchmarks/acceleration.py``) give the same
    features; a block with a hook or attention processor inside stays eager, one hooked as a
    whole is compiled; the shape probe (fake tensors) still works."""
    images, ref = reference
    torch._dynamo.reset()
    extractor = DiffusionFeatureExtractor("tiny", LAYERS, img_size=64, variants=variants, compile="eager")
    unet = extractor.unet

    def compiled(path: str) -> bool:
        return isinstance(unet.get_submodule(path).forward, CompiledForward)

    assert not compiled("down_blocks.0.attentions.0")  # to_q hooked inside
    assert compiled("down_blocks.0.attentions.1") and compiled("down_blocks.0.resnets.0")
    assert not compiled("up_blocks.1.attentions.0") and not compiled("up_blocks.2.attentions.2")  # up_cross maps
    assert compiled("up_blocks.1.upsamplers.0") and compiled("up_blocks.2.resnets.1")  # hooked as a whole
    assert isinstance(extractor.vae.encoder.down_blocks[0].resnets[0].forward, CompiledForward)
    assert extractor.feature_shapes()["up-level1-upsampler-out"] == (64, 4, 4)
    out = extractor(images)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0
    assert_same(out, ref, exact=True)
    assert_same(extractor(images), ref, exact=True)  # second call: the cached graphs
