"""The segmentation path through the real CLI entry point: one fit per session, reused."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import yaml
from helpers import assert_close_up_to_rounding

from csdiff.cli import main, run_lightning

ROOT = Path(__file__).resolve().parents[1]


def quick_config(work: Path, predict_dir: Path, submission_format: str | None = None) -> str:
    """The shipped quickstart config with its output paths moved under ``work``."""
    config = yaml.safe_load((ROOT / "configs" / "quickstart.yaml").read_text())
    for callback in config["trainer"]["callbacks"]:
        if callback["class_path"].endswith("SegmentationPredictionWriter"):
            callback["init_args"].update(output_dir=str(predict_dir), submission_format=submission_format)
    path = predict_dir.parent / f"quickstart-{predict_dir.name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


def quick_args(work: Path, **extra: str) -> list[str]:
    """Quickstart config shrunk for tests: 64² images, few of them."""
    args = {
        "--config": quick_config(work, work / "predictions"),
        "--data.init_args.root": str(work / "data" / "ADEChallengeData2016"),
        "--data.init_args.num_train": "8",
        "--data.init_args.num_val": "4",
        "--data.init_args.size": "64",
        "--data.init_args.batch_size": "4",
        "--model.init_args.backbone.img_size": "64",
        "--model.init_args.slide_crop": "64",
        "--model.init_args.slide_stride": "48",
        "--trainer.logger.init_args.save_dir": str(work / "logs"),
        "--trainer.default_root_dir": str(work),
        "--trainer.enable_progress_bar": "false",
        "--trainer.log_every_n_steps": "1",
    }
    args.update(extra)
    return [x for kv in args.items() for x in kv]


@pytest.fixture(scope="session")
def fitted(tmp_path_factory):
    """Fit the quickstart for 2 short epochs; returns (work dir, cli, last checkpoint)."""
    work = tmp_path_factory.mktemp("quickstart")
    cli = run_lightning(
        ["fit", *quick_args(work), "--trainer.max_epochs", "2", "--trainer.check_val_every_n_epoch", "1"]
    )
    ckpt = Path(cli.trainer.checkpoint_callback.last_model_path)
    assert ckpt.is_file()
    return work, cli, ckpt


def test_fit_logs_to_tensorboard(fitted):
    work, cli, _ = fitted
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(cli.trainer.logger.log_dir)
    acc.Reload()
    scalars = set(acc.Tags()["scalars"])
    assert {"train/loss", "val/mIoU", "val/aAcc", "val/mAcc", "lr-AdamW"} <= scalars
    assert any(t.startswith("gate/up-level2-upsampler-out/") for t in scalars)
    assert any(t.startswith("val/prediction_") for t in acc.Tags()["images"])
    assert any(t.startswith("gate/") for t in acc.Tags()["histograms"])
    assert len(acc.Images("val/prediction_0")) == 2  # once per validation, not per step
    assert "val/mIoU" in cli.trainer.progress_bar_metrics  # a fit ends showing its mIoU


def test_checkpoint_holds_only_trainable_weights(fitted):
    _, cli, ckpt = fitted
    assert ckpt.stat().st_size < 20e6
    state = torch.load(ckpt, map_location="cpu", weights_only=True)  # plain hyperparameters only
    assert not any(k.startswith("extractor.") for k in state["state_dict"])
    assert state["csdiff_backbone"]["backbone"]["model"] == "tiny"
    trainable = {k for k, p in cli.model.named_parameters() if p.requires_grad}
    assert trainable <= set(state["state_dict"])


def test_test_reproduces_validation_miou_exactly(fitted):
    work, cli, ckpt = fitted
    val_miou = cli.trainer.callback_metrics["val/mIoU"].item()
    tested = run_lightning(["test", *quick_args(work), "--ckpt_path", str(ckpt)])
    assert tested.trainer.callback_metrics["test/mIoU"].item() == val_miou
    table = Path(tested.trainer.log_dir) / "test_per_class_iou.txt"
    assert "circle" in table.read_text()


def test_validate_through_main(fitted):
    work, _, ckpt = fitted
    assert main(["validate", *quick_args(work), "--ckpt_path", str(ckpt)]) == 0


def test_test_without_checkpoint_refuses(fitted):
    work, _, _ = fitted
    with pytest.raises(SystemExit, match="--ckpt_path"):
        main(["test", *quick_args(work)])


def test_predict_writes_labels_overlays_and_submission(fitted, tmp_path):
    work, _, ckpt = fitted
    out = tmp_path / "pred"
    args = quick_args(work, **{"--config": quick_config(work, out, "ade20k")})
    assert main(["predict", *args, "--ckpt_path", str(ckpt)]) == 0
    labels = sorted((out / "labels").glob("*.png"))
    assert len(labels) == 4
    label = cv2.imread(str(labels[0]), cv2.IMREAD_UNCHANGED)
    assert label.shape == (64, 64) and label.max() < 4
    submission = cv2.imread(str(out / "submission" / labels[0].name), cv2.IMREAD_UNCHANGED)
    np.testing.assert_array_equal(submission, label + 1)
    assert len(list((out / "overlays").glob("*.jpg"))) == 4


def test_predict_on_a_folder_of_images(fitted, tmp_path):
    work, _, ckpt = fitted
    folder = tmp_path / "photos"
    folder.mkdir()
    rng = np.random.default_rng(0)
    cv2.imwrite(str(folder / "wide.png"), rng.integers(0, 255, (50, 90, 3), dtype=np.uint8))
    out = tmp_path / "pred"
    args = quick_args(work, **{"--config": quick_config(work, out), "--data.init_args.predict_root": str(folder)})
    main(["predict", *args, "--ckpt_path", str(ckpt)])
    label = cv2.imread(str(out / "labels" / "wide.png"), cv2.IMREAD_UNCHANGED)
    assert label.shape == (50, 90)


def test_python_inference_from_checkpoint(fitted):
    _, cli, ckpt = fitted
    from csdiff.tasks import SegmentationTask

    model = SegmentationTask.load_from_checkpoint(ckpt, map_location="cpu", weights_only=True).eval()
    image = cli.datamodule.datasets["val"][0]["image"]
    expected = cli.model.eval().predict_image(image, (64, 64))
    assert_close_up_to_rounding(model.predict_image(image, (64, 64)), expected)  # another instance


def test_saved_config_round_trips(fitted):
    _, cli, _ = fitted
    saved = Path(cli.trainer.log_dir) / "config.yaml"
    config = yaml.safe_load(saved.read_text())
    assert config["model"]["init_args"]["backbone"]["model"] == "tiny"


def test_predict_keeps_relative_paths_and_suffixes_apart(fitted, tmp_path, capsys):
    work, _, ckpt = fitted
    folder, out = tmp_path / "photos", tmp_path / "pred"
    rng = np.random.default_rng(0)
    for name in ("d.jpg", "d.png", "sub/d.jpg"):
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(folder / name), rng.integers(0, 255, (40, 56, 3), dtype=np.uint8))
    args = quick_args(work, **{"--config": quick_config(work, out), "--data.init_args.predict_root": str(folder)})
    assert main(["predict", *args, "--ckpt_path", str(ckpt)]) == 0
    labels = sorted(str(p.relative_to(out / "labels")) for p in (out / "labels").rglob("*.png"))
    assert labels == ["d.jpg.png", "d.png.png", "sub/d.png"]
    (folder / "sub" / "d.jpg").rename(folder / "d.jpg.png")  # its name is now that of d.jpg
    assert main(["predict", *args, "--ckpt_path", str(ckpt)]) == 1
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert str(folder / "d.jpg") in line and str(folder / "d.jpg.png") in line


def test_feature_cache_serves_a_second_evaluation_without_backbone_calls(fitted, tmp_path):
    """Validation twice with a feature cache: the second makes no UNet call and gives the same mIoU."""
    from diffusers import UNet2DConditionModel
    from torch._subclasses.fake_tensor import FakeTensor

    work, _, ckpt = fitted
    calls = []

    def count(module, args):  # a pre-hook: the extractor stops the UNet early, so it never returns
        if isinstance(module, UNet2DConditionModel) and not any(isinstance(a, FakeTensor) for a in args):
            calls.append(1)

    args = [
        "validate",
        *quick_args(work),
        "--ckpt_path",
        str(ckpt),
        "--model.init_args.feature_cache",
        str(tmp_path / "cache"),
    ]
    handle = torch.nn.modules.module.register_module_forward_pre_hook(count)
    try:
        cold = run_lightning(args).trainer.callback_metrics["val/mIoU"].item()
        cold_calls = len(calls)
        warm = run_lightning(args).trainer.callback_metrics["val/mIoU"].item()
    finally:
        handle.remove()
    assert cold_calls > 0 and len(calls) == cold_calls
    assert warm == cold
    assert len(list((tmp_path / "cache").rglob("*.safetensors"))) == 4  # 4 val images of 64², one 64² window each
