"""Bad input: the CLI exits non-zero with one line that names the file or key (in-process)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import pytest
import torch
import yaml
from helpers import load_script, write_kohya_lora

from csdiff.cli import main

make_fake_ade20k = load_script("make_fake_ade20k").make_fake_ade20k
OFFLINE_ID = "stable-diffusion-v1-5/stable-diffusion-v1-5"


def base_config(root: Path, work: Path) -> dict:
    return {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu",
            "devices": 1,
            "max_steps": 1,
            "max_epochs": -1,
            "limit_val_batches": 1,
            "enable_progress_bar": False,
            "logger": False,
            "default_root_dir": str(work),
        },
        "model": {
            "class_path": "csdiff.tasks.SegmentationTask",
            "init_args": {
                "num_classes": 150,
                "backbone": {"model": "tiny", "img_size": 64},
                "variants": [{"name": "plain"}],
                "head_channels": 16,
                "aux_channels": 8,
                "slide_crop": 64,
                "slide_stride": 64,
            },
        },
        "data": {
            "class_path": "csdiff.data.ADE20KDataModule",
            "init_args": {
                "root": str(root),
                "crop_size": 64,
                "scale": [128, 64],
                "eval_resize": ["short", 64],
                "batch_size": 2,
            },
        },
    }


@pytest.fixture
def setup(tmp_path):
    root = make_fake_ade20k(tmp_path / "ADEChallengeData2016", n_train=2, n_val=1, size=(64, 80))
    return root, base_config(root, tmp_path), tmp_path


def run(config: dict, work: Path, capsys, verb: str = "fit", extra: list[str] | None = None) -> tuple[int, str]:
    path = work / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    code = main([verb, "--config", str(path), *(extra or [])])
    err = capsys.readouterr().err.strip().splitlines()
    return code, err[-1] if err else ""


def first(folder: Path, pattern: str) -> Path:
    return sorted(folder.glob(pattern))[0]


def test_missing_root(setup, capsys):
    _, config, work = setup
    config["data"]["init_args"]["root"] = str(work / "nowhere")
    code, line = run(config, work, capsys)
    assert code == 1 and "nowhere" in line and "does not exist" in line


def test_empty_split(setup, capsys):
    root, config, work = setup
    for f in (root / "images" / "training").iterdir():
        f.unlink()
    code, line = run(config, work, capsys)
    assert code == 1 and "no train images" in line and str(root) in line


def test_corrupt_image(setup, capsys):
    root, config, work = setup
    bad = first(root / "images" / "training", "*.jpg")
    bad.write_bytes(b"not a jpeg")
    code, line = run(config, work, capsys)
    assert code == 1 and bad.name in line


def test_corrupt_image_in_dataloader_worker_is_one_line(setup, capsys):
    root, config, work = setup
    bad = first(root / "images" / "training", "*.jpg")
    bad.write_bytes(b"\xff\xd8 truncated")
    config["data"]["init_args"]["num_workers"] = 1
    config["data"]["init_args"]["check"] = False  # else setup's check finds it, before any worker
    code, line = run(config, work, capsys)
    assert code == 1 and bad.name in line and "Traceback" not in line and line.startswith("csdiff: error:")


def test_label_outside_class_range(setup, capsys):
    root, config, work = setup
    label = first(root / "annotations" / "training", "*.png")
    arr = cv2.imread(str(label), cv2.IMREAD_UNCHANGED)
    arr[0, 0] = 200  # ADE20K raw labels are 0..150 (0 = ignore)
    cv2.imwrite(str(label), arr)
    code, line = run(config, work, capsys)
    assert code == 1 and label.name in line and "200" in line


def test_image_label_size_mismatch(setup, capsys):
    root, config, work = setup
    label = first(root / "annotations" / "training", "*.png")
    arr = cv2.imread(str(label), cv2.IMREAD_UNCHANGED)
    cv2.imwrite(str(label), cv2.resize(arr, (40, 30), interpolation=cv2.INTER_NEAREST))
    code, line = run(config, work, capsys)
    assert code == 1 and label.name in line


def test_unknown_layer(setup, capsys):
    _, config, work = setup
    config["model"]["init_args"]["layers"] = ["up-level1-upsampler-outt"]
    code, line = run(config, work, capsys)
    assert code == 1 and "up-level1-upsampler-outt" in line and "did you mean 'up-level1-upsampler-out'" in line


def test_unknown_variant_key(setup, capsys):
    _, config, work = setup
    config["model"]["init_args"]["variants"] = [{"name": "plain", "promt": "a photo"}]
    code, line = run(config, work, capsys)
    assert code == 2 and "promt" in line and "variants" in line


def test_backbone_fresh_noise_in_segmentation_is_refused_not_overwritten(setup, capsys):
    _, config, work = setup
    config["model"]["init_args"]["backbone"]["fresh_noise"] = True
    code, line = run(config, work, capsys)
    assert code == 1 and "use model.init_args.train_noise" in line


def test_yaml_typo_in_trainer_key(setup, capsys):
    _, config, work = setup
    config["trainer"]["max_step"] = config["trainer"].pop("max_steps")
    code, line = run(config, work, capsys)
    assert code == 2 and "trainer.max_step" in line


def test_missing_lora_file(setup, capsys):
    _, config, work = setup
    config["model"]["init_args"]["variants"] = [{"name": "l", "loras": [{"path": str(work / "nope.safetensors")}]}]
    code, line = run(config, work, capsys)
    assert code == 1 and "nope.safetensors" in line and "not found" in line


def test_lora_adapting_zero_modules(setup, capsys):
    _, config, work = setup
    path = write_kohya_lora(
        work / "alien.safetensors", {"some.block.that.does.not.exist": (torch.zeros(2, 8), torch.zeros(8, 2), 2.0)}
    )
    config["model"]["init_args"]["variants"] = [{"name": "l", "loras": [{"path": str(path)}]}]
    code, line = run(config, work, capsys)
    assert code == 1 and "alien.safetensors" in line and "zero modules" in line


@pytest.mark.parametrize("where", ["backbone", "controlnet"])
def test_weights_not_available_offline(setup, capsys, where):
    _, config, work = setup
    if where == "backbone":
        config["model"]["init_args"]["backbone"]["model"] = OFFLINE_ID
    else:
        config["model"]["init_args"]["variants"] = [
            {"name": "c", "controlnets": [{"model": "lllyasviel/sd-controlnet-canny"}]}
        ]
    code, line = run(config, work, capsys)
    wanted = OFFLINE_ID if where == "backbone" else "lllyasviel/sd-controlnet-canny"
    assert code == 1 and wanted in line and "folder" in line


@pytest.fixture
def trained(setup, capsys):
    """A one-step checkpoint trained on a private copy of the tiny backbone."""
    root, config, work = setup
    backbone = work / "my-tiny"
    from csdiff.backbone.tiny import TINY_SD_DIR

    shutil.copytree(TINY_SD_DIR, backbone)
    config["model"]["init_args"]["backbone"]["model"] = str(backbone)
    config["trainer"]["enable_checkpointing"] = True
    assert run(config, work, capsys)[0] == 0
    ckpt = next(work.rglob("last.ckpt"))
    return config, work, backbone, ckpt


def test_checkpoint_from_other_backbone_weights(trained, capsys):
    config, work, backbone, ckpt = trained
    weights = backbone / "unet" / "diffusion_pytorch_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # other weights under the same name
    weights.write_bytes(bytes(data))
    code, line = run(config, work, capsys, "test", ["--ckpt_path", str(ckpt)])
    assert code == 1 and "backbone" in line and "trained with" in line


def test_checkpoint_with_other_trainable_shapes(trained, capsys):
    config, work, _, ckpt = trained
    state = torch.load(ckpt, weights_only=True)
    key = next(k for k in state["state_dict"] if k.startswith("head.classifier.weight"))
    state["state_dict"][key] = torch.zeros(3, 3, 1, 1)
    torch.save(state, ckpt)
    code, line = run(config, work, capsys, "test", ["--ckpt_path", str(ckpt)])
    assert code == 1 and key in line


def test_checkpoint_for_another_dataset(trained, capsys, tmp_path):
    """A checkpoint's hyperparameters never silently win over the config (which says 150
    here): the message names the checkpoint and both class counts."""
    config, work, _, ckpt = trained
    state = torch.load(ckpt, weights_only=True)
    state["hyper_parameters"]["num_classes"] = 4
    torch.save(state, ckpt)
    code, line = run(config, work, capsys, "test", ["--ckpt_path", str(ckpt)])
    assert (
        code == 1
        and f"checkpoint {ckpt} was trained with other options" in line
        and "num_classes: 4 (checkpoint) vs 150 (config)" in line
    )


def test_debug_env_gives_the_traceback(setup, capsys, monkeypatch):
    _, config, work = setup
    config["data"]["init_args"]["root"] = str(work / "nowhere")
    monkeypatch.setenv("CSDIFF_DEBUG", "1")
    with pytest.raises(Exception, match="nowhere"):
        run(config, work, capsys)


def test_exit_code_and_single_line_in_a_subprocess(setup):
    _, config, work = setup
    config["data"]["init_args"]["root"] = str(work / "nowhere")
    path = work / "bad.yaml"
    path.write_text(yaml.safe_dump(config))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    env.pop("CSDIFF_DEBUG", None)
    proc = subprocess.run(
        [sys.executable, "-m", "csdiff", "fit", "--config", str(path)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 1
    errors = [line for line in proc.stderr.splitlines() if line.startswith("csdiff: error:")]
    assert len(errors) == 1 and "nowhere" in errors[0]
    assert "Traceback" not in proc.stderr


def test_checkpoint_with_pickled_code_is_refused(trained, capsys):
    """Checkpoints are read with weights_only=True: arbitrary pickled objects are not loaded."""
    import fractions

    config, work, _, ckpt = trained
    state = torch.load(ckpt, weights_only=True)
    state["extra"] = fractions.Fraction(1, 3)  # any non-allowlisted class stands for pickled code
    torch.save(state, ckpt)
    code, line = run(config, work, capsys, "test", ["--ckpt_path", str(ckpt)])
    assert code == 1 and "weights" in line.lower()


@pytest.mark.parametrize("kind", ["text", "empty", "folder"])
def test_ckpt_path_that_is_not_a_checkpoint(setup, capsys, kind):
    _, config, work = setup
    path = work / ("run" if kind == "folder" else "model.ckpt")
    if kind == "folder":
        path.mkdir()
    else:
        path.write_text("hello\n" if kind == "text" else "")
    code, line = run(config, work, capsys, "test", ["--ckpt_path", str(path)])
    assert code == 1 and str(path) in line and "not a Lightning checkpoint" in line


def test_ckpt_path_last_with_nothing_to_resume_refuses(setup, capsys):
    """Asked to resume, a fit never silently starts over."""
    _, config, work = setup
    code, line = run(config, work, capsys, "fit", ["--ckpt_path", "last"])
    assert code == 1 and f"no last.ckpt under {work}" in line
    assert not list(work.rglob("*.ckpt"))


def test_yaml_syntax_error_names_file_line_and_column(setup, capsys):
    _, _, work = setup
    path = work / "broken.yaml"
    path.write_text("trainer:\n  max_steps: 1\n  callbacks: [a, b\nmodel: {}\n")
    code = main(["fit", "--config", str(path)])
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 2 and f"YAML syntax error in {path}, line 4, column 6" in line and "flow sequence" in line
