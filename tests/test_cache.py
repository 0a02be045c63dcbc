"""FeatureCache: warm calls skip the backbone and match cold ones bit for bit; any key change is a
miss; a damaged file is recomputed, never trusted."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from helpers import shapes_images
from safetensors.torch import load_file
from torch._subclasses.fake_tensor import FakeTensor

import csdiff
from csdiff.backbone import DiffusionFeatureExtractor, FeatureCache, Variant
from csdiff.io import save_tensors

LAYERS = ["up-level1-upsampler-out", "mid-repeat1-res-out"]
VARIANTS = [Variant("plain", prompt="shapes", seed=0), Variant("other", prompt="a photo", seed=1)]
TRANSFORM = "eval-resize=64"


def make(layers=LAYERS, **kw) -> DiffusionFeatureExtractor:
    # one UNet call per variant, so that calls count computed variants
    return DiffusionFeatureExtractor("tiny", layers, img_size=64, variants=VARIANTS, batch_variants=False, **kw)


@pytest.fixture(scope="module")
def extractor() -> DiffusionFeatureExtractor:
    return make()


@pytest.fixture()
def unet_calls(extractor):
    """How many real UNet forwards ran (not the shape probe's fake ones): a warm call must make none."""
    calls = []

    def count(_module, args) -> None:  # a pre-hook: the extractor stops the UNet early, so it never returns
        if not isinstance(args[0], FakeTensor):
            calls.append(1)

    handle = extractor.unet.register_forward_pre_hook(count)
    yield calls
    handle.remove()


@pytest.fixture()
def images(tmp_path) -> tuple[torch.Tensor, list[Path]]:
    """Three shape images as tensors in [-1, 1] and as PNG files."""
    x = shapes_images(3, size=64)
    paths = []
    for i, image in enumerate(x):
        rgb = ((image.permute(1, 2, 0).numpy() + 1) * 127.5).round().astype(np.uint8)
        paths.append(tmp_path / f"img{i}.png")
        cv2.imwrite(str(paths[-1]), rgb[..., ::-1])
    return x, paths


def files(folder: Path) -> list[Path]:
    return sorted(folder.rglob("*.safetensors"))


def assert_identical(a: dict, b: dict) -> None:
    assert list(a) == list(b)
    for v in a:
        assert list(a[v]) == list(b[v])
        for layer in a[v]:
            assert a[v][layer].dtype == b[v][layer].dtype
            assert torch.equal(a[v][layer], b[v][layer]), (v, layer)


def test_warm_call_skips_backbone_and_is_bit_identical(extractor, images, unet_calls, tmp_path):
    x, paths = images
    cache = FeatureCache(tmp_path / "cache")
    cold = cache.features(extractor, x, paths, TRANSFORM)
    assert len(unet_calls) == len(VARIANTS) and (cache.hits, cache.misses) == (0, 3)
    assert len(files(tmp_path / "cache")) == 3  # one file per image
    warm = cache.features(extractor, x, paths, TRANSFORM)
    again = FeatureCache(tmp_path / "cache").features(extractor, x, paths, TRANSFORM)  # a new process: from disk
    assert len(unet_calls) == len(VARIANTS) and (cache.hits, cache.misses) == (3, 3)
    assert_identical(cold, warm)
    assert_identical(cold, again)
    (description,) = (tmp_path / "cache").glob("*/description.json")
    assert json.loads(description.read_text())["layers"] == LAYERS


def test_cold_features_are_the_extractor_output_rounded_to_fp16(extractor, images, tmp_path):
    x, paths = images
    reference = extractor(x)
    cold = FeatureCache(tmp_path / "cache").features(extractor, x, paths, TRANSFORM)
    rounded = {v: {k: t.half().to(extractor.feature_dtype) for k, t in d.items()} for v, d in reference.items()}
    assert_identical(cold, rounded)


def test_mixed_batch_keeps_order(extractor, images, unet_calls, tmp_path):
    x, paths = images
    cache = FeatureCache(tmp_path / "cache")
    full = cache.features(extractor, x, paths, TRANSFORM)
    shutil.rmtree(tmp_path / "cache")
    cache.features(extractor, x[1:2], paths[1:2], TRANSFORM)
    calls = len(unet_calls)
    mixed = cache.features(extractor, x, paths, TRANSFORM)  # image 1 is a hit, 0 and 2 are computed together
    assert len(unet_calls) == calls + len(VARIANTS) and cache.hits == 1
    for v in full:
        for layer in full[v]:
            torch.testing.assert_close(mixed[v][layer], full[v][layer], atol=2e-3, rtol=2e-3)


def test_other_layers_are_a_miss(extractor, images, tmp_path):
    x, paths = images
    cache = FeatureCache(tmp_path / "cache")
    cache.features(extractor, x, paths, TRANSFORM)
    other = make(layers=LAYERS[:1])
    out = cache.features(other, x, paths, TRANSFORM)
    assert (cache.hits, cache.misses) == (0, 6)
    assert list(out["plain"]) == LAYERS[:1]
    assert len(list((tmp_path / "cache").glob("*/description.json"))) == 2


def test_other_version_is_a_miss(extractor, images, tmp_path, monkeypatch):
    x, paths = images
    cache = FeatureCache(tmp_path / "cache")
    cache.features(extractor, x, paths, TRANSFORM)
    monkeypatch.setattr(csdiff, "__version__", "999.0")
    cache.features(extractor, x, paths, TRANSFORM)
    assert (cache.hits, cache.misses) == (0, 6)


def test_changed_image_file_is_a_miss(extractor, images, tmp_path):
    x, paths = images
    cache = FeatureCache(tmp_path / "cache")
    cache.features(extractor, x, paths, TRANSFORM)
    cv2.imwrite(str(paths[0]), np.zeros((64, 64, 3), np.uint8))  # new bytes, new size
    stat = paths[1].stat()
    os.utime(paths[1], ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))  # same bytes, new mtime
    cache.features(extractor, x, paths, TRANSFORM)
    assert (cache.hits, cache.misses) == (1, 5)


