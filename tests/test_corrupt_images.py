"""Truncated images (an interrupted copy or download) stop with one line naming the file.

libjpeg decodes a truncated JPEG with only a warning: without a check, the missing part
would train as grey pixels.
"""

from __future__ import annotations

import ast
from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml
from helpers import load_script

from csdiff.cli import main
from csdiff.data.reading import DataError, read_image, read_label

make_fake_ade20k = load_script("make_fake_ade20k").make_fake_ade20k
PACKAGE = Path(__file__).resolve().parents[1] / "csdiff"


def _truncate(path: Path, keep: float = 2 / 3) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    return path


def _picture(path: Path) -> Path:
    rng = np.random.default_rng(0)
    cv2.imwrite(str(path), rng.integers(0, 255, (48, 64, 3), dtype=np.uint8))
    return path


@pytest.mark.parametrize("suffix", [".jpg", ".png"])
def test_truncated_image_is_refused_whole_image_is_read(tmp_path, suffix):
    whole = _picture(tmp_path / f"whole{suffix}")
    assert read_image(str(whole)).shape == (48, 64, 3)
    cut = _truncate(_picture(tmp_path / f"cut{suffix}"))
    if suffix == ".jpg":  # OpenCV alone returns the image with its missing part filled
        assert cv2.imread(str(cut)) is not None
    with pytest.raises(DataError, match=f"image file {cut} is truncated"):
        read_image(str(cut))


def test_truncated_label_is_refused(tmp_path):
    path = tmp_path / "label.png"
    cv2.imwrite(str(path), np.arange(48 * 64, dtype=np.uint16).reshape(48, 64) % 7)
    assert read_label(str(path)).shape == (48, 64)
    _truncate(path)
    with pytest.raises(DataError, match=f"label file {path} is truncated"):
        read_label(str(path))


def test_jpeg_with_bytes_after_its_end_marker_is_read(tmp_path):
    """Some cameras append data after the end-of-image marker: the image itself is whole."""
    path = _picture(tmp_path / "trailer.jpg")
    path.write_bytes(path.read_bytes() + b"vendor trailer")
    assert read_image(str(path)).shape == (48, 64, 3)


def test_every_reader_decodes_through_the_checked_functions():
    """Datamodules, predict, extract: no module but csdiff/data/reading.py decodes files itself."""
    offenders = []
    for file in PACKAGE.rglob("*.py"):
        if file == PACKAGE / "data" / "reading.py":
            continue
        for node in ast.walk(ast.parse(file.read_text())):
            if isinstance(node, ast.Attribute) and node.attr in ("imread", "imdecode", "imreadmulti"):
                offenders.append(f"{file.relative_to(PACKAGE)}:{node.lineno}")
    assert not offenders, offenders


def test_fit_and_extract_stop_on_a_truncated_image(tmp_path, capsys):
    root = make_fake_ade20k(tmp_path / "ADEChallengeData2016", n_train=2, n_val=1, size=(64, 80))
    cut = _truncate(sorted((root / "images" / "training").glob("*"))[0])
    config = {
        "trainer": {
            "accelerator": "cpu",
            "max_steps": 1,
            "limit_val_batches": 1,
            "enable_progress_bar": False,
            "logger": False,
            "default_root_dir": str(tmp_path),
        },
        "model": {
            "class_path": "csdiff.tasks.SegmentationTask",
            "init_args": {
                "num_classes": 150,
                "backbone": {"model": "tiny", "img_size": 64},
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
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    assert main(["fit", "--config", str(tmp_path / "config.yaml")]) == 1
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert f"image file {cut} is truncated" in line
    code = main(
        [
            "extract",
            "--extractor.model",
            "tiny",
            "--extractor.img_size",
            "64",
            "--input",
            str(cut.parent),
            "--output",
            str(tmp_path / "features"),
            "--trainer.enable_progress_bar",
            "false",
        ]
    )
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 1 and f"image file {cut} is truncated" in line
