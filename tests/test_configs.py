"""Every shipped config parses, and runs a couple of steps with the tiny backbone substituted."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from helpers import load_script, write_kohya_lora

from csdiff.backbone.random_models import meta_unet, write_random_lora
from csdiff.cli import main, run_lightning

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))
make_fake_ade20k = load_script("make_fake_ade20k").make_fake_ade20k
make_fake_cityscapes = load_script("make_fake_cityscapes").make_fake_cityscapes
make_fake_spair = load_script("make_fake_spair").make_fake_spair
make_fake_ddpmseg = load_script("make_fake_ddpmseg").make_fake_ddpmseg
TASKS = {
    "csdiff.tasks.SegmentationTask": "val/mIoU",
    "csdiff.tasks.CorrespondenceTask": "val/pck_bbox_point",
    "csdiff.tasks.ScarceSegmentationTask": "test/mIoU",  # no validation split: fit, then test
    "csdiff.tasks.LoRATrainingTask": "train/loss",  # nothing to validate: the fit's own loss
}


def test_configs_exist():
    names = {p.name for p in CONFIGS}
    assert {
        "quickstart.yaml",
        "seg_ade20k.yaml",
        "seg_ade20k_public.yaml",
        "seg_cityscapes.yaml",
        "seg_cityscapes_public.yaml",
    } <= names
    assert {
        "corr_spair.yaml",
        "corr_spair_nn.yaml",
        "corr_spair_public.yaml",
        "corr_spair_nn_public.yaml",
        "corr_spair_zeroshot.yaml",
    } <= names
    assert {
        "scarce_horse21.yaml",
        "scarce_bedroom28.yaml",
        "scarce_horse21_public.yaml",
        "scarce_bedroom28_public.yaml",
    } <= names


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.name)
def test_config_parses(config, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(config), "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["class_path"] in TASKS


def _tiny_lora(path: Path) -> str:
    """A small kohya LoRA for the tiny UNet (stands in for the paper's dataset LoRAs)."""
    g = torch.Generator().manual_seed(len(path.name))
    module = "up_blocks.2.attentions.0.transformer_blocks.0.attn1.to_q"
    write_kohya_lora(
        path, {module: (torch.randn(4, 64, generator=g) * 0.1, torch.randn(64, 4, generator=g) * 0.1, 4.0)}
    )
    return str(path)


PAPER_CONFIGS = [
    c for c in CONFIGS if c.name not in ("quickstart.yaml", "lora_quickstart.yaml", "assess_quickstart.yaml")
]  # the quickstarts: tiny, CPU
# random-sd15 stands in for SD 1.5: the configs of other families (SD 2.1, SDXL) are instantiated
# with it (no model call) but run on the tiny models of their own family (tests/test_families.py).
SD15_CONFIGS = [
    c
    for c in PAPER_CONFIGS
    if "stable-diffusion-v1-5" in yaml.safe_load(c.read_text())["model"]["init_args"]["backbone"]["model"]
]
# Every config runs on tiny and is instantiated at SD 1.5 size (float16). At SD size, one run per
# code path: a `_public` config is its paper config less the LoRA variants, Bedroom-28 differs
# from Horse-21 in its data only, the LoRA-training configs in their images only, and
# corr_spair_nn.yaml from corr_spair.yaml in its parameter-free head only.
SD15_RUNS = [
    c
    for c in SD15_CONFIGS
    if not c.stem.endswith("_public")
    and "bedroom28" not in c.stem
    and c.name != "corr_spair_nn.yaml"
    and (not c.name.startswith("lora_") or c.name == "lora_ade20k.yaml")
]


# A diffusion-transformer config runs on a tiny model of its family, and at real size on its random model.
# (FLUX's is shape-only: meta tensors; its configs run on the tiny FLUX only.)
DIT_RANDOM = {"PixArt": "random-pixart-alpha", "stable-diffusion-3": "random-sd3-medium", "FLUX": "random-flux1-dev"}


def _dit(config: dict) -> str | None:
    """The DIT_RANDOM key of a diffusion-transformer config's backbone, or None (an SD-family config)."""
    model = config["model"]["init_args"]["backbone"]["model"]
    return next((key for key in DIT_RANDOM if key in model), None)


@pytest.fixture(scope="module")
def tiny_dits(tmp_path_factory) -> dict[str, str]:
    work = tmp_path_factory.mktemp("dits")
    return {
        "PixArt": str(load_script("make_tiny_pixart").make_tiny_pixart(work / "tiny-pixart", sigma=True)),
        "stable-diffusion-3": str(load_script("make_tiny_sd3").make_tiny_sd3(work / "tiny-sd3")),
        "FLUX": str(load_script("make_tiny_flux").make_tiny_flux(work / "tiny-flux")),
    }


def _trains(config: dict) -> bool:
    """False for a zero-shot config (nothing to train: it is run with `test`)."""
    model = config["model"]["init_args"]
    return not (model.get("fusion") == "mean" and model.get("head") == "nn")


def _substitute_models(model: dict, tmp: Path, backbone: str, controlnet: str, lora) -> None:
    """Point a config's backbone, ControlNets and LoRA placeholders at models that exist here."""
    model["backbone"]["model"] = backbone
    for i, variant in enumerate(
        [*model.get("variants", []), *([model["attention_variant"]] if model.get("attention_variant") else [])]
    ):
        for cn in variant.get("controlnets", []):
            cn["model"] = controlnet
        for j, entry in enumerate(variant.get("loras", [])):
            entry["path"] = lora(tmp / f"lora_{i}_{j}.safetensors", seed=10 * i + j)


def _substitute_tiny(
    config: dict, tmp: Path, backbone: str = "tiny", controlnet: str = "tiny-controlnet-canny", lora=None
) -> dict:
    """Same config, another backbone (tiny by default) at img_size 64 in float32, generated LoRAs,
    fake data, a couple of steps."""
    model = config["model"]["init_args"]
    _substitute_models(model, tmp, backbone, controlnet, lora or (lambda path, seed: _tiny_lora(path)))
    model["backbone"].update(img_size=64, dtype="float32")
    lora = config["data"]["class_path"].endswith("LoRAImagesDataModule")  # LoRA training: a dataset's datamodule inside
    section = config["data"]["init_args"]["source"] if lora else config["data"]
    data = section["init_args"]
    if section["class_path"].endswith("SPairDataModule"):
        if not lora:
            model["eval_size"] = 64
        data.update(root=str(make_fake_spair(tmp / "SPair-71k")[0]), img_size=64)
    elif config["model"]["class_path"].endswith("SegmentationTask") and "Scarce" not in config["model"]["class_path"]:
        model.update(slide_crop=64, slide_stride=64)
    if section["class_path"].endswith("ADE20KDataModule"):
        data["root"] = str(make_fake_ade20k(tmp / "ADEChallengeData2016", n_train=2, n_val=1, size=(64, 80)))
        data.update(crop_size=64, scale=[128, 64], eval_resize=["short", 64])
    elif section["class_path"].endswith("CityscapesDataModule"):
        data["root"] = str(make_fake_cityscapes(tmp / "cityscapes", n_per_city=1, size=(64, 128)))
        data.update(crop_size=64, scale=[128, 64])
    elif section["class_path"].endswith("DDPMSegDataModule"):
        root = make_fake_ddpmseg(tmp / data["dataset"], data["dataset"], num_train=2, num_test=1)
        data.update(root=str(root), features=str(tmp / "features"))
        if (
            data.pop("extra_features", None) is not None
        ):  # ADM features: tests/test_adm.py writes a folder and the datamodule reads it
            model["extra_channels"] = 0
    elif section["class_path"].endswith("QuickstartDataModule"):
        data.update(root=str(tmp / "quickstart" / "ADEChallengeData2016"), num_train=4, num_val=1, size=64)
    config["data"]["init_args"]["num_workers"] = 0
    trainer = config["trainer"]
    trainer["precision"] = "32-true"  # the LoRA configs' 16-mixed is for GPUs
    trainer.update(
        max_steps=2,
        max_epochs=-1,
        limit_val_batches=1,
        limit_test_batches=1,
        enable_progress_bar=False,
        accelerator="cpu",
        devices=1,
    )
    trainer.update(val_check_interval=2, check_val_every_n_epoch=None)  # validate after the 2 steps
    trainer["logger"]["init_args"]["save_dir"] = str(tmp / "logs")
    for callback in trainer["callbacks"]:
        args = callback.setdefault("init_args", {})
        if "every_n_train_steps" in args:
            args["every_n_train_steps"] = 2
        if "output_dir" in args:
            args["output_dir"] = str(tmp / "predictions")
    return config


def _run(config: dict, path: Path, test: bool = True):
    """Fit 2 steps and validate, or, for a zero-shot config, test; returns the CLI and the score's name.
    A label-scarce config (no validation split) is tested after the fit unless ``test`` is false."""
    path.write_text(yaml.safe_dump(config))
    score = TASKS[config["model"]["class_path"]]
    if not _trains(config):
        return run_lightning(["test", "--config", str(path)]), score.replace("val/", "test/")
    cli = run_lightning(["fit", "--config", str(path)])
    assert cli.trainer.global_step == 2
    if not score.startswith("test/"):
        return cli, score
    if not test:
        return cli, "train/loss"
    cli.trainer.test(cli.model, datamodule=cli.datamodule)
    return cli, score


@pytest.mark.parametrize(
    "config", [c for c in CONFIGS if c.name != "assess_quickstart.yaml"], ids=lambda p: p.name
)  # the assess config is run by `csdiff assess` in tests/test_assess.py
def test_config_runs_with_tiny_backbone(config, tmp_path, tiny_dits):
    text = yaml.safe_load(config.read_text())
    backbone = tiny_dits[_dit(text)] if _dit(text) else "tiny"
    cli, score = _run(_substitute_tiny(text, tmp_path, backbone), tmp_path / config.name)
    assert score in cli.trainer.callback_metrics
    if _dit(text) and score.startswith("val/"):  # the new families' configs: fit → test, as their issue asks
        cli.trainer.test(cli.model, datamodule=cli.datamodule)
        assert score.replace("val/", "test/") in cli.trainer.callback_metrics


# --- the paper configs at SD 1.5 size (random-sd15: SD 1.5's architecture, random weights) ---


@pytest.fixture(scope="module")
def sd15_lora_unet():
    """An SD 1.5-shaped UNet on the meta device: only its layer widths are read, to size LoRAs."""
    return meta_unet()


@pytest.mark.parametrize("config", PAPER_CONFIGS, ids=lambda p: p.name)
def test_paper_config_instantiates_at_sd15_size_in_its_dtype_without_running_the_model(
    config, tmp_path, sd15_lora_unet, two_threads, free_after
):
    """The config's own img_size (512) and dtype (float16; float32 where the reference ran
    float32: DIFT's setting): the constructor must not extract."""
    import importlib

    from diffusers import (
        ControlNetModel,
        FluxTransformer2DModel,
        PixArtTransformer2DModel,
        SD3Transformer2DModel,
        UNet2DConditionModel,
    )
    from diffusers.models.autoencoders.vae import Encoder
    from torch._subclasses.fake_tensor import FakeTensor

    text = yaml.safe_load(config.read_text())
    model = text["model"]["init_args"]
    lora = lambda path, seed: str(write_random_lora(path, sd15_lora_unet, seed=seed))  # noqa: E731
    family = _dit(text)
    _substitute_models(
        model, tmp_path, DIT_RANDOM[family] if family else "random-sd15", "random-sd15-controlnet-canny", lora
    )
    dtype = model["backbone"]["dtype"]
    expected = "bfloat16" if family in ("stable-diffusion-3", "FLUX") else "float16"  # bf16: how SD3, FLUX run
    assert (dtype == expected or config.name == "corr_spair_zeroshot_sd21.yaml") and model["backbone"]["img_size"] in (
        512,
        768,
        1024,
    )
    module, name = text["model"]["class_path"].rsplit(".", 1)
    task_class = getattr(importlib.import_module(module), name)
    # Encoder: the VAE's, which `vae.encode` runs
    heavy = (
        UNet2DConditionModel,
        PixArtTransformer2DModel,
        SD3Transformer2DModel,
        FluxTransformer2DModel,
        ControlNetModel,
        Encoder,
    )
    real_calls = []

    def count(module, args):  # a pre-hook: a call counts when it starts (the extractor stops the UNet early)
        if isinstance(module, heavy) and not any(isinstance(a, FakeTensor) for a in args):
            real_calls.append(type(module).__name__)

    handle = torch.nn.modules.module.register_module_forward_pre_hook(count)
    try:
        task = task_class(**model)
    finally:
        handle.remove()
    assert real_calls == []
    if name == "LoRATrainingTask":  # float16 frozen model, float32 adapters (mixed precision, as kohya)
        assert {p.dtype for p in _frozen_parameters(task)} == {torch.float16}
        assert {p.dtype for p in task.adapter_parameters().values()} == {torch.float32} and task.img_size == 512
        return
    assert {p.dtype for p in task.extractor.unet.parameters()} == {getattr(torch, dtype)}
    if name == "SegmentationTask" and model["layers"] == [
        "up-level0-upsampler-out",
        "up-level1-upsampler-out",
        "up-level2-upsampler-out",
    ]:
        assert task.levels == ["up-level2-upsampler-out", "up-level1-upsampler-out", "up-level0-upsampler-out"]
        assert task.gate.in_channels == (640, 1280, 1280)  # SD 1.5 at 512: 640@64², 1280@32², 1280@16²
    elif name == "ScarceSegmentationTask":  # the paper's label-scarce features: legacy + up_cross, per variant
        assert task.channels == 3520 + 154 and len(task.ensemble.members) == 10
    elif model.get("attention_variant"):  # the paper's correspondence features: legacy + up_cross at 64²
        assert task.grid == model["backbone"]["img_size"] // 8 and task.head.out_channels == 3520 + 154
    backbone = {id(p) for p in task.extractor.parameters()}
    trainable = [p for p in task.parameters() if p.requires_grad]
    assert bool(trainable) == _trains(text) and not any(id(p) in backbone for p in trainable)


def at_real_size(config: dict) -> dict:
    """A substituted config made fit for a run at a real model's widths: denoising chains cut to
    one guided step (``denoise_from`` = t + 1: the chain's code path is the same, each step is a
    denoiser call at real size), no checkpoint files (gate + AdamW state: gigabytes), no sanity
    validation."""
    model = config["model"]["init_args"]
    for variant in [
        *model.get("variants", []),
        *([model["attention_variant"]] if model.get("attention_variant") else []),
    ]:
        if variant.get("denoise_from") is not None:
            variant["denoise_from"] = model["backbone"]["timestep"] + 1
    trainer = config["trainer"]
    trainer["callbacks"] = [c for c in trainer["callbacks"] if not c["class_path"].endswith("ModelCheckpoint")]
    trainer.update(enable_checkpointing=False, num_sanity_val_steps=0)
    return config


def _frozen_parameters(task) -> list:
    """The frozen backbone's parameters: the extractor's, or a LoRA task's model less its adapters."""
    if hasattr(task, "extractor"):
        return list(task.extractor.parameters())
    return [p for name, p in task.named_parameters() if ".lora_A." not in name and ".lora_B." not in name]


def _release(cli) -> None:
    """Free an SD-size run's ~10 GB now. After the test the CLI object stays alive (its
    reference cycle is not collected, held from outside Python's collector), and the next run
    beside it would not fit a 24 GB machine: drop the optimizer state, move the task to meta."""
    for optimizer in cli.trainer.optimizers:
        optimizer.state.clear()
    cli.model.to("meta")


@pytest.mark.parametrize("config", SD15_RUNS, ids=lambda p: p.name)
def test_paper_config_runs_with_random_sd15(config, tmp_path, sd15_lora_unet, two_threads, free_after):
    """2 steps + validation (or, zero-shot, a test batch) through the CLI with SD 1.5's real
    widths (small images, float32).

    Without checkpoint files: at SD 1.5 widths each holds ~3.7 GB of gate and AdamW state,
    and writing them is what the tiny runs above already test. Denoising chains are cut to one
    guided step (``denoise_from`` = t + 1): the chain's code path is the same, its length is not
    what this checks, and each step is a UNet call at SD size.
    """
    text = yaml.safe_load(config.read_text())
    lora = lambda path, seed: str(write_random_lora(path, sd15_lora_unet, seed=seed))  # noqa: E731
    config_dict = at_real_size(_substitute_tiny(text, tmp_path, "random-sd15", "random-sd15-controlnet-canny", lora))
    # label-scarce: extract -> 2 training steps; testing one 256² image at SD widths (65536 pixels ×
    # 3674 channels × 4 variants through 10 MLPs) is the tiny run's plumbing at minutes of CPU time
    cli, score = _run(config_dict, tmp_path / config.name, test=False)
    assert score in cli.trainer.callback_metrics
    frozen = _frozen_parameters(cli.model)
    assert not any(p.requires_grad for p in frozen)
    if _trains(config_dict):
        in_optimizer = {id(p) for group in cli.trainer.optimizers[0].param_groups for p in group["params"]}
        assert not in_optimizer & {id(p) for p in frozen}
    _release(cli)