def test_other_transform_is_a_miss(extractor, images, tmp_path):
    x, paths = images
    cache = FeatureCache(tmp_path / "cache")
    cache.features(extractor, x, paths, TRANSFORM)
    cache.features(extractor, x, paths, "eval-resize=short512")
    assert (cache.hits, cache.misses) == (0, 6)


def truncate(file: Path) -> None:
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2])


def garbage(file: Path) -> None:
    file.write_bytes(os.urandom(file.stat().st_size))


def wrong_shape(file: Path) -> None:
    save_tensors(file, {k: torch.zeros(1, 2, 2, dtype=torch.float16) for k in load_file(str(file))})


def missing_key(file: Path) -> None:
    entry = load_file(str(file))
    entry.pop(next(iter(entry)))
    save_tensors(file, entry)


def wrong_dtype(file: Path) -> None:
    save_tensors(file, {k: t.float() for k, t in load_file(str(file)).items()})


@pytest.mark.parametrize("damage", [truncate, garbage, wrong_shape, missing_key, wrong_dtype], ids=lambda f: f.__name__)
def test_damaged_file_is_recomputed(extractor, images, unet_calls, tmp_path, damage):
    x, paths = images
    cache = FeatureCache(tmp_path / "cache")
    cold = cache.features(extractor, x[:1], paths[:1], TRANSFORM)
    (file,) = files(tmp_path / "cache")
    damage(file)
    calls = len(unet_calls)
    out = cache.features(extractor, x[:1], paths[:1], TRANSFORM)
    assert len(unet_calls) == calls + len(VARIANTS) and (cache.hits, cache.misses) == (0, 2)
    assert_identical(out, cold)
    warm = cache.features(extractor, x[:1], paths[:1], TRANSFORM)  # the overwritten file is valid
    assert len(unet_calls) == calls + len(VARIANTS) and cache.hits == 1
    assert_identical(warm, cold)


def test_fresh_noise_is_refused(images, tmp_path):
    x, paths = images
    with pytest.raises(ValueError, match="fresh_noise"):
        FeatureCache(tmp_path / "cache").features(make(fresh_noise=True), x, paths, TRANSFORM)


def test_memory_lru_serves_without_disk(extractor, images, unet_calls, tmp_path):
    x, paths = images
    cache = FeatureCache(tmp_path / "cache", memory_items=2)
    cold = cache.features(extractor, x, paths, TRANSFORM)
    shutil.rmtree(tmp_path / "cache")
    calls = len(unet_calls)
    warm = cache.features(extractor, x[1:], paths[1:], TRANSFORM)  # the two most recent images
    assert len(unet_calls) == calls and cache.hits == 2
    for v in cold:
        for layer in cold[v]:
            assert torch.equal(warm[v][layer], cold[v][layer][1:])
    cache.features(extractor, x[:1], paths[:1], TRANSFORM)  # evicted, and its file is gone: recomputed
    assert len(unet_calls) == calls + len(VARIANTS) and cache.misses == 4
