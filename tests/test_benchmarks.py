"""The benchmark scripts run in a reduced mode, so they cannot rot (their figures are in benchmarks/RESULTS.md)."""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.mark.parametrize(
    "script,args,expect",
    [
        (
            "startup.py",
            ["--configs", str(BENCHMARKS.parent / "configs" / "seg_ade20k_public.yaml")],
            "seg_ade20k_public.yaml",
        ),
    ],
)
def test_benchmark_runs(script, args, expect, monkeypatch, capsys, two_threads):
    monkeypatch.setattr(sys, "argv", [script, *args])
    runpy.run_path(str(BENCHMARKS / script), run_name="__main__")
    assert expect in capsys.readouterr().out


def test_run_all_quick_runs_every_script_and_writes_the_results(tmp_path, monkeypatch, capsys, two_threads):
    """`run_all.py --quick`: every benchmark of the suite in its reduced mode (tiny model, one
    repetition), each in its own process, and a results file with one section per script."""
    out = tmp_path / "RESULTS.md"
    out.write_text("# old\n\n## Notes\n\nkept remark\n")
    monkeypatch.setattr(sys, "argv", ["run_all.py", "--quick", "--output", str(out)])
    runpy.run_path(str(BENCHMARKS / "run_all.py"), run_name="__main__")
    text = out.read_text()
    assert "FAILED" not in text and "FAILED" not in capsys.readouterr().out
    for table in (
        "(b) ADE20K's 3 variants",
        "**step**",
        "segmentation",
        "warm is",
        "peak RSS after test",
        "compile+channels_last",
        "UNet calls per pair",
        "one merged checkpoint costs",
        "answer in under 2 s",
    ):
        assert table in text, table
    assert text.rstrip().endswith("kept remark") and text.count("## Notes") == 1


def test_run_all_only_reruns_one_script_and_keeps_the_other_sections(tmp_path, monkeypatch, two_threads):
    out = tmp_path / "RESULTS.md"
    out.write_text(
        "# Benchmark results\n\nWritten by `python benchmarks/run_all.py --quick` on 2026-01-01: CPU.\n\n"
        "## Extraction cost (a, b)\n\nold extraction table\n\n## UNet early stop\n\nold early-stop table\n\n## Notes\n\nkept remark\n"
    )
    monkeypatch.setattr(sys, "argv", ["run_all.py", "--quick", "--only", "unet_early_stop.py", "--output", str(out)])
    runpy.run_path(str(BENCHMARKS / "run_all.py"), run_name="__main__")
    text = out.read_text()
    assert "old extraction table" in text and "old early-stop table" not in text and "stopped s" in text
    assert (
        "Written by `python benchmarks/run_all.py --quick` on 2026-01-01: CPU. Rerun with `--only` unet_early_stop.py on"
        in text
    )
    assert text.rstrip().endswith("kept remark")
    monkeypatch.setattr(sys, "argv", ["run_all.py", "--quick", "--only", "nonexistent.py", "--output", str(out)])
    with pytest.raises(SystemExit):
        runpy.run_path(str(BENCHMARKS / "run_all.py"), run_name="__main__")
