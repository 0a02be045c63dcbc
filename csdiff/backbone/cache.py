"""Feature cache: deterministic features computed once, then read back bit-identically.

Whenever the extractor's features are deterministic (seeded noise, no random augmentation of
its input) an image's features depend only on the extractor and the image, so validation,
test and fixed-noise training need not run the backbone twice. Each image's features are one
fp16 safetensors file; cold results are rounded to fp16 as well, so that a cold and a warm
evaluation see exactly the same numbers.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

import csdiff
from csdiff.backbone.extractor import DiffusionFeatureExtractor
from csdiff.io import save_tensors, save_text

Features = dict[str, dict[str, torch.Tensor]]
STORED_DTYPE = torch.float16


class FeatureCache:
    """fp16 safetensors files under ``folder`` (and an optional in-memory LRU of ``memory_items`` images).

    Layout: ``<folder>/<extractor hash>/<key[:2]>/<key>.safetensors`` with a
    ``description.json`` beside each extractor's files, so that a person can tell them apart.
    The extractor hash covers :meth:`DiffusionFeatureExtractor.describe` (weight fingerprints,
    layers, variants, img_size, timestep, latent, dtype), the layers read per variant and the
    csdiff version; an image's key adds its resolved path, size, mtime and the input transform. Any
    change is a miss. A file that fails to load or does not match the current layers' shapes
    is recomputed and overwritten, never trusted.
    """

    def __init__(self, folder: str | Path, memory_items: int = 0) -> None:
        if memory_items < 0:
            raise ValueError(f"memory_items must be >= 0, got {memory_items}")
        self.folder = Path(folder)
        self.memory_items = memory_items
        self.hits = 0
        self.misses = 0
        self._memory: OrderedDict[str, dict[str, torch.Tensor]] = OrderedDict()
        self._shapes: dict[str, dict[str, tuple[int, int, int]]] = {}  # per extractor hash: probing costs ~0.5 s
        self._described: set[str] = set()

    def features(
        self,
        extractor: DiffusionFeatureExtractor,
        images: torch.Tensor,
        paths: list[str | Path],
        transform: str | Sequence[str],
        layers: dict[str, Sequence[str]] | None = None,
    ) -> Features:
        """``extractor(images, layers=layers)`` rounded to fp16 (cast to ``extractor.feature_dtype``),
        running the backbone only on the images whose features are not cached.

        ``images`` (B, 3, H, W) in [-1, 1] are the B files ``paths`` after the input transform
        named by ``transform`` (e.g. ``"eval-resize=short512"``; one string for all images, or
        one per image, e.g. per sliding-window crop): the pixels themselves are not hashed, so
        the transform string must change whenever the pixels it produces do.
        ``layers`` restricts some variants to some layers, as in the extractor's ``forward``.
        """
        wanted = {
            v.name: [n for n in extractor.layers if n in (layers or {}).get(v.name, extractor.layers)]
            for v in extractor.variants
        }
        description = dict(self._check(extractor, images, paths), variant_layers=wanted)
        digest = _hash(description)
        transforms = [transform] * len(paths) if isinstance(transform, str) else list(transform)
        if len(transforms) != len(paths):
            raise ValueError(f"give one transform per image or one for all: {len(transforms)} for {len(paths)} images")
        keys = [_image_key(digest, path, t) for path, t in zip(paths, transforms)]
        stored: list[dict[str, torch.Tensor] | None] = [self._read(extractor, digest, key, wanted) for key in keys]
        missing = [i for i, entry in enumerate(stored) if entry is None]
        self.hits += len(keys) - len(missing)
        self.misses += len(missing)
        if missing:
            computed = extractor(extractor.resize(images[missing]), layers=layers)
            self._describe(digest, description)
            for j, i in enumerate(missing):
                entry = {
                    f"{v}/{layer}": x[j].to(STORED_DTYPE).cpu().clone()
                    for v, layers in computed.items()
                    for layer, x in layers.items()
                }
                save_tensors(self._file(digest, keys[i]), entry)
                self._remember(keys[i], entry)
                stored[i] = entry
        return {
            name: {
                layer: torch.stack([entry[f"{name}/{layer}"] for entry in stored]).to(
                    extractor.device, extractor.feature_dtype
                )
                for layer in names
            }
            for name, names in wanted.items()
        }

    def _check(self, extractor: DiffusionFeatureExtractor, images: torch.Tensor, paths: list[str | Path]) -> dict:
        """The extractor's description, once the features are known to be cacheable."""
        if extractor.fresh_noise:
            raise ValueError(
                "FeatureCache needs deterministic features, but the extractor has fresh_noise=True (new noise on every call)"
            )
        provided = [v.name for v in extractor.variants if any(cn.condition == "provided" for cn in v.controlnets)]
        if provided:
            raise ValueError(
                f"FeatureCache cannot cache variants with provided ControlNet conditions (not part of the key): {provided}"
            )
        if images.ndim != 4 or len(paths) != images.shape[0]:
            raise ValueError(f"give one path per image: {len(paths)} paths for images of shape {tuple(images.shape)}")
        return dict(extractor.describe(), csdiff_version=csdiff.__version__)

    def _file(self, digest: str, key: str) -> Path:
        return self.folder / digest / key[:2] / f"{key}.safetensors"

    def _read(
        self, extractor: DiffusionFeatureExtractor, digest: str, key: str, wanted: dict[str, list[str]]
    ) -> dict[str, torch.Tensor] | None:
        """The stored fp16 features of one image, or None when absent or not valid for this extractor."""
        if key in self._memory:
            self._memory.move_to_end(key)
            return self._memory[key]
        file = self._file(digest, key)
        if not file.is_file():
            return None
        try:
            entry = load_file(str(file))
        except (SafetensorError, OSError, RuntimeError, ValueError):
            return None
        if digest not in self._shapes:
            self._shapes[digest] = extractor.feature_shapes()
        shapes = self._shapes[digest]
        expected = {f"{name}/{layer}": shapes[layer] for name, names in wanted.items() for layer in names}
        if entry.keys() != expected.keys():
            return None
        if any(x.dtype != STORED_DTYPE or tuple(x.shape) != tuple(expected[name]) for name, x in entry.items()):
            return None
        self._remember(key, entry)
        return entry

    def _remember(self, key: str, entry: dict[str, torch.Tensor]) -> None:
        if not self.memory_items:
            return
        self._memory[key] = entry
        self._memory.move_to_end(key)
        while len(self._memory) > self.memory_items:
            self._memory.popitem(last=False)

    def _describe(self, digest: str, description: dict) -> None:
        """Write ``description.json`` once per extractor folder (atomically)."""
        if digest in self._described:
            return
        file = self.folder / digest / "description.json"
        if not file.is_file():
            save_text(file, json.dumps(description, indent=2, sort_keys=True) + "\n")
        self._described.add(digest)


def _hash(description: dict) -> str:
    return hashlib.sha256(json.dumps(description, sort_keys=True).encode()).hexdigest()[:16]


def _image_key(digest: str, path: str | Path, transform: str) -> str:
    """Names one image's features: the extractor, the file (path, size, mtime) and the input transform."""
    resolved = Path(path).expanduser().resolve()
    stat = os.stat(resolved)
    parts = [digest, str(resolved), str(stat.st_size), str(stat.st_mtime_ns), transform]
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()
