"""The up-front data check: bad files stop a run in `setup`, before its first step.

Without it a bad validation label surfaced after the first training epoch (with the paper
configs: after 8,000 steps). Each datamodule checks the splits its stage uses with the very
checks loading runs, so the messages are those of loading; `check: false` skips the pass.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml
from helpers import load_script
from lightning.pytorch import Callback
from test_errors import base_config

from csdiff.cli import main
from csdiff.data import (
    ADE20KDataModule,
    CityscapesDataModule,
    DataError,
    DDPMSegDataModule,
    QuickstartDataModule,
    SPairDataModule,
)
from csdiff.data.spair import folder_pairs

make_fake_ade20k = load_script("make_fake_ade20k").make_fake_ade20k
make_fake_cityscapes = load_script("make_fake_cityscapes").make_fake_cityscapes
make_fake_ddpmseg = load_script("make_fake_ddpmseg").make_fake_ddpmseg
make_fake_spair = load_script("make_fake_spair").make_fake_spair


class StepRecorder(Callback):
    """Touches ``path`` when a training step starts: the test's witness that training began."""

    def __init__(self, path: str) -> None:
        self.path = path

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        Path(self.path).touch()


# -- helpers ------------------------------------------------------------------------------------


def _ade(root: Path, **kwargs) -> ADE20KDataModule:
    return ADE20KDataModule(str(root), crop_size=64, scale=(128, 64), **kwargs)


def _set_label_value(path: Path, value: int, where: tuple[int, int] = (3, 4)) -> Path:
    label = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    label[where] = value
    cv2.imwrite(str(path), label)
    return path


def _truncate(path: Path) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) * 2 // 3])
    return path


def _fit_config(root: Path, work: Path) -> dict:
    """tests/test_errors.py's one-step fit on the tiny backbone, validating every val image,
    with a callback that records whether a training step started."""
    config = base_config(root, work)
    del config["trainer"]["limit_val_batches"]
    config["trainer"]["callbacks"] = [
        {"class_path": f"{__name__}.StepRecorder", "init_args": {"path": str(work / "stepped")}}
    ]
    return config


def _run(config: dict, work: Path, capsys, extra: list[str] | None = None) -> tuple[int, str]:
    path = work / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    code = main(["fit", "--config", str(path), *(extra or [])])
    err = capsys.readouterr().err.strip().splitlines()
    return code, err[-1] if err else ""


@pytest.fixture
def ade_root(tmp_path: Path) -> Path:
    # 3 val images: the last one is beyond Lightning's 2 sanity-check batches
    return make_fake_ade20k(tmp_path / "ADEChallengeData2016", n_train=2, n_val=3, size=(64, 80))


def _last_val_label(root: Path) -> Path:
    return sorted((root / "annotations" / "validation").glob("*.png"))[-1]


# -- the point: before the first step -------------------------------------------------------------


def test_bad_val_label_stops_fit_before_the_first_training_step(ade_root, tmp_path, capsys):
    bad = _set_label_value(_last_val_label(ade_root), 200)  # ADE20K raw labels are 0..150
    code, line = _run(_fit_config(ade_root, tmp_path), tmp_path, capsys)
    assert code == 1 and line.startswith("csdiff: error:") and f"label file {bad} holds values [200]" in line
    assert not (tmp_path / "stepped").exists(), "a training step ran before the bad label was reported"
    assert not list(tmp_path.rglob("*.ckpt"))


def test_check_false_skips_the_pass_and_the_label_is_found_later(ade_root, tmp_path, capsys):
    """As before the check: the first step trains, validation then loads the bad label."""
    bad = _set_label_value(_last_val_label(ade_root), 200)
    code, line = _run(_fit_config(ade_root, tmp_path), tmp_path, capsys, ["--data.init_args.check", "false"])
    assert code == 1 and f"label file {bad} holds values [200]" in line
    assert (tmp_path / "stepped").exists()


def test_good_data_passes_and_fit_runs(ade_root, tmp_path, capsys):
    code, _ = _run(_fit_config(ade_root, tmp_path), tmp_path, capsys)
    assert code == 0 and (tmp_path / "stepped").exists()


# -- what the segmentation check covers -----------------------------------------------------------


def test_up_front_message_is_the_load_time_message(ade_root):
    bad = _set_label_value(_last_val_label(ade_root), 200)
    with pytest.raises(DataError) as up_front:
        _ade(ade_root).setup("validate")
    unchecked = _ade(ade_root, check=False)
    unchecked.setup("validate")
    with pytest.raises(DataError) as at_load:
        unchecked.datasets["val"][2]
    assert str(up_front.value) == str(at_load.value) and str(bad) in str(up_front.value)


