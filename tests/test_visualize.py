"""`csdiff visualize`: joint-basis PCA pictures, the t=0 reference column and the grid layout."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from csdiff.data.reading import DataError
from csdiff.visualize.attention import query_map, word_channels, word_map
from csdiff.visualize.features import CAPTION, HEADER, LABEL, PAD, grid_size, run_visualize
from csdiff.visualize.pca import cosine_distance, fit_pca

LAYERS = ["up-level1-upsampler-out", "up-level2-upsampler-out"]
CONFIG = """\
model:
  class_path: csdiff.tasks.SegmentationTask
  init_args:
    num_classes: 4
    backbone:
      model: tiny
      img_size: 64
      timestep: 50
    variants:
      - name: a
        prompt: a photo of shapes
      - name: b
        prompt: a photo of shapes
      - name: other
        prompt: a photo
        seed: 3
    layers: [up-level1-upsampler-out, up-level2-upsampler-out]
"""


def _images(folder: Path, n: int) -> None:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        cv2.imwrite(str(folder / f"img{i}.png"), rng.integers(0, 255, (40 + 8 * i, 56, 3), dtype=np.uint8))


def _cell(grid: np.ndarray, row: int, column: int, cell: int) -> np.ndarray:
    top = HEADER + row * (LABEL + cell + CAPTION) + LABEL
    left = PAD + column * (cell + PAD)
    return grid[top : top + cell, left : left + cell]


def test_identical_features_get_identical_colours_and_zero_distance():
    torch.manual_seed(0)
    x, y = torch.randn(32, 6, 5), torch.randn(32, 6, 5) * 3 + 1
    basis = fit_pca([x.half(), y.half(), x.half()])  # fp16 maps are upcast
    assert basis.axes.shape == (32, 3) and basis.axes.dtype == torch.float32
    assert np.array_equal(basis.to_rgb(x), basis.to_rgb(x.clone()))
    assert not np.array_equal(basis.to_rgb(x), basis.to_rgb(y))
    big = basis.to_rgb(x, (12, 10))
    assert big.shape == (12, 10, 3) and np.array_equal(big[::2, ::2], basis.to_rgb(x))  # nearest neighbour
    assert cosine_distance(x, x) == pytest.approx(0.0, abs=1e-6)
    assert cosine_distance(x, -x) == pytest.approx(2.0, abs=1e-6)
    assert fit_pca([torch.randn(2, 4, 4)]).axes[:, 2].abs().sum() == 0  # fewer channels than components


def test_visualize_draws_one_grid_per_image_with_a_joint_basis(tmp_path):
    _images(tmp_path / "in", 2)
    (tmp_path / "cfg.yaml").write_text(CONFIG)
    base = ["--config", str(tmp_path / "cfg.yaml"), "--images", str(tmp_path / "in"), "--cell", "64"]
    assert run_visualize([*base, "--output", str(tmp_path / "out")]) == 0
    assert run_visualize([*base, "--output", str(tmp_path / "all"), "--joint", "images"]) == 0
    for folder in ("out", "all"):
        files = sorted(p.name for p in (tmp_path / folder).iterdir())
        assert files == ["img0.png", "img1.png"]  # no temporaries left
    grid = cv2.imread(str(tmp_path / "out" / "img0.png"))
    assert grid.shape[:2] == grid_size(len(LAYERS), 5, 64) == (214, 344)  # input | t=0 | a | b | other
    for row in range(len(LAYERS)):
        a, b, other = (_cell(grid, row, column, 64) for column in (2, 3, 4))
        assert np.array_equal(a, b)  # same options, same features: same colours in the one basis
        assert not np.array_equal(a, other)
        assert not np.array_equal(_cell(grid, row, 1, 64), a)  # t=0 differs from the noisy features
    everything = cv2.imread(str(tmp_path / "all" / "img1.png"))
    assert everything.shape == grid.shape


def test_bad_image_folder_is_one_clear_error(tmp_path):
    (tmp_path / "cfg.yaml").write_text(CONFIG)
    args = ["--config", str(tmp_path / "cfg.yaml"), "--output", str(tmp_path / "out")]
    with pytest.raises(DataError, match=r"missing is neither a folder nor an image file"):
        run_visualize([*args, "--images", str(tmp_path / "missing")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"no images .* found under"):
        run_visualize([*args, "--images", str(tmp_path / "empty")])
    assert not (tmp_path / "out").exists()


def test_word_channels_follow_windows_and_sub_words(tiny_parts):
    tokenizer = tiny_parts.tokenizer
    assert word_channels(tokenizer, "a photo of shapes on a background", "shapes") == [4]
    assert word_channels(tokenizer, "a photo of circles", "circles") == [4, 5, 6]  # 'circl', 'e', 's</w>'
    assert word_channels(tokenizer, "a photo, a photo", "a") == [1, 4]  # every occurrence
    long = " ".join(["photo"] * 80 + ["shapes"])  # token 80: window 2, position 5
    assert word_channels(tokenizer, long, "shapes") == [1 + 80 % 75]
    with pytest.raises(ValueError, match="the word 'a' is not in the prompt 'zebra'"):
        word_channels(tokenizer, "zebra", "a")  # not the last sub-word of another word
    maps = torch.zeros(1, 2 * 77, 2, 2)
    maps[0, 4], maps[0, 77 + 5, 0, 0] = 1.0, 1.0
    assert torch.equal(word_map(maps, [4, 5]), torch.tensor([[[1.0, 0.5], [0.5, 0.5]]]))


def test_query_point_picks_its_row_of_the_self_attention_map():
    probs = torch.rand(1, 6, 6)  # (B, query, key) over a 2x3 grid, as the attention computes it
    self_map = probs.transpose(1, 2).reshape(1, 6, 2, 3)  # (B, keys, H, W): the `-self-map` layout
    assert torch.equal(query_map(self_map, (0.9, 0.1)), probs[:, 2].view(1, 2, 3))  # x → column 2, y → row 0
    assert torch.equal(query_map(self_map, (0.0, 1.0)), probs[:, 3].view(1, 2, 3))
    with pytest.raises(ValueError, match=r"fractions of the image.*\[1.5, 0.0\]"):
        query_map(self_map, (1.5, 0.0))


def test_visualize_draws_word_and_point_attention_and_refuses_absent_words(tmp_path):
    _images(tmp_path / "in", 1)
    (tmp_path / "cfg.yaml").write_text(CONFIG)
    base = ["--config", str(tmp_path / "cfg.yaml"), "--images", str(tmp_path / "in"), "--cell", "64"]
    with pytest.raises(ValueError, match="the word 'zebra' is not in the prompt 'a photo'"):
        run_visualize([*base, "--output", str(tmp_path / "bad"), "--words", "[zebra]", "--attention_variant", "other"])
    with pytest.raises(ValueError, match="query points need a self-attention map layer"):
        run_visualize([*base, "--output", str(tmp_path / "bad"), "--points", "[[0.5, 0.5]]", "--self_layer", LAYERS[0]])
    args = ["--output", str(tmp_path / "out"), "--words", "[shapes, photo]", "--points", "[[0.25, 0.75]]"]
    assert run_visualize([*base, *args]) == 0
    pictures = cv2.imread(str(tmp_path / "out" / "img0.attention.png"))
    assert pictures.shape[:2] == (HEADER + 64 + PAD, 4 * (64 + PAD) + PAD)  # input | 2 words | 1 point
    assert cv2.imread(str(tmp_path / "out" / "img0.png")).shape[:2] == grid_size(
        len(LAYERS), 5, 64
    )  # up_cross not drawn


def test_visualize_is_a_csdiff_verb_and_draws_a_trained_gate(tmp_path, capsys):
    """Through `csdiff`: listed in the overview, bad input is one line with exit 1; with the
    checkpoint of a (briefly) trained quickstart fit it also draws the learned gate per image."""
    from test_segmentation_cli import quick_args

    from csdiff.cli import main
    from csdiff.visualize.gate import BAR, LINE, PAD, VARIANT_COLOURS, gate_weights, load_gated_task

    assert main(["--help"]) == 0 and "visualize" in capsys.readouterr().out
    args = quick_args(tmp_path)
    assert main(["fit", *args, "--trainer.max_steps", "2", "--trainer.limit_val_batches", "1"]) == 0
    ckpt = tmp_path / "logs" / "version_0" / "checkpoints" / "last.ckpt"
    config = args[args.index("--config") + 1]
    draw = [
        "visualize",
        "--config",
        config,
        "--model.init_args.backbone.img_size",
        "64",
        "--output",
        str(tmp_path / "out"),
    ]
    assert main([*draw, "--images", str(tmp_path / "missing")]) == 1
    assert "missing is neither a folder nor an image file" in capsys.readouterr().err
    images = tmp_path / "data" / "ADEChallengeData2016" / "images" / "validation"
    assert main([*draw, "--images", str(images), "--ckpt_path", str(ckpt), "--tensorboard", "true"]) == 0
    names = sorted(p.stem for p in images.iterdir())
    assert sorted(p.name for p in (tmp_path / "out").glob("*.gate.png")) == [f"{n}.gate.png" for n in names]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "out" / "tensorboard"))
    events.Reload()
    assert sorted(events.Tags()["images"]) == sorted([*names, *(f"{n}.gate" for n in names)])
    task = load_gated_task("csdiff.tasks.SegmentationTask", str(ckpt))
    from csdiff.data.segmentation import ImageFolderDataset

    weights = gate_weights(task, ImageFolderDataset(str(images))[0]["image"][None])
    assert len(weights) == len(task.levels) and all(
        torch.allclose(w.sum(dim=0), torch.ones(w.shape[1])) for w in weights
    )
    picture = cv2.imread(str(tmp_path / "out" / f"{names[0]}.gate.png"))[..., ::-1]
    assert picture.shape[0] == LINE + len(task.levels) * (2 * LINE + BAR + PAD) + PAD
    bars = picture[LINE + 2 * LINE : LINE + 2 * LINE + BAR]  # the first level's strip
    for v in range(
        len(task.variant_names)
    ):  # every variant draws some channels after 2 steps from a near-uniform start
        assert (bars == np.array(VARIANT_COLOURS[v], np.uint8)).all(axis=-1).any(), task.variant_names[v]


def test_visualize_on_two_processes_draws_every_image_once(tmp_path):
    """Lightning's predict loop with DDP on 2 CPU processes: each rank draws its shard, together
    every image, none twice (a real launch: the process boundary is the point)."""
    import os
    import subprocess
    import sys

    (tmp_path / "cfg.yaml").write_text(CONFIG)
    _images(tmp_path / "in", 3)
    cmd = [
        sys.executable,
        "-m",
        "csdiff",
        "visualize",
        "--config",
        str(tmp_path / "cfg.yaml"),
        "--images",
        str(tmp_path / "in"),
        "--output",
        str(tmp_path / "out"),
        "--cell",
        "32",
        "--trainer.accelerator",
        "cpu",
        "--trainer.devices",
        "2",
        "--trainer.strategy",
        "ddp",
    ]
    proc = subprocess.run(
        cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600, check=False
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["img0.png", "img1.png", "img2.png"]
