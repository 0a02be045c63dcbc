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
        raise DataError(
            f"{what} file {path} is truncated (its data ends early: an interrupted copy or download?); replace or remove it"
        )
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


# JPEG start-of-frame markers (SOF0..SOF15 less DHT C4, JPG C8, DAC CC): they hold the image size.
_JPEG_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
# Markers without a length field: TEM, RST0..RST7, SOI.
_JPEG_STANDALONE = frozenset({0x01, *range(0xD0, 0xD9)})


def _jpeg_size(raw: bytes) -> tuple[int, int] | None:
    """(H, W) from a JPEG's start-of-frame segment, or None where the header does not say."""
    i = 2
    while i + 4 <= len(raw):
        if raw[i] != 0xFF:
            return None
        marker = raw[i + 1]
        if marker == 0xFF:  # fill byte before a marker
            i += 1
        elif marker in _JPEG_STANDALONE:
            i += 2
        elif marker in _JPEG_SOF:
            if i + 9 > len(raw):
                return None
            height, width = int.from_bytes(raw[i + 5 : i + 7], "big"), int.from_bytes(raw[i + 7 : i + 9], "big")
            return (height, width) if height and width else None  # height 0: set later by a DNL segment
        elif marker == 0xDA:  # start of scan before any frame header: not a JPEG we can size
            return None
        else:
            i += 2 + int.from_bytes(raw[i + 2 : i + 4], "big")
    return None


def _png_size(raw: bytes) -> tuple[int, int] | None:
    """(H, W) from a PNG's IHDR chunk (always the first), or None."""
    if len(raw) < 24 or raw[12:16] != b"IHDR":
        return None
    width, height = int.from_bytes(raw[16:20], "big"), int.from_bytes(raw[20:24], "big")
    return (height, width) if height and width else None


def _read_whole(path: str, what: str) -> bytes:
    """:func:`_read_complete`'s bytes, without its scan for the end marker where the file
    visibly ends with it (a JPEG ending in FF D9, a PNG in its IEND chunk): that scan walks a
    baseline JPEG's whole entropy-coded data, ~1 ms per 400 KB, longer than the header check."""
    file = Path(path)
    raw = file.read_bytes() if file.is_file() else b""
    jpeg_whole = raw[:2] == b"\xff\xd8" and raw.endswith(b"\xff\xd9")
    png_whole = raw[:8] == b"\x89PNG\r\n\x1a\n" and raw[-8:-4] == b"IEND"
    return raw if jpeg_whole or png_whole else _read_complete(path, what).tobytes()


def image_size(path: str) -> tuple[int, int]:
    """(H, W) of an image file as :func:`read_image` would decode it, without decoding it.

    For the up-front data check: the whole file is read and checked for truncation as by
    ``read_image``, but a JPEG's or PNG's size comes from its header (microseconds, where a
    decode takes milliseconds). Other formats, and headers that do not parse, are decoded by
    ``read_image``, so an undecodable file fails with ``read_image``'s message. Stored pixels
    are measured (EXIF rotation ignored), as ``read_image`` returns them for labelled data.
    """
    raw = _read_whole(path, "image")
    if raw[:2] == b"\xff\xd8":
        size = _jpeg_size(raw)
    elif raw[:8] == b"\x89PNG\r\n\x1a\n":
        size = _png_size(raw)
    else:
        size = None
    if size is None:
        height, width = read_image(path).shape[:2]
        return int(height), int(width)
    return size


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
