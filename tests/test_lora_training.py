"""LoRA training as a task: `csdiff fit --config configs/lora_*.yaml` on the tiny model.

One in-process fit of the shipped quickstart LoRA config (shrunk to 64² and 30 steps, text
encoder adapted too) is shared by the tests of the loss, the checkpoint and the LoRA file;
the resume test runs real processes, one of them SIGKILLed, as tests/test_resume.py does.
"""

from __future__ import annotations

import signal
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from helpers import assert_close_up_to_rounding, load_script
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors import safe_open
from safetensors.torch import load_file
from test_resume import HANG_ENV, TRACE_ENV, assert_same_weights, finish, load, start

from csdiff.backbone import DiffusionFeatureExtractor, LoRA, Variant
from csdiff.backbone.lora_files import kohya_delta, kohya_name
from csdiff.backbone.prompts import encode_prompt, prompt_windows
from csdiff.cli import main
from csdiff.data.lora_images import LoRAImagesDataModule, draw_images, training_images
from csdiff.data.segmentation import collate_segmentation
from csdiff.tasks import LoRATrainingTask
from csdiff.tasks.lora_training import lora_layers, text_encoder_targets, unet_targets

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "lora_quickstart.yaml"
STEPS = 30
PROMPT = "a photo of shapes on a background"
make_fake_ade20k = load_script("make_fake_ade20k").make_fake_ade20k


def shrunk_config(work: Path, name: str, steps: int, every: int, save_dir: str | None = None, **model: object) -> Path:
    """The shipped lora_quickstart.yaml at 64² on 8 images (batch 2: 4 steps an epoch), logging
    every step into ``save_dir`` (default ``work/name/outputs``), a checkpoint (and LoRA file)
    every ``every`` steps."""
    config = yaml.safe_load(CONFIG.read_text())
    trainer = config["trainer"]
    trainer.update(max_steps=steps, log_every_n_steps=1, enable_progress_bar=False)
    trainer["logger"]["init_args"]["save_dir"] = save_dir or str(work / name / "outputs")
    for callback in trainer["callbacks"]:
        if callback["class_path"].endswith("ModelCheckpoint"):
            callback["init_args"]["every_n_train_steps"] = every
    config["model"]["init_args"]["backbone"]["img_size"] = 64
    config["model"]["init_args"].update(model)
    data = config["data"]["init_args"]
    data.update(num_images=8, batch_size=2)
    data["source"]["init_args"].update(
        root=str(work / "data" / "ADEChallengeData2016"), num_train=16, num_val=1, size=64
    )
    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    """A work folder with the shrunk quickstart images generated once (before processes race to)."""
    from csdiff.data import QuickstartDataModule

    work = tmp_path_factory.mktemp("lora")
    QuickstartDataModule(
        root=str(work / "data" / "ADEChallengeData2016"), num_train=16, num_val=1, size=64
    ).prepare_data()
    return work


@pytest.fixture(scope="module")
def trained(work) -> Path:
    """One 30-step fit, text encoder adapted too; returns its run folder."""
    config = shrunk_config(work, "fit", STEPS, every=10, lr=3e-3, train_text_encoder=True, sample_every_n_steps=10)
    assert main(["fit", "--config", str(config)]) == 0
    return work / "fit" / "outputs" / "version_0"


@pytest.fixture(scope="module")
def trained_task(trained) -> LoRATrainingTask:
    """The trained task rebuilt from its last.ckpt (hyperparameters and adapters), as Lightning loads it."""
    return LoRATrainingTask.load_from_checkpoint(trained / "checkpoints" / "last.ckpt", weights_only=True).eval()


def tensorboard_events(run: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    return events


def set_adapters(task: LoRATrainingTask, enabled: bool) -> None:
    for model in (task.sd.unet, task.sd.text_encoder):
        for layer in lora_layers(model).values():
            layer.enable_adapters(enabled)


@torch.no_grad()
def fixed_loss(task: LoRATrainingTask, images: torch.Tensor) -> float:
    """The training loss on fixed draws: the same latents, noise and timesteps (spread over the
    schedule) for every model compared."""
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)  # the VAE posterior sample
    latents = task.encode_images(images)
    emb, added = task.conditioning([None] * len(images))
    losses = []
    for t in range(50, 1000, 100):
        noise = torch.randn(latents.shape, generator=gen)
        steps = torch.full((len(images),), t)
        noisy = task.noise_scheduler.add_noise(latents, noise, steps)
        losses.append(F.mse_loss(task.predict(noisy, steps, emb, added), task.target(latents, noise, steps)).item())
    return float(np.mean(losses))


