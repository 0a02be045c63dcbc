"""Backbone loading: single-file checkpoints, hub ids offline, local folders, broken folders, dtypes.

Everything runs on the packaged tiny model, offline; nothing here touches the real network.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import assert_close_up_to_rounding, shapes_images
from ldm_format import diffusers_to_ldm_state_dict
from safetensors.torch import save_file

from csdiff.backbone.loading import (
    BackboneNotAvailableError,
    load_controlnet,
    load_sd_components,
    resolve_model_folder,
)
from csdiff.backbone.tiny import TINY_SD_DIR

HUB_ID = "stable-diffusion-v1-5/stable-diffusion-v1-5"
PARTS = ("unet", "vae", "text_encoder")


@pytest.fixture(scope="module")
def tiny_full():
    """The tiny model with its VAE decoder (a single file holds the whole autoencoder)."""
    return load_sd_components("tiny", load_vae_decoder=True)


@pytest.fixture(scope="module")
def single_files(tiny_full, tmp_path_factory):
    """The tiny model as LDM-named single files: {'safetensors': path, 'ckpt': path}."""
    state = diffusers_to_ldm_state_dict(tiny_full.unet, tiny_full.vae, tiny_full.text_encoder)
    folder = tmp_path_factory.mktemp("single_file")
    st_path, ckpt_path = folder / "tiny-merged.safetensors", folder / "tiny-merged.ckpt"
    save_file(state, str(st_path))
    torch.save({"state_dict": state}, ckpt_path)
    return {"safetensors": st_path, "ckpt": ckpt_path}


@pytest.fixture
def tiny_copy(tmp_path) -> Path:
    dst = tmp_path / "tiny-sd-copy"
    shutil.copytree(TINY_SD_DIR, dst)
    return dst


def _assert_same_parameters(reference, loaded, parts=PARTS, vae_encoder_only=False):
    for part in parts:
        ref = dict(getattr(reference, part).named_parameters())
        got = dict(getattr(loaded, part).named_parameters())
        if part == "vae" and vae_encoder_only:
            ref = {k: v for k, v in ref.items() if not k.startswith(("decoder.", "post_quant_conv."))}
        assert ref.keys() == got.keys(), f"{part}: parameter names differ"
        for name, tensor in ref.items():
            assert got[name].dtype == torch.float32, f"{part}.{name}"
            assert torch.equal(got[name], tensor.float()), f"{part}.{name} differs"


# --- the LDM export itself ---------------------------------------------------------------------


def test_ldm_export_uses_original_names(tiny_full):
    state = diffusers_to_ldm_state_dict(tiny_full.unet, tiny_full.vae, tiny_full.text_encoder)
    n_params = sum(len(getattr(tiny_full, p).state_dict()) for p in PARTS)
    assert len(state) == n_params  # a one-to-one renaming
    unet, vae = "model.diffusion_model.", "first_stage_model."
    for key in (
        # SD 1.x landmarks (diffusers itself detects v1 checkpoints by the first one)
        unet + "output_blocks.11.0.skip_connection.weight",
        unet + "time_embed.0.weight",
        unet + "time_embed.2.bias",
        unet + "input_blocks.0.0.weight",
        unet + "input_blocks.1.0.in_layers.2.weight",
        unet + "input_blocks.1.0.emb_layers.1.weight",
        unet + "input_blocks.1.0.out_layers.3.weight",
        unet + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight",
        unet + "input_blocks.3.0.op.weight",
        unet + "input_blocks.6.0.op.weight",
        unet + "input_blocks.9.0.op.weight",
        unet + "input_blocks.11.0.in_layers.0.weight",
        unet + "middle_block.1.proj_in.weight",
        unet + "middle_block.2.out_layers.3.weight",
        unet + "output_blocks.2.1.conv.weight",  # level without attention: upsampler in slot 1
        unet + "output_blocks.5.2.conv.weight",  # with attention: slot 2
        unet + "output_blocks.8.2.conv.weight",
        unet + "out.0.weight",
        unet + "out.2.weight",
        vae + "encoder.down.0.block.0.conv1.weight",
        vae + "encoder.down.0.downsample.conv.weight",
        vae + "encoder.mid.block_1.norm1.weight",
        vae + "encoder.mid.block_2.conv2.weight",
        vae + "encoder.norm_out.weight",
        vae + "decoder.up.3.upsample.conv.weight",
        vae + "quant_conv.weight",
        vae + "post_quant_conv.weight",
        "cond_stage_model.transformer.text_model.embeddings.position_embedding.weight",
        "cond_stage_model.transformer.text_model.final_layer_norm.weight",
    ):
        assert key in state, key
    n_levels = len(tiny_full.vae.config.block_out_channels)
    last = tiny_full.vae.config.layers_per_block  # decoder levels have one resnet more than encoder levels
    assert vae + f"decoder.up.0.block.{last}.conv2.weight" in state
    assert vae + f"decoder.up.0.block.{last + 1}.conv2.weight" not in state
    assert vae + f"encoder.down.{n_levels - 1}.downsample.conv.weight" not in state  # lowest level: none
    assert vae + "decoder.up.0.upsample.conv.weight" not in state  # LDM's up.0 is the full-resolution level
    assert unet + "output_blocks.11.1.conv.weight" not in state and unet + "output_blocks.11.2.conv.weight" not in state
    # LDM's decoder level i is diffusers' up_blocks[n-1-i]
    assert torch.equal(
        state[vae + "decoder.up.0.block.0.conv1.weight"],
        tiny_full.vae.decoder.up_blocks[n_levels - 1].resnets[0].conv1.weight,
    )
    for part in ("encoder", "decoder"):
        for name in ("q", "k", "v", "proj_out"):
            weight = state[vae + f"{part}.mid.attn_1.{name}.weight"]
            assert weight.ndim == 4 and weight.shape[2:] == (1, 1) and weight.shape[0] == weight.shape[1]
        assert vae + f"{part}.mid.attn_1.norm.weight" in state
    assert not any(".resnets." in k or "down_blocks" in k or "up_blocks" in k for k in state)  # no diffusers names
    assert not any(
        k.startswith(vae) and ("to_out" in k or "group_norm" in k or "shortcut" in k and "nin_" not in k) for k in state
    )


# --- single-file checkpoints -------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["safetensors", "ckpt"])
def test_single_file_round_trip(fmt, single_files, tiny_full):
    path = single_files[fmt]
    parts = load_sd_components(str(path), base_model="tiny")
    _assert_same_parameters(tiny_full, parts, vae_encoder_only=True)
    assert parts.vae.decoder is None  # encoder only, as for folders
    for part in PARTS:
        module = getattr(parts, part)
        assert not module.training and not any(p.requires_grad for p in module.parameters())
    assert parts.spec.model == str(path)
    assert parts.spec.base_model == "tiny"
    assert parts.spec.weights_id and parts.spec.weights_id != tiny_full.spec.weights_id
    assert len(parts.tokenizer) == parts.text_encoder.config.vocab_size


def test_single_file_with_decoder_and_distinct_ids(single_files, tiny_full):
    full = load_sd_components(str(single_files["safetensors"]), base_model="tiny", load_vae_decoder=True)
    _assert_same_parameters(tiny_full, full)
    ckpt = load_sd_components(str(single_files["ckpt"]), base_model="tiny")
    assert ckpt.spec.weights_id != full.spec.weights_id  # different files, different ids


def test_single_file_with_folder_base(single_files, tiny_full, tiny_copy):
    parts = load_sd_components(str(single_files["safetensors"]), base_model=str(tiny_copy))
    _assert_same_parameters(tiny_full, parts, parts=("unet", "text_encoder"))
    assert parts.spec.base_model == str(tiny_copy)


def test_single_file_needs_base_model(single_files):
    with pytest.raises(BackboneNotAvailableError, match="base_model") as err:
        load_sd_components(str(single_files["safetensors"]))
    assert str(single_files["safetensors"]) in str(err.value)


def test_single_file_features_equal_folder_features(single_files):
    from csdiff.backbone.extractor import DiffusionFeatureExtractor

    layers = ["up-level1-upsampler-out"]
    images = shapes_images(2, 64)
    from_file = DiffusionFeatureExtractor(
        model=str(single_files["safetensors"]), base_model="tiny", layers=layers, img_size=64
    )
    from_folder = DiffusionFeatureExtractor(model="tiny", layers=layers, img_size=64)
    a = from_file(images)["plain"][layers[0]]
    b = from_folder(images)["plain"][layers[0]]
    assert a.shape == b.shape and a.shape[0] == 2
    assert_close_up_to_rounding(a, b)  # the same weights; other kernels may sum in another order
    assert from_file.spec.weights_id != from_folder.spec.weights_id


# --- hub ids without network -------------------------------------------------------------------


def test_hub_id_offline_fails_fast(monkeypatch, tmp_path):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))  # an empty cache
    start = time.perf_counter()
    with pytest.raises(BackboneNotAvailableError) as err:
        load_sd_components(HUB_ID)
    assert time.perf_counter() - start < 10
    msg = str(err.value)
    assert HUB_ID in msg and "folder" in msg and "HF_HUB_OFFLINE" in msg


_HUB_SCRIPT = """
import json, sys, time
from csdiff.backbone.loading import BackboneNotAvailableError, load_sd_components
start = time.perf_counter()
try:
    load_sd_components(sys.argv[1])
    result = {"error": None}
