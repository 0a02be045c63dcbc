"""Exported heads (checkpoints_scripts/export_head.py): a folder of weights + task config that
`csdiff test/predict --ckpt_path` and `load_from_checkpoint` take in place of the checkpoint,
with the same results bit for bit, and the same refusals."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
import yaml
from helpers import load_script
from safetensors.torch import load_file
from test_segmentation_cli import quick_args, quick_config

from csdiff.cli import main, run_lightning
from csdiff.resume import CheckpointError
from csdiff.tasks import SegmentationTask
from csdiff.tasks.checkpoints import CheckpointMismatchError
from csdiff.tasks.export import TASK_FILE, WEIGHTS_FILE, read_exported_head

export_script = load_script("export_head", "checkpoints_scripts")


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, Path]:
    """One epoch of the shrunk quickstart (2 steps, no validation); returns (work dir, last.ckpt)."""
    work = tmp_path_factory.mktemp("export")
    cli = run_lightning(["fit", *quick_args(work), "--trainer.max_epochs", "1"])
    assert cli.trainer.global_step == 2
    return work, Path(cli.trainer.checkpoint_callback.last_model_path)


@pytest.fixture(scope="module")
def exported(trained, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("heads") / "quickstart"
    assert export_script.main([str(trained[1]), str(out)]) == 0
    return out


def _original(ckpt: Path) -> dict:
    return torch.load(ckpt, map_location="cpu", weights_only=True)


def test_export_holds_the_weights_and_the_config_only(trained, exported, capsys):
    _, ckpt = trained
    original = _original(ckpt)
    assert sorted(p.name for p in exported.iterdir()) == [TASK_FILE, WEIGHTS_FILE]
    weights = load_file(str(exported / WEIGHTS_FILE))
    assert weights.keys() == original["state_dict"].keys() and not any(k.startswith("extractor.") for k in weights)
    assert all(torch.equal(weights[k], v) for k, v in original["state_dict"].items())
    task = yaml.safe_load((exported / TASK_FILE).read_text())
    assert task["model"]["class_path"] == "csdiff.tasks.SegmentationTask"
    assert task["model"]["init_args"]["backbone"]["model"] == "tiny"  # names the backbone; holds none of it
    assert task["csdiff_backbone"] == original["csdiff_backbone"] and task["csdiff_version"]
    rebuilt = read_exported_head(exported)  # what loading hands to Lightning
    assert rebuilt["hyper_parameters"] == original["hyper_parameters"]  # YAML round trip is exact
    assert "optimizer_states" in original and "optimizer_states" not in rebuilt
    # AdamW's two moments make the checkpoint about 3x the weights
    assert (exported / WEIGHTS_FILE).stat().st_size < ckpt.stat().st_size / 2.5


def test_csdiff_test_gives_the_same_metrics_from_the_folder(trained, exported):
    work, ckpt = trained
    from_ckpt = run_lightning(["test", *quick_args(work), "--ckpt_path", str(ckpt)]).trainer.callback_metrics
    cli = run_lightning(["test", *quick_args(work), "--ckpt_path", str(exported)])
    from_folder = cli.trainer.callback_metrics
    assert from_ckpt.keys() == from_folder.keys() and "test/mIoU" in from_folder
    assert all(torch.equal(from_ckpt[k], from_folder[k]) for k in from_ckpt)
    assert not Path(cli._head_dir.name).exists()  # the rebuilt checkpoint file is removed after the run


def test_csdiff_predict_gives_the_same_labels_from_the_folder(trained, exported, tmp_path):
    work, ckpt = trained
    outputs = {}
    for name, source in (("ckpt", ckpt), ("folder", exported)):
        out = tmp_path / name
        args = quick_args(work, **{"--config": quick_config(work, out)})
        assert main(["predict", *args, "--ckpt_path", str(source)]) == 0
        outputs[name] = {p.relative_to(out): p.read_bytes() for p in sorted((out / "labels").rglob("*.png"))}
    assert len(outputs["ckpt"]) == 4 and outputs["folder"] == outputs["ckpt"]


def test_load_from_checkpoint_takes_the_folder(trained, exported):
    _, ckpt = trained
    model = SegmentationTask.load_from_checkpoint(exported, map_location="cpu", weights_only=True).eval()
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("extractor.")}
    trained_weights = _original(ckpt)["state_dict"]
    assert state.keys() == trained_weights.keys()
    assert all(torch.equal(state[k], v) for k, v in trained_weights.items())
    reference = SegmentationTask.load_from_checkpoint(ckpt, map_location="cpu", weights_only=True).eval()
    image = torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        assert torch.equal(model.predict_image(image, (64, 64)), reference.predict_image(image, (64, 64)))


def _not_csdiff(kind: str, ckpt: Path, exported: Path, tmp: Path) -> Path:
    """Files export_head must refuse."""
    path = tmp / f"{kind}.ckpt"
    if kind == "text":
        path.write_text("hello\n")
    elif kind == "tensors":
        torch.save({"weight": torch.zeros(3)}, path)
    elif kind == "lightning":  # a Lightning checkpoint of another project: no backbone description
        checkpoint = _original(ckpt)
        del checkpoint["csdiff_backbone"]
        torch.save(checkpoint, path)
    elif kind == "exported":
        return exported
    elif kind == "missing":
        return tmp / "nothing.ckpt"
    return path


@pytest.mark.parametrize("kind", ["text", "tensors", "lightning", "exported", "missing"])
def test_export_refuses_what_is_not_a_csdiff_checkpoint_in_one_line(kind, trained, exported, tmp_path, capsys):
    path = _not_csdiff(kind, trained[1], exported, tmp_path)
    assert export_script.main([str(path), str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("export_head: error: ") and str(path) in err[0]
    assert not (tmp_path / "out").exists()


def test_head_with_another_backbone_config_is_refused(trained, exported, tmp_path, capsys):
    """The head keeps the description of its features: another timestep in its config, or
    passed to load_from_checkpoint, stops with the checkpoint's mismatch message."""
    work, _ = trained
    edited = tmp_path / "edited"
    shutil.copytree(exported, edited)
    text = (edited / TASK_FILE).read_text()
    assert text.count("timestep: 50") == 2  # the task's argument and the description
    task = yaml.safe_load(text)
    task["model"]["init_args"]["backbone"]["timestep"] = 100
    (edited / TASK_FILE).write_text(yaml.safe_dump(task, sort_keys=False))
    # the config says 100 too (a config differing from the task's arguments is refused before)
    assert (
        main(["test", *quick_args(work), "--ckpt_path", str(edited), "--model.init_args.backbone.timestep", "100"]) == 1
    )
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert "the checkpoint was trained with other features: timestep: 50 (checkpoint) vs 100 (now)" in line
    backbone = dict(task["model"]["init_args"]["backbone"])
    with pytest.raises(CheckpointMismatchError, match=r"timestep: 50 \(checkpoint\) vs 100 \(now\)"):
        SegmentationTask.load_from_checkpoint(exported, map_location="cpu", weights_only=True, backbone=backbone)


def test_fit_cannot_resume_from_an_exported_head(trained, exported, capsys):
    work, _ = trained
    assert main(["fit", *quick_args(work), "--ckpt_path", str(exported)]) == 1
    assert "holds no optimizer or loop state" in capsys.readouterr().err


def test_files_of_two_exports_are_not_mixed(trained, exported, tmp_path):
    """Each file is written atomically; their shared export id tells a folder whose weights
    come from another export (e.g. an overwrite killed between the two files)."""
    other = tmp_path / "other"
    assert export_script.main([str(trained[1]), str(other)]) == 0
    mixed = tmp_path / "mixed"
    shutil.copytree(exported, mixed)
    shutil.copy(other / WEIGHTS_FILE, mixed / WEIGHTS_FILE)
    with pytest.raises(CheckpointError, match="come from different exports"):
        SegmentationTask.load_from_checkpoint(mixed, map_location="cpu", weights_only=True)