def test_training_lowers_the_loss(trained, trained_task):
    """Logged per step to TensorBoard: the last steps' loss is below the first steps'; on fixed
    draws (the same images, noise and timesteps) the trained adapters beat the base model
    (adapters off = the initial state, lora_B starts at zero); x0 pictures are logged."""
    events = tensorboard_events(trained)
    losses = [e.value for e in events.Scalars("train/loss")]
    assert len(losses) == STEPS and all(np.isfinite(losses))
    first, last = np.mean(losses[:5]), np.mean(losses[-5:])
    print(f"\nlogged loss: first 5 steps {first:.4f}, last 5 steps {last:.4f}")
    assert last < first
    dataset = _dataset(trained)
    images = torch.stack([dataset[i]["image"] for i in range(4)])
    trained_loss = fixed_loss(trained_task, images)
    set_adapters(trained_task, False)
    try:
        base_loss = fixed_loss(trained_task, images)
    finally:
        set_adapters(trained_task, True)
    print(f"fixed-draw loss: base {base_loss:.4f}, trained {trained_loss:.4f}")
    assert trained_loss < 0.95 * base_loss
    assert {"samples/x0_t500_0", "samples/x0_t500_1"} <= set(events.Tags()["images"])
    assert len(events.Images("samples/x0_t500_0")) == STEPS // 10  # steps 0, 10, 20


def _dataset(run: Path):
    """The run's training images (its datamodule rebuilt from the run's config.yaml)."""
    config = yaml.safe_load((run / "config.yaml").read_text())["data"]["init_args"]
    source = config["source"]
    from csdiff.data import QuickstartDataModule

    dm = LoRAImagesDataModule(
        source=QuickstartDataModule(**source["init_args"]), num_images=config["num_images"], size=64
    )
    dm.setup("fit")
    return dm.dataset


def test_checkpoint_holds_only_the_adapters(trained, trained_task, tiny_parts):
    """last.ckpt: the adapters (lora_A / lora_B of every adapted UNet and text-encoder layer) and
    their AdamW state, nothing of the frozen model; the LoRA file was written beside it."""
    ckpt = load(trained / "checkpoints" / "last.ckpt")
    assert ckpt["global_step"] == STEPS
    n_unet, n_te = len(unet_targets(tiny_parts.unet)), len(text_encoder_targets(tiny_parts.text_encoder))
    assert (n_unet, n_te) == (
        277,
        12,
    )  # every Linear/Conv2d of the attentions, ResNets, samplers; q, k, v, out, fc1, fc2 × 2 layers
    n_layers = len(lora_layers(trained_task.sd.unet)) + len(lora_layers(trained_task.sd.text_encoder))
    assert n_layers == n_unet + n_te
    keys = ckpt["state_dict"].keys()
    assert len(keys) == 2 * n_layers and all(".lora_A." in k or ".lora_B." in k for k in keys)
    assert len(ckpt["optimizer_states"][0]["state"]) == 2 * n_layers
    assert ckpt["csdiff_lora"]["modules"] == {"unet": n_unet, "text_encoder": n_te}
    assert (trained / "lora.safetensors").is_file()


def test_lora_file_is_a_usable_variant_lora(trained):
    """The file loads into a variant: every module in it is applied (adapted layers in the
    extractor's UNet and text encoder = modules in the file), and the features change."""
    path = str(trained / "lora.safetensors")
    with safe_open(path, "pt") as f:
        names = {k.rsplit(".", 2)[0] for k in f.keys() if k.endswith(".alpha")}
        metadata = f.metadata()
    assert metadata["ss_network_dim"] == "8" and metadata["csdiff_global_step"] == str(STEPS)
    extractor = DiffusionFeatureExtractor(
        "tiny",
        layers=["up-level2-upsampler-out", "unet-out"],
        img_size=64,
        variants=[Variant("plain", prompt=PROMPT), Variant("lora", prompt=PROMPT, loras=[LoRA(path)])],
    )
    adapter = extractor.loras.load(path)
    applied = sum(
        isinstance(m, BaseTunerLayer) and adapter in getattr(m, "lora_A", {})
        for model in (extractor.unet, extractor.text_encoder)
        for m in model.modules()
    )
    assert applied == len(names) and any(n.startswith("lora_te_") for n in names)
    images = torch.stack([_dataset(trained)[i]["image"] for i in range(2)])
    features = extractor(images)
    for layer in extractor.layers:
        change = (features["lora"][layer] - features["plain"][layer]).abs().max() / features["plain"][layer].abs().max()
        assert change > 1e-3, f"{layer}: the LoRA changed the features by only {change:.2e}"


