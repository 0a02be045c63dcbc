"""csdiff's own verbs and entry-point basics, in-process through main(args=...)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
from safetensors import safe_open

from csdiff import __version__
from csdiff.cli import main


def test_version_and_help(capsys):
    assert main(["--version"]) == 0
    assert __version__ in capsys.readouterr().out
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for verb in ("fit", "validate", "test", "predict", "layers", "extract"):
        assert verb in out


def test_unknown_command_exits_2(capsys):
    assert main(["frobnicate"]) == 2
    assert "unknown command" in capsys.readouterr().err


def test_layers_lists_197_names_with_shapes(capsys):
    assert main(["layers", "--model", "tiny", "--img_size", "64", "--format", "json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    names = {r["name"]: r["shape"] for r in rows}
    assert len(names) == 198  # 197 activation names + up_cross
    assert names["up-level1-upsampler-out"] == [64, 4, 4]
    assert names["up-level3-repeat0-vit-block0-self-map"] == [64, 8, 8]
    assert names["up_cross"] == [154, 8, 8]


def test_layers_table_and_config_file(tmp_path, capsys):
    cfg = tmp_path / "layers.yaml"
    cfg.write_text("model: tiny\nimg_size: 128\n")
    assert main(["layers", "--config", str(cfg)]) == 0
    out = capsys.readouterr().out
    assert "up-level2-upsampler-out" in out and "64 x 16 x 16" in out


def _images(folder: Path, n: int) -> None:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        cv2.imwrite(str(folder / f"img{i}.png"), rng.integers(0, 255, (40 + 8 * i, 56, 3), dtype=np.uint8))


def test_extract_writes_one_file_per_image_and_skips_done(tmp_path, capsys):
    _images(tmp_path / "in" / "sub", 3)
    args = [
        "extract",
        "--extractor.model",
        "tiny",
        "--extractor.img_size",
        "64",
        "--extractor.layers",
        '["up-level1-upsampler-out", "up_cross"]',
        "--extractor.variants",
        '[{"name": "plain", "prompt": "a photo"}, {"name": "s1", "seed": 1}]',
        "--input",
        str(tmp_path / "in"),
        "--output",
        str(tmp_path / "out"),
        "--batch_size",
        "2",
    ]
    assert main(args) == 0
    files = sorted((tmp_path / "out" / "sub").glob("*.safetensors"))
    assert [f.name for f in files] == ["img0.safetensors", "img1.safetensors", "img2.safetensors"]
    with safe_open(str(files[0]), "pt") as f:
        assert set(f.keys()) == {
            "plain/up-level1-upsampler-out",
            "plain/up_cross",
            "s1/up-level1-upsampler-out",
            "s1/up_cross",
        }
        tensor = f.get_tensor("plain/up-level1-upsampler-out")
        assert tuple(tensor.shape) == (64, 4, 4) and str(tensor.dtype) == "torch.float16"
        meta = json.loads(f.metadata()["csdiff"])
        assert meta["backbone"]["model"] == "tiny" and meta["timestep"] == 50
    assert not list((tmp_path / "out").rglob("*.tmp*"))
    capsys.readouterr()
    assert main(args) == 0
    assert "(3 already present)" in capsys.readouterr().out


def test_console_script_exit_codes(tmp_path):
    """The installed `python -m csdiff` entry point: 0 on success, non-zero on an unknown command."""
    ok = subprocess.run([sys.executable, "-m", "csdiff", "--version"], capture_output=True, text=True)
    assert ok.returncode == 0 and __version__ in ok.stdout
    bad = subprocess.run([sys.executable, "-m", "csdiff", "frobnicate"], capture_output=True, text=True)
    assert bad.returncode == 2


LOADED = """
import json, sys
from csdiff.cli import main
try:
    code = main(sys.argv[1:])
except SystemExit as stop:
    code = stop.code