def test_several_bad_files_are_one_line_first_in_full(ade_root):
    labels = sorted((ade_root / "annotations" / "validation").glob("*.png"))
    for path in labels:
        _set_label_value(path, 151)
    with pytest.raises(DataError) as err:
        _ade(ade_root).setup("validate")
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"label file {labels[0]} holds values [151]")
    assert message.endswith(f"[2 more of the 3 val samples fail the check too: {labels[1]}, {labels[2]}]")


def test_stage_checks_only_its_splits(ade_root):
    """fit: train + val; validate: val only; predict: images only (labels are not read)."""
    bad = _set_label_value(sorted((ade_root / "annotations" / "training").glob("*.png"))[0], 200)
    _ade(ade_root).setup("validate")
    _ade(ade_root).setup("predict")
    with pytest.raises(DataError, match=f"label file {bad} holds values"):
        _ade(ade_root).setup("fit")


def test_orphan_label_is_reported(ade_root):
    extra = ade_root / "annotations" / "validation" / "ADE_val_00000099.png"
    shutil.copy(_last_val_label(ade_root), extra)
    expected = ade_root / "images" / "validation" / "ADE_val_00000099.jpg"
    with pytest.raises(DataError, match=f"label file {extra} has no image \\(expected {expected} "):
        _ade(ade_root).setup("fit")
    _ade(ade_root, check=False).setup("fit")  # listing alone pairs images with labels, as before


def test_cityscapes_checks_orphans_and_label_ids(tmp_path):
    root = make_fake_cityscapes(tmp_path / "cityscapes", n_per_city=1)
    CityscapesDataModule(str(root), crop_size=32).setup("fit")  # the fake data (both label kinds) passes
    image = sorted((root / "leftImg8bit" / "val").glob("*/*_leftImg8bit.png"))[0]  # has both label kinds
    moved = image.rename(tmp_path / image.name)
    stem = image.name[: -len("_leftImg8bit.png")]
    orphans = sorted(str(p) for p in (root / "gtFine" / "val").glob(f"*/{stem}_gtFine_label*Ids.png"))
    assert len(orphans) == 2
    with pytest.raises(DataError, match=f"label file {orphans[0]} has no image \\(expected {image}\\)") as err:
        CityscapesDataModule(str(root), crop_size=32).setup("validate")
    assert str(err.value).endswith(f"[1 more label files have no image: {orphans[1]}]")
    moved.rename(image)
    label_ids = sorted((root / "gtFine" / "val").glob("*/*_gtFine_labelIds.png"))[0]
    for train_ids in (root / "gtFine" / "val").glob("*/*_gtFine_labelTrainIds.png"):
        train_ids.unlink()  # so the labelIds file is the one read
    _set_label_value(label_ids, 40)  # not an id of the official table
    with pytest.raises(DataError, match=f"label file {label_ids} holds values \\[40\\]"):
        CityscapesDataModule(str(root), crop_size=32).setup("validate")


def test_truncated_val_image_is_caught_up_front(ade_root):
    image = _truncate(sorted((ade_root / "images" / "validation").glob("*.jpg"))[-1])
    with pytest.raises(DataError, match=f"image file {image} is truncated"):
        _ade(ade_root).setup("fit")


def test_image_label_size_mismatch_from_the_header(ade_root):
    label = _last_val_label(ade_root)
    cv2.imwrite(str(label), np.ones((50, 60), np.uint8))
    image = ade_root / "images" / "validation" / f"{label.stem}.jpg"
    with pytest.raises(DataError, match=f"size mismatch: image {image} is 80x64 \\(WxH\\) but label {label} is 60x50"):
        _ade(ade_root).setup("validate")


def test_undecodable_image_and_predict_folder(ade_root, tmp_path):
    image = sorted((ade_root / "images" / "validation").glob("*.jpg"))[0]
    image.write_bytes(b"not a jpeg at all")
    with pytest.raises(DataError, match=f"cannot decode image file {image} \\(corrupt"):
        _ade(ade_root).setup("validate")
    folder = tmp_path / "pictures"
    folder.mkdir()
    cv2.imwrite(str(folder / "a.png"), np.zeros((8, 8, 3), np.uint8))
    _truncate(Path(shutil.copy(folder / "a.png", folder / "b.png")))
    with pytest.raises(DataError, match=f"image file {folder / 'b.png'} is truncated"):
        _ade(ade_root, predict_root=str(folder)).setup("predict")