def test_lora_file_equals_the_trained_adapters(trained, trained_task, tiny_parts):
    """For a linear attention layer, a 3×3 ResNet convolution, a stride-2 downsampler and a
    text-encoder layer: the base weight + (alpha/r)·up∘down read from the file equals peft's
    merged weight of the trained adapter; and the whole UNet and text encoder with the file
    loaded in an extractor compute what the trained ones compute."""
    tensors = load_file(trained / "lora.safetensors")
    unet, te = trained_task.sd.unet, trained_task.sd.text_encoder
    layers = {
        ("unet", p): lora_layers(unet)[p]
        for p in (
            "up_blocks.2.attentions.0.transformer_blocks.0.attn2.to_k",
            "down_blocks.1.resnets.0.conv1",
            "down_blocks.0.downsamplers.0.conv",
        )
    }
    te_path = next(p for p in lora_layers(te) if p.endswith("mlp.fc1"))
    layers[("text_encoder", te_path)] = lora_layers(te)[te_path]
    base = {"unet": tiny_parts.unet, "text_encoder": tiny_parts.text_encoder}
    for (component, path), layer in layers.items():
        name = kohya_name(component, path)
        down, up, alpha = (
            tensors[f"{name}.lora_down.weight"],
            tensors[f"{name}.lora_up.weight"],
            tensors[f"{name}.alpha"],
        )
        assert down.shape[0] == 8 and float(alpha) == 4.0
        w = base[component].get_submodule(path).weight
        from_file = (w.double() + kohya_delta(down, up, float(alpha), w.shape)).float()
        merged = layer.get_base_layer().weight.detach().double() + layer.get_delta_weight("default").detach().double()
        assert not torch.equal(from_file, w), f"{path}: trained adapter is still zero"
        torch.testing.assert_close(from_file, merged.float(), rtol=1e-5, atol=1e-6, msg=path)
    extractor = DiffusionFeatureExtractor(
        "tiny",
        layers=["unet-out"],
        img_size=64,
        variants=[Variant("l", loras=[LoRA(str(trained / "lora.safetensors"))])],
    )
    extractor.text_key(extractor.variants[0])  # switches the variant's adapters on
    g = torch.Generator().manual_seed(1)
    ids = prompt_windows(tiny_parts.tokenizer, PROMPT)
    latents, steps = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([10, 700])
    with torch.no_grad():
        emb, emb_file = te(ids)[0], extractor.text_encoder(ids)[0]
        assert_close_up_to_rounding(emb_file, emb)
        out = unet(latents, steps, encoder_hidden_states=emb.expand(2, -1, -1)).sample
        out_file = extractor.unet(latents, steps, encoder_hidden_states=emb.expand(2, -1, -1)).sample
    assert_close_up_to_rounding(out_file, out)


