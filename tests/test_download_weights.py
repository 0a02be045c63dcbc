"""checkpoints_scripts/download_weights.py without a network: which files of a repository it
fetches (from file lists of real hub repositories), the config lines it prints, and its fast,
one-line failure offline. The hub calls themselves are never made here."""

from __future__ import annotations

import shlex
import socket
import time
from pathlib import Path

import pytest
import yaml
from helpers import load_script

from csdiff.backbone.loading import SNAPSHOT_SUBFOLDERS, WEIGHT_SUBFOLDERS, weights_fingerprint

dw = load_script("download_weights", "checkpoints_scripts")

SD15 = [  # stable-diffusion-v1-5/stable-diffusion-v1-5
    ".gitattributes",
    "README.md",
    "model_index.json",
    "v1-5-pruned.safetensors",
    "v1-5-pruned-emaonly.safetensors",
    "v1-5-pruned-emaonly.ckpt",
    "v1-inference.yaml",
    "feature_extractor/preprocessor_config.json",
    "safety_checker/config.json",
    "safety_checker/model.safetensors",
    "safety_checker/model.fp16.safetensors",
    "scheduler/scheduler_config.json",
    "text_encoder/config.json",
    "text_encoder/model.safetensors",
    "text_encoder/model.fp16.safetensors",
    "text_encoder/pytorch_model.bin",
    "tokenizer/merges.txt",
    "tokenizer/special_tokens_map.json",
    "tokenizer/tokenizer_config.json",
    "tokenizer/vocab.json",
    "unet/config.json",
    "unet/diffusion_pytorch_model.safetensors",
    "unet/diffusion_pytorch_model.fp16.safetensors",
    "unet/diffusion_pytorch_model.non_ema.safetensors",
    "unet/diffusion_pytorch_model.bin",
    "vae/config.json",
    "vae/diffusion_pytorch_model.safetensors",
    "vae/diffusion_pytorch_model.fp16.safetensors",
]
SD15_READ = [
    "model_index.json",
    "scheduler/scheduler_config.json",
    "text_encoder/config.json",
    "text_encoder/model.safetensors",
    "tokenizer/merges.txt",
    "tokenizer/special_tokens_map.json",
    "tokenizer/tokenizer_config.json",
    "tokenizer/vocab.json",
    "unet/config.json",
    "unet/diffusion_pytorch_model.safetensors",
    "vae/config.json",
    "vae/diffusion_pytorch_model.safetensors",
]
SDXL_EXTRA = [  # stabilityai/stable-diffusion-xl-base-1.0 adds these (among others)
    "sd_xl_base_1.0.safetensors",
    "text_encoder_2/config.json",
    "text_encoder_2/model.safetensors",
    "text_encoder_2/model.fp16.safetensors",
    "tokenizer_2/merges.txt",
    "tokenizer_2/vocab.json",
    "vae_1_0/config.json",
    "vae_1_0/diffusion_pytorch_model.safetensors",
    "vae_decoder/model.onnx",
]
CONTROLNET = [  # lllyasviel/control_v11p_sd15_canny
    ".gitattributes",
    "README.md",
    "config.json",
    "diffusion_pytorch_model.bin",
    "diffusion_pytorch_model.fp16.bin",
    "diffusion_pytorch_model.fp16.safetensors",
    "diffusion_pytorch_model.safetensors",
    "images/input.png",
    "images/image_out.png",
]
LORAS = [".gitattributes", "README.md", "style/style_v1.safetensors", "style/style_v2.safetensors", "preview.png"]


def test_pipeline_fetches_the_components_csdiff_loads_without_duplicates():
    assert dw.select_files("sd15", SD15) == ("pipeline", SD15_READ)
    kind, files = dw.select_files("sdxl", SD15 + SDXL_EXTRA)
    assert kind == "pipeline"
    assert set(files) - set(SD15_READ) == {
        "text_encoder_2/config.json",
        "text_encoder_2/model.safetensors",
        "tokenizer_2/merges.txt",
        "tokenizer_2/vocab.json",
    }


def test_transformer_pipelines_fetch_their_transformer_and_t5_files():
    """A PixArt/SD3-style repository: transformer/, T5 sharded in two precisions, SentencePiece."""
    files = [
        "model_index.json",
        "scheduler/scheduler_config.json",
        "transformer/config.json",
        "transformer/diffusion_pytorch_model.safetensors",
        "vae/config.json",
        "vae/diffusion_pytorch_model.safetensors",
        "text_encoder_3/config.json",
        "text_encoder_3/model.safetensors.index.json",
        "text_encoder_3/model-00001-of-00002.safetensors",
        "text_encoder_3/model-00002-of-00002.safetensors",
        "text_encoder_3/model.fp16-00001-of-00002.safetensors",
        "text_encoder_3/model.fp16-00002-of-00002.safetensors",
        "tokenizer_3/spiece.model",
        "tokenizer_3/tokenizer_config.json",
        "safety_checker/model.safetensors",
    ]
    kind, chosen = dw.select_files("sd3", files)
    assert kind == "pipeline"
    assert set(files) - set(chosen) == {
        "text_encoder_3/model.fp16-00001-of-00002.safetensors",
        "text_encoder_3/model.fp16-00002-of-00002.safetensors",
        "safety_checker/model.safetensors",
    }


def test_pipeline_without_safetensors_weights_is_refused():
    files = [f for f in SD15 if f != "unet/diffusion_pytorch_model.safetensors"]
    with pytest.raises(dw.DownloadError, match="unet has no .safetensors weights"):
        dw.select_files("old/pipeline", files)


def _fill(folder: Path, files: list[str]) -> None:
    for name in files:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(name.encode() * 3)  # content fixed by the name: equal across folders


