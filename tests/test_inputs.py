"""Dataset inputs as users have them: image formats other than the usual one."""

from __future__ import annotations

from pathlib import Path

import cv2
import pytest
from helpers import load_script

from csdiff.data import ADE20KDataModule
from csdiff.data.reading import DataError

make_fake_ade20k = load_script("make_fake_ade20k").make_fake_ade20k


def test_ade20k_layout_reads_png_images(tmp_path):
    """An ADE20K-layout image saved as .png is read, not silently skipped."""
    root = make_fake_ade20k(tmp_path / "ADEChallengeData2016", n_train=2, n_val=1, size=(64, 80))
    jpg = sorted((root / "images" / "training").glob("*.jpg"))[0]
    cv2.imwrite(str(jpg.with_suffix(".png")), cv2.imread(str(jpg)))
    jpg.unlink()
    dm = ADE20KDataModule(root=str(root), crop_size=64, scale=(128, 64))
    dm.setup("fit")
    names = [Path(p).name for p in dm.datasets["train"].paths]
    assert len(names) == 2 and jpg.with_suffix(".png").name in names
    assert dm.datasets["train"][0]["image"].shape[0] == 3


def test_ade20k_images_sharing_a_label_are_an_error(tmp_path):
    root = make_fake_ade20k(tmp_path / "ADEChallengeData2016", n_train=2, n_val=1, size=(64, 80))
    jpg = sorted((root / "images" / "training").glob("*.jpg"))[0]
    cv2.imwrite(str(jpg.with_suffix(".png")), cv2.imread(str(jpg)))
    with pytest.raises(DataError, match=f"{jpg.stem}.png share the label file"):
        ADE20KDataModule(root=str(root)).setup("fit")