def test_sigkilled_lora_fit_resumes_bit_identically(work):
    """`python -m csdiff fit` SIGKILLed after the step-2 checkpoint (mid-epoch: 4 steps an
    epoch), resumed with `--ckpt_path last`, ends with the adapters, AdamW state and LoRA
    file of an uninterrupted run (here in-process), bit for bit."""
    steps, every, kill = 8, 2, 3
    config = shrunk_config(work, "resume", steps, every, save_dir="outputs", lr=3e-3, sample_every_n_steps=4)
    data = yaml.safe_load(config.read_text())
    data["trainer"]["callbacks"].append({"class_path": "test_resume.ResumeProbe"})
    config.write_text(yaml.safe_dump(data))
    command = ["fit", "--config", str(config)]
    whole_dir, cut_dir = work / "resume" / "whole", work / "resume" / "cut"
    marker, trace = work / "resume" / "hang.marker", work / "resume" / "trace.txt"
    procs = []
    try:
        cut, cut_log = start(
            [sys.executable, "-m", "csdiff", *command], cut_dir, "cut", **{HANG_ENV: f"{kill}:{marker}"}
        )
        procs.append(cut)
        whole_dir.mkdir(parents=True)
        with pytest.MonkeyPatch.context() as mp:  # the reference fit, meanwhile, in this process
            mp.chdir(whole_dir)
            assert main(command) == 0
        deadline = time.monotonic() + 300
        while not marker.exists():
            assert cut.poll() is None, f"the run to kill exited ({cut.returncode}):\n{cut_log.read_text()[-4000:]}"
            assert time.monotonic() < deadline, "the run to kill never reached the kill step"
            time.sleep(0.2)
        cut.send_signal(signal.SIGKILL)
        assert cut.wait(timeout=60) == -signal.SIGKILL
        resumed = start(
            [sys.executable, "-m", "csdiff", *command, "--ckpt_path", "last"],
            cut_dir,
            "resumed",
            **{TRACE_ENV: str(trace)},
        )
        procs.append(resumed[0])
        finish(*resumed)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert trace.read_text().split() == ["0", str(every)]  # resumed mid-epoch 0 at the step-2 checkpoint
    assert sorted(p.name for p in (cut_dir / "outputs").iterdir()) == ["version_0"]  # resumed in its own run folder
    runs = [folder / "outputs" / "version_0" for folder in (whole_dir, cut_dir)]
    reference, final = (load(r / "checkpoints" / "last.ckpt") for r in runs)
    assert_same_weights(final, reference)
    assert reference["global_step"] == steps
    states = [c["optimizer_states"][0]["state"] for c in (reference, final)]
    assert all(torch.equal(states[0][i][k], states[1][i][k]) for i in states[0] for k in states[0][i])
    files = [load_file(r / "lora.safetensors") for r in runs]
    assert files[0].keys() == files[1].keys() and all(torch.equal(files[0][k], files[1][k]) for k in files[0])
    with safe_open(runs[1] / "lora.safetensors", "pt") as f:
        assert f.metadata()["csdiff_global_step"] == str(steps)


# --- the images ---------------------------------------------------------------------------------
def test_images_are_a_seeded_draw_of_the_training_split(tmp_path):
    """num_images of the wrapped datamodule's training images (never its val images), the same
    for the same seed, another draw for another seed; all of them when there are fewer."""
    from csdiff.data import ADE20KDataModule

    root = make_fake_ade20k(tmp_path / "ADEChallengeData2016", n_train=12, n_val=3, size=(64, 80))
    source = ADE20KDataModule(root=str(root))
    train = training_images(source)
    assert len(train) == 12 and all("/training/" in p for p in train)
    draw = LoRAImagesDataModule(source=source, num_images=5, seed=0).image_paths()
    assert len(draw) == 5 and set(draw) <= set(train)
    assert draw == LoRAImagesDataModule(source=source, num_images=5, seed=0).image_paths()
    assert draw != LoRAImagesDataModule(source=source, num_images=5, seed=1).image_paths()
    assert draw_images(train, 30, seed=0) == train


def test_folder_images_with_captions_replace_the_prompt(tmp_path, tiny_parts):
    """A plain folder: images of any size become size² centre crops; a same-stem .txt is the
    image's caption and its text embedding replaces the prompt's."""
    import cv2

    rng = np.random.default_rng(0)
    for name, hw in (("a", (50, 90)), ("b", (80, 64))):
        cv2.imwrite(str(tmp_path / f"{name}.png"), rng.integers(0, 256, (*hw, 3), dtype=np.uint8))
    (tmp_path / "b.txt").write_text("a red  circle\n")
    dm = LoRAImagesDataModule(folder=str(tmp_path), num_images=None, size=64)
    dm.setup("fit")
    batch = collate_segmentation([dm.dataset[i] for i in range(2)])
    assert batch["image"].shape == (2, 3, 64, 64) and batch["caption"] == [None, "a red circle"]
    task = LoRATrainingTask(
        backbone={"model": "tiny", "img_size": 64}, prompt=PROMPT, rank=4, alpha=4, sample_every_n_steps=0
    )
    emb, added = task.conditioning(batch["caption"])
    assert added == {}
    assert torch.equal(emb[0], encode_prompt(tiny_parts.tokenizer, tiny_parts.text_encoder, PROMPT)[0])
    assert torch.equal(emb[1], encode_prompt(tiny_parts.tokenizer, tiny_parts.text_encoder, "a red circle")[0])


