"""`csdiff assess`: img2img reconstructions, GATE scores with intervals, files, resume, refusals.

The score's arithmetic (Laplacian contours, the anchor, the bootstrap) is checked by hand in
tests/test_gate_score.py; here the real command runs on the tiny backbone with its ControlNet.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import cv2
import numpy as np
import pytest
from helpers import assert_close_up_to_rounding, shapes_images, stock_img2img

from csdiff.assess.command import CAPTION, anchor_name, default_anchor_timestep, summarize
from csdiff.backbone import DiffusionFeatureExtractor
from csdiff.backbone.img2img import NO_TECHNIQUE, chain_timesteps, reconstruct
from csdiff.backbone.variants import Variant
from csdiff.cli import main
from csdiff.visualize.features import HEADER, PAD

LAYERS = ["up-level1-upsampler-out", "up-level2-upsampler-out"]
CONFIG = """\
model:
  class_path: csdiff.tasks.SegmentationTask
  init_args:
    num_classes: 4
    backbone: {model: tiny, img_size: 64, timestep: 50}
    variants:
      - {name: plain, prompt: a photo of shapes}
      - {name: canny, prompt: a photo, controlnets: [{model: tiny-controlnet-canny}]}
      - {name: chain, prompt: a photo, denoise_from: 60}
    layers: [up-level1-upsampler-out, up-level2-upsampler-out]