def test_quickstart_generated_data_passes_the_check(tmp_path):
    root = tmp_path / "quickstart" / "ADEChallengeData2016"
    dm = QuickstartDataModule(str(root), num_train=4, num_val=2, size=32)
    dm.prepare_data()
    dm.setup("fit")  # labels are class + 1 (1..4): within range after reduce_zero_label
    bad = _set_label_value(sorted((root / "annotations" / "validation").glob("*.png"))[0], 5)
    with pytest.raises(DataError, match=f"label file {bad} holds values \\[5\\] \\(train ids \\[4\\]\\)"):
        QuickstartDataModule(str(root), num_train=4, num_val=2, size=32).setup("fit")


# -- SPair ----------------------------------------------------------------------------------------


@pytest.fixture
def spair(tmp_path) -> tuple[Path, dict[str, Path]]:
    return make_fake_spair(tmp_path / "SPair-71k")


def _first_val(root: Path) -> tuple[Path, dict]:
    path = root / "PairAnnotation" / "val" / f"{(root / 'Layout/large/val.txt').read_text().split()[0]}.json"
    return path, json.loads(path.read_text())


def test_spair_image_not_matching_its_annotation_is_caught_up_front(spair):
    root, _ = spair
    path, ann = _first_val(root)
    ann["src_imsize"][0] += 40
    path.write_text(json.dumps(ann))
    with pytest.raises(DataError, match=f"but {path} says .*src_imsize"):
        SPairDataModule(str(root), img_size=64).setup("fit")
    SPairDataModule(str(root), img_size=64, check=False).setup("fit")


def test_spair_checks_images_and_list_keypoints(spair, tmp_path):
    root, lists = spair
    _, ann = _first_val(root)
    image = root / "JPEGImages" / ann["category"] / ann["trg_imname"]
    _truncate(image)
    with pytest.raises(DataError, match=f"image file {image} is truncated"):
        SPairDataModule(str(root), img_size=64).setup("validate")
    SPairDataModule(str(root), img_size=64).setup("test")  # the test split does not use that image
    # Diffusion Hyperfeatures lists hold no image sizes: keypoints are checked against the image's
    entries = json.loads(lists["test"].read_text())
    entries[1]["target_points"] = [[10_000, 5]] + entries[1]["target_points"][1:]
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(entries))
    with pytest.raises(DataError, match=f"{bad} entry 1: trg keypoints .* lie outside"):
        SPairDataModule(str(root), img_size=64, pair_lists={"test": str(bad)}).setup("test")


def test_predict_folders_names_unpaired_images(spair, tmp_path):
    root, _ = spair
    images = sorted((root / "JPEGImages" / "cat").glob("*.jpg"))
    for side in ("a", "b"):
        (tmp_path / side).mkdir()
        shutil.copy(images[0], tmp_path / side / "both.jpg")
    shutil.copy(images[1], tmp_path / "a" / "only_source.jpg")
    shutil.copy(images[2], tmp_path / "b" / "only_target.jpg")
    with pytest.warns(UserWarning, match="2 images of the predict folders") as record:
        pairs = folder_pairs(tmp_path / "a", tmp_path / "b")
    message = str(record[0].message)
    assert str(tmp_path / "a" / "only_source.jpg") in message and str(tmp_path / "b" / "only_target.jpg") in message
    assert [p.name for p in pairs] == ["both"]


# -- DDPM-segmentation ----------------------------------------------------------------------------


@pytest.fixture
def horse(tmp_path) -> Path:
    return make_fake_ddpmseg(tmp_path / "horse_21", "horse21", num_train=2, num_test=2, size=256)


def _ddpm(root: Path, **kwargs) -> DDPMSegDataModule:
    return DDPMSegDataModule(root=str(root), dataset="horse21", features=str(root.parent / "features"), **kwargs)


def test_ddpmseg_bad_test_label_is_caught_at_test_setup(horse):
    label = sorted((horse / "real" / "test").glob("*.npy"))[-1]
    values = np.load(label)
    values[0, 0] = 21  # Horse-21: 0..20 and 255
    np.save(label, values)
    _ddpm(horse).setup("fit")  # fit uses the train split only
    with pytest.raises(DataError, match=f"label file {label} holds values 21 outside horse21's class ids"):
        _ddpm(horse).setup("test")
    _ddpm(horse, check=False).setup("test")


def test_ddpmseg_wrong_size_image_is_caught_at_fit_setup(horse):
    image = sorted((horse / "real" / "train").glob("*.png"))[0]
    cv2.imwrite(str(image), np.zeros((128, 256, 3), np.uint8))
    with pytest.raises(DataError, match=f"image {image} is 256x128 \\(WxH\\); horse21 images are 256x256"):
        _ddpm(horse).setup("fit")
