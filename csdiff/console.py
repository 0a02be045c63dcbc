"""What a `csdiff` verb prints: a start line, one progress bar per loop, an end line.

Lightning and its dependencies print tips, accelerator inventories and deprecation notices of
their own internals at every run; a user reading a training log needs the model, the device
and where the results went. The filters here are installed by the CLI only, for the run's
duration: a library user's logging and warnings settings stay theirs.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

# rank-zero info lines of Lightning that say nothing about this run
_SILENCED_PREFIXES = ("💡 Tip", "GPU available:", "TPU available:", "HPU available:", "Seed set to")
_LIGHTNING_LOGGERS = (
    "lightning.pytorch.utilities.rank_zero",
    "lightning.fabric.utilities.rank_zero",
    "lightning.fabric.utilities.seed",
)
# deprecations inside third-party code (not the user's to act on)
_SILENCED_WARNINGS = (
    r"`isinstance\(treespec, LeafSpec\)` is deprecated",
    r"(?s).*was deprecated in v4\.\d+\.\d+ and will be removed",  # jsonargparse, as Lightning's CLI calls it (the message starts with a newline)
    r"(?s).*By default only one JsonargparseDeprecationWarning",
    r".*module\(s\) in eval mode at the start of training",  # the frozen backbone stays in eval mode on purpose
    r"predict returned None",  # `extract` and `visualize` write their results in the predict loop
)


class _DropNoise(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.getMessage()).startswith(_SILENCED_PREFIXES)


@contextmanager
def quiet_console() -> Iterator[None]:
    """Silence Lightning's tips and inventories and third-party deprecation notices while a verb runs."""
    noise = _DropNoise()
    loggers = [logging.getLogger(name) for name in _LIGHTNING_LOGGERS]
    for logger in loggers:
        logger.addFilter(noise)
    try:
        with warnings.catch_warnings():
            for message in _SILENCED_WARNINGS:
                warnings.filterwarnings("ignore", message=message)
            yield
    finally:
        for logger in loggers:
            logger.removeFilter(noise)


def start_line(verb: str, model: Any, trainer: Any) -> str:
    """`csdiff fit: SegmentationTask · tiny (sd) · variants plain, canny · layers 4 · cpu ×1 · float32`."""
    parts = [type(model).__name__]
    extractor = getattr(model, "extractor", None)
    if extractor is not None:
        parts.append(f"{extractor.spec.model} ({extractor.family.name})")
        parts.append("variants " + ", ".join(v.name for v in extractor.variants))
        parts.append(
            f"layers {', '.join(extractor.layers)}" if len(extractor.layers) <= 4 else f"{len(extractor.layers)} layers"
        )
    parts.append(f"{trainer.strategy.root_device.type} ×{trainer.num_devices * trainer.num_nodes}")
    if extractor is not None:
        parts.append(str(extractor.dtype).removeprefix("torch."))
    parts.append(f"precision {trainer.precision}")
    return f"csdiff {verb}: " + " · ".join(parts)


def fit_end_line(trainer: Any) -> str:
    """Where a finished fit left its results: best score and checkpoint, last checkpoint, logs."""
    parts = []
    best = trainer.checkpoint_callback
    if best is not None:
        if best.monitor is not None and best.best_model_score is not None:
            parts.append(
                f"best {best.monitor} {float(best.best_model_score):.4f}"
                + (f" ({best.best_model_path})" if best.best_model_path else "")
            )
        if best.last_model_path:
            parts.append(f"last {best.last_model_path}")
    logger = trainer.logger
    if logger is not None and getattr(logger, "save_dir", None):
        parts.append(f"tensorboard --logdir {Path(logger.save_dir)}")
    return "csdiff fit: done · " + " · ".join(parts or ["no checkpoint or logger configured"])