"""
VARIANTS = ["no technique", "plain", "canny", "chain"]
CELL = 64


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> tuple[Path, Path]:
    """The config and a folder of three shape pictures."""
    work = tmp_path_factory.mktemp("assess")
    (work / "assess.yaml").write_text(CONFIG)
    folder = work / "images"
    folder.mkdir()
    for i, image in enumerate(shapes_images(3, 64, seed=11)):
        rgb = ((image.permute(1, 2, 0).numpy() + 1) * 127.5).round().astype(np.uint8)
        cv2.imwrite(str(folder / f"shape{i}.png"), rgb[..., ::-1])
    return work / "assess.yaml", folder


def assess(config: Path, images: Path, output: Path, *extra: str) -> int:
    args = ["assess", "--config", str(config), "--images", str(images), "--output", str(output)]
    return main([*args, "--steps", "5", "--cell", str(CELL), "--resamples", "500", *extra])


def test_no_technique_reconstruction_is_the_stock_img2img_pipeline():
    """Same strength, DDIM schedule, latent and noise: diffusers' img2img pipeline at guidance 1
    gives the same pictures (another code path: equal up to float32 rounding); a ControlNet's
    guidance changes them."""
    from diffusers import DDIMScheduler

    extractor = DiffusionFeatureExtractor(
        "tiny",
        LAYERS,
        img_size=64,
        vae_decoder=True,
        variants=[Variant(name="canny", prompt="", controlnets=[{"model": "tiny-controlnet-canny"}])],
    )
    images = shapes_images(2, 64, seed=3)
    ours = reconstruct(extractor, images, NO_TECHNIQUE, strength=0.6, steps=10, seed=5)
    stock = stock_img2img(extractor, images, strength=0.6, steps=10, seed=5)
    assert_close_up_to_rounding(ours * 0.5 + 0.5, stock)
    steps = chain_timesteps(DDIMScheduler.from_config(extractor.scheduler.config), 0.6, 10)
    assert steps.tolist() == [501, 401, 301, 201, 101, 1]  # SD 1.5's "leading" DDIM schedule, last 6 of 10
    guided = reconstruct(extractor, images, extractor.variants[0], strength=0.6, steps=10, seed=5)
    assert (guided - ours).abs().max() > 1e-2


def test_assess_writes_grids_and_scores_and_a_resumed_run_equals_an_uninterrupted_one(setup, tmp_path, capsys):
    config, images = setup
    whole = tmp_path / "whole"
    assert assess(config, images, whole) == 0
    out = capsys.readouterr().out
    assert "GATE score" in out and "anchor t=150" in out
    for variant in VARIANTS[1:]:  # one verdict line each
        assert any(line.startswith(f"{variant}: ") and "vs no technique" in line for line in out.splitlines()), out

    rows = list(csv.DictReader((whole / "gate_scores.csv").open()))
    assert {(r["variant"], r["layer"]) for r in rows} == {(v, k) for v in VARIANTS for k in ["all", *LAYERS]}
    overall = [r for r in rows if r["layer"] == "all"]
    assert [float(r["score"]) for r in overall] == sorted((float(r["score"]) for r in overall), reverse=True)
    for r in rows:
        assert float(r["low"]) <= float(r["score"]) <= float(r["high"]) and r["images"] == "3"
        assert r["verdict"] in (
            {"reference"} if r["variant"] == "no technique" else {"helps", "no clear effect", "hurts"}
        )
    saved = json.loads((whole / "gate_scores.json").read_text())
    assert saved["settings"]["anchor_timestep"] == default_anchor_timestep(50) == 150

    anchor = anchor_name(150)
    for i in range(3):
        record = json.loads((whole / "images" / f"shape{i}.json").read_text())
        for variant in VARIANTS:  # score = (diff_anchor - diff) / diff_anchor, per layer
            for layer in LAYERS:
                d, d_anchor = record["diff"][variant][layer], record["diff"][anchor][layer]
                assert record["score"][variant][layer] == pytest.approx((d_anchor - d) / d_anchor, rel=1e-6)
            assert 5 < record["psnr"][variant] < 60 and 0 < record["ssim"][variant] <= 1
        grid = cv2.imread(str(whole / "grids" / f"shape{i}.png"))
        assert grid.shape == (HEADER + CELL + CAPTION + PAD, 5 * (CELL + PAD) + PAD, 3)  # input + 4 pictures
    assert not [p for p in whole.rglob("*") if ".tmp" in p.name]  # written atomically

    # a run stopped after two images, continued: the two are kept, the table is the same
    resumed = tmp_path / "resumed"
    assert assess(config, images, resumed, "--limit", "2") == 0
    kept = {p.name: p.stat().st_mtime_ns for p in (resumed / "images").iterdir()}
    assert assess(config, images, resumed) == 0
    assert {p.name: p.stat().st_mtime_ns for p in (resumed / "images").iterdir() if p.name in kept} == kept
    assert json.loads((resumed / "gate_scores.json").read_text()) == saved  # deterministic under the seed

    # other settings: refused, naming them; --overwrite starts over
    capsys.readouterr()
    assert assess(config, images, resumed, "--strength", "0.8") == 1
    err = capsys.readouterr().err
    assert "strength: 0.6 (folder) vs 0.8 (now)" in err and "--overwrite true" in err
    assert assess(config, images, resumed, "--strength", "0.8", "--overwrite", "true", "--limit", "1") == 0
    assert sorted(p.name for p in (resumed / "images").iterdir()) == ["shape0.json"]
    assert sorted(p.name for p in (resumed / "grids").iterdir()) == ["shape0.png"]  # the old settings' are gone

    # a record is reused only for the file it was made from: another folder's shape0.png is assessed anew
    other = tmp_path / "other"
    other.mkdir()
    (other / "shape0.png").write_bytes((images / "shape1.png").read_bytes())
    before = json.loads((resumed / "images" / "shape0.json").read_text())
    assert assess(config, other, resumed, "--strength", "0.8") == 0
    after = json.loads((resumed / "images" / "shape0.json").read_text())
    assert after["image"] == str(other / "shape0.png") and after["score"] != before["score"]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--variants", "[plain, nope]"], "unknown variant(s) ['nope']; the config has ['plain', 'canny', 'chain']"),
        (["--layers", "[up-level1-upsampler-outt]"], "up-level1-upsampler-out"),  # the closest valid name
        (["--layers", "[up-level0-upsampler-out]"], "smaller than the 3x3 Laplacian"),
        (["--anchor_timestep", "40"], "must be above the assessed one (50)"),
        (["--strength", "0"], "--strength must be in (0, 1], got 0.0"),
        (["--limit", "0"], "--limit must be positive, got 0"),
    ],
)
def test_bad_options_stop_with_one_line(setup, tmp_path, capsys, extra, message):
    config, images = setup
    assert assess(config, images, tmp_path / "out", *extra) == 1
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err


def test_an_empty_or_unreadable_folder_stops_before_loading_weights(setup, tmp_path, capsys):
    config, _ = setup
    (tmp_path / "empty").mkdir()
    assert assess(config, tmp_path / "empty", tmp_path / "out") == 1
    assert "no images" in capsys.readouterr().err
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "a.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    assert assess(config, broken, tmp_path / "out2") == 1
    assert "a.png" in capsys.readouterr().err


def test_the_vae_decoder_is_loaded_only_for_assess():
    """Features never decode: the extractor every task, extract and visualize build has no
    decoder; assess asks for one. The t = 0 reference read through at_timestep equals an
    extractor built at t = 0 without noise."""
    plain = DiffusionFeatureExtractor("tiny", LAYERS, img_size=64)
    assert plain.vae.decoder is None
    assessing = DiffusionFeatureExtractor("tiny", LAYERS, img_size=64, vae_decoder=True)
    assert assessing.vae.decoder is not None
    images = shapes_images(2, 64, seed=4)
    with assessing.at_timestep(0, noise=False):
        at_zero = assessing(images)["plain"]
    assert assessing.timestep == 50 and assessing.noise
    clean = DiffusionFeatureExtractor("tiny", LAYERS, img_size=64, timestep=0, noise=False)(images)["plain"]
    for layer in LAYERS:
        assert_close_up_to_rounding(at_zero[layer], clean[layer], msg=layer)
    chain = DiffusionFeatureExtractor("tiny", LAYERS, img_size=64, variants=[Variant(name="c", denoise_from=60)])
    with pytest.raises(ValueError, match=r"denoise_from \(60\) must be above the timestep it extracts at \(150\)"):
        with chain.at_timestep(150):
            chain(images)
        assert (at_zero[layer] - assessing(images)["plain"][layer]).abs().max() > 1e-3  # t=50 with noise differs


def test_the_shipped_assess_config_runs_on_its_datamodule_split(tmp_path, capsys):
    """configs/assess_quickstart.yaml without --images: the quickstart datamodule's val split,
    generated on first use, shrunk to 64² (its up-level0 is then too small to score: left out)."""
    config = Path(__file__).resolve().parents[1] / "configs" / "assess_quickstart.yaml"
    args = ["assess", "--config", str(config), "--split", "val", "--limit", "1", "--output", str(tmp_path / "out")]
    args += ["--data.init_args.root", str(tmp_path / "data" / "ADEChallengeData2016"), "--data.init_args.num_val", "2"]
    args += ["--data.init_args.size", "64", "--model.init_args.backbone.img_size", "64", "--steps", "4"]
    args += ["--layers", "[up-level2-upsampler-out]", "--variants", "[long prompt, canny]", "--cell", str(CELL)]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "long prompt: " in out and "canny: " in out
    assert [p.name for p in (tmp_path / "out" / "images").iterdir()] == ["shapes_validation_00000.json"]


def test_summary_compares_each_variant_with_no_technique_of_its_seed_and_skips_undefined_scores():
    """Hand-made records: variant `s2` (seed 2) against `no technique, seed 2`, `s0` against
    `no technique`; a layer whose anchor equals the reference (NaN score) is left out."""
    records = []
    for i in range(4):
        score = {
            "no technique": {"x": 0.5, "y": float("nan")},
            "no technique, seed 2": {"x": 0.1, "y": float("nan")},
            "s0": {"x": 0.6 + 0.01 * i, "y": float("nan")},
            "s2": {"x": 0.3 + 0.01 * i, "y": float("nan")},
        }
        quality = {"no technique": 20.0, "s0": 21.0, "s2": 22.0}
        records.append({"score": score, "psnr": quality, "ssim": {k: 0.5 for k in quality}})
    baselines = {"no technique": "no technique", "no technique, seed 2": "no technique, seed 2"}
    baselines.update({"s0": "no technique", "s2": "no technique, seed 2"})
    rows = {(r["variant"], r["layer"]): r for r in summarize(records, baselines, 0.95, 200, 0)}
    assert rows["s2", "x"]["delta"] == pytest.approx(0.215) and rows["s2", "x"]["verdict"] == "helps"
    assert rows["s0", "x"]["delta"] == pytest.approx(0.115) and rows["s0", "x"]["baseline"] == "no technique"
    assert rows["s2", "all"]["score"] == pytest.approx(rows["s2", "x"]["score"])  # the NaN layer left out
    assert np.isnan(rows["s2", "y"]["score"]) and rows["s2", "y"]["images"] == 0
    assert rows["s2", "y"]["verdict"] == "undefined" and rows["s2", "x"]["images"] == 4
    assert np.isnan(rows["no technique, seed 2", "all"]["psnr"])  # scored, never reconstructed
    two = {(r["variant"], r["layer"]): r for r in summarize(records[:2], baselines, 0.95, 200, 0)}
    assert two["s2", "x"]["verdict"] == "too few images (2)"  # a bootstrap of two values says nothing
