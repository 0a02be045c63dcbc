"""The benchmark scripts run in a reduced mode, so they cannot rot (their figures are in benchmarks/RESULTS.md)."""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.mark.parametrize("script,args,expect", [
    ("unet_early_stop.py", ["--model", "tiny", "--img_size", "64", "--repeats", "1"], "segmentation"),
    ("feature_cache.py", ["--num_val", "2"], "warm is"),
    ("scarce_memory.py", ["--model", "tiny", "--img_size", "64", "--steps", "2", "--test_images", "1"], "peak RSS after test"),
    ("startup.py", ["--configs", str(BENCHMARKS.parent / "configs" / "seg_ade20k_public.yaml")], "seg_ade20k_public.yaml"),
])
def test_benchmark_runs(script, args, expect, monkeypatch, capsys, two_threads):
    monkeypatch.setattr(sys, "argv", [script, *args])
    runpy.run_path(str(BENCHMARKS / script), run_name="__main__")
    assert expect in capsys.readouterr().out
