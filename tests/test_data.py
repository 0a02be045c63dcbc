"""Datasets, datamodules and transforms on tiny generated data (no real datasets needed)."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from cityscapesscripts.helpers.labels import labels as cs_labels
from helpers import load_script

from csdiff.data import (
    ADE20KDataModule,
    CityscapesDataModule,
    DataError,
    EvalTransform,
    ImageFolderDataset,
    QuickstartDataModule,
    SegmentationDataset,
    TrainTransform,
    collate_segmentation,
)
from csdiff.data.ade20k import reduce_zero_label
from csdiff.data.cityscapes import label_ids_to_train_ids, train_ids_to_label_ids
from csdiff.data.samplers import EpochSampler
from csdiff.data.synthetic import SHAPE_CLASSES, render_shapes
from csdiff.data.transforms import pad_to, random_crop, random_flip, random_resize, resize_short_side

make_fake_ade20k = load_script("make_fake_ade20k").make_fake_ade20k
make_fake_cityscapes = load_script("make_fake_cityscapes").make_fake_cityscapes


@pytest.fixture
def ade_root(tmp_path: Path) -> Path:
    return make_fake_ade20k(tmp_path / "ADEChallengeData2016")


@pytest.fixture
def city_root(tmp_path: Path) -> Path:
    return make_fake_cityscapes(tmp_path / "cityscapes")


def _ade(root: Path, **kwargs) -> ADE20KDataModule:
    return ADE20KDataModule(str(root), crop_size=64, scale=(256, 64), **kwargs)


# -- layouts ----------------------------------------------------------------------------------


def test_ade20k_layout_and_batches(ade_root: Path) -> None:
    dm = _ade(ade_root, eval_batch_size=2)
    dm.setup("fit")
    assert (dm.num_classes, dm.class_names[0], len(dm.palette)) == (150, "wall", 150)
    assert len(dm.datasets["train"]) == 4 and len(dm.datasets["val"]) == 2
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (2, 3, 64, 64) and batch["image"].dtype == torch.float32
    assert batch["image"].min() >= -1 and batch["image"].max() <= 1
    assert batch["label"].shape == (2, 64, 64) and batch["label"].dtype == torch.int64
    assert batch["orig_size"] == [(96, 128), (96, 128)] and len(batch["path"]) == 2
    val = next(iter(dm.val_dataloader()))
    # Short side 512 for the image, label untouched at the original resolution.
    assert val["image"].shape == (2, 3, 512, 683) and val["label"].shape == (2, 96, 128)
    dm.setup("test")
    assert dm.datasets["test"].samples == dm.datasets["val"].samples


def test_reduce_zero_label(ade_root: Path) -> None:
    raw = np.array([[0, 1, 2], [150, 255, 7]], dtype=np.uint8)
    assert reduce_zero_label(raw).tolist() == [[255, 0, 1], [149, 255, 6]]
    dm = _ade(ade_root, eval_resize=None)
    dm.setup("validate")
    item = dm.datasets["val"][0]
    raw = cv2.imread(dm.datasets["val"].samples[0][1], cv2.IMREAD_UNCHANGED).astype(np.int64)
    expected = np.where(raw == 0, 255, raw - 1)
    assert torch.equal(item["label"], torch.from_numpy(expected))
    assert {149, 255} <= set(item["label"].unique().tolist())


def test_cityscapes_conversion_matches_official_table(city_root: Path) -> None:
    for label in cs_labels:
        if 0 <= label.id < 256:
            expected = label.trainId if 0 <= label.trainId < 255 else 255
            assert label_ids_to_train_ids(np.array([label.id], dtype=np.uint8))[0] == expected, label.name
    train_ids = np.arange(19, dtype=np.int64)
    ids = train_ids_to_label_ids(train_ids)
    assert [next(lab.trainId for lab in cs_labels if lab.id == i) for i in ids] == list(range(19))
    assert train_ids_to_label_ids(np.array([255]))[0] == 0

    dm = CityscapesDataModule(str(city_root), crop_size=32, eval_resize=None)
    dm.setup("fit")
    assert dm.num_classes == 19 and dm.class_names[0] == "road" and dm.palette[0] == (128, 64, 128)
    samples = dm.datasets["train"].samples
    assert len(samples) == 4 and {Path(i).parent.name for i, _ in samples} == {"aachen", "bochum"}
    kinds = {label.rsplit("_", 1)[1] for _, label in samples}
    assert kinds == {"labelIds.png", "labelTrainIds.png"}
    val = dm.datasets["val"]
    for index, (_, label_path) in enumerate(val.samples):
        ids = cv2.imread(label_path.replace("labelTrainIds", "labelIds"), cv2.IMREAD_UNCHANGED)
        expected = [[lab.trainId % 256 for lab in cs_labels if lab.id == i][0] for i in ids.ravel()]
        assert val[index]["label"].ravel().tolist() == expected


# -- transforms -------------------------------------------------------------------------------


def test_pad_crop_flip_invariants() -> None:
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (30, 50, 3), dtype=np.uint8)
    label = rng.integers(0, 5, (30, 50), dtype=np.uint8)
    padded_img, padded_label = pad_to(img, label, (40, 60))
    assert padded_img.shape == (40, 60, 3) and padded_label.shape == (40, 60)
    assert (padded_label[30:] == 255).all() and (padded_label[:, 50:] == 255).all()
    assert (padded_img[30:] == 0).all() and np.array_equal(padded_label[:30, :50], label)

    crop_img, crop_label = random_crop(img, label, rng, (20, 20))
    assert crop_img.shape == (20, 20, 3) and crop_label.shape == (20, 20)
    _, small_label = random_crop(img, label, rng, 64)  # larger than the image: whole image
    assert small_label.shape == (30, 50)

    # Flip keeps image and label aligned: both encode the column index.
    cols = np.tile(np.arange(50, dtype=np.uint8), (30, 1))
    flips = 0
    for seed in range(20):
        out_img, out_label = random_flip(np.stack([cols] * 3, -1), cols, np.random.default_rng(seed))
        assert np.array_equal(out_img[..., 0], out_label)
        flips += int(out_label[0, 0] == 49)
    assert 0 < flips < 20

    resized_img, resized_label = random_resize(img, label, np.random.default_rng(1), (200, 60), (1.0, 1.0))
    assert resized_img.shape[:2] == resized_label.shape == (60, 100)  # short side bound by 60
    assert set(np.unique(resized_label)) <= set(np.unique(label))  # nearest: no new values
    assert resize_short_side(img, 60).shape == (60, 100, 3)


def test_cat_max_ratio_rejects_dominated_crops() -> None:
    # Left half mixes classes 1/2 evenly, right half is all class 0 (plus an ignore band):
    # a 40x40 crop at column offset x has class 0 covering x/40 of it (ignore excluded)...
    label = np.zeros((40, 80), dtype=np.uint8)
    label[:, :40] = np.indices((40, 40)).sum(0) % 2 + 1
    label[:4, 40:] = 255
    img = np.zeros((40, 80, 3), dtype=np.uint8)

    def share_ok(ratio: float, seed: int) -> bool:
        _, crop = random_crop(img, label, np.random.default_rng(seed), 40, cat_max_ratio=ratio)
        values, counts = np.unique(crop[crop != 255], return_counts=True)
        return len(values) > 1 and counts.max() / counts.sum() < 0.75

    assert all(share_ok(0.75, seed) for seed in range(50))
    assert sum(share_ok(1.0, seed) for seed in range(50)) < 45
    # No acceptable crop at all: still returns a crop of the requested size.
    uniform = np.full((40, 80), 3, dtype=np.uint8)
    assert random_crop(img, uniform, np.random.default_rng(0), 40)[1].shape == (40, 40)


def test_train_transform_pads_with_ignore() -> None:
    img = np.full((20, 30, 3), 200, dtype=np.uint8)
    label = np.ones((20, 30), dtype=np.uint8)
    transform = TrainTransform(crop_size=64, scale=(30, 20), ratio_range=(1.0, 1.0), photometric=False)
    image_t, label_t = transform(img, label, np.random.default_rng(0))
    assert image_t.shape == (3, 64, 64) and label_t.shape == (64, 64)
    assert (label_t[20:] == 255).all() and (label_t[:, 30:] == 255).all() and (label_t[:20, :30] == 1).all()
    assert torch.allclose(image_t[:, 20:], torch.tensor(-1.0))  # padded with 0 → -1


# -- reproducibility --------------------------------------------------------------------------


def test_same_seed_epoch_index_same_sample(ade_root: Path) -> None:
    def item(seed: int, epoch: int, index: int = 1) -> dict:
        dm = _ade(ade_root, seed=seed)
        dm.setup("fit")
        dm.set_epoch(epoch)
        return dm.datasets["train"][index]

    first, again = item(0, 3), item(0, 3)
    assert torch.equal(first["image"], again["image"]) and torch.equal(first["label"], again["label"])
    assert not torch.equal(first["image"], item(0, 4)["image"])
    assert not torch.equal(first["image"], item(1, 3)["image"])


def test_shuffle_order_is_a_function_of_seed_and_epoch(ade_root: Path) -> None:
    def order(epoch: int, seed: int = 0) -> list[str]:
        dm = _ade(ade_root, seed=seed, batch_size=1)
        dm.setup("fit")
        loader = dm.train_dataloader()
        dm.set_epoch(epoch)
        assert dm.datasets["train"].epoch == epoch
        return [batch["path"][0] for batch in loader]

    orders = [order(epoch) for epoch in range(6)]
    assert order(2) == orders[2] and all(sorted(o) == sorted(orders[0]) for o in orders)
    assert len({tuple(o) for o in orders}) > 1
    sampler = EpochSampler(SegmentationDataset([("a", None)] * 10, 3, EvalTransform()), seed=0)
    sampler.set_epoch(5)
    assert sampler.dataset.epoch == 5 and sorted(sampler) == list(range(10))


# -- errors -----------------------------------------------------------------------------------


def test_missing_root_and_empty_split(tmp_path: Path, ade_root: Path) -> None:
    missing = tmp_path / "nowhere" / "ADEChallengeData2016"
    with pytest.raises(DataError, match="nowhere.*images/"):
        _ade(missing).setup("fit")
    empty = tmp_path / "empty" / "ADEChallengeData2016"
    for sub in ("images/training", "annotations/training", "images/validation", "annotations/validation"):
        (empty / sub).mkdir(parents=True)
    with pytest.raises(DataError, match=r"no train images.*empty.*images/\{training"):
        _ade(empty).setup("fit")
    (ade_root / "annotations" / "validation").rename(ade_root / "annotations" / "val")
    with pytest.raises(DataError, match=r"split folder .*annotations/validation does not exist"):
        _ade(ade_root).setup("validate")
    with pytest.raises(DataError, match="leftImg8bit"):
        CityscapesDataModule(str(missing)).setup("fit")


def test_missing_label_file(ade_root: Path) -> None:
    label = ade_root / "annotations" / "training" / "ADE_train_00000002.png"
    label.unlink()
    with pytest.raises(DataError, match=str(label)):
        _ade(ade_root).setup("fit")


def test_corrupt_image_names_the_file(ade_root: Path) -> None:
    bad = ade_root / "images" / "validation" / "ADE_val_00000001.jpg"
    bad.write_bytes(b"not a jpeg at all")
    dm = _ade(ade_root, check=False)  # the load-time check (the up-front one: test_data_checks.py)
    dm.setup("validate")
    with pytest.raises(DataError, match=f"{bad}.*corrupt"):
        dm.datasets["val"][0]


def test_out_of_range_label_names_file_and_values(ade_root: Path) -> None:
    path = ade_root / "annotations" / "validation" / "ADE_val_00000002.png"
    label = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    label[5, 5] = 200
    cv2.imwrite(str(path), label)
    dm = _ade(ade_root, check=False)  # the load-time check (the up-front one: test_data_checks.py)
    dm.setup("validate")
    with pytest.raises(DataError, match=rf"{path} holds values \[200\].*\[0, 150\)"):
        dm.datasets["val"][1]


def test_size_mismatch_names_both_files(ade_root: Path) -> None:
    path = ade_root / "annotations" / "validation" / "ADE_val_00000001.png"
    cv2.imwrite(str(path), np.ones((50, 60), dtype=np.uint8))
    dm = _ade(ade_root, check=False)  # the load-time check (the up-front one: test_data_checks.py)
    dm.setup("validate")
    with pytest.raises(DataError, match=r"ADE_val_00000001\.jpg is 128x96.*ADE_val_00000001\.png is 60x50"):
        dm.datasets["val"][0]


# -- quickstart, image folders, batching --------------------------------------------------------


def test_quickstart_generates_and_regenerates(tmp_path: Path) -> None:
    root = tmp_path / "quickstart" / "ADEChallengeData2016"
    dm = QuickstartDataModule(str(root), num_train=4, num_val=2, size=32)
    dm.prepare_data()
    marker = root / ".complete"
    assert marker.is_file() and json.loads(marker.read_text())["seed"] == 1234
    images = sorted((root / "images" / "training").glob("*.jpg"))
    assert len(images) == 4 and len(list((root / "annotations" / "validation").glob("*.png"))) == 2
    raw = cv2.imread(str(root / "annotations" / "training" / f"{images[0].stem}.png"), cv2.IMREAD_UNCHANGED)
    assert raw.min() >= 1 and raw.max() <= 4
    original = images[0].read_bytes()

    images[0].write_bytes(b"half-written")
    dm.prepare_data()  # marker present: left alone
    assert images[0].read_bytes() == b"half-written"
    params = json.loads(marker.read_text())
    marker.write_text(json.dumps({**params, "family": params["family"] - 1}))
    dm.prepare_data()  # drawn by an older render_shapes: regenerated
    assert images[0].read_bytes() == original
    images[0].write_bytes(b"half-written")
    marker.unlink()
    dm.prepare_data()  # marker missing: regenerated, identically (same generation seed)
    assert marker.is_file() and images[0].read_bytes() == original

    dm.setup("fit")
    assert dm.class_names == ["background", "circle", "square", "triangle"] and dm.num_classes == 4
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (2, 3, 32, 32) and set(batch["label"].unique().tolist()) <= {0, 1, 2, 3, 255}
    assert dm.datasets["val"][0]["image"].shape == (3, 32, 32)  # eval at native size

    (root / "notes.txt").write_text("mine")
    marker.unlink()
    with pytest.raises(DataError, match="not a generated quickstart set"):
        dm.prepare_data()


def _lone_shapes(max_tilt: float, count: int = 40) -> list[tuple[str, np.ndarray]]:
    """(class name, bounding-box crop of its mask) for single shapes clear of the border."""
    rng = np.random.default_rng(5)
    shapes = []
    while len(shapes) < count:
        label = render_shapes(rng, 128, max_shapes=1, max_tilt=max_tilt).label
        ys, xs = np.nonzero(label)
        if ys.min() > 0 and xs.min() > 0 and ys.max() < 127 and xs.max() < 127:
            crop = label[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]
            shapes.append((SHAPE_CLASSES[int(label.max())], crop > 0))
    return shapes


def test_shapes_stand_upright_unless_tilted() -> None:
    upright = _lone_shapes(max_tilt=0)
    squares = [m for name, m in upright if name == "square"]
    triangles = [m for name, m in upright if name == "triangle"]
    assert squares and triangles
    assert all(m.mean() > 0.95 for m in squares)  # edges horizontal and vertical: fills its box
    assert all(m[0].sum() < m[-1].sum() / 3 for m in triangles)  # apex at the top
    tilted = [m for name, m in _lone_shapes(max_tilt=45) if name == "square"]
    assert min(m.mean() for m in tilted) < 0.8


def test_image_folder_dataset(tmp_path: Path) -> None:
    folder = tmp_path / "pictures"
    (folder / "sub").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name, shape in (("b.png", (20, 30)), ("a.JPG", (10, 10)), ("sub/c.bmp", (12, 16))):
        cv2.imwrite(str(folder / name), rng.integers(0, 256, (*shape, 3), dtype=np.uint8))
    (folder / "readme.txt").write_text("not an image")
    dataset = ImageFolderDataset(folder)
    assert [Path(p).relative_to(folder).as_posix() for p in dataset.paths] == ["a.JPG", "b.png", "sub/c.bmp"]
    item = dataset[1]
    assert "label" not in item and item["image"].shape == (3, 20, 30) and item["orig_size"] == (20, 30)
    assert len(ImageFolderDataset(folder / "b.png")) == 1
    (tmp_path / "void").mkdir()
    with pytest.raises(DataError, match="no images"):
        ImageFolderDataset(tmp_path / "void")
    with pytest.raises(DataError, match="missing is neither a folder nor an image"):
        ImageFolderDataset(tmp_path / "missing")


def test_predict_split_and_collate(ade_root: Path, tmp_path: Path) -> None:
    dm = _ade(ade_root, eval_resize=None)
    dm.setup("predict")
    item = dm.datasets["predict"][0]
    assert "label" not in item and item["image"].shape == (3, 96, 128)
    cv2.imwrite(str(tmp_path / "x.png"), np.zeros((40, 20, 3), dtype=np.uint8))
    dm = _ade(ade_root, eval_resize=None, predict_root=str(tmp_path / "x.png"), limit=1)
    dm.setup("predict")
    batch = collate_segmentation([dm.datasets["predict"][0], item])
    assert isinstance(batch["image"], list) and batch["orig_size"] == [(40, 20), (96, 128)]
    stacked = collate_segmentation([item, item])
    assert stacked["image"].shape == (2, 3, 96, 128)