print(json.dumps([code, sorted(m for m in ("torch", "lightning", "transformers", "diffusers", "csdiff.tasks") if m in sys.modules)]))
"""


@pytest.mark.parametrize(
    "args,code,may_load",
    [
        (["--help"], 0, []),
        (["frobnicate"], 2, []),
        (["layers", "--help"], 0, []),
        (["layers", "--formt", "json"], 2, []),
        (["scarce-splits", "--help"], 0, []),
        (["fit", "--config", "no/such/config.yaml"], 2, []),  # the config file is checked before any heavy import
        (["fit", "--config", "{trainer: {max_epochs: [1}}"], 2, []),  # not a file, nor inline YAML
        # LightningCLI's parser is built from the Trainer's signature: Lightning (and with it torch and, through
        # torchmetrics, transformers) is the floor; the tasks and diffusers are not loaded for help
        (["fit", "--help"], 0, ["lightning", "torch", "transformers"]),
    ],
)
def test_help_and_argument_errors_load_only_what_they_need(args, code, may_load):
    """Start-up (issue 19.8): `--help` and argument errors answer before heavy modules load.
    benchmarks/cli_startup.py times these; here, which modules each path imports."""
    proc = subprocess.run([sys.executable, "-c", LOADED, *args], capture_output=True, text=True, timeout=120)
    got_code, loaded = json.loads(proc.stdout.splitlines()[-1])
    assert got_code == code and set(loaded) <= set(may_load), (loaded, proc.stderr[-2000:])


@pytest.mark.parametrize("verb", ["layers", "extract"])
def test_own_verbs_print_config(verb, capsys):
    extra = ["--input", "x", "--output", "y"] if verb == "extract" else []
    with pytest.raises(SystemExit) as info:
        main([verb, *extra, "--print_config"])
    assert info.value.code in (0, None)
    assert "model" in capsys.readouterr().out


def test_killed_extract_leaves_only_complete_files_and_resumes(tmp_path):
    """SIGKILL mid-run: every file present is complete; a rerun finishes the rest identically."""
    import os
    import signal
    import time

    import torch
    from safetensors.torch import load_file

    _images(tmp_path / "in", 12)
    out = tmp_path / "out"
    cmd = [
        sys.executable,
        "-m",
        "csdiff",
        "extract",
        "--extractor.model",
        "tiny",
        "--extractor.img_size",
        "128",
        "--extractor.layers",
        '["legacy", "up_cross"]',
        "--input",
        str(tmp_path / "in"),
        "--output",
        str(out),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and len(list(out.glob("*.safetensors"))) < 2:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    present = sorted(out.glob("*.safetensors"))
    assert 2 <= len(present) < 12, "the kill should land mid-run"
    for path in present:
        assert len(load_file(str(path))) == 5  # loadable and complete: 4 legacy layers + up_cross
    assert main(cmd[3:]) == 0
    assert len(list(out.glob("*.safetensors"))) == 12 and not list(out.glob(".*tmp*"))
    fresh = tmp_path / "fresh"
    assert main([*cmd[3:-2], "--output", str(fresh)]) == 0
    for path in sorted(out.glob("*.safetensors")):
        a, b = load_file(str(path)), load_file(str(fresh / path.name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _extract_args(folder: Path, out: Path) -> list[str]:
    return [
        "extract",
        "--extractor.model",
        "tiny",
        "--extractor.img_size",
        "64",
        "--extractor.layers",
        '["up-level1-upsampler-out"]',
        "--input",
        str(folder),
        "--output",
        str(out),
        "--device",
        "cpu",
    ]


def test_extract_keeps_relative_paths_and_suffixes_apart(tmp_path, capsys):
    """d.jpg, d.png and sub/d.jpg give three files, none counted as "already present"."""
    rng = np.random.default_rng(0)
    for name in ("d.jpg", "d.png", "sub/d.jpg"):
        (tmp_path / "in" / name).parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(tmp_path / "in" / name), rng.integers(0, 255, (48, 48, 3), dtype=np.uint8))
    assert main(_extract_args(tmp_path / "in", tmp_path / "out")) == 0
    assert "wrote 3 feature files" in capsys.readouterr().out
    written = sorted(str(p.relative_to(tmp_path / "out")) for p in (tmp_path / "out").rglob("*.safetensors"))
    assert written == ["d.jpg.safetensors", "d.png.safetensors", "sub/d.safetensors"]


def test_extract_stops_when_two_inputs_would_share_an_output(tmp_path, capsys):
    folder = tmp_path / "in"
    folder.mkdir()
    for name in ("a.jpg", "a.png", "a.jpg.png"):  # a.jpg keeps its suffix; a.jpg.png's stem is a.jpg too
        cv2.imwrite(str(folder / name), np.zeros((48, 48, 3), np.uint8))
    assert main(_extract_args(folder, tmp_path / "out")) == 1
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert str(folder / "a.jpg") in line and str(folder / "a.jpg.png") in line and "rename" in line
    assert not (tmp_path / "out").exists()


def test_short_class_names_resolve(capsys):
    """`--model SegmentationTask --data QuickstartDataModule`, as Lightning's docs write them."""
    with pytest.raises(SystemExit) as info:
        main(["fit", "--model", "SegmentationTask", "--data", "QuickstartDataModule", "--print_config"])
    assert info.value.code in (0, None)
    out = capsys.readouterr().out
    assert "class_path: csdiff.tasks.SegmentationTask" in out and "class_path: csdiff.data.QuickstartDataModule" in out


def test_fit_says_what_runs_and_where_results_went_and_nothing_else(tmp_path, capfd):
    """A quiet console (issue 21): a start line naming task, model, family, variants, layers and
    device, an end line with the checkpoint and the TensorBoard command; no Lightning tips,
    accelerator inventory or third-party deprecation notices."""
    from test_segmentation_cli import quick_args

    assert main(["fit", *quick_args(tmp_path), "--trainer.max_steps", "2", "--trainer.limit_val_batches", "1"]) == 0
    out, err = capfd.readouterr()
    start = [line for line in out.splitlines() if line.startswith("csdiff fit: SegmentationTask")]
    assert start and "tiny (sd)" in start[0] and "variants plain, canny" in start[0] and "cpu ×1" in start[0], out
    end = [line for line in out.splitlines() if line.startswith("csdiff fit: done")]
    assert end and "last.ckpt" in end[0] and f"tensorboard --logdir {tmp_path / 'logs'}" in end[0], out
    for noise in (
        "💡 Tip",
        "GPU available",
        "TPU available",
        "LeafSpec",
        "Seed set to",
        "eval mode at the start of training",
        "Loading weights",  # transformers/diffusers per-component bars
        "Loading pipeline components",
        "Writing model shards",
    ):
        assert noise not in out + err, noise
