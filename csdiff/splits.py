"""The label-scarce protocol's repetitions: fit and test one config on several random splits."""

from __future__ import annotations

import csv
import io
import json
import math
import statistics
from collections.abc import Sequence
from pathlib import Path

import yaml

from csdiff.io import save_text


def run_splits(config: str, seeds: Sequence[int], overrides: Sequence[str] = ()) -> dict:
    """``csdiff fit`` then test on each split seed (``data.init_args.split``); returns and writes
    (``splits.json``, ``splits.csv`` beside the runs' logs) the per-split and mean ± std mIoU
    and per-class IoU. The std is the sample standard deviation (n - 1)."""
    from csdiff.cli import run_lightning

    text = yaml.safe_load(Path(config).read_text())
    logger = (text.get("trainer") or {}).get("logger")
    out_dir = Path(logger["init_args"]["save_dir"]) if isinstance(logger, dict) and "init_args" in logger else Path(".")
    runs = []
    for seed in seeds:
        args = ["fit", "--config", config, "--data.init_args.split", str(seed)]
        if isinstance(logger, dict) and "init_args" in logger:
            args += ["--trainer.logger.init_args.version", f"split{seed}"]
        cli = run_lightning([*args, *overrides])
        cli.trainer.test(cli.model, datamodule=cli.datamodule)
        runs.append(dict(cli.model.test_report, seed=seed))
    classes = list(runs[0]["IoU"])
    summary = {
        "config": config,
        "seeds": list(seeds),
        "mIoU_mean": statistics.fmean(r["mIoU"] for r in runs),
        "mIoU_std": statistics.stdev(r["mIoU"] for r in runs) if len(runs) > 1 else 0.0,
        # the mean over the classes present in each split's test images (upstream counts absent ones as 0)
        "mIoU_present_mean": statistics.fmean(r["mIoU_present"] for r in runs),
        "mIoU_present_std": statistics.stdev(r["mIoU_present"] for r in runs) if len(runs) > 1 else 0.0,
        "IoU_mean": {c: _nanmean([r["IoU"][c] for r in runs]) for c in classes},
        "runs": runs,
    }
    save_text(out_dir / "splits.json", json.dumps(summary, indent=1) + "\n")
    save_text(out_dir / "splits.csv", _csv(runs, classes))
    print(format_splits(summary))
    return summary


def _nanmean(values: list[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return statistics.fmean(finite) if finite else math.nan


def _csv(runs: list[dict], classes: list[str]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["seed", "mIoU", "mIoU_present", *classes])
    for r in runs:
        writer.writerow(
            [r["seed"], f"{r['mIoU']:.6f}", f"{r['mIoU_present']:.6f}", *(f"{r['IoU'][c]:.6f}" for c in classes)]
        )
    return buffer.getvalue()


def format_splits(summary: dict) -> str:
    lines = [f"{'split':>6}  {'mIoU':>13}  {'mIoU present':>13}"]
    lines += [f"{r['seed']:>6}  {100 * r['mIoU']:13.2f}  {100 * r['mIoU_present']:13.2f}" for r in summary["runs"]]
    mean = f"{100 * summary['mIoU_mean']:.2f} ± {100 * summary['mIoU_std']:.2f}"
    present = f"{100 * summary['mIoU_present_mean']:.2f} ± {100 * summary['mIoU_present_std']:.2f}"
    lines.append(f"{'mean':>6}  {mean:>13}  {present:>13}")
    return "\n".join(lines)
