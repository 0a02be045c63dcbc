"""Feature folders: features written once by ``csdiff extract`` (or a task on first use), read many times.

Layout: ``<folder>/manifest.json`` and one fp16 safetensors file per image,
``<folder>/<name>.safetensors`` with keys ``<variant>/<layer>``, each (C, h, w) at the layer's
native size (no upsampling: Horse-21's 4 variants × 3674 channels take ~50 MB per image this
way instead of ~1 GB at 256² in float32). The manifest says what made the files (csdiff
version, the extractor's description with weight fingerprints, the layer shapes) and which
images they hold; every reader compares it with its own extractor before trusting a file, so
features of other layers, variants, weights or size are never mixed in silently.

Files are written atomically, so a file that exists is complete: a killed run is resumed by
skipping the files that are there.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

import csdiff
from csdiff.backbone.extractor import DiffusionFeatureExtractor, describe_differences
from csdiff.io import save_tensors, save_text

MANIFEST = "manifest.json"
STORED_DTYPE = torch.float16


class FeatureFolderError(ValueError):
    """A feature folder does not hold what its reader expects; the message says what differs."""


def folder_description(extractor: DiffusionFeatureExtractor) -> dict:
    """What a folder's features depend on: the extractor, its layer shapes and csdiff's version."""
    shapes = extractor.feature_shapes()
    return {
        "csdiff_version": csdiff.__version__,
        "extractor": extractor.describe(),
        "shapes": {layer: list(shapes[layer]) for layer in extractor.layers},
        "stored_dtype": str(STORED_DTYPE).removeprefix("torch."),
    }


class FeatureFolder:
    """One extract folder: check or create its manifest, write and read per-image files."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)

    @property
    def manifest_path(self) -> Path:
        return self.folder / MANIFEST

    def manifest(self) -> dict | None:
        if not self.manifest_path.is_file():
            return None
        try:
            return json.loads(self.manifest_path.read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise FeatureFolderError(
                f"{self.manifest_path} is unreadable ({err}); delete the folder and extract again"
            ) from err

    def check(self, description: dict) -> dict:
        """The manifest, after checking that its features are the ones ``description`` would make."""
        manifest = self.manifest()
        if manifest is None:
            raise FeatureFolderError(
                f"{self.folder} is not a feature folder (no {MANIFEST}); write one with `csdiff extract --output {self.folder}`"
            )
        differences = folder_differences(manifest, description)
        if differences:
            raise FeatureFolderError(
                f"features in {self.folder} were written by another extractor: "
                + "; ".join(differences)
                + ". Use another folder (or delete this one) to extract with the current settings"
            )
        return manifest

    def prepare(self, description: dict, images: dict[str, str], write: bool = True) -> dict:
        """Create the manifest, or check an existing one and add ``images`` (name → source path).

        Only one process should pass ``write=True`` (rank 0); the others only check.
        """
        # a run that stopped before its first feature file (a bad option, a bad image) binds nothing
        exists = self.manifest_path.is_file() and any(self.folder.rglob("*.safetensors"))
        manifest = self.check(description) if exists else dict(description, images={})
        known = manifest.setdefault("images", {})
        # a moved dataset keeps its file names; another image under the same output name does not
        clashes = [
            f"{name}: {known[name]} vs {src}"
            for name, src in images.items()
            if Path(known.get(name, src)).name != Path(src).name
        ]
        if clashes:
            raise FeatureFolderError(
                f"{self.folder} holds features of other images under the same names ({'; '.join(clashes[:3])}); "
                f"use another folder"
            )
        new = any(known.get(name) != src for name, src in images.items())
        known.update(images)
        if write and (new or not exists):
            save_text(self.manifest_path, json.dumps(manifest, indent=1, sort_keys=True) + "\n")
        return manifest

    def path(self, name: str) -> Path:
        return self.folder / f"{name}.safetensors"

    def is_complete(self, name: str, keys: Iterable[str]) -> bool:
        """True when ``name``'s file exists and holds ``keys`` (its header is read, not its data)."""
        try:
            with safe_open(str(self.path(name)), framework="pt") as f:
                return set(keys) <= set(f.keys())
        except (SafetensorError, OSError, FileNotFoundError):
            return False

    def missing(self, items: Sequence[tuple[str, str]], keys: Iterable[str]) -> list[tuple[str, str]]:
        """The (name, image path) pairs whose files are absent or incomplete."""
        keys = list(keys)
        return [(name, path) for name, path in items if not self.is_complete(name, keys)]

    def write(
        self, name: str, features: dict[str, dict[str, torch.Tensor]], metadata: dict[str, str] | None = None
    ) -> Path:
        """One image's features ``{variant: {layer: (C, h, w)}}`` as an fp16 file, atomically."""
        tensors = {f"{v}/{layer}": x.to(STORED_DTYPE) for v, layers in features.items() for layer, x in layers.items()}
        return save_tensors(self.path(name), tensors, metadata=metadata)


def feature_keys(description: dict) -> list[str]:
    """``<variant>/<layer>`` keys every image file of a folder holds."""
    layers = description["extractor"]["layers"]
    return [f"{v['name']}/{layer}" for v in description["extractor"]["variants"] for layer in layers]


def folder_differences(manifest: dict, description: dict) -> list[str]:
    """What differs between a folder's manifest and the description of the current extractor."""
    lines = describe_differences(manifest.get("extractor", {}), description["extractor"], saved_as="folder")
    for key in ("shapes", "stored_dtype", "csdiff_version"):
        if manifest.get(key) != description[key]:
            lines.append(f"{key}: {manifest.get(key)} (folder) vs {description[key]} (now)")
    return lines