@pytest.mark.parametrize(
    ("files", "subfolders"),
    [(SD15 + SDXL_EXTRA, WEIGHT_SUBFOLDERS), (CONTROLNET, None)],
    ids=["pipeline", "controlnet"],
)
def test_downloaded_folder_has_the_fingerprint_of_the_hub_id(files, subfolders, tmp_path):
    """A checkpoint trained on the hub id runs with the downloaded folder: the two hold the
    same weight files as far as the fingerprint reads them (the hub id's snapshot patterns
    are those of csdiff.backbone.loading)."""
    from huggingface_hub.utils import filter_repo_objects

    allow = (
        ["*.json", "*.txt", "*.safetensors"]
        if subfolders is None
        else (
            ["model_index.json"]
            + [f"{s}/*.{ext}" for s in SNAPSHOT_SUBFOLDERS for ext in ("json", "txt", "safetensors")]
        )
    )
    hub = list(filter_repo_objects(files, allow_patterns=allow, ignore_patterns=["*.fp16.*", "*non_ema*", "*.ema.*"]))
    _fill(tmp_path / "hub", hub)
    _fill(tmp_path / "download", dw.select_files("repo", files)[1])
    assert weights_fingerprint(tmp_path / "download", subfolders) == weights_fingerprint(tmp_path / "hub", subfolders)


def test_controlnet_fetches_its_config_and_safetensors_weights():
    assert dw.select_files("cn", CONTROLNET) == ("controlnet", ["config.json", "diffusion_pytorch_model.safetensors"])
    with pytest.raises(dw.DownloadError, match="no diffusion_pytorch_model.safetensors"):
        dw.select_files("old/cn", ["config.json", "diffusion_pytorch_model.bin"])
    dw.check_controlnet_config("cn", {"_class_name": "ControlNetModel"})
    with pytest.raises(dw.DownloadError, match="holds a UNet2DConditionModel .*not a ControlNet"):
        dw.check_controlnet_config("unet-only", {"_class_name": "UNet2DConditionModel"})


def test_lora_repo_fetches_the_one_file_asked():
    assert dw.select_files("one", ["README.md", "pytorch_lora_weights.safetensors"]) == (
        "lora",
        ["pytorch_lora_weights.safetensors"],
    )
    with pytest.raises(dw.DownloadError, match=r"holds 2 \.safetensors files .*style_v1.*style_v2.*--file NAME"):
        dw.select_files("several", LORAS)
    assert dw.select_files("several", LORAS, "style_v2.safetensors") == ("lora", ["style/style_v2.safetensors"])
    assert dw.select_files("several", LORAS, "style/style_v1.safetensors") == ("lora", ["style/style_v1.safetensors"])
    with pytest.raises(
        dw.DownloadError, match="no .safetensors file 'v3.safetensors'; its .safetensors files: style/style_v1"
    ):
        dw.select_files("several", LORAS, "v3.safetensors")
    twins = ["a/x.safetensors", "b/x.safetensors"]
    with pytest.raises(dw.DownloadError, match="several files named 'x.safetensors'"):
        dw.select_files("twins", twins, "x.safetensors")
    assert dw.select_files("twins", twins, "b/x.safetensors") == ("lora", ["b/x.safetensors"])


def test_repos_csdiff_cannot_read_are_refused():
    with pytest.raises(dw.DownloadError, match="holds nothing csdiff reads"):
        dw.select_files("pickles", ["README.md", "model.ckpt", "model.pth"])
    with pytest.raises(dw.DownloadError, match="is a pipeline repository: --file picks one file"):
        dw.select_files("sd15", SD15, "v1-5-pruned.safetensors")


@pytest.mark.parametrize("path", ["/weights/sd15", "/data/my weights, v2/sd #1", "/w/null", "/w/{x}: y"])
def test_printed_config_lines_read_back_as_the_path(path):
    backbone, _, cli = dw.config_lines("pipeline", path)[1:]
    assert yaml.safe_load(backbone) == {"backbone": {"model": path}}
    assert shlex.split(cli) == ["--model.init_args.backbone.model", path]
    assert yaml.safe_load(dw.config_lines("controlnet", path)[1]) == {"controlnets": [{"model": path}]}
    assert yaml.safe_load(dw.config_lines("lora", path)[1]) == {"loras": [{"path": path}]}
    assert dw.config_lines("pipeline", "/weights/sd15")[1] == "  backbone: {model: /weights/sd15}"


@pytest.mark.parametrize("extra", [[], ["--file", "style_v2.safetensors"]], ids=["repo", "lora-file"])
def test_offline_download_fails_at_once_in_one_line(extra, tmp_path, capsys):
    """The real hub client with HF_HUB_OFFLINE=1 (set for every test): no retries, one line."""
    from huggingface_hub import constants

    assert constants.HF_HUB_OFFLINE
    start = time.monotonic()
    assert dw.main(["someone/some-model", "--out", str(tmp_path / "w"), *extra]) == 1
    assert time.monotonic() - start < 5
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert captured.out == "" and len(err) == 1
    assert err[0].startswith("download_weights: error: cannot download someone/some-model: HF_HUB_OFFLINE is set")
    assert not (tmp_path / "w").exists()


def test_unreachable_hub_fails_at_once_in_one_line():
    """Without HF_HUB_OFFLINE but without a network, one connection attempt decides (the hub
    client would retry for ~25 s): a closed port on this machine stands in for the hub."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    start = time.monotonic()
    with pytest.raises(dw.DownloadError, match=f"cannot reach the Hugging Face hub at http://127.0.0.1:{port} "):
        dw.check_hub_reachable(f"http://127.0.0.1:{port}", timeout=5)
    assert time.monotonic() - start < 5