def test_v_prediction_models_regress_on_the_velocity(tmp_path):
    """An SD 2.x-style v-predicting model: the target is the scheduler's get_velocity; ε models: the noise."""
    folder = load_script("make_tiny_sd2").make_tiny_sd2(tmp_path / "tiny-sd2")
    task = LoRATrainingTask(backbone={"model": str(folder)}, rank=4, alpha=4, sample_every_n_steps=0)
    assert task.prediction_type == "v_prediction"
    g = torch.Generator().manual_seed(0)
    latents, noise, steps = (
        torch.randn(2, 4, 8, 8, generator=g),
        torch.randn(2, 4, 8, 8, generator=g),
        torch.tensor([3, 900]),
    )
    assert torch.equal(task.target(latents, noise, steps), task.noise_scheduler.get_velocity(latents, noise, steps))
    assert not torch.equal(task.target(latents, noise, steps), noise)


def _loss_and_grads(
    task: LoRATrainingTask, images: torch.Tensor, captions: list
) -> tuple[float, dict[str, torch.Tensor]]:
    """One training loss on fixed draws and the adapters' gradients."""
    torch.manual_seed(0)
    latents = task.encode_images(images)
    noise, steps = torch.randn_like(latents), torch.tensor([20, 600])[: len(images)]
    emb, added = task.conditioning(captions)
    prediction = task.predict(task.noise_scheduler.add_noise(latents, noise, steps), steps, emb, added)
    loss = F.mse_loss(prediction, task.target(latents, noise, steps))
    loss.backward()
    return loss.item(), {k: p.grad.clone() for k, p in task.adapter_parameters().items()}


def test_gradient_checkpointing_gives_the_same_gradients():
    """Recomputing activations in the backward pass (less memory at SD size) changes no gradient;
    the adapters (B zero at the start) get gradients on their B side."""
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    tasks = [
        LoRATrainingTask(
            backbone={"model": "tiny", "img_size": 64},
            rank=4,
            alpha=4,
            sample_every_n_steps=0,
            gradient_checkpointing=gc,
        )
        for gc in (False, True)
    ]
    (loss, grads), (loss_gc, grads_gc) = (_loss_and_grads(t, images, [None, None]) for t in tasks)
    assert loss == loss_gc and grads.keys() == grads_gc.keys()
    for key in grads:
        assert_close_up_to_rounding(grads_gc[key], grads[key], msg=key)
    assert all(grads[k].abs().max() > 0 for k in grads if ".lora_B." in k)


def test_sdxl_family_trains_and_writes_a_loadable_file(tmp_path):
    """SDXL: conditioning from its two text encoders (pooled embedding, time ids) per image,
    the loss back-propagates, and the file (kohya names for SDXL) loads whole into a variant."""
    from csdiff.backbone.lora_files import save_kohya_lora

    folder = load_script("make_tiny_sdxl").make_tiny_sdxl(tmp_path / "tiny-sdxl")
    task = LoRATrainingTask(
        backbone={"model": str(folder), "img_size": 64}, prompt=PROMPT, rank=4, alpha=4, sample_every_n_steps=0
    )
    assert task.sdxl
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    emb, added = task.conditioning([None, "a cat"])
    assert emb.shape[0] == 2 and added["added_cond_kwargs"]["text_embeds"].shape[0] == 2
    _, grads = _loss_and_grads(task, images, [None, "a cat"])
    assert all(g.abs().max() > 0 for k, g in grads.items() if ".lora_B." in k)
    for layer in lora_layers(task.sd.unet).values():  # as if trained: B away from zero
        torch.nn.init.normal_(layer.lora_B["default"].weight, std=0.05, generator=torch.Generator().manual_seed(1))
    path = save_kohya_lora(tmp_path / "sdxl.safetensors", task.lora_modules(), sdxl=True)
    extractor = DiffusionFeatureExtractor(
        str(folder),
        layers=["unet-out"],
        img_size=64,
        variants=[Variant("plain"), Variant("l", loras=[LoRA(str(path))])],
    )
    adapter = extractor.loras.load(str(path))
    assert sum(
        isinstance(m, BaseTunerLayer) and adapter in getattr(m, "lora_A", {}) for m in extractor.unet.modules()
    ) == len(lora_layers(task.sd.unet))
    features = extractor(images)
    assert not torch.allclose(features["l"]["unet-out"], features["plain"]["unet-out"])
