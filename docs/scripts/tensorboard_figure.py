"""Draw the picture of a run's TensorBoard logs shown in the docs (Getting started).

Our machines have no browser to screenshot TensorBoard, so this reads the run's event file with
TensorBoard's own reader and draws what its Scalars and Images tabs show for the quickstart:
validation mIoU, the training loss, each variant's mean gate weight per level, and the last
``val/prediction_0`` picture (input | prediction | ground truth).

    python docs/scripts/tensorboard_figure.py outputs/quickstart/version_0 docs/assets/quickstart_tensorboard.png
"""

from __future__ import annotations

import argparse
from pathlib import Path

import cv2
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the headless backend)
import numpy as np  # noqa: E402
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402


def draw(run: Path, output: Path) -> None:
    events = EventAccumulator(str(run), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    tags = events.Tags()
    if "val/mIoU" not in tags["scalars"]:
        raise SystemExit(f"{run}: no val/mIoU in its event files; give the folder of a finished fit")

    def series(tag: str) -> tuple[np.ndarray, np.ndarray]:
        points = events.Scalars(tag)
        return np.array([p.step for p in points]), np.array([p.value for p in points])

    fig = plt.figure(figsize=(12, 6.2), dpi=100)
    grid = fig.add_gridspec(2, 3)
    ax = fig.add_subplot(grid[0, 0])
    ax.plot(*series("val/mIoU"), marker="o")
    ax.set_title("val/mIoU")
    ax = fig.add_subplot(grid[0, 1])
    steps, loss = series("train/loss")
    ax.plot(steps, loss, alpha=0.3, color="tab:blue")
    smooth = np.convolve(loss, np.ones(16) / 16, mode="valid")
    ax.plot(steps[len(steps) - len(smooth) :], smooth, color="tab:blue")
    ax.set_title("train/loss (smoothed)")
    ax = fig.add_subplot(grid[0, 2])
    for tag in sorted(t for t in tags["scalars"] if t.startswith("gate/")):
        ax.plot(*series(tag), label=tag.removeprefix("gate/"))
    ax.set_title("gate/<level>/<variant>: mean weight")
    ax.legend(fontsize=7)
    for ax in fig.axes:
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    pictures = sorted(t for t in tags["images"] if t.startswith("val/prediction"))
    if pictures:
        last = events.Images(pictures[0])[-1]
        ax = fig.add_subplot(grid[1, :])
        ax.imshow(cv2.imdecode(np.frombuffer(last.encoded_image_string, np.uint8), cv2.IMREAD_COLOR)[..., ::-1])
        ax.set_title(f"{pictures[0]} at step {last.step}: input | prediction | ground truth")
        ax.axis("off")
    fig.tight_layout()
    output.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(output)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path, help="a run's log folder (outputs/quickstart/version_0)")
    parser.add_argument("output", type=Path, help="the PNG to write")
    args = parser.parse_args()
    draw(args.run, args.output)
