"""Horse-21 / Bedroom-28 data: the official layout read back, every DataError, splits, rare classes."""

from __future__ import annotations

import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from helpers import load_script

from csdiff.data.ddpmseg import (
    DDPMSEG_DATASETS,
    check_image_size,
    drop_rare_classes,
    get_spec,
    list_split,
    random_splits,
    read_ddpmseg_label,
)
from csdiff.data.reading import DataError, read_image

fake = load_script("make_fake_ddpmseg")
HORSE, BEDROOM = DDPMSEG_DATASETS["horse21"], DDPMSEG_DATASETS["bedroom28"]


@pytest.fixture(scope="module")
def roots(tmp_path_factory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("ddpmseg")
    return {name: fake.make_fake_ddpmseg(tmp / name, name, num_train=3, num_test=2) for name in DDPMSEG_DATASETS}


@pytest.fixture
def horse_copy(roots, tmp_path) -> Path:
    """A copy to break."""
    return Path(shutil.copytree(roots["horse21"], tmp_path / "horse_21"))


def test_specs_follow_upstream():
    assert (HORSE.num_classes, HORSE.ignore_index, len(HORSE.class_names)) == (21, 255, 21)
    assert HORSE.scored_classes == tuple(range(21)) and (HORSE.num_train, HORSE.num_test) == (30, 30)
    assert (BEDROOM.num_classes, BEDROOM.ignore_index, len(BEDROOM.class_names)) == (29, 0, 29)
    assert BEDROOM.scored_classes == tuple(range(1, 29)) and (BEDROOM.num_train, BEDROOM.num_test) == (40, 20)
    assert HORSE.class_names[-1] == "leg protection" and BEDROOM.class_names[-1] == "table staff"


def test_paper_code_class_rule():
    """The paper code's rule (diffusion-content-shift scarce_segmentation_gate/segmentation/
    data_util.py get_dataset_setting): bedroom_28 number_class 28, ignore_label 255; horse_21
    21, 255 (DDPM-segmentation's experiments/bedroom_28/ddpm.json: 29 and 0)."""
    paper = get_spec("bedroom28", "paper_code")
    assert (paper.num_classes, paper.ignore_index, paper.scored_classes) == (28, 255, tuple(range(28)))
    assert paper.class_rule == "paper_code" and paper.class_names == BEDROOM.class_names
    assert get_spec("bedroom28") == BEDROOM and BEDROOM.class_rule == "ddpm_segmentation"
    horse = get_spec("horse21", "paper_code")
    assert (horse.num_classes, horse.ignore_index, horse.scored_classes) == (
        HORSE.num_classes,
        HORSE.ignore_index,
        HORSE.scored_classes,
    )
    with pytest.raises(
        ValueError, match=r"unknown class_rule 'paper'; choose one of \['ddpm_segmentation', 'paper_code'\]"
    ):
        get_spec("bedroom28", "paper")


def test_paper_code_rule_reads_class_28_as_ignored(tmp_path):
    label = np.zeros((256, 256), np.uint8)
    label[:10] = 28
    label[10:20] = 27
    path = tmp_path / "x.npy"
    np.save(path, label)
    read = read_ddpmseg_label(path, get_spec("bedroom28", "paper_code"))
    assert (read[:10] == 255).all() and (read[10:20] == 27).all() and (read[20:] == 0).all()
    assert np.array_equal(read_ddpmseg_label(path, BEDROOM), label)  # DDPM-segmentation's rule: 28 is a class
    label[0, 0] = 29
    np.save(path, label)
    with pytest.raises(
        DataError, match=r"holds values 29 outside bedroom28's class ids 0\.\.27 \(ignore value 255, 28\)"
    ):
        read_ddpmseg_label(path, get_spec("bedroom28", "paper_code"))


@pytest.mark.parametrize("name", sorted(DDPMSEG_DATASETS))
def test_fake_datasets_read_back(roots, name):
    spec = DDPMSEG_DATASETS[name]
    for split, count in (("train", 3), ("test", 2)):
        pairs = list_split(roots[name], split, spec)
        assert len(pairs) == count
        for image_path, label_path in pairs:
            assert image_path.suffix == ".png" and label_path == image_path.with_suffix(".npy")
            image = read_image(str(image_path))
            check_image_size(image, image_path, spec)
            label = read_ddpmseg_label(label_path, spec)
            assert label.dtype == np.int64 and label.shape == (256, 256)
            assert (label == 0).any()  # background
            drawn = label[(label != 0) & (label != spec.ignore_index)]
            assert len(np.unique(drawn)) >= 3
            if name == "horse21":
                assert (label == 255).any()
            # a class's pixels share its colour: the labels describe the drawn shapes
            colours = fake.class_colours(spec.num_classes).astype(float)
            cls = int(drawn[0])
            mean = image[label == cls].astype(float).mean(axis=0)
            assert np.abs(mean - colours[cls]).max() < 12
    train = [p[0].name for p in list_split(roots[name], "train", spec)]
    assert train == sorted(train)


def test_natural_order(tmp_path):
    folder = tmp_path / "real" / "train"
    folder.mkdir(parents=True)
    for stem in ("img10", "img2", "img1"):
        cv2.imwrite(str(folder / f"{stem}.png"), np.zeros((4, 4, 3), np.uint8))
        np.save(folder / f"{stem}.npy", np.zeros((4, 4), np.uint8))
    assert [p[0].stem for p in list_split(tmp_path, "train", HORSE)] == ["img1", "img2", "img10"]


def test_missing_folders(tmp_path, horse_copy):
    with pytest.raises(DataError, match=r"nowhere.*real/train"):
        list_split(tmp_path / "nowhere", "train", HORSE)
    shutil.rmtree(horse_copy / "real" / "test")
    with pytest.raises(DataError, match=r"real/test not found; expected <root>/real/train/"):
        list_split(horse_copy, "test", HORSE)
    (horse_copy / "real" / "test").mkdir()
    with pytest.raises(DataError, match=r"real/test holds no images"):
        list_split(horse_copy, "test", HORSE)


def test_image_and_label_must_come_in_pairs(horse_copy):
    folder = horse_copy / "real" / "train"
    (folder / "horse_0000001.npy").unlink()
    with pytest.raises(DataError, match=r"image .*horse_0000001\.png has no label .*horse_0000001\.npy"):
        list_split(horse_copy, "train", HORSE)
    (folder / "horse_0000001.png").unlink()
    (folder / "horse_0000002.png").unlink()
    with pytest.raises(DataError, match=r"label .*horse_0000002\.npy has no image"):
        list_split(horse_copy, "train", HORSE)


@pytest.mark.parametrize(
    ("spec", "value", "shown"),
    [(HORSE, 21, "21"), (HORSE, -1, "-1"), (BEDROOM, 29, "29"), (BEDROOM, 255, "255")],
)
def test_labels_outside_the_classes(tmp_path, spec, value, shown):
    label = np.ones((256, 256), np.int32)
    label[0, :3] = value
    path = tmp_path / "x.npy"
    np.save(path, label)
    valid = f"0..{spec.num_classes - 1}"
    with pytest.raises(DataError, match=rf"x\.npy holds values {shown} outside {spec.name}'s class ids {valid}"):
        read_ddpmseg_label(path, spec)


def test_label_format_errors(tmp_path):
    path = tmp_path / "x.npy"
    np.save(path, np.full((256, 256), 1.5))
    with pytest.raises(DataError, match=r"x\.npy holds non-integer values 1\.5"):
        read_ddpmseg_label(path, HORSE)
    np.save(path, np.full((256, 256), 3.0))  # integral floats are class ids
    assert read_ddpmseg_label(path, HORSE).dtype == np.int64
    np.save(path, np.zeros((256, 256, 3), np.uint8))
    with pytest.raises(DataError, match=r"x\.npy has shape \(256, 256, 3\); expected a 2-D"):
        read_ddpmseg_label(path, HORSE)
    np.save(path, np.zeros((128, 256), np.uint8))
    with pytest.raises(DataError, match=r"x\.npy is 256x128 \(WxH\); horse21 labels are 256x256"):
        read_ddpmseg_label(path, HORSE)
    path.write_bytes(b"not a numpy file")
    with pytest.raises(DataError, match=r"cannot read label file .*x\.npy"):
        read_ddpmseg_label(path, HORSE)


def test_wrong_image_size(tmp_path):
    root = fake.make_fake_ddpmseg(tmp_path / "small", "bedroom28", num_train=1, num_test=1, size=128)
    image_path, label_path = list_split(root, "train", BEDROOM)[0]
    with pytest.raises(DataError, match=r"bedroom_0000000\.png is 128x128 \(WxH\); bedroom28 images are 256x256"):
        check_image_size(read_image(str(image_path)), image_path, BEDROOM)
    with pytest.raises(DataError, match=r"bedroom_0000000\.npy is 128x128"):
        read_ddpmseg_label(label_path, BEDROOM)


def test_random_splits():
    pairs = list(range(60))
    splits = random_splits(pairs, 40, seeds=[0, 1, 2, 3, 4])
    assert splits == random_splits(pairs, 40, seeds=[0, 1, 2, 3, 4])
    assert random_splits(pairs, 40, seeds=[4, 2])[::-1] == [splits[2], splits[4]]  # independent of the others
    for train, test in splits:
        assert len(train) == 40 and len(test) == 20
        assert sorted(train + test) == pairs and train == sorted(train) and test == sorted(test)
    assert len({tuple(train) for train, _ in splits}) == 5
    for bad in (0, 60):
        with pytest.raises(ValueError, match="num_train must be in 1..59"):
            random_splits(pairs, bad, seeds=[0])


def test_drop_rare_classes():
    label = np.zeros((10, 10), np.uint8)
    label[0, :5] = 1  # 5 pixels of class 1: dropped
    label[1:3, :] = 2  # 20 pixels of class 2: kept
    label[9, 9] = 255  # ignore stays ignore
    out = drop_rare_classes(label, ignore_index=255)
    assert (out[0, :5] == 255).all() and (out[1:3] == 2).all() and out[9, 9] == 255 and (out[4:9] == 0).all()
    assert label[0, 0] == 1  # a copy
    tensor = torch.from_numpy(label).long()
    assert torch.equal(drop_rare_classes(tensor, 255), torch.from_numpy(out).long())
    assert tensor[0, 0] == 1
    # Bedroom: the ignore value is class 0 itself; a few background pixels change nothing
    bedroom = np.full((10, 10), 5, np.int64)
    bedroom[0, 0] = 0
    assert np.array_equal(drop_rare_classes(bedroom, ignore_index=0, min_pixels=20), bedroom)
