"""Reading dataset files, shared by every datamodule: images, labels, output names, errors.

Every datamodule reports bad input the same way: a :class:`DataError` whose one-line
message names the file or folder and the fix.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


class DataError(ValueError):
    """A dataset file or folder is missing, unreadable or inconsistent; the message names it."""


def _read_complete(path: str, what: str) -> np.ndarray:
    """The file's bytes, after checking that a JPEG or PNG is whole.

    libjpeg decodes a truncated JPEG with only a warning on stderr (OpenCV returns the image,
    its missing part grey), so a cut-off download would train silently: a JPEG must hold an
    end-of-image marker after its last scan, a PNG its IEND chunk.
    """
    if not Path(path).is_file():
        raise DataError(f"{what} file not found: {path}")
    data = np.fromfile(path, dtype=np.uint8)
    raw = data.tobytes()
    truncated = False
    if raw[:2] == b"\xff\xd8":  # JPEG: FF D9 (end of image) after the last FF DA (start of scan)
        truncated = raw.find(b"\xff\xd9", max(raw.rfind(b"\xff\xda"), 0)) < 0
    elif raw[:8] == b"\x89PNG\r\n\x1a\n":
        truncated = raw.rfind(b"IEND") < 0
    if truncated:
        raise DataError(f"{what} file {path} is truncated (its data ends early: an interrupted copy or download?); replace or remove it")
    if data.size == 0:
        raise DataError(f"cannot decode {what} file {path} (it is empty); replace or remove it")
    return data


def read_image(path: str, exif_orientation: bool = False) -> np.ndarray:
    """Decode an image file as (H, W, 3) uint8 RGB (grey images are expanded).

    EXIF rotation is ignored by default: labels are drawn on the stored pixels, so a
    rotated image would no longer line up with its label. Unlabelled photos may honour it.
    """
    data = _read_complete(path, "image")
    flags = cv2.IMREAD_COLOR if exif_orientation else cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION
    img = cv2.imdecode(data, flags)
    if img is None:
        raise DataError(f"cannot decode image file {path} (corrupt or not an image); replace or remove it")
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


def read_label(path: str) -> np.ndarray:
    """Decode a label file as a single-channel integer array, values as stored."""
    label = cv2.imdecode(_read_complete(path, "label"), cv2.IMREAD_UNCHANGED)
    if label is None:
        raise DataError(f"cannot decode label file {path} (corrupt or not an image); replace or remove it")
    if label.ndim != 2:
        raise DataError(f"label file {path} has shape {label.shape}; expected a single-channel (H, W) index map")
    return label


def list_images(root: str | Path, recursive: bool = True) -> list[str]:
    """Image files under ``root`` (in subfolders too unless ``recursive`` is false), sorted,
    by extension (case-insensitive)."""
    found = Path(root).rglob("*") if recursive else Path(root).iterdir()
    return sorted(str(p) for p in found if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())


def output_names(paths: Sequence[str], root: str | Path | None = None) -> list[str]:
    """One distinct output name per image, for files written per input (features, predictions).

    The name is the path relative to ``root`` (default: the images' common folder) without
    its suffix, so ``sub/d.jpg`` and ``d.jpg`` stay apart; images that differ only by suffix
    (``a.jpg``, ``a.png``) keep it (``a.jpg``, ``a.png``). Two images that would still share
    a name raise a DataError naming both, instead of one silently overwriting the other.
    """
    if not paths:
        return []
    base = Path(root) if root is not None else Path(os.path.commonpath([str(Path(p).parent) for p in paths]))
    relative = [Path(p).relative_to(base) for p in paths]
    stems = [str(r.with_suffix("")) for r in relative]
    counts = Counter(stems)
    names = [str(r) if counts[stem] > 1 else stem for r, stem in zip(relative, stems)]
    owner: dict[str, str] = {}
    for path, name in zip(paths, names):
        if name in owner:
            raise DataError(f"images {owner[name]} and {path} would both be written as {name!r}; rename one of them")
        owner[name] = path
    return names
