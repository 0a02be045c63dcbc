"""Atomic file writes: a file is either absent or complete, even if the process is killed."""

from __future__ import annotations

import os
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import torch
from safetensors.torch import save

_UMASK_LOCK = threading.Lock()


def current_umask() -> int:
    """The process's umask, read without changing it.

    ``os.umask`` can only be read by setting it, which for a moment gives other threads (DataLoader
    pin-memory, TensorBoard writers) another umask; Linux reports it in /proc instead.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    with _UMASK_LOCK:  # no /proc: set and restore at once, serialised within csdiff
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp)`` on a temporary file beside ``path``, then rename it into place.

    The file gets the permissions of an ordinary new file (0666 less the umask): ``mkstemp``
    creates 0600, which would hide outputs from the user's group. An OSError (disk full,
    permission) is raised again naming ``path``, not the temporary file or nothing.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp" + path.suffix, dir=path.parent)
        os.close(fd)
    except OSError as err:
        raise _naming(err, path) from err
    try:
        write(Path(tmp))
        os.chmod(tmp, 0o666 & ~current_umask())
        os.replace(tmp, path)
    except OSError as err:
        Path(tmp).unlink(missing_ok=True)
        raise _naming(err, path) from err
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _naming(err: OSError, path: Path) -> OSError:
    """``err`` as the same kind of OSError whose message names ``path`` (the file being written)."""
    if err.errno is None:
        return OSError(f"{err}: could not write {path}")
    return OSError(err.errno, err.strerror or str(err), str(path))


def remove_stale_temporaries(folder: str | Path) -> int:
    """Delete temporary files left by a killed run (they are never read); returns how many."""
    stale = list(Path(folder).rglob(".*.tmp*")) if Path(folder).is_dir() else []
    for path in stale:
        path.unlink(missing_ok=True)
    return len(stale)


def save_tensors(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> Path:
    """Atomically write a safetensors file."""
    clean = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    # serialised in memory and written by Python, so a full disk is an OSError with its errno
    # (safetensors' own file writer reports it as a SafetensorError with the errno in its text)
    data = save(clean, metadata=metadata)
    return atomic_write(path, lambda tmp: tmp.write_bytes(data))


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