except BackboneNotAvailableError as err:
    result = {"error": "BackboneNotAvailableError", "message": str(err)}
except Exception as err:
    result = {"error": type(err).__name__, "message": str(err)}
result["elapsed"] = time.perf_counter() - start
print("RESULT " + json.dumps(result))
"""


def test_hub_id_unreachable_endpoint_fails_fast(tmp_path):
    """Online mode, but the hub endpoint is a closed local port: a clear error at once, no retry loop."""
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith(("HF_", "HUGGINGFACE_"))}
    for var in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        env.pop(var, None)
    env.update(
        HF_ENDPOINT="http://127.0.0.1:9",  # discard port: connection refused
        HF_HOME=str(tmp_path / "hf"),
        HF_HUB_DISABLE_TELEMETRY="1",
        NO_PROXY="127.0.0.1,localhost",
        no_proxy="127.0.0.1,localhost",
        PYTHONPATH=os.pathsep.join([str(Path(__file__).resolve().parents[1]), env.get("PYTHONPATH", "")]),
    )
    proc = subprocess.run(
        [sys.executable, "-c", _HUB_SCRIPT, HUB_ID], env=env, capture_output=True, text=True, timeout=180
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert lines, f"no result (rc={proc.returncode}):\n{proc.stdout}\n{proc.stderr[-3000:]}"
    result = json.loads(lines[-1][len("RESULT ") :])
    assert result["error"] == "BackboneNotAvailableError", result
    assert result["elapsed"] < 10, result
    assert HUB_ID in result["message"] and "folder" in result["message"]
    assert "could not be reached" in result["message"]


# --- local folders -----------------------------------------------------------------------------


def test_local_folder_copy_loads_with_same_id(tiny_copy, tiny_parts):
    parts = load_sd_components(str(tiny_copy))
    assert parts.spec.model == str(tiny_copy)
    assert parts.spec.weights_id == tiny_parts.spec.weights_id
    _assert_same_parameters(tiny_parts, parts, parts=("unet", "text_encoder"))


def test_changed_weight_bytes_change_the_id(tiny_copy, tiny_parts):
    weight_file = tiny_copy / "text_encoder" / "model.safetensors"
    data = bytearray(weight_file.read_bytes())
    data[-1] ^= 0x01  # the last byte is tensor data: still a valid file, one weight slightly changed
    weight_file.write_bytes(bytes(data))
    _, weights_id = resolve_model_folder(str(tiny_copy))
    assert weights_id != tiny_parts.spec.weights_id
    assert load_sd_components(str(tiny_copy)).spec.weights_id == weights_id


def _break_tokenizer(folder: Path, how: str) -> None:
    tok = folder / "tokenizer"
    if how == "missing-vocab":
        (tok / "vocab.json").unlink()
    elif how == "corrupt-vocab":
        (tok / "vocab.json").write_bytes(b'{"a\x00\x01 not json')
    elif how == "truncated-vocab":  # a valid but near-empty vocabulary: loads, with too few tokens
        vocab = json.loads((tok / "vocab.json").read_text())
        kept = dict(list(vocab.items())[:20])
        (tok / "vocab.json").write_text(json.dumps({k: i for i, k in enumerate(kept)}))
        (tok / "merges.txt").write_text("#version: 0.2\n")
    else:
        raise ValueError(how)


@pytest.mark.parametrize("how", ["missing-vocab", "corrupt-vocab", "truncated-vocab"])
def test_broken_tokenizer_is_a_clear_error(how, tiny_copy):
    _break_tokenizer(tiny_copy, how)
    with pytest.raises(BackboneNotAvailableError, match="vocab.json") as err:
        load_sd_components(str(tiny_copy))
    assert str(tiny_copy / "tokenizer") in str(err.value)


@pytest.mark.parametrize("missing", ["/no/such/folder", "/no/such/model.safetensors", "./no-such-dir"])
def test_missing_path_is_named(missing):
    with pytest.raises(BackboneNotAvailableError) as err:
        load_sd_components(missing)
    assert str(Path(missing)) in str(err.value)


def test_folder_without_unet_names_the_subfolder(tiny_copy):
    shutil.rmtree(tiny_copy / "unet")
    with pytest.raises(BackboneNotAvailableError, match=r"missing unet/"):
        load_sd_components(str(tiny_copy))


def test_folder_without_weights(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(BackboneNotAvailableError, match="no weight files"):
        load_sd_components(str(tmp_path / "empty"))


# --- ControlNet and dtypes ---------------------------------------------------------------------


def test_controlnet_loads_frozen():
    controlnet, weights_id = load_controlnet("tiny-controlnet-canny")
    assert not controlnet.training
    assert all(not p.requires_grad for p in controlnet.parameters())
    assert all(p.dtype == torch.float32 for p in controlnet.parameters())
    assert isinstance(weights_id, str) and weights_id


def test_bfloat16_weights():
    parts = load_sd_components("tiny", dtype="bfloat16")
    for part in PARTS:
        dtypes = {p.dtype for p in getattr(parts, part).parameters()}
        assert dtypes == {torch.bfloat16}, (part, dtypes)
    controlnet, _ = load_controlnet("tiny-controlnet-canny", dtype="bfloat16")
    assert {p.dtype for p in controlnet.parameters()} == {torch.bfloat16}


def test_unknown_dtype():
    with pytest.raises(ValueError, match="unknown dtype"):
        load_sd_components("tiny", dtype="float8")
