"""SD 1.5 at its real size without weights (``random-sd15``), and the faults only real scale showed.

The random model has SD 1.5's exact architecture; LoRAs are made on the fly at its widths.
The remaining tests check, on tiny, the extractor faults found while reading the code at
SD scale: provided-condition sharing, the VAE noise stream, v-prediction chains, and what a
checkpoint compares.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from diffusers import DDIMScheduler
from helpers import assert_close_up_to_rounding, shapes_images

from csdiff.backbone import ControlNet, DiffusionFeatureExtractor, LoRA, Variant
from csdiff.backbone.extractor import describe_differences
from csdiff.backbone.loading import load_controlnet, load_sd_components, resolve_model_folder
from csdiff.backbone.random_models import (
    RANDOM_LORA_MODULES,
    meta_unet,
    random_vae,
    random_weights_id,
    write_random_lora,
)
from csdiff.backbone.tiny import TINY_SD_DIR
from csdiff.tasks.checkpoints import CheckpointMismatchError

PROMPT = "a red circle and a blue square on a striped background"
SELF_Q = "up-level1-repeat0-vit-block0-self-q"  # the output of the first LoRA module


@pytest.fixture(scope="module")
def images():
    return shapes_images(2, size=64)


# --- random-sd15 --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sd15_lora_run(tmp_path_factory, images):
    """random-sd15 in float32 at 64² with a plain, a kohya-LoRA and a diffusers-LoRA variant."""
    torch.set_num_threads(2)
    try:
        work = tmp_path_factory.mktemp("sd15_lora")
        shape_only = meta_unet()
        kohya = write_random_lora(work / "kohya.safetensors", shape_only, "kohya", seed=1)
        diffusers_folder = write_random_lora(work / "diffusers_lora", shape_only, "diffusers", seed=2)
        variants = [
            Variant("kohya", PROMPT, loras=[LoRA(str(kohya))]),
            Variant("diffusers", PROMPT, loras=[LoRA(str(diffusers_folder))]),
            Variant("plain", PROMPT),
        ]
        ex = DiffusionFeatureExtractor(
            "random-sd15", [SELF_Q, "up-level2-upsampler-out"], img_size=64, variants=variants
        )
        return ex, ex(images)
    finally:
        torch.set_num_threads(1)


def test_random_sd15_has_the_sizes_of_sd15(sd15_lora_run):
    ex, _ = sd15_lora_run
    assert sum(p.numel() for n, p in ex.unet.named_parameters() if "lora_" not in n) == 859_520_964
    assert sum(p.numel() for p in ex.text_encoder.parameters()) == 123_060_480  # CLIP ViT-L/14 text tower
    assert (
        list(ex.unet.config.block_out_channels) == [320, 640, 1280, 1280] and ex.unet.config.cross_attention_dim == 768
    )
    assert ex.vae.config.scaling_factor == 0.18215 and ex.vae.decoder is None
    assert len(ex.tokenizer) == 49408 == ex.text_encoder.config.vocab_size
    ids = ex.tokenizer("a photo of a horse, in a meadow!").input_ids
    assert ids[0] == 49406 and ids[-1] == 49407 and max(ids) < 49408
    assert ex.feature_shapes() == {SELF_Q: (1280, 2, 2), "up-level2-upsampler-out": (640, 8, 8)}
    assert ex.spec.weights_id == random_weights_id("random-sd15")


def test_random_controlnet_has_the_size_of_sd_controlnet_canny_and_acts(two_threads):
    controlnet, weights_id = load_controlnet("random-sd15-controlnet-canny", dtype="float16")
    assert sum(p.numel() for p in controlnet.parameters()) == 361_279_120
    assert {p.dtype for p in controlnet.parameters()} == {torch.float16}
    zero_conv = controlnet.controlnet_down_blocks[0].weight  # zero-initialised in diffusers: random here
    assert zero_conv.abs().max() > 0
    assert weights_id == random_weights_id("random-sd15-controlnet-canny") != random_weights_id("random-sd15")


def test_random_weights_are_seeded_and_dtype_independent():
    a, b = random_vae(torch.float32, with_decoder=False), random_vae(torch.float32, with_decoder=False)
    half = random_vae(torch.float16, with_decoder=False)
    for (name, p), q, h in zip(a.named_parameters(), b.parameters(), half.parameters()):
        assert torch.equal(p, q), name
        assert torch.equal(p.half(), h), name
    with pytest.raises(Exception, match="ControlNet"):
        load_sd_components("random-sd15-controlnet-canny")


def test_loras_at_sd15_widths_load_change_features_and_stay_frozen(sd15_lora_run, images):
    ex, feats = sd15_lora_run
    for name in ("kohya", "diffusers"):
        assert (feats[name][SELF_Q] - feats["plain"][SELF_Q]).abs().max() > 1e-3, name
    assert len(ex.loras.in_unet) == 2
    assert not any(p.requires_grad for p in ex.parameters())  # peft re-enables them on every switch
    again = ex(images, variants=["plain"])["plain"]
    # the LoRAs are off for plain: the same features, from a call of another batch shape (other kernels: rounding)
    assert_close_up_to_rounding(again[SELF_Q], feats["plain"][SELF_Q])
    adapted = [n for n, _ in ex.unet.named_parameters() if "lora_A" in n]
    assert len(adapted) == 2 * len(RANDOM_LORA_MODULES)


# --- faults found at real scale, checked on tiny --------------------------------------------------


def test_adapters_stay_frozen_after_every_switch(tmp_path, images, tiny_parts):
    lora = write_random_lora(tmp_path / "l.safetensors", tiny_parts.unet)
    ex = DiffusionFeatureExtractor(
        "tiny",
        ["up-level1-upsampler-out"],
        img_size=64,
        variants=[Variant("l", PROMPT, loras=[LoRA(str(lora))]), Variant("plain", PROMPT)],
    )
    for _ in range(2):
        ex(images)
        ex(images, variants=["l"])
        assert not [n for n, p in ex.named_parameters() if p.requires_grad]


def test_provided_conditions_are_not_shared_between_variants(images):
    cn = ControlNet("tiny-controlnet-canny", condition="provided")
    ex = DiffusionFeatureExtractor(
        "tiny",
        ["up-level1-upsampler-out"],
        img_size=64,
        variants=[Variant("a", PROMPT, controlnets=[cn]), Variant("b", PROMPT, controlnets=[cn])],
    )
    calls = []
    ex.controlnets["cn0"].register_forward_hook(lambda *a: calls.append(1))
    edges = torch.zeros(2, 3, 64, 64)
    edges[..., 20:40, 20:40] = 1
    f = ex(images, conditions={"a": edges, "b": 1 - edges})
    assert len(calls) == 2
    assert (f["a"]["up-level1-upsampler-out"] - f["b"]["up-level1-upsampler-out"]).abs().max() > 1e-4
    alone = ex(images, conditions={"a": 1 - edges, "b": 1 - edges}, variants=["a"])["a"]
    assert_close_up_to_rounding(alone["up-level1-upsampler-out"], f["b"]["up-level1-upsampler-out"])  # batch 2 vs 4


def test_vae_sample_noise_is_not_the_diffusion_noise(images):
    ex = DiffusionFeatureExtractor(
        "tiny", ["unet-in"], img_size=64, latent="sample", vae_seed=0, variants=[Variant("plain", PROMPT, seed=0)]
    )
    x = ex.resize(images)
    posterior = ex.vae.encode(x).latent_dist
    eps = (ex.encode_images(images) / ex.vae.config.scaling_factor - posterior.mean) / posterior.std
    diffusion = ex._noise(ex.variants[0], eps.shape[1:], 2)
    assert (eps - diffusion).abs().mean() > 0.5  # its own stream (the same map would give ~0)


@pytest.fixture
def v_model(tmp_path) -> Path:
    folder = tmp_path / "tiny-v"
    shutil.copytree(TINY_SD_DIR, folder)
    config_path = folder / "scheduler" / "scheduler_config.json"
    config = json.loads(config_path.read_text())
    config["prediction_type"] = "v_prediction"
    config_path.write_text(json.dumps(config))
    return folder


def test_ddim_chain_of_a_v_prediction_model_matches_diffusers(v_model, images):
    ex = DiffusionFeatureExtractor(
        str(v_model), ["up-level1-upsampler-out"], img_size=64, variants=[Variant("chain", PROMPT, denoise_from=55)]
    )
    ddim = DDIMScheduler.from_config(ex.scheduler.config, set_alpha_to_one=False)
    assert ddim.config.prediction_type == "v_prediction"
    ddim.set_timesteps(1000)
    torch.manual_seed(4)
    x, v = torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 8)
    torch.testing.assert_close(ex.ddim_step(x, v, 55), ddim.step(v, 55, x, eta=0.0).prev_sample, atol=1e-5, rtol=1e-5)
    ex(images[:1])  # the whole chain runs


def test_chain_of_an_unsupported_prediction_type_is_refused(v_model):
    config_path = v_model / "scheduler" / "scheduler_config.json"
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), "prediction_type": "sample"}))
    with pytest.raises(ValueError, match="predicts 'sample'"):
        DiffusionFeatureExtractor(str(v_model), ["unet-in"], img_size=64, variants=[Variant("c", denoise_from=60)])
    DiffusionFeatureExtractor(str(v_model), ["unet-in"], img_size=64)  # a single step does not depend on it


def _hub_cache(root: Path, repo_id: str, source: Path) -> None:
    """The Hugging Face cache layout (blobs, a snapshot of symlinks, refs/main) holding ``source``."""
    repo = root / f"models--{repo_id.replace('/', '--')}"
    revision = "0123456789abcdef0123456789abcdef01234567"
    for file in sorted(p for p in source.rglob("*") if p.is_file()):
        blob = repo / "blobs" / f"{abs(hash(file.relative_to(source).as_posix())):x}"
        blob.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(file, blob)
        link = repo / "snapshots" / revision / file.relative_to(source)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(revision)


def test_hub_id_and_its_downloaded_copy_have_the_same_weights_id(tmp_path, monkeypatch):
    import huggingface_hub.constants

    _hub_cache(tmp_path / "hub", "someone/tiny-sd", TINY_SD_DIR)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    copy = tmp_path / "downloaded"
    shutil.copytree(TINY_SD_DIR, copy)
    (copy / "unet" / "diffusion_pytorch_model.fp16.safetensors").write_bytes(b"an fp16 variant, never read")
    hub_folder, hub_id = resolve_model_folder("someone/tiny-sd")
    assert "snapshots" in str(hub_folder)
    assert hub_id == resolve_model_folder(str(copy))[1] == resolve_model_folder("tiny")[1]


def _description(tmp_path: Path, tiny_parts, **changes) -> dict:
    tmp_path.mkdir(parents=True, exist_ok=True)
    lora = write_random_lora(
        tmp_path / changes.pop("lora_name", "a.safetensors"), tiny_parts.unet, seed=changes.pop("lora_seed", 0)
    )
    variant = dict(name="v", prompt=PROMPT, loras=[LoRA(str(lora), changes.pop("scale", 1.0))])
    variant.update(changes)
    ex = DiffusionFeatureExtractor("tiny", ["up-level1-upsampler-out"], img_size=64, variants=[Variant(**variant)])
    return ex.describe()


def test_checkpoint_comparison_covers_the_whole_variant(tmp_path, tiny_parts):
    base = _description(tmp_path / "a", tiny_parts)
    assert describe_differences(base, _description(tmp_path / "b", tiny_parts, lora_name="moved.safetensors")) == []
    cases = {
        "prompt": dict(prompt="another prompt"),
        "seed": dict(seed=3),
        "denoise_from": dict(denoise_from=60),
        "loras": dict(lora_seed=5),  # other LoRA weights under the same file name
        "scale": dict(scale=0.5),
    }
    for field, change in cases.items():
        (lines,) = [describe_differences(base, _description(tmp_path / field, tiny_parts, **change))]
        wanted = "loras" if field == "scale" else field
        assert len(lines) == 1 and lines[0].startswith(f"variant 'v' {wanted}:"), (field, lines)


def test_checkpoint_with_another_prompt_is_refused_with_what_differs(tiny_parts):
    from csdiff.tasks import SegmentationTask

    def task(prompt: str) -> SegmentationTask:
        return SegmentationTask(
            num_classes=3,
            backbone={"model": "tiny", "img_size": 64},
            variants=[{"name": "plain", "prompt": prompt}],
            head_channels=8,
            aux_channels=8,
        )

    checkpoint = {"state_dict": {k: v for k, v in task(PROMPT).state_dict().items()}}
    trained = task(PROMPT)
    trained.on_save_checkpoint(checkpoint)
    task(PROMPT).on_load_checkpoint(dict(checkpoint, state_dict=dict(checkpoint["state_dict"])))
    with pytest.raises(
        CheckpointMismatchError, match=r"variant 'plain' prompt: .*a red circle.* \(checkpoint\) vs .*a photo.* \(now\)"
    ):
        task("a photo").on_load_checkpoint(checkpoint)
