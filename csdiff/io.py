"""Atomic file writes: a file is either absent or complete, even if the process is killed."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import torch
from safetensors.torch import save_file


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp)`` on a temporary file beside ``path``, then rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp" + path.suffix, dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def remove_stale_temporaries(folder: str | Path) -> int:
    """Delete temporary files left by a killed run (they are never read); returns how many."""
    stale = list(Path(folder).rglob(".*.tmp*")) if Path(folder).is_dir() else []
    for path in stale:
        path.unlink(missing_ok=True)
    return len(stale)


def save_tensors(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> Path:
    """Atomically write a safetensors file."""
    clean = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    return atomic_write(path, lambda tmp: save_file(clean, str(tmp), metadata=metadata))


def save_image(path: str | Path, image: np.ndarray) -> Path:
    """Atomically write an image (RGB or single-channel uint8) with OpenCV; format from the suffix."""
    path = Path(path)
    arr = image[..., ::-1] if image.ndim == 3 else image

    def write(tmp: Path) -> None:
        ok, buf = cv2.imencode(path.suffix, np.ascontiguousarray(arr))
        if not ok:
            raise OSError(f"could not encode {path}")
        tmp.write_bytes(buf.tobytes())

    return atomic_write(path, write)


def save_text(path: str | Path, text: str) -> Path:
    """Atomically write a text file."""
    return atomic_write(path, lambda tmp: tmp.write_text(text))
