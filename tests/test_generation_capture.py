"""Capture during generation: chosen steps only, no effect on the generated result, clean detach."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline

from csdiff.backbone.generation_capture import capture_generation
from csdiff.backbone.listing import list_layers
from csdiff.backbone.names import UnknownLayerError

LAYERS = ["up-level1-upsampler-out", "up-level1-repeat0-vit-block0-cross-map", "up_cross"]


@pytest.fixture(scope="module")
def pipe(tiny_parts):
    """A text-to-image pipeline on the tiny model; latents out, so no VAE decoder is needed."""
    p = tiny_parts
    pipe = StableDiffusionPipeline(
        vae=p.vae,
        text_encoder=p.text_encoder,
        tokenizer=p.tokenizer,
        unet=p.unet,
        scheduler=DDIMScheduler.from_config(p.scheduler.config),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _generate(pipe, **kwargs) -> torch.Tensor:
    return pipe(
        "a photo of shapes",
        num_inference_steps=4,
        height=64,
        width=64,
        output_type="latent",
        generator=torch.Generator().manual_seed(0),
        **kwargs,
    ).images


def _attachments(pipe) -> tuple:
    """Every hook on every UNet module, the attention processors and the scheduler's own attributes."""
    hooks = tuple((name, tuple(m._forward_hooks), tuple(m._forward_pre_hooks)) for name, m in pipe.unet.named_modules())
    processors = tuple((k, id(v)) for k, v in pipe.unet.attn_processors.items())
    return hooks, processors, tuple(sorted(vars(pipe.scheduler)))


def test_capture_stores_exactly_the_chosen_steps_and_leaves_the_output_unchanged(pipe, tiny_parts):
    before = _attachments(pipe)
    plain = _generate(pipe)
    with capture_generation(pipe, LAYERS, steps=[1, 3]) as cap:
        captured = _generate(pipe)
    assert torch.equal(plain, captured)
    assert _attachments(pipe) == before
    assert sorted(cap.features) == [1, 3]
    assert cap.timesteps_seen == {i: float(pipe.scheduler.timesteps[i]) for i in (1, 3)}
    shapes = {row.name: row.shape for row in list_layers(tiny_parts, 64)}
    for step in (1, 3):
        assert set(cap.features[step]) == set(LAYERS)
        for name in LAYERS[:2]:
            assert cap.features[step][name].shape == (2, *shapes[name])  # classifier-free guidance: 2 per image
        assert cap.features[step]["up_cross"].shape == (2, 2 * 77, 8, 8)
    assert not torch.equal(cap.features[1][LAYERS[0]], cap.features[3][LAYERS[0]])


def _timesteps(pipe) -> torch.Tensor:
    pipe.scheduler.set_timesteps(4)
    return pipe.scheduler.timesteps


def test_capture_by_timestep_value(pipe):
    t = int(_timesteps(pipe)[2])
    with capture_generation(pipe, ["up-level1-upsampler-out"], timesteps=[t]) as cap:
        _generate(pipe)
    assert list(cap.features) == [2] and cap.timesteps_seen == {2: float(t)}


def test_nothing_remains_after_an_exception_inside_the_call(pipe):
    before = _attachments(pipe)

    def fail(pipeline, step, timestep, kwargs):
        if step == 1:
            raise RuntimeError("stop here")
        return kwargs

    with pytest.raises(RuntimeError, match="stop here"), capture_generation(pipe, LAYERS, steps=[0, 1, 2]) as cap:
        _generate(pipe, callback_on_step_end=fail)
    assert _attachments(pipe) == before
    assert sorted(cap.features) == [0, 1]  # what was captured before the failure is kept


def test_nothing_remains_after_an_exception_inside_the_unet(pipe):
    """A failure deep in the UNet, while a step's hooks and processors are installed."""
    before = _attachments(pipe)
    block = pipe.unet.up_blocks[2]

    def fail(module, args, output):
        raise RuntimeError("unet failed")

    handle = block.register_forward_hook(fail)
    try:
        with pytest.raises(RuntimeError, match="unet failed"), capture_generation(pipe, LAYERS, steps=[0]):
            _generate(pipe)
    finally:
        handle.remove()
    assert _attachments(pipe) == before


def test_unknown_layer_and_missing_steps_are_clear_errors(pipe):
    with pytest.raises(UnknownLayerError, match="unknown layer name 'up-level1-upsampler-outt'.*did you mean"):
        capture_generation(pipe, ["up-level1-upsampler-outt"], steps=[0])
    with pytest.raises(ValueError, match="at least one denoising step"):
        capture_generation(pipe, ["up-level1-upsampler-out"])
    missed = pytest.warns(UserWarning, match=r"steps \[9\].*never reached.*ran 4 denoising steps")
    with missed, capture_generation(pipe, ["up-level1-upsampler-out"], steps=[9]):
        _generate(pipe)


def test_a_failure_caught_inside_the_context_does_not_spoil_the_next_generation(pipe):
    plain = _generate(pipe)
    handle = pipe.unet.up_blocks[2].register_forward_hook(lambda module, args, output: 1 / 0)
    with capture_generation(pipe, LAYERS, steps=[0, 2]) as cap:
        with pytest.raises(ZeroDivisionError):
            _generate(pipe)  # fails while step 0's hooks and processors are installed
        handle.remove()
        again = _generate(pipe)
    assert torch.equal(again, plain)
    assert (
        sorted(cap.features) == [0, 2] and cap.features[0][LAYERS[0]].shape[0] == 2
    )  # nothing left of the failed call
